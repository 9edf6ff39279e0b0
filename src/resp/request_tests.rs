use super::*;

fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtoError> {
    let mut p = RequestParser::new();
    let mut buf = input;
    let mut out = Vec::new();
    loop {
        match p.parse(buf, &Limits::default(), true)? {
            Parsed::Command { req, used } => {
                out.push((0..req.argc()).map(|i| req.arg(i).to_vec()).collect());
                buf = &buf[used..];
            }
            Parsed::Incomplete { used } => {
                assert_eq!(used, buf.len(), "only complete input in these tests");
                return Ok(out);
            }
        }
    }
}

/// Feeds `input` in pieces of `step` bytes, keeping what is not used (as the session does).
fn parse_in_steps(input: &[u8], step: usize) -> Vec<Vec<Vec<u8>>> {
    let mut p = RequestParser::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match p.parse(&buf, &Limits::default(), true).unwrap() {
                Parsed::Command { req, used } => {
                    out.push((0..req.argc()).map(|i| req.arg(i).to_vec()).collect());
                    buf.drain(..used);
                }
                Parsed::Incomplete { used } => {
                    buf.drain(..used);
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    out
}

#[test]
fn commands_and_ignored_input_fed_byte_by_byte() {
    let input = b"\r\n*0\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\nPING\r\n*-1\r\n*1\r\n$4\r\nPING\r\n";
    let whole = parse_all(input).unwrap();
    assert_eq!(whole.len(), 3);
    for step in 1..input.len() {
        assert_eq!(parse_in_steps(input, step), whole, "step {step}");
    }
}

#[test]
fn ignored_input_before_a_partial_command_is_used() {
    let mut p = RequestParser::new();
    let buf = b"*0\r\n\r\n*1\r\n$4\r\nPI";
    assert!(matches!(
        p.parse(buf, &Limits::default(), true),
        Ok(Parsed::Incomplete { used: 6 })
    ));
    let Parsed::Command { req, used } = p
        .parse(b"*1\r\n$4\r\nPING\r\n", &Limits::default(), true)
        .unwrap()
    else {
        panic!("incomplete")
    };
    assert_eq!((req.arg(0), used), (&b"PING"[..], 14));
}

#[test]
fn multibulk_and_inline() {
    let cmds = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n  set a \"b c\"\r\n").unwrap();
    assert_eq!(cmds[0], vec![b"GET".to_vec(), b"k".to_vec()]);
    assert_eq!(cmds[1], vec![b"PING".to_vec()]);
    assert_eq!(
        cmds[2],
        vec![b"set".to_vec(), b"a".to_vec(), b"b c".to_vec()]
    );
}

#[test]
fn ignored_input() {
    assert!(parse_all(b"*0\r\n*-5\r\n\r\n\n").unwrap().is_empty());
    assert_eq!(parse_all(b"\r\n*1\r\n$4\r\nPING\r\n").unwrap().len(), 1);
}

#[test]
fn protocol_errors() {
    assert_eq!(
        parse_all(b"*abc\r\n"),
        Err(ProtoError::InvalidMultibulkLength)
    );
    assert_eq!(
        parse_all(b"*3000000000\r\n"),
        Err(ProtoError::InvalidMultibulkLength)
    );
    assert_eq!(
        parse_all(b"*1\r\n$abc\r\n"),
        Err(ProtoError::InvalidBulkLength)
    );
    assert_eq!(
        parse_all(b"*1\r\n$-1\r\n"),
        Err(ProtoError::InvalidBulkLength)
    );
    assert_eq!(
        parse_all(b"*1\r\n$536870913\r\n"),
        Err(ProtoError::InvalidBulkLength)
    );
    assert_eq!(
        parse_all(b"*1\r\n+foo\r\n"),
        Err(ProtoError::ExpectedDollar(b'+'))
    );
    assert_eq!(
        parse_all(b"SET \"a b\r\n"),
        Err(ProtoError::UnbalancedQuotes)
    );
    assert_eq!(
        ProtoError::ExpectedDollar(b'+').message(),
        b"ERR Protocol error: expected '$', got '+'"
    );
    // A NUL before the CR of a count or length line hides the CR, as Redis's strchr does:
    // the line is incomplete until it is too long.
    let mut p = RequestParser::new();
    assert!(matches!(
        p.parse(b"*\x00\r\n", &Limits::default(), true),
        Ok(Parsed::Incomplete { used: 0 })
    ));
    let mut long = b"*\x00\r\n".to_vec();
    long.resize(INLINE_MAX + 2, b'x');
    assert_eq!(parse_all(&long), Err(ProtoError::TooBigMbulkCount));
    let mut p = RequestParser::new();
    assert!(matches!(
        p.parse(b"*1\r\n$3\x00\r\nabc\r\n", &Limits::default(), true),
        Ok(Parsed::Incomplete { .. })
    ));
    // A non-ASCII byte is sent as it came, as Redis does (not as UTF-8).
    assert_eq!(
        ProtoError::ExpectedDollar(0xE9).message(),
        b"ERR Protocol error: expected '$', got '\xE9'"
    );
    let big = vec![b'a'; INLINE_MAX + 1];
    assert_eq!(parse_all(&big), Err(ProtoError::TooBigInline));
}

#[test]
fn bulk_terminator_is_not_checked_like_redis() {
    let cmds = parse_all(b"*1\r\n$4\r\nPINGxx").unwrap();
    assert_eq!(cmds, vec![vec![b"PING".to_vec()]]);
}

#[test]
fn arg_frame_points_at_the_header() {
    let mut p = RequestParser::new();
    let buf = b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$10\r\nbbbbbbbbbb\r\n";
    let Parsed::Command { req: r, .. } = p.parse(buf, &Limits::default(), true).unwrap() else {
        panic!("incomplete")
    };
    assert_eq!(r.arg_frame(0), b"$4\r\nMGET\r\n");
    assert_eq!(r.arg_frame(2), b"$10\r\nbbbbbbbbbb\r\n");
}

#[test]
fn inline_quoting_like_sdssplitargs() {
    assert_eq!(
        split_args(b"a \"\\x41\\n\" 'it\\'s'").unwrap(),
        vec![b"a".to_vec(), b"A\n".to_vec(), b"it's".to_vec()]
    );
    assert!(split_args(b"\"abc\"def").is_none());
    assert!(split_args(b"'abc").is_none());
    assert!(split_args(b"   ").unwrap().is_empty());
}

#[test]
fn unauthenticated_limits() {
    let mut p = RequestParser::new();
    assert_eq!(
        p.parse(b"*11\r\n", &Limits::default(), false).unwrap_err(),
        ProtoError::UnauthenticatedMultibulkLength
    );
    let mut p = RequestParser::new();
    assert_eq!(
        p.parse(b"*1\r\n$16385\r\n", &Limits::default(), false)
            .unwrap_err(),
        ProtoError::UnauthenticatedBulkLength
    );
}
