//! A counting allocator: `System` plus a running total of live bytes and its peak, so that a
//! target can be held to a memory bound per input ("no unbounded allocation": a declared
//! length of 999999999 must not be allocated).
//!
//! The fuzz loop runs on one thread; the counters are global atomics, so anything another
//! thread allocates at the same time would count too (nothing does while a target runs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::Relaxed};

/// Larger single requests are reported at once (with the input being processed), before the
/// system allocator is even asked: on a request it cannot serve the process aborts, and the
/// report is all that is left.
const HUGE: usize = 1 << 30;

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The input being processed and its target, for the report of a huge request (plain
/// pointers and lengths: the allocator must not allocate to describe an allocation).
static INPUT_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);
static TARGET_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static TARGET_LEN: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn grew(n: usize) {
    if n > HUGE {
        report_huge(n);
    }
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn shrank(n: usize) {
    LIVE.fetch_sub(n, Relaxed);
}

// SAFETY (the whole impl): every method forwards its arguments unchanged to `System`, which
// upholds `GlobalAlloc`'s contract; the only addition is counting the sizes with atomics,
// which neither allocates nor unwinds (`report_huge` writes to stderr from stack buffers).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees on `layout` are passed on to `System` as they are.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from this allocator (i.e. `System`), `new_size` is the
        // caller's, all passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Count the new block before releasing the old one: a peak, not an average.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the peak of live bytes above the level on entry.
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

/// Names the input a huge request would be reported with. `input` and `target` must stay
/// alive until [`clear_current`].
pub fn set_current(target: &'static str, input: &[u8]) {
    TARGET_PTR.store(target.as_ptr().cast_mut(), Relaxed);
    TARGET_LEN.store(target.len(), Relaxed);
    INPUT_PTR.store(input.as_ptr().cast_mut(), Relaxed);
    INPUT_LEN.store(input.len(), Relaxed);
}

pub fn clear_current() {
    INPUT_PTR.store(std::ptr::null_mut(), Relaxed);
    INPUT_LEN.store(0, Relaxed);
}

/// Writes what a single huge request was made for, without allocating.
#[cold]
fn report_huge(n: usize) {
    let mut err = std::io::stderr().lock();
    let mut num = [0u8; 20];
    let mut i = num.len();
    let mut v = n;
    loop {
        i -= 1;
        num[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let _ = err.write_all(b"\nfuzz: FAIL: a single allocation of ");
    let _ = err.write_all(&num[i..]);
    let _ = err.write_all(b" bytes (over 1 GiB)");
    let input = INPUT_PTR.load(Relaxed);
    if input.is_null() {
        let _ = err.write_all(b"\n");
        return;
    }
    // SAFETY: `set_current` stored a live `&'static str` and a slice that the fuzz loop keeps
    // alive (and unmodified) until `clear_current`; both are only read here.
    let (target, input) = unsafe {
        (
            std::slice::from_raw_parts(TARGET_PTR.load(Relaxed), TARGET_LEN.load(Relaxed)),
            std::slice::from_raw_parts(input, INPUT_LEN.load(Relaxed)),
        )
    };
    let _ = err.write_all(b" by target ");
    let _ = err.write_all(target);
    let _ = err.write_all(b"; input (hex):\n");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for chunk in input.chunks(512) {
        let mut line = [0u8; 1024];
        for (j, &b) in chunk.iter().enumerate() {
            line[2 * j] = HEX[(b >> 4) as usize];
            line[2 * j + 1] = HEX[(b & 15) as usize];
        }
        let _ = err.write_all(&line[..2 * chunk.len()]);
    }
    let _ = err.write_all(b"\n");
}
