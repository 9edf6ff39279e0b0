//! A notification for tasks of one worker thread: the single-threaded counterpart of
//! `tokio::sync::Notify` for the hot path.
//!
//! Every shard connection and every client session waits on these per loop turn. tokio's
//! `Notify` is thread-safe (atomics, an intrusive waiter list, a lock), which callgrind showed
//! costing about 12% of the proxy's instructions per GET; here a waker slot and a permit flag
//! in `Cell`s do, since notifier and waiter always live on the same worker thread.
//!
//! Semantics used by slotgate: `notify_one` stores a permit (wakes the waiter if one is
//! registered); `notified().await` consumes it. At most one task waits at a time; a dropped
//! `Notified` leaves a stale waker, which only causes a harmless spurious wake-up.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

#[derive(Default)]
pub struct LocalNotify {
    permit: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a permit and wakes the waiting task, if any.
    pub fn notify_one(&self) {
        self.permit.set(true);
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Completes when a permit is (or becomes) available, consuming it.
    pub fn notified(&self) -> Notified<'_> {
        Notified { n: self }
    }
}

/// A waker that remembers it was woken, wrapping a task's own waker.
///
/// A session registers this (instead of its task's waker) for read readiness. When it is woken
/// for another reason (a reply arrived) and the flag is clear, its read interest is still
/// registered with the I/O driver and the socket has not become readable since, so polling
/// the read again can be skipped: tokio's readiness poll takes a lock and compares wakers,
/// about 150 instructions per unpipelined request in callgrind.
pub struct FlagWaker {
    woken: AtomicBool,
    task: Waker,
}

impl FlagWaker {
    /// A waker for `task` and the flag it sets.
    pub fn new(task: Waker) -> (Arc<FlagWaker>, Waker) {
        let flag = Arc::new(FlagWaker {
            woken: AtomicBool::new(false),
            task,
        });
        let waker = Waker::from(flag.clone());
        (flag, waker)
    }

    /// Whether the waker was woken since the last call.
    #[inline]
    pub fn take(&self) -> bool {
        self.woken.swap(false, Ordering::Acquire)
    }
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// The future of [`LocalNotify::notified`].
pub struct Notified<'a> {
    n: &'a LocalNotify,
}

impl LocalNotify {
    /// Consumes the permit if there is one; otherwise registers `cx`'s waker.
    #[inline]
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.replace(false) {
            return Poll::Ready(());
        }
        let mut w = self.waker.borrow_mut();
        match &*w {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.n.poll_notified(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_waker_records_its_wake_ups_and_wakes_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let (flag, waker) = FlagWaker::new(Waker::from(count.clone()));
        assert!(!flag.take());
        waker.wake_by_ref();
        assert!(flag.take());
        assert!(!flag.take(), "take clears the flag");
        waker.wake();
        assert!(flag.take());
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn permit_before_and_after_waiting() {
        let n = std::rc::Rc::new(LocalNotify::new());
        n.notify_one();
        n.notified().await; // the stored permit
        let n2 = n.clone();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let waiter = tokio::task::spawn_local(async move { n2.notified().await });
                tokio::task::yield_now().await;
                n.notify_one();
                waiter.await.unwrap();
            })
            .await;
    }
}
