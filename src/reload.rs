//! Hot reload of the configuration, on SIGHUP and on `SLOTGATE.RELOAD`.
//!
//! A reload reads `proxy.toml` again and applies the original command-line flags on top, as
//! at start-up; an invalid result is logged (and SLOTGATE.RELOAD answers why) and the running
//! configuration stays. A valid one is published to the workers, each of which acknowledges
//! it before the reload is reported done; sessions take it up at their next turn (see
//! `session::Session::reloaded`). Existing clients stay connected.
//!
//! What a reload changes: users, passwords and permissions; read-through rules (their
//! counters go on); the client limits (`maxclients`, `max_client_pipeline`, the output buffer
//! limits, `proto_max_bulk_len`, `client_query_buffer_limit`, `max_auth_failures`,
//! `max_auth_failures_per_address`, `idle_timeout`); `shutdown_timeout`; the log level; and
//! the shard layout (shards and slot ranges): new requests route by the new map, connections
//! to shards that stay are kept, new shards are connected (with their credentials from the
//! new file), and connections to removed shards drain — what is in flight on them is
//! answered — then close (see `worker::Worker::refresh`); clients with subscriptions, a
//! transaction or a blocking command in progress are closed so that they start over. What needs a restart (a change is logged and
//! ignored): the listeners, TLS settings, workers, and the upstream connections' settings
//! (TLS, `op_timeout`, in-flight limits, `upstream_connections`, `max_dedicated_per_shard`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::server::Incoming;
use crate::settings::Settings;
use crate::worker::{ReloadRequest, Shared};

/// Reads the file again and applies the original command-line flags on top.
pub type ReadConfig = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;
/// Installs a new log filter (`log_level`).
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How a reload reads the configuration and applies the log level.
pub struct Reloader {
    pub read: ReadConfig,
    pub log_filter: SetLogFilter,
}

/// Reloads on SIGHUP and on SLOTGATE.RELOAD, one at a time, for as long as the process runs.
/// `hup` is the SIGHUP listener, installed by the caller as early as it can: from then on a
/// SIGHUP never ends the process.
/// New cluster layouts (`cluster::keep_fresh`) are applied here too, one at a time with
/// reloads.
pub async fn serve(
    shared: Arc<Shared>,
    reloader: Reloader,
    workers: Vec<mpsc::UnboundedSender<Incoming>>,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut layouts: mpsc::UnboundedReceiver<crate::cluster::Layout>,
) {
    let (tx, mut requests) = mpsc::unbounded_channel::<ReloadRequest>();
    let _ = shared.reloads.set(tx);
    loop {
        let (why, answer) = tokio::select! {
            Some(()) = async { hup.as_mut()?.recv().await } => ("SIGHUP", None),
            Some(answer) = requests.recv() => ("SLOTGATE.RELOAD", Some(answer)),
            Some(layout) = layouts.recv() => {
                new_layout(&shared, &workers, layout).await;
                continue;
            }
        };
        let outcome = reload(&shared, &reloader, &workers).await;
        match &outcome {
            Ok(summary) => tracing::info!("configuration reloaded ({why}): {summary}"),
            Err(e) => tracing::error!(
                "configuration reload failed ({why}), the running configuration stays: {e}"
            ),
        }
        if let Some(answer) = answer {
            let _ = answer.send(outcome);
        }
    }
}

/// Cluster mode: the running settings with the cluster's new layout, published like a
/// reload's new `[[shards]]` layout.
async fn new_layout(
    shared: &Shared,
    workers: &[mpsc::UnboundedSender<Incoming>],
    layout: crate::cluster::Layout,
) {
    let running = shared.live();
    let Some(cluster) = running.cluster.clone() else {
        return;
    };
    let mut new = (*running).clone();
    crate::cluster::apply(&mut new, &cluster, layout);
    publish(shared, workers, new).await;
    // (Unlike a static relayout, no client is closed: every node it used is still a node of
    // the cluster, or drains.)
}

/// Publishes `new` and waits (up to a second each) for the workers to take it up.
async fn publish(shared: &Shared, workers: &[mpsc::UnboundedSender<Incoming>], new: Settings) {
    shared.publish(new);
    let mut acks = Vec::with_capacity(workers.len());
    for w in workers {
        let (ack, done) = oneshot::channel();
        if w.send(Incoming::Reload(ack)).is_ok() {
            acks.push(done);
        }
    }
    for done in acks {
        // A worker slower than this takes the settings up when it gets to the message.
        let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
    }
}

/// One reload: read, validate, publish, wait for every worker to take it up.
async fn reload(
    shared: &Shared,
    reloader: &Reloader,
    workers: &[mpsc::UnboundedSender<Incoming>],
) -> Result<String, String> {
    let mut new = (reloader.read)()?;
    let running = shared.live();
    if running.cluster.is_some() || new.cluster.is_some() {
        // In cluster mode the layout is the cluster's (`cluster::keep_fresh`), not the
        // file's; and a switch between static and cluster mode needs a restart.
        new.shards = running.shards.clone();
        new.slot_map = running.slot_map.clone();
        new.upstream_auth = running.upstream_auth.clone();
    }
    let needs_restart = keep_fixed(&shared.settings, &mut new);
    if let Some(rules) = Arc::get_mut(&mut new.readthrough) {
        rules.keep_counters_of(&running.readthrough);
    }
    new.tokens.keep_keys_of(&running.tokens);
    // Keys of a new jwks_url are there before the new issuers are.
    new.tokens.start().await;
    if new.log_level != running.log_level {
        (reloader.log_filter)(&new.log_level)?;
    }
    let summary = changes(&running, &new);
    let relayout = running.shards != new.shards || running.slot_map != new.slot_map;
    publish(shared, workers, new).await;
    close_clients(shared, relayout);
    for what in &needs_restart {
        tracing::warn!("reload: `{what}` changed; it takes effect at the next restart");
    }
    Ok(summary)
}

/// Closes the clients whose user a reload removed, as Redis does for a deleted ACL user (the
/// sessions also check at their next command), and, after a new shard layout, the clients
/// with subscriptions: their subscriber connections may be on a shard that no longer hears
/// the publishes, so they reconnect and subscribe again (as after a lost subscriber
/// connection).
fn close_clients(shared: &Shared, relayout: bool) {
    let users = shared.live().users.clone();
    let Ok(clients) = shared.clients.lock() else {
        return;
    };
    for c in clients.values() {
        if users.get(c.user.as_bytes()).is_none() || (relayout && c.subscribed) {
            c.kill.notify_one();
        }
    }
}

/// Puts back into `new` what only a restart can change, and names what differed.
fn keep_fixed(running: &Settings, new: &mut Settings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if format!("{:?}", running.$field) != format!("{:?}", new.$field) {
                changed.push(stringify!($field));
            }
            new.$field = running.$field.clone();
        )*};
    }
    keep!(
        listen,
        tls,
        workers,
        tcp_backlog,
        admin_listen,
        cluster_api,
        upstream_connections,
        op_timeout,
        max_inflight_per_connection,
        max_inflight_bytes_per_connection,
        max_dedicated_per_shard,
        tracking_table_max_keys,
        hotkeys_sample,
        io,
        upstream_tls,
        cluster
    );
    changed
}

/// What a reload changes, for the log line and SLOTGATE.RELOAD's reply.
fn changes(running: &Settings, new: &Settings) -> String {
    let mut what = Vec::new();
    if format!("{:?}", running.users) != format!("{:?}", new.users) {
        what.push("users");
    }
    if running.admin_token != new.admin_token {
        what.push("admin token");
    }
    if format!("{:?}", running.tokens) != format!("{:?}", new.tokens) {
        what.push("token issuers");
    }
    let rules = |s: &Settings| {
        s.readthrough
            .iter()
            .map(|r| {
                format!(
                    "{:?}",
                    (&r.name, &r.prefix, &r.template, &r.origin, r.ttl, r.timeout)
                ) + &format!(
                    "{:?}",
                    (
                        r.lease,
                        r.refresh_below,
                        &r.batch,
                        r.guard.limit.as_ref().map(|l| l.0),
                        r.guard.breaker.as_ref().map(|b| (b.threshold, b.cooldown)),
                        r.grace,
                        r.negative_ttl,
                        r.max_body,
                        r.honor_max_age
                    )
                )
            })
            .collect::<Vec<_>>()
    };
    if rules(running) != rules(new) {
        what.push("read-through rules");
    }
    let limits = |s: &Settings| {
        format!(
            "{:?}",
            (
                s.maxclients,
                s.max_client_pipeline,
                s.obuf_normal,
                s.obuf_pubsub,
                s.proto_max_bulk_len,
                s.client_query_buffer_limit,
                s.max_auth_failures,
                s.max_auth_failures_per_address,
                s.idle_timeout,
                s.shutdown_timeout,
                s.slowlog_log_slower_than,
                s.slowlog_max_len,
            )
        )
    };
    if limits(running) != limits(new) {
        what.push("limits");
    }
    if running.log_level != new.log_level {
        what.push("log level");
    }
    if running.shards != new.shards || running.slot_map != new.slot_map {
        what.push("shard layout");
    }
    if what.is_empty() {
        "nothing changed".into()
    } else {
        format!("changed: {}", what.join(", "))
    }
}
