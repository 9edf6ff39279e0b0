//! What an operator relies on around the data path: the listen backlog (issue 14.11).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::*;

/// Connections the kernel completes for a listener whose process is stopped (so nothing is
/// accepted), up to `most`: the accept queue's length plus one.
fn connections_queued_while_stopped(proxy: &Slotgate, most: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let mut queued = Vec::new();
    proxy.signal("STOP");
    while queued.len() < most {
        // Beyond the queue the kernel drops the SYN: the connect does not complete.
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
    }
    proxy.signal("CONT");
    queued
}

#[test]
fn the_accept_queue_is_tcp_backlog_long() {
    let shard = RedisServer::start();
    let proxy = Slotgate::start_with(&[&shard], &["--tcp-backlog", "20"]);
    let queued = connections_queued_while_stopped(&proxy, 100);
    assert_eq!(queued.len(), 21, "a backlog of 20 queues 21 connections");
    drop(queued);

    // The default is Redis's 511.
    let proxy = Slotgate::start_with(&[&shard], &[]);
    let queued = connections_queued_while_stopped(&proxy, 400);
    assert_eq!(queued.len(), 400, "the default backlog queues 400 connections");
    // Once running again, slotgate serves them all.
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
}
