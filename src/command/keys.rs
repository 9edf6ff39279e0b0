//! The key-spec interpreter: where a command's keys are, from its [`KeySpec`]s.
//!
//! Mirrors Redis 7's `getKeysUsingKeySpecs` (`src/db.c`) for the purpose of routing, with two
//! deliberate differences:
//! - a `numkeys` of 0 yields no keys for that spec instead of an invalid spec (Redis then falls
//!   back to the command's own `getkeys_proc`, which answers "no keys" for `EVAL s 0` …);
//! - specs flagged `INCOMPLETE` are used as they are (Redis falls back to the `getkeys_proc`,
//!   e.g. `MIGRATE … "" … KEYS k1 k2` also yields the empty key at index 3 here).
//!
//! No allocation except pushing into the caller's vector; never panics, whatever the input.

use super::{BeginSearch, CommandSpec, FindKeys, KeySpec};

/// Why the key positions of a command cannot be determined from its arguments. The caller then
/// forwards the command to any shard so that Redis answers its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysError {
    /// A `numkeys` argument is missing (beyond the last argument).
    MissingNumkeys,
    /// A `numkeys` argument is not a canonical integer (`abc`, `+1`, `007`, ` 1`).
    NumkeysNotInteger,
    /// A `numkeys` argument is negative.
    NegativeNumkeys,
    /// The keys a spec describes run outside the arguments (too-large `numkeys`, a keyword as
    /// the last argument, too few arguments for the arity …).
    OutOfRange,
    /// The spec itself is unusable (a non-positive key step); never true of Redis's own specs.
    BadSpec,
}

/// Appends to `out` the argument indices (0 = command name) of the keys of `spec`, for a
/// command with `argc` arguments whose i-th argument is `arg(i)`.
///
/// Indices are in spec order and may repeat (`MSET k v k v`): callers handle duplicates.
/// Returns `Err` when the arguments make the key positions undeterminable (bad/negative/
/// too-large numkeys …); `out` is then restored to its length on entry.
/// `arg` is only called with indices below `argc`.
pub fn key_indices<'a>(
    spec: &CommandSpec,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
    out: &mut Vec<usize>,
) -> Result<(), KeysError> {
    let start_len = out.len();
    let result = all_specs(spec.key_specs, argc, &arg, &mut |i, _| out.push(i));
    if result.is_err() {
        out.truncate(start_len);
    }
    result
}

/// Like [`key_indices`], with the permissions each key needs (bits of
/// [`access`](super::access)), for ACL checks.
pub fn key_access<'a>(
    spec: &CommandSpec,
    argc: usize,
    arg: impl Fn(usize) -> &'a [u8],
    out: &mut Vec<(usize, u8)>,
) -> Result<(), KeysError> {
    let start_len = out.len();
    let result = all_specs(spec.key_specs, argc, &arg, &mut |i, a| out.push((i, a)));
    if result.is_err() {
        out.truncate(start_len);
    }
    result
}

fn all_specs<'a>(
    specs: &[KeySpec],
    argc: usize,
    arg: &impl Fn(usize) -> &'a [u8],
    out: &mut impl FnMut(usize, u8),
) -> Result<(), KeysError> {
    // Bounding argc keeps every computation below comfortably inside i64.
    let Ok(argc) = i32::try_from(argc) else {
        return Err(KeysError::OutOfRange);
    };
    let argc = i64::from(argc);
    for ks in specs {
        let Some(first) = begin(&ks.begin, argc, arg)? else {
            continue;
        };
        let (first, last, step) = match ks.find {
            FindKeys::Range {
                lastkey,
                keystep,
                limit,
            } => {
                let (lastkey, limit) = (i64::from(lastkey), i64::from(limit));
                let last = if lastkey >= 0 {
                    first + lastkey
                } else if limit == 0 {
                    argc + lastkey
                } else {
                    // Redis only uses limit with lastkey -1: "1/limit of the remaining args".
                    first + ((argc - first) / limit + lastkey)
                };
                (first, last, i64::from(keystep))
            }
            FindKeys::Keynum {
                keynumidx,
                firstkey,
                keystep,
            } => {
                let idx = first + i64::from(keynumidx);
                if idx < 0 || idx >= argc {
                    return Err(KeysError::MissingNumkeys);
                }
                // idx is in 0..argc, so the conversion is lossless.
                let numkeys = parse_numkeys(arg(idx as usize))?;
                if numkeys > argc {
                    return Err(KeysError::OutOfRange);
                }
                if numkeys == 0 {
                    continue;
                }
                let first = first + i64::from(firstkey);
                (first, first + numkeys - 1, i64::from(keystep))
            }
            FindKeys::Unknown => continue,
        };
        if step <= 0 {
            return Err(KeysError::BadSpec);
        }
        if first < 0 || first >= argc || last >= argc || last < first {
            return Err(KeysError::OutOfRange);
        }
        let mut i = first;
        while i <= last {
            // 0 <= first <= i <= last < argc <= i32::MAX.
            out(i as usize, ks.access);
            i += step;
        }
    }
    Ok(())
}

/// The index of the first key of a spec, `None` when the spec does not apply (keyword absent,
/// unknown begin search).
fn begin<'a>(
    bs: &BeginSearch,
    argc: i64,
    arg: &impl Fn(usize) -> &'a [u8],
) -> Result<Option<i64>, KeysError> {
    match *bs {
        BeginSearch::Index(pos) => Ok(Some(i64::from(pos))),
        BeginSearch::Keyword { keyword, startfrom } => {
            let keyword = keyword.as_bytes();
            let startfrom = i64::from(startfrom);
            // As Redis: forward from `startfrom` up to (not including) the last argument, or
            // backward from `argc + startfrom` down to argument 1.
            let (start, end) = if startfrom > 0 {
                (startfrom, argc - 1)
            } else {
                (argc + startfrom, 0)
            };
            let forward = start <= end;
            let mut i = start;
            while i != end {
                if i >= argc || i < 1 {
                    break;
                }
                // 1 <= i < argc.
                if arg(i as usize).eq_ignore_ascii_case(keyword) {
                    return Ok(Some(i + 1));
                }
                i += if forward { 1 } else { -1 };
            }
            Ok(None)
        }
        BeginSearch::Unknown => Ok(None),
    }
}

/// Redis's `string2ll`: an optional `-`, then `0` alone or digits not starting with `0`; no
/// spaces, no `+`, no overflow.
fn parse_numkeys(s: &[u8]) -> Result<i64, KeysError> {
    let (negative, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    let canonical = match digits {
        [] => false,
        [b'0'] => !negative,
        [b'0', ..] => false,
        _ => digits.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return Err(KeysError::NumkeysNotInteger);
    }
    if negative {
        return Err(KeysError::NegativeNumkeys);
    }
    let mut n: i64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or(KeysError::NumkeysNotInteger)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Route, lookup, lookup_sub};

    /// The key names of `cmd` (looking up the subcommand row of containers).
    fn keys(cmd: &[&str]) -> Result<Vec<String>, KeysError> {
        let mut spec = lookup(cmd[0].as_bytes()).expect("known command");
        if spec.is_container() {
            spec = lookup_sub(spec, cmd[1].as_bytes()).expect("known subcommand");
        }
        let mut out = Vec::new();
        key_indices(spec, cmd.len(), |i| cmd[i].as_bytes(), &mut out)?;
        Ok(out.iter().map(|&i| cmd[i].to_string()).collect())
    }

    fn ok(cmd: &[&str], expected: &[&str]) {
        let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(keys(cmd), Ok(expected), "{cmd:?}");
    }

    #[test]
    fn get_and_set() {
        ok(&["GET", "k"], &["k"]);
        ok(&["set", "k", "v", "EX", "10"], &["k"]);
    }

    #[test]
    fn mset_steps_by_two() {
        ok(&["MSET", "a", "1", "b", "2", "c", "3"], &["a", "b", "c"]);
        ok(&["MSET", "a", "1", "a", "2"], &["a", "a"]);
        ok(&["MGET", "a", "b", "c"], &["a", "b", "c"]);
    }

    #[test]
    fn zunionstore_index_plus_keynum() {
        ok(
            &["ZUNIONSTORE", "dst", "2", "a", "b", "WEIGHTS", "1", "2"],
            &["dst", "a", "b"],
        );
        ok(
            &["zinter", "3", "a", "b", "c", "WITHSCORES"],
            &["a", "b", "c"],
        );
    }

    #[test]
    fn eval_with_zero_and_some_keys() {
        ok(&["EVAL", "return 1", "0"], &[]);
        ok(&["EVAL", "return 1", "0", "arg1", "arg2"], &[]);
        ok(&["EVALSHA", "abc", "2", "k1", "k2", "arg"], &["k1", "k2"]);
        ok(&["FCALL", "f", "1", "k1", "arg"], &["k1"]);
    }

    #[test]
    fn xread_streams_keyword_and_range_with_limit() {
        ok(&["XREAD", "STREAMS", "s1", "s2", "0", "0"], &["s1", "s2"]);
        ok(
            &["xread", "COUNT", "2", "BLOCK", "0", "streams", "s1", "$"],
            &["s1"],
        );
        ok(
            &[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "STREAMS",
                "a",
                "b",
                ">",
                ">",
            ],
            &["a", "b"],
        );
        // Keyword as the last argument is never matched (nothing follows it).
        ok(&["XREAD", "COUNT", "STREAMS"], &[]);
        // An odd tail: half of 1 is 0 keys, last < first.
        assert_eq!(
            keys(&["XREAD", "STREAMS", "s1"]),
            Err(KeysError::OutOfRange)
        );
    }

    #[test]
    fn sort_store() {
        ok(&["SORT", "k"], &["k"]);
        ok(
            &[
                "SORT", "k", "BY", "w_*", "GET", "#", "LIMIT", "0", "5", "store", "dst",
            ],
            &["k", "dst"],
        );
        ok(&["SORT", "k", "STORE", "dst", "ALPHA"], &["k", "dst"]);
        // A key named like the keyword is not mistaken for it.
        ok(&["SORT", "store", "LIMIT", "0", "1"], &["store"]);
        ok(&["SORT_RO", "k", "ALPHA"], &["k"]);
    }

    #[test]
    fn georadius_store_and_storedist() {
        ok(&["GEORADIUS", "g", "1", "2", "3", "km"], &["g"]);
        ok(
            &["GEORADIUS", "g", "1", "2", "3", "km", "STORE", "dst"],
            &["g", "dst"],
        );
        ok(
            &["GEORADIUS", "g", "1", "2", "3", "km", "STOREDIST", "dst"],
            &["g", "dst"],
        );
        ok(
            &["GEORADIUSBYMEMBER", "g", "m", "3", "km", "STORE", "dst"],
            &["g", "dst"],
        );
    }

    #[test]
    fn migrate_keys_keyword_searched_backwards() {
        ok(&["MIGRATE", "h", "6379", "k", "0", "5000"], &["k"]);
        ok(
            &[
                "MIGRATE", "h", "6379", "", "0", "5000", "REPLACE", "KEYS", "a", "b", "c",
            ],
            &["", "a", "b", "c"],
        );
        ok(
            &["MIGRATE", "h", "6379", "", "0", "5000", "KEYS", "a"],
            &["", "a"],
        );
    }

    #[test]
    fn lmpop_and_friends() {
        ok(&["LMPOP", "2", "a", "b", "LEFT"], &["a", "b"]);
        ok(&["LMPOP", "1", "a", "RIGHT", "COUNT", "3"], &["a"]);
        ok(&["BLMPOP", "0", "2", "a", "b", "LEFT"], &["a", "b"]);
        ok(&["ZMPOP", "1", "z", "MIN"], &["z"]);
        ok(&["SINTERCARD", "2", "a", "b", "LIMIT", "1"], &["a", "b"]);
    }

    #[test]
    fn subcommands() {
        ok(&["OBJECT", "ENCODING", "k"], &["k"]);
        ok(&["MEMORY", "USAGE", "k", "SAMPLES", "5"], &["k"]);
        ok(&["XGROUP", "CREATE", "s", "g", "$"], &["s"]);
        ok(&["CONFIG", "GET", "maxmemory"], &[]);
    }

    #[test]
    fn bad_numkeys() {
        for bad in [
            "abc",
            "",
            "+1",
            "01",
            " 1",
            "1 ",
            "-0",
            "1.5",
            "99999999999999999999",
        ] {
            assert_eq!(
                keys(&["ZUNIONSTORE", "d", bad, "a"]),
                Err(KeysError::NumkeysNotInteger),
                "{bad:?}"
            );
        }
        assert_eq!(
            keys(&["EVAL", "s", "-1", "a"]),
            Err(KeysError::NegativeNumkeys)
        );
        assert_eq!(
            keys(&["LMPOP", "4", "a", "b", "LEFT"]),
            Err(KeysError::OutOfRange)
        );
        assert_eq!(
            keys(&["EVAL", "s", "1000000", "a"]),
            Err(KeysError::OutOfRange)
        );
        assert_eq!(
            keys(&["EVAL", "s", "9223372036854775807", "a"]),
            Err(KeysError::OutOfRange)
        );
    }

    #[test]
    fn error_restores_out() {
        let spec = lookup(b"zunionstore").unwrap();
        let args: [&[u8]; 4] = [b"zunionstore", b"d", b"5", b"a"];
        let mut out = vec![42];
        let r = key_indices(spec, args.len(), |i| args[i], &mut out);
        assert_eq!(r, Err(KeysError::OutOfRange));
        assert_eq!(out, [42]);
    }

    #[test]
    fn short_argc_never_panics() {
        // Every row, with every argc from 0 to 8 and arguments that look like numbers,
        // keywords or garbage; `arg` panics when asked for an index >= argc.
        let pool: [&[u8]; 8] = [b"x", b"1", b"2", b"STREAMS", b"KEYS", b"STORE", b"-1", b""];
        for c in crate::command::COMMANDS {
            for spec in std::iter::once(c).chain(c.subcommands) {
                for argc in 0..=8 {
                    for rot in 0..pool.len() {
                        let arg = |i: usize| {
                            assert!(i < argc, "{}: arg({i}) with argc {argc}", spec.name);
                            pool[(i + rot) % pool.len()]
                        };
                        let mut out = Vec::new();
                        let _ = key_indices(spec, argc, arg, &mut out);
                        assert!(out.iter().all(|&i| i < argc));
                    }
                }
            }
        }
        let get = lookup(b"get").unwrap();
        let mut out = Vec::new();
        let only_name = |_| b"get".as_slice();
        assert_eq!(
            key_indices(get, 1, only_name, &mut out),
            Err(KeysError::OutOfRange)
        );
        assert_eq!(
            key_indices(get, 0, only_name, &mut out),
            Err(KeysError::OutOfRange)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn crafted_specs_never_panic() {
        let extremes = [i32::MIN, -3, -1, 0, 1, 2, i32::MAX];
        let pool: [&[u8]; 4] = [b"k", b"2", b"KW", b"-5"];
        let mut specs = Vec::new();
        for &a in &extremes {
            for &b in &extremes {
                for &c in &extremes {
                    for begin in [
                        BeginSearch::Index(a),
                        BeginSearch::Keyword {
                            keyword: "kw",
                            startfrom: a,
                        },
                    ] {
                        specs.push(KeySpec {
                            access: 0,
                            begin,
                            find: FindKeys::Range {
                                lastkey: b,
                                keystep: c,
                                limit: a,
                            },
                        });
                        specs.push(KeySpec {
                            access: 0,
                            begin,
                            find: FindKeys::Keynum {
                                keynumidx: b,
                                firstkey: c,
                                keystep: a,
                            },
                        });
                    }
                }
            }
        }
        let specs: &'static [KeySpec] = specs.leak();
        for ks in specs.chunks(1) {
            let row = CommandSpec {
                name: "crafted",
                arity: -1,
                flags: 0,
                acl: 0,
                key_specs: ks,
                route: Route::Single,
                subcommands: &[],
            };
            for argc in [0, 1, 2, 3, 5, 8, 1000, usize::MAX] {
                let mut out = Vec::new();
                let arg = |i: usize| {
                    assert!(i < argc);
                    pool[i % pool.len()]
                };
                let _ = key_indices(&row, argc, arg, &mut out);
                assert!(out.iter().all(|&i| i < argc));
            }
        }
    }
}
