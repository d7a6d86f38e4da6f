//! Ack coalescing: one `basic.ack(multiple)` frame for a run of finished deliveries instead of
//! one frame each.
//!
//! Every ack costs a trip through lapin's I/O loop on our side and a frame to process on the
//! broker's; profiling a cast flood put the ack path at about a sixth of the daemon's CPU, and
//! the broker's per-frame work at more. RabbitMQ's guidance is to ack in batches with
//! `multiple`, which covers *every* unacked delivery up to a tag on the channel. Deliveries finish
//! out of order, so a batch may only cover tags whose deliveries are all settled.
//!
//! A channel's delivery tags are 1, 2, 3, … in the order the broker sent them, whichever of the
//! channel's consumers they went to. So "every tag up to `through` is settled" is exact without
//! registering deliveries as they arrive: a tag not yet seen, still being handled, or abandoned
//! (its `Delivery` dropped unsettled) is simply not settled, and stops the run there.
//!
//! A finished delivery's ack goes out at once when the run reaches the last tag delivered so
//! far (nothing in flight could join it: one call at a time pays no delay). Otherwise it waits
//! until enough of the run is ready (a quarter of the prefetch, so the broker never runs out of
//! window while acks wait) or [`LINGER`] passes; then whoever noticed sends the run in one
//! frame. A delivery still held back by an unsettled tag below it when its linger ends (a slow
//! invocation, a gap that never fills) is acked on its own, so one straggler delays its
//! neighbours' acks by at most `LINGER` and never stalls the consumer. `ack` returns once the
//! frame carrying the delivery is sent, so callers still know whether the broker got it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::oneshot;

/// How long a finished delivery's ack may wait to share a frame. Replies are sent before the
/// ack, so this delays only the broker's bookkeeping (and a redelivery after a crash inside
/// the window, which `_unique_id` deduplication absorbs like any other).
pub(crate) const LINGER: Duration = Duration::from_millis(2);

/// The most acks one frame is made to wait for.
const MAX_BATCH: usize = 32;

type Sent = Result<bool, lapin::Error>;

/// One channel's acks. Shared by its consumers' deliveries.
pub(crate) struct Acks {
    /// The frames go out through the channel's own `basic_ack`; see [`Acks::send`]. This
    /// handle, shared by every delivery, keeps lapin from closing the channel on drop while
    /// any delivery is left; nothing relies on that close, since the daemon drains a channel's
    /// deliveries and then closes it explicitly (`server.rs`).
    channel: lapin::Channel,
    state: Mutex<State<Waiting>>,
    /// Ready acks that trigger a frame at once; see [`Acks::set_prefetch`].
    batch: AtomicUsize,
    /// The highest tag handed to a consumer loop so far.
    seen: AtomicU64,
}

struct State<W> {
    /// Every tag up to here is acked or rejected (or being, in the frame in flight).
    through: u64,
    /// Tags above `through` settled on their own (rejected, or acked alone after lingering).
    /// Bounded by the channel's unacked deliveries, which the prefetch bounds, as long as
    /// every delivery settles. One dropped unsettled pins `through` below it; that happens
    /// only as the channel's consumers stop, and the channel, with this, is closed next.
    settled: BTreeSet<u64>,
    /// Deliveries waiting for their ack to be sent. Bounded like `settled`.
    ready: BTreeMap<u64, W>,
    /// A task is sending a frame; others leave the flushing to it.
    flushing: bool,
}

impl<W> Default for State<W> {
    fn default() -> Self {
        Self {
            through: 0,
            settled: BTreeSet::new(),
            ready: BTreeMap::new(),
            flushing: false,
        }
    }
}

struct Waiting {
    acker: Acker,
    sent: oneshot::Sender<Sent>,
}

impl<W> State<W> {
    /// The run of settled-or-ready tags just above `through`: how many of them are ready acks,
    /// and its last tag (`through` when the run is empty).
    fn run(&self) -> (usize, u64) {
        let mut ready = 0;
        let mut tag = self.through + 1;
        loop {
            if self.ready.contains_key(&tag) {
                ready += 1;
            } else if !self.settled.contains(&tag) {
                return (ready, tag - 1);
            }
            tag += 1;
        }
    }

    /// Whether the ready run should be sent now: it is big enough, or it reaches the last tag
    /// delivered (`seen`), so nothing that could join it is in flight and waiting would only
    /// delay the ack (a lone call at a time must not pay the linger).
    fn due(&self, batch: usize, seen: u64) -> bool {
        let (ready, last) = self.run();
        ready >= batch || (ready > 0 && last >= seen)
    }

    /// Take the run just above `through`: advance `through` over it and return its ready acks,
    /// highest tag last.
    fn take_run(&mut self) -> Vec<(u64, W)> {
        let mut taken = Vec::new();
        loop {
            let tag = self.through + 1;
            if let Some(waiting) = self.ready.remove(&tag) {
                taken.push((tag, waiting));
            } else if !self.settled.remove(&tag) {
                return taken;
            }
            self.through = tag;
        }
    }
}

/// How many ready acks make a frame at once for a consumer prefetch of `prefetch` (0:
/// unlimited).
fn batch_for(prefetch: u16) -> usize {
    match usize::from(prefetch) {
        0 => MAX_BATCH,
        p => (p / 4).clamp(1, MAX_BATCH),
    }
}

impl Acks {
    /// The acks of `channel`'s deliveries; until a prefetch is set, nothing waits.
    pub(crate) fn new(channel: lapin::Channel) -> Self {
        Self {
            channel,
            state: Mutex::default(),
            batch: AtomicUsize::new(1),
            seen: AtomicU64::new(0),
        }
    }

    /// Size batches for a consumer prefetch of `prefetch` (0: unlimited).
    pub(crate) fn set_prefetch(&self, prefetch: u16) {
        self.batch.store(batch_for(prefetch), Ordering::Relaxed);
    }

    /// Record that delivery `tag` was handed out: until it settles, later acks may wait for it.
    pub(crate) fn seen(&self, tag: u64) {
        self.seen.fetch_max(tag, Ordering::Relaxed);
    }

    fn due(&self, state: &State<Waiting>) -> bool {
        !state.flushing && state.due(self.batch(), self.seen.load(Ordering::Relaxed))
    }

    fn batch(&self) -> usize {
        self.batch.load(Ordering::Relaxed).max(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<Waiting>> {
        // The state is consistent between statements; a panic elsewhere cannot tear it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Acknowledge delivery `tag` (whose own acker is `acker`); returns once a frame covering it
    /// was sent, with that frame's result.
    pub(crate) async fn ack(&self, tag: u64, acker: &Acker) -> Sent {
        let (sent, mut done) = oneshot::channel();
        let lead = {
            let mut state = self.lock();
            state.ready.insert(
                tag,
                Waiting {
                    acker: acker.clone(),
                    sent,
                },
            );
            let lead = self.due(&state);
            state.flushing |= lead;
            lead
        };
        if lead {
            self.flush().await;
        }
        loop {
            match tokio::time::timeout(LINGER, &mut done).await {
                Ok(Ok(sent)) => return sent,
                // Only `flush` takes the sender, and it sends unless its future was dropped
                // mid-frame; then whether the frame went out is unknown, so not acked.
                Ok(Err(_)) => return Ok(false),
                Err(_lingered) => {}
            }
            let lead = {
                let mut state = self.lock();
                let lead = !state.flushing;
                state.flushing = true;
                lead
            };
            if !lead {
                continue;
            }
            self.flush().await;
            let alone = self.lock().ready.remove(&tag);
            if let Some(waiting) = alone {
                // Still held back by an unsettled tag below: ack this one alone.
                let sent = self.send(&waiting.acker, tag, false).await;
                // As with a reject: a tag whose frame failed is not settled, so no run covers
                // it (the channel is gone anyway).
                if matches!(sent, Ok(true)) {
                    self.settled(tag).await;
                }
                return sent;
            }
        }
    }

    /// Record that `tag` was settled outside a batch (rejected, or acked alone), so that runs
    /// can pass over it; send the run if that makes one big enough.
    pub(crate) async fn settled(&self, tag: u64) {
        let lead = {
            let mut state = self.lock();
            if tag > state.through {
                state.settled.insert(tag);
            }
            let lead = self.due(&state);
            state.flushing |= lead;
            lead
        };
        if lead {
            self.flush().await;
        }
    }

    /// Send the ready run, then any run that grew big enough meanwhile. The caller has set
    /// `flushing`; this clears it.
    async fn flush(&self) {
        // Two flushers at once could write their frames out of order, and a frame naming a
        // tag that a later-numbered frame already covered closes the channel. So `flushing`
        // is cleared only under the lock as the loop ends, or by this guard if the future is
        // dropped mid-frame.
        let mut guard = Flushing(Some(self));
        let mut first = true;
        loop {
            let run = {
                let mut state = self.lock();
                let seen = self.seen.load(Ordering::Relaxed);
                if !first && !state.due(self.batch(), seen) {
                    state.flushing = false;
                    guard.0 = None;
                    return;
                }
                let run = state.take_run();
                if run.is_empty() {
                    state.flushing = false;
                    guard.0 = None;
                    return;
                }
                run
            };
            first = false;
            let Some((tag, top)) = run.last() else {
                continue;
            };
            let sent = self.send(&top.acker, *tag, run.len() > 1).await;
            for (_, waiting) in run {
                let _ = waiting.sent.send(sent.clone());
            }
        }
    }

    /// Send one `basic.ack` for `tag` (and, with `multiple`, every tag below it) on the channel
    /// itself. lapin's `Acker::ack` hands the frame to its internal RPC task, which spawns
    /// another task to send it and completes the acker's promise from there: four task
    /// wake-ups per ack, mostly across threads, where the channel's own method has one (the
    /// frame written). Kept from the acker: nothing is sent once it is poisoned (its channel
    /// closed or failed), `Ok(false)` as the acker says it; single use is
    /// `Delivery::settled`'s job.
    async fn send(&self, acker: &Acker, tag: u64, multiple: bool) -> Sent {
        if acker.poisoned() {
            return Ok(false);
        }
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map(|()| true)
    }
}

/// Clears `flushing` if a flush is abandoned half way (its task cancelled).
struct Flushing<'a>(Option<&'a Acks>);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        if let Some(acks) = self.0 {
            acks.lock().flushing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(through: u64, settled: &[u64], ready: &[u64]) -> State<()> {
        State {
            through,
            settled: settled.iter().copied().collect(),
            ready: ready.iter().map(|&t| (t, ())).collect(),
            flushing: false,
        }
    }

    #[test]
    fn a_run_stops_at_the_first_unsettled_tag() {
        let mut s = state(0, &[2], &[1, 3, 5, 6]);
        assert_eq!(s.run(), (2, 3));
        let run: Vec<u64> = s.take_run().into_iter().map(|(t, _)| t).collect();
        assert_eq!(run, [1, 3]);
        assert_eq!(s.through, 3);
        assert!(s.settled.is_empty());
        assert_eq!(s.ready.keys().copied().collect::<Vec<_>>(), [5, 6]);
        // 4 is still out: nothing more is taken, however much waits above it.
        assert!(s.take_run().is_empty());
        assert_eq!(s.through, 3);
    }

    #[test]
    fn settled_tags_alone_advance_the_floor_without_a_frame() {
        let mut s = state(7, &[8, 9], &[]);
        assert_eq!(s.run(), (0, 9));
        assert!(s.take_run().is_empty());
        assert_eq!(s.through, 9);
        assert!(s.settled.is_empty());
    }

    #[test]
    fn a_run_is_due_when_big_enough_or_when_nothing_delivered_is_left_out() {
        let s = state(0, &[], &[1, 2, 3, 4, 5]);
        assert!(s.due(3, 100), "five ready, three make a batch");
        assert!(!s.due(16, 100), "others are in flight: wait for more");
        assert!(s.due(16, 5), "everything delivered is in the run");
        let gap = state(0, &[], &[2]);
        assert!(!gap.due(1, 2), "1 is not settled: nothing to send");
        assert!(
            !state(3, &[4], &[]).due(1, 4),
            "settled alone needs no frame"
        );
    }

    #[test]
    fn batches_follow_the_prefetch() {
        for (prefetch, batch) in [
            (1, 1),
            (4, 1),
            (8, 2),
            (64, 16),
            (1000, MAX_BATCH),
            (0, MAX_BATCH),
        ] {
            assert_eq!(batch_for(prefetch), batch, "prefetch {prefetch}");
        }
    }
}
