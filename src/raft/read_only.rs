//! The ReadIndex queue (Raft thesis §6.4): linearizable reads without writing the log.
//!
//! A read is answered once (1) the leader has committed an entry of its own term, so its commit index is
//! the cluster's, (2) a majority acknowledged a heartbeat round sent *after* the read arrived, so the
//! leader was still leader when the read arrived, and (3) the service applied up to the read's index.
//! The queue does (1) and (2); the service waits for (3).
//!
//! With lease reads the queue also remembers when each round was broadcast: a majority acknowledging a
//! round sent at tick `t` means none of them will vote for another leader until about an election
//! timeout after `t` (CheckQuorum), so until then the leader may answer reads without a round.

use super::types::{Index, NodeId};
use std::collections::VecDeque;

/// Broadcast ticks kept for rounds not yet confirmed; older ones are forgotten (which only shortens the
/// lease: a round whose tick is forgotten cannot extend it).
const MAX_UNCONFIRMED_ROUNDS: usize = 1024;

/// A read the leader has confirmed: serve it once the state machine applied `index`.
///
/// The driver sees `ReadState<u64>` (the id its service gave the read); the leader's queue holds
/// `ReadState<ReadOrigin>`, since some of its reads are a follower's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState<Id = u64> {
    /// The read's id.
    pub id: Id,
    /// The commit index at the time the read arrived.
    pub index: Index,
}

/// Why a read could not be confirmed: the service answers a client differently for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    /// Leadership was lost, or the node asked does not lead, or it did not answer in time: the
    /// client retries at whoever leads.
    LeadershipLost,
    /// The leader holds as many of this follower's read requests as it takes
    /// ([`MAX_FORWARDED_REQUESTS`]): it leads but is overloaded, and the client should back off, not
    /// look for another leader.
    LeaderBusy,
}

/// A read that failed, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailedRead {
    /// The read's id.
    pub id: u64,
    /// Why it failed.
    pub why: ReadFailure,
}

/// Whose read the leader is confirming: its own service's, or a batch a follower forwarded (the
/// follower serves those itself, once it applied the index the leader answers with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOrigin {
    /// A read of this node's service, by the id the service gave it.
    Local(u64),
    /// A follower's `ReadIndex` request.
    Forwarded {
        /// The follower.
        from: NodeId,
        /// The follower's number for the request, echoed in the answer.
        request: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct PendingRead {
    id: ReadOrigin,
    index: Index,
    round: u64,
}

/// Reads waiting for confirmation of leadership.
#[derive(Clone, Debug, Default)]
pub struct ReadQueue {
    awaiting_term_commit: Vec<ReadOrigin>,
    pending: VecDeque<PendingRead>,
    /// The round the next broadcast will carry. Rounds start at 1 so 0 means "no round".
    next_round: u64,
    broadcast_needed: bool,
    /// (round, tick it was broadcast at) of rounds a majority has not acknowledged yet.
    sent: VecDeque<(u64, u64)>,
    /// The broadcast tick of the newest round a majority acknowledged: where the leader lease starts.
    lease_from: Option<u64>,
    /// Queued requests per follower.
    forwarded: std::collections::BTreeMap<NodeId, usize>,
}

impl ReadQueue {
    /// An empty queue for a new term.
    pub fn new() -> Self {
        ReadQueue {
            next_round: 1,
            ..Default::default()
        }
    }

    /// Queue a read. `commit` is the current commit index, `term_committed` whether it is from the
    /// leader's term.
    pub fn request(&mut self, id: ReadOrigin, commit: Index, term_committed: bool) {
        self.count_forwarded(id, true);
        self.queue(id, commit, term_committed);
    }

    fn queue(&mut self, id: ReadOrigin, commit: Index, term_committed: bool) {
        if term_committed {
            self.pending.push_back(PendingRead {
                id,
                index: commit,
                round: self.next_round,
            });
            self.broadcast_needed = true;
        } else {
            self.awaiting_term_commit.push(id);
        }
    }

    /// The leader committed an entry of its term: reads that waited for that can now start a round.
    pub fn term_committed(&mut self, commit: Index) {
        for id in std::mem::take(&mut self.awaiting_term_commit) {
            self.queue(id, commit, true);
        }
    }

    /// If reads wait for a round, the round to broadcast now (at tick `now`).
    pub fn take_broadcast(&mut self, now: u64) -> Option<u64> {
        if !self.broadcast_needed() {
            return None;
        }
        Some(self.new_round(now))
    }

    /// A round for a heartbeat broadcast at tick `now`, so its acknowledgements renew the lease. Reads
    /// waiting for a round ride on it.
    pub fn heartbeat_round(&mut self, now: u64) -> u64 {
        self.new_round(now)
    }

    fn new_round(&mut self, now: u64) -> u64 {
        self.broadcast_needed = false;
        let round = self.next_round;
        self.next_round += 1;
        if self.sent.len() >= MAX_UNCONFIRMED_ROUNDS {
            self.sent.pop_front();
        }
        self.sent.push_back((round, now));
        round
    }

    /// The tick the newest majority-acknowledged round was broadcast at (`None` before any).
    pub fn lease_from(&self) -> Option<u64> {
        self.lease_from
    }

    /// Whether reads wait for a round to be broadcast now: not while one is out (its answers come
    /// within a round trip; if it is lost, the heartbeats carry it, or with lease reads a newer round,
    /// again), so reads arriving meanwhile share the next round instead of each Ready sending one.
    pub fn broadcast_needed(&self) -> bool {
        self.broadcast_needed && self.sent.is_empty()
    }

    /// The newest round already broadcast (what ordinary messages carry).
    pub fn last_broadcast_round(&self) -> u64 {
        self.next_round - 1
    }

    /// A majority acknowledged every round up to `round`: release the reads those rounds cover.
    pub fn confirm(&mut self, round: u64) -> Vec<ReadState<ReadOrigin>> {
        while let Some(&(sent_round, tick)) = self.sent.front() {
            if sent_round > round {
                break;
            }
            self.sent.pop_front();
            self.lease_from = Some(self.lease_from.map_or(tick, |from| from.max(tick)));
        }
        let mut ready = Vec::new();
        while self.pending.front().is_some_and(|r| r.round <= round) {
            if let Some(r) = self.pending.pop_front() {
                self.count_forwarded(r.id, false);
                ready.push(ReadState {
                    id: r.id,
                    index: r.index,
                });
            }
        }
        ready
    }

    /// Leadership was lost: every queued read fails.
    pub fn drain(&mut self) -> Vec<ReadOrigin> {
        let mut failed: Vec<ReadOrigin> = self.pending.drain(..).map(|r| r.id).collect();
        failed.append(&mut self.awaiting_term_commit);
        self.forwarded.clear();
        failed
    }

    /// Whether any read is queued.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.awaiting_term_commit.is_empty()
    }

    /// How many requests of follower `from` are queued (the leader bounds them: see
    /// [`MAX_FORWARDED_REQUESTS`]).
    pub fn forwarded_by(&self, from: NodeId) -> usize {
        self.forwarded.get(&from).copied().unwrap_or(0)
    }

    fn count_forwarded(&mut self, id: ReadOrigin, queued: bool) {
        if let ReadOrigin::Forwarded { from, .. } = id {
            let count = self.forwarded.entry(from).or_insert(0);
            if queued {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.forwarded.remove(&from);
                }
            }
        }
    }
}

/// The most `ReadIndex` requests of one follower a leader queues at once; beyond, it refuses them at
/// once. A follower sends one request per driver wake-up for all the reads that arrived meanwhile and
/// keeps at most [`crate::raft::forwarded_reads::MAX_REQUESTS_OUT`] out, so this only stops a faulty
/// or hostile member from growing the queue, or from taking the others' share.
pub const MAX_FORWARDED_REQUESTS: usize = super::forwarded_reads::MAX_REQUESTS_OUT;

#[cfg(test)]
mod tests {
    use super::*;

    fn local(id: u64) -> ReadOrigin {
        ReadOrigin::Local(id)
    }

    fn read(id: u64, index: Index) -> ReadState<ReadOrigin> {
        ReadState {
            id: local(id),
            index,
        }
    }

    #[test]
    fn a_read_needs_a_round_sent_after_it() {
        let mut q = ReadQueue::new();
        q.request(local(7), 10, true);
        assert_eq!(q.confirm(0), vec![]);
        let round = q.take_broadcast(0).expect("a round");
        assert_eq!(q.take_broadcast(0), None);
        q.request(local(8), 11, true);
        assert_eq!(q.confirm(round), vec![read(7, 10)]);
        let next = q.take_broadcast(0).expect("a second round");
        assert!(next > round);
        assert_eq!(q.confirm(next), vec![read(8, 11)]);
    }

    /// Reads arriving while a round is out wait for it to come back and then share one new round:
    /// at 64 clients a round per Ready doubled the heartbeats the followers answer (35.7k linearizable
    /// gets/s against 40k with one round out).
    #[test]
    fn reads_arriving_while_a_round_is_out_share_the_next_one() {
        let mut q = ReadQueue::new();
        q.request(local(1), 10, true);
        let first = q.take_broadcast(0).expect("a round");
        q.request(local(2), 11, true);
        q.request(local(3), 12, true);
        assert!(!q.broadcast_needed(), "a round is still out");
        assert_eq!(q.take_broadcast(0), None);
        // The round out does not answer reads that arrived after it was sent.
        assert_eq!(q.confirm(first), vec![read(1, 10)]);
        assert!(q.broadcast_needed());
        let second = q.take_broadcast(1).expect("the next round");
        assert_eq!(q.confirm(second), vec![read(2, 11), read(3, 12)]);
    }

    /// A lost round is not waited for forever: a heartbeat round sent later carries the reads, and
    /// its acknowledgement confirms every round before it.
    #[test]
    fn a_round_never_acknowledged_is_overtaken_by_a_heartbeat_round() {
        let mut q = ReadQueue::new();
        q.request(local(1), 10, true);
        let lost = q.take_broadcast(0).expect("a round");
        q.request(local(2), 11, true);
        let heartbeat = q.heartbeat_round(5);
        assert!(heartbeat > lost);
        assert_eq!(q.confirm(heartbeat), vec![read(1, 10), read(2, 11)]);
        assert!(!q.broadcast_needed());
    }

    #[test]
    fn reads_before_a_term_commit_wait_for_it() {
        let mut q = ReadQueue::new();
        q.request(local(1), 3, false);
        assert_eq!(q.take_broadcast(0), None);
        q.term_committed(5);
        let round = q.take_broadcast(0).expect("a round");
        assert_eq!(q.confirm(round), vec![read(1, 5)]);
    }

    #[test]
    fn the_lease_starts_at_the_newest_acknowledged_round() {
        let mut q = ReadQueue::new();
        assert_eq!(q.lease_from(), None);
        let first = q.heartbeat_round(10);
        let second = q.heartbeat_round(20);
        q.confirm(0);
        assert_eq!(q.lease_from(), None, "nothing acknowledged yet");
        q.confirm(first);
        assert_eq!(q.lease_from(), Some(10));
        q.confirm(second);
        assert_eq!(q.lease_from(), Some(20));
        // An old round acknowledged late does not move the lease back.
        q.confirm(first);
        assert_eq!(q.lease_from(), Some(20));
    }

    #[test]
    fn a_heartbeat_round_carries_the_reads_waiting_for_one() {
        let mut q = ReadQueue::new();
        q.request(local(3), 9, true);
        let round = q.heartbeat_round(5);
        assert!(!q.broadcast_needed());
        assert_eq!(q.confirm(round), vec![read(3, 9)]);
    }

    #[test]
    fn follower_requests_are_counted_per_follower_until_released() {
        let mut q = ReadQueue::new();
        let from = |from, request| ReadOrigin::Forwarded { from, request };
        q.request(from(2, 1), 3, false);
        q.request(from(2, 2), 3, true);
        q.request(from(3, 1), 3, true);
        q.request(local(9), 3, true);
        assert_eq!((q.forwarded_by(2), q.forwarded_by(3)), (2, 1));
        q.term_committed(4);
        assert_eq!(
            q.forwarded_by(2),
            2,
            "moving to the pending queue is not a new request"
        );
        let round = q.take_broadcast(0).expect("a round");
        assert_eq!(q.confirm(round).len(), 4);
        assert_eq!((q.forwarded_by(2), q.forwarded_by(3)), (0, 0));
        q.request(from(2, 3), 5, true);
        q.drain();
        assert_eq!(q.forwarded_by(2), 0);
    }

    #[test]
    fn losing_leadership_fails_every_read() {
        let mut q = ReadQueue::new();
        q.request(local(1), 3, false);
        q.request(local(2), 3, true);
        let failed = q.drain();
        assert_eq!(failed, vec![local(2), local(1)]);
        assert!(q.is_empty());
    }
}
