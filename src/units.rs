//! Values written as in redis.conf and slotgate's configuration: durations (`250ms`, `10m`)
//! and sizes (`64mb`), parsed by every layer that reads them.

use std::time::Duration;

/// Parses `250ms`, `1s`, `1.5s`, `10m`, `1h`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| "missing unit (use us, ms, s, m or h, e.g. 250ms)".to_string())?;
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| "expected a number followed by a unit, e.g. 250ms".to_string())?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => return Err(format!("unknown unit '{u}' (use us, ms, s, m or h)")),
    };
    let secs = v * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err("too large".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size as Redis's `memtoull` does: a number with an optional unit, `b`, `k`
/// (1000), `kb` (1024), `m`, `mb`, `g`, `gb`, in any case.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number of bytes, optionally with a unit (e.g. 64mb)")?;
    let scale: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        u => return Err(format!("unknown unit '{u}' (use b, k, kb, m, mb, g or gb)")),
    };
    n.checked_mul(scale)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| "too large".to_string())
}
