//! Cluster mode: a Redis Cluster behind slotgate (`--cluster`, `[cluster] seeds`).
//!
//! The layout is the cluster's: its primaries are the shards, and each slot goes where the
//! cluster says. It is read with `CLUSTER SHARDS` (Redis 7; `CLUSTER SLOTS` for older
//! servers) from the first node that answers, at start-up (before any client is accepted:
//! [`start`]) and then every `refresh_interval` ([`keep_fresh`]), asking the known primaries
//! first and the seeds after them. A layout that changed is applied as a reload applies a new
//! `[[shards]]` layout (see `reload`): new requests route by the new map, new primaries get
//! connections, and the connections to nodes that left drain and close. Every node gets the
//! `[upstream]` credentials and TLS settings.
//!
//! Redirects are slotgate's business, never the client's ([`redirector`]): a request that a
//! node answers with `-MOVED slot addr` is sent again to `addr` (and the topology is read
//! again soon), one answered `-ASK slot addr` goes to `addr` behind `ASKING` on the same
//! connection, and one answered `-TRYAGAIN` (a multi-key request while its slot migrates) is
//! sent again every 20 ms until its deadline; at most [`MAX_HOPS`] MOVED/ASK hops, then the
//! client gets an error. [`next_hop`] makes that decision for every request; the redirector
//! sends the requests of the shared connections again, and a session sends those of its
//! dedicated connections (transactions, blocking commands, sharded subscriptions, a
//! restricted user's scripts: see `session::follow`).
//!
//! With `read_from = replica | prefer-replica`, the first replica of each primary gets a
//! `READONLY` connection (its shard index follows the primaries') and read-only commands go
//! there (see `Session::reader_of`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;

use crate::queue::Target;
use crate::router::SlotMap;
use crate::settings::{ClusterSettings, Settings};
use crate::shard::Redirected;
use crate::shard::UpstreamAuth;
use crate::tls::UpstreamTls;
use crate::worker::{Shared, Worker};

/// How long one node may take to answer (connect, TLS, AUTH, the topology).
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long slotgate tries to read the topology when it starts.
const START_WITHIN: Duration = Duration::from_secs(10);
/// Most redirects one request follows.
pub const MAX_HOPS: u8 = 5;
/// How long a `-TRYAGAIN` request waits before it is sent again.
const TRYAGAIN_WAIT: Duration = Duration::from_millis(20);
/// How long a `-CLUSTERDOWN` request waits before it is sent again.
const CLUSTERDOWN_WAIT: Duration = Duration::from_millis(50);
/// How long a request redirected to a node slotgate has no connection to waits for the
/// next layout (one that includes the node) before it is tried again.
pub const NEW_NODE_WAIT: Duration = Duration::from_millis(100);
/// The shortest time between two reads of the topology that redirects asked for.
const REDIRECT_REFRESH: Duration = Duration::from_millis(100);
/// Reads of the topology after one that a redirect asked for found no change: the node it
/// asked may not have heard of the move yet (a reshard tells the nodes one after the other),
/// so the layout is read again, `REDIRECT_REFRESH` apart.
const RECHECKS: u8 = 5;
/// How often the topology is read while a primary is unreachable (a promoted replica serves
/// its slots within this of the promotion).
const DOWN_REFRESH: Duration = Duration::from_millis(250);
/// The largest topology reply read (a 1,000-node cluster is well under).
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// What cluster mode counts (INFO shards, `/metrics`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Requests sent again after `-MOVED`, `-ASK`, `-TRYAGAIN`, `-CLUSTERDOWN`.
    pub moved: AtomicU64,
    pub ask: AtomicU64,
    pub tryagain: AtomicU64,
    pub clusterdown: AtomicU64,
    /// Reads of the topology (after start-up), and those that found a new layout.
    pub refreshes: AtomicU64,
    pub layout_changes: AtomicU64,
    /// Primaries seen that were replicas at the read before (promoted by a failover).
    pub failovers: AtomicU64,
}

impl ClusterStats {
    /// INFO shards' lines for cluster mode.
    pub fn info(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "cluster_mode:1\r\ncluster_refreshes:{}\r\ncluster_layout_changes:{}\r\n\
             cluster_failovers:{}\r\ncluster_redirects_moved:{}\r\ncluster_redirects_ask:{}\r\n\
             cluster_redirects_tryagain:{}\r\ncluster_redirects_clusterdown:{}\r\n",
            get(&self.refreshes),
            get(&self.layout_changes),
            get(&self.failovers),
            get(&self.moved),
            get(&self.ask),
            get(&self.tryagain),
            get(&self.clusterdown)
        )
    }

    /// Copies the counters into the metrics registry.
    pub fn publish(&self) {
        use crate::metrics as m;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (kind, c) in [
            ("moved", &self.moved),
            ("ask", &self.ask),
            ("tryagain", &self.tryagain),
            ("clusterdown", &self.clusterdown),
        ] {
            metrics::counter!(m::CLUSTER_REDIRECTS, "kind" => kind).absolute(get(c));
        }
        metrics::counter!(m::CLUSTER_REFRESHES).absolute(get(&self.refreshes));
        metrics::counter!(m::CLUSTER_LAYOUT_CHANGES).absolute(get(&self.layout_changes));
        metrics::counter!(m::CLUSTER_FAILOVERS).absolute(get(&self.failovers));
    }
}

/// A primary and the slots it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    pub addr: SocketAddr,
    pub slots: Vec<(usize, usize)>,
    /// Its replicas that have not failed, in the order the cluster lists them.
    pub replicas: Vec<SocketAddr>,
}

/// The cluster's layout as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    pub primaries: Vec<Primary>,
}

/// The layout slotgate routes by: shards in order, and the owner of each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The primaries, then (with reads from replicas) one replica of each that has one.
    pub shards: Vec<SocketAddr>,
    pub slot_map: SlotMap,
    /// Per primary: the shard index of the replica its reads go to (see
    /// `Settings::replica_of`); empty without reads from replicas.
    pub replica_of: Vec<Option<usize>>,
    /// Every replica the cluster listed (a primary that was one of them is a failover).
    pub replicas: Vec<SocketAddr>,
}

impl Topology {
    /// The shards and the slot map. The shards are the primaries with slots: those slotgate
    /// has already (in `previous`) keep their order, so that a SCAN cursor, which names a
    /// shard, stays good across a reshard; new ones follow in the order of their first slot.
    /// Then the primaries without slots (a node just added: connected before its first slot
    /// arrives, but not asked by commands that go to every shard). With `replicas`, the
    /// first replica of each primary with slots comes last. Slots no
    /// primary serves (a cluster still being set up) go to the first shard, which answers
    /// them as the cluster does (`-CLUSTERDOWN`, or a redirect).
    pub fn layout(&self, replicas: bool, previous: &[SocketAddr]) -> Result<Layout, String> {
        if self.primaries.iter().all(|p| p.slots.is_empty()) {
            return Err("the cluster has no primary with slots".into());
        }
        let mut primaries: Vec<&Primary> = self.primaries.iter().collect();
        primaries.sort_by_key(|p| {
            (
                previous
                    .iter()
                    .position(|a| *a == p.addr)
                    .unwrap_or(usize::MAX),
                p.slots.iter().map(|r| r.0).min(),
            )
        });
        // Only primaries with slots are in the slot map (and in commands that go to every
        // shard); those without come after them, connected but holding no keys.
        let (primaries, empty): (Vec<&Primary>, Vec<&Primary>) =
            primaries.into_iter().partition(|p| !p.slots.is_empty());
        let mut owned = vec![false; crate::router::SLOTS];
        let mut layout: Vec<crate::router::ShardSlots> = primaries
            .iter()
            .map(|p| {
                for &(a, b) in &p.slots {
                    owned[a..=b].iter_mut().for_each(|o| *o = true);
                }
                (p.addr.to_string(), Some(p.slots.clone()))
            })
            .collect();
        let unowned: Vec<(usize, usize)> = ranges_of(&owned, false);
        if !unowned.is_empty() {
            tracing::warn!(
                "cluster: {} slot range(s) have no primary (the first: {}-{}); their requests \
                 go to {}",
                unowned.len(),
                unowned[0].0,
                unowned[0].1,
                layout[0].0
            );
            if let Some(r) = layout[0].1.as_mut() {
                r.extend(unowned);
            }
        }
        let slot_map = SlotMap::build(&layout).map_err(|e| e.to_string())?;
        let mut shards: Vec<SocketAddr> = primaries.iter().chain(&empty).map(|p| p.addr).collect();
        let mut replica_of = Vec::new();
        if replicas {
            for p in &primaries {
                replica_of.push(p.replicas.first().map(|&r| {
                    shards.push(r);
                    shards.len() - 1
                }));
            }
        }
        Ok(Layout {
            shards,
            slot_map,
            replica_of,
            replicas: self
                .primaries
                .iter()
                .flat_map(|p| p.replicas.iter().copied())
                .collect(),
        })
    }
}

/// The ranges of slots whose entry in `owned` is `want`.
fn ranges_of(owned: &[bool], want: bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (s, &o) in owned.iter().enumerate() {
        if o != want {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.1 + 1 == s => r.1 = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// How slotgate talks to the cluster's nodes.
#[derive(Clone)]
pub struct Access {
    pub auth: Option<UpstreamAuth>,
    pub tls: Option<UpstreamTls>,
}

/// Reads the topology from the first of `nodes` that answers.
/// The layout from the first of `nodes` whose answer makes one (a node that left the
/// cluster answers, but with no slots: the next one is asked). `previous` keeps the order of
/// the shards slotgate has (see [`Topology::layout`]).
pub async fn discover(
    nodes: &[String],
    access: &Access,
    replicas: bool,
    previous: &[SocketAddr],
) -> Result<Layout, String> {
    let mut why = Vec::new();
    for node in nodes {
        match tokio::time::timeout(ASK_TIMEOUT, ask(node, access)).await {
            Ok(Ok(t)) => match t.layout(replicas, previous) {
                Ok(l) => return Ok(l),
                Err(e) => why.push(format!("{node}: {e}")),
            },
            Ok(Err(e)) => why.push(format!("{node}: {e}")),
            Err(_) => why.push(format!("{node}: no answer within {ASK_TIMEOUT:?}")),
        }
    }
    Err(why.join("; "))
}

/// A connection of slotgate's own to a node (TLS or not).
pub trait NodeIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> NodeIo for T {}

/// Connects to `node` with slotgate's credentials and TLS settings (and authenticates).
pub async fn connect(node: &str, access: &Access) -> Result<Box<dyn NodeIo>, String> {
    let tcp = TcpStream::connect(node)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut s: Box<dyn NodeIo> = match &access.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let ip = tcp.peer_addr().map_err(|e| e.to_string())?.ip();
            let name = tls.name_for(ip);
            Box::new(
                tls.connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?,
            )
        }
    };
    if let Some(a) = &access.auth
        && let OwnedFrame::Error(e) = call(&mut s, &a.auth_command()).await?
    {
        return Err(format!("AUTH refused: {e}"));
    }
    Ok(s)
}

/// Asks one node.
async fn ask(node: &str, access: &Access) -> Result<Topology, String> {
    let mut s = connect(node, access).await?;
    let tls = access.tls.is_some();
    match call(&mut s, &[b"CLUSTER", b"SHARDS"]).await? {
        OwnedFrame::Error(e) if e.contains("unknown subcommand") => {
            match call(&mut s, &[b"CLUSTER", b"SLOTS"]).await? {
                OwnedFrame::Error(e) => Err(format!("CLUSTER SLOTS: {e}")),
                f => parse_slots(&f),
            }
        }
        OwnedFrame::Error(e) => Err(format!("CLUSTER SHARDS: {e}")),
        f => parse_shards(&f, tls),
    }
}

/// Sends one command and reads its reply.
pub async fn call<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    args: &[&[u8]],
) -> Result<OwnedFrame, String> {
    let mut out = BytesMut::new();
    crate::resp::request::push_command(&mut out, args);
    s.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
    read_frame(s, &mut Vec::with_capacity(4096)).await
}

/// Reads the next frame from `s`, with what was read past the last one in `buf`.
pub async fn read_frame<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<OwnedFrame, String> {
    loop {
        if let Some((frame, used)) =
            redis_protocol::resp2::decode::decode(buf).map_err(|e| format!("reply: {e:?}"))?
        {
            buf.drain(..used);
            return Ok(frame);
        }
        if buf.len() > MAX_REPLY {
            return Err("reply too large".into());
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        OwnedFrame::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// A RESP2 map (a flat array of key, value): the value of `key`.
fn field<'a>(map: &'a [OwnedFrame], key: &str) -> Option<&'a OwnedFrame> {
    map.chunks(2)
        .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some(key))
        .map(|kv| &kv[1])
}

fn slot_range(a: i64, b: i64) -> Result<(usize, usize), String> {
    let max = crate::router::SLOTS as i64 - 1;
    if (0..=max).contains(&a) && (a..=max).contains(&b) {
        Ok((a as usize, b as usize))
    } else {
        Err(format!("bad slot range {a}-{b}"))
    }
}

/// `CLUSTER SHARDS`: per shard, `slots` (start, end pairs) and `nodes` (maps with `ip`,
/// `port` / `tls-port`, `role`, `health`). The shard's primary is its node with role
/// `master`.
fn parse_shards(f: &OwnedFrame, tls: bool) -> Result<Topology, String> {
    let OwnedFrame::Array(shards) = f else {
        return Err("CLUSTER SHARDS: not an array".into());
    };
    let mut t = Topology::default();
    for shard in shards {
        let OwnedFrame::Array(shard) = shard else {
            return Err("CLUSTER SHARDS: a shard is not a map".into());
        };
        let slots = match field(shard, "slots") {
            Some(OwnedFrame::Array(s)) => s
                .chunks(2)
                .map(|p| match p {
                    [a, b] => slot_range(int(a).unwrap_or(-1), int(b).unwrap_or(-1)),
                    _ => Err("odd slots list".into()),
                })
                .collect::<Result<Vec<_>, String>>()?,
            _ => return Err("CLUSTER SHARDS: a shard without slots".into()),
        };
        let Some(OwnedFrame::Array(nodes)) = field(shard, "nodes") else {
            return Err("CLUSTER SHARDS: a shard without nodes".into());
        };
        // After a failover the old primary may still be listed as one, failed: the healthy
        // primary is preferred.
        let primaries: Vec<&Vec<OwnedFrame>> = nodes
            .iter()
            .filter_map(|n| match n {
                OwnedFrame::Array(n)
                    if field(n, "role").and_then(text).as_deref() == Some("master") =>
                {
                    Some(n)
                }
                _ => None,
            })
            .collect();
        let primary = primaries
            .iter()
            .find(|n| field(n, "health").and_then(text).as_deref() == Some("online"))
            .or(primaries.first())
            .copied();
        let Some(primary) = primary else {
            // A shard whose primary is gone and no replica promoted yet: its slots are
            // unowned until it has one.
            continue;
        };
        let addr = node_addr(primary, tls)?;
        let replicas = nodes
            .iter()
            .filter_map(|n| match n {
                // (Redis 7.0 says `loading` for a replica whose replication offset is 0,
                // as in a cluster nothing was written to yet: such a replica serves reads.)
                OwnedFrame::Array(n)
                    if field(n, "role").and_then(text).as_deref() == Some("replica")
                        && matches!(
                            field(n, "health").and_then(text).as_deref(),
                            Some("online" | "loading")
                        ) =>
                {
                    node_addr(n, tls).ok()
                }
                _ => None,
            })
            .collect();
        t.primaries.push(Primary {
            addr,
            slots,
            replicas,
        });
    }
    Ok(t)
}

/// A `CLUSTER SHARDS` node's address (`ip`, and `port` or `tls-port`).
fn node_addr(node: &[OwnedFrame], tls: bool) -> Result<SocketAddr, String> {
    let ip = field(node, "ip")
        .and_then(text)
        .ok_or("CLUSTER SHARDS: a node without ip")?;
    let port = if tls {
        field(node, "tls-port").and_then(int)
    } else {
        field(node, "port").and_then(int)
    }
    .filter(|p| (1..=65535).contains(p))
    .ok_or("CLUSTER SHARDS: a node without a port")?;
    Ok(SocketAddr::new(
        ip.parse()
            .map_err(|_| format!("CLUSTER SHARDS: bad ip '{ip}'"))?,
        port as u16,
    ))
}

/// `CLUSTER SLOTS`: per range, `[start, end, [ip, port, id…], replicas…]`.
fn parse_slots(f: &OwnedFrame) -> Result<Topology, String> {
    let OwnedFrame::Array(ranges) = f else {
        return Err("CLUSTER SLOTS: not an array".into());
    };
    let mut t = Topology::default();
    for r in ranges {
        let OwnedFrame::Array(r) = r else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let (Some(a), Some(b), Some(OwnedFrame::Array(node))) =
            (r.first().and_then(int), r.get(1).and_then(int), r.get(2))
        else {
            return Err("CLUSTER SLOTS: a short range".into());
        };
        let range = slot_range(a, b)?;
        let (Some(ip), Some(port)) = (node.first().and_then(text), node.get(1).and_then(int))
        else {
            return Err("CLUSTER SLOTS: a node without ip and port".into());
        };
        let addr = SocketAddr::new(
            ip.parse()
                .map_err(|_| format!("CLUSTER SLOTS: bad ip '{ip}'"))?,
            u16::try_from(port).map_err(|_| "CLUSTER SLOTS: bad port".to_string())?,
        );
        let replicas = r[3..]
            .iter()
            .filter_map(|n| match n {
                OwnedFrame::Array(n) => Some(SocketAddr::new(
                    n.first().and_then(text)?.parse().ok()?,
                    u16::try_from(n.get(1).and_then(int)?).ok()?,
                )),
                _ => None,
            })
            .collect();
        match t.primaries.iter_mut().find(|p| p.addr == addr) {
            Some(p) => p.slots.push(range),
            None => t.primaries.push(Primary {
                addr,
                slots: vec![range],
                replicas,
            }),
        }
    }
    Ok(t)
}

/// How slotgate reaches the nodes of a cluster, from its settings.
pub fn access(settings: &Settings, cluster: &ClusterSettings) -> Access {
    Access {
        auth: cluster.auth.clone(),
        tls: settings.upstream_tls.clone(),
    }
}

/// Puts `layout` into `settings`: the primaries as shards, every one with the `[upstream]`
/// credentials.
pub fn apply(settings: &mut Settings, cluster: &ClusterSettings, layout: Layout) {
    settings.upstream_auth = vec![cluster.auth.clone(); layout.shards.len()];
    settings.shards = layout.shards;
    settings.slot_map = layout.slot_map;
    settings.replica_of = layout.replica_of;
}

/// At start-up: reads the topology from the seeds (retrying for up to 10 s) into `settings`.
pub async fn start(mut settings: Settings) -> Result<Settings, String> {
    let Some(cluster) = settings.cluster.clone() else {
        return Ok(settings);
    };
    let access = access(&settings, &cluster);
    let give_up = tokio::time::Instant::now() + START_WITHIN;
    let layout = loop {
        match discover(&cluster.seeds, &access, reads_replicas(&cluster), &[]).await {
            Ok(l) => break l,
            Err(e) if tokio::time::Instant::now() >= give_up => {
                return Err(format!(
                    "cannot read the cluster's topology from any seed within {START_WITHIN:?}: {e}"
                ));
            }
            Err(e) => {
                tracing::warn!("cluster: cannot read the topology yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    tracing::info!(
        "cluster: {} primaries: {}",
        layout.shards.len(),
        describe(&layout)
    );
    apply(&mut settings, &cluster, layout);
    Ok(settings)
}

/// Whether reads go to replicas (`read_from` other than `primary`).
fn reads_replicas(cluster: &ClusterSettings) -> bool {
    cluster.read_from != crate::settings::ReadFrom::Primary
}

/// `addr slots, …` for logs.
pub fn describe(layout: &Layout) -> String {
    layout
        .shards
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let r: Vec<String> = layout
                .slot_map
                .ranges(i)
                .iter()
                .map(|(a, b)| format!("{a}-{b}"))
                .collect();
            format!("{a} {}", r.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads the topology again every `refresh_interval`, and every 250 ms while a primary is
/// unreachable (a failover promotes a replica: slotgate follows within 250 ms of the
/// cluster), asking the known primaries first, then the seeds. A changed layout goes
/// to `apply` (the reload task, which publishes it to the workers). Runs for as long as
/// slotgate does.
pub async fn keep_fresh(shared: Arc<Shared>, apply: UnboundedSender<Layout>) {
    let Some(cluster) = shared.settings.cluster.clone() else {
        return;
    };
    let access = access(&shared.settings, &cluster);
    let mut last = tokio::time::Instant::now();
    // The replicas of the last read: a primary that was one of them was promoted. (Read
    // once now: the start-up read kept only the layout.)
    let mut replicas: Vec<SocketAddr> = {
        let running = shared.live();
        let nodes: Vec<String> = running.shards.iter().map(|a| a.to_string()).collect();
        shared
            .cluster_stats
            .refreshes
            .fetch_add(1, Ordering::Relaxed);
        discover(&nodes, &access, false, &running.shards)
            .await
            .map(|l| l.replicas)
            .unwrap_or_default()
    };
    let mut rechecks = 0u8;
    loop {
        // Woken every DOWN_REFRESH (or refresh interval, if shorter) to look whether a read
        // is due by the state of the primaries now, or at once by a redirect (or to read
        // again after a redirect that the last read did not explain).
        let recheck = rechecks > 0;
        let redirected = if recheck {
            rechecks -= 1;
            true
        } else {
            tokio::select! {
                _ = tokio::time::sleep(DOWN_REFRESH.min(cluster.refresh)) => false,
                _ = shared.cluster_changed.notified() => true,
            }
        };
        if redirected {
            tokio::time::sleep_until(last + REDIRECT_REFRESH).await;
        } else {
            let every = if shared.shards_down().is_empty() {
                cluster.refresh
            } else {
                cluster.refresh.min(DOWN_REFRESH)
            };
            if tokio::time::Instant::now() < last + every {
                continue;
            }
        }
        last = tokio::time::Instant::now();
        shared
            .cluster_stats
            .refreshes
            .fetch_add(1, Ordering::Relaxed);
        let running = shared.live();
        let mut nodes: Vec<String> = running.shards.iter().map(|a| a.to_string()).collect();
        nodes.extend(cluster.seeds.iter().cloned());
        let primaries = &running.shards[..running.slot_map.shard_count().min(running.shards.len())];
        let layout = match discover(&nodes, &access, reads_replicas(&cluster), primaries).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cluster: cannot read the topology: {e}");
                // (A redirect still wants its read: tried again shortly.)
                if redirected && !recheck {
                    rechecks = RECHECKS;
                }
                continue;
            }
        };
        let promoted = layout.shards[..layout.slot_map.shard_count()]
            .iter()
            .filter(|p| replicas.contains(p))
            .count();
        if promoted > 0 {
            tracing::warn!("cluster: {promoted} replica(s) promoted to primary (a failover)");
            shared
                .cluster_stats
                .failovers
                .fetch_add(promoted as u64, Ordering::Relaxed);
        }
        replicas = layout.replicas.clone();
        if layout.shards != running.shards
            || layout.slot_map != running.slot_map
            || layout.replica_of != running.replica_of
        {
            tracing::info!("cluster: the topology changed: {}", describe(&layout));
            shared
                .cluster_stats
                .layout_changes
                .fetch_add(1, Ordering::Relaxed);
            if apply.send(layout).is_err() {
                return;
            }
            rechecks = 0;
        } else if redirected && !recheck {
            rechecks = RECHECKS;
        }
    }
}

/// Sends the requests this worker's connections got redirects for where they go, for as
/// long as the worker runs (cluster mode).
pub async fn redirector(w: std::rc::Rc<Worker>) {
    loop {
        let (redirected, doubt) = crate::shard::next_redirects().await;
        if doubt {
            w.shared.cluster_changed.notify_one();
        }
        for r in redirected {
            redirect(&w, r);
        }
    }
}

/// Where a redirected request goes next (see [`next_hop`]).
pub enum Hop {
    /// Sent again to `to`, behind `ASKING` when `asking`, after `wait`.
    Again {
        to: SocketAddr,
        asking: bool,
        wait: Duration,
        /// A MOVED or ASK: one more redirect (a TRYAGAIN is not).
        counted: bool,
    },
    /// Sent again to the node slotgate knows by one of this host name's addresses (see
    /// [`lookup`]), behind `ASKING` when `asking`; one more redirect.
    Lookup { host: String, asking: bool },
    /// Not sent again: this is its reply.
    Answer(Bytes),
}

/// What to do with a request that `from` answered with the redirect `reply`, after `hops`
/// redirects so far, going behind `ASKING` when `asking`, failing at `deadline`; counts the
/// redirect, and a MOVED makes slotgate read the layout again. Shared connections
/// ([`redirector`]) and dedicated ones (`session::follow`) decide alike.
pub fn next_hop(
    w: &Worker,
    reply: &Bytes,
    from: SocketAddr,
    hops: u8,
    asking: bool,
    deadline: tokio::time::Instant,
) -> Hop {
    let text = String::from_utf8_lossy(&reply[1..]).trim_end().to_string();
    let mut words = text.split(' ');
    let kind = words.next().unwrap_or("");
    let stats = &w.shared.cluster_stats;
    match kind {
        "MOVED" => {
            stats.moved.fetch_add(1, Ordering::Relaxed);
            // (Before anything else: the layout is read again even if this one fails.)
            w.shared.cluster_changed.notify_one();
        }
        "ASK" => {
            stats.ask.fetch_add(1, Ordering::Relaxed);
        }
        "CLUSTERDOWN" => {
            stats.clusterdown.fetch_add(1, Ordering::Relaxed);
            // (A failed primary, most likely: the layout is read again.)
            w.shared.cluster_changed.notify_one();
        }
        _ => {
            stats.tryagain.fetch_add(1, Ordering::Relaxed);
        }
    }
    let now = tokio::time::Instant::now();
    if now >= deadline {
        // Its client is told it timed out (or already was): never run it later.
        return Hop::Answer(crate::resp::reply::shard_unavailable(
            &from.to_string(),
            &format!("redirected ({text}) past the request's deadline"),
        ));
    }
    if kind == "CLUSTERDOWN" {
        // The cluster refuses every request for a moment when a primary fails (until a
        // replica is promoted: `cluster-require-full-coverage`), and a slot may have no
        // primary: sent again to the same node every 50 ms until the request's deadline.
        // (The last try leaves time for its answer: one that arrives after the deadline
        // would leave its client told "outcome unknown".)
        if now + 4 * CLUSTERDOWN_WAIT >= deadline {
            return Hop::Answer(crate::resp::reply::shard_unavailable(
                &from.to_string(),
                &format!("the cluster was down until the request's deadline ({text})"),
            ));
        }
        return Hop::Again {
            to: from,
            asking,
            wait: CLUSTERDOWN_WAIT,
            counted: false,
        };
    }
    if kind == "TRYAGAIN" {
        // The slot is being migrated: sent again (to the same node, with ASKING if it went
        // with it) every 20 ms until the request's deadline (a migration takes as long as its
        // keys do), not counted as a hop.
        if now + TRYAGAIN_WAIT >= deadline {
            return Hop::Answer(crate::resp::reply::shard_unavailable(
                &from.to_string(),
                "its slot was being migrated until the request's deadline (TRYAGAIN)",
            ));
        }
        return Hop::Again {
            to: from,
            asking,
            wait: TRYAGAIN_WAIT,
            counted: false,
        };
    }
    if hops >= MAX_HOPS {
        return Hop::Answer(crate::resp::reply::too_many_redirects(&text));
    }
    let (kind_ok, target) = (matches!(kind, "MOVED" | "ASK"), words.nth(1));
    let Some(target) = target.filter(|_| kind_ok) else {
        return Hop::Answer(reply.clone());
    };
    let asking = kind == "ASK";
    let Some(to) = redirect_addr(target) else {
        // A host name (`cluster-preferred-endpoint-type hostname`).
        return Hop::Lookup {
            host: target.to_string(),
            asking,
        };
    };
    let wait = if w.pools().shard_index(to).is_some() {
        Duration::ZERO
    } else {
        // A node slotgate has no connection to yet: it joined; the next layout has it.
        w.shared.cluster_changed.notify_one();
        NEW_NODE_WAIT
    };
    Hop::Again {
        to,
        asking,
        wait,
        counted: true,
    }
}

/// The address of `host` to send a redirected request to: the one slotgate knows the node
/// by, else the first; `Err` with the request's reply when the name does not resolve.
pub async fn lookup(w: &Worker, host: &str) -> Result<SocketAddr, Bytes> {
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(host).await {
        Ok(a) => a.collect(),
        Err(_) => Vec::new(),
    };
    let known = {
        let pools = w.pools();
        addrs
            .iter()
            .copied()
            .find(|a| pools.shard_index(*a).is_some())
    };
    known.or(addrs.first().copied()).ok_or_else(|| {
        crate::resp::reply::too_many_redirects(&format!("to {host}, a name that does not resolve"))
    })
}

/// One redirected request on a shared connection: sent again, or answered with an error.
fn redirect(w: &std::rc::Rc<Worker>, r: Redirected) {
    let (hops, asking) = (r.retry.hops(), r.retry.is_asking());
    match next_hop(w, &r.reply, r.from, hops, asking, r.deadline) {
        Hop::Answer(reply) => r.target.deliver(reply),
        Hop::Again {
            to,
            asking,
            wait,
            counted,
        } => {
            let again = if counted {
                Redirected {
                    retry: r.retry.hop().asking(asking),
                    ..r
                }
            } else {
                r
            };
            if wait.is_zero() {
                return resend(w, to, again);
            }
            let w = w.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(wait).await;
                resend(&w, to, again);
            });
        }
        Hop::Lookup { host, asking } => {
            let again = Redirected {
                retry: r.retry.hop().asking(asking),
                ..r
            };
            let w = w.clone();
            tokio::task::spawn_local(async move {
                match lookup(&w, &host).await {
                    Ok(to) => resend(&w, to, again),
                    Err(reply) => again.target.deliver(reply),
                }
            });
        }
    }
}

/// The address of a redirect: `ip:port`, where an IPv6 `ip` has no brackets
/// (`MOVED 15495 ::1:7410`).
pub fn redirect_addr(a: &str) -> Option<SocketAddr> {
    let (ip, port) = a.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

/// Sends a request (again) to `to`: behind `ASKING` when an ASK sent it there. A node
/// slotgate has no connection to yet is waited for (a hop each time).
fn resend(w: &std::rc::Rc<Worker>, to: SocketAddr, r: Redirected) {
    match w.pools().shard_index(to) {
        Some(i) => {
            let up = w.pools().get(r.proto, i, 0);
            if r.retry.is_asking() {
                up.send_until(b"*1\r\n$6\r\nASKING\r\n", Target::Discard, r.deadline);
            }
            up.send_retryable(r.retry, r.target, r.deadline);
        }
        None if r.retry.hops() < MAX_HOPS && tokio::time::Instant::now() < r.deadline => {
            let again = Redirected {
                retry: r.retry.hop(),
                ..r
            };
            let w = w.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(NEW_NODE_WAIT).await;
                resend(&w, to, again);
            });
        }
        None => r
            .target
            .deliver(crate::resp::reply::too_many_redirects(&format!(
                "to {to}, a node slotgate has no connection to"
            ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    fn node(ip: &str, port: i64, role: &str) -> OwnedFrame {
        node_with(ip, port, role, "online")
    }

    fn node_with(ip: &str, port: i64, role: &str, health: &str) -> OwnedFrame {
        OwnedFrame::Array(vec![
            bulk("id"),
            bulk("abc"),
            bulk("port"),
            OwnedFrame::Integer(port),
            bulk("ip"),
            bulk(ip),
            bulk("endpoint"),
            bulk(ip),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            OwnedFrame::Integer(0),
            bulk("health"),
            bulk(health),
        ])
    }

    #[test]
    fn cluster_shards_gives_each_shards_primary_and_slots() {
        let shards = OwnedFrame::Array(vec![
            OwnedFrame::Array(vec![
                bulk("slots"),
                OwnedFrame::Array(vec![OwnedFrame::Integer(0), OwnedFrame::Integer(8191)]),
                bulk("nodes"),
                OwnedFrame::Array(vec![
                    node("127.0.0.1", 7002, "replica"),
                    node("127.0.0.1", 7001, "master"),
                ]),
            ]),
            OwnedFrame::Array(vec![
                bulk("slots"),
                OwnedFrame::Array(
                    [8192, 10000, 10002, 16383]
                        .iter()
                        .map(|&s| OwnedFrame::Integer(s))
                        .collect(),
                ),
                bulk("nodes"),
                // Just after a failover: the old primary is still listed, failed.
                OwnedFrame::Array(vec![
                    node_with("127.0.0.1", 7005, "master", "failed"),
                    node("127.0.0.1", 7003, "master"),
                ]),
            ]),
            // A shard whose primary failed with no replica promoted yet: no owner.
            OwnedFrame::Array(vec![
                bulk("slots"),
                OwnedFrame::Array(vec![]),
                bulk("nodes"),
                OwnedFrame::Array(vec![node("127.0.0.1", 7004, "replica")]),
            ]),
        ]);
        let t = parse_shards(&shards, false).unwrap();
        assert_eq!(
            t.primaries,
            [
                Primary {
                    addr: "127.0.0.1:7001".parse().unwrap(),
                    slots: vec![(0, 8191)],
                    replicas: vec!["127.0.0.1:7002".parse().unwrap()],
                },
                Primary {
                    addr: "127.0.0.1:7003".parse().unwrap(),
                    slots: vec![(8192, 10000), (10002, 16383)],
                    replicas: vec![],
                }
            ]
        );
        // Slot 10001 has no primary: it goes to the first shard.
        let l = t.layout(false, &[]).unwrap();
        assert_eq!(l.shards.len(), 2);
        assert!(l.replica_of.is_empty());
        // Reads from replicas: the replicas come after the primaries.
        let r = t.layout(true, &[]).unwrap();
        assert_eq!(r.shards[2], "127.0.0.1:7002".parse().unwrap());
        assert_eq!(r.replica_of, [Some(2), None]);
        assert_eq!(r.slot_map.shard_count(), 2);
        assert_eq!(l.slot_map.shard_of_slot(10001), 0);
        assert_eq!(l.slot_map.shard_of_slot(10002), 1);
        assert!(parse_shards(&OwnedFrame::Integer(1), false).is_err());
    }

    #[test]
    fn cluster_slots_groups_ranges_by_primary() {
        let range = |a: i64, b: i64, port: i64| {
            OwnedFrame::Array(vec![
                OwnedFrame::Integer(a),
                OwnedFrame::Integer(b),
                OwnedFrame::Array(vec![
                    bulk("127.0.0.1"),
                    OwnedFrame::Integer(port),
                    bulk("id"),
                ]),
                OwnedFrame::Array(vec![bulk("127.0.0.1"), OwnedFrame::Integer(port + 10)]),
            ])
        };
        let slots = OwnedFrame::Array(vec![
            range(0, 99, 7001),
            range(100, 16000, 7002),
            range(16001, 16383, 7001),
        ]);
        let t = parse_slots(&slots).unwrap();
        assert_eq!(t.primaries.len(), 2);
        assert_eq!(t.primaries[0].slots, [(0, 99), (16001, 16383)]);
        assert_eq!(t.primaries[0].replicas, ["127.0.0.1:7011".parse().unwrap()]);
        let l = t.layout(false, &[]).unwrap();
        assert_eq!(l.slot_map.shard_of_slot(16383), 0);
        assert_eq!(l.slot_map.shard_of_slot(100), 1);
        assert!(parse_slots(&OwnedFrame::Array(vec![range(5, 3, 7001)])).is_err());
        assert!(Topology::default().layout(false, &[]).is_err());
    }

    #[test]
    fn known_primaries_keep_their_place_and_empty_ones_are_connected() {
        let p = |port: u16, slots: Vec<(usize, usize)>| Primary {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            slots,
            replicas: vec![],
        };
        // 7002 took slot 0 from 7001 in a reshard; 7009 joined without slots yet.
        let t = Topology {
            primaries: vec![
                p(7009, vec![]),
                p(7002, vec![(0, 0), (8192, 16383)]),
                p(7001, vec![(1, 8191)]),
            ],
        };
        let previous = [7001, 7002].map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let l = t.layout(false, &previous).unwrap();
        let ports: Vec<u16> = l.shards.iter().map(|a| a.port()).collect();
        assert_eq!(
            ports,
            [7001, 7002, 7009],
            "a SCAN cursor's shard stays the same"
        );
        assert_eq!(l.slot_map.shard_of_slot(0), 1);
        assert!(l.slot_map.ranges(2).is_empty());
        assert_eq!(
            l.slot_map.shard_count(),
            2,
            "commands for every shard ask only the primaries with slots"
        );
        assert_eq!(
            redirect_addr("::1:7410"),
            Some("[::1]:7410".parse().unwrap()),
            "IPv6 without brackets, as Redis writes it"
        );
        assert_eq!(redirect_addr("127.0.0.1:7001"), Some(previous[0]));
        assert_eq!(redirect_addr("localhost:7001"), None);
    }
}
