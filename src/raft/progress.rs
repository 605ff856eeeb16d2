//! What a leader knows about one follower's log, and how much it may send it.
//!
//! Three states, as in etcd-io/raft: **Probe** (we do not know where the follower's log diverges: one
//! AppendEntries at a time until it answers), **Replicate** (it matches up to `match_index`: stream entries
//! optimistically, at most `max_inflight` unacknowledged messages) and **Snapshot** (it needs entries we
//! compacted: wait for the snapshot to land).

use super::types::Index;
use std::collections::VecDeque;

/// Replication state of one follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Find the point where the logs match; `sent` pauses sending until a reply or a heartbeat.
    Probe {
        /// An AppendEntries is outstanding.
        sent: bool,
    },
    /// Stream entries; each in-flight message is remembered by its last index.
    Replicate {
        /// Last index of every unacknowledged AppendEntries that carried entries.
        inflight: VecDeque<Index>,
        /// Heartbeat intervals that passed with messages in flight and no acknowledgement. After one, the
        /// messages are presumed lost and the follower is probed again.
        stalled: u32,
    },
    /// A snapshot up to `index` was sent; `ticks` counts time since, to resend if it was lost.
    Snapshot {
        /// The snapshot's last index.
        index: Index,
        /// Ticks since it was sent.
        ticks: u32,
    },
}

/// The leader's view of one follower.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be replicated on the follower.
    pub match_index: Index,
    /// Next index to send.
    pub next_index: Index,
    /// Flow-control state.
    pub state: ProgressState,
    /// Heard from the follower since the last CheckQuorum round.
    pub recent_active: bool,
    /// Highest ReadIndex round the follower acknowledged in this term.
    pub read_round: u64,
}

impl Progress {
    /// A follower just after an election: assume it matches nothing and probe from the leader's end.
    pub fn new(next_index: Index) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe { sent: false },
            recent_active: false,
            read_round: 0,
        }
    }

    /// Record that the follower matches up to `index`. Returns whether anything advanced.
    pub fn acknowledge(&mut self, index: Index) -> bool {
        let advanced = index > self.match_index;
        if advanced {
            self.match_index = index;
        }
        if self.next_index < index + 1 {
            self.next_index = index + 1;
        }
        match &mut self.state {
            ProgressState::Probe { .. } => {
                self.state = ProgressState::Replicate {
                    inflight: VecDeque::new(),
                    stalled: 0,
                };
            }
            ProgressState::Replicate { inflight, stalled } => {
                while inflight.front().is_some_and(|&last| last <= index) {
                    inflight.pop_front();
                }
                if advanced {
                    *stalled = 0;
                }
            }
            ProgressState::Snapshot { index: pending, .. } => {
                if index >= *pending {
                    self.state = ProgressState::Probe { sent: false };
                }
            }
        }
        advanced
    }

    /// Start probing again from `next_index` (after a rejection or presumed loss).
    pub fn probe_from(&mut self, next_index: Index) {
        self.next_index = next_index.max(self.match_index + 1);
        self.state = ProgressState::Probe { sent: false };
    }

    /// Whether an AppendEntries with entries may be sent now.
    pub fn can_send(&self, max_inflight: usize) -> bool {
        match &self.state {
            ProgressState::Probe { sent } => !sent,
            ProgressState::Replicate { inflight, .. } => inflight.len() < max_inflight,
            ProgressState::Snapshot { .. } => false,
        }
    }

    /// Record that an AppendEntries whose entries end at `last` was sent.
    pub fn sent_entries(&mut self, last: Index) {
        match &mut self.state {
            ProgressState::Probe { sent } => *sent = true,
            ProgressState::Replicate { inflight, .. } => {
                inflight.push_back(last);
                self.next_index = last + 1;
            }
            ProgressState::Snapshot { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgement_moves_a_probe_to_replicate_and_frees_inflight() {
        let mut p = Progress::new(5);
        assert!(p.can_send(2));
        p.sent_entries(6);
        assert!(!p.can_send(2));
        p.acknowledge(6);
        assert!(matches!(p.state, ProgressState::Replicate { .. }));
        p.sent_entries(8);
        p.sent_entries(9);
        assert!(!p.can_send(2));
        assert_eq!(p.next_index, 10);
        p.acknowledge(8);
        assert!(p.can_send(2));
        assert_eq!(p.match_index, 8);
    }

    #[test]
    fn probing_never_goes_below_the_match() {
        let mut p = Progress::new(5);
        p.acknowledge(4);
        p.probe_from(2);
        assert_eq!(p.next_index, 5);
    }
}
