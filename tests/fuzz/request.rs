//! The request parser (`RequestParser`, on every client connection), and what the session
//! does next with a parsed command's arguments: command lookup, arity, key positions, slots,
//! the per-command argument rules and the error replies that echo arguments.

use std::sync::{Arc, OnceLock};

use redis_protocol::resp2::types::OwnedFrame;
use slotgate::auth::{User, UserConfig, Users};
use slotgate::command::{self, flags, keys, policy};
use slotgate::resp::{Limits, Parsed, ProtoError, ReplyScanner, Request, RequestParser, reply};
use slotgate::router;

use crate::reply::{lone_cr, non_canonical_number};
use crate::wire::{self, R};
use crate::{Ctx, cuts, hex_short, short_list};

pub fn generate(r: &mut R) -> Vec<u8> {
    wire::traffic(r, wire::commands)
}

/// What a connection's input parsed to: each command's arguments and where in the input it
/// ends, then how the input ended.
#[derive(Debug, PartialEq, Eq)]
struct Parse {
    commands: Vec<(Vec<Vec<u8>>, usize)>,
    /// `Ok(n)`: waiting for more bytes, `n` kept; `Err`: the protocol error.
    end: Result<usize, ProtoError>,
}

impl Parse {
    /// Where two parses part (for messages: the whole parses can be long).
    fn difference(&self, other: &Parse) -> String {
        let same = self
            .commands
            .iter()
            .zip(&other.commands)
            .take_while(|(a, b)| a == b)
            .count();
        let show = |p: &Parse| match p.commands.get(same) {
            Some((args, end)) => format!(
                "command {same}: {} args ending at {end}, name {}",
                args.len(),
                hex_short(&args[0])
            ),
            None => format!("{} commands, then {:?}", p.commands.len(), p.end),
        };
        format!("{} / {}", show(self), show(other))
    }
}

/// Called with each command and the input bytes it used (with any ignored input before it).
type OnCommand<'a> = &'a mut dyn FnMut(&Request<'_>, &[u8]) -> Result<(), String>;

/// Parses `input` as a session does, the bytes arriving in chunks ending at each of `ends`:
/// parse what the buffer holds, drop what each answer says is used, keep the rest.
fn parse_stream(
    input: &[u8],
    ends: &[usize],
    limits: &Limits,
    authed: bool,
    on_command: OnCommand<'_>,
) -> Result<Parse, String> {
    let mut p = RequestParser::new();
    // The buffer holds input[start..fed]: what has arrived and is not used yet.
    let mut start = 0;
    let mut out = Parse {
        commands: Vec::new(),
        end: Ok(0),
    };
    for &fed in ends {
        loop {
            let buf = &input[start..fed];
            match p.parse(buf, limits, authed) {
                Ok(Parsed::Command { req, used }) => {
                    if used == 0 || used > buf.len() || req.argc() == 0 {
                        return Err(format!(
                            "a command of {} arguments that used {used} bytes of {}",
                            req.argc(),
                            buf.len()
                        ));
                    }
                    let args = (0..req.argc()).map(|i| req.arg(i).to_vec()).collect();
                    on_command(&req, &buf[..used])?;
                    start += used;
                    out.commands.push((args, start));
                }
                Ok(Parsed::Incomplete { used }) => {
                    if used > buf.len() {
                        return Err(format!("used {used} of a buffer of {}", buf.len()));
                    }
                    start += used;
                    break;
                }
                Err(e) => {
                    out.end = Err(e);
                    return Ok(out);
                }
            }
        }
    }
    out.end = Ok(input.len() - start);
    Ok(out)
}

/// A command the session can use: arguments inside its bytes, bytes that a shard reads as
/// the same command (they are forwarded as they are), and frames for each argument
/// (scatter/gather rebuilds commands from them).
fn command_ok(req: &Request<'_>) -> Result<(), String> {
    for &(s, e) in req.args {
        if s > e || e as usize > req.raw.len() {
            return Err(format!(
                "argument range {s}..{e} in a command of {} bytes",
                req.raw.len()
            ));
        }
    }
    let mut again = RequestParser::new();
    match again.parse(req.raw, &Limits::default(), true) {
        Ok(Parsed::Command { req: r2, used }) if used == req.raw.len() => {
            if (0..req.argc())
                .map(|i| req.arg(i))
                .ne((0..r2.argc()).map(|i| r2.arg(i)))
            {
                return Err(format!(
                    "the forwarded bytes parse to other arguments: {}",
                    hex_short(req.raw)
                ));
            }
        }
        other => {
            return Err(format!(
                "the forwarded bytes {} do not parse as one command: {other:?}",
                hex_short(req.raw)
            ));
        }
    }
    for i in 0..req.argc() {
        let (f, a) = (req.arg_frame(i), req.arg(i));
        let framed = f.first() == Some(&b'$')
            && f.len() >= a.len() + 2
            && &f[f.len() - 2 - a.len()..f.len() - 2] == a;
        if !framed {
            return Err(format!("arg_frame({i}) is {}", hex_short(f)));
        }
    }
    Ok(())
}

/// An inline command (re-encoded, so not a view of the input) has the words of its line, as
/// `split_args` splits it; a line without quotes or backslashes splits at spaces, tabs and
/// line ends (leading vertical tabs and form feeds are skipped too), as `sdssplitargs` does.
fn inline_ok(req: &Request<'_>, used: &[u8]) -> Result<(), String> {
    let line = used.strip_suffix(b"\n").unwrap_or(used);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = match line.iter().rposition(|&c| c == b'\n') {
        Some(i) => &line[i + 1..],
        None => line,
    };
    if line.first() == Some(&b'*') {
        // A skipped `*0`/`*-1` ended by CR and any byte, then the command on the same line.
        return Ok(());
    }
    let args: Vec<&[u8]> = (0..req.argc()).map(|i| req.arg(i)).collect();
    let split = slotgate::resp::request::split_args(line);
    if split
        .as_ref()
        .is_none_or(|w| w.iter().map(Vec::as_slice).ne(args.iter().copied()))
    {
        return Err(format!(
            "inline line {} parsed to {} arguments, split_args gives {:?}",
            hex_short(line),
            args.len(),
            split.map(|w| w.len())
        ));
    }
    if !line.iter().any(|c| b"\"'\\".contains(c)) {
        let mut words: Vec<&[u8]> = Vec::new();
        let mut rest = line;
        loop {
            let skip = rest
                .iter()
                .position(|&c| !b" \t\n\r\x0b\x0c".contains(&c))
                .unwrap_or(rest.len());
            rest = &rest[skip..];
            if rest.is_empty() {
                break;
            }
            let end = rest
                .iter()
                .position(|&c| b" \t\n\r".contains(&c))
                .unwrap_or(rest.len());
            words.push(&rest[..end]);
            rest = &rest[(end + 1).min(rest.len())..];
        }
        if words != args {
            return Err(format!(
                "inline line {} parsed to {} arguments, not its {} words",
                hex_short(line),
                args.len(),
                words.len()
            ));
        }
    }
    Ok(())
}

pub fn check(input: &[u8], seed: u64, cx: &mut Ctx) -> Result<(), String> {
    let mut r = R::new(seed);
    let strict = Limits {
        max_bulk_len: 1 << 20,
        unauth_max_args: 3,
        unauth_max_bulk: 100,
    };
    let user = restricted_user();
    let mut keys = Vec::new();
    let mut access = Vec::new();
    let mut after = |req: &Request<'_>, used: &[u8]| {
        command_ok(req)?;
        if !input.as_ptr_range().contains(&req.raw.as_ptr()) {
            inline_ok(req, used)?;
        }
        dispatch(req, &user, &mut keys, &mut access)
    };
    let mut nothing = |_: &Request<'_>, _: &[u8]| Ok(());
    let mut first = None;
    for (i, (limits, authed)) in [
        (Limits::default(), true),
        (Limits::default(), false),
        (strict, true),
    ]
    .iter()
    .enumerate()
    {
        let on: OnCommand<'_> = if i == 0 { &mut after } else { &mut nothing };
        let whole = cx.ours(|| parse_stream(input, &[input.len()], limits, *authed, on))?;
        let mut splits = vec![cuts(&mut r, input.len())];
        if i == 0 && input.len() <= 200 {
            splits.push((1..=input.len()).collect());
        }
        for ends in &splits {
            let split = cx.ours(|| parse_stream(input, ends, limits, *authed, &mut nothing))?;
            if split != whole && !line_limit_explains(&whole, &split) {
                return Err(format!(
                    "parsing depends on read boundaries (authed {authed}, reads ending at \
                     {}): whole / split: {}",
                    short_list(ends),
                    whole.difference(&split)
                ));
            }
        }
        if i == 0 {
            cx.count("commands", whole.commands.len() as u64);
            if whole.end.is_err() {
                cx.count("protocol errors", 1);
            }
            first = Some(whole);
        }
    }
    match first {
        Some(p) => compare_with_redis_protocol(input, &p, cx),
        None => Ok(()),
    }
}

/// A line (inline command, count or length) with no end among the first 64 KiB that have
/// arrived is an error, as in Redis (`PROTO_INLINE_MAX_SIZE`), so when a longer line is an
/// error depends on the reads: the same commands up to the error, and a "too big" error on
/// the side that stopped first.
fn line_limit_explains(whole: &Parse, split: &Parse) -> bool {
    let too_big = |p: &Parse| {
        matches!(
            p.end,
            Err(ProtoError::TooBigInline
                | ProtoError::TooBigMbulkCount
                | ProtoError::TooBigBulkCount)
        )
    };
    let (short, long) = if whole.commands.len() <= split.commands.len() {
        (whole, split)
    } else {
        (split, whole)
    };
    long.commands.starts_with(&short.commands)
        && (too_big(short) || (short.commands.len() == long.commands.len() && too_big(long)))
}

/// A multibulk command at the front of the input: the same arguments and length as
/// redis-protocol's RESP2 decoder reads there.
fn compare_with_redis_protocol(input: &[u8], ours: &Parse, cx: &mut Ctx) -> Result<(), String> {
    if input.first() != Some(&b'*') || input.iter().filter(|&&c| c == b'*').count() > 64 {
        return Ok(());
    }
    // `*0`, `*-1`, `*-5` …: skipped as Redis does (what follows is another command, maybe
    // inline); redis-protocol reads an empty array, a null, or rejects it.
    let count = input[1..].split(|&c| c == b'\r').next().unwrap_or_default();
    if slotgate::resp::request::parse_i64(count).is_some_and(|n| n <= 0) {
        return Ok(());
    }
    let decoded = std::panic::catch_unwind(|| redis_protocol::resp2::decode::decode(input));
    let theirs: Option<(Vec<Vec<u8>>, usize)> = match decoded {
        Ok(Ok(Some((OwnedFrame::Array(elems), n)))) if !elems.is_empty() => {
            let args: Option<Vec<Vec<u8>>> = elems
                .into_iter()
                .map(|e| match e {
                    OwnedFrame::BulkString(b) => Some(b),
                    _ => None,
                })
                .collect();
            match args {
                Some(a) => Some((a, n)),
                // Not a command (nulls or other types inside): Redis refuses it, so do we.
                None => return Ok(()),
            }
        }
        // An empty or null array: skipped by Redis and by us, the next command follows.
        Ok(Ok(Some(_))) => return Ok(()),
        Ok(Ok(None)) | Ok(Err(_)) => None,
        Err(_) => return Ok(()),
    };
    let mine = ours.commands.first().cloned();
    let agree = match (&theirs, &mine) {
        (Some(t), Some(m)) => t == m,
        (None, None) => true,
        // Ours waits or fails where the decoder read a command, or the other way round.
        _ => false,
    };
    if agree {
        cx.count(
            if theirs.is_some() {
                "agree with redis-protocol"
            } else {
                "neither reads a command"
            },
            1,
        );
        return Ok(());
    }
    let span = theirs
        .as_ref()
        .map_or(0, |t| t.1)
        .max(mine.as_ref().map_or(input.len(), |m| m.1));
    let b = &input[..span.min(input.len())];
    if lone_cr(b) {
        cx.count("lone CR", 1);
        return Ok(());
    }
    if non_canonical_number(b) {
        cx.count("non-canonical length", 1);
        return Ok(());
    }
    Err(format!(
        "parser and redis-protocol disagree on the first command: ours {:?}, theirs {:?}",
        mine.map(|(c, n)| (c.len(), n)),
        theirs.map(|(c, n)| (c.len(), n))
    ))
}

/// A user with key, command and channel restrictions, as `proxy.toml` declares one.
fn restricted_user() -> Arc<User> {
    static USER: OnceLock<Arc<User>> = OnceLock::new();
    USER.get_or_init(|| {
        let cfg: UserConfig = toml::from_str(
            r#"
            name = "tenant"
            password = "pw"
            keys = ["t:*", "{tag}*", "label:*"]
            read_keys = ["shared:*"]
            commands = ["+@all", "-@dangerous", "+config|get"]
            channels = ["c*", "news.?"]
            "#,
        )
        .expect("user config");
        let users = Users::build(None, &[cfg]).expect("users");
        users.authenticate(b"tenant", b"pw").expect("tenant")
    })
    .clone()
}

/// What the session does with a command before anything is forwarded: no panic, and every
/// error reply built from the client's bytes is exactly one frame.
fn dispatch(
    req: &Request<'_>,
    user: &User,
    keys_out: &mut Vec<usize>,
    access: &mut Vec<(usize, u8)>,
) -> Result<(), String> {
    let argc = req.argc();
    let name = req.arg(0);
    let Some(mut spec) = command::lookup(name) else {
        let mut args = (1..argc).map(|i| req.arg(i));
        return one_error_frame(&reply::unknown_command(name, &mut args));
    };
    if spec.is_container() && !(argc == 1 && spec.arity_ok(1)) {
        if argc < 2 {
            return one_error_frame(&reply::wrong_arity(spec.name));
        }
        match command::lookup_sub(spec, req.arg(1)) {
            Some(sub) => spec = sub,
            None => return one_error_frame(&reply::unknown_subcommand(spec.name, req.arg(1))),
        }
    }
    if !spec.arity_ok(argc) {
        return one_error_frame(&reply::wrong_arity(spec.name));
    }
    if user.may_run(spec) {
        let _ = slotgate::auth::special_permission(user, spec.name, req);
    }
    access.clear();
    if keys::key_access(spec, argc, |i| req.arg(i), access).is_ok() {
        for &(i, need) in access.iter() {
            if i >= argc {
                return Err(format!("key_access names argument {i} of {argc}"));
            }
            let _ = user.may_access(req.arg(i), need);
        }
    }
    keys_out.clear();
    if keys::key_indices(spec, argc, |i| req.arg(i), keys_out).is_ok() {
        for &i in keys_out.iter() {
            if i >= argc {
                return Err(format!("key_indices names argument {i} of {argc}"));
            }
            if router::slot(req.arg(i)) >= 16384 {
                return Err("a slot above 16383".into());
            }
        }
    }
    if spec.has(flags::BLOCKING) {
        let _ = policy::has_block_option(req);
    }
    let _ = policy::refused_arguments(spec.name, req);
    if let Some(bad) = policy::config_set_refused(spec.name, req) {
        one_error_frame(&reply::config_set_not_allowed(&bad))?;
    }
    if spec.name == "scan" {
        let _ = policy::parse_cursor(req.arg(1));
    }
    Ok(())
}

fn one_error_frame(b: &[u8]) -> Result<(), String> {
    let f = ReplyScanner::new().scan(b);
    let inner = &b[..b.len().saturating_sub(2)];
    if b.first() != Some(&b'-')
        || f.map(|o| o.map(|x| x.len)) != Ok(Some(b.len()))
        || inner.contains(&b'\r')
        || inner.contains(&b'\n')
    {
        return Err(format!(
            "an error reply that is not one line: {}",
            hex_short(b)
        ));
    }
    Ok(())
}
