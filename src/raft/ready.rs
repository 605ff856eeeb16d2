//! `Ready`: everything the core asks its driver to do after a batch of inputs.

use super::log::LogWrite;
use super::message::Envelope;
use super::read_only::ReadState;
use super::types::{Entry, HardState, NodeId, Role, Snapshot, Term};

/// The output of the core. The driver must handle the parts **in this order**:
///
/// 1. persist `snapshot` (then delete stored entries up to its index), `log_write` and `hard_state`, and
///    flush: nothing below may happen before they are durable;
/// 2. send `messages`;
/// 3. if `snapshot_to_apply` is set, restore the service from it;
/// 4. apply `committed_entries` in order, then answer `read_states` once applied reaches their index and
///    fail `failed_reads`.
///
/// Persisting before sending is what makes a vote or an acknowledgement a promise that survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    /// Term, vote and commit index, if they changed.
    pub hard_state: Option<HardState>,
    /// A snapshot to store: the service compacted the log, or a leader sent one.
    pub snapshot: Option<Snapshot>,
    /// Log entries to (re)write.
    pub log_write: Option<LogWrite>,
    /// Messages to send once the above is durable.
    pub messages: Vec<Envelope>,
    /// A leader's snapshot (or, after a restart, the stored one) the service must load before applying.
    pub snapshot_to_apply: Option<Snapshot>,
    /// Committed entries to apply, contiguous and in order.
    pub committed_entries: Vec<Entry>,
    /// Reads confirmed by a quorum.
    pub read_states: Vec<ReadState>,
    /// Reads that cannot be confirmed (leadership lost); the client should retry elsewhere.
    pub failed_reads: Vec<u64>,
    /// Role, leader and term after this batch, for the service and for status reports.
    pub soft_state: SoftState,
}

impl Ready {
    /// Whether the driver has anything to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.log_write.is_none()
            && self.messages.is_empty()
            && self.snapshot_to_apply.is_none()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
            && self.failed_reads.is_empty()
    }

    /// Whether anything must be persisted (and flushed) before the messages go out.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || self.snapshot.is_some() || self.log_write.is_some()
    }
}

/// Volatile state that the service and operators care about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The node's role.
    pub role: Role,
    /// The leader this node believes in, if any.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: Term,
}

impl Default for SoftState {
    fn default() -> Self {
        SoftState {
            role: Role::Follower,
            leader: None,
            term: 0,
        }
    }
}
