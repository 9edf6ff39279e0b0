//! The module graph is layered (issue 11): a module of `src/` may use modules of its own layer
//! or of a lower one, never of a higher one. This test reads every `crate::…` path in `src/`
//! (doc links included) and fails on an import that goes up, naming it. Modules of one layer
//! may use each other. Unit-test files (`*_tests.rs`) are exempt.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first.
const LAYERS: &[&[&str]] = &[
    // Wire and utilities.
    &[
        "resp", "netio", "uring", "notify", "metrics", "router", "units", "tls", "slowlog",
        "hotkeys",
    ],
    // Data: the command table, users' permissions and token issuers.
    &["command", "auth", "token"],
    // Merging shard replies.
    &["fanout"],
    // A client's replies in order, and where a shard's reply goes.
    &["queue"],
    // Upstream connections and pools.
    &["shard"],
    // Proxy logic above the shards, the settings and a worker's state.
    &[
        "readthrough",
        "settings",
        "worker",
        "gate",
        "cluster",
        "cluster_api",
        "tracking",
    ],
    // The client connection (`session/`: the loop, local answers, transactions and blocking
    // commands, pub/sub).
    &["session"],
    // Process: listeners, workers, admin endpoint, configuration.
    &["server", "admin", "config", "reload"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer of tests/layers.rs"))
}

/// The top-level module a file of `src/` belongs to (`readthrough/origin.rs` → `readthrough`).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Every module named by a `crate::` path in `text`, including `crate::{a, b::c}` groups.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut up = BTreeSet::new();
    for f in &files {
        let Some(from) = module_of(f.strip_prefix(&src).unwrap()) else {
            continue;
        };
        if f.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("_tests.rs"))
        {
            // A unit-test file (`#[cfg(test)]`) may build its module's surroundings from the
            // top, e.g. a worker from command-line flags.
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for to in uses(&text) {
            if to != from && layer_of(&to) > layer_of(&from) {
                up.insert((from.clone(), to, f.display().to_string()));
            }
        }
    }
    assert!(
        up.is_empty(),
        "modules importing a higher layer (see LAYERS in tests/layers.rs): {up:#?}"
    );
}

#[test]
fn the_use_parser_sees_groups_and_paths() {
    let u = uses(
        "use crate::{queue::Target, shard::{Pools, Upstream}};\nlet x = crate::resp::reply::OK;",
    );
    assert_eq!(
        u.into_iter().collect::<Vec<_>>(),
        ["queue", "resp", "shard"]
    );
}

/// The lengths of the functions in `text` whose body closes at their own indentation:
/// (name, lines).
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let indent = &l[..l.len() - l.trim_start().len()];
        let mut rest = l.trim_start();
        for prefix in ["pub(crate) ", "pub(super) ", "pub ", "async ", "const "] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        if l.trim_end().ends_with(';') {
            continue;
        }
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|x| *x == close) {
            out.push((name, end + 2));
        }
    }
    out
}

/// Issue 11: no function in `src/` is over 120 lines (the generated command table aside).
#[test]
fn no_function_is_over_120_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for f in files {
        if f.ends_with("command/table.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (name, n) in function_lengths(&text) {
            if n > 120 {
                long.push(format!("{}: {name} ({n} lines)", f.display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over 120 lines: {long:#?}");
    // The counter itself sees a long function.
    let body = "\n".repeat(130);
    let sample = format!("    pub(crate) async fn big() {{{body}    }}\n");
    assert_eq!(function_lengths(&sample), [("big".to_string(), 131)]);
}

/// Issue 11: tests wait for conditions, not times. At most 10 `sleep(` calls remain in
/// `tests/*.rs` (the poll helpers in `tests/support/` aside), each one a sleep the behaviour
/// itself needs and saying why on a `Needed:` comment just above it.
#[test]
fn tests_sleep_only_where_the_behaviour_needs_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut sleeps = Vec::new();
    let mut unexplained = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            // (This file names the call in strings and comments only.)
            if !line.contains("sleep(") || line.trim_start().starts_with("//") || line.contains('"')
            {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            if !lines[i.saturating_sub(3)..i]
                .iter()
                .any(|l| l.contains("// Needed:"))
            {
                unexplained.push(at.clone());
            }
            sleeps.push(at);
        }
    }
    assert!(sleeps.len() <= 10, "{} sleeps: {sleeps:#?}", sleeps.len());
    assert!(
        unexplained.is_empty(),
        "sleeps without a `Needed:` comment: {unexplained:#?}"
    );
}

/// Issue 17: `unsafe` code lives in `src/uring.rs` only (the io_uring data path), which
/// allows it for itself; the crate denies it everywhere else, and no other file of `src/`
/// allows it or uses it.
#[test]
fn unsafe_code_is_confined_to_the_ring() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    assert!(
        lib.contains("#![deny(unsafe_code)]"),
        "lib.rs denies unsafe code"
    );
    for main in ["main.rs", "bin/slotgate-demo-origin.rs"] {
        let text = std::fs::read_to_string(src.join(main)).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{main} forbids unsafe code"
        );
    }
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files {
        if f.ends_with("uring.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let uses = ["unsafe {", "unsafe fn", "unsafe impl", "unsafe extern"]
                .iter()
                .any(|u| code.contains(u));
            if uses || line.contains("allow(unsafe_code)") {
                found.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(found.is_empty(), "unsafe outside src/uring.rs: {found:#?}");
    let ring = std::fs::read_to_string(src.join("uring.rs")).unwrap();
    let blocks = ring.matches("unsafe {").count() + ring.matches("unsafe fn").count();
    let reasons = ring.matches("// SAFETY:").count() + ring.matches("/// # Safety").count();
    assert!(
        blocks > 0 && reasons >= blocks,
        "{blocks} unsafe items, {reasons} reasons"
    );
}
