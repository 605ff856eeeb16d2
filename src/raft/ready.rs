//! `Ready`: everything the core asks its driver to do after a batch of inputs.

use super::log::LogWrite;
use super::membership::Membership;
use super::message::Envelope;
use super::read_only::{FailedRead, ReadState};
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
/// The one exception is [`Ready::persist_after_send`].
#[derive(Clone, Debug, Default)]
pub struct Ready {
    /// Term, vote and commit index, if they changed.
    pub hard_state: Option<HardState>,
    /// A snapshot to store: the service compacted the log, or a leader sent one.
    pub snapshot: Option<Snapshot>,
    /// Log entries to (re)write.
    pub log_write: Option<LogWrite>,
    /// True when the only thing to persist is a higher commit index in `hard_state`: then it may be
    /// written without a flush, and the rest need not wait for one. Raft never needs the commit index
    /// durable (a restarted node relearns it from the leader; one restored lower merely re-applies
    /// from its snapshot), and what it names is already flushed on a majority, so this saves an
    /// fsync on every write's path from commit to reply (etcd's raft `MustSync` makes the same
    /// exception). It makes no earlier write durable either: a leader's own copy of what it names
    /// may still be unflushed ([`Ready::persist_after_send`]).
    pub commit_only: bool,
    /// A leader's `Ready` under [`crate::raft::Config::persist_after_send`]: the driver may send
    /// `messages` **before** persisting (they are AppendEntries of the new entries and nothing that
    /// promises anything about this node's own storage), and must call
    /// [`crate::raft::RaftCore::persisted`] with the last entry of `log_write` once it is flushed.
    /// The core takes every *other* `Ready` that must be flushed (something to persist, and not
    /// [`Ready::commit_only`]) to mean that all earlier writes are durable by the time it is called
    /// again (a flush covers every write before it). So a driver may hold such a write's flush back
    /// across later `Ready`s that need none, and report it with `persisted` when it is done (the
    /// node driver does not: taking the followers' acknowledgements while its flush runs costs a
    /// leader a wake-up per commit, which measured slower than the wait it saves).
    pub persist_after_send: bool,
    /// Messages to send once the above is durable.
    pub messages: Vec<Envelope>,
    /// A leader's snapshot (or, after a restart, the stored one) the service must load before applying.
    pub snapshot_to_apply: Option<Snapshot>,
    /// Committed entries to apply, contiguous and in order.
    pub committed_entries: Vec<Entry>,
    /// Reads confirmed by a quorum.
    pub read_states: Vec<ReadState>,
    /// Reads that cannot be confirmed, and why (leadership lost: retry elsewhere; the leader busy:
    /// back off).
    pub failed_reads: Vec<FailedRead>,
    /// Role, leader and term after this batch, for the service and for status reports.
    pub soft_state: SoftState,
    /// The configuration in force, when it changed since the last `Ready` (and in the first one):
    /// the driver connects to new members and forgets removed ones.
    pub membership: Option<Membership>,
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
            && self.membership.is_none()
    }

    /// Whether anything must be persisted (and, unless [`Ready::commit_only`], flushed) before the
    /// messages go out.
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

#[cfg(test)]
mod tests {
    use crate::raft::{Config, RaftCore, Ready};
    use bytes::Bytes;

    /// Runs two nodes' cores against each other, delivering every message, until `done` holds;
    /// returns every `Ready` of node 1.
    fn pump(cores: &mut [RaftCore; 2], mut done: impl FnMut(&[RaftCore; 2]) -> bool) -> Vec<Ready> {
        let mut readies = Vec::new();
        for _ in 0..10_000 {
            if done(cores) {
                return readies;
            }
            cores[0].tick();
            for n in 0..2 {
                while cores[n].has_ready() {
                    let ready = cores[n].ready();
                    for envelope in ready.messages.clone() {
                        let _ = cores[(envelope.to - 1) as usize].step(envelope);
                    }
                    if n == 0 {
                        readies.push(ready);
                    }
                }
            }
        }
        panic!("the two nodes never got there");
    }

    #[test]
    fn only_a_commit_index_alone_skips_the_flush() {
        let mut cores = [1, 2].map(|id| RaftCore::new(Config::new(id, vec![1, 2])).unwrap());
        let mut readies = pump(&mut cores, |c| c[0].is_leader());
        let (index, _) = cores[0].propose(Bytes::from_static(b"x")).unwrap();
        readies.extend(pump(&mut cores, |c| c[0].commit_index() >= index));
        readies.extend(pump(&mut cores, |c| !c[0].has_ready()));
        for ready in &readies {
            if ready.commit_only {
                assert!(
                    ready.log_write.is_none() && ready.snapshot.is_none(),
                    "{ready:?}"
                );
                assert!(ready.hard_state.is_some(), "{ready:?}");
            }
        }
        // The term and vote of the election were flushed; the commit of the entry was not.
        assert!(readies
            .iter()
            .any(|r| !r.commit_only && r.hard_state.is_some_and(|h| h.vote == Some(1))));
        let committed = readies
            .iter()
            .find(|r| r.hard_state.is_some_and(|h| h.commit >= index))
            .expect("the commit of the entry was persisted");
        assert!(committed.commit_only, "{committed:?}");
    }
}
