//! The reply framer: finds where each reply from a shard ends, so its bytes can be forwarded
//! untouched and matched to requests in FIFO order.
//!
//! Resumable (a reply arriving over many reads is scanned once, not from byte 0 on every read),
//! iterative (an explicit stack, never recursion) and covering every RESP2 and RESP3 type,
//! including attributes (`|`, which annotate the frame after them), pushes (`>`) and streamed
//! strings and aggregates (`$?`, `*?` …), which Redis 7 never sends but the spec allows.
//!
//! Any depth a shard can produce is framed (a Lua script returns tables nested thousands
//! deep). Memory is bounded by the reply's own size instead: every open level was announced
//! by at least four bytes of header, and a chain of one-element aggregates (`*1` inside `*1`
//! …, what nested Lua tables give) takes a single stack entry however deep it goes.

use super::request::find_cr;

/// Bytes a shard sent that are not RESP. Frame boundaries are lost from there on, so the
/// stream cannot be resynchronised: the connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    Invalid,
}

/// Open aggregates: how many frames the innermost still needs.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Frames still expected; `u64::MAX` for a streamed aggregate ended by `.`.
    remaining: u64,
    /// An attribute map: when it completes, the frame it annotates is still to come, so the
    /// parent is not decremented.
    attribute: bool,
}

/// Resumable scanner for the reply at the front of a buffer.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    pos: usize,
    stack: Vec<Level>,
    /// Inside a streamed string (`$?`): chunks `;n` until `;0`.
    streamed_string: bool,
    /// The frame that completes at top level is a push (`>`), not a reply to a request.
    top_is_push: bool,
}

/// A complete frame found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Its length in bytes.
    pub len: usize,
    /// Whether it is a RESP3 push (out-of-band, not the reply to a request).
    pub push: bool,
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans `buf` (which starts at the current reply) from where the last call stopped.
    /// `Ok(Some(frame))` when the reply is complete (the scanner then resets for the next one),
    /// `Ok(None)` when more bytes are needed.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Frame>, ScanError> {
        if self.pos == 0
            && let Some(len) = simple_frame(buf)
        {
            return Ok(Some(Frame { len, push: false }));
        }
        loop {
            let p = self.pos;
            if p >= buf.len() {
                return Ok(None);
            }
            if self.streamed_string {
                // `;<len>\r\n<bytes>\r\n`, `;0\r\n` ends it.
                if buf[p] != b';' {
                    return Err(ScanError::Invalid);
                }
                let Some((n, next)) = line_int(buf, p + 1)? else {
                    return Ok(None);
                };
                if n < 0 {
                    return Err(ScanError::Invalid);
                }
                if n == 0 {
                    self.streamed_string = false;
                    self.pos = next;
                    if let Some(f) = self.element_done() {
                        return Ok(Some(f));
                    }
                    continue;
                }
                let end = next + n as usize + 2;
                if end > buf.len() {
                    return Ok(None);
                }
                self.pos = end;
                continue;
            }
            let t = buf[p];
            if p == 0 || self.stack.is_empty() {
                self.top_is_push = t == b'>';
            }
            match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    let Some(next) = line_end(buf, p) else {
                        return Ok(None);
                    };
                    self.pos = next;
                }
                b'$' | b'!' | b'=' => {
                    if buf.get(p + 1) == Some(&b'?') {
                        let Some(next) = line_end(buf, p) else {
                            return Ok(None);
                        };
                        self.pos = next;
                        self.streamed_string = true;
                        continue;
                    }
                    let Some((n, next)) = line_int(buf, p + 1)? else {
                        return Ok(None);
                    };
                    if n < -1 {
                        return Err(ScanError::Invalid);
                    }
                    let end = if n == -1 { next } else { next + n as usize + 2 };
                    if end > buf.len() {
                        return Ok(None);
                    }
                    self.pos = end;
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => match self.open_aggregate(buf, p, t)? {
                    None => return Ok(None),
                    Some(true) => continue,
                    // An empty aggregate is a whole element.
                    Some(false) => {}
                },
                b'.' => {
                    // End of a streamed aggregate.
                    let Some(next) = line_end(buf, p) else {
                        return Ok(None);
                    };
                    match self.stack.last() {
                        Some(l) if l.remaining == u64::MAX => {}
                        _ => return Err(ScanError::Invalid),
                    }
                    self.stack.pop();
                    self.pos = next;
                }
                _ => return Err(ScanError::Invalid),
            }
            if let Some(f) = self.element_done() {
                return Ok(Some(f));
            }
        }
    }

    /// The header of an aggregate at `p` (type `t`): pushes a level for its elements. `None`
    /// until the header is complete; `Some(true)` when elements follow, `Some(false)` when it
    /// is empty (a whole element itself).
    #[inline]
    fn open_aggregate(&mut self, buf: &[u8], p: usize, t: u8) -> Result<Option<bool>, ScanError> {
        let streamed = buf.get(p + 1) == Some(&b'?');
        let (count, next) = if streamed {
            let Some(next) = line_end(buf, p) else {
                return Ok(None);
            };
            (u64::MAX, next)
        } else {
            let Some((n, next)) = line_int(buf, p + 1)? else {
                return Ok(None);
            };
            if n < -1 {
                return Err(ScanError::Invalid);
            }
            let pairs = matches!(t, b'%' | b'|');
            let n = if n <= 0 { 0 } else { n as u64 };
            (if pairs { n.saturating_mul(2) } else { n }, next)
        };
        self.pos = next;
        if count > 0 {
            let attribute = t == b'|';
            let chained = count == 1
                && !attribute
                && self
                    .stack
                    .last()
                    .is_some_and(|top| top.remaining == 1 && !top.attribute);
            // A one-element aggregate as the last frame of its parent: both
            // complete with that one element, so the parent's entry stands for
            // both (a chain of any depth is one entry).
            if !chained {
                self.stack.push(Level {
                    remaining: count,
                    attribute,
                });
            }
            return Ok(Some(true));
        }
        if t == b'|' {
            // An empty attribute: the annotated frame follows.
            return Ok(Some(true));
        }
        Ok(Some(false))
    }

    /// One frame ended at `self.pos`: pop finished aggregates; `Some` when the top-level
    /// reply is complete.
    fn element_done(&mut self) -> Option<Frame> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                let f = Frame {
                    len: self.pos,
                    push: self.top_is_push,
                };
                self.pos = 0;
                self.top_is_push = false;
                return Some(f);
            };
            if top.remaining == u64::MAX {
                return None;
            }
            top.remaining -= 1;
            if top.remaining > 0 {
                return None;
            }
            let attribute = top.attribute;
            self.stack.pop();
            if attribute {
                // The annotated frame is still to come at this level.
                return None;
            }
        }
    }
}

/// The common replies in one pass: a whole status, error, integer or bulk string (of a
/// length of at most 9 digits) at the front of `buf`; its length. `None` for anything else
/// (incomplete, aggregate, unusual), which the general path then scans.
#[inline]
fn simple_frame(buf: &[u8]) -> Option<usize> {
    match *buf.first()? {
        b'$' => {
            let (n, next) = super::request::short_number(buf, 1)?;
            let end = next + n + 2;
            (end <= buf.len()).then_some(end)
        }
        b'+' | b'-' | b':' => {
            let next = 1 + find_cr(&buf[1..])? + 2;
            (next <= buf.len()).then_some(next)
        }
        _ => None,
    }
}

/// Parses `<int>\r\n` starting at `from`; returns the value and the index after the CRLF.
#[inline]
fn line_int(buf: &[u8], from: usize) -> Result<Option<(i64, usize)>, ScanError> {
    let Some(cr) = find_cr(&buf[from..]) else {
        return Ok(None);
    };
    let next = from + cr + 2;
    if next > buf.len() {
        return Ok(None);
    }
    let v = super::request::parse_i64(&buf[from..from + cr]).ok_or(ScanError::Invalid)?;
    Ok(Some((v, next)))
}

/// The text of a bulk string element (`$5\r\nhello\r\n`).
pub fn bulk_body(el: &[u8]) -> Option<&[u8]> {
    if el.first() != Some(&b'$') || !el.ends_with(b"\r\n") {
        return None;
    }
    el.get(el.iter().position(|&b| b == b'\n')? + 1..el.len() - 2)
}

/// The bulk strings among the elements of an array or push (a command, a pub/sub message),
/// in order.
pub fn bulk_strings(frame: &[u8]) -> Vec<bytes::Bytes> {
    array_elements(frame)
        .unwrap_or_default()
        .iter()
        .filter_map(|&(s, e)| bulk_body(&frame[s..e]).map(bytes::Bytes::copy_from_slice))
        .collect()
}

/// Reads the integer of a `:<n>\r\n` reply (used when merging DEL/EXISTS counts).
pub fn reply_integer(frame: &[u8]) -> Option<i64> {
    if frame.first() != Some(&b':') || frame.len() < 4 {
        return None;
    }
    super::request::parse_i64(&frame[1..frame.len() - 2])
}

/// Splits an array reply (`*n`, a RESP3 set or push, or a RESP3 map: keys and values in
/// turn) into its top-level elements' byte ranges; `None` if `frame` is not an aggregate.
/// Elements may themselves be aggregates.
pub fn array_elements(frame: &[u8]) -> Option<Vec<(usize, usize)>> {
    if frame.is_empty() || !matches!(frame[0], b'*' | b'~' | b'%' | b'>') {
        return None;
    }
    let (n, mut pos) = line_int(frame, 1).ok()??;
    if n < 0 {
        return Some(Vec::new());
    }
    let n = if frame[0] == b'%' {
        n.checked_mul(2)?
    } else {
        n
    };
    let mut out = Vec::with_capacity((n as usize).min(1024));
    let mut sc = ReplyScanner::new();
    for _ in 0..n {
        let f = sc.scan(&frame[pos..]).ok()??;
        out.push((pos, pos + f.len));
        pos += f.len;
    }
    Some(out)
}

/// Where the line starting after the type byte at `p` ends (after its CRLF), once it is all
/// in `buf`.
#[inline]
fn line_end(buf: &[u8], p: usize) -> Option<usize> {
    let cr = find_cr(&buf[p + 1..])?;
    let next = p + 1 + cr + 2;
    (next <= buf.len()).then_some(next)
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
