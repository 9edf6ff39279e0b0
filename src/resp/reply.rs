//! Replies the proxy builds itself. This is the only place that spells an error reply, so
//! every prefix is Redis-compatible (`ERR`, `CROSSSLOT`, `NOPROTO` …) and documented once in
//! the README. Errors from shards never come through here: they pass through byte for byte.

use bytes::{BufMut, Bytes, BytesMut};

use super::request::push_header;

/// The protocol a client negotiated with `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    #[default]
    Resp2 = 0,
    Resp3 = 1,
}

pub const OK: &[u8] = b"+OK\r\n";
pub const PONG: &[u8] = b"+PONG\r\n";
pub const NULL_RESP2: &[u8] = b"$-1\r\n";
pub const NULL_RESP3: &[u8] = b"_\r\n";
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";
pub const DB_OUT_OF_RANGE: &[u8] = b"-ERR DB index is out of range\r\n";
pub const NOT_INTEGER: &[u8] = b"-ERR value is not an integer or out of range\r\n";
pub const SYNTAX: &[u8] = b"-ERR syntax error\r\n";
pub const CLUSTER_DISABLED: &[u8] = b"-ERR This instance has cluster support disabled\r\n";
pub const NOPROTO: &[u8] = b"-NOPROTO unsupported protocol version\r\n";
pub const AUTH_NO_PASSWORD: &[u8] = b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
pub const BAD_CLIENT_NAME: &[u8] =
    b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n";
pub const INVALID_CURSOR: &[u8] = b"-ERR invalid cursor\r\n";
pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
pub const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
/// A channel outside the user's channel patterns (Redis 7's text).
pub const NOPERM_CHANNELS: &[u8] =
    b"-NOPERM this user has no permissions to access one of the channels used as arguments\r\n";
pub const NOPERM_KEYS: &[u8] =
    b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n";
pub const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";
pub const SORT_BY_DENIED: &[u8] = b"-ERR BY option of SORT denied in Cluster mode when keys formed by the pattern may be in different slots.\r\n";
pub const SORT_GET_DENIED: &[u8] = b"-ERR GET option of SORT denied in Cluster mode when keys formed by the pattern may be in different slots.\r\n";
/// SORT's BY (with a `*`) and GET read keys no key spec names: Redis refuses them to a user
/// without access to every key.
pub const SORT_BY_ACL: &[u8] =
    b"-ERR BY option of SORT denied due to insufficient ACL permissions.\r\n";
pub const SORT_GET_ACL: &[u8] =
    b"-ERR GET option of SORT denied due to insufficient ACL permissions.\r\n";
pub const COPY_OTHER_DB: &[u8] =
    b"-ERR Copying to another database is not allowed in cluster mode\r\n";

/// The nil reply for a protocol.
#[inline]
pub fn null(proto: Proto) -> &'static [u8] {
    match proto {
        Proto::Resp2 => NULL_RESP2,
        Proto::Resp3 => NULL_RESP3,
    }
}

/// `-<msg>\r\n`, with CR/LF in `msg` replaced by spaces as Redis's `addReplyErrorLength` does.
pub fn error(msg: &str) -> Bytes {
    error_bytes(&[msg.as_bytes()])
}

/// `-` + the concatenated parts + CRLF, byte for byte (arguments echoed in an error keep
/// their bytes, as Redis's do), with CR/LF replaced by spaces.
pub fn error_bytes(parts: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 3);
    out.put_u8(b'-');
    for p in parts {
        out.extend(
            p.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// A shard could not serve a request that was never sent to it: the connection was down,
/// refused or stalled, or over its in-flight caps. Safe to retry. Every such reply starts with
/// `-ERR shard unavailable`.
pub fn shard_unavailable(addr: &str, why: &str) -> Bytes {
    error(&format!("ERR shard unavailable: {addr}: {why}"))
}

/// A request was sent to its shard and no reply came (timed out, or the connection was lost
/// after it was written): the shard may have applied it. Every such reply starts with
/// `-ERR outcome unknown`.
pub fn outcome_unknown(addr: &str, why: &str) -> Bytes {
    error(&format!(
        "ERR outcome unknown: {addr}: {why} (the request was sent and may have been applied)"
    ))
}

/// An administrative command that would break the proxy's model; never forwarded.
pub fn not_allowed(name: &str) -> Bytes {
    error(&format!(
        "ERR command '{name}' is not allowed through slotgate"
    ))
}

/// A stateful command family a later version of slotgate serves.
pub fn not_yet(name: &str) -> Bytes {
    error(&format!(
        "ERR command '{name}' is not supported by slotgate yet"
    ))
}

/// `-NOPERM this user has no permissions to run the 'get' command`.
pub fn noperm_command(name: &str) -> Bytes {
    error(&format!(
        "NOPERM this user has no permissions to run the '{name}' command"
    ))
}

/// `-ERR wrong number of arguments for 'get' command`.
pub fn wrong_arity(name: &str) -> Bytes {
    error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Redis 7.0's unknown-command error: the name and the arguments are each cut at 128 bytes,
/// and arguments are listed while fewer than 128 bytes of them have been written. Redis
/// formats them with `%s`, so each also ends at its first NUL byte; other bytes are echoed
/// as they are.
pub fn unknown_command(name: &[u8], args: &mut dyn Iterator<Item = &[u8]>) -> Bytes {
    let mut listed: Vec<u8> = Vec::new();
    for a in args {
        if listed.len() >= 128 {
            break;
        }
        let room = 128 - listed.len();
        let a = until_nul(a);
        listed.push(b'\'');
        listed.extend_from_slice(&a[..a.len().min(room)]);
        listed.extend_from_slice(b"' ");
    }
    let name = until_nul(name);
    let name = &name[..name.len().min(128)];
    error_bytes(&[
        b"ERR unknown command '",
        name,
        b"', with args beginning with: ",
        &listed,
    ])
}

/// The bytes before the first NUL, as C's `%s` prints them.
fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// `-ERR unknown subcommand 'foo'. Try CONFIG HELP.`
pub fn unknown_subcommand(container: &str, sub: &[u8]) -> Bytes {
    let sub = until_nul(sub);
    let sub = &sub[..sub.len().min(128)];
    error_bytes(&[
        b"ERR unknown subcommand '",
        sub,
        b"'. Try ",
        container.to_ascii_uppercase().as_bytes(),
        b" HELP.",
    ])
}

/// `$<len>\r\n<bytes>\r\n`.
pub fn bulk(b: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(b.len() + 16);
    push_header(&mut out, b'$', b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// A verbatim string in RESP3 (`=<len>\r\ntxt:…`), a bulk string in RESP2, as Redis replies
/// to INFO and CLIENT INFO.
pub fn verbatim(proto: Proto, text: &[u8]) -> Bytes {
    match proto {
        Proto::Resp2 => bulk(text),
        Proto::Resp3 => {
            let mut out = BytesMut::with_capacity(text.len() + 20);
            push_header(&mut out, b'=', text.len() + 4);
            out.extend_from_slice(b"txt:");
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
            out.freeze()
        }
    }
}

/// `:<n>\r\n`.
pub fn integer(n: i64) -> Bytes {
    let mut b = itoa::Buffer::new();
    let s = b.format(n);
    let mut out = BytesMut::with_capacity(s.len() + 3);
    out.put_u8(b':');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// A builder for aggregate replies whose element count is known up front.
pub struct Aggregate {
    buf: BytesMut,
}

impl Aggregate {
    /// An array (`*n`) of `n` elements.
    pub fn array(n: usize) -> Self {
        let mut buf = BytesMut::with_capacity(64);
        push_header(&mut buf, b'*', n);
        Aggregate { buf }
    }

    /// A RESP3 push (`>n`), for pub/sub messages.
    pub fn push(n: usize) -> Self {
        let mut buf = BytesMut::with_capacity(64);
        push_header(&mut buf, b'>', n);
        Aggregate { buf }
    }

    /// A map of `n` pairs: `%n` in RESP3, a flat array of `2n` in RESP2.
    pub fn map(proto: Proto, n: usize) -> Self {
        let mut buf = BytesMut::with_capacity(128);
        match proto {
            Proto::Resp3 => push_header(&mut buf, b'%', n),
            Proto::Resp2 => push_header(&mut buf, b'*', 2 * n),
        }
        Aggregate { buf }
    }

    pub fn bulk(&mut self, b: &[u8]) -> &mut Self {
        push_header(&mut self.buf, b'$', b.len());
        self.buf.extend_from_slice(b);
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    pub fn integer(&mut self, n: i64) -> &mut Self {
        let mut b = itoa::Buffer::new();
        self.buf.put_u8(b':');
        self.buf.extend_from_slice(b.format(n).as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    /// Appends an already-encoded frame.
    pub fn raw(&mut self, frame: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(frame);
        self
    }

    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}
