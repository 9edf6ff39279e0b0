//! The client-side request parser: RESP2 multibulk commands and inline commands.
//!
//! Bounded, resumable and non-recursive. It never allocates from an untrusted length: argument
//! ranges grow one by one as bytes arrive, and the caller's read buffer grows in fixed steps.
//! A complete command is a view of the caller's buffer (no copy, no reference count), which
//! the caller advances past once the command is dispatched; an inline command is re-encoded
//! as a multibulk into the parser's own buffer first (rare path).
//!
//! Errors mirror Redis 7.0's `processMultibulkBuffer`/`processInlineBuffer` byte for byte
//! (`../shared/notes/redis-facts.md` §3.1); after one the session replies and closes.

use bytes::{Bytes, BytesMut};

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest inline request or count line.
pub const INLINE_MAX: usize = 64 * 1024;

/// A protocol error; the session sends the reply then closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    InvalidMultibulkLength,
    InvalidBulkLength,
    /// `expected '$', got 'X'`.
    ExpectedDollar(u8),
    UnbalancedQuotes,
    TooBigInline,
    TooBigMbulkCount,
    TooBigBulkCount,
    UnauthenticatedMultibulkLength,
    UnauthenticatedBulkLength,
}

impl ProtoError {
    /// The exact error reply Redis sends, without the leading `-` and trailing CRLF (spelled
    /// in [`super::reply::protocol_error`]).
    pub fn message(&self) -> Vec<u8> {
        super::reply::protocol_error(self)
    }
}

/// Limits applied while parsing. Redis's defaults; each is configurable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `proto-max-bulk-len`: the largest argument.
    pub max_bulk_len: usize,
    /// Before authentication: at most this many arguments (Redis: 10) …
    pub unauth_max_args: usize,
    /// … and arguments of at most this many bytes (Redis: 16 KiB).
    pub unauth_max_bulk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            unauth_max_args: 10,
            unauth_max_bulk: 16 * 1024,
        }
    }
}

/// One parsed command: its raw bytes and the byte range of each argument inside them.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The whole command as received (or re-encoded, for inline commands).
    pub raw: &'a [u8],
    /// `(start, end)` of each argument in `raw`; index 0 is the command name.
    pub args: &'a [(u32, u32)],
}

impl Request<'_> {
    #[inline]
    pub fn argc(&self) -> usize {
        self.args.len()
    }

    /// The i-th argument. Panics if `i >= argc()`.
    #[inline]
    pub fn arg(&self, i: usize) -> &[u8] {
        let (s, e) = self.args[i];
        &self.raw[s as usize..e as usize]
    }

    /// A copy of the i-th argument, to keep beyond the command (off the hot path: the
    /// request itself is a view of the read buffer).
    #[inline]
    pub fn arg_copy(&self, i: usize) -> Bytes {
        Bytes::copy_from_slice(self.arg(i))
    }

    /// The raw bytes of the i-th argument including its `$len\r\n` header and trailing CRLF,
    /// for building sub-commands (scatter/gather) without re-encoding. Multibulk only.
    pub fn arg_frame(&self, i: usize) -> &[u8] {
        let (s, e) = self.args[i];
        // Walk back over "$<len>\r\n" to the '$'.
        let mut h = s as usize - 2;
        while self.raw[h - 1] != b'$' {
            h -= 1;
        }
        &self.raw[h - 1..(e as usize + 2).min(self.raw.len())]
    }
}

/// Resumable parser state for the command at the front of the read buffer.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Bytes of the current command already parsed.
    pos: usize,
    /// Arguments still expected by the current multibulk; 0 = at a command start.
    remaining: usize,
    /// Ranges of the arguments parsed so far (reused; never sized from the wire).
    args: Vec<(u32, u32)>,
    /// The last inline command, re-encoded as a multibulk (reused).
    inline: BytesMut,
}

/// What `RequestParser::parse` found at the front of the buffer.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A complete command. The first `used` bytes of the buffer (the command and any ignored
    /// input before it) are done with once the command is.
    Command { req: Request<'a>, used: usize },
    /// Need more bytes. The first `used` bytes (ignored input) are done with; the rest must be
    /// passed again, with more bytes after it: the parser remembers how far it got.
    Incomplete { used: usize },
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the next command at the front of `buf`. `authed` selects Redis's
    /// pre-authentication limits. The caller drops the `used` bytes the answer names from the
    /// front of its buffer before the next call.
    #[inline]
    pub fn parse<'p>(
        &'p mut self,
        buf: &'p [u8],
        limits: &Limits,
        authed: bool,
    ) -> Result<Parsed<'p>, ProtoError> {
        if self.pos == 0
            && let Some(end) = self.parse_whole(buf, limits, authed)
        {
            return Ok(Parsed::Command {
                req: Request {
                    raw: &buf[..end],
                    args: &self.args,
                },
                used: end,
            });
        }
        self.parse_general(buf, limits, authed)
    }

    /// Everything else, resumable: commands cut across reads, ignored input, inline commands,
    /// errors.
    #[inline(never)]
    fn parse_general<'p>(
        &'p mut self,
        buf: &'p [u8],
        limits: &Limits,
        authed: bool,
    ) -> Result<Parsed<'p>, ProtoError> {
        // Ignored input skipped so far in this call (the current command starts here).
        let mut base = 0;
        loop {
            let buf = &buf[base..];
            if self.pos == 0 {
                // Skip what Redis ignores between commands: empty inline lines, `*0`, `*-N`.
                if buf.is_empty() {
                    return Ok(Parsed::Incomplete { used: base });
                }
                if buf[0] != b'*' {
                    match self.parse_inline(buf)? {
                        Inline::Command(n) => {
                            return Ok(Parsed::Command {
                                req: Request {
                                    raw: &self.inline,
                                    args: &self.args,
                                },
                                used: base + n,
                            });
                        }
                        Inline::Incomplete => return Ok(Parsed::Incomplete { used: base }),
                        // An empty line was skipped: look at what follows.
                        Inline::Skipped(n) => {
                            base += n;
                            continue;
                        }
                    }
                }
            }
            if self.remaining == 0 {
                // The `*<count>\r\n` header.
                let Some(cr) = find_header_cr(&buf[1..]) else {
                    if buf.len() > INLINE_MAX {
                        return Err(ProtoError::TooBigMbulkCount);
                    }
                    return Ok(Parsed::Incomplete { used: base });
                };
                let end = 1 + cr;
                if end + 2 > buf.len() {
                    return Ok(Parsed::Incomplete { used: base });
                }
                let n = parse_i64(&buf[1..end]).ok_or(ProtoError::InvalidMultibulkLength)?;
                if n > i32::MAX as i64 {
                    return Err(ProtoError::InvalidMultibulkLength);
                }
                if !authed && n > limits.unauth_max_args as i64 {
                    return Err(ProtoError::UnauthenticatedMultibulkLength);
                }
                if n <= 0 {
                    base += end + 2;
                    continue;
                }
                self.remaining = n as usize;
                self.pos = end + 2;
                self.args.clear();
            }
            while self.remaining > 0 {
                let p = self.pos;
                if p >= buf.len() {
                    return Ok(Parsed::Incomplete { used: base });
                }
                if buf[p] != b'$' {
                    return Err(ProtoError::ExpectedDollar(buf[p]));
                }
                let Some(cr) = find_header_cr(&buf[p + 1..]) else {
                    if buf.len() - p > INLINE_MAX {
                        return Err(ProtoError::TooBigBulkCount);
                    }
                    return Ok(Parsed::Incomplete { used: base });
                };
                let line_end = p + 1 + cr;
                let len = parse_i64(&buf[p + 1..line_end]).ok_or(ProtoError::InvalidBulkLength)?;
                if len < 0 || len as u64 > limits.max_bulk_len as u64 {
                    return Err(ProtoError::InvalidBulkLength);
                }
                if !authed && len as usize > limits.unauth_max_bulk {
                    return Err(ProtoError::UnauthenticatedBulkLength);
                }
                let start = line_end + 2;
                // Redis skips the two bytes after the payload without checking them.
                let next = start + len as usize + 2;
                if next > buf.len() {
                    return Ok(Parsed::Incomplete { used: base });
                }
                if next > u32::MAX as usize {
                    return Err(ProtoError::InvalidBulkLength);
                }
                self.args
                    .push((start as u32, (start + len as usize) as u32));
                self.pos = next;
                self.remaining -= 1;
            }
            let end = self.pos;
            self.pos = 0;
            return Ok(Parsed::Command {
                req: Request {
                    raw: &buf[..end],
                    args: &self.args,
                },
                used: base + end,
            });
        }
    }

    /// The common case in one pass: a whole multibulk command, counts and lengths of at most
    /// 9 digits, within the limits. `None` for anything else (incomplete, unusual or wrong),
    /// which the general path then parses from the start, remembering where it stops: so this
    /// pass runs at most once per command, whatever the read boundaries.
    #[inline]
    fn parse_whole(&mut self, buf: &[u8], limits: &Limits, authed: bool) -> Option<usize> {
        if buf.first() != Some(&b'*') {
            return None;
        }
        let (n, mut p) = short_number(buf, 1)?;
        if n == 0 || (!authed && n > limits.unauth_max_args) {
            return None;
        }
        self.args.clear();
        for _ in 0..n {
            if *buf.get(p)? != b'$' {
                return None;
            }
            let (len, start) = short_number(buf, p + 1)?;
            if len > limits.max_bulk_len || (!authed && len > limits.unauth_max_bulk) {
                return None;
            }
            // Redis skips the two bytes after the payload without checking them.
            let next = start + len + 2;
            if next > buf.len() || next > u32::MAX as usize {
                return None;
            }
            self.args.push((start as u32, (start + len) as u32));
            p = next;
        }
        Some(p)
    }

    /// An inline command: one line, split like `sdssplitargs`, re-encoded as multibulk.
    /// An empty line is consumed and ignored, as Redis does.
    fn parse_inline(&mut self, buf: &[u8]) -> Result<Inline, ProtoError> {
        // Redis finds the newline with `strchr`, which stops at a NUL byte: a line with a NUL
        // before its newline never ends (until it is too big).
        let nl = match buf.iter().position(|&b| b == b'\n' || b == 0) {
            Some(i) if buf[i] == b'\n' => i,
            _ => {
                if buf.len() > INLINE_MAX {
                    return Err(ProtoError::TooBigInline);
                }
                return Ok(Inline::Incomplete);
            }
        };
        let mut body = &buf[..nl];
        if body.last() == Some(&b'\r') {
            body = &body[..body.len() - 1];
        }
        let words = split_args(body).ok_or(ProtoError::UnbalancedQuotes)?;
        if words.is_empty() {
            return Ok(Inline::Skipped(nl + 1));
        }
        let out = &mut self.inline;
        out.clear();
        self.args.clear();
        push_header(out, b'*', words.len());
        for w in &words {
            push_header(out, b'$', w.len());
            let s = out.len();
            out.extend_from_slice(w);
            self.args.push((s as u32, out.len() as u32));
            out.extend_from_slice(b"\r\n");
        }
        Ok(Inline::Command(nl + 1))
    }
}

/// What an inline line turned out to be, with the bytes of the line (the command's argument
/// ranges are in `RequestParser::args`, its bytes in `RequestParser::inline`).
enum Inline {
    Command(usize),
    Incomplete,
    Skipped(usize),
}

/// The `\r` ending a client's count or length line, as Redis finds it: with `strchr` on its
/// NUL-terminated query buffer, so a NUL byte before the `\r` hides it (`*\x00\r\n` waits for
/// more input, and fails as "too big mbulk count string" past 64 KiB, as in Redis).
#[inline]
fn find_header_cr(b: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\r', 0, b).filter(|&i| b[i] == b'\r')
}

/// The first `\r` in `b` (count and length lines, here and in the reply framer).
#[inline]
pub(crate) fn find_cr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\r')
}

/// A count or length line of 1 to 9 digits at `buf[at..]` (no sign, no leading zero), ended
/// by `\r` and one more byte (not checked, as in Redis): its value and where the next line
/// starts. `None` for anything else, including a line not complete yet.
#[inline(always)]
pub(crate) fn short_number(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let digits = buf.get(at..)?;
    let mut v = (*digits.first()?).wrapping_sub(b'0') as usize;
    if v > 9 {
        return None;
    }
    let mut i = 1;
    loop {
        let c = *digits.get(i)?;
        if c == b'\r' {
            break;
        }
        let d = c.wrapping_sub(b'0') as usize;
        // Not a digit, a tenth digit, or a digit after a leading zero.
        if d > 9 || i == 9 || v == 0 {
            return None;
        }
        v = v * 10 + d;
        i += 1;
    }
    let next = at + i + 2;
    (next <= buf.len()).then_some((v, next))
}

/// Redis's `string2ll` for the count and length lines: optional `-`, digits, no spaces,
/// no leading `+`, no overflow.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let (neg, digits) = match b[0] {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub((d - b'0') as i64)?
        } else {
            v.checked_add((d - b'0') as i64)?
        };
    }
    if neg && v == 0 {
        return None;
    }
    Some(v)
}

/// Appends `<kind><n>\r\n`.
pub fn push_header(out: &mut BytesMut, kind: u8, n: usize) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(b.format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a command, as a client sends it (an array of bulk strings), to `out`: the one
/// RESP encoder of the proxy's own requests (read-through stores, shard handshakes).
pub fn push_command(out: &mut BytesMut, args: &[&[u8]]) {
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    push_header(out, b'*', args.len());
    for a in args {
        push_header(out, b'$', a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A command as a client sends it (see [`push_command`]).
pub fn command(args: &[&[u8]]) -> bytes::Bytes {
    let mut b = BytesMut::new();
    push_command(&mut b, args);
    b.freeze()
}

/// `sdssplitargs`: whitespace-separated words, `"…"` with C escapes and `\xHH`, `'…'` with
/// only `\'`. A closing quote must be followed by whitespace or the end. `None` on unbalanced
/// quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut words = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Some(words);
        }
        let mut cur = Vec::new();
        let mut inq = false;
        let mut insq = false;
        loop {
            if inq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && line[i + 2].is_ascii_hexdigit()
                    && line[i + 3].is_ascii_hexdigit()
                {
                    cur.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        o => o,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if insq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        i += 1;
                        break;
                    }
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        words.push(cur);
    }
}

#[inline]
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

#[inline]
fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
