//! Key → slot → shard.
//!
//! The slot of a key is CRC16/XMODEM of the key (or of its `{hashtag}`) mod 16384, with a
//! byte-wise table built at compile time (`redis_protocol::redis_keyslot`, used before, cost
//! about three times as many instructions per key; it remains the oracle in the unit tests and
//! `benches/`). The slot map is an immutable table of 16384 shard indices,
//! built once from the configuration and shared read-only by every worker.

/// Number of hash slots, as in Redis Cluster.
pub const SLOTS: usize = 16384;

/// The hash slot of a key: of the part between the first `{` and the next `}` when that part
/// is not empty, else of the whole key (Redis Cluster's hash tags).
#[inline]
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match find(b'{', key) {
        Some(open) => match find(b'}', &key[open + 1..]) {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & (SLOTS as u16 - 1)
}

/// The first `b` in `s`. Short keys (most) are searched eight bytes at a time in a `u64`
/// (about 15 instructions for a 16-byte key, where `memchr`'s setup alone costs about 50);
/// long ones with `memchr`.
#[inline]
fn find(b: u8, s: &[u8]) -> Option<usize> {
    if s.len() >= 32 {
        return memchr::memchr(b, s);
    }
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES * b as u64;
    let mut words = s.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ pattern;
        // A byte of `x` is zero where `s` has `b`; the lowest flagged byte is exact.
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&c| c == b)
        .map(|i| at + i)
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses. Four bytes per
/// step ("slice-by-4"): the four table lookups are independent, where the byte-wise loop is
/// one dependent chain (about 10 instructions per byte against 3).
#[inline]
pub fn crc16(data: &[u8]) -> u16 {
    let [z0, z1, z2, z3] = &CRC16_TABLES;
    let mut crc = 0u16;
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        crc = z3[((crc >> 8) as u8 ^ q[0]) as usize]
            ^ z2[(crc as u8 ^ q[1]) as usize]
            ^ z1[q[2] as usize]
            ^ z0[q[3] as usize];
    }
    for &b in quads.remainder() {
        crc = (crc << 8) ^ z0[((crc >> 8) as u8 ^ b) as usize];
    }
    crc
}

/// `CRC16_TABLES[k][x]`: the register after feeding byte `x` and then `k` zero bytes from
/// zero. The CRC is linear, so four input bytes (the first two XORed with the register)
/// combine by XOR of one lookup each.
static CRC16_TABLES: [[u16; 256]; 4] = {
    let mut t = [[0u16; 256]; 4];
    let mut x = 0;
    while x < 256 {
        let mut crc = (x as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        t[0][x] = crc;
        x += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut x = 0;
        while x < 256 {
            let prev = t[k - 1][x];
            t[k][x] = (prev << 8) ^ t[0][(prev >> 8) as usize];
            x += 1;
        }
        k += 1;
    }
    t
};

/// A shard's name and its slot ranges (`None`: a share of an even split).
pub type ShardSlots = (String, Option<Vec<(usize, usize)>>);

/// Which shard owns each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    owner: Box<[u16; SLOTS]>,
    shards: usize,
}

/// A slot layout that does not cover every slot exactly once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("slot {slot} is owned by both shard {first} and shard {second}")]
    Overlap {
        slot: usize,
        first: String,
        second: String,
    },
    #[error("{count} slot(s) are owned by no shard (the first is {first})")]
    Unowned { count: usize, first: usize },
    #[error("invalid slot range '{0}': expected N or N-M with 0 <= N <= M <= 16383")]
    BadRange(String),
    #[error("no shard configured: give at least one --shard ADDR[=SLOTS]")]
    NoShards,
    #[error("too many shards ({0}); at most 16384")]
    TooMany(usize),
}

/// Parses a slot list such as `0-5460,5462` into inclusive ranges.
pub fn parse_slot_ranges(s: &str) -> Result<Vec<(usize, usize)>, LayoutError> {
    let bad = || LayoutError::BadRange(s.to_string());
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if a > b || b >= SLOTS {
            return Err(bad());
        }
        out.push((a, b));
    }
    Ok(out)
}

impl SlotMap {
    /// Builds the map from `(name, Some(ranges) | None)` per shard, in order. Shards without
    /// ranges share the 16384 slots evenly: shard i of n owns `i*16384/n ..= (i+1)*16384/n - 1`
    /// (all shards must then be without ranges).
    pub fn build(shards: &[ShardSlots]) -> Result<Self, LayoutError> {
        let n = shards.len();
        if n == 0 {
            return Err(LayoutError::NoShards);
        }
        if n > SLOTS {
            return Err(LayoutError::TooMany(n));
        }
        const NONE: u16 = u16::MAX;
        let mut owner = Box::new([NONE; SLOTS]);
        for (i, (name, ranges)) in shards.iter().enumerate() {
            let even = [(i * SLOTS / n, (i + 1) * SLOTS / n - 1)];
            let ranges: &[(usize, usize)] = match ranges {
                Some(r) => r,
                None if shards.iter().all(|s| s.1.is_none()) => &even,
                None => &[],
            };
            for &(a, b) in ranges {
                for s in a..=b {
                    if owner[s] != NONE {
                        return Err(LayoutError::Overlap {
                            slot: s,
                            first: shards[owner[s] as usize].0.clone(),
                            second: name.clone(),
                        });
                    }
                    owner[s] = i as u16;
                }
            }
        }
        let unowned: Vec<usize> = (0..SLOTS).filter(|&s| owner[s] == NONE).collect();
        if let Some(&first) = unowned.first() {
            return Err(LayoutError::Unowned {
                count: unowned.len(),
                first,
            });
        }
        Ok(SlotMap { owner, shards: n })
    }

    /// The shard that owns `slot`.
    #[inline]
    pub fn shard_of_slot(&self, slot: u16) -> usize {
        self.owner[slot as usize] as usize
    }

    /// The shard that owns `key`.
    #[inline]
    pub fn shard_of(&self, key: &[u8]) -> usize {
        self.shard_of_slot(slot(key))
    }

    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The slot ranges each shard owns, for INFO and logs.
    pub fn ranges(&self, shard: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for s in 0..SLOTS {
            if self.owner[s] as usize == shard {
                match out.last_mut() {
                    Some(r) if r.1 + 1 == s => r.1 = s,
                    _ => out.push((s, s)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_agrees_with_memchr() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            // Bytes from a small alphabet around the searched ones, including 0x7b/0x7d
            // neighbours and bytes with the high bit set.
            let s: Vec<u8> = (0..len)
                .map(|i| [b'{', b'}', b'a', 0x7a, 0xfb, 0x00, 0xff][((x >> (i % 60)) % 7) as usize])
                .collect();
            for b in [b'{', b'}'] {
                assert_eq!(find(b, &s), memchr::memchr(b, &s), "{s:?} {b}");
            }
        }
    }

    fn even(n: usize) -> Vec<ShardSlots> {
        (0..n).map(|i| (format!("s{i}"), None)).collect()
    }

    #[test]
    fn even_split_matches_the_formula() {
        let m = SlotMap::build(&even(3)).unwrap();
        assert_eq!(m.ranges(0), vec![(0, 5460)]);
        assert_eq!(m.ranges(1), vec![(5461, 10921)]);
        assert_eq!(m.ranges(2), vec![(10922, 16383)]);
    }

    #[test]
    fn known_slots() {
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }

    #[test]
    fn table_crc_agrees_with_redis_protocol_on_hashtag_edge_cases() {
        let mut keys: Vec<Vec<u8>> = [
            &b""[..],
            b"{",
            b"}",
            b"{}",
            b"}{",
            b"{a",
            b"a}",
            b"{a}",
            b"{{a}}",
            b"a{}b}",
            b"a{b}{c}",
            b"{}{x}",
            b"x{y",
            b"\xff{\x00}\x80",
            b"{user1000}.following",
        ]
        .iter()
        .map(|k| k.to_vec())
        .collect();
        let mut x: u32 = 12345;
        for len in 0..200 {
            let k: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    // Mostly braces and a few letters, so hash tags of every shape occur.
                    b"{}ab\x00\xff"[(x >> 16) as usize % 6]
                })
                .collect();
            keys.push(k);
        }
        for k in keys {
            assert_eq!(slot(&k), redis_protocol::redis_keyslot(&k), "{k:?}");
        }
    }

    #[test]
    fn explicit_layouts_are_validated() {
        let r = |s: &str| Some(parse_slot_ranges(s).unwrap());
        let ok = SlotMap::build(&[
            ("a".into(), r("0-99,200-16383")),
            ("b".into(), r("100-199")),
        ])
        .unwrap();
        assert_eq!(ok.shard_of_slot(150), 1);
        assert_eq!(ok.shard_of_slot(99), 0);
        let overlap = SlotMap::build(&[("a".into(), r("0-16383")), ("b".into(), r("5"))]);
        assert!(matches!(overlap, Err(LayoutError::Overlap { slot: 5, .. })));
        let hole = SlotMap::build(&[("a".into(), r("0-16382"))]);
        assert_eq!(
            hole.unwrap_err(),
            LayoutError::Unowned {
                count: 1,
                first: 16383
            }
        );
        assert!(parse_slot_ranges("5-3").is_err());
        assert!(parse_slot_ranges("16384").is_err());
        assert!(parse_slot_ranges("a-b").is_err());
        assert_eq!(SlotMap::build(&[]).unwrap_err(), LayoutError::NoShards);
    }
}
