//! The seed workflow with an unmodified redis-py client (tests/python/seed_workflow.py):
//! async cache-aside with TTL, a transactional pipeline, pub/sub and a lock, through slotgate
//! in front of three real shards. redis-py comes from PyPI (`scripts/test.sh` installs it).

mod support;

use std::process::Command;

use support::*;

#[test]
fn redis_py_seed_workflow() {
    let has_redis_py = Command::new("python3")
        .args(["-c", "import redis, redis.asyncio"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_redis_py,
        "python3 with redis-py is required: python3 -m pip install redis (scripts/test.sh does it)"
    );
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start_with(&refs, &["--workers", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/seed_workflow.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(proxy.port.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("seed workflow OK"), "{text}");
}
