//! Slot parity: every key lands on the shard whose slot range contains the slot that a real
//! Redis Cluster node computes for it (`CLUSTER KEYSLOT`), for random binary/ASCII keys,
//! hashtags and brace edge cases, with even and explicit (uneven) layouts.

mod support;

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::Value;
use support::*;

const SLOTS: u32 = 16384;
const CHUNK: usize = 1000;

fn local_slot(key: &[u8]) -> u16 {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return crc16(&key[open + 1..open + 1 + len]) % SLOTS as u16;
    }
    crc16(key) % SLOTS as u16
}

fn show(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

/// Brace edge cases from the contract plus a few more.
fn edge_case_keys() -> Vec<Vec<u8>> {
    [
        "{}",
        "{{a}}",
        "a{}{b}",
        "{a}b",
        "a{b",
        "a}b{c}",
        "{}a",
        "a{}",
        "{}{}",
        "{",
        "}",
        "}{",
        "{{",
        "}}",
        "{}}",
        "{{}",
        "{{}}",
        "{a",
        "a}",
        "{a}",
        "{a}{b}",
        "{b}{a}",
        "x{a}y{b}z",
        "{ }",
        "{\t}",
        "{\r\n}",
        "a{b}}",
        "a{{b}",
        "{a}}{",
        "}{a}",
        "}a{b}",
        "{{}}a",
        "{}{a}",
        "{a}{}",
        "{ab}",
        "{ab}x",
        "y{ab}",
        "foo{bar}baz",
        "foo",
        "bar",
        "a",
        "b",
        "c",
        "123456789",
        "{123456789}",
        "user:{1000}:name",
        "user:{1000}:mail",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        b"{\x00}".to_vec(),
        b"\x00".to_vec(),
        b"\xff{\xfe}\xfd".to_vec(),
        b"{\xff\xff}".to_vec(),
        b"\r\n".to_vec(),
        b"a b c".to_vec(),
    ])
    .fold(Vec::new(), |mut acc: Vec<Vec<u8>>, k| {
        if !acc.contains(&k) {
            acc.push(k);
        }
        acc
    })
}

/// `n` random, distinct keys of several shapes.
fn random_keys(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
    let printable: Vec<u8> = (0x20u8..0x7f).collect();
    let braces = b"{}ab{}x}{";
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let kind = rng.random_range(0..6);
        let key: Vec<u8> = match kind {
            // arbitrary bytes, including CR, LF, NUL, braces, high bytes
            0 => {
                let len = rng.random_range(1..40);
                (0..len).map(|_| rng.random::<u8>()).collect()
            }
            // printable ASCII (contains braces now and then)
            1 => {
                let len = rng.random_range(1..30);
                (0..len)
                    .map(|_| printable[rng.random_range(0..printable.len())])
                    .collect()
            }
            // prefix{tag}suffix with a non-empty tag
            2 => {
                let mut k = Vec::new();
                for _ in 0..rng.random_range(0..6) {
                    k.push(rng.random_range(b'a'..=b'z'));
                }
                k.push(b'{');
                for _ in 0..rng.random_range(1..8) {
                    k.push(rng.random_range(b'0'..=b'z'));
                }
                k.push(b'}');
                for _ in 0..rng.random_range(0..6) {
                    k.push(rng.random_range(b'a'..=b'z'));
                }
                k
            }
            // dense brace soup: many odd combinations
            3 => {
                let len = rng.random_range(1..12);
                (0..len)
                    .map(|_| braces[rng.random_range(0..braces.len())])
                    .collect()
            }
            // shared hashtags: many keys with the same slot
            4 => format!(
                "{{tag{}}}:field:{}",
                rng.random_range(0..20),
                rng.random_range(0..1_000_000)
            )
            .into_bytes(),
            // empty-ish / whitespace tags
            _ => {
                let tags: [&[u8]; 5] = [b"{}", b"{ }", b"{\x00}", b"{}}", b"{{}"];
                let mut k = format!("e{}", rng.random_range(0..1_000_000)).into_bytes();
                let t = tags[rng.random_range(0..tags.len())];
                if rng.random_bool(0.5) {
                    let mut v = t.to_vec();
                    v.extend_from_slice(&k);
                    k = v;
                } else {
                    k.extend_from_slice(t);
                }
                k
            }
        };
        if seen.insert(key.clone()) {
            out.push(key);
        }
    }
    out
}

/// Up to `per_slot` keys for each slot in `slots`, found by brute force with the local CRC16.
fn keys_for_slots(slots: &[u16], per_slot: usize) -> Vec<Vec<u8>> {
    let wanted: HashSet<u16> = slots.iter().copied().collect();
    let mut found: HashMap<u16, Vec<Vec<u8>>> = HashMap::new();
    let mut complete = 0;
    for n in 0u64..50_000_000 {
        let k = format!("slot-probe:{n}").into_bytes();
        let s = local_slot(&k);
        if wanted.contains(&s) {
            let v = found.entry(s).or_default();
            if v.len() < per_slot {
                v.push(k);
                if v.len() == per_slot {
                    complete += 1;
                    if complete == wanted.len() {
                        break;
                    }
                }
            }
        }
    }
    found.into_values().flatten().collect()
}

/// `CLUSTER KEYSLOT` of every key, asked of a real cluster-enabled redis-server, pipelined.
fn reference_slots(cluster_node: &RedisServer, keys: &[Vec<u8>]) -> Vec<u16> {
    let mut con = cluster_node.client();
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("CLUSTER").arg("KEYSLOT").arg(k.as_slice());
        }
        let slots: Vec<i64> = p.query(&mut con).expect("CLUSTER KEYSLOT pipeline");
        out.extend(slots.into_iter().map(|s| {
            assert!((0..SLOTS as i64).contains(&s), "bad CLUSTER KEYSLOT {s}");
            s as u16
        }));
    }
    // Self-check of this test's own helper (used to pick keys for given slots).
    for (k, s) in keys.iter().zip(&out) {
        assert_eq!(
            local_slot(k),
            *s,
            "test helper CRC16 disagrees with CLUSTER KEYSLOT for key {}",
            show(k)
        );
    }
    out
}

/// Slot ranges of an even split into `n` shards, as the contract defines it.
fn even_split(n: u32) -> Vec<Vec<(u16, u16)>> {
    (0..n)
        .map(|i| vec![((i * SLOTS / n) as u16, ((i + 1) * SLOTS / n - 1) as u16)])
        .collect()
}

fn owner_of(layout: &[Vec<(u16, u16)>], slot: u16) -> usize {
    let owners: Vec<usize> = layout
        .iter()
        .enumerate()
        .filter(|(_, ranges)| ranges.iter().any(|&(a, b)| a <= slot && slot <= b))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(owners.len(), 1, "test layout bug for slot {slot}");
    owners[0]
}

/// SETs every key through slotgate (pipelined), then checks directly on every shard that the
/// key exists on exactly the owner of its reference slot, with its own value.
fn assert_keys_land_on_owners(
    shards: &[&RedisServer],
    proxy: &Slotgate,
    layout: &[Vec<(u16, u16)>],
    keys: &[Vec<u8>],
    slots: &[u16],
) {
    let mut con = proxy.client();
    for (ci, chunk) in keys.chunks(CHUNK).enumerate() {
        let mut p = redis::pipe();
        for (j, k) in chunk.iter().enumerate() {
            p.cmd("SET")
                .arg(k.as_slice())
                .arg(format!("v{}", ci * CHUNK + j));
        }
        let replies: Vec<Value> = p
            .query(&mut con)
            .unwrap_or_else(|e| panic!("pipelined SET through slotgate failed: {e}"));
        assert_eq!(replies.len(), chunk.len(), "one reply per SET");
        for (k, r) in chunk.iter().zip(&replies) {
            assert_eq!(*r, Value::Okay, "SET {} through slotgate", show(k));
        }
    }

    // exists[shard][i]
    let mut exists: Vec<Vec<i64>> = Vec::new();
    for s in shards {
        let mut direct = s.client();
        let mut v = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd("EXISTS").arg(k.as_slice());
            }
            let r: Vec<i64> = p.query(&mut direct).expect("EXISTS on shard");
            v.extend(r);
        }
        exists.push(v);
    }

    let mut wrong = Vec::new();
    let mut expected_count = vec![0usize; shards.len()];
    for (i, k) in keys.iter().enumerate() {
        let expected = owner_of(layout, slots[i]);
        expected_count[expected] += 1;
        let on: Vec<usize> = (0..shards.len()).filter(|&s| exists[s][i] == 1).collect();
        if on != vec![expected] {
            wrong.push(format!(
                "key {} (slot {}) expected only on shard {expected}, found on {on:?}",
                show(k),
                slots[i]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} keys are on the wrong shard(s); first ones:\n{}",
        wrong.len(),
        keys.len(),
        wrong
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The value on the owner is the key's own value, and no shard holds stray keys.
    for (si, s) in shards.iter().enumerate() {
        let mut direct = s.client();
        let idx: Vec<usize> = (0..keys.len())
            .filter(|&i| owner_of(layout, slots[i]) == si)
            .collect();
        for chunk in idx.chunks(CHUNK) {
            let mut p = redis::pipe();
            for &i in chunk {
                p.cmd("GET").arg(keys[i].as_slice());
            }
            let vals: Vec<Option<String>> = p.query(&mut direct).expect("GET on shard");
            for (&i, v) in chunk.iter().zip(vals) {
                assert_eq!(
                    v.as_deref(),
                    Some(format!("v{i}").as_str()),
                    "value of key {} on its shard {si}",
                    show(&keys[i])
                );
            }
        }
        let dbsize: usize = redis::cmd("DBSIZE").query(&mut direct).unwrap();
        assert_eq!(
            dbsize, expected_count[si],
            "shard {si} holds {dbsize} keys, expected exactly the {} keys of its slots",
            expected_count[si]
        );
    }
}

#[test]
fn random_keys_land_on_shard_owning_cluster_keyslot_even_split_of_3() {
    let mut rng = StdRng::seed_from_u64(seed("slot_parity"));
    let cluster_node = RedisServer::start_with(&["--cluster-enabled", "yes"]);
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);

    let mut keys = edge_case_keys();
    let mut seen: HashSet<Vec<u8>> = keys.iter().cloned().collect();
    // Keys right at the even-split boundaries.
    let boundary_slots: Vec<u16> = [
        0u16, 1, 5459, 5460, 5461, 5462, 10920, 10921, 10922, 10923, 16382, 16383,
    ]
    .to_vec();
    for k in keys_for_slots(&boundary_slots, 2)
        .into_iter()
        .chain(random_keys(&mut rng, 10_500))
    {
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    }
    assert!(keys.len() >= 10_000);

    let slots = reference_slots(&cluster_node, &keys);
    let layout = even_split(3);
    assert_eq!(
        layout,
        vec![vec![(0, 5460)], vec![(5461, 10921)], vec![(10922, 16383)]]
    );
    let t = std::time::Instant::now();
    assert_keys_land_on_owners(&refs, &proxy, &layout, &keys, &slots);
    eprintln!("{} keys checked in {:?}", keys.len(), t.elapsed());

    // And the same keys read back through slotgate give their own values.
    let mut con = proxy.client();
    for (ci, chunk) in keys.chunks(CHUNK).enumerate() {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("GET").arg(k.as_slice());
        }
        let vals: Vec<Option<String>> = p.query(&mut con).expect("GET through slotgate");
        for (j, v) in vals.iter().enumerate() {
            assert_eq!(
                v.as_deref(),
                Some(format!("v{}", ci * CHUNK + j).as_str()),
                "GET {} through slotgate",
                show(&chunk[j])
            );
        }
    }
}

#[test]
fn even_split_of_5_shards_uses_floor_boundaries() {
    // 16384 / 5 is not an integer: boundaries are i*16384/5 (floored).
    let mut rng = StdRng::seed_from_u64(seed("slot_parity"));
    let cluster_node = RedisServer::start_with(&["--cluster-enabled", "yes"]);
    let shards: Vec<RedisServer> = (0..5).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let layout = even_split(5);
    let mut boundary_slots = Vec::new();
    for r in &layout {
        let (a, b) = r[0];
        boundary_slots.extend([a, a + 1, b - 1, b]);
    }
    let mut keys = keys_for_slots(&boundary_slots, 2);
    let mut seen: HashSet<Vec<u8>> = keys.iter().cloned().collect();
    for k in random_keys(&mut rng, 2000) {
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    }
    let slots = reference_slots(&cluster_node, &keys);
    assert_keys_land_on_owners(&refs, &proxy, &layout, &keys, &slots);
}

#[test]
fn explicit_uneven_layout_routes_slots_100_to_199_to_second_shard() {
    let mut rng = StdRng::seed_from_u64(seed("slot_parity"));
    let cluster_node = RedisServer::start_with(&["--cluster-enabled", "yes"]);
    let a = RedisServer::start();
    let b = RedisServer::start();
    let spec_a = format!("{}=0-99,200-16383", a.addr());
    let spec_b = format!("{}=100-199", b.addr());
    let proxy = Slotgate::start_with(&[], &["--shard", &spec_a, "--shard", &spec_b]);
    let layout = vec![vec![(0u16, 99u16), (200, 16383)], vec![(100, 199)]];

    // Every slot 95..=205 (both borders of shard B's range) gets keys, plus random keys.
    let targeted: Vec<u16> = (95..=205).collect();
    let mut keys = keys_for_slots(&targeted, 3);
    let mut seen: HashSet<Vec<u8>> = keys.iter().cloned().collect();
    for k in edge_case_keys()
        .into_iter()
        .chain(random_keys(&mut rng, 3000))
    {
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    }
    let slots = reference_slots(&cluster_node, &keys);
    let on_b = slots.iter().filter(|&&s| (100..=199).contains(&s)).count();
    assert!(
        on_b >= 300,
        "test must exercise shard B's slots ({on_b} keys)"
    );
    assert_keys_land_on_owners(&[&a, &b], &proxy, &layout, &keys, &slots);
}

#[test]
fn empty_key_lives_in_slot_0_on_first_shard() {
    // Optional in the contract: Redis accepts a 0-length key; its slot is CRC16("") = 0.
    let cluster_node = RedisServer::start_with(&["--cluster-enabled", "yes"]);
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = shards.iter().collect();
    let proxy = Slotgate::start(&refs);
    let keys = vec![Vec::new()];
    let slots = reference_slots(&cluster_node, &keys);
    assert_eq!(slots, vec![0]);
    assert_keys_land_on_owners(&refs, &proxy, &even_split(3), &keys, &slots);
}
