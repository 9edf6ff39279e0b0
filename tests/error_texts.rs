//! The README's table of slotgate's own errors is tested against the file that spells them
//! (`src/resp/reply.rs`, and the request parser's protocol errors): every error the table
//! shows starts the way a text in those files does, up to its first placeholder or quoted
//! name. A text changed in one place and not the other fails here.

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The backticked error replies (`-…`) in the README's "Errors slotgate itself returns".
fn table_errors(readme: &str) -> Vec<String> {
    let start = readme
        .find("## Errors slotgate itself returns")
        .expect("the README has the error table");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut out = Vec::new();
    for line in section[..end].lines().filter(|l| l.starts_with("| `-")) {
        let first_cell = line.split(" | ").next().unwrap_or("");
        for (i, piece) in first_cell.split('`').enumerate() {
            if i % 2 == 1 && piece.starts_with('-') {
                out.push(piece.to_string());
            }
        }
    }
    out
}

/// The fixed start of an error text: up to its first placeholder, quoted name or ellipsis.
fn fixed_prefix(e: &str) -> &str {
    let e = e.trim_start_matches('-');
    let cut = e.find(['<', '\'', '…', '(']).unwrap_or(e.len());
    e[..cut].trim_end()
}

#[test]
fn every_error_in_the_readme_table_is_spelled_in_reply_rs() {
    let readme = read("README.md");
    let sources = read("src/resp/reply.rs");
    let errors = table_errors(&readme);
    assert!(
        errors.len() >= 30,
        "the table lists {} errors",
        errors.len()
    );
    let missing: Vec<&String> = errors
        .iter()
        .filter(|e| {
            let p = fixed_prefix(e);
            // Protocol errors are composed: `ERR Protocol error: ` and the detail.
            let parts: Vec<&str> = match p.strip_prefix("ERR Protocol error: ") {
                Some(detail) => vec!["ERR Protocol error: ", detail],
                None => vec![p],
            };
            p.len() >= 8 && !parts.iter().all(|x| sources.contains(x))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README errors not spelled in src/resp/reply.rs: {missing:#?}"
    );
}

/// The errors of slotgate's own failures (the `Failure` enum) are all in the table.
#[test]
fn every_failure_reply_is_in_the_readme_table() {
    let readme = read("README.md");
    let table = table_errors(&readme).join("\n");
    for text in [
        "-ERR shard unavailable: ",
        "-ERR outcome unknown: ",
        "-NOPERM slotgate could not run this with the rights of user ",
        "-ERR too many dedicated connections ",
        "-ERR origin failed for rule ",
    ] {
        assert!(
            table.contains(text),
            "{text} is missing from the README's error table"
        );
    }
}

/// The README's CONFIG SET allowlist is the code's, item for item (issue 13.2).
#[test]
fn the_readme_config_set_allowlist_is_the_codes() {
    let readme = read("README.md");
    let row = readme
        .lines()
        .find(|l| l.starts_with("| CONFIG SET, CONFIG RESETSTAT |"))
        .expect("the README's CONFIG SET row");
    let list = row
        .split_once("tested against the code):")
        .and_then(|(_, rest)| rest.split_once(". Any other parameter"))
        .expect("the allowlist in the row")
        .0;
    let mut documented: Vec<&str> = list
        .split(", ")
        .map(|s| s.trim().trim_matches('`'))
        .collect();
    let mut code: Vec<&str> = slotgate::command::policy::CONFIG_SET_ALLOWED.to_vec();
    documented.sort_unstable();
    code.sort_unstable();
    assert_eq!(documented, code);
}
