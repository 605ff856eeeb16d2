//! Simulated time: an event queue ordered by (time, insertion order) and the loop that interleaves
//! events with [`Actor`]s. Shared by every simulated world so that all of them order time the same way.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

struct Scheduled<K> {
    at: u64,
    seq: u64,
    item: K,
}

impl<K> PartialEq for Scheduled<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<K> Eq for Scheduled<K> {}
impl<K> PartialOrd for Scheduled<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Scheduled<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A logical clock in milliseconds and the events scheduled on it. Events at the same time run in the
/// order they were scheduled, which keeps runs deterministic.
pub struct Scheduler<K> {
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled<K>>>,
    /// The last [`Scheduler::history_stamp`] handed out.
    last_stamp: u64,
}

impl<K> Default for Scheduler<K> {
    fn default() -> Self {
        Scheduler {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            last_stamp: 0,
        }
    }
}

impl<K> Scheduler<K> {
    /// The current simulated time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// A time for a history (nanoseconds): at the current millisecond, and strictly after every stamp
    /// handed out before. Many things happen within one simulated millisecond, one after another (a
    /// clerk's operation completes and its next begins); a history stamped with the millisecond alone
    /// would show them touching, which a checker must take as concurrent, and a stale read straight
    /// after a write would pass.
    pub fn history_stamp(&mut self) -> u64 {
        let stamp = (self.now * 1_000_000).max(self.last_stamp + 1);
        self.last_stamp = stamp;
        stamp
    }

    /// Schedule `item` at time `at` (not before now).
    pub fn schedule(&mut self, at: u64, item: K) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: at.max(self.now),
            seq: self.seq,
            item,
        }));
    }

    /// When the next event is due.
    pub fn next_time(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse(s)| s.at)
    }

    /// Take the next event, moving the clock to its time.
    pub fn pop(&mut self) -> Option<K> {
        let Reverse(scheduled) = self.queue.pop()?;
        self.now = scheduled.at;
        Some(scheduled.item)
    }

    /// Move the clock forward to `t` (never back).
    pub fn advance_to(&mut self, t: u64) {
        self.now = self.now.max(t);
    }
}

/// A simulated world: a clock and the handler of the events scheduled on it.
pub trait World {
    /// What is scheduled on the clock.
    type Event;
    /// The world's clock.
    fn clock(&self) -> &Scheduler<Self::Event>;
    /// The world's clock, to schedule on or advance.
    fn clock_mut(&mut self) -> &mut Scheduler<Self::Event>;
    /// Run one event (the clock already shows its time).
    fn handle_event(&mut self, event: Self::Event);
}

/// A concurrent participant in a simulation (a client, a nemesis): woken at the time it asks for.
pub trait Actor<W> {
    /// When to wake next (simulated ms); `None` once finished.
    fn next_wake(&self) -> Option<u64>;
    /// Do one step.
    fn wake(&mut self, world: &mut W);
}

/// Run events and actors in time order until `until` (or, with `u64::MAX`, until every actor finished).
/// At equal times actors go first, as a test's own code would.
pub fn run_until<W: World>(world: &mut W, until: u64, actors: &mut [&mut dyn Actor<W>]) {
    loop {
        let now = world.clock().now();
        let next_actor = actors
            .iter()
            .enumerate()
            .filter_map(|(k, a)| a.next_wake().map(|t| (t.max(now), k)))
            .min();
        if until == u64::MAX && next_actor.is_none() {
            return;
        }
        let next_event = world.clock().next_time();
        match (next_actor, next_event) {
            (Some((t, k)), e) if t <= until && e.is_none_or(|e| t <= e) => {
                world.clock_mut().advance_to(t);
                actors[k].wake(world);
            }
            (_, Some(e)) if e <= until => {
                if let Some(event) = world.clock_mut().pop() {
                    world.handle_event(event);
                }
            }
            _ => {
                world.clock_mut().advance_to(until);
                return;
            }
        }
    }
}
