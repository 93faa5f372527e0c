//! The bounded queue between the hub and one subscription.
//!
//! One producer (the hub, under its lock) and one consumer (the subscription's stream). It does
//! what the hub needs from a channel and no more: a non-blocking `try_send` that reports a full
//! or abandoned queue, the queue's depth for metrics, and an end when the sender is dropped.
//!
//! A queue is bounded twice: in items and in bytes (each item's [`Weigh::weight`]). A count alone
//! let one subscriber that never reads pin `capacity` x the largest payload (64 Ki x 1 MiB). An
//! empty queue always takes one item, however heavy, so a budget smaller than one message
//! still delivers (one at a time) rather than overflowing on every message; the bytes a queue
//! holds are therefore at most its byte budget, or one item larger than it.
//!
//! A general-purpose channel (`tokio::sync::mpsc`) pads its halves to cache lines and allocates
//! its slots in blocks of 32; with one channel per subscriber that was about 0.75 KiB of every
//! idle subscription. Here the shared state is one small allocation, and the slots grow with
//! what is actually queued.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

/// Slots an empty queue keeps; a larger allocation is given back once the queue drains.
const SHRINK_ABOVE: usize = 64;

/// What an item counts for against a queue's byte budget.
pub(crate) trait Weigh {
    /// Bytes this item keeps alive while it is queued.
    fn weight(&self) -> usize;
}

/// A new queue holding at most `capacity` items (at least 1) and, beyond its first item, at most
/// `max_bytes` of their weight.
pub(crate) fn bounded<T: Weigh>(capacity: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        items: VecDeque::new(),
        bytes: 0,
        capacity: capacity.max(1),
        max_bytes,
        waker: None,
        sender_dropped: false,
        receiver_dropped: false,
    }));
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct State<T> {
    items: VecDeque<T>,
    /// Sum of the queued items' weights.
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
    /// The receiver, parked on an empty queue.
    waker: Option<Waker>,
    sender_dropped: bool,
    receiver_dropped: bool,
}

type Shared<T> = Arc<Mutex<State<T>>>;

fn lock<T>(shared: &Shared<T>) -> MutexGuard<'_, State<T>> {
    // Nothing panics while holding this lock; if something did, the queue is still consistent.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why [`Sender::try_send`] did not queue an item.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// The queue holds `capacity` items, or the item would take it over `max_bytes`.
    Full(Bound),
    /// The receiver is gone.
    Closed,
}

/// Which bound a full queue reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// Its length in items.
    Items,
    /// Its byte budget.
    Bytes,
}

/// The hub's end. Dropping it ends the queue: the receiver drains what is queued, then gets
/// `None`.
pub(crate) struct Sender<T> {
    shared: Shared<T>,
}

impl<T: Weigh> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone; never waits.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let weight = item.weight();
        let waker = {
            let mut state = lock(&self.shared);
            if state.receiver_dropped {
                return Err(TrySendError::Closed);
            }
            if state.items.len() >= state.capacity {
                return Err(TrySendError::Full(Bound::Items));
            }
            if !state.items.is_empty() && state.bytes.saturating_add(weight) > state.max_bytes {
                return Err(TrySendError::Full(Bound::Bytes));
            }
            state.bytes += weight;
            state.items.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// A view of this queue's depth for metrics, readable without the hub's lock.
    pub(crate) fn gauge(&self) -> Gauge<T> {
        Gauge {
            shared: Arc::downgrade(&self.shared),
        }
    }
}

/// Reads a queue's depth. It neither keeps the queue alive nor counts as its sender: a queue
/// whose sender is gone (its subscription ended, or lagged and not yet re-armed) reads as none.
pub(crate) struct Gauge<T> {
    shared: Weak<Mutex<State<T>>>,
}

impl<T> Gauge<T> {
    /// Items queued and not yet received, and their weight, while the sender lives.
    pub(crate) fn depth(&self) -> Option<(usize, usize)> {
        let shared = self.shared.upgrade()?;
        let state = lock(&shared);
        (!state.sender_dropped).then_some((state.items.len(), state.bytes))
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = lock(&self.shared);
            state.sender_dropped = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The subscription's end.
pub(crate) struct Receiver<T> {
    shared: Shared<T>,
}

impl<T: Weigh> Receiver<T> {
    /// The next item; `None` once the sender is dropped and the queue is drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = lock(&self.shared);
        if let Some(item) = state.items.pop_front() {
            state.bytes -= item.weight();
            if state.items.is_empty() && state.items.capacity() > SHRINK_ABOVE {
                // After a burst, an idle subscriber gives the slots back.
                state.items.shrink_to_fit();
            }
            return Poll::Ready(Some(item));
        }
        if state.sender_dropped {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.receiver_dropped = true;
        // Queued items are dropped with the last handle, not under the lock here.
        let items = std::mem::take(&mut state.items);
        drop(state);
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    impl Weigh for u32 {
        fn weight(&self) -> usize {
            *self as usize
        }
    }

    impl Weigh for i32 {
        fn weight(&self) -> usize {
            1
        }
    }

    impl Weigh for char {
        fn weight(&self) -> usize {
            1
        }
    }

    #[tokio::test]
    async fn delivers_in_order_then_ends_when_the_sender_is_dropped() {
        let (tx, mut rx) = bounded(4, usize::MAX);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.gauge().depth().unwrap(), (2, 2));
        drop(tx);
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(2));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[test]
    fn full_and_closed_are_reported_without_waiting() {
        let (tx, rx) = bounded(2, usize::MAX);
        tx.try_send('a').unwrap();
        tx.try_send('b').unwrap();
        assert_eq!(tx.try_send('c'), Err(TrySendError::Full(Bound::Items)));
        drop(rx);
        assert_eq!(tx.try_send('d'), Err(TrySendError::Closed));
    }

    #[test]
    fn the_byte_budget_bounds_a_queue_but_an_empty_queue_takes_one_item() {
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = Waker::from(wakes);
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = bounded::<u32>(100, 10);
        tx.try_send(4).unwrap();
        tx.try_send(6).unwrap();
        assert_eq!(tx.try_send(1), Err(TrySendError::Full(Bound::Bytes)));
        assert_eq!(tx.gauge().depth().unwrap(), (2, 10));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(4)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(6)));
        assert_eq!(
            tx.gauge().depth().unwrap(),
            (0, 0),
            "received items free their bytes"
        );
        tx.try_send(50).unwrap();
        assert_eq!(
            tx.try_send(1),
            Err(TrySendError::Full(Bound::Bytes)),
            "an item over the budget is taken alone"
        );
    }

    /// Counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gauge_reads_nothing_once_the_sender_is_gone_and_keeps_nothing_alive() {
        let (tx, rx) = bounded::<u32>(4, 100);
        let gauge = tx.gauge();
        tx.try_send(3).unwrap();
        assert_eq!(gauge.depth(), Some((1, 3)));
        drop(tx);
        assert_eq!(
            gauge.depth(),
            None,
            "a lagged or ended subscription's queue"
        );
        drop(rx);
        assert!(gauge.shared.upgrade().is_none(), "the queue is freed");
    }

    #[test]
    fn a_parked_receiver_is_woken_by_a_send_and_by_the_end() {
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        let (tx, mut rx) = bounded::<u32>(1, usize::MAX);

        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        tx.try_send(7).unwrap();
        assert_eq!(count(), 1, "a send wakes the parked receiver");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(7)));

        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(count(), 2, "the end wakes it too");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_drained_queue_gives_back_a_large_allocation() {
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = Waker::from(wakes);
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = bounded::<i32>(1000, usize::MAX);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        while let Poll::Ready(Some(_)) = rx.poll_recv(&mut cx) {}
        assert!(lock(&tx.shared).items.capacity() <= SHRINK_ABOVE);
    }
}
