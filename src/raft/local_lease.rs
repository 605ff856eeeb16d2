//! A leader's read lease as its driver last published it, so that a lease read is answered on the
//! caller's own task instead of a round trip through the driver's queue (TiKV's "local reader").
//!
//! With 64 clients reading from the lease, that round trip — a command on the driver's channel, a
//! wake-up of the driver, a reply on a oneshot and a wake-up of the caller — was a fixed cost per read
//! on top of gRPC's. The driver publishes what the core would answer: the commit index to read at and
//! the instant, on the clock the lease is measured with, at which the core's lease ends.
//!
//! **Why this is exactly as safe as asking the driver.** The core grants a lease read while its tick
//! count is below `from + lease_ticks` ([`super::config::Config::lease_ticks`]). With lease reads, ticks
//! are delivered by CLOCK_BOOTTIME (`WallTicks` in [`super::node`]): the core's next tick is the wall
//! clock's tick `delivered + 1`, due at `start + (delivered + 1) × tick`, so the core stops granting
//! once the wall clock reaches `start + (delivered + ticks_left) × tick` — the deadline published here,
//! and the reader compares it with CLOCK_BOOTTIME itself (which runs on while the process is stopped,
//! so a node that wakes from SIGSTOP finds its lease gone before it reads). Revocations — a transfer
//! (whose TimeoutNow lets the target campaign past the followers' promise), a configuration change
//! (new voters made no promise), a step-down — happen in the core while it handles an input and are
//! published before the driver sends anything that pass produced.

use super::types::Index;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// The published lease: shared by the driver (which writes it) and every [`super::node::RaftHandle`].
#[derive(Debug, Default)]
pub struct PublishedLease {
    /// CLOCK_BOOTTIME, in nanoseconds, at which the lease ends; 0: no lease.
    until_nanos: AtomicU64,
    /// The index a read under the lease waits for the service to apply: a commit index of an entry of
    /// the leader's own term, so at or past every write acknowledged by an earlier leader. (Writes this
    /// leader acknowledges later are applied before they are acknowledged, so a read sees them.)
    index: AtomicU64,
}

impl PublishedLease {
    /// Publish a lease ending at `until` (CLOCK_BOOTTIME) for reads at `index`, or revoke it (`None`).
    pub fn publish(&self, grant: Option<(Index, Duration)>) {
        match grant {
            // The index first: a reader that sees the new deadline sees this index or a later one.
            Some((index, until)) => {
                self.index.store(index, SeqCst);
                self.until_nanos.store(nanos(until).max(1), SeqCst);
            }
            None => self.until_nanos.store(0, SeqCst),
        }
    }

    /// The index to read at if the lease holds at `now` (CLOCK_BOOTTIME), else `None`: ask the driver.
    pub fn read_index(&self, now: Duration) -> Option<Index> {
        let until = self.until_nanos.load(SeqCst);
        let index = self.index.load(SeqCst);
        (until != 0 && nanos(now) < until).then_some(index)
    }
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

/// When a lease of `ticks_left` more core ticks ends on a tick clock started at `start` that has
/// delivered `delivered` ticks of `tick` each (see the module's doc).
pub fn lease_end(start: Duration, tick: Duration, delivered: u64, ticks_left: u64) -> Duration {
    // In u128 nanoseconds: a tick count past u32 (497 days of 10 ms ticks) must not clamp the end
    // into the past.
    let nanos = tick.as_nanos() * u128::from(delivered.saturating_add(ticks_left));
    start.saturating_add(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lease_answers_until_its_end_and_not_after() {
        let lease = PublishedLease::default();
        assert_eq!(
            lease.read_index(MS),
            None,
            "no lease before one is published"
        );
        lease.publish(Some((7, 100 * MS)));
        assert_eq!(lease.read_index(99 * MS), Some(7));
        assert_eq!(lease.read_index(100 * MS), None, "the end is exclusive");
        assert_eq!(
            lease.read_index(5_000 * MS),
            None,
            "a node waking from a pause"
        );
    }

    #[test]
    fn a_revoked_lease_answers_nothing_however_early() {
        let lease = PublishedLease::default();
        lease.publish(Some((7, 100 * MS)));
        lease.publish(None);
        assert_eq!(lease.read_index(MS), None);
        lease.publish(Some((9, 200 * MS)));
        assert_eq!(lease.read_index(150 * MS), Some(9), "a later grant");
    }

    #[test]
    fn the_end_is_the_wall_clock_tick_at_which_the_core_stops_granting() {
        // Started at 1 s, 10 ms ticks, 30 delivered: the core's next tick is due at 1.31 s; with 3
        // ticks left, the third (1.33 s) ends the lease.
        let end = lease_end(1_000 * MS, 10 * MS, 30, 3);
        assert_eq!(end, 1_330 * MS);
        // After 500 days of 10 ms ticks (past u32 ticks) the end is still ahead.
        let days_500 = 500 * 24 * 3_600 * 100;
        assert_eq!(
            lease_end(MS, 10 * MS, days_500, 3),
            MS + 10 * MS * 3 + Duration::from_secs(500 * 24 * 3_600)
        );
    }
}
