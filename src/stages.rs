//! Where a write's time goes: cumulative per-stage timers that the Raft driver and the replicated
//! service keep, `kvctl status` reports over gRPC and `kvctl bench --breakdown` turns into a per-stage
//! table (issue #14).
//!
//! A stage is a (count, total time) pair rather than a histogram: two readings taken before and after a
//! benchmark subtract into the mean of exactly the operations in between, which is what a breakdown
//! needs, and keeping one costs two additions on the hot path. Percentiles per request live in the
//! Prometheus histograms ([`crate::metrics`]).

use std::time::Duration;

/// The time spent in one stage, summed over the times it was passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTotal {
    /// How many times the stage was passed.
    pub count: u64,
    /// Their total duration, in microseconds.
    pub micros: u64,
}

impl StageTotal {
    /// Counts one pass that took `took`.
    pub fn add(&mut self, took: Duration) {
        self.count += 1;
        self.micros = self
            .micros
            .saturating_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// What happened between an earlier reading `before` and this one (zero if the counters restarted
    /// in between, as after a process restart).
    pub fn since(self, before: StageTotal) -> StageTotal {
        if self.count < before.count || self.micros < before.micros {
            return StageTotal::default();
        }
        StageTotal {
            count: self.count - before.count,
            micros: self.micros - before.micros,
        }
    }

    /// The mean duration of a pass, if there was one.
    pub fn mean(self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.micros / self.count))
    }
}

/// The Raft driver's stages of the write path, as seen by one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStages {
    /// Leader: one persist (write and fsync) of a batch that held new entries.
    pub leader_persist: StageTotal,
    /// Follower: one persist of entries received from the leader, before it acknowledges them.
    pub follower_persist: StageTotal,
    /// Leader: an entry proposed here, from its append to the log until this node saw it committed
    /// (its own flush, the round trip to a quorum of followers and their flushes).
    pub commit: StageTotal,
    /// Entries written by the persists counted above (leader and follower together): entries per
    /// persist is how well proposals are batched.
    pub persisted_entries: u64,
}

/// The replicated service's stages of one write, on the node that served it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStages {
    /// From the request's arrival until Raft gave its entry an index (session check, encoding, the wait
    /// for the Raft loop, which does not take proposals while it persists).
    pub propose: StageTotal,
    /// From the entry's index until the reply (commit, then apply and the waiter's wake-up).
    pub replicate_and_apply: StageTotal,
}

impl RaftStages {
    /// The stages with the names status reports give them.
    pub fn named(&self) -> [(&'static str, StageTotal); 3] {
        [
            ("leader_persist", self.leader_persist),
            ("follower_persist", self.follower_persist),
            ("commit", self.commit),
        ]
    }
}

impl ServiceStages {
    /// The stages with the names status reports give them.
    pub fn named(&self) -> [(&'static str, StageTotal); 2] {
        [
            ("propose", self.propose),
            ("replicate_and_apply", self.replicate_and_apply),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_subtract_into_the_mean_of_what_happened_between() {
        let mut stage = StageTotal::default();
        stage.add(Duration::from_millis(10));
        let before = stage;
        stage.add(Duration::from_millis(2));
        stage.add(Duration::from_millis(4));
        let between = stage.since(before);
        assert_eq!(between.count, 2);
        assert_eq!(between.mean(), Some(Duration::from_millis(3)));
        assert_eq!(StageTotal::default().mean(), None);
        // A restart in between resets the counters: nothing is made up.
        assert_eq!(before.since(stage), StageTotal::default());
    }
}
