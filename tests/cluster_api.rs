//! The cluster API (issue 16.2): slotgate instances in front of the same shards announce
//! themselves as the nodes of one Redis Cluster, so that cluster-aware clients spread over
//! them; any instance serves any slot; a dead instance is no longer announced.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into()
}

/// Three instances, each told the other two.
fn fleet(shards: &[&RedisServer]) -> Vec<Slotgate> {
    'again: for _ in 0..10 {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut out = Vec::new();
        for &p in &ports {
            let peers: Vec<String> = ports
                .iter()
                .filter(|&&q| q != p)
                .map(|q| format!("127.0.0.1:{q}"))
                .collect();
            let peers = peers.join(",");
            let args = [
                "--cluster-api",
                "--cluster-api-peers",
                &peers,
                "--workers",
                "2",
            ];
            match Slotgate::start_on(p, shards, &args) {
                Some(s) => out.push(s),
                None => continue 'again,
            }
        }
        return out;
    }
    panic!("could not start three instances on free ports");
}

/// The `CLUSTER NODES` lines of an instance.
fn nodes(s: &Slotgate) -> Vec<String> {
    let r = lossy(&s.raw().call(&[b"CLUSTER", b"NODES"]));
    r.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn three_instances_announce_one_cluster() {
    let shards: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let mut fleet = fleet(&refs);
    // Every instance announces the same cluster: the slot space split three ways, in the
    // order of the announced addresses; each marks itself `myself`.
    let slots: Vec<Vec<u8>> = fleet
        .iter()
        .map(|s| s.raw().call(&[b"CLUSTER", b"SLOTS"]))
        .collect();
    assert!(slots.iter().all(|s| *s == slots[0]), "{slots:?}");
    let mut ports: Vec<u16> = fleet.iter().map(|s| s.port).collect();
    ports.sort_by_key(|p| format!("127.0.0.1:{p}"));
    let ranges = ["0-5460", "5461-10921", "10922-16383"];
    for s in &fleet {
        let lines = nodes(s);
        assert_eq!(lines.len(), 3, "{lines:?}");
        for (i, l) in lines.iter().enumerate() {
            assert!(l.contains(&format!(" 127.0.0.1:{}@", ports[i])), "{l}");
            assert!(l.ends_with(ranges[i]), "{l}");
            let mine = l.contains(&format!(":{}@", s.port));
            assert_eq!(l.contains("myself,master"), mine, "{l}");
            if mine {
                let id = s.raw().call(&[b"CLUSTER", b"MYID"]);
                assert_eq!(lossy(&id), format!("$40\r\n{}\r\n", &l[..40]));
            }
        }
        let info = lossy(&s.raw().call(&[b"INFO", b"cluster"]));
        assert!(info.contains("cluster_enabled:1"), "{info}");
        let hello = lossy(&s.raw().call(&[b"HELLO", b"2"]));
        assert!(hello.contains("$4\r\nmode\r\n$7\r\ncluster\r\n"), "{hello}");
        let ci = lossy(&s.raw().call(&[b"CLUSTER", b"INFO"]));
        assert!(ci.contains("cluster_state:ok") && ci.contains("cluster_known_nodes:3"));
    }
    // Any instance serves any slot: no MOVED, whichever node the slot is announced on.
    let mut c = fleet[0].raw();
    for i in 0..50 {
        let k = format!("k{i}");
        assert_eq!(c.call(&[b"SET", k.as_bytes(), b"v"]), b"+OK\r\n");
    }
    assert_eq!(c.call(&[b"READONLY"]), b"+OK\r\n");
    assert_eq!(c.call(&[b"CLUSTER", b"KEYSLOT", b"foo"]), b":12182\r\n");
    // The keys of one slot, counted over the shards (three keys of the tag `{t}`).
    for k in ["{t}1", "{t}2", "{t}3"] {
        assert_eq!(c.call(&[b"SET", k.as_bytes(), b"v"]), b"+OK\r\n");
    }
    let slot = c.call(&[b"CLUSTER", b"KEYSLOT", b"{t}"]);
    let slot = lossy(&slot[1..slot.len() - 2]);
    assert_eq!(
        c.call(&[b"CLUSTER", b"COUNTKEYSINSLOT", slot.as_bytes()]),
        b":3\r\n"
    );
    let got = lossy(&c.call(&[b"CLUSTER", b"GETKEYSINSLOT", slot.as_bytes(), b"2"]));
    assert!(got.starts_with("*2\r\n$4\r\n{t}"), "{got}");
    assert_eq!(
        c.call(&[b"CLUSTER", b"COUNTKEYSINSLOT", b"16384"]),
        b"-ERR Invalid slot\r\n"
    );
    assert_eq!(
        c.call(&[b"CLUSTER", b"GETKEYSINSLOT", b"1", b"-1"]),
        b"-ERR Invalid slot or number of keys\r\n"
    );
    assert_eq!(
        c.call(&[b"CLUSTER", b"COUNTKEYSINSLOT", b"x"]),
        b"-ERR value is not an integer or out of range\r\n"
    );
    // A dead instance is no longer announced: the other two share the slots.
    let dead = fleet.remove(1);
    drop(dead);
    for s in &fleet {
        wait_until("the dead peer left out", Duration::from_secs(10), || {
            nodes(s).len() == 2
        });
        let lines = nodes(s);
        assert!(lines[0].ends_with(" 0-8191") && lines[1].ends_with(" 8192-16383"));
    }
    // Without --cluster-api, slotgate is one standalone server, as before.
    let plain = Slotgate::start_with(&refs, &[]);
    assert_eq!(
        plain.raw().call(&[b"CLUSTER", b"SLOTS"]),
        b"-ERR This instance has cluster support disabled\r\n"
    );
    let info = lossy(&plain.raw().call(&[b"INFO", b"cluster"]));
    assert!(info.contains("cluster_enabled:0"), "{info}");
    let hello = lossy(&plain.raw().call(&[b"HELLO", b"2"]));
    assert!(hello.contains("$10\r\nstandalone\r\n"), "{hello}");
}

/// A cluster client (`program script PORT`), given one instance of three: it finds the
/// three, spreads its connections over them, runs its workflow, and carries on through the
/// other two when one is killed (after its topology refresh). It prints `READY <ports>`, waits
/// for a line, then prints `ok_line` at the end.
fn cluster_client_spreads_and_survives_a_dead_instance(program: &str, script: &str, ok_line: &str) {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let mut fleet = fleet(&refs);
    let mut client = Command::new(program)
        .arg(script)
        .arg(fleet[0].port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    if !line.starts_with("READY") {
        let _ = client.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut err);
        panic!("the cluster client failed: {line}{err}");
    }
    // Its connections went to all three instances.
    let used: Vec<u16> = line["READY ".len()..]
        .trim()
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut all: Vec<u16> = fleet.iter().map(|s| s.port).collect();
    all.sort();
    assert_eq!(used, all, "the client's connections: {line}");
    // Kill one (not the one the client was given), then let the client go on.
    let victim = fleet.remove(2);
    drop(victim);
    writeln!(client.stdin.as_mut().unwrap(), "go").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = client.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut err);
    eprintln!("{program}: {rest}");
    assert!(status.success(), "{rest}{err}");
    assert!(rest.contains(ok_line), "{rest}{err}");
}

/// redis-py's `RedisCluster` (tests/python/cluster_client.py).
#[test]
fn redis_py_cluster_client_spreads_and_survives_a_dead_instance() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/cluster_client.py"
    );
    cluster_client_spreads_and_survives_a_dead_instance("python3", script, "cluster client OK");
}

/// ioredis's `Cluster` (tests/node/cluster_client.js; `scripts/test.sh` installs ioredis).
#[test]
fn ioredis_cluster_client_spreads_and_survives_a_dead_instance() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/ioredis")
            .exists(),
        "ioredis is required: npm ci --prefix tests/node (scripts/test.sh does it)"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/cluster_client.js");
    cluster_client_spreads_and_survives_a_dead_instance("node", script, "ioredis cluster OK");
}

/// The cluster API's settings are checked: `--announce` is required when the plain listener
/// is a wildcard address, and the options need `--cluster-api`.
#[test]
fn cluster_api_settings_are_checked() {
    let check = |args: &[&str]| {
        let out = Command::new(slotgate_bin())
            .args(["--check-config", "--shard", "127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), lossy(&out.stderr))
    };
    let (code, err) = check(&["--cluster-api", "--listen", "0.0.0.0:6380"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("needs --announce HOST:PORT"), "{err}");
    let (code, err) = check(&["--announce", "10.0.0.1:6380"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("need --cluster-api"), "{err}");
    let (code, err) = check(&["--cluster-api", "--cluster-api-peers", "10.0.0.2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("expected HOST:PORT"), "{err}");
    let (code, err) = check(&[
        "--cluster-api",
        "--listen",
        "0.0.0.0:6380",
        "--announce",
        "proxy-1.example:6380",
        "--cluster-api-peers",
        "proxy-2.example:6380,proxy-3.example:6380",
    ]);
    assert_eq!(code, Some(0), "{err}");
    // The same in proxy.toml.
    let file = config_file(
        "cluster-api",
        "[cluster_api]\nenabled = true\nannounce = \"10.0.0.1:6380\"\n\
         peers = [\"10.0.0.2:6380\"]\n",
    );
    let (code, err) = check(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
}

/// A client on the TLS listener is told the nodes' TLS ports (a peer's is its announced port
/// plus this instance's TLS − plain offset); `CLUSTER SHARDS` gives both.
#[test]
fn tls_clients_are_told_the_tls_ports() {
    use support::tls::{TlsConn, client_config};
    let shard = RedisServer::start();
    let tls_port = free_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let args = [
        "--tls-listen",
        &listen,
        "--tls-self-signed",
        "--cluster-api",
        "--cluster-api-peers",
        "127.0.0.1:30000",
    ];
    let proxy = Slotgate::start_with(&[&shard], &args);
    wait_for_own_port(tls_port, proxy.pid());
    let offset = i32::from(tls_port) - i32::from(proxy.port);
    // (Port 30000 plus the offset is a valid port whatever the two ephemeral ports are.)
    let peer_tls = (30000 + offset).to_string();
    let mut tls = TlsConn::connect(tls_port, client_config(None, None, None)).unwrap();
    let nodes = lossy(&tls.call(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nNODES\r\n").unwrap());
    assert!(
        nodes.contains(&format!("127.0.0.1:{tls_port}@")),
        "tls {tls_port} plain {}: {nodes}",
        proxy.port
    );
    // The peer (nothing listens on it) is announced until it fails two checks, a second
    // apart: told with its TLS port.
    if nodes.lines().count() > 2 {
        assert!(nodes.contains(&format!("127.0.0.1:{peer_tls}@")), "{nodes}");
    }
    let plain = lossy(&proxy.raw().call(&[b"CLUSTER", b"NODES"]));
    assert!(
        plain.contains(&format!("127.0.0.1:{}@", proxy.port)),
        "{plain}"
    );
    let shards = lossy(&proxy.raw().call(&[b"CLUSTER", b"SHARDS"]));
    assert!(
        shards.contains(&format!("$8\r\ntls-port\r\n:{tls_port}\r\n")),
        "{shards}"
    );
}

/// Review of the cluster API: what it found, each fixed.
#[test]
fn review_findings_on_the_cluster_api_stay_fixed() {
    use support::tls::{TlsConn, client_config};
    let shard = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    // A fleet on TLS listeners only: the peers are checked over TLS (plain PINGs to a TLS
    // listener failed, and each instance announced itself alone for good). B comes up after
    // A dropped it, and A announces it again.
    let (pa, pb) = (free_port(), free_port());
    let tls_only = |me: u16, peer: u16| {
        let (listen, peers) = (format!("127.0.0.1:{me}"), format!("127.0.0.1:{peer}"));
        let args = [
            "--tls-listen",
            &listen,
            "--tls-self-signed",
            "--announce",
            &listen,
            "--cluster-api",
            "--cluster-api-peers",
            &peers,
        ];
        let mut cmd = Command::new(slotgate_bin());
        cmd.args([
            "--listen",
            "none",
            "--shard",
            &shard.addr(),
            "--workers",
            "1",
        ])
        .args(["--admin-listen", "none", "--log-level", "error"])
        .args(args);
        let child = cmd.spawn().unwrap();
        wait_for_own_port(me, child.id());
        child
    };
    let tls_nodes = |port: u16| -> usize {
        let mut c = TlsConn::connect(port, client_config(None, None, None)).unwrap();
        let r = lossy(&c.call(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nNODES\r\n").unwrap());
        r.lines().filter(|l| l.contains("connected")).count()
    };
    let mut a = tls_only(pa, pb);
    wait_until(
        "A to drop B, which is not up",
        Duration::from_secs(10),
        || tls_nodes(pa) == 1,
    );
    let mut b = tls_only(pb, pa);
    wait_until("A to announce B again", Duration::from_secs(10), || {
        tls_nodes(pa) == 2
    });
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // An instance listed among its own peers under another name is left out (its CLUSTER
    // MYID is this instance's): it was announced twice.
    let port = free_port();
    let peers = format!("localhost:{port}");
    let me = Slotgate::start_on(
        port,
        &[&shard],
        &["--cluster-api", "--cluster-api-peers", &peers],
    )
    .expect("a free port");
    wait_until("itself left out", Duration::from_secs(10), || {
        nodes(&me).len() == 1
    });
    let mut c = me.raw();
    let id = c.call(&[b"CLUSTER", b"MYID"]);
    let id = &id[5..45];
    assert_eq!(c.call(&[b"CLUSTER", b"LINKS"]), b"*0\r\n");
    assert_eq!(c.call(&[b"CLUSTER", b"REPLICAS", id]), b"*0\r\n");
    assert_eq!(
        c.call(&[b"CLUSTER", b"COUNT-FAILURE-REPORTS", id]),
        b":0\r\n"
    );
    assert_eq!(
        c.call(&[b"CLUSTER", b"REPLICAS", b"nope"]),
        b"-ERR Unknown node nope\r\n"
    );
    // COUNTKEYSINSLOT over a static shard too large to scan is refused at once (2M keys took
    // 2 s of SCANs per call, and went on after the client left).
    let mut direct = shard.client();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(100_001)
        .query(&mut direct)
        .unwrap();
    let r = lossy(&c.call(&[b"CLUSTER", b"COUNTKEYSINSLOT", b"0"]));
    assert!(
        r.starts_with("-ERR slotgate finds the keys of a slot by scanning"),
        "{r}"
    );
    assert!(r.contains("100001 keys"), "{r}");
}
