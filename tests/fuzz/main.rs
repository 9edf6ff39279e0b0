//! A fuzz harness on stable Rust: seeded, structure-aware mutation of valid traffic (and some
//! random bytes) through the parsers that face untrusted or external input. See the
//! "Fuzzing" section of the README.
//!
//! Targets:
//! - `request`: the client request parser, then the session's command lookup, arity, key
//!   positions, slots, argument rules and echoed error replies;
//! - `reply`: the shard reply framer, RESP2 and RESP3 (attributes, pushes, streamed strings
//!   and aggregates, any depth);
//! - `gather`: scatter/gather merges of shard replies;
//! - `config`: `proxy.toml` text through `--config FILE --check-config`'s path;
//! - `cli`: command-line flags through the same validation;
//! - `rules`: `--readthrough` rule strings, rule building, prefix lookup, URL rendering.
//!
//! Checked for every input: no panic; peak memory allocated while processing it at most
//! 64 × its size + 1 MiB; the same result whatever the read boundaries (parsers, framer);
//! agreement with redis-protocol's decoders where both define the result.
//!
//! Runs as an integration test without libtest (`harness = false`): `cargo test --tests` runs
//! a short fuzz (`FUZZ_INPUTS`, default 5000); `scripts/fuzz.sh N` runs N inputs in an
//! optimised build. libtest's own arguments are accepted and ignored, and a filter that
//! does not match `fuzz` skips the run.

mod alloc;
mod config;
mod known;
mod reply;
mod request;
mod wire;

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use wire::R;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Peak bytes a target may allocate for one input: proportional to the input, plus a
/// constant for fixed-size tables and buffers.
fn allocation_bound(t: &Target, len: usize) -> usize {
    t.bytes_per_input_byte * len + (1 << 20)
}

/// A fuzz target: how to make an input, and how to check one.
pub struct Target {
    pub name: &'static str,
    /// Share of the inputs.
    weight: usize,
    /// The memory bound's factor: 64 for what clients and shards send; more for the
    /// configuration, whose TOML parser keeps about 100 bytes per level of nesting (4 input
    /// bytes): linear, and the file is the operator's, read once.
    bytes_per_input_byte: usize,
    generate: fn(&mut R) -> Vec<u8>,
    pub check: fn(&[u8], u64, &mut Ctx) -> Result<(), String>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "request",
        bytes_per_input_byte: 64,
        weight: 8,
        generate: request::generate,
        check: request::check,
    },
    Target {
        name: "reply",
        bytes_per_input_byte: 64,
        weight: 8,
        generate: reply::generate,
        check: reply::check,
    },
    Target {
        name: "gather",
        bytes_per_input_byte: 64,
        weight: 3,
        generate: reply::generate,
        check: reply::check_gather,
    },
    Target {
        name: "config",
        bytes_per_input_byte: 256,
        weight: 2,
        generate: config::generate_toml,
        check: config::check_toml,
    },
    Target {
        name: "cli",
        bytes_per_input_byte: 256,
        weight: 1,
        generate: config::generate_cli,
        check: config::check_cli,
    },
    Target {
        name: "rules",
        bytes_per_input_byte: 256,
        weight: 2,
        generate: config::generate_rules,
        check: config::check_rules,
    },
];

/// What a check may use besides its input: memory accounting for the code under test, and
/// counters for the summary.
#[derive(Default)]
pub struct Ctx {
    peak: usize,
    counts: BTreeMap<&'static str, u64>,
}

impl Ctx {
    /// Runs code under test, keeping the peak of what it allocates (the harness's own
    /// work, such as asking redis-protocol, stays outside).
    pub fn ours<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (v, peak) = alloc::peak_during(f);
        self.peak = self.peak.max(peak);
        v
    }

    pub fn count(&mut self, what: &'static str, n: u64) {
        *self.counts.entry(what).or_default() += n;
    }
}

/// Read boundaries: 1 to 6 random cuts, then the end.
pub fn cuts(r: &mut R, len: usize) -> Vec<usize> {
    let mut c: Vec<usize> = (0..1 + r.below(6)).map(|_| r.below(len + 1)).collect();
    c.push(len);
    c.sort_unstable();
    c
}

/// A list of numbers, shortened past 16.
pub fn short_list(v: &[usize]) -> String {
    if v.len() <= 16 {
        format!("{v:?}")
    } else {
        format!("{:?}… ({} in all)", &v[..16], v.len())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

/// Hex of at most 64 bytes (and the length), for messages.
pub fn hex_short(b: &[u8]) -> String {
    if b.len() <= 64 {
        hex(b)
    } else {
        format!("{}… ({} bytes)", hex(&b[..64]), b.len())
    }
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

thread_local! {
    /// Set while a check runs: its panics are reported as its failures.
    static IN_CHECK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The last panic's message and location (the hook keeps it; the report prints it).
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

pub fn panic_text(_payload: &Box<dyn Any + Send>) -> String {
    LAST_PANIC.lock().map(|s| s.clone()).unwrap_or_default()
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string panic payload)".to_string()
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let text = format!("panic: {msg}{at}");
        if !IN_CHECK.get() {
            // Not under a check: the harness itself failed.
            eprintln!("fuzz: harness {text}");
        }
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = text;
        }
    }));
}

/// Runs one check: its verdict, with panics and the memory bound turned into failures.
pub fn run_one(t: &Target, input: &[u8], check_seed: u64, cx: &mut Ctx) -> Result<(), String> {
    cx.peak = 0;
    alloc::set_current(t.name, input);
    IN_CHECK.set(true);
    let verdict = catch_unwind(AssertUnwindSafe(|| (t.check)(input, check_seed, cx)));
    IN_CHECK.set(false);
    alloc::clear_current();
    match verdict {
        Err(p) => Err(panic_text(&p)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) if cx.peak > allocation_bound(t, input.len()) => Err(format!(
            "allocated {} bytes at peak for an input of {} bytes (bound {})",
            cx.peak,
            input.len(),
            allocation_bound(t, input.len())
        )),
        Ok(Ok(())) => Ok(()),
    }
}

/// A failure, as written to its file and read back by `--replay`.
struct Failure {
    target: &'static str,
    check_seed: u64,
    input: Vec<u8>,
    message: String,
}

fn failure_dir() -> PathBuf {
    match std::env::var_os("FUZZ_OUT") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures"),
    }
}

fn write_failure(f: &Failure, seed: u64, index: u64) -> std::io::Result<PathBuf> {
    let dir = failure_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}-{seed:016x}-{index}.txt", f.target));
    let text = format!(
        "# slotgate fuzz failure; replay: scripts/fuzz.sh --replay {}\n\
         # {}\n\
         target: {}\ncheck-seed: {}\ninput: {}\n",
        path.display(),
        f.message.replace('\n', " "),
        f.target,
        f.check_seed,
        hex(&f.input)
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

fn read_failure(path: &str) -> Result<(&'static Target, u64, Vec<u8>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut target = None;
    let mut seed = 0;
    let mut input = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("target:") {
            let v = v.trim();
            target = Some(
                TARGETS
                    .iter()
                    .find(|t| t.name == v)
                    .ok_or_else(|| format!("unknown target '{v}'"))?,
            );
        } else if let Some(v) = line.strip_prefix("check-seed:") {
            seed = v.trim().parse().map_err(|e| format!("check-seed: {e}"))?;
        } else if let Some(v) = line.strip_prefix("input:") {
            input = Some(unhex(v)?);
        }
    }
    Ok((
        target.ok_or("no 'target:' line")?,
        seed,
        input.ok_or("no 'input:' line")?,
    ))
}

/// Inputs of a run by default: what `cargo test` (and CI) runs, about 10 s unoptimised.
const DEFAULT_INPUTS: u64 = 5_000;

/// Arguments: our own (`--inputs N`, `--seed S`, `--replay FILE`, `--targets a,b`,
/// `--only I`) and libtest's, which are ignored except for filters.
struct Options {
    inputs: u64,
    seed: u64,
    /// Only input `I` of the run (same seed and targets), saved to a file whatever happens.
    only: Option<u64>,
    /// `(k, j)`: this process takes the inputs whose index is `k` modulo `j` (scripts/fuzz.sh
    /// runs `j` processes with the same seed: together, the inputs of one run).
    shard: (u64, u64),
    replay: Option<String>,
    targets: Option<Vec<String>>,
    list: bool,
    skip: bool,
}

fn options() -> Result<Options, String> {
    let env_num = |k: &str| -> Result<Option<u64>, String> {
        match std::env::var(k) {
            Ok(v) => parse_num(&v).map(Some).map_err(|e| format!("{k}: {e}")),
            Err(_) => Ok(None),
        }
    };
    let mut o = Options {
        inputs: env_num("FUZZ_INPUTS")?.unwrap_or(DEFAULT_INPUTS),
        seed: match env_num("FUZZ_SEED")? {
            Some(s) => s,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        },
        only: env_num("FUZZ_ONLY")?,
        shard: match std::env::var("FUZZ_SHARD") {
            Ok(v) => {
                let (k, j) = v.split_once('/').ok_or("FUZZ_SHARD: expected K/J")?;
                let (k, j) = (parse_num(k)?, parse_num(j)?);
                if j == 0 || k >= j {
                    return Err(format!("FUZZ_SHARD={v}: expected K/J with K < J"));
                }
                (k, j)
            }
            Err(_) => (0, 1),
        },
        replay: std::env::var("FUZZ_REPLAY").ok(),
        targets: std::env::var("FUZZ_TARGETS")
            .ok()
            .map(|s| s.split(',').map(str::to_string).collect()),
        list: false,
        skip: false,
    };
    let mut filters = Vec::new();
    let mut exact = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let value = |args: &mut std::iter::Skip<std::env::Args>| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--inputs" => o.inputs = parse_num(&value(&mut args)?)?,
            "--seed" => o.seed = parse_num(&value(&mut args)?)?,
            "--replay" => o.replay = Some(value(&mut args)?),
            "--only" => o.only = Some(parse_num(&value(&mut args)?)?),
            "--targets" => {
                o.targets = Some(value(&mut args)?.split(',').map(str::to_string).collect())
            }
            "--list" => o.list = true,
            "--exact" => exact = true,
            "--ignored" => o.skip = true,
            // libtest options that take a value.
            "--test-threads" | "--logfile" | "--color" | "--format" | "-Z" | "--shuffle-seed" => {
                value(&mut args)?;
            }
            "--skip" => {
                let v = value(&mut args)?;
                if "fuzz".contains(v.as_str()) {
                    o.skip = true;
                }
            }
            f if f.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    if !filters.is_empty()
        && !filters.iter().any(|f| {
            if exact {
                f == "fuzz"
            } else {
                "fuzz".contains(f.as_str())
            }
        })
    {
        o.skip = true;
    }
    Ok(o)
}

/// A decimal or `0x` hexadecimal number; `1e6` style for counts.
fn parse_num(s: &str) -> Result<u64, String> {
    let s = s.trim().replace('_', "");
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|e| format!("'{s}': {e}"));
    }
    if let Some((m, e)) = s.split_once(['e', 'E']) {
        let m: u64 = m.parse().map_err(|e| format!("'{s}': {e}"))?;
        let e: u32 = e.parse().map_err(|e| format!("'{s}': {e}"))?;
        return Ok(m * 10u64.pow(e));
    }
    s.parse().map_err(|e| format!("'{s}': {e}"))
}

/// The seed of input `index` of target `t` in run `seed` (SplitMix64 of the three).
fn input_seed(seed: u64, t: usize, index: u64) -> u64 {
    let mut z = seed ^ ((t as u64) << 56) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn replay(path: &str) -> i32 {
    let (t, seed, input) = match read_failure(path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("fuzz: cannot replay {path}: {e}");
            return 2;
        }
    };
    println!(
        "fuzz: replaying {path}: target {}, {} bytes",
        t.name,
        input.len()
    );
    let mut cx = Ctx::default();
    match run_one(t, &input, seed, &mut cx) {
        Ok(()) => {
            println!("fuzz: passes now (peak {} bytes)", cx.peak);
            0
        }
        Err(e) => {
            println!("fuzz: FAIL: {e}");
            1
        }
    }
}

/// The input being checked (`u64::MAX`: none) and since when (ms into the run), for the
/// watchdog.
static RUNNING: AtomicU64 = AtomicU64::new(u64::MAX);
static RUNNING_SINCE_MS: AtomicU64 = AtomicU64::new(0);

/// Ends the run when one input takes longer than `FUZZ_STALL_SECS` (default 120): a hang is a
/// failure too, and the seed and index regenerate the input (`FUZZ_ONLY`).
fn watchdog(start: Instant, seed: u64) {
    let limit = std::env::var("FUZZ_STALL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120u64);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let index = RUNNING.load(Relaxed);
            let since = RUNNING_SINCE_MS.load(Relaxed);
            let now = start.elapsed().as_millis() as u64;
            if index != u64::MAX && now.saturating_sub(since) > limit * 1000 {
                println!(
                    "fuzz: FAIL: input {index} has run for more than {limit} s; save it with \
                     FUZZ_SEED={seed:#x} FUZZ_ONLY={index} (and the same FUZZ_TARGETS)"
                );
                std::process::exit(1);
            }
        }
    });
}

struct TargetStats {
    inputs: u64,
    bytes: u64,
    time: Duration,
    max_peak: usize,
    /// The slowest input: its time and index.
    slowest: (Duration, u64),
    failures: u64,
    known: u64,
    cx: Ctx,
}

fn main() {
    install_panic_hook();
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fuzz: {e}");
            std::process::exit(2);
        }
    };
    if o.list {
        println!("fuzz: test");
        return;
    }
    if o.skip {
        println!("fuzz: skipped (filtered out)");
        return;
    }
    if let Some(path) = &o.replay {
        std::process::exit(replay(path));
    }
    let code = fuzz(&o);
    config::remove_scratch();
    std::process::exit(code);
}

fn fuzz(o: &Options) -> i32 {
    let chosen: Vec<usize> = (0..TARGETS.len())
        .filter(|&i| {
            o.targets
                .as_ref()
                .is_none_or(|ts| ts.iter().any(|t| t == TARGETS[i].name))
        })
        .collect();
    if chosen.is_empty() {
        eprintln!(
            "fuzz: no such target; targets: {}",
            TARGETS
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return 2;
    }
    // Inputs go round the targets by weight.
    let schedule: Vec<usize> = chosen
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, TARGETS[i].weight))
        .collect();
    let profile = if cfg!(debug_assertions) {
        "with debug assertions"
    } else {
        "without debug assertions"
    };
    let part = match o.shard {
        (_, 1) => String::new(),
        (k, j) => format!(" (this process: those with index {k} modulo {j})"),
    };
    println!(
        "fuzz: seed {:#x} (FUZZ_SEED={:#x} repeats this run), {} inputs{part}, {profile}",
        o.seed, o.seed, o.inputs
    );
    let regressions = known::check_reproducers();
    let mut stats: Vec<TargetStats> = TARGETS
        .iter()
        .map(|_| TargetStats {
            inputs: 0,
            bytes: 0,
            time: Duration::ZERO,
            max_peak: 0,
            slowest: (Duration::ZERO, 0),
            failures: 0,
            known: 0,
            cx: Ctx::default(),
        })
        .collect();
    let start = Instant::now();
    watchdog(start, o.seed);
    let mut last_progress = Instant::now();
    let mut failures = regressions;
    let (k, j) = o.shard;
    let indices = match o.only {
        Some(i) => i..i + 1,
        None => 0..o.inputs,
    };
    for index in indices.filter(|i| o.only.is_some() || i % j == k) {
        let ti = schedule[(index % schedule.len() as u64) as usize];
        let t = &TARGETS[ti];
        let mut r = R::new(input_seed(o.seed, ti, index));
        let input = (t.generate)(&mut r);
        let check_seed = r.u64();
        let st = &mut stats[ti];
        let began = Instant::now();
        RUNNING.store(index, Relaxed);
        RUNNING_SINCE_MS.store(start.elapsed().as_millis() as u64, Relaxed);
        let verdict = run_one(t, &input, check_seed, &mut st.cx);
        RUNNING.store(u64::MAX, Relaxed);
        let took = began.elapsed();
        st.time += took;
        if took > st.slowest.0 {
            st.slowest = (took, index);
        }
        st.inputs += 1;
        st.bytes += input.len() as u64;
        st.max_peak = st.max_peak.max(st.cx.peak);
        if o.only.is_some() {
            let f = Failure {
                target: t.name,
                check_seed,
                input: input.clone(),
                message: format!("input {index}: {verdict:?}"),
            };
            match write_failure(&f, o.seed, index) {
                Ok(p) => println!("fuzz: input {index} ({}) saved to {}", t.name, p.display()),
                Err(e) => println!("fuzz: input {index} not saved: {e}"),
            }
        }
        if let Err(message) = verdict {
            if let Some(k) = known::matching(t.name, &message) {
                if st.known == 0 {
                    println!(
                        "fuzz: known bug '{k}' hit again (input {index}); counted, not failed"
                    );
                }
                st.known += 1;
                continue;
            }
            st.failures += 1;
            failures += 1;
            let f = Failure {
                target: t.name,
                check_seed,
                input,
                message,
            };
            let file = write_failure(&f, o.seed, index)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("(not written: {e})"));
            println!(
                "fuzz: FAIL target {} input {index} (seed {:#x}): {}\n  input ({} bytes): {}\n  \
                 saved to {file}",
                t.name,
                o.seed,
                f.message,
                f.input.len(),
                hex_short(&f.input)
            );
            if failures >= 20 {
                println!("fuzz: stopping after {failures} failures");
                break;
            }
        }
        if last_progress.elapsed() > Duration::from_secs(30) {
            last_progress = Instant::now();
            println!(
                "fuzz: input {} of {}, {:.0} s",
                index + 1,
                o.inputs,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = start.elapsed();
    let done: u64 = stats.iter().map(|s| s.inputs).sum();
    for (t, st) in TARGETS.iter().zip(&stats) {
        if st.inputs == 0 {
            continue;
        }
        println!(
            "  {:<8} {:>9} inputs {:>7.1} s  avg {:>6} B  peak alloc {:>8} B  \
             slowest {:.3} s (input {})  failures {}{}",
            t.name,
            st.inputs,
            st.time.as_secs_f64(),
            st.bytes / st.inputs,
            st.max_peak,
            st.slowest.0.as_secs_f64(),
            st.slowest.1,
            st.failures,
            if st.known > 0 {
                format!(" (+{} known)", st.known)
            } else {
                String::new()
            }
        );
        let counts: Vec<String> = st
            .cx
            .counts
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        println!("           {}", counts.join(", "));
    }
    println!(
        "fuzz: {done} inputs in {:.1} s ({:.0}/s), seed {:#x}, {failures} failure(s)",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64().max(1e-9),
        o.seed
    );
    if failures > 0 {
        println!(
            "fuzz: failing inputs are in {}; replay one with scripts/fuzz.sh --replay FILE",
            failure_dir().display()
        );
        1
    } else {
        0
    }
}
