//! A real Redis Cluster on loopback for the tests: `redis-server --cluster-enabled yes`
//! nodes joined with `redis-cli --cluster create`.

#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{RedisServer, run_bounded, wait_until};

/// Cluster nodes; killed on drop.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

static CONFIG_FILES: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// `primaries` primaries, each with `replicas` replicas, every slot assigned, and every
    /// node agreeing that the cluster is up.
    pub fn start(primaries: usize, replicas: usize) -> Cluster {
        Self::start_with(primaries, replicas, &[])
    }

    /// [`start`](Self::start), with more `redis-server` arguments for every node.
    pub fn start_with(primaries: usize, replicas: usize, extra: &[&str]) -> Cluster {
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| Self::node_server(extra))
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        cmd.args(nodes.iter().map(|n| n.addr()));
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        match run_bounded(&mut cmd, Duration::from_secs(60)) {
            Ok(f) if f.code == Some(0) => {}
            Ok(f) | Err(f) => panic!(
                "redis-cli --cluster create failed (exit {:?}): {}{}",
                f.code, f.stdout, f.stderr
            ),
        }
        let c = Cluster { nodes };
        wait_until("the cluster to be up", Duration::from_secs(30), || {
            c.nodes.iter().all(|n| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.client())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
        c
    }

    /// Starts one more node and adds it to the cluster as a primary without slots
    /// (`redis-cli --cluster add-node`); its port, once every node knows it.
    pub fn add_primary(&mut self) -> u16 {
        let node = Self::node_server(&[]);
        let port = node.port;
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--cluster", "add-node", &node.addr(), &self.nodes[0].addr()]);
        match run_bounded(&mut cmd, Duration::from_secs(60)) {
            Ok(f) if f.code == Some(0) => {}
            Ok(f) | Err(f) => panic!(
                "redis-cli --cluster add-node failed (exit {:?}): {}{}",
                f.code, f.stdout, f.stderr
            ),
        }
        self.nodes.push(node);
        let n = self.nodes.len();
        wait_until(
            "every node to know the new one",
            Duration::from_secs(30),
            || {
                self.nodes.iter().all(|node| {
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query(&mut node.client())
                        .unwrap_or_default();
                    nodes.lines().filter(|l| !l.contains("handshake")).count() == n
                })
            },
        );
        // (Until it has learnt every slot's owner, it answers CLUSTERDOWN, also to MIGRATE.)
        wait_until(
            "the new node to see the cluster up",
            Duration::from_secs(30),
            || {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut self.node(port).client())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            },
        );
        port
    }

    /// A `redis-server` ready to join a cluster, with `extra` arguments.
    fn node_server(extra: &[&str]) -> RedisServer {
        // A config file of its own (a stale one from an earlier run would rejoin an old
        // cluster).
        let n = CONFIG_FILES.fetch_add(1, Ordering::Relaxed);
        let file = format!("nodes-{}-{n}.conf", std::process::id());
        // (A replica writes the data set it syncs: not where a later server of the same port
        // would load it.)
        let rdb = format!("sync-{}-{n}.rdb", std::process::id());
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &file,
            "--dbfilename",
            &rdb,
            "--cluster-node-timeout",
            "2000",
            // DEBUG SLEEP makes a node busy on purpose.
            "--enable-debug-command",
            "yes",
        ];
        args.extend_from_slice(extra);
        RedisServer::start_with(&args)
    }

    /// Waits until every primary has a connected replica that the cluster sees as up (gossip
    /// takes a few seconds after `--cluster create`).
    pub fn wait_for_replicas(&self, replicas: usize) {
        wait_until("the replicas to be up", Duration::from_secs(30), || {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut self.nodes[0].client())
                .unwrap_or_default();
            let up = nodes
                .lines()
                .filter(|l| l.contains("slave") && !l.contains("fail") && l.contains("connected"))
                .count();
            up == replicas
                && self.nodes.iter().all(|n| {
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query(&mut n.client())
                        .unwrap_or_default();
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
        });
    }

    /// A command's calls on the node on `port` (its INFO commandstats).
    pub fn calls(&self, port: u16, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.node(port).client())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|r| r.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The port of a node other than the one on `port`.
    pub fn another_node(&self, port: u16) -> u16 {
        self.nodes
            .iter()
            .map(|n| n.port)
            .find(|&p| p != port)
            .expect("a cluster of two nodes or more")
    }

    /// The node listening on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of the cluster")
    }

    /// The port of the primary serving each slot, as node 0 sees it.
    pub fn owners(&self) -> Vec<u16> {
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.nodes[0].client())
            .unwrap();
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        let mut owners = vec![0u16; 16384];
        for r in ranges {
            let redis::Value::Array(r) = r else { continue };
            let (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(node)) =
                (&r[0], &r[1], &r[2])
            else {
                panic!("CLUSTER SLOTS range: {r:?}")
            };
            let redis::Value::Int(port) = node[1] else {
                panic!("CLUSTER SLOTS node: {node:?}")
            };
            for s in *a..=*b {
                owners[s as usize] = port as u16;
            }
        }
        owners
    }

    /// Moves `slot` and its keys from the node on `from` to the node on `to` by hand, as
    /// `redis-cli --cluster reshard` does for each slot.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        self.begin_migration(slot, from, to);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut self.node(from).client())
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut self.node(from).client())
                .unwrap();
        }
        self.end_migration(slot, to);
    }

    /// Marks `slot` as migrating from the node on `from` to the node on `to` (its keys stay
    /// where they are until [`migrate_key`](Self::migrate_key)).
    pub fn begin_migration(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        self.setslot(to, slot, &["IMPORTING", &from_id]);
        self.setslot(from, slot, &["MIGRATING", &to_id]);
    }

    /// Moves one key of a migrating slot from the node on `from` to the node on `to`.
    pub fn migrate_key(&self, from: u16, to: u16, key: &str) {
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg(key)
            .arg(0)
            .arg(5000)
            .query(&mut self.node(from).client())
            .unwrap();
    }

    /// Gives `slot` to the node on `to`, on every node.
    pub fn end_migration(&self, slot: u16, to: u16) {
        let to_id = self.id_of(to);
        for n in &self.nodes {
            self.setslot(n.port, slot, &["NODE", &to_id]);
        }
    }

    fn setslot(&self, port: u16, slot: u16, args: &[&str]) {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(&mut self.node(port).client())
            .unwrap();
    }

    /// The node id of the node on `port`.
    pub fn id_of(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port).client())
            .unwrap()
    }
}
