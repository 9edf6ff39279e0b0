//! Inputs that once broke something in `src/`.
//!
//! - [`REGRESSIONS`]: fixed bugs the fuzzer found; their inputs must pass on every run.
//! - [`KNOWN`]: bugs found and not fixed yet, each with its minimal reproducer, replayed (and
//!   reported as skipped) on every run, and a signature so that the fuzz loop counts further
//!   inputs hitting the same bug instead of failing on them. Once a fix lands the reproducer
//!   passes, and the run says to move the entry to `REGRESSIONS`.

use crate::{Ctx, TARGETS, run_one};

pub struct Known {
    /// A short name for the summary.
    pub name: &'static str,
    pub target: &'static str,
    /// The minimal input.
    pub input: &'static [u8],
    /// Every one of these is in the failure message of an input that hits this bug.
    pub signature: &'static [&'static str],
    /// What happens, and where.
    pub note: &'static str,
}

/// Fixed: their inputs must pass.
pub const REGRESSIONS: &[Known] = &[
    Known {
        name: "CONFIG GET merge of a nil name",
        target: "gather",
        // A CONFIG GET reply whose first element is a nil bulk string.
        input: b"*1\r\n$-1\r\n",
        signature: &[
            "gather 'config get'",
            "src/fanout.rs",
            "slice index starts at",
        ],
        note: "fanout::bulk_text sliced `$-1\\r\\n` as f[5..3]: a shard answering CONFIG GET \
               with a nil parameter name panicked the worker (fixed in e742edd)",
    },
    Known {
        name: "read-through template with the key in the host",
        target: "rules",
        input: b"k=http://{key}",
        signature: &["renders", "for key"],
        note: "UrlTemplate::parse (src/readthrough/origin.rs) checked only that the template \
               rendered a valid URL for the key `k`, so `http://{key}` passed --check-config: \
               a client's key chose the host slotgate fetched from. Placeholders are now \
               refused in the host and port",
    },
];

/// Open bugs.
pub const KNOWN: &[Known] = &[];

/// The known bug a failure is an instance of, if any.
pub fn matching(target: &str, message: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|k| k.target == target && k.signature.iter().all(|s| message.contains(s)))
        .map(|k| k.name)
}

fn replay(k: &Known) -> Result<(), String> {
    let t = TARGETS
        .iter()
        .find(|t| t.name == k.target)
        .ok_or_else(|| format!("no target '{}'", k.target))?;
    run_one(t, k.input, 0, &mut Ctx::default())
}

/// Replays the regressions (failures count) and the open bugs ("skipped" while they still
/// fail, a reminder once they pass). Returns the number of regressions that fail again.
pub fn check_reproducers() -> u64 {
    let mut failed = 0;
    for k in REGRESSIONS {
        if let Err(e) = replay(k) {
            failed += 1;
            println!(
                "fuzz: FAIL: regression '{}' ({}) is back: {e}\n  {}",
                k.name, k.target, k.note
            );
        }
    }
    for k in KNOWN {
        match replay(k) {
            Err(e) => println!(
                "fuzz: skipped: known bug '{}' still reproduces ({}): {e}\n  {}",
                k.name, k.target, k.note
            ),
            Ok(()) => println!(
                "fuzz: known bug '{}' no longer reproduces: move it to REGRESSIONS in \
                 tests/fuzz/known.rs",
                k.name
            ),
        }
    }
    failed
}
