//! The cluster API (issue 16.2, "OSS cluster policy"): slotgate instances present themselves
//! to cluster-aware clients (redis-py `RedisCluster`, ioredis `Cluster`, go-redis …) as the
//! nodes of one Redis Cluster. `CLUSTER SLOTS`, `SHARDS`, `NODES`, `INFO` and `MYID` describe
//! a cluster whose primaries are the healthy instances — this one and its `peers` — in the
//! order of their announced addresses (every instance computes the same), the slot space
//! divided evenly among them. Any instance serves any slot (it routes to the shards behind
//! the scenes), so a client never gets `MOVED` from slotgate: the division only spreads the
//! clients' connections. Each instance PINGs its peers' listeners every second and leaves a
//! peer that does not answer out of what it announces, so clients that refresh their
//! topology move away from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::resp::reply::{Aggregate, Proto};

/// An announced address: a host (an IP or a name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl Node {
    /// `HOST:PORT` (an IPv6 host in brackets).
    pub fn parse(s: &str) -> Result<Node, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{s}': the port must be 1-65535"))?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "[]/@,".contains(c)) {
            return Err(format!("'{s}': not a host"));
        }
        if host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
        {
            return Err(format!(
                "'{s}': a wildcard address cannot be announced (clients connect to it)"
            ));
        }
        Ok(Node {
            host: host.to_string(),
            port,
        })
    }

    /// Its node id: 40 hex digits derived from the announced address, so that every instance
    /// names every node the same way, and a restarted instance keeps its id.
    pub fn id(&self) -> String {
        crate::auth::sha256(format!("slotgate {}:{}", self.host, self.port).as_bytes())[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// This instance's view of the fleet.
#[derive(Debug)]
pub struct ClusterApi {
    /// This instance's announced address.
    pub me: Node,
    pub peers: Vec<Node>,
    /// Per peer: it answered its last PING (all are taken to be up at start-up).
    alive: Vec<AtomicBool>,
    /// The TLS listener's port minus the plain one: a node's TLS port is its announced port
    /// plus this (the instances of a fleet share one port layout).
    tls_offset: Option<i32>,
    /// The peers are checked over TLS (this instance has no plain listener, so the announced
    /// addresses are TLS listeners).
    tls_only: bool,
}

/// One node of the announced cluster: its address, its slots, and whether it is this one.
struct Member<'a> {
    node: &'a Node,
    first: u16,
    last: u16,
    me: bool,
}

impl ClusterApi {
    /// The cluster API of an instance announcing `me`, with these peers (`me` among them is
    /// left out), its plain listener's port (`None`: TLS only, so `me` is the TLS listener)
    /// and its TLS listener's.
    pub fn new(
        me: Node,
        peers: Vec<Node>,
        plain_port: Option<u16>,
        tls_port: Option<u16>,
    ) -> ClusterApi {
        let mut peers: Vec<Node> = peers.into_iter().filter(|p| *p != me).collect();
        peers.sort();
        peers.dedup();
        let alive = peers.iter().map(|_| AtomicBool::new(true)).collect();
        // (From the listener's own port, not the announced one, which a NAT may map.)
        let tls_offset = match (plain_port, tls_port) {
            (Some(p), Some(t)) => Some(i32::from(t) - i32::from(p)),
            _ => None,
        };
        ClusterApi {
            me,
            peers,
            alive,
            tls_offset,
            tls_only: plain_port.is_none(),
        }
    }

    /// The healthy nodes in their agreed order, each with its even share of the slots.
    fn members(&self) -> Vec<Member<'_>> {
        let mut nodes: Vec<(&Node, bool)> = vec![(&self.me, true)];
        for (p, up) in self.peers.iter().zip(&self.alive) {
            if up.load(Ordering::Relaxed) {
                nodes.push((p, false));
            }
        }
        nodes.sort_by(|a, b| a.0.cmp(b.0));
        let n = nodes.len();
        nodes
            .into_iter()
            .enumerate()
            .map(|(i, (node, me))| Member {
                node,
                first: (i * 16384 / n) as u16,
                last: ((i + 1) * 16384 / n - 1) as u16,
                me,
            })
            .collect()
    }

    /// The port a client reaches `node` on: its TLS port for a client on the TLS listener.
    fn port(&self, node: &Node, tls: bool) -> u16 {
        match self.tls_offset {
            Some(off) if tls => u16::try_from(i32::from(node.port) + off).unwrap_or(node.port),
            _ => node.port,
        }
    }

    /// `CLUSTER SLOTS`.
    pub fn slots(&self, proto: Proto, tls: bool) -> Bytes {
        let members = self.members();
        let mut a = Aggregate::array(members.len());
        for m in &members {
            let mut range = Aggregate::array(3);
            range.integer(m.first.into()).integer(m.last.into());
            let mut node = Aggregate::array(4);
            node.bulk(m.node.host.as_bytes())
                .integer(self.port(m.node, tls).into())
                .bulk(m.node.id().as_bytes())
                .raw(&Aggregate::map(proto, 0).finish());
            range.raw(&node.finish());
            a.raw(&range.finish());
        }
        a.finish()
    }

    /// `CLUSTER SHARDS`.
    pub fn shards(&self, proto: Proto) -> Bytes {
        let members = self.members();
        let mut a = Aggregate::array(members.len());
        for m in &members {
            let mut shard = Aggregate::map(proto, 2);
            let mut slots = Aggregate::array(2);
            slots.integer(m.first.into()).integer(m.last.into());
            shard.bulk(b"slots").raw(&slots.finish());
            let fields = if self.tls_offset.is_some() { 8 } else { 7 };
            let mut node = Aggregate::map(proto, fields);
            node.bulk(b"id").bulk(m.node.id().as_bytes());
            node.bulk(b"port").integer(self.port(m.node, false).into());
            if self.tls_offset.is_some() {
                node.bulk(b"tls-port")
                    .integer(self.port(m.node, true).into());
            }
            node.bulk(b"ip").bulk(m.node.host.as_bytes());
            node.bulk(b"endpoint").bulk(m.node.host.as_bytes());
            node.bulk(b"role").bulk(b"master");
            node.bulk(b"replication-offset").integer(0);
            node.bulk(b"health").bulk(b"online");
            let mut nodes = Aggregate::array(1);
            nodes.raw(&node.finish());
            shard.bulk(b"nodes").raw(&nodes.finish());
            a.raw(&shard.finish());
        }
        a.finish()
    }

    /// `CLUSTER NODES`: one line per node, as Redis writes them.
    pub fn nodes(&self, tls: bool) -> String {
        self.members()
            .iter()
            .map(|m| {
                let port = self.port(m.node, tls);
                format!(
                    "{} {}:{}@{} {} - 0 0 1 connected {}-{}\n",
                    m.node.id(),
                    m.node.host,
                    port,
                    bus_port(port),
                    if m.me { "myself,master" } else { "master" },
                    m.first,
                    m.last
                )
            })
            .collect()
    }

    /// `CLUSTER INFO`.
    pub fn info(&self) -> String {
        let n = self.members().len();
        format!(
            "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n\
             cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{n}\r\n\
             cluster_size:{n}\r\ncluster_current_epoch:1\r\ncluster_my_epoch:1\r\n\
             cluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\n\
             total_cluster_links_buffer_limit_exceeded:0\r\n"
        )
    }

    /// Whether `id` is the id of a node this instance announces.
    pub fn knows(&self, id: &[u8]) -> bool {
        self.members().iter().any(|m| m.node.id().as_bytes() == id)
    }
}

/// The cluster bus port Redis shows after `@` (the port + 10000; 0 when that is no port).
fn bus_port(port: u16) -> u16 {
    port.checked_add(10000).unwrap_or(0)
}

/// How often the peers are checked, how long one check may take, and how many checks in a
/// row a peer must fail to be left out (one lost PING on a busy machine does not reshuffle
/// the cluster's slots).
const CHECK_EVERY: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
const FAILURES: u32 = 2;

/// Checks every peer once a second (the first time a second after start-up, so that a
/// fleet started together announces all of its instances): a peer whose listener answers a
/// PING (any RESP reply: one that wants AUTH is up) is announced; one that fails
/// [`FAILURES`] checks in a row is left out until it answers again.
pub async fn watch_peers(api: Arc<ClusterApi>) {
    let start = tokio::time::Instant::now() + CHECK_EVERY;
    let mut every = tokio::time::interval_at(start, CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = vec![0u32; api.peers.len()];
    let tls = match api.tls_only {
        true => crate::readthrough::origin::insecure_config().ok(),
        false => None,
    };
    let my_id = api.me.id();
    loop {
        every.tick().await;
        // (All at once: a hung peer does not delay noticing another.)
        let mut checks = tokio::task::JoinSet::new();
        for (i, peer) in api.peers.iter().enumerate() {
            let (peer, tls) = (peer.clone(), tls.clone());
            checks.spawn(async move {
                let r = tokio::time::timeout(CHECK_TIMEOUT, check(&peer, tls)).await;
                (i, r.unwrap_or(Check::Silent))
            });
        }
        let mut results: Vec<Option<Check>> = api.peers.iter().map(|_| None).collect();
        while let Some(Ok((i, r))) = checks.join_next().await {
            results[i] = Some(r);
        }
        for (i, (peer, result)) in api.peers.iter().zip(results).enumerate() {
            let result = result.unwrap_or(Check::Silent);
            let answered = match result {
                Check::Answered(Some(id)) if id == my_id => {
                    warn_once(
                        &api,
                        i,
                        peer,
                        "is this instance itself under another address",
                    );
                    false
                }
                Check::Answered(Some(id)) if id != peer.id() => {
                    warn_once(&api, i, peer, "announces itself under another address");
                    false
                }
                Check::Answered(_) => true,
                Check::Silent => false,
            };
            failed[i] = if answered { 0 } else { failed[i] + 1 };
            let up = failed[i] < FAILURES;
            let was = api.alive[i].swap(up, Ordering::Relaxed);
            if was != up {
                if up {
                    tracing::info!(peer = %peer, "cluster API: peer answers again; announced");
                } else {
                    tracing::warn!(peer = %peer, "cluster API: peer does not answer; not announced");
                }
            }
        }
    }
}

/// A peer whose node id shows a misconfiguration is left out; said once per peer.
fn warn_once(api: &ClusterApi, i: usize, peer: &Node, what: &str) {
    if api.alive[i].load(Ordering::Relaxed) {
        tracing::warn!(
            peer = %peer,
            "cluster API: peer {peer} {what} (its CLUSTER MYID differs): not announced; give \
             every instance the same list of announced addresses"
        );
    }
}

/// What a peer's check found.
enum Check {
    /// It answered; with its node id when it told it (one that wants AUTH answers an error).
    Answered(Option<String>),
    Silent,
}

/// `PING` and `CLUSTER MYID` to `peer`'s listener (over TLS when `tls` is given).
async fn check(peer: &Node, tls: Option<Arc<rustls::ClientConfig>>) -> Check {
    let Ok(tcp) = tokio::net::TcpStream::connect((peer.host.as_str(), peer.port)).await else {
        return Check::Silent;
    };
    match tls {
        None => ask(tcp).await,
        Some(cfg) => {
            let Ok(name) = rustls::pki_types::ServerName::try_from(peer.host.clone()) else {
                return Check::Silent;
            };
            match tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
            {
                Ok(s) => ask(s).await,
                Err(_) => Check::Silent,
            }
        }
    }
}

async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> Check {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q = b"*1\r\n$4\r\nPING\r\n*2\r\n$7\r\nCLUSTER\r\n$4\r\nMYID\r\n";
    if s.write_all(q).await.is_err() || s.flush().await.is_err() {
        return Check::Silent;
    }
    // The two replies, framed by the reply scanner: `+PONG` (or an error, from one that
    // wants AUTH) and the id (or an error).
    let (mut got, mut replies) = (Vec::new(), Vec::new());
    let (mut scanner, mut at) = (crate::resp::scan::ReplyScanner::new(), 0);
    let mut b = [0u8; 128];
    while replies.len() < 2 && got.len() < 512 {
        match scanner.scan(&got[at..]) {
            Ok(Some(frame)) => {
                replies.push(at..at + frame.len);
                at += frame.len;
                continue;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        match s.read(&mut b).await {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            _ => break,
        }
    }
    let Some(first) = replies.first() else {
        return Check::Silent;
    };
    if !matches!(got[first.start], b'+' | b'-') {
        return Check::Silent;
    }
    let id = replies
        .get(1)
        .and_then(|r| crate::resp::scan::bulk_body(&got[r.clone()]))
        .filter(|id| id.len() == 40 && &got[first.clone()] == b"+PONG\r\n")
        .map(|id| String::from_utf8_lossy(id).into_owned());
    Check::Answered(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> Node {
        Node::parse(s).unwrap()
    }

    #[test]
    fn every_instance_announces_the_same_cluster() {
        let a = ClusterApi::new(
            node("10.0.0.2:6380"),
            vec![node("10.0.0.1:6380"), node("10.0.0.3:6380")],
            Some(6380),
            Some(10000),
        );
        let b = ClusterApi::new(
            node("10.0.0.3:6380"),
            vec![
                node("10.0.0.2:6380"),
                node("10.0.0.1:6380"),
                node("10.0.0.3:6380"),
            ],
            Some(6380),
            Some(10000),
        );
        let strip = |s: String| s.replace("myself,", "");
        assert_eq!(strip(a.nodes(false)), strip(b.nodes(false)));
        assert_eq!(a.slots(Proto::Resp2, true), b.slots(Proto::Resp2, true));
        let lines: Vec<String> = a.nodes(false).lines().map(String::from).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains(" 10.0.0.1:6380@16380 master ") && lines[0].ends_with(" 0-5460"));
        assert!(lines[1].contains(" myself,master ") && lines[1].ends_with(" 5461-10921"));
        assert!(lines[2].ends_with(" 10922-16383"));
        // A client on the TLS listener is told the TLS ports.
        assert!(a.nodes(true).contains(" 10.0.0.1:10000@20000 "));
        // A dead peer is left out: the others share the slots.
        a.alive[0].store(false, Ordering::Relaxed);
        let lines: Vec<String> = a.nodes(false).lines().map(String::from).collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("10.0.0.2:6380") && lines[0].ends_with(" 0-8191"));
        assert_eq!(node("10.0.0.1:6380").id().len(), 40);
        assert_ne!(node("10.0.0.1:6380").id(), node("10.0.0.1:6381").id());
        assert!(Node::parse("nohost").is_err());
        assert!(Node::parse("h:0").is_err());
        assert_eq!(node("[::1]:7000").to_string(), "[::1]:7000");
        assert!(Node::parse("0.0.0.0:6380").is_err());
        assert!(Node::parse("a b:1").is_err());
        assert_eq!(bus_port(60000), 0);
        // Behind a NAT: the TLS port follows the listeners' offset, not the announced port's.
        let nat = ClusterApi::new(node("1.2.3.4:7713"), vec![], Some(7613), Some(7623));
        assert!(
            nat.nodes(true).contains(" 1.2.3.4:7723@"),
            "{}",
            nat.nodes(true)
        );
    }
}
