//! Unit tests of session dispatch (issue 11.6): a [`serve`] loop driven over an in-memory
//! duplex stream, with a real [`Worker`] whose shards are either loopback ports where nothing
//! listens (so every forwarded command fails at once, deterministically, with the "shard
//! unavailable" reply) or a tiny in-process fake shard that logs what reaches it. No
//! `redis-server`; every read has a deadline, so a hang fails the test instead of blocking it.
//! Every expected reply is spelled from `resp::reply` (or byte for byte where Redis's text is
//! the point) and compared exactly.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::serve;
use crate::resp::reply::{self, Failure};
use crate::resp::{Limits, Parsed, RequestParser};
use crate::worker::{Shared, Worker};

/// How long any one expected reply (or end of stream) may take.
const DEADLINE: Duration = Duration::from_secs(5);

/// Runs `f` on a current-thread runtime inside a `LocalSet` (the worker and its shard
/// connections use `spawn_local`), as a worker thread does.
fn run<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f);
}

/// A loopback address where nothing listens: bound for a moment to get a free port, then
/// closed, so connecting to it is refused at once.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// The reply a command gets when its shard refuses connections: the same text the proxy
/// builds from the connect error.
fn unavailable(addr: SocketAddr) -> Vec<u8> {
    let why = std::net::TcpStream::connect(addr)
        .expect_err("nothing listens there")
        .to_string();
    Failure::ShardUnavailable {
        shard: &addr.to_string(),
        why: &why,
    }
    .to_reply()
    .to_vec()
}

/// A worker with these shards and extra flags, built the way the server builds one.
fn worker(shards: &[SocketAddr], flags: &[&str]) -> Rc<Worker> {
    let mut args: Vec<String> = vec!["slotgate".into(), "--workers".into(), "1".into()];
    for s in shards {
        args.push("--shard".into());
        args.push(s.to_string());
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    let settings = crate::config::Cli::parse_from(args)
        .settings()
        .expect("valid settings");
    Worker::start(0, Shared::new(settings, None))
}

/// A RESP multibulk command.
fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    crate::resp::request::command(&args).to_vec()
}

/// Several commands in one buffer (one write: a pipeline).
fn pipeline(cmds: &[&[&str]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| cmd(c)).collect()
}

fn bulk(s: &str) -> Vec<u8> {
    reply::bulk(s.as_bytes()).to_vec()
}

fn err(text: &str) -> Vec<u8> {
    reply::error(text).to_vec()
}

/// HELLO's reply (no shard has told its version, so the fallback one).
fn hello_reply(proto: u8, id: i64) -> Vec<u8> {
    let p = if proto == 3 {
        reply::Proto::Resp3
    } else {
        reply::Proto::Resp2
    };
    let mut m = reply::Aggregate::map(p, 7);
    m.bulk(b"server").bulk(b"redis");
    m.bulk(b"version").bulk(b"7.0.0");
    m.bulk(b"proto").integer(proto as i64);
    m.bulk(b"id").integer(id);
    m.bulk(b"mode").bulk(b"standalone");
    m.bulk(b"role").bulk(b"master");
    m.bulk(b"modules").raw(b"*0\r\n");
    m.finish().to_vec()
}

/// Shows bytes readably in a failure message.
fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

/// The client end of one session.
struct Client {
    io: DuplexStream,
    /// Bytes read and not yet matched.
    buf: Vec<u8>,
    session: JoinHandle<()>,
}

impl Client {
    /// Starts a session over an in-memory stream.
    fn connect(w: &Rc<Worker>) -> Client {
        let (io, server) = tokio::io::duplex(1 << 16);
        let (rd, wr) = tokio::io::split(server);
        let addr: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
        let laddr: SocketAddr = "127.0.0.1:6380".parse().expect("addr");
        let session = tokio::task::spawn_local(serve(rd, wr, w.clone(), addr, laddr));
        Client {
            io,
            buf: Vec::new(),
            session,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io
            .write_all(bytes)
            .await
            .expect("write to the session");
    }

    /// Reads until `want.len()` bytes are there and checks that they are exactly `want`.
    /// Fails at once when the bytes read so far already differ from `want`, at the deadline,
    /// or at end of stream.
    async fn expect(&mut self, want: &[u8]) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.buf.len().min(want.len());
            if n == want.len() || self.buf[..n] != want[..n] {
                break;
            }
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!(
                    "the session closed; expected {:?}, got {:?}",
                    show(want),
                    show(&self.buf)
                ),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!(
                    "no complete reply within {DEADLINE:?}; expected {:?}, got {:?}",
                    show(want),
                    show(&self.buf)
                ),
            }
        }
        let n = self.buf.len().min(want.len());
        assert_eq!(
            show(&self.buf[..n]),
            show(want),
            "(bytes read after it: {:?})",
            show(&self.buf[n..])
        );
        self.buf.drain(..n);
    }

    /// Sends one command and checks its reply.
    async fn call(&mut self, args: &[&str], want: &[u8]) {
        self.send(&cmd(args)).await;
        self.expect(want).await;
    }

    /// The session closes its side with nothing more written, and its task ends.
    async fn expect_closed(mut self) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, self.io.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "the session did not close within {DEADLINE:?}"
        );
        self.buf.extend_from_slice(&rest);
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before the close: {:?}",
            show(&self.buf)
        );
        tokio::time::timeout(DEADLINE, self.session)
            .await
            .expect("the session task ends")
            .expect("the session task did not panic");
    }

    /// The client closes its side: the session answers nothing more (every reply was
    /// expected) and ends.
    async fn finish(mut self) {
        self.io.shutdown().await.expect("shutdown");
        self.expect_closed().await;
    }
}

/// An in-process stand-in for a shard: answers the few commands the tests forward, and logs
/// every command it receives (over all its connections) as space-joined words.
struct FakeShard {
    addr: SocketAddr,
    log: Rc<RefCell<Vec<String>>>,
}

impl FakeShard {
    async fn start() -> FakeShard {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("local addr");
        let log: Rc<RefCell<Vec<String>>> = Rc::default();
        let conns_log = log.clone();
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::task::spawn_local(fake_conn(s, conns_log.clone()));
            }
        });
        FakeShard { addr, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }
}

/// One connection to the fake shard: `GET k` → `"v:k"`, `SET` → `+OK`, `HELLO 3` (the RESP3
/// pool's handshake) → a map, `SUBSCRIBE` → confirmations (pushes after HELLO 3); anything
/// else → an error naming it, so a command that should not have been forwarded shows.
async fn fake_conn(mut s: TcpStream, log: Rc<RefCell<Vec<String>>>) {
    let mut parser = RequestParser::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (mut resp3, mut subscribed) = (false, 0);
    // A connection's `HELLO 3` is logged with its next command: a spare connection that is
    // never used (slotgate keeps one ready) leaves nothing in the log.
    let mut hello: Option<String> = None;
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        loop {
            let (args, used) = match parser.parse(&buf, &Limits::default(), true) {
                Ok(Parsed::Command { req, used }) => {
                    let args: Vec<String> = (0..req.argc())
                        .map(|i| String::from_utf8_lossy(req.arg(i)).into_owned())
                        .collect();
                    (args, used)
                }
                Ok(Parsed::Incomplete { used }) => {
                    buf.drain(..used);
                    break;
                }
                Err(_) => return,
            };
            buf.drain(..used);
            if args.join(" ") == "CLIENT ID" {
                // A dedicated connection's first request (warm spares send it at any time).
                out.extend_from_slice(b":7\r\n");
                continue;
            }
            let line = args.join(" ");
            if args[0].eq_ignore_ascii_case("hello") {
                hello = Some(line);
            } else {
                log.borrow_mut().extend(hello.take());
                log.borrow_mut().push(line);
            }
            match args[0].to_ascii_uppercase().as_str() {
                "HELLO" => {
                    resp3 = args.get(1).map(String::as_str) == Some("3");
                    out.extend_from_slice(b"%1\r\n$5\r\nproto\r\n:3\r\n");
                }
                "GET" => out.extend_from_slice(&bulk(&format!("v:{}", args[1]))),
                "SET" => out.extend_from_slice(reply::OK),
                "SUBSCRIBE" => {
                    for ch in &args[1..] {
                        subscribed += 1;
                        out.push(if resp3 { b'>' } else { b'*' });
                        out.extend_from_slice(b"3\r\n$9\r\nsubscribe\r\n");
                        out.extend_from_slice(&bulk(ch));
                        out.extend_from_slice(format!(":{subscribed}\r\n").as_bytes());
                    }
                }
                other => out.extend_from_slice(&err(&format!("ERR fake shard got '{other}'"))),
            }
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// PING, ECHO and CLIENT GETNAME are answered by the proxy (the only shard refuses
/// connections, so a forwarded command could only fail), in RESP2, after `HELLO 3` in RESP3
/// (CLIENT GETNAME's nil changes), and in RESP2 again after `HELLO 2`; inline commands too.
#[test]
fn ping_and_echo_are_answered_locally_in_resp2_and_resp3() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["PING"], reply::PONG).await;
        c.call(&["ping", "hi there"], &bulk("hi there")).await;
        c.call(
            &["PING", "a", "b"],
            &err("ERR wrong number of arguments for 'ping' command"),
        )
        .await;
        c.call(&["ECHO", ""], &bulk("")).await;
        c.send(b"PING\r\necho inline\r\n").await;
        c.expect(&[reply::PONG, &bulk("inline")].concat()).await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP2).await;
        c.call(&["HELLO", "3"], &hello_reply(3, 1)).await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["ECHO", "x"], &bulk("x")).await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP3).await;
        c.call(&["HELLO"], &hello_reply(3, 1)).await;
        c.call(&["HELLO", "2"], &hello_reply(2, 1)).await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP2).await;
        c.finish().await;
    });
}

/// HELLO's own errors; none changes the protocol.
#[test]
fn hello_errors() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["HELLO", "4"], reply::NOPROTO).await;
        c.call(&["HELLO", "three"], reply::PROTO_NOT_INTEGER).await;
        c.call(
            &["HELLO", "3", "FOO"],
            &err("ERR Syntax error in HELLO option 'FOO'"),
        )
        .await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP2).await;
        c.finish().await;
    });
}

/// Unknown commands and subcommands get Redis 7.0's texts: the name and arguments echoed
/// as sent, each argument quoted and followed by a space, an argument cut at 128 bytes.
#[test]
fn unknown_command_and_subcommand_texts() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(
            &["FOO", "a", "b c"],
            b"-ERR unknown command 'FOO', with args beginning with: 'a' 'b c' \r\n",
        )
        .await;
        c.call(
            &["foo"],
            b"-ERR unknown command 'foo', with args beginning with: \r\n",
        )
        .await;
        let long = "x".repeat(200);
        let want = format!(
            "-ERR unknown command 'nope', with args beginning with: '{}' \r\n",
            "x".repeat(128)
        );
        c.call(&["nope", &long, "never listed"], want.as_bytes())
            .await;
        c.call(
            &["CLIENT", "NOPE"],
            b"-ERR unknown subcommand 'NOPE'. Try CLIENT HELP.\r\n",
        )
        .await;
        c.call(
            &["config", "nope"],
            b"-ERR unknown subcommand 'nope'. Try CONFIG HELP.\r\n",
        )
        .await;
        c.finish().await;
    });
}

/// Arity errors name the command (a subcommand as `container|sub`), for the table's arity,
/// a container without its subcommand, and MSET's key-value pairing.
#[test]
fn wrong_arity_texts() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        let arity = |name: &str| {
            err(&format!(
                "ERR wrong number of arguments for '{name}' command"
            ))
        };
        c.call(&["GET"], &arity("get")).await;
        c.call(&["get", "a", "b"], &arity("get")).await;
        c.call(&["ECHO"], &arity("echo")).await;
        c.call(&["CLIENT"], &arity("client")).await;
        c.call(&["CLIENT", "SETNAME"], &arity("client|setname"))
            .await;
        c.call(&["MSET", "a"], &arity("mset")).await;
        c.call(&["MSET", "a", "1", "b"], &arity("mset")).await;
        c.finish().await;
    });
}

/// With a password required, nothing but AUTH, HELLO, QUIT and RESET runs before AUTH:
/// `-NOAUTH`, after the unknown-command and arity checks as in Redis. A wrong password keeps
/// the connection unauthenticated; the right one opens it; RESET closes it again.
#[test]
fn commands_before_auth_get_noauth() {
    run(async {
        let w = worker(&[dead_addr()], &["--requirepass", "s3cret"]);
        let mut c = Client::connect(&w);
        c.call(&["PING"], reply::NOAUTH).await;
        c.call(&["GET", "k"], reply::NOAUTH).await;
        c.call(&["CLIENT", "SETNAME", "x"], reply::NOAUTH).await;
        c.call(&["MULTI"], reply::NOAUTH).await;
        c.call(
            &["FOO"],
            b"-ERR unknown command 'FOO', with args beginning with: \r\n",
        )
        .await;
        c.call(
            &["GET"],
            &err("ERR wrong number of arguments for 'get' command"),
        )
        .await;
        c.call(&["HELLO", "3"], reply::NOAUTH_HELLO).await;
        c.call(&["AUTH", "wrong"], reply::WRONGPASS).await;
        c.call(&["PING"], reply::NOAUTH).await;
        c.call(&["AUTH", "s3cret"], reply::OK).await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["ACL", "WHOAMI"], &bulk("default")).await;
        c.call(&["RESET"], b"+RESET\r\n").await;
        c.call(&["PING"], reply::NOAUTH).await;
        // HELLO with AUTH authenticates and switches the protocol at once.
        c.call(
            &["HELLO", "3", "AUTH", "default", "s3cret"],
            &hello_reply(3, 1),
        )
        .await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP3).await;
        c.finish().await;
    });
}

/// AUTH with only a password when the default user has none: Redis's text.
#[test]
fn auth_without_a_password_configured() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["AUTH", "pw"], reply::AUTH_NO_PASSWORD).await;
        c.call(&["PING"], reply::PONG).await;
        c.finish().await;
    });
}

/// MULTI cannot nest; EXEC and DISCARD need MULTI; keyless commands are queued locally
/// (`+QUEUED`, nothing sent to a shard) and WATCH is refused inside MULTI; DISCARD ends the
/// transaction, so PING is answered again.
#[test]
fn multi_nesting_and_exec_discard_without_multi() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["EXEC"], reply::EXEC_WITHOUT_MULTI).await;
        c.call(&["DISCARD"], reply::DISCARD_WITHOUT_MULTI).await;
        c.call(&["MULTI"], reply::OK).await;
        c.call(&["MULTI"], reply::MULTI_NESTED).await;
        c.call(&["PING"], b"+QUEUED\r\n").await;
        c.call(&["ECHO", "x"], b"+QUEUED\r\n").await;
        c.call(&["WATCH", "k"], reply::WATCH_IN_MULTI).await;
        c.call(&["DISCARD"], reply::OK).await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["DISCARD"], reply::DISCARD_WITHOUT_MULTI).await;
        c.finish().await;
    });
}

/// Errors while queuing (unknown command, arity, a refused command, a command spanning
/// shards, a pub/sub or connection command) are answered at once and make EXEC answer
/// `-EXECABORT`, without any shard involved.
#[test]
fn queuing_errors_abort_exec() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["MULTI"], reply::OK).await;
        c.call(
            &["FOO"],
            b"-ERR unknown command 'FOO', with args beginning with: \r\n",
        )
        .await;
        c.call(&["EXEC"], reply::EXECABORT).await;
        c.call(&["EXEC"], reply::EXEC_WITHOUT_MULTI).await;

        let cases: [(&[&str], Vec<u8>); 6] = [
            (
                &["GET"],
                err("ERR wrong number of arguments for 'get' command"),
            ),
            (
                &["MOVE", "k", "1"],
                err("ERR command 'move' is not allowed through slotgate"),
            ),
            (
                &["KEYS", "*"],
                err("ERR 'keys' is not supported inside MULTI by slotgate (it spans shards)"),
            ),
            (
                &["SUBSCRIBE", "ch"],
                err("ERR 'subscribe' is not supported inside MULTI by slotgate"),
            ),
            (
                &["CLIENT", "SETNAME", "n"],
                err("ERR 'client|setname' is not supported inside MULTI by slotgate"),
            ),
            (
                &["HELLO", "3"],
                err("ERR 'hello' is not supported inside MULTI by slotgate"),
            ),
        ];
        for (args, want) in cases {
            c.call(&["MULTI"], reply::OK).await;
            c.call(&["PING"], b"+QUEUED\r\n").await;
            c.call(args, &want).await;
            c.call(&["PING"], b"+QUEUED\r\n").await;
            c.call(&["EXEC"], reply::EXECABORT).await;
        }
        // The session is out of MULTI and RESP2 after all that.
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP2).await;
        c.finish().await;
    });
}

/// QUIT inside MULTI is not queued: `+OK`, and the connection closes; what was pipelined
/// after it is never answered.
#[test]
fn quit_inside_multi_closes_the_connection() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.send(&pipeline(&[&["MULTI"], &["PING"], &["QUIT"], &["PING"]]))
            .await;
        c.expect(&[reply::OK, b"+QUEUED\r\n", reply::OK].concat())
            .await;
        c.expect_closed().await;
    });
}

/// Commands that would break the proxy's model are refused with their exact texts and
/// never reach a shard: the fake shard's log shows only the GET sent after them (whose reply,
/// arriving last, proves everything before it was dispatched).
#[test]
fn refused_commands_never_reach_a_shard() {
    run(async {
        let shard = FakeShard::start().await;
        let w = worker(&[shard.addr], &[]);
        let mut c = Client::connect(&w);
        let not_allowed = |name: &str| {
            err(&format!(
                "ERR command '{name}' is not allowed through slotgate"
            ))
        };
        c.call(&["MOVE", "k", "1"], &not_allowed("move")).await;
        c.call(&["SWAPDB", "0", "1"], &not_allowed("swapdb")).await;
        c.call(&["CLIENT", "TRACKING", "maybe"], reply::SYNTAX)
            .await;
        c.call(&["CLIENT", "CACHING", "yes"], reply::CACHING_NOT_TRACKING)
            .await;
        c.call(&["CLIENT", "GETREDIR"], b":-1\r\n").await;
        c.call(&["CLUSTER", "INFO"], reply::CLUSTER_DISABLED).await;
        c.call(&["READONLY"], reply::CLUSTER_DISABLED).await;
        c.call(&["SELECT", "0"], reply::OK).await;
        c.call(&["SELECT", "1"], reply::DB_OUT_OF_RANGE).await;
        c.call(&["SELECT", "x"], reply::NOT_INTEGER).await;
        c.call(&["COPY", "{a}1", "{a}2", "DB", "1"], reply::COPY_OTHER_DB)
            .await;
        c.call(
            &["CONFIG", "SET", "port", "1"],
            &err("ERR CONFIG SET parameter 'port' is not allowed through slotgate"),
        )
        .await;
        c.call(&["RENAME", "a", "b"], reply::CROSSSLOT).await;
        c.call(&["GET", "k"], &bulk("v:k")).await;
        assert_eq!(shard.log(), ["GET k"]);
        c.finish().await;
    });
}

/// A keyed command whose shard refuses connections gets the "shard unavailable" failure at
/// once, not a hang; so do a transaction's EXEC, WATCH and a blocking command, which go over
/// dedicated connections; keys in one slot (`{x}`) are forwarded where different slots get
/// CROSSSLOT.
#[test]
fn keyed_commands_to_an_unreachable_shard_fail_fast() {
    run(async {
        let dead = dead_addr();
        let down = unavailable(dead);
        let w = worker(&[dead], &[]);
        let mut c = Client::connect(&w);
        c.call(&["GET", "k"], &down).await;
        c.call(&["SET", "k", "v"], &down).await;
        c.call(&["RENAME", "a", "b"], reply::CROSSSLOT).await;
        c.call(&["RENAME", "{x}a", "{x}b"], &down).await;
        c.call(&["MGET", "a", "b"], &down).await;
        c.call(&["BLPOP", "k", "0"], &down).await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["MULTI"], reply::OK).await;
        c.call(&["PING"], b"+QUEUED\r\n").await;
        c.call(&["EXEC"], &down).await;
        c.call(&["WATCH", "k"], &down).await;
        // A lost WATCH connection watches nothing: UNWATCH is OK, as in Redis.
        c.call(&["UNWATCH"], reply::OK).await;
        c.call(&["PING"], reply::PONG).await;
        // A failed WATCH watches nothing: the transaction after it is a plain one (MULTI
        // only fails nested, in Redis), and the connection is usable afterwards.
        c.call(&["WATCH", "k"], &down).await;
        c.call(&["MULTI"], reply::OK).await;
        c.call(&["PING"], b"+QUEUED\r\n").await;
        c.call(&["EXEC"], &down).await;
        c.call(&["PING"], reply::PONG).await;
        c.finish().await;
    });
}

/// One pipelined write mixing local replies, errors and commands for an unreachable shard:
/// the replies come back in request order, although the local ones are ready first.
#[test]
fn pipelined_mixture_keeps_reply_order() {
    run(async {
        let dead = dead_addr();
        let down = unavailable(dead);
        let w = worker(&[dead], &[]);
        let mut c = Client::connect(&w);
        c.send(&pipeline(&[
            &["PING"],
            &["GET", "k"],
            &["ECHO", "one"],
            &["FOO"],
            &["SET", "k", "v"],
            &["MOVE", "k", "1"],
            &["GET"],
            &["BLPOP", "k", "0"],
            &["PING", "two"],
        ]))
        .await;
        c.expect(
            &[
                reply::PONG,
                &down,
                &bulk("one"),
                b"-ERR unknown command 'FOO', with args beginning with: \r\n",
                &down,
                &err("ERR command 'move' is not allowed through slotgate"),
                &err("ERR wrong number of arguments for 'get' command"),
                &down,
                &bulk("two"),
            ]
            .concat(),
        )
        .await;
        c.finish().await;
    });
}

/// The same order with a live (fake) shard: its replies are relayed byte for byte between
/// the local ones, and only the forwarded commands reach it.
#[test]
fn pipelined_mixture_with_a_shard_keeps_reply_order() {
    run(async {
        let shard = FakeShard::start().await;
        let w = worker(&[shard.addr], &[]);
        let mut c = Client::connect(&w);
        c.send(&pipeline(&[
            &["GET", "a"],
            &["PING"],
            &["SET", "b", "1"],
            &["ECHO", "e"],
            &["SWAPDB", "0", "1"],
            &["GET", "c"],
        ]))
        .await;
        c.expect(
            &[
                &bulk("v:a"),
                reply::PONG,
                reply::OK,
                &bulk("e"),
                &err("ERR command 'swapdb' is not allowed through slotgate"),
                &bulk("v:c"),
            ]
            .concat(),
        )
        .await;
        assert_eq!(shard.log(), ["GET a", "SET b 1", "GET c"]);
        c.finish().await;
    });
}

/// A pipeline longer than `max-client-pipeline`: the session stops reading at the bound and
/// resumes as replies drain, answering every command in order.
#[test]
fn pipeline_bound_answers_everything() {
    run(async {
        let dead = dead_addr();
        let down = unavailable(dead);
        let w = worker(&[dead], &["--max-client-pipeline", "2"]);
        let mut c = Client::connect(&w);
        let mut req = Vec::new();
        let mut want = Vec::new();
        for i in 0..10 {
            req.extend_from_slice(&cmd(&["GET", &format!("k{i}")]));
            want.extend_from_slice(&down);
            req.extend_from_slice(&cmd(&["ECHO", &i.to_string()]));
            want.extend_from_slice(&bulk(&i.to_string()));
        }
        c.send(&req).await;
        c.expect(&want).await;
        c.finish().await;
    });
}

/// UNSUBSCRIBE and PUNSUBSCRIBE with no subscriptions are answered by the proxy, in Redis's
/// shape: one frame per channel named, or one with a nil channel.
#[test]
fn unsubscribe_without_subscriptions_is_answered_locally() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(
            &["UNSUBSCRIBE"],
            b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
        )
        .await;
        c.call(
            &["UNSUBSCRIBE", "a", "b"],
            b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n",
        )
        .await;
        c.call(
            &["PUNSUBSCRIBE"],
            b"*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n",
        )
        .await;
        // Not subscribed: other commands still run.
        c.call(&["PING"], reply::PONG).await;
        c.finish().await;
    });
}

/// A RESP2 subscriber may only use (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, PING, QUIT and RESET:
/// others get Redis's text and are not forwarded; PING answers `["pong", msg]`. RESET ends
/// the subscription (`+RESET`), and commands run again.
#[test]
fn resp2_subscriber_is_limited_to_pubsub_commands() {
    run(async {
        let shard = FakeShard::start().await;
        let w = worker(&[shard.addr], &[]);
        let mut c = Client::connect(&w);
        c.call(
            &["SUBSCRIBE", "ch"],
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        )
        .await;
        let refused = |name: &str| {
            err(&format!(
                "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
            ))
        };
        c.call(&["GET", "k"], &refused("get")).await;
        c.call(&["ECHO", "x"], &refused("echo")).await;
        c.call(&["CLIENT", "ID"], &refused("client|id")).await;
        c.call(&["PING"], b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").await;
        c.call(&["PING", "hi"], b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n")
            .await;
        c.call(&["RESET"], b"+RESET\r\n").await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["GET", "k"], &bulk("v:k")).await;
        assert_eq!(shard.log(), ["SUBSCRIBE ch", "GET k"]);
        c.finish().await;
    });
}

/// In RESP3 a subscriber may run any command: confirmations are pushes, and GET goes to
/// the shard (over the RESP3 pool, whose handshake is `HELLO 3`).
#[test]
fn resp3_subscriber_may_run_other_commands() {
    run(async {
        let shard = FakeShard::start().await;
        let w = worker(&[shard.addr], &[]);
        let mut c = Client::connect(&w);
        c.call(&["HELLO", "3"], &hello_reply(3, 1)).await;
        c.call(
            &["SUBSCRIBE", "ch"],
            b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        )
        .await;
        c.call(&["ECHO", "x"], &bulk("x")).await;
        c.call(&["PING"], reply::PONG).await;
        c.call(&["GET", "k"], &bulk("v:k")).await;
        // The protocol cannot change under a subscription.
        c.call(&["HELLO", "2"], reply::HELLO_SWITCH_PINNED).await;
        // The subscriber connection's handshake and SUBSCRIBE, then the RESP3 pool's
        // handshake (opened by the first RESP3 command for a shard) and the GET.
        assert_eq!(shard.log(), ["HELLO 3", "SUBSCRIBE ch", "HELLO 3", "GET k"]);
        c.finish().await;
    });
}

/// RESET answers `+RESET` and undoes the connection's state: its name, an open MULTI, and
/// RESP3 (back to RESP2).
#[test]
fn reset_restores_the_connection_defaults() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["CLIENT", "SETNAME", "app"], reply::OK).await;
        c.call(&["CLIENT", "GETNAME"], &bulk("app")).await;
        c.call(&["HELLO", "3"], &hello_reply(3, 1)).await;
        c.call(&["MULTI"], reply::OK).await;
        c.call(&["PING"], b"+QUEUED\r\n").await;
        c.call(&["RESET"], b"+RESET\r\n").await;
        c.call(&["CLIENT", "GETNAME"], reply::NULL_RESP2).await;
        c.call(&["EXEC"], reply::EXEC_WITHOUT_MULTI).await;
        c.call(&["CLIENT", "ID"], b":1\r\n").await;
        c.finish().await;
    });
}

/// A malformed request gets Redis's protocol error after the replies to what came before
/// it, and the connection closes.
#[test]
fn protocol_error_answers_what_came_before_and_closes() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.send(&[&cmd(&["PING"])[..], b"*2\r\n+PING\r\n"].concat())
            .await;
        c.expect(
            &[
                reply::PONG,
                &err("ERR Protocol error: expected '$', got '+'"),
            ]
            .concat(),
        )
        .await;
        c.expect_closed().await;
    });
}

/// Beyond `maxclients`, a new session gets Redis's error and is closed, while the first
/// one keeps working.
#[test]
fn maxclients_refuses_the_next_session() {
    run(async {
        let w = worker(&[dead_addr()], &["--maxclients", "1"]);
        let mut first = Client::connect(&w);
        first.call(&["PING"], reply::PONG).await;
        let mut second = Client::connect(&w);
        second.expect(reply::MAX_CLIENTS).await;
        second.expect_closed().await;
        first.call(&["PING"], reply::PONG).await;
        first.finish().await;
    });
}

/// A session that ends without returning (its task aborted, as a panic would unwind it)
/// leaves CLIENT LIST: the entry goes with the session, not at the end of its loop
/// (adversarial review of issue 19: a panicking session stayed listed for good).
#[test]
fn a_session_that_ends_abnormally_leaves_the_client_list() {
    run(async {
        let w = worker(&[dead_addr()], &[]);
        let mut c = Client::connect(&w);
        c.call(&["PING"], reply::PONG).await;
        let listed = || w.shared.clients.lock().expect("clients").len();
        assert_eq!(listed(), 1);
        c.session.abort();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while listed() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the aborted session is still listed"
            );
            tokio::task::yield_now().await;
        }
    });
}
