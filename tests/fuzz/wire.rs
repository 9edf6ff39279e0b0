//! Inputs: a seeded PRNG, generators of valid traffic (commands as clients send them, replies
//! of every RESP2/RESP3 type as shards send them) and structure-aware mutations of it.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The PRNG, with the few helpers the generators need.
pub struct R(SmallRng);

impl R {
    pub fn new(seed: u64) -> Self {
        R(SmallRng::seed_from_u64(seed))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.random()
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.0.random_range(0..n) }
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len())]
    }

    /// A size skewed towards small values: mostly below 8, sometimes up to `max`.
    pub fn size(&mut self, max: usize) -> usize {
        match self.below(10) {
            0..=5 => self.below(8.min(max + 1)),
            6..=8 => self.below(64.min(max + 1)),
            _ => self.below(max + 1),
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.0.fill(&mut v[..]);
        v
    }
}

/// Wire traffic and where each of its frames (a command, a reply) starts.
pub struct Wire {
    pub bytes: Vec<u8>,
    pub starts: Vec<usize>,
}

impl Wire {
    fn new() -> Self {
        Wire {
            bytes: Vec::new(),
            starts: Vec::new(),
        }
    }

    fn begin(&mut self) {
        self.starts.push(self.bytes.len());
    }

    /// The byte range of frame `i` (approximate once mutations have shifted bytes).
    fn frame(&self, i: usize) -> (usize, usize) {
        let len = self.bytes.len();
        let s = self.starts[i].min(len);
        let e = self.starts.get(i + 1).map_or(len, |&e| e.min(len)).max(s);
        (s, e)
    }

    /// A frame boundary (or any position, when there are no frames).
    fn boundary(&self, r: &mut R) -> usize {
        if self.starts.is_empty() || r.one_in(4) {
            r.below(self.bytes.len() + 1)
        } else {
            r.pick(&self.starts).min(self.bytes.len())
        }
    }

    /// Inserts `b` at `at`, shifting the frame starts after it.
    fn insert(&mut self, at: usize, b: &[u8]) {
        self.bytes.splice(at..at, b.iter().copied());
        for s in &mut self.starts {
            if *s > at {
                *s += b.len();
            }
        }
    }

    fn remove(&mut self, s: usize, e: usize) {
        self.bytes.drain(s..e);
        for x in &mut self.starts {
            if *x >= e {
                *x -= e - s;
            } else if *x > s {
                *x = s;
            }
        }
    }
}

fn put_num(out: &mut Vec<u8>, kind: u8, n: impl std::fmt::Display) {
    out.push(kind);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Integers that sit on an edge somewhere.
pub const EDGE_INTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-2",
    "2",
    "9",
    "10",
    "127",
    "128",
    "255",
    "256",
    "1024",
    "16384",
    "65535",
    "65536",
    "65537",
    "999999999",
    "1000000000",
    "2147483647",
    "2147483648",
    "-2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "536870912",
    "536870913",
    "-0",
    "+1",
    "01",
    "00",
    "",
    " 1",
    "1 ",
    "?",
    "1e3",
    "0x10",
];

// ---------------------------------------------------------------------------------------
// Commands (client side)

/// Command templates; `k` is a key, `v` a value, `n` a number, `c` a channel.
const COMMANDS: &[&[&str]] = &[
    &["GET", "k"],
    &["SET", "k", "v"],
    &["SET", "k", "v", "PX", "n", "NX"],
    &["MGET", "k", "k", "k"],
    &["MSET", "k", "v", "k", "v"],
    &["DEL", "k", "k"],
    &["EXISTS", "k", "k", "k"],
    &["UNLINK", "k"],
    &["TOUCH", "k", "k"],
    &["INCR", "k"],
    &["HSET", "k", "v", "v"],
    &["ZADD", "k", "n", "v"],
    &["ZUNIONSTORE", "k", "n", "k", "k", "WEIGHTS", "n", "n"],
    &["EVAL", "v", "n", "k", "k", "v"],
    &["EVALSHA", "v", "n", "k"],
    &["FCALL", "v", "n", "k", "v"],
    &["XADD", "k", "*", "v", "v"],
    &["XREAD", "COUNT", "n", "BLOCK", "n", "STREAMS", "k", "n"],
    &[
        "XREADGROUP",
        "GROUP",
        "v",
        "v",
        "BLOCK",
        "n",
        "STREAMS",
        "k",
        ">",
    ],
    &["SORT", "k", "BY", "v*", "GET", "#", "GET", "v*"],
    &["SORT_RO", "k", "GET", "{k}*"],
    &["COPY", "k", "k", "DB", "n"],
    &["BLPOP", "k", "k", "n"],
    &["LMPOP", "n", "k", "k", "LEFT"],
    &["SINTERCARD", "n", "k", "k", "LIMIT", "n"],
    &["MIGRATE", "v", "n", "", "0", "n", "KEYS", "k", "k"],
    &["GEORADIUS", "k", "0", "0", "n", "km", "STORE", "k"],
    &["OBJECT", "ENCODING", "k"],
    &["CONFIG", "SET", "maxmemory", "v", "port", "n"],
    &["CONFIG", "GET", "*"],
    &["SUBSCRIBE", "c", "c"],
    &["PSUBSCRIBE", "c*"],
    &["UNSUBSCRIBE"],
    &["PUBLISH", "c", "v"],
    &["SPUBLISH", "c", "v"],
    &["SSUBSCRIBE", "c"],
    &["SCAN", "n", "MATCH", "*", "COUNT", "n"],
    &["HELLO", "3", "AUTH", "v", "v", "SETNAME", "v"],
    &["HELLO", "2"],
    &["AUTH", "v"],
    &["AUTH", "v", "v"],
    &["CLIENT", "SETNAME", "v"],
    &["CLIENT", "INFO"],
    &["CLIENT", "NOPE"],
    &["COMMAND"],
    &["COMMAND", "GETKEYS", "GET", "k"],
    &["PING"],
    &["ECHO", "v"],
    &["INFO", "all"],
    &["SELECT", "n"],
    &["MULTI"],
    &["EXEC"],
    &["WATCH", "k", "k"],
    &["DBSIZE"],
    &["KEYS", "*"],
    &["RANDOMKEY"],
    &["FLUSHALL"],
    &["SLOTGATE.INVALIDATE", "k"],
    &["SLOTGATE.STATUS"],
    &["SHUTDOWN"],
    &["NOSUCHCOMMAND", "v", "v"],
    &["QUIT"],
    &["RESET"],
];

const KEY_PARTS: &[&str] = &[
    "k",
    "foo",
    "label:",
    "label:PO12345",
    "t:",
    "tenantA:x",
    "{tag}",
    "{}",
    "{",
    "}",
    "user:{42}:name",
    "*",
    "?",
    "[a-z]",
    "\\",
    ".",
    "..",
    "%",
    " ",
    "\r\n",
    "\0",
    "é",
];

fn word(r: &mut R, kind: &str) -> Vec<u8> {
    match kind {
        "k" | "c" => {
            let mut k = Vec::new();
            for _ in 0..1 + r.below(3) {
                if r.one_in(5) {
                    let n = r.size(40);
                    k.extend(r.bytes(n));
                } else {
                    k.extend_from_slice(r.pick(KEY_PARTS).as_bytes());
                }
            }
            k
        }
        "v" => match r.below(4) {
            0 => r.pick(KEY_PARTS).as_bytes().to_vec(),
            1 => r.pick(EDGE_INTS).as_bytes().to_vec(),
            _ => {
                let n = r.size(300);
                r.bytes(n)
            }
        },
        "n" => r.pick(EDGE_INTS).as_bytes().to_vec(),
        lit => {
            // Names and keywords in any case.
            let mut w = lit.as_bytes().to_vec();
            if r.one_in(3) {
                w.make_ascii_lowercase();
            }
            w
        }
    }
}

fn command_words(r: &mut R) -> Vec<Vec<u8>> {
    let t = r.pick(COMMANDS);
    let mut words: Vec<Vec<u8>> = t.iter().map(|k| word(r, k)).collect();
    match r.below(8) {
        // Too few or too many arguments for the arity.
        0 => {
            let keep = r.below(words.len()) + 1;
            words.truncate(keep);
        }
        1 => {
            for _ in 0..r.size(20) {
                words.push(word(r, "v"));
            }
        }
        _ => {}
    }
    words
}

fn push_multibulk(out: &mut Vec<u8>, words: &[Vec<u8>]) {
    put_num(out, b'*', words.len());
    for w in words {
        put_num(out, b'$', w.len());
        out.extend_from_slice(w);
        out.extend_from_slice(b"\r\n");
    }
}

/// An inline command line (`sdssplitargs` syntax: quotes, escapes).
fn push_inline(r: &mut R, out: &mut Vec<u8>, words: &[Vec<u8>]) {
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(if r.one_in(4) { b" \t " } else { b" " });
        }
        let plain = !w.is_empty()
            && w.iter()
                .all(|&c| c.is_ascii_graphic() && c != b'"' && c != b'\'');
        if plain && !r.one_in(5) {
            out.extend_from_slice(w);
        } else if r.one_in(4) && !w.contains(&b'\'') {
            out.push(b'\'');
            out.extend_from_slice(w);
            out.push(b'\'');
        } else {
            out.push(b'"');
            for &c in w {
                match c {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    c if c.is_ascii_graphic() || c == b' ' => out.push(c),
                    c => out.extend_from_slice(format!("\\x{c:02x}").as_bytes()),
                }
            }
            out.push(b'"');
        }
    }
    out.extend_from_slice(if r.one_in(4) { b"\n" } else { b"\r\n" });
}

/// A pipeline of commands as clients send them, with what Redis skips between commands.
pub fn commands(r: &mut R) -> Wire {
    let mut w = Wire::new();
    for _ in 0..1 + r.size(6) {
        w.begin();
        match r.below(20) {
            0 => w.bytes.extend_from_slice(r.pick(&[
                &b"\r\n"[..],
                b"\n",
                b"*0\r\n",
                b"*-1\r\n",
                b"   \r\n",
            ])),
            1..=3 => {
                let words = command_words(r);
                push_inline(r, &mut w.bytes, &words);
            }
            _ => {
                let words = command_words(r);
                push_multibulk(&mut w.bytes, &words);
            }
        }
    }
    w
}

// ---------------------------------------------------------------------------------------
// Replies (shard side)

fn text(r: &mut R) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "OK",
        "QUEUED",
        "PONG",
        "ERR",
        "WRONGTYPE",
        "MOVED",
        "x",
        " ",
        "é",
        "subscribe",
    ];
    let mut t = Vec::new();
    for _ in 0..r.size(4) {
        t.extend_from_slice(r.pick(WORDS).as_bytes());
    }
    t
}

fn bulk_payload(r: &mut R) -> Vec<u8> {
    if r.one_in(3) {
        text(r)
    } else {
        let n = r.size(200);
        r.bytes(n)
    }
}

/// One reply of any type. `resp3` allows the RESP3 types; `depth` bounds the nesting.
pub fn reply(r: &mut R, out: &mut Vec<u8>, depth: usize, resp3: bool) {
    let leaf = depth >= 4 || r.one_in(2);
    let kinds: &[u8] = match (resp3, leaf) {
        (false, true) => b"+-:$$",
        (false, false) => b"*",
        (true, true) => b"+-:$_,#(!=$",
        (true, false) => b"*%~>|*S",
    };
    match r.pick(kinds) {
        b'+' => {
            out.push(b'+');
            out.extend(text(r));
            out.extend_from_slice(b"\r\n");
        }
        b'-' => {
            out.extend_from_slice(b"-ERR ");
            out.extend(text(r));
            out.extend_from_slice(b"\r\n");
        }
        b':' => put_num(out, b':', r.pick(EDGE_INTS)),
        b'$' => {
            if r.one_in(6) {
                out.extend_from_slice(b"$-1\r\n");
            } else {
                let p = bulk_payload(r);
                put_num(out, b'$', p.len());
                out.extend(p);
                out.extend_from_slice(b"\r\n");
            }
        }
        b'_' => out.extend_from_slice(b"_\r\n"),
        b',' => {
            let d = r.pick(&["1.5", "-0.0", "inf", "-inf", "nan", "1e300", "3", "x"]);
            put_num(out, b',', d);
        }
        b'#' => put_num(out, b'#', r.pick(&["t", "f", "x"])),
        b'(' => put_num(
            out,
            b'(',
            r.pick(&["3492890328409238509324850943850943825024385", "-1", "0"]),
        ),
        b'!' => {
            let e = [b"SYNTAX ".to_vec(), text(r)].concat();
            put_num(out, b'!', e.len());
            out.extend(e);
            out.extend_from_slice(b"\r\n");
        }
        b'=' => {
            let t = bulk_payload(r);
            put_num(out, b'=', t.len() + 4);
            out.extend_from_slice(r.pick(&[&b"txt:"[..], b"mkd:"]));
            out.extend(t);
            out.extend_from_slice(b"\r\n");
        }
        b'|' => {
            // An attribute annotates the frame after it.
            let n = r.size(3);
            put_num(out, b'|', n);
            for _ in 0..2 * n {
                reply(r, out, depth + 1, resp3);
            }
            reply(r, out, depth + 1, resp3);
        }
        b'S' => streamed(r, out, depth),
        kind => {
            if kind == b'*' && r.one_in(8) {
                out.extend_from_slice(b"*-1\r\n");
                return;
            }
            let n = r.size(6);
            put_num(out, kind, n);
            let elems = if kind == b'%' { 2 * n } else { n };
            for _ in 0..elems {
                reply(r, out, depth + 1, resp3);
            }
        }
    }
}

/// A streamed string (`$?` chunks `;0`) or aggregate (`*?` … `.`).
fn streamed(r: &mut R, out: &mut Vec<u8>, depth: usize) {
    if r.one_in(2) {
        out.extend_from_slice(b"$?\r\n");
        for _ in 0..r.size(4) {
            let p = bulk_payload(r);
            if p.is_empty() {
                continue;
            }
            put_num(out, b';', p.len());
            out.extend(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b";0\r\n");
    } else {
        let kind = r.pick(b"*~%");
        out.push(kind);
        out.extend_from_slice(b"?\r\n");
        let n = r.size(4);
        let elems = if kind == b'%' { 2 * n } else { n };
        for _ in 0..elems {
            reply(r, out, depth + 1, true);
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// Replies as a shard sends them on one connection: RESP2 or RESP3 throughout.
pub fn replies(r: &mut R) -> Wire {
    let mut w = Wire::new();
    let resp3 = r.one_in(2);
    for _ in 0..1 + r.size(5) {
        w.begin();
        reply(r, &mut w.bytes, 0, resp3);
    }
    w
}

// ---------------------------------------------------------------------------------------
// Mutations

/// Where count and length lines start: a type byte at the start of a line.
fn header_positions(b: &[u8]) -> Vec<usize> {
    (0..b.len())
        .filter(|&i| {
            (i == 0 || b[i - 1] == b'\n') && b"$*%~>|=!;:+-_,#(.".contains(&b[i]) && i + 1 < b.len()
        })
        .collect()
}

/// Deep nesting: a chain of `depth` openers of one kind before a leaf.
fn nesting(r: &mut R) -> Vec<u8> {
    let depth = match r.below(4) {
        0 => 2 + r.below(64),
        1 => 500 + r.below(600),
        2 => 5_000 + r.below(20_000),
        _ => 64 + r.below(400),
    };
    let unit: &[u8] = r.pick(&[
        &b"*1\r\n"[..],
        b">1\r\n",
        b"~1\r\n",
        b"%1\r\n+k\r\n",
        b"|1\r\n+a\r\n:1\r\n",
        b"*2\r\n:0\r\n",
        b"*?\r\n",
        b"|0\r\n",
        b"*1\r\n|1\r\n+a\r\n:1\r\n",
    ]);
    let mut out = unit.repeat(depth);
    if r.one_in(4) {
        out.extend_from_slice(b":1\r\n");
    }
    out
}

/// Applies one structure-aware mutation. `donor` makes more traffic of the same kind.
pub fn mutate(r: &mut R, w: &mut Wire, donor: fn(&mut R) -> Wire) {
    let len = w.bytes.len();
    match r.below(16) {
        // A count or length line gets another number: off by one, zero, negative, huge,
        // overflowing, or not canonical.
        0..=2 => {
            let heads = header_positions(&w.bytes);
            if heads.is_empty() {
                return;
            }
            let h = r.pick(&heads);
            let end = w.bytes[h + 1..]
                .iter()
                .position(|&c| c == b'\r')
                .map_or(len, |p| h + 1 + p);
            let old = std::str::from_utf8(&w.bytes[h + 1..end])
                .ok()
                .and_then(|s| s.parse::<i64>().ok());
            let new = match (old, r.below(3)) {
                (Some(n), 0) => n.saturating_add([-1i64, 1, 2, -2][r.below(4)]).to_string(),
                (Some(n), 1) => n.saturating_mul(10).to_string(),
                _ => r.pick(EDGE_INTS).to_string(),
            };
            w.remove(h + 1, end);
            w.insert(h + 1, new.as_bytes());
        }
        // Cut short.
        3 => {
            let at = r.below(len + 1);
            w.bytes.truncate(at);
        }
        // A frame again, frames swapped, a frame gone.
        4 if !w.starts.is_empty() => {
            let (s, e) = w.frame(r.below(w.starts.len()));
            let copy = w.bytes[s..e].to_vec();
            let at = w.boundary(r);
            w.insert(at, &copy);
        }
        5 if w.starts.len() >= 2 => {
            let i = r.below(w.starts.len() - 1);
            let (s1, e1) = w.frame(i);
            let (s2, e2) = w.frame(i + 1);
            if s1 <= e1 && e1 == s2 && s2 <= e2 {
                let mut swapped = w.bytes[s2..e2].to_vec();
                swapped.extend_from_slice(&w.bytes[s1..e1]);
                w.bytes.splice(s1..e2, swapped);
            }
        }
        6 if !w.starts.is_empty() => {
            let (s, e) = w.frame(r.below(w.starts.len()));
            w.remove(s, e);
        }
        // Bits flipped.
        7 if len > 0 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(len);
                w.bytes[i] ^= 1 << r.below(8);
            }
        }
        // CR, LF, NUL where they do not belong.
        8 => {
            let at = r.below(len + 1);
            let c: &[u8] = r.pick(&[&b"\r"[..], b"\n", b"\r\n", b"\0", b"\r\r\n", b"\n\r"]);
            w.insert(at, c);
        }
        9 if len > 0 => {
            let s = r.below(len);
            let e = (s + 1 + r.below(8)).min(len);
            w.remove(s, e);
        }
        10 => {
            let at = w.boundary(r);
            let n = nesting(r);
            w.insert(at, &n);
        }
        // Traffic from another input spliced in.
        11 => {
            let other = donor(r);
            let at = w.boundary(r);
            w.insert(at, &other.bytes);
        }
        // A type byte replaced.
        12 => {
            let heads = header_positions(&w.bytes);
            if !heads.is_empty() {
                let h = r.pick(&heads);
                w.bytes[h] = r.pick(b"+-:$*_,#(!=%~>|.;?H\0");
            }
        }
        13 => {
            let n = 1 + r.below(16);
            let junk = r.bytes(n);
            let at = r.below(len + 1);
            w.insert(at, &junk);
        }
        // A stretch repeated: long lines, many frames, big inputs.
        14 if len > 0 => {
            let s = r.below(len);
            let e = (s + 1 + r.below(32)).min(len);
            let times = match r.below(32) {
                0 => 2_000 + r.below(70_000 / (e - s)),
                _ => 2 + r.below(16),
            };
            let rep = w.bytes[s..e].repeat(times);
            w.insert(e, &rep);
        }
        // Streamed markers and signs where digits were.
        _ if len > 0 => {
            let i = r.below(len);
            w.bytes[i] = r.pick(b"?-0+9.;\r\n");
        }
        _ => {}
    }
}

/// Valid traffic from `make`, mutated a few times (sometimes not at all); sometimes only
/// random bytes.
pub fn traffic(r: &mut R, make: fn(&mut R) -> Wire) -> Vec<u8> {
    if r.one_in(16) {
        let n = r.size(512);
        return r.bytes(n);
    }
    let mut w = make(r);
    let rounds = match r.below(8) {
        0 => 0,
        1..=4 => 1,
        5 | 6 => 2 + r.below(3),
        _ => 5 + r.below(10),
    };
    for _ in 0..rounds {
        mutate(r, &mut w, make);
    }
    w.bytes
}
