use super::*;

fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtoError> {
    let mut p = RequestParser::new();
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    loop {
        match p.parse(&mut buf, &Limits::default(), true)? {
            Parsed::Command(r) => out.push((0..r.argc()).map(|i| r.arg(i).to_vec()).collect()),
            Parsed::Incomplete => return Ok(out),
        }
    }
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
        "ERR Protocol error: expected '$', got '+'"
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
    let mut buf = BytesMut::from(&b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$10\r\nbbbbbbbbbb\r\n"[..]);
    let Parsed::Command(r) = p.parse(&mut buf, &Limits::default(), true).unwrap() else {
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
    let mut buf = BytesMut::from(&b"*11\r\n"[..]);
    assert_eq!(
        p.parse(&mut buf, &Limits::default(), false).unwrap_err(),
        ProtoError::UnauthenticatedMultibulkLength
    );
    let mut p = RequestParser::new();
    let mut buf = BytesMut::from(&b"*1\r\n$16385\r\n"[..]);
    assert_eq!(
        p.parse(&mut buf, &Limits::default(), false).unwrap_err(),
        ProtoError::UnauthenticatedBulkLength
    );
}
