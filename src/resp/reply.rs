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
pub const INVALID_SLOT: &[u8] = b"-ERR Invalid slot\r\n";
pub const INVALID_SLOT_OR_KEYS: &[u8] = b"-ERR Invalid slot or number of keys\r\n";
/// CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT over static shards: the scan ran out of time.
pub const KEYS_IN_SLOT_TIMEOUT: &[u8] =
    b"-ERR timed out scanning the shard for the keys of the slot\r\n";
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
/// A null array: EXEC of a transaction whose watched keys may have changed.
pub fn null_array(proto: Proto) -> &'static [u8] {
    match proto {
        Proto::Resp2 => b"*-1\r\n",
        Proto::Resp3 => NULL_RESP3,
    }
}

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
    Failure::ShardUnavailable { shard: addr, why }.to_reply()
}

/// CLUSTER REPLICAS / COUNT-FAILURE-REPORTS of a node id the cluster does not have.
pub fn unknown_node(id: &[u8]) -> Bytes {
    error(&format!("ERR Unknown node {}", String::from_utf8_lossy(id)))
}

/// CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT over a static shard too large to scan for them.
pub fn keys_in_slot_too_many(keys: i64, max: i64) -> Bytes {
    error(&format!(
        "ERR slotgate finds the keys of a slot by scanning the shard that holds it, and that \
         shard has {keys} keys (more than {max}): use SCAN, or a Redis Cluster behind slotgate"
    ))
}

/// Cluster mode: a request redirected more often than slotgate follows (`last` is the last
/// redirect, e.g. `MOVED 866 127.0.0.1:7002`).
pub fn too_many_redirects(last: &str) -> Bytes {
    Bytes::from(format!(
        "-ERR too many cluster redirects for one request (the last: {last})\r\n"
    ))
}

/// A request was sent to its shard and no reply came (timed out, or the connection was lost
/// after it was written): the shard may have applied it. Every such reply starts with
/// `-ERR outcome unknown`.
pub fn outcome_unknown(addr: &str, why: &str) -> Bytes {
    Failure::OutcomeUnknown { shard: addr, why }.to_reply()
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

/// `-ERR unknown subcommand or wrong number of arguments for 'pause'. Try CLIENT HELP.`: a
/// CLIENT subcommand given too many arguments (`sub` as the client spelled it).
pub fn client_subcommand_arguments(sub: &[u8]) -> Bytes {
    error_bytes(&[
        b"ERR unknown subcommand or wrong number of arguments for '",
        sub,
        b"'. Try CLIENT HELP.",
    ])
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

    /// A set of `n` elements: `~n` in RESP3, an array in RESP2.
    pub fn set(proto: Proto, n: usize) -> Self {
        let mut buf = BytesMut::with_capacity(64);
        match proto {
            Proto::Resp3 => push_header(&mut buf, b'~', n),
            Proto::Resp2 => push_header(&mut buf, b'*', n),
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

    /// A double, written as `digits`: `,digits` in RESP3, a bulk string in RESP2.
    pub fn double(&mut self, proto: Proto, digits: &str) -> &mut Self {
        match proto {
            Proto::Resp3 => {
                self.buf.put_u8(b',');
                self.buf.extend_from_slice(digits.as_bytes());
                self.buf.extend_from_slice(b"\r\n");
                self
            }
            Proto::Resp2 => self.bulk(digits.as_bytes()),
        }
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

/// Which side an error of slotgate's own comes from (see [`Failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request itself (Redis's own answer to it).
    Client,
    /// slotgate: a limit, or something it does not do.
    Proxy,
    /// A shard: down, slow, or refusing.
    Shard,
    /// A read-through origin.
    Origin,
}

/// A request that failed for another reason than its own content: every such reply is
/// spelled here, with the side it comes from and whether a client may simply retry it.
#[derive(Debug, Clone)]
pub enum Failure<'a> {
    /// Not sent to the shard: safe to retry.
    ShardUnavailable { shard: &'a str, why: &'a str },
    /// Sent, and no reply came: it may have been applied.
    OutcomeUnknown { shard: &'a str, why: &'a str },
    /// A restricted user's script, whose rights could not be set up on the shard.
    MirrorRefused {
        user: &'a str,
        shard: &'a str,
        why: &'a str,
    },
    /// The dedicated connections of a shard on this worker are all in use.
    TooManyDedicated { shard: &'a str, max: usize },
    /// A request of the proxy's own whose target was dropped undelivered.
    Dropped,
    /// A read-through GET whose origin fetch failed (`HTTP 503`, `timed out after 500ms` …).
    Origin { rule: &'a str, why: &'a str },
    /// A read-through GET whose origin the rule's circuit breaker keeps from being called.
    OriginUnavailable { rule: &'a str, why: &'a str },
    /// A shard's reply of an unexpected shape (not from a real Redis).
    UnexpectedReply(&'a [u8]),
    /// The shards answered a command sent to all of them differently.
    ShardsDisagree,
}

impl Failure<'_> {
    pub fn side(&self) -> Side {
        match self {
            Failure::ShardUnavailable { .. }
            | Failure::OutcomeUnknown { .. }
            | Failure::ShardsDisagree
            | Failure::UnexpectedReply(_) => Side::Shard,
            Failure::MirrorRefused { .. } | Failure::TooManyDedicated { .. } | Failure::Dropped => {
                Side::Proxy
            }
            Failure::Origin { .. } | Failure::OriginUnavailable { .. } => Side::Origin,
        }
    }

    /// Whether sending the request again cannot apply it twice.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Failure::ShardUnavailable { .. }
                | Failure::MirrorRefused { .. }
                | Failure::TooManyDedicated { .. }
                | Failure::Origin { .. }
                | Failure::OriginUnavailable { .. }
        )
    }

    pub fn to_reply(&self) -> Bytes {
        match self {
            Failure::ShardUnavailable { shard, why } => {
                error(&format!("ERR shard unavailable: {shard}: {why}"))
            }
            Failure::OutcomeUnknown { shard, why } => error(&format!(
                "ERR outcome unknown: {shard}: {why} (the request was sent and may have been applied)"
            )),
            Failure::MirrorRefused { user, shard, why } => error(&format!(
                "NOPERM slotgate could not run this with the rights of user '{user}' on shard {shard}: {why}"
            )),
            Failure::TooManyDedicated { shard, max } => error(&format!(
                "ERR too many dedicated connections (transactions and blocking commands) to shard {shard}: the limit is {max} per worker"
            )),
            Failure::Dropped => error("ERR the request was dropped"),
            Failure::Origin { rule, why } => {
                error(&format!("ERR origin failed for rule '{rule}': {why}"))
            }
            Failure::OriginUnavailable { rule, why } => {
                error(&format!("ERR origin unavailable for rule '{rule}': {why}"))
            }
            Failure::UnexpectedReply(p) => {
                let shown: Vec<u8> = p
                    .iter()
                    .take(64)
                    .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c })
                    .collect();
                error_bytes(&[b"ERR unexpected reply from shard: ", &shown])
            }
            Failure::ShardsDisagree => {
                error("ERR shards disagree (the command was not applied the same everywhere)")
            }
        }
    }
}

// Errors of particular commands, as Redis 7.0 words them unless they say "slotgate".
pub const MULTI_NESTED: &[u8] = b"-ERR MULTI calls can not be nested\r\n";
pub const EXEC_WITHOUT_MULTI: &[u8] = b"-ERR EXEC without MULTI\r\n";
pub const DISCARD_WITHOUT_MULTI: &[u8] = b"-ERR DISCARD without MULTI\r\n";
pub const WATCH_IN_MULTI: &[u8] = b"-ERR WATCH inside MULTI is not allowed\r\n";
pub const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
pub const NO_SUCH_CLIENT: &[u8] = b"-ERR No such client\r\n";
pub const CLIENT_ID_NOT_POSITIVE: &[u8] = b"-ERR client-id should be greater than 0\r\n";
pub const INVALID_CLIENT_ID: &[u8] = b"-ERR Invalid client ID\r\n";
/// A monitoring client's key commands (Redis treats a monitor as a replica).
pub const MONITOR_KEYSPACE: &[u8] = b"-ERR Replica can't interact with the keyspace\r\n";
pub const PAUSE_MODE: &[u8] = b"-ERR CLIENT PAUSE mode must be WRITE or ALL\r\n";
pub const TIMEOUT_NEGATIVE: &[u8] = b"-ERR timeout is negative\r\n";
pub const TIMEOUT_NOT_INTEGER: &[u8] = b"-ERR timeout is not an integer or out of range\r\n";
pub const UNBLOCK_REASON: &[u8] = b"-ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR\r\n";
pub const PROTO_NOT_INTEGER: &[u8] = b"-ERR Protocol version is not an integer or out of range\r\n";
pub const HELLO_SWITCH_PINNED: &[u8] = b"-ERR HELLO cannot switch the protocol while WATCH, MULTI or a subscription is active through slotgate\r\n";
pub const SCAN_CURSOR_TOO_LARGE: &[u8] = b"-ERR shard cursor too large for the proxy to encode\r\n";
// CLIENT TRACKING / CACHING (Redis 7.0's texts).
pub const TRACKING_ONE_REDIRECT: &[u8] =
    b"-ERR A client can only redirect to a single other client\r\n";
pub const TRACKING_NO_TARGET: &[u8] = b"-ERR The client ID you want redirect to does not exist\r\n";
pub const TRACKING_PREFIX_NEEDS_BCAST: &[u8] =
    b"-ERR PREFIX option requires BCAST mode to be enabled\r\n";
pub const TRACKING_BCAST_SWITCH: &[u8] = b"-ERR You can't switch BCAST mode on/off before disabling tracking for this client, and then re-enabling it with a different mode.\r\n";
pub const TRACKING_OPT_BCAST: &[u8] = b"-ERR OPTIN and OPTOUT are not compatible with BCAST\r\n";
pub const TRACKING_OPTIN_OPTOUT: &[u8] =
    b"-ERR You can't specify both OPTIN mode and OPTOUT mode\r\n";
pub const TRACKING_OPT_SWITCH: &[u8] = b"-ERR You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, and then re-enabling it with a different mode.\r\n";
pub const CACHING_NOT_TRACKING: &[u8] = b"-ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled\r\n";
pub const CACHING_YES_NOT_OPTIN: &[u8] =
    b"-ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.\r\n";
pub const CACHING_NO_NOT_OPTOUT: &[u8] =
    b"-ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.\r\n";

/// CLIENT TRACKING ON when a shard refuses the invalidation link (a user without CLIENT
/// TRACKING, a Redis without RESP3): nothing would be invalidated.
pub fn tracking_unavailable(why: &str) -> Bytes {
    error(&format!(
        "ERR client-side caching is unavailable through slotgate: {why}"
    ))
}

/// CLIENT TRACKING … BCAST PREFIX: `given` overlaps a prefix the client has (`existing`) or
/// another one of the same command.
pub fn prefix_overlap(given: &[u8], other: &[u8], existing: bool) -> Bytes {
    let what: &[u8] = if existing {
        b"' overlaps with an existing prefix '"
    } else {
        b"' overlaps with another provided prefix '"
    };
    error_bytes(&[
        b"ERR Prefix '",
        given,
        what,
        other,
        b"'. Prefixes for a single client must not overlap.",
    ])
}

/// Scripts of a restricted user run on its mirror connections, which a transaction's
/// dedicated connection is not.
pub const NOPERM_SCRIPT_IN_MULTI: &[u8] = b"-NOPERM scripts and functions of users with restricted permissions cannot run inside MULTI through slotgate\r\n";
pub const WRONGTYPE: &[u8] =
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";

/// CLIENT SETINFO with an attribute it does not know.
/// AUTH from an address with too many failed AUTHs lately (see `auth::AuthGuard`).
pub fn auth_throttled(wait: std::time::Duration) -> Bytes {
    error(&format!(
        "ERR too many failed AUTH attempts from this address: retry in {} s",
        wait.as_secs_f64().ceil() as u64
    ))
}

/// SLOTGATE.HOTKEYS / SLOTGATE.BIGKEYS: options that were refused.
pub fn hotkeys_query(e: crate::hotkeys::QueryError) -> &'static [u8] {
    use crate::hotkeys::QueryError as Q;
    match e {
        Q::Syntax => SYNTAX,
        Q::NotInteger => NOT_INTEGER,
        Q::NotPositive => b"-ERR value is out of range, must be positive\r\n",
        Q::Window => b"-ERR WINDOW must be 10s, 1m or 5m\r\n",
    }
}

/// SLOTGATE.RELOAD: the new configuration was refused (the running one stays).
pub fn reload_failed(why: &str) -> Bytes {
    error(&format!(
        "ERR reload failed, the running configuration stays: {why}"
    ))
}

pub fn unrecognized_option(opt: &[u8]) -> Bytes {
    error_bytes(&[b"ERR Unrecognized option '", opt, b"'"])
}

/// CLIENT SETINFO LIB-NAME/LIB-VER with spaces or special characters.
pub fn bad_client_info(attr: &[u8]) -> Bytes {
    error_bytes(&[
        b"ERR ",
        attr,
        b" cannot contain spaces, newlines or special characters.",
    ])
}

pub fn hello_syntax(opt: &[u8]) -> Bytes {
    error_bytes(&[b"ERR Syntax error in HELLO option '", opt, b"'"])
}

pub fn unknown_client_type(t: &[u8]) -> Bytes {
    error_bytes(&[b"ERR Unknown client type '", t, b"'"])
}

/// A command a RESP2 subscriber may not send.
pub fn not_while_subscribed(name: &str) -> Bytes {
    error(&format!(
        "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
    ))
}

pub fn config_set_not_allowed(param: &str) -> Bytes {
    error(&format!(
        "ERR CONFIG SET parameter '{param}' is not allowed through slotgate"
    ))
}

/// A command a transaction pinned to one shard cannot run (`spans`: it needs every shard).
pub fn not_in_multi(name: &str, spans: bool) -> Bytes {
    if spans {
        error(&format!(
            "ERR '{name}' is not supported inside MULTI by slotgate (it spans shards)"
        ))
    } else {
        error(&format!(
            "ERR '{name}' is not supported inside MULTI by slotgate"
        ))
    }
}

/// A malformed request (the connection closes after it), as Redis words it: without the
/// leading `-` and the CRLF.
/// The text is bytes: the byte in `expected '$', got 'X'` is sent as it came, as Redis does
/// (a non-ASCII byte is not re-encoded as UTF-8).
pub fn protocol_error(e: &super::request::ProtoError) -> Vec<u8> {
    use super::request::ProtoError;
    let m = match e {
        ProtoError::InvalidMultibulkLength => "invalid multibulk length",
        ProtoError::InvalidBulkLength => "invalid bulk length",
        ProtoError::ExpectedDollar(c) => {
            let mut m = b"ERR Protocol error: expected '$', got '".to_vec();
            m.extend_from_slice(&[*c, b'\'']);
            return m;
        }
        ProtoError::UnbalancedQuotes => "unbalanced quotes in request",
        ProtoError::TooBigInline => "too big inline request",
        ProtoError::TooBigMbulkCount => "too big mbulk count string",
        ProtoError::TooBigBulkCount => "too big bulk count string",
        ProtoError::UnauthenticatedMultibulkLength => "unauthenticated multibulk length",
        ProtoError::UnauthenticatedBulkLength => "unauthenticated bulk length",
    };
    format!("ERR Protocol error: {m}").into_bytes()
}
