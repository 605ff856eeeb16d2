//! The sans-IO Raft state machine.
//!
//! [`RaftCore`] is fed ticks ([`RaftCore::tick`]), peer messages ([`RaftCore::step`]), proposals
//! ([`RaftCore::propose`]), read requests ([`RaftCore::read_index`]) and snapshots taken by the service
//! ([`RaftCore::compact`]); it answers with a [`Ready`] ([`RaftCore::ready`]) that the driver persists, sends
//! and applies. It never touches a socket, a disk or a clock, so the simulator can run it through any
//! schedule and reproduce any failure from a seed.
//!
//! The protocol is Figure 2 of the Raft paper, plus: PreVote and CheckQuorum (thesis §9.6), fast log
//! back-up by conflict term, snapshots (Figure 13), ReadIndex (thesis §6.4) and leadership transfer
//! (thesis §3.10). Safety-critical choices carry a comment saying which rule they implement.

use super::config::{Config, ConfigError};
use super::forwarded_reads::ForwardedReads;
use super::log::{AppendConflict, ApplyBudget, RaftLog};
use super::membership::{Membership, MembershipChange, MembershipError, MembershipLog};
use super::message::{Envelope, Message};
use super::progress::{Progress, ProgressState};
use super::quorum;
use super::read_only::{
    FailedRead, ReadFailure, ReadOrigin, ReadQueue, ReadState, MAX_FORWARDED_REQUESTS,
};
use super::ready::{Ready, SoftState};
use super::types::{
    Entry, EntryKind, HardState, Index, NodeId, PersistedState, Role, Snapshot, SnapshotMeta, Term,
};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use thiserror::Error;
use tracing::{debug, info, warn};

/// Terms beyond this cannot come from elections (one per election timeout would take longer than the age
/// of the universe); a message carrying one is corrupt or hostile, and adopting it would let term
/// arithmetic overflow.
pub const MAX_TERM: Term = u64::MAX / 2;
/// The largest step up from its own term a core takes on a peer's word. Real terms grow by one per
/// election, so no correct peer is ever 2^32 terms ahead; a message that is (a corrupt or hostile one)
/// is refused, so no single message can carry a node near [`MAX_TERM`], where it could no longer
/// campaign in a term its peers accept.
pub const MAX_TERM_STEP: Term = 1 << 32;
/// Log indices beyond this cannot come from a real log, for the same reason.
pub const MAX_INDEX: Index = u64::MAX / 2;

/// Refuse messages no correct peer sends, before any of their numbers is used in arithmetic.
fn validate(message: &Message) -> Result<(), &'static str> {
    if message.term() > MAX_TERM {
        return Err("term too large to come from an election");
    }
    let index_ok = |i: Index| i <= MAX_INDEX;
    match message {
        Message::AppendEntries {
            term,
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            ..
        } => {
            if !index_ok(*prev_log_index) || !index_ok(*leader_commit) || prev_log_term > term {
                return Err("AppendEntries with an impossible index or term");
            }
            let mut last_term = *prev_log_term;
            for (k, entry) in entries.iter().enumerate() {
                let contiguous = entry.index == prev_log_index + 1 + k as Index;
                if !contiguous || entry.term < last_term || entry.term > *term {
                    return Err("AppendEntries entries are not a contiguous log suffix");
                }
                if entry.kind == EntryKind::Config && Membership::decode(&entry.data).is_err() {
                    return Err("AppendEntries with an invalid configuration entry");
                }
                last_term = entry.term;
            }
            if !index_ok(prev_log_index + entries.len() as Index) {
                return Err("AppendEntries beyond the largest index");
            }
        }
        Message::AppendEntriesResponse {
            match_index,
            rejected_index,
            conflict_index,
            ..
        } => {
            if !index_ok(*match_index) || !index_ok(*rejected_index) || !index_ok(*conflict_index) {
                return Err("AppendEntriesResponse with an impossible index");
            }
        }
        Message::RequestVote {
            term,
            last_log_index,
            last_log_term,
            ..
        } => {
            if !index_ok(*last_log_index) || last_log_term > term {
                return Err("RequestVote with an impossible log position");
            }
        }
        Message::InstallSnapshot { term, meta, .. } => {
            if !index_ok(meta.index) || meta.term > *term {
                return Err("InstallSnapshot with an impossible position");
            }
        }
        Message::InstallSnapshotResponse { match_index, .. } => {
            if !index_ok(*match_index) {
                return Err("InstallSnapshotResponse with an impossible index");
            }
        }
        Message::ReadIndexResponse { index, .. } => {
            if index.is_ok_and(|i| !index_ok(i)) {
                return Err("ReadIndexResponse with an impossible index");
            }
        }
        Message::RequestVoteResponse { .. }
        | Message::TimeoutNow { .. }
        | Message::ReadIndex { .. } => {}
    }
    Ok(())
}

/// Why a proposal or read was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum NotLeader {
    /// Only the leader accepts proposals and reads; `leader_hint` is who this node believes leads.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader_hint: Option<NodeId>,
    },
    /// Leadership is being handed over; proposals would be lost with the old term.
    #[error("leadership transfer in progress")]
    TransferInProgress,
}

/// A message the core refused to process.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StepError {
    /// The message is addressed to another node.
    #[error("message for node {to} delivered to node {me}")]
    WrongRecipient {
        /// The addressee.
        to: NodeId,
        /// This node.
        me: NodeId,
    },
    /// The sender asked for something only a broken or malicious leader asks for.
    #[error("protocol violation by node {from}: {what}")]
    Protocol {
        /// The sender.
        from: NodeId,
        /// What it did.
        what: &'static str,
    },
}

/// Why the state handed to [`RaftCore::restore`] was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stored entries do not continue the snapshot without gaps.
    #[error("stored log is not contiguous: expected index {expected}, found {found}")]
    NonContiguousLog {
        /// The index that should come next.
        expected: Index,
        /// The index found.
        found: Index,
    },
    /// A stored configuration entry does not decode.
    #[error("stored configuration entry at index {index} is invalid: {error}")]
    InvalidConfigEntry {
        /// The entry's index.
        index: Index,
        /// What is wrong with it.
        error: MembershipError,
    },
}

/// Why a compaction request was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum CompactError {
    /// A snapshot may only cover entries the service has applied.
    #[error("cannot snapshot at index {index}: only {applied} applied")]
    NotApplied {
        /// The requested index.
        index: Index,
        /// What has been applied.
        applied: Index,
    },
}

/// A consistent view of a node for status reports and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Believed leader.
    pub leader: Option<NodeId>,
    /// Vote cast in this term.
    pub vote: Option<NodeId>,
    /// Commit index.
    pub commit: Index,
    /// Last index handed out for applying.
    pub applied: Index,
    /// First index held as an entry.
    pub first_index: Index,
    /// Last index in the log.
    pub last_index: Index,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Index,
    /// Per follower (on a leader): match and next index.
    pub progress: Vec<(NodeId, Index, Index)>,
    /// The configuration in force (the latest in the log).
    pub membership: Membership,
}

/// One Raft node's protocol state. See the module documentation.
pub struct RaftCore {
    config: Config,
    /// Every other member, voters and learners: who the leader replicates to.
    peers: Vec<NodeId>,
    /// The configurations the log holds; the latest is in force.
    memberships: MembershipLog,
    /// The configuration changed since the last `Ready` (which tells the driver).
    membership_changed: bool,
    /// The tick of the last configuration change: a lease read counts only acknowledgements of
    /// broadcasts sent under the configuration in force.
    membership_changed_at: u64,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    snapshot: Snapshot,
    rng: ChaCha8Rng,
    election_elapsed: u32,
    randomized_election_ticks: u32,
    /// Ticks since this core was created: the clock lease reads are measured on.
    ticks: u64,
    /// Lease reads: ticks since this node last heard from a leader of its term (AppendEntries or
    /// InstallSnapshot). Unlike `election_elapsed` a term change does not reset it: a stale response
    /// from a higher term must not release a follower from the promise its acknowledgement made.
    /// Starts at 0, as if a leader had just been heard: a restarted node may have acknowledged one's
    /// heartbeat just before it went down, so it refuses votes for its first election timeout.
    lease_elapsed: u32,
    /// A leadership transfer began in this term: the target may be elected without waiting out any
    /// lease, so no lease read is served until the next term.
    lease_revoked: bool,
    heartbeat_elapsed: u32,
    votes: BTreeMap<NodeId, bool>,
    progress: BTreeMap<NodeId, Progress>,
    reads: ReadQueue,
    /// A follower's reads waiting for the leader's read index (follower reads).
    forwarded: ForwardedReads,
    transfer_target: Option<NodeId>,
    /// New entries were appended and followers have not been sent them yet. Sending is deferred to
    /// `ready()` so that every proposal between two `Ready`s travels in one message per follower.
    append_pending: bool,
    // Output accumulated until the next `ready()`.
    messages: Vec<Envelope>,
    persisted_hard_state: HardState,
    /// The role, leader and term the last `Ready` reported: a change since is itself work for the
    /// driver (a CheckQuorum step-down changes only the role, and would otherwise wait for an
    /// unrelated `Ready` — an election timeout later — to reach the service's leadership watcher).
    reported_soft_state: SoftState,
    /// The last log index known durable here. Behind the log's end only between a
    /// [`Ready::persist_after_send`] and the driver's [`RaftCore::persisted`] (or the next `Ready` it
    /// must flush).
    durable: Index,
    snapshot_to_persist: Option<Snapshot>,
    snapshot_to_apply: Option<Snapshot>,
    read_states: Vec<ReadState>,
    failed_reads: Vec<FailedRead>,
    /// What committed entries the next `ready()`s may still hand out (`None`: all of them).
    apply_budget: Option<ApplyBudget>,
}

impl RaftCore {
    /// A brand-new node with an empty log.
    pub fn new(config: Config) -> Result<Self, RestoreError> {
        Self::restore(config, PersistedState::default())
    }

    /// A node restarted from what it persisted. If there is a snapshot, the first `Ready` hands it to the
    /// service to load, followed by the committed entries after it.
    pub fn restore(config: Config, state: PersistedState) -> Result<Self, RestoreError> {
        config.validate()?;
        let snapshot = state.snapshot.unwrap_or_default();
        for (expected, entry) in (snapshot.meta.index + 1..).zip(&state.entries) {
            if entry.index != expected {
                return Err(RestoreError::NonContiguousLog {
                    expected,
                    found: entry.index,
                });
            }
        }
        // The configuration: the snapshot's, else the one the node was started with, then every
        // config entry after it.
        let recorded = snapshot.membership.is_some();
        let base = snapshot
            .membership
            .clone()
            .unwrap_or_else(|| Membership::from_voters(config.voters.iter().copied()));
        let mut memberships = MembershipLog::new(base, recorded);
        for entry in state.entries.iter().filter(|e| e.kind == EntryKind::Config) {
            let membership = Membership::decode(&entry.data).map_err(|error| {
                RestoreError::InvalidConfigEntry {
                    index: entry.index,
                    error,
                }
            })?;
            memberships.record(entry.index, membership);
        }
        let log = RaftLog::restore(snapshot.meta, state.entries, state.hard_state.commit);
        let rng =
            ChaCha8Rng::seed_from_u64(config.seed ^ config.id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let snapshot_to_apply = (snapshot.meta.index > 0).then(|| snapshot.clone());
        let mut core = RaftCore {
            peers: Vec::new(),
            memberships,
            membership_changed: true,
            membership_changed_at: 0,
            term: state.hard_state.term,
            vote: state.hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            snapshot,
            rng,
            election_elapsed: 0,
            randomized_election_ticks: config.election_ticks,
            ticks: 0,
            lease_revoked: false,
            lease_elapsed: 0,
            heartbeat_elapsed: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            reads: ReadQueue::new(),
            // Numbered from a random start per incarnation (see `ForwardedReads::numbered_from`),
            // drawn from a stream of its own so the election timeouts keep their sequence.
            forwarded: ForwardedReads::numbered_from(
                ChaCha8Rng::seed_from_u64(config.seed ^ 0xf011_0e25).random(),
            ),
            transfer_target: None,
            append_pending: false,
            messages: Vec::new(),
            persisted_hard_state: HardState {
                commit: state.hard_state.commit,
                ..state.hard_state
            },
            reported_soft_state: SoftState {
                role: Role::Follower,
                leader: None,
                term: state.hard_state.term,
            },
            durable: 0,
            snapshot_to_persist: None,
            snapshot_to_apply,
            read_states: Vec::new(),
            apply_budget: None,
            failed_reads: Vec::new(),
            config,
        };
        core.persisted_hard_state.commit = core.log.committed();
        core.durable = core.log.last_index();
        core.on_membership_changed();
        core.reset_election_timer();
        Ok(core)
    }

    // ----------------------------------------------------------------------------------------------
    // Inputs
    // ----------------------------------------------------------------------------------------------

    /// Advance logical time by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if !self.forwarded.is_empty() {
            let before = self
                .ticks
                .saturating_sub(u64::from(self.config.election_ticks));
            let expired = self.forwarded.expire(before);
            self.fail(expired, ReadFailure::LeadershipLost);
        }
        self.lease_elapsed = self.lease_elapsed.saturating_add(1);
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => {
                self.election_elapsed += 1;
                if self.election_elapsed >= self.randomized_election_ticks {
                    if self.is_voter() {
                        self.campaign(false);
                    } else {
                        // A learner or a node outside the group waits for a leader.
                        self.reset_election_timer();
                    }
                }
            }
        }
    }

    /// Handle one message from a peer.
    pub fn step(&mut self, envelope: Envelope) -> Result<(), StepError> {
        let me = self.config.id;
        if envelope.to != me {
            return Err(StepError::WrongRecipient {
                to: envelope.to,
                me,
            });
        }
        let from = envelope.from;
        let message = envelope.message;
        // Messages are heard from anyone, members or not (thesis §4.1): a node that has not yet
        // appended the entry that added a leader or a candidate must still follow or vote for it, or
        // a group whose members know different configurations can deadlock. Only the configuration
        // in force counts votes and acknowledgements, and a removed node that missed its removal
        // cannot disrupt: its log lacks the removal entry a majority holds, so it wins no pre-vote,
        // and CheckQuorum's lease ignores it while a leader is heard.
        let msg_term = message.term();
        if let Err(what) = validate(&message) {
            return Err(StepError::Protocol { from, what });
        }
        if msg_term > self.term.saturating_add(MAX_TERM_STEP) {
            return Err(StepError::Protocol {
                from,
                what: "term too far ahead of ours to come from an election",
            });
        }
        // Only the leader of our term may tell us to campaign past everyone's lease (a removed
        // leader hands over this way once its removal commits).
        let timeout_now = matches!(message, Message::TimeoutNow { .. });
        if timeout_now && (msg_term != self.term || self.leader != Some(from)) {
            debug!(
                node = me,
                term = self.term,
                from,
                "ignoring TimeoutNow from a node that does not lead us"
            );
            return Ok(());
        }
        // A node whose removal this one knows committed keeps its certificate: its campaigns and
        // answers no longer count. A leader's requests still do: the id may have been added again
        // by entries this node has not received yet, and they are how it would learn of that.
        let removed = self
            .memberships
            .removed_at(from)
            .is_some_and(|at| at <= self.log.committed());
        let leader_request = matches!(
            message,
            Message::AppendEntries { .. }
                | Message::InstallSnapshot { .. }
                | Message::TimeoutNow { .. }
        );
        if removed && !leader_request {
            debug!(
                node = me,
                term = self.term,
                from,
                kind = message.kind(),
                "ignoring a removed node"
            );
            return Ok(());
        }

        if msg_term > self.term {
            match &message {
                Message::RequestVote {
                    pre_vote,
                    leadership_transfer,
                    ..
                } => {
                    // Leader lease (thesis §4.2.3): while we hear from a leader, ignore campaigns, so a
                    // node that cannot hear the leader cannot depose it. A transfer is the leader's wish.
                    if self.in_lease() && !leadership_transfer {
                        debug!(
                            node = me,
                            term = self.term,
                            from,
                            "ignoring vote request within lease"
                        );
                        return Ok(());
                    }
                    if !pre_vote {
                        self.become_follower(msg_term, None);
                    }
                }
                // A granted pre-vote carries the term we would campaign in, not the voter's term.
                Message::RequestVoteResponse {
                    pre_vote: true,
                    granted: true,
                    ..
                } => {}
                Message::AppendEntries { .. }
                | Message::InstallSnapshot { .. }
                | Message::TimeoutNow { .. } => self.become_follower(msg_term, Some(from)),
                _ => self.become_follower(msg_term, None),
            }
        } else if msg_term < self.term {
            match message {
                // Tell a stale leader about the newer term so it steps down.
                Message::AppendEntries { .. } | Message::InstallSnapshot { .. } => {
                    self.send(
                        from,
                        Message::AppendEntriesResponse {
                            term: self.term,
                            success: false,
                            match_index: 0,
                            rejected_index: 0,
                            conflict_index: 0,
                            conflict_term: None,
                            read_round: 0,
                        },
                    );
                }
                Message::RequestVote { pre_vote, .. } => {
                    self.send(
                        from,
                        Message::RequestVoteResponse {
                            term: self.term,
                            granted: false,
                            pre_vote,
                        },
                    );
                }
                _ => {}
            }
            return Ok(());
        }

        if matches!(
            message,
            Message::AppendEntries { .. } | Message::InstallSnapshot { .. }
        ) {
            // From the leader of our term (older terms were answered above).
            self.lease_elapsed = 0;
        }
        match message {
            Message::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                read_round,
                ..
            } => self.on_append_entries(
                from,
                prev_log_index,
                prev_log_term,
                &entries,
                leader_commit,
                read_round,
            ),
            Message::AppendEntriesResponse {
                success,
                match_index,
                rejected_index,
                conflict_index,
                conflict_term,
                read_round,
                ..
            } => {
                self.on_append_response(
                    from,
                    success,
                    match_index,
                    rejected_index,
                    conflict_index,
                    conflict_term,
                    read_round,
                );
                Ok(())
            }
            Message::RequestVote {
                term,
                last_log_index,
                last_log_term,
                pre_vote,
                leadership_transfer,
            } => {
                self.on_request_vote(
                    from,
                    term,
                    last_log_index,
                    last_log_term,
                    pre_vote,
                    leadership_transfer,
                );
                Ok(())
            }
            Message::RequestVoteResponse {
                term,
                granted,
                pre_vote,
            } => {
                self.on_vote_response(from, term, granted, pre_vote);
                Ok(())
            }
            Message::InstallSnapshot {
                meta,
                data,
                membership,
                ..
            } => {
                self.on_install_snapshot(from, meta, data, membership);
                Ok(())
            }
            Message::InstallSnapshotResponse { match_index, .. } => {
                self.on_snapshot_response(from, match_index);
                Ok(())
            }
            Message::ReadIndex { request, .. } => {
                self.on_read_index(from, request);
                Ok(())
            }
            Message::ReadIndexResponse { request, index, .. } => {
                let reads = self.forwarded.answer(from, request);
                match index {
                    Ok(index) => self
                        .read_states
                        .extend(reads.into_iter().map(|id| ReadState { id, index })),
                    Err(why) => self.fail(reads, why),
                }
                Ok(())
            }
            Message::TimeoutNow { .. } => {
                if self.role != Role::Leader && self.is_voter() {
                    info!(
                        node = me,
                        term = self.term,
                        from,
                        "leadership transferred to us"
                    );
                    self.campaign(true);
                }
                Ok(())
            }
        }
    }

    /// Propose a command. On the leader, returns the index and term the entry got: it is committed only if
    /// the entry applied at that index has that term.
    pub fn propose(&mut self, data: Bytes) -> Result<(Index, Term), NotLeader> {
        if self.role != Role::Leader {
            return Err(NotLeader::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.transfer_target.is_some() {
            return Err(NotLeader::TransferInProgress);
        }
        let index = self.append_entry(EntryKind::Normal, data);
        Ok((index, self.term))
    }

    /// Propose one configuration change: add a learner, promote a learner that caught up, or remove
    /// a member. The rules it enforces, and why, are in [`crate::raft::membership`]. The change is in
    /// force on this leader at once and done when the entry at the returned index commits.
    /// `address_of` fills in the peer address of members that have none in the configuration (a group
    /// started from `--peers` knows its first members' addresses from the command line): the entry
    /// then tells every member, and nodes that join later, where everyone is.
    pub fn propose_membership(
        &mut self,
        change: MembershipChange,
        address_of: impl Fn(NodeId) -> Option<String>,
    ) -> Result<(Index, Term), MembershipError> {
        if self.role != Role::Leader {
            return Err(NotLeader::NotLeader {
                leader_hint: self.leader,
            }
            .into());
        }
        if self.transfer_target.is_some() {
            return Err(NotLeader::TransferInProgress.into());
        }
        let committed = self.log.committed();
        if self.log.term(committed) != Some(self.term) {
            return Err(MembershipError::LeaderNotReady);
        }
        if let Some(index) = self.memberships.latest_index().filter(|&i| i > committed) {
            return Err(MembershipError::ChangePending { index });
        }
        let mut next = self.memberships.current().apply(&change)?;
        next.fill_addresses(address_of);
        if let MembershipChange::Promote { id } = change {
            // Caught up: it answered and its log matches ours (Replicate), and it is at most one
            // message behind, so as a voter it will not hold back commits while it catches up.
            let (matched, replicating) = self.progress.get(&id).map_or((0, false), |p| {
                (
                    p.match_index,
                    matches!(p.state, ProgressState::Replicate { .. }),
                )
            });
            let last = self.log.last_index();
            let lag = last.saturating_sub(matched);
            if !replicating || lag > self.config.max_entries_per_message as Index {
                return Err(MembershipError::LearnerBehind { id, matched, last });
            }
        }
        info!(
            node = self.config.id,
            term = self.term,
            %change,
            membership = %next,
            "proposing a membership change"
        );
        let index = self.append_entry(EntryKind::Config, next.encode());
        Ok((index, self.term))
    }

    /// Ask for a linearizable read point. The answer arrives as a [`ReadState`] with this `id` in a later
    /// `Ready` (or in `failed_reads` if leadership is lost first).
    pub fn read_index(&mut self, id: u64) -> Result<(), NotLeader> {
        if self.role != Role::Leader {
            return Err(NotLeader::NotLeader {
                leader_hint: self.leader,
            });
        }
        self.queue_read(ReadOrigin::Local(id));
        Ok(())
    }

    /// [`RaftCore::read_index`] on any node that knows a leader (follower reads, thesis §6.4.1): a
    /// follower asks the leader for the read point, and the answer arrives as on the leader. The read
    /// fails (in `failed_reads`) if the leader or term changes first, the leader refuses, or no answer
    /// comes within an election timeout.
    pub fn read_index_anywhere(&mut self, id: u64) -> Result<(), NotLeader> {
        if self.role == Role::Leader {
            return self.read_index(id);
        }
        let Some(leader) = self.forward_target() else {
            return Err(NotLeader::NotLeader {
                leader_hint: self.leader,
            });
        };
        let failed = self.forwarded.queue(id, leader.0, leader.1);
        self.fail(failed, ReadFailure::LeadershipLost);
        Ok(())
    }

    /// Where a follower sends its reads: the leader of its term, if it knows one.
    fn forward_target(&self) -> Option<(NodeId, Term)> {
        match (self.role, self.leader) {
            (Role::Follower, Some(leader)) => Some((leader, self.term)),
            _ => None,
        }
    }

    /// Queue a read on this leader: answered at once from the lease, or after a round.
    fn queue_read(&mut self, origin: ReadOrigin) {
        let commit = self.log.committed();
        let term_committed = self.log.term(commit) == Some(self.term);
        if term_committed && self.lease_valid() {
            self.release_reads(vec![ReadState {
                id: origin,
                index: commit,
            }]);
            return;
        }
        self.reads.request(origin, commit, term_committed);
        if self.sole_voter() {
            let confirmed = self.reads.confirm(u64::MAX);
            self.release_reads(confirmed);
        }
    }

    /// Confirmed reads: this node's go to the service, a follower's back to the follower.
    fn release_reads(&mut self, confirmed: Vec<ReadState<ReadOrigin>>) {
        for read in confirmed {
            match read.id {
                ReadOrigin::Local(id) => self.read_states.push(ReadState {
                    id,
                    index: read.index,
                }),
                ReadOrigin::Forwarded { from, request } => self.send(
                    from,
                    Message::ReadIndexResponse {
                        term: self.term,
                        request,
                        index: Ok(read.index),
                    },
                ),
            }
        }
    }

    /// Reads that cannot be confirmed: this node's fail, a follower's are refused.
    fn fail_reads(&mut self, failed: Vec<ReadOrigin>) {
        for origin in failed {
            match origin {
                ReadOrigin::Local(id) => self.failed_reads.push(FailedRead {
                    id,
                    why: ReadFailure::LeadershipLost,
                }),
                ReadOrigin::Forwarded { from, request } => {
                    self.refuse_read(from, request, ReadFailure::LeadershipLost)
                }
            }
        }
    }

    fn refuse_read(&mut self, to: NodeId, request: u64, why: ReadFailure) {
        self.send(
            to,
            Message::ReadIndexResponse {
                term: self.term,
                request,
                index: Err(why),
            },
        );
    }

    /// Reads `ids` of this node failed for the same reason.
    fn fail(&mut self, ids: Vec<u64>, why: ReadFailure) {
        self.failed_reads
            .extend(ids.into_iter().map(|id| FailedRead { id, why }));
    }

    /// A follower asks for a read index: queued as a read of this leader's own, within a bound.
    fn on_read_index(&mut self, from: NodeId, request: u64) {
        let known = self.progress.contains_key(&from);
        if self.role != Role::Leader || !known {
            self.refuse_read(from, request, ReadFailure::LeadershipLost);
            return;
        }
        if self.reads.forwarded_by(from) >= MAX_FORWARDED_REQUESTS {
            self.refuse_read(from, request, ReadFailure::LeaderBusy);
            return;
        }
        self.queue_read(ReadOrigin::Forwarded { from, request });
    }

    /// The service saved a snapshot of its state after applying `index`: the log up to there can go.
    pub fn compact(&mut self, index: Index, data: Bytes) -> Result<(), CompactError> {
        let Some(meta) = self.compaction_meta(index)? else {
            return Ok(()); // an older snapshot than the one we have: nothing to do
        };
        self.log.compact(meta);
        self.memberships.compact(meta.index);
        self.snapshot = Snapshot {
            meta,
            data,
            membership: Some(self.memberships.at(meta.index).clone()),
        };
        self.snapshot_to_persist = Some(self.snapshot.clone());
        debug!(
            node = self.config.id,
            term = self.term,
            index,
            "log compacted"
        );
        Ok(())
    }

    /// The metadata a snapshot of the state after applying `index` would have; `None` if the log is
    /// already compacted that far. Lets a driver write the snapshot's bytes before calling
    /// [`RaftCore::compact`].
    pub fn compaction_meta(&self, index: Index) -> Result<Option<SnapshotMeta>, CompactError> {
        if index <= self.log.snapshot_meta().index {
            return Ok(None);
        }
        let applied = self.log.applied();
        match self.log.term(index) {
            Some(term) if index <= applied => Ok(Some(SnapshotMeta { index, term })),
            _ => Err(CompactError::NotApplied { index, applied }),
        }
    }

    /// The metadata of the latest snapshot (index 0 before any).
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        self.log.snapshot_meta()
    }

    /// Hand leadership to `target` once its log is up to date (thesis §3.10). Proposals are refused until
    /// the transfer finishes or an election timeout passes.
    pub fn transfer_leadership(&mut self, target: NodeId) -> Result<(), NotLeader> {
        if self.role != Role::Leader {
            return Err(NotLeader::NotLeader {
                leader_hint: self.leader,
            });
        }
        if target == self.config.id || !self.memberships.current().is_voter(target) {
            return Ok(());
        }
        self.transfer_target = Some(target);
        self.lease_revoked = true;
        self.election_elapsed = 0;
        self.maybe_send_timeout_now(target);
        Ok(())
    }

    // ----------------------------------------------------------------------------------------------
    // Output
    // ----------------------------------------------------------------------------------------------

    /// Whether a call to [`RaftCore::ready`] would return work.
    pub fn has_ready(&self) -> bool {
        self.membership_changed
            || !self.messages.is_empty()
            || self.append_pending
            || self.snapshot_to_persist.is_some()
            || self.snapshot_to_apply.is_some()
            || self.log.has_committed(self.apply_budget)
            || !self.read_states.is_empty()
            || !self.failed_reads.is_empty()
            || self.hard_state() != self.persisted_hard_state
            || self.soft_state() != self.reported_soft_state
            || self.reads.broadcast_needed()
            || self.forwarded.request_needed()
            || self.forwarded.would_fail(self.forward_target())
    }

    /// Collect what the driver must do now (see [`Ready`] for the order).
    pub fn ready(&mut self) -> Ready {
        if std::mem::take(&mut self.append_pending) && self.role == Role::Leader {
            for peer in self.peers.clone() {
                self.send_append(peer, false);
            }
        }
        if let Some(round) = self.reads.take_broadcast(self.ticks) {
            for peer in self.peers.clone() {
                self.send_heartbeat(peer, round);
            }
        }
        let failed = self.forwarded.rebind(self.forward_target());
        self.fail(failed, ReadFailure::LeadershipLost);
        if let Some((leader, request)) = self.forwarded.take_request(self.ticks) {
            let term = self.term;
            self.send(leader, Message::ReadIndex { term, request });
        }
        let hard_state = self.hard_state();
        let before = self.persisted_hard_state;
        let hard_state = (hard_state != before).then(|| {
            self.persisted_hard_state = hard_state;
            hard_state
        });
        let snapshot = self.snapshot_to_persist.take();
        let log_write = self.log.take_unstable();
        let commit_only = snapshot.is_none()
            && log_write.is_none()
            && hard_state.is_some_and(|h| h.term == before.term && h.vote == before.vote);
        let persist_after_send = self.config.persist_after_send
            && self.role == Role::Leader
            && snapshot.is_none()
            && log_write.is_some()
            && hard_state.is_none_or(|h| h.term == before.term && h.vote == before.vote);
        let durable_before = self.durable;
        let flushed =
            (snapshot.is_some() || log_write.is_some() || hard_state.is_some()) && !commit_only;
        if !persist_after_send && flushed {
            // The driver flushes all of this, and so every earlier write, before it calls the core
            // again. Not so for a `Ready` it need not flush: a leader's earlier writes
            // (`persist_after_send`) may still be unflushed then, and count once `persisted`.
            self.durable = self.log.last_index();
        }
        self.reported_soft_state = self.soft_state();
        let ready = Ready {
            hard_state,
            snapshot,
            log_write,
            commit_only,
            persist_after_send,
            messages: std::mem::take(&mut self.messages),
            snapshot_to_apply: self.snapshot_to_apply.take(),
            committed_entries: self.take_committed(),
            read_states: std::mem::take(&mut self.read_states),
            failed_reads: std::mem::take(&mut self.failed_reads),
            soft_state: self.reported_soft_state,
            membership: std::mem::take(&mut self.membership_changed)
                .then(|| self.memberships.current().clone()),
        };
        if self.config.persist_after_send && self.durable > durable_before && self.is_leader() {
            // Its own copy may now complete a commit: that shows in the next `Ready`.
            self.maybe_commit();
        }
        ready
    }

    /// The driver flushed a [`Ready::persist_after_send`] write whose last entry is (`index`, `term`):
    /// a leader may now count its own copy toward committing it.
    pub fn persisted(&mut self, index: Index, term: Term) {
        if index > self.durable && self.log.term(index) == Some(term) {
            self.durable = index;
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
    }

    /// Bound what the following `ready()`s hand out as `committed_entries` until the next call: the
    /// driver gives the service only so much more than it has reported applying, so the queue between
    /// them stays bounded however far commits run ahead (the rest stays in the log until asked for).
    /// `None` lifts the bound (the simulator and services that do not report).
    pub fn set_apply_budget(&mut self, budget: Option<ApplyBudget>) {
        self.apply_budget = budget;
    }

    fn take_committed(&mut self) -> Vec<Entry> {
        let entries = self.log.take_committed(self.apply_budget);
        if let Some(budget) = &mut self.apply_budget {
            let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
            budget.entries = budget.entries.saturating_sub(entries.len());
            budget.bytes = budget.bytes.saturating_sub(bytes);
        }
        entries
    }

    // ----------------------------------------------------------------------------------------------
    // Queries
    // ----------------------------------------------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether this node leads its term.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// The leader this node believes in.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// The highest index known to be committed.
    pub fn commit_index(&self) -> Index {
        self.log.committed()
    }

    /// Term, vote and commit index as they should be persisted.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed(),
        }
    }

    /// Role, leader and term.
    pub fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            leader: self.leader,
            term: self.term,
        }
    }

    /// The configuration in force: the latest in the log, committed or not.
    pub fn membership(&self) -> &Membership {
        self.memberships.current()
    }

    /// The configuration as of `index` (at least the snapshot's), for checkers.
    pub fn membership_at(&self, index: Index) -> &Membership {
        self.memberships.at(index)
    }

    /// Whether this node votes in the configuration in force.
    pub fn is_voter(&self) -> bool {
        self.memberships.current().is_voter(self.config.id)
    }

    /// Whether this node is the group's only voter: it commits and confirms reads alone.
    fn sole_voter(&self) -> bool {
        let membership = self.memberships.current();
        membership.voter_count() == 1 && membership.is_voter(self.config.id)
    }

    /// The configuration changed (appended, truncated, or replaced by a snapshot): recompute who to
    /// replicate to and, on a leader, track the new members and forget the removed ones.
    fn on_membership_changed(&mut self) {
        let me = self.config.id;
        let membership = self.memberships.current();
        self.peers = membership.ids().filter(|&id| id != me).collect();
        if self
            .transfer_target
            .is_some_and(|t| !membership.is_voter(t))
        {
            self.transfer_target = None;
        }
        self.membership_changed = true;
        self.membership_changed_at = self.ticks;
        debug!(node = me, term = self.term, membership = %membership, "configuration in force");
        if self.role == Role::Leader {
            let next = self.log.last_index() + 1;
            let peers = self.peers.clone();
            self.progress.retain(|id, _| peers.contains(id));
            for peer in peers {
                self.progress.entry(peer).or_insert_with(|| {
                    let mut progress = Progress::new(next);
                    progress.recent_active = true;
                    progress
                });
            }
        }
    }

    /// Read access to the log, for tests and status.
    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    /// A consistent summary for status reports.
    pub fn status(&self) -> Status {
        Status {
            id: self.config.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            vote: self.vote,
            commit: self.log.committed(),
            applied: self.log.applied(),
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            snapshot_index: self.log.snapshot_meta().index,
            progress: self
                .progress
                .iter()
                .map(|(id, p)| (*id, p.match_index, p.next_index))
                .collect(),
            membership: self.memberships.current().clone(),
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Roles
    // ----------------------------------------------------------------------------------------------

    fn in_lease(&self) -> bool {
        if !self.config.check_quorum {
            return false;
        }
        if self.config.lease_reads {
            // A leader's lease rests on this: counted from the last message of a leader, whatever
            // terms came since, and from the start (see `lease_elapsed`).
            self.role == Role::Leader || self.lease_elapsed < self.config.election_ticks
        } else {
            self.leader.is_some() && self.election_elapsed < self.config.election_ticks
        }
    }

    /// What a lease read asked now would get, for the driver to publish ([`super::local_lease`]): the
    /// index it reads at (this term's commit) and how many more ticks the lease runs (at least 1).
    /// `None` when a read would need a round.
    pub fn lease_read_grant(&self) -> Option<(Index, u64)> {
        let commit = self.log.committed();
        if self.log.term(commit) != Some(self.term) || !self.lease_valid() {
            return None;
        }
        let ends = self.reads.lease_from()? + self.config.lease_ticks();
        Some((commit, ends.saturating_sub(self.ticks)))
    }

    /// Whether this leader may answer a read from its lease: a majority acknowledged a broadcast less
    /// than [`Config::lease_ticks`] ago, and no transfer in this term may have elected someone else.
    fn lease_valid(&self) -> bool {
        self.config.lease_reads
            && self.role == Role::Leader
            && !self.lease_revoked
            && self.reads.lease_from().is_some_and(|from| {
                from >= self.membership_changed_at && self.ticks < from + self.config.lease_ticks()
            })
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let base = self.config.election_ticks;
        let spread = self.config.election_spread_ticks.unwrap_or(base).max(1);
        self.randomized_election_ticks = self.rng.random_range(base..base + spread);
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if self.role == Role::Leader {
            let failed = self.reads.drain();
            self.fail_reads(failed);
            self.progress.clear();
            self.transfer_target = None;
        }
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        if self.role != Role::Follower || self.leader != leader {
            debug!(node = self.config.id, term, leader = ?leader, "became follower");
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_election_timer();
    }

    fn campaign(&mut self, leadership_transfer: bool) {
        if self.term >= MAX_TERM {
            // Peers refuse every term above MAX_TERM; campaigning would only spread refusals.
            warn!(
                node = self.config.id,
                term = self.term,
                "term exhausted: not campaigning"
            );
            self.reset_election_timer();
            return;
        }
        if self.config.pre_vote && !leadership_transfer {
            self.become_pre_candidate();
        } else {
            self.become_candidate(leadership_transfer);
        }
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        self.reset_election_timer();
        debug!(node = self.config.id, term = self.term, "starting pre-vote");
        self.request_votes(self.term + 1, true, false);
        if self.tally() == Some(true) {
            self.become_candidate(false);
        }
    }

    fn become_candidate(&mut self, leadership_transfer: bool) {
        self.term += 1;
        self.vote = Some(self.config.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        self.reset_election_timer();
        info!(node = self.config.id, term = self.term, "starting election");
        self.request_votes(self.term, false, leadership_transfer);
        if self.tally() == Some(true) {
            self.become_leader();
        }
    }

    fn request_votes(&mut self, term: Term, pre_vote: bool, leadership_transfer: bool) {
        let last_log_index = self.log.last_index();
        let last_log_term = self.log.last_term();
        // Learners too: only voters' answers count, but a node that is a learner here may be a voter
        // in a newer configuration, and it must hear of the new term (or, a term behind, it could
        // never win against candidates whose stale logs cannot win either).
        for peer in self.peers.clone() {
            self.send(
                peer,
                Message::RequestVote {
                    term,
                    last_log_index,
                    last_log_term,
                    pre_vote,
                    leadership_transfer,
                },
            );
        }
    }

    /// `Some(true)` once a majority granted, `Some(false)` once a majority refused.
    fn tally(&self) -> Option<bool> {
        let membership = self.memberships.current();
        let needed = quorum::majority(membership.voter_count());
        let counted = || {
            self.votes
                .iter()
                .filter(|(id, _)| membership.is_voter(**id))
        };
        let granted = counted().filter(|(_, &g)| g).count();
        let refused = counted().count() - granted;
        if granted >= needed {
            Some(true)
        } else if refused >= needed {
            Some(false)
        } else {
            None
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.leader = Some(self.config.id);
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        self.reads = ReadQueue::new();
        self.transfer_target = None;
        self.lease_revoked = false;
        let next = self.log.last_index() + 1;
        self.progress = self
            .peers
            .iter()
            .map(|&peer| {
                let mut progress = Progress::new(next);
                // Count everyone as active for the first CheckQuorum round: we just heard from a majority.
                progress.recent_active = true;
                (peer, progress)
            })
            .collect();
        info!(node = self.config.id, term = self.term, "became leader");
        if self.config.noop_on_election && !self.memberships.is_recorded() {
            // The first configuration is known only from the command line: write it into the log
            // (as the entry that commits the term), so restarts and joiners find it there.
            let membership = self.memberships.current().encode();
            self.append_entry(EntryKind::Config, membership);
        } else if self.config.noop_on_election {
            self.append_entry(EntryKind::Noop, Bytes::new());
        } else {
            for peer in self.peers.clone() {
                self.send_append(peer, true);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.config.election_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                let membership = self.memberships.current();
                let active = usize::from(membership.is_voter(self.config.id))
                    + self
                        .progress
                        .iter()
                        .filter(|(id, p)| p.recent_active && membership.is_voter(**id))
                        .count();
                let needed = quorum::majority(membership.voter_count());
                for progress in self.progress.values_mut() {
                    progress.recent_active = false;
                }
                if active < needed {
                    warn!(
                        node = self.config.id,
                        term = self.term,
                        "stepping down: a majority has not answered within an election timeout"
                    );
                    self.become_follower(self.term, None);
                    return;
                }
            }
            if self.transfer_target.take().is_some() {
                debug!(
                    node = self.config.id,
                    term = self.term,
                    "leadership transfer timed out"
                );
            }
        }
        // Resend snapshots that went unanswered for an election timeout: they may have been lost.
        let mut resend = Vec::new();
        for (&peer, progress) in self.progress.iter_mut() {
            if let ProgressState::Snapshot { ticks, .. } = &mut progress.state {
                *ticks += 1;
                if *ticks >= self.config.election_ticks {
                    resend.push(peer);
                }
            }
        }
        for peer in resend {
            self.send_snapshot(peer);
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Replication (leader side)
    // ----------------------------------------------------------------------------------------------

    fn append_entry(&mut self, kind: EntryKind, data: Bytes) -> Index {
        let index = self.log.last_index() + 1;
        let membership = (kind == EntryKind::Config)
            .then(|| Membership::decode(&data))
            .and_then(Result::ok);
        self.log.append(Entry {
            term: self.term,
            index,
            kind,
            data,
        });
        if let Some(membership) = membership {
            // In force from now on, committed or not (thesis §4.1).
            self.memberships.record(index, membership);
            self.on_membership_changed();
        }
        // Replicate with the next `Ready` rather than at the next heartbeat: commit latency is one round
        // trip, and a burst of proposals shares one message per follower.
        self.append_pending = true;
        self.maybe_commit();
        index
    }

    /// Send the follower what it is missing. With `heartbeat`, send even if there is nothing new (a
    /// probe that doubles as a retransmission).
    fn send_append(&mut self, peer: NodeId, heartbeat: bool) {
        let max_inflight = self.config.max_inflight_messages;
        let Some(progress) = self.progress.get(&peer) else {
            return;
        };
        if matches!(progress.state, ProgressState::Snapshot { .. }) {
            return;
        }
        if !heartbeat && !progress.can_send(max_inflight) {
            return;
        }
        let next = progress.next_index;
        let prev_log_index = next - 1;
        let Some(prev_log_term) = self.log.term(prev_log_index) else {
            // The entries it needs were compacted away.
            self.send_snapshot(peer);
            return;
        };
        let entries = self.log.slice(
            next,
            self.config.max_entries_per_message,
            self.config.max_bytes_per_message,
        );
        if entries.is_empty() && !heartbeat {
            return;
        }
        let last = entries.last().map_or(prev_log_index, |e| e.index);
        let carried_entries = !entries.is_empty();
        self.send(
            peer,
            Message::AppendEntries {
                term: self.term,
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit: self.log.committed(),
                read_round: self.reads.last_broadcast_round(),
            },
        );
        if let Some(progress) = self.progress.get_mut(&peer) {
            if carried_entries || matches!(progress.state, ProgressState::Probe { .. }) {
                progress.sent_entries(last);
            }
        }
    }

    /// An empty AppendEntries at the follower's match point: always accepted by a follower of this term,
    /// so it asserts leadership, carries the commit index and confirms a ReadIndex round without ever
    /// causing a spurious rejection while entries are in flight.
    fn send_heartbeat(&mut self, peer: NodeId, read_round: u64) {
        let Some(progress) = self.progress.get(&peer) else {
            return;
        };
        let (prev_log_index, prev_log_term) = match self.log.term(progress.match_index) {
            Some(term) => (progress.match_index, term),
            // Index 0 with term 0 matches every log: an entry-less heartbeat that checks nothing.
            None => (0, 0),
        };
        self.send(
            peer,
            Message::AppendEntries {
                term: self.term,
                prev_log_index,
                prev_log_term,
                entries: Vec::new(),
                leader_commit: self.log.committed(),
                read_round,
            },
        );
    }

    fn broadcast_heartbeat(&mut self) {
        // With lease reads every heartbeat is a round of its own, so its acknowledgements renew the lease.
        let round = if self.config.lease_reads {
            self.reads.heartbeat_round(self.ticks)
        } else {
            self.reads.last_broadcast_round()
        };
        for peer in self.peers.clone() {
            let Some(progress) = self.progress.get_mut(&peer) else {
                continue;
            };
            let retransmit = match &mut progress.state {
                // The last probe may have been lost: probe again, which also heartbeats.
                ProgressState::Probe { sent } => {
                    *sent = false;
                    true
                }
                ProgressState::Replicate { inflight, stalled } if !inflight.is_empty() => {
                    *stalled += 1;
                    // Two heartbeat intervals without an acknowledgement: presume the in-flight messages
                    // lost and resend from the match point.
                    *stalled >= 2
                }
                ProgressState::Replicate { .. } | ProgressState::Snapshot { .. } => false,
            };
            if retransmit {
                if matches!(progress.state, ProgressState::Replicate { .. }) {
                    let from = progress.match_index + 1;
                    progress.probe_from(from);
                }
                self.send_append(peer, true);
            } else {
                self.send_heartbeat(peer, round);
            }
        }
    }

    fn send_snapshot(&mut self, peer: NodeId) {
        let meta = self.log.snapshot_meta();
        let Some(progress) = self.progress.get_mut(&peer) else {
            return;
        };
        progress.state = ProgressState::Snapshot {
            index: meta.index,
            ticks: 0,
        };
        debug!(
            node = self.config.id,
            term = self.term,
            peer,
            index = meta.index,
            "sending snapshot"
        );
        self.send(
            peer,
            Message::InstallSnapshot {
                term: self.term,
                meta,
                data: self.snapshot.data.clone(),
                membership: Some(self.memberships.at(meta.index).clone()),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        match_index: Index,
        rejected_index: Index,
        conflict_index: Index,
        conflict_term: Option<Term>,
        read_round: u64,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        progress.read_round = progress.read_round.max(read_round);
        if success {
            // A follower can only acknowledge what we sent it; anything larger is a lie or a bug.
            let match_index = match_index.min(last_index);
            if progress.acknowledge(match_index) {
                self.maybe_commit();
            }
            self.maybe_send_timeout_now(from);
            self.send_append(from, false);
        } else if rejected_index > progress.match_index
            && (!matches!(progress.state, ProgressState::Probe { .. })
                || rejected_index + 1 == progress.next_index)
        {
            // Fast back-up: skip the follower's whole conflicting term (or to its end) in one step.
            let hint = match conflict_term {
                Some(term) => self
                    .log
                    .last_index_of_term(term, rejected_index)
                    .map_or(conflict_index, |i| i + 1),
                None => conflict_index,
            };
            let Some(progress) = self.progress.get_mut(&from) else {
                return;
            };
            progress.probe_from(hint.min(rejected_index).max(1));
            self.send_append(from, false);
        }
        self.advance_reads();
    }

    fn on_snapshot_response(&mut self, from: NodeId, match_index: Index) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        if progress.acknowledge(match_index.min(last_index)) {
            self.maybe_commit();
        }
        self.send_append(from, false);
    }

    /// Figure 2, leader rule 4, with the Figure 8 restriction: an index is committed when a majority stores
    /// it **and** its entry is from the current term. Older entries commit only indirectly.
    fn maybe_commit(&mut self) {
        // Its own copy counts once durable: at once under the ordinary driver contract (nothing is
        // observable before the flush), after `persisted` when entries went out before their flush.
        let own = if self.config.persist_after_send {
            self.durable.min(self.log.last_index())
        } else {
            self.log.last_index()
        };
        let mut matches = self.voter_values(|p| p.match_index, own);
        let candidate = quorum::quorum_value(&mut matches);
        if candidate > self.log.committed() && self.log.term(candidate) == Some(self.term) {
            self.log.commit_to(candidate);
            self.reads.term_committed(candidate);
            if self.sole_voter() {
                let confirmed = self.reads.confirm(u64::MAX);
                self.release_reads(confirmed);
            }
            self.maybe_step_down_after_removal();
        }
    }

    /// Thesis §4.2.2: a leader that removed itself leads, without counting itself, until the change
    /// commits; then it hands over to the most caught-up voter (sparing the group an election
    /// timeout) and steps down.
    fn maybe_step_down_after_removal(&mut self) {
        let removal_committed = self
            .memberships
            .latest_index()
            .is_none_or(|index| index <= self.log.committed());
        if self.is_voter() || !removal_committed || self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        let successor = self
            .progress
            .iter()
            .filter(|(id, p)| self.memberships.current().is_voter(**id) && p.match_index == last)
            .map(|(&id, _)| id)
            .next();
        info!(
            node = self.config.id,
            term = self.term,
            successor = ?successor,
            "removed from the group: stepping down"
        );
        if let Some(successor) = successor {
            self.send(successor, Message::TimeoutNow { term: self.term });
        }
        self.become_follower(self.term, None);
    }

    /// One value per voter of the configuration in force — `of` its progress, `own` for this node
    /// while it is one — for the quorum arithmetic: a learner's copy or acknowledgement never
    /// counts.
    fn voter_values(&self, of: impl Fn(&Progress) -> u64, own: u64) -> Vec<u64> {
        let membership = self.memberships.current();
        let mut values: Vec<u64> = self
            .progress
            .iter()
            .filter(|(id, _)| membership.is_voter(**id))
            .map(|(_, p)| of(p))
            .collect();
        if membership.is_voter(self.config.id) {
            values.push(own);
        }
        values
    }

    fn advance_reads(&mut self) {
        if self.reads.is_empty() && !self.config.lease_reads {
            return;
        }
        let mut rounds = self.voter_values(|p| p.read_round, u64::MAX);
        let confirmed_round = quorum::quorum_value(&mut rounds);
        let confirmed = self.reads.confirm(confirmed_round);
        self.release_reads(confirmed);
    }

    fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        if self.transfer_target != Some(peer) {
            return;
        }
        let caught_up = self
            .progress
            .get(&peer)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send(peer, Message::TimeoutNow { term: self.term });
        } else {
            self.send_append(peer, false);
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Follower and candidate side
    // ----------------------------------------------------------------------------------------------

    fn on_append_entries(
        &mut self,
        from: NodeId,
        prev_log_index: Index,
        prev_log_term: Term,
        entries: &[Entry],
        leader_commit: Index,
        read_round: u64,
    ) -> Result<(), StepError> {
        if self.role == Role::Leader {
            // Two leaders in one term is impossible unless a peer is broken.
            return Err(StepError::Protocol {
                from,
                what: "AppendEntries from a second leader of our term",
            });
        }
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.election_elapsed = 0;
        let reply = match self.log.try_append(prev_log_index, prev_log_term, entries) {
            Ok(match_index) => {
                self.follow_configurations(prev_log_index, entries);
                // Figure 2 receiver rule 5: commit no further than what we know matches the leader.
                self.log.commit_to(leader_commit.min(match_index));
                Message::AppendEntriesResponse {
                    term: self.term,
                    success: true,
                    match_index,
                    rejected_index: 0,
                    conflict_index: 0,
                    conflict_term: None,
                    read_round,
                }
            }
            Err(AppendConflict::Missing { next }) => Message::AppendEntriesResponse {
                term: self.term,
                success: false,
                match_index: 0,
                rejected_index: prev_log_index,
                conflict_index: next,
                conflict_term: None,
                read_round,
            },
            Err(AppendConflict::TermMismatch { term, first_index }) => {
                Message::AppendEntriesResponse {
                    term: self.term,
                    success: false,
                    match_index: 0,
                    rejected_index: prev_log_index,
                    conflict_index: first_index,
                    conflict_term: Some(term),
                    read_round,
                }
            }
            Err(AppendConflict::WouldTruncateCommitted) => {
                return Err(StepError::Protocol {
                    from,
                    what: "AppendEntries conflicting with committed entries",
                });
            }
        };
        self.send(from, reply);
        Ok(())
    }

    fn on_request_vote(
        &mut self,
        from: NodeId,
        term: Term,
        last_log_index: Index,
        last_log_term: Term,
        pre_vote: bool,
        leadership_transfer: bool,
    ) {
        // A node that joined with an empty log votes only once a leader replicated to it: if the
        // group still counts it as the voter it was before it lost its data, its empty log would
        // be "up to date" for any candidate, including one lacking acknowledged writes.
        let unreplicated = self.config.no_vote_until_replicated
            && self.log.last_index() == 0
            && self.log.snapshot_meta().index == 0;
        // With lease reads the promise holds in every term: a stale higher-term message may have
        // moved us to this term since we acknowledged a leader whose lease still runs.
        let promised = self.config.lease_reads
            && !leadership_transfer
            && self.vote != Some(from)
            && self.in_lease();
        // Figure 2 RequestVote receiver rule 2, and for a pre-vote: "would I vote for you in `term`?".
        let can_vote = !promised
            && !unreplicated
            && (self.vote == Some(from)
                || (self.vote.is_none() && self.leader.is_none())
                || (pre_vote && term > self.term));
        let granted = can_vote && self.log.is_up_to_date(last_log_index, last_log_term);
        if granted && !pre_vote {
            self.vote = Some(from);
            self.reset_election_timer();
        }
        debug!(
            node = self.config.id,
            term = self.term,
            from,
            pre_vote,
            granted,
            "vote request"
        );
        self.send(
            from,
            Message::RequestVoteResponse {
                term: if pre_vote && granted { term } else { self.term },
                granted,
                pre_vote,
            },
        );
    }

    fn on_vote_response(&mut self, from: NodeId, term: Term, granted: bool, pre_vote: bool) {
        let counts = match self.role {
            Role::PreCandidate => pre_vote && (!granted || term == self.term + 1),
            Role::Candidate => !pre_vote && term == self.term,
            _ => false,
        };
        if !counts {
            return;
        }
        self.votes.insert(from, granted);
        match self.tally() {
            Some(true) if self.role == Role::PreCandidate => self.become_candidate(false),
            Some(true) => self.become_leader(),
            Some(false) => self.become_follower(self.term, None),
            None => {}
        }
    }

    /// After an append from `prev_log_index` on: the configurations of the entries now in the log
    /// replace those of any entries it truncated.
    fn follow_configurations(&mut self, prev_log_index: Index, entries: &[Entry]) {
        let from = prev_log_index.max(self.log.snapshot_meta().index);
        let touched = entries.iter().any(|e| e.kind == EntryKind::Config)
            || self.memberships.latest_index().is_some_and(|i| i > from);
        if !touched {
            return;
        }
        let before = self.memberships.current().clone();
        self.memberships.truncate_after(from);
        for index in from + 1..=self.log.last_index() {
            let Some(entry) = self.log.entry(index) else {
                break;
            };
            if entry.kind == EntryKind::Config {
                // Validated on receipt (`validate`) or at restore; a failure here is impossible.
                if let Ok(membership) = Membership::decode(&entry.data) {
                    self.memberships.record(index, membership);
                }
            }
        }
        if *self.memberships.current() != before {
            self.on_membership_changed();
        }
    }

    fn on_install_snapshot(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        data: Bytes,
        membership: Option<Membership>,
    ) {
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from));
        }
        self.election_elapsed = 0;
        let match_index = if meta.index <= self.log.committed() {
            // We already have everything it covers, committed and therefore identical to the leader's.
            self.log.committed()
        } else {
            info!(
                node = self.config.id,
                term = self.term,
                index = meta.index,
                "installing snapshot"
            );
            self.log.install_snapshot(meta);
            let membership = membership
                .unwrap_or_else(|| Membership::from_voters(self.config.voters.iter().copied()));
            let kept_suffix = self.log.last_index() > meta.index;
            self.memberships.install(meta.index, membership.clone());
            if !kept_suffix {
                // The whole log was replaced: the configurations of its old entries go with it.
                self.memberships.truncate_after(meta.index);
            }
            self.on_membership_changed();
            self.snapshot = Snapshot {
                meta,
                data,
                membership: Some(membership),
            };
            self.snapshot_to_persist = Some(self.snapshot.clone());
            self.snapshot_to_apply = Some(self.snapshot.clone());
            meta.index
        };
        self.send(
            from,
            Message::InstallSnapshotResponse {
                term: self.term,
                match_index,
            },
        );
    }

    fn send(&mut self, to: NodeId, message: Message) {
        self.messages.push(Envelope {
            from: self.config.id,
            to,
            message,
        });
    }
}
