//! Messages between Raft peers, as the core sees them.
//!
//! These mirror `proto/raft.proto` one to one ([`crate::raft::wire`] converts). Responses are messages of
//! their own rather than RPC return values, so a node never waits on a peer and the transport is free to
//! pipeline, batch or drop.

use super::membership::Membership;
use super::read_only::ReadFailure;
use super::types::{Entry, Index, NodeId, SnapshotMeta, Term};
use bytes::Bytes;

/// A message with its sender and receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The sending node.
    pub from: NodeId,
    /// The receiving node.
    pub to: NodeId,
    /// What is said.
    pub message: Message,
}

/// Everything one peer can say to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Replicate entries (empty for a heartbeat) and carry the commit index and a ReadIndex round.
    AppendEntries {
        /// Leader's term.
        term: Term,
        /// Index of the entry just before `entries`.
        prev_log_index: Index,
        /// Term of that entry.
        prev_log_term: Term,
        /// Entries to store, contiguous from `prev_log_index + 1`.
        entries: Vec<Entry>,
        /// Leader's commit index.
        leader_commit: Index,
        /// ReadIndex round this message confirms leadership for (echoed in the response).
        read_round: u64,
    },
    /// The answer to `AppendEntries`.
    AppendEntriesResponse {
        /// Responder's term.
        term: Term,
        /// Whether the log matched at `prev_log_index`.
        success: bool,
        /// On success: the last index known to match the leader's log.
        match_index: Index,
        /// On rejection: the `prev_log_index` that did not match (lets the leader drop stale rejections).
        rejected_index: Index,
        /// On rejection: first index of `conflict_term` in the follower's log, or its last index + 1.
        conflict_index: Index,
        /// On rejection: the follower's term at `rejected_index`, if it has an entry there.
        conflict_term: Option<Term>,
        /// Echo of the request's `read_round`.
        read_round: u64,
    },
    /// Ask for a vote (or, with `pre_vote`, whether a vote would be granted).
    RequestVote {
        /// The term the candidate campaigns in (for a pre-vote: the term it would campaign in).
        term: Term,
        /// Index of the candidate's last entry.
        last_log_index: Index,
        /// Term of the candidate's last entry.
        last_log_term: Term,
        /// A PreVote probe: nobody changes term or vote because of it.
        pre_vote: bool,
        /// Campaign started by a leadership transfer: may bypass the leader lease.
        leadership_transfer: bool,
    },
    /// The answer to `RequestVote`.
    RequestVoteResponse {
        /// Responder's term, or the probed term when a pre-vote is granted.
        term: Term,
        /// Whether the vote is granted.
        granted: bool,
        /// Whether this answers a pre-vote.
        pre_vote: bool,
    },
    /// Replace the receiver's log prefix with a snapshot (Figure 13).
    InstallSnapshot {
        /// Leader's term.
        term: Term,
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// The service state.
        data: Bytes,
        /// The group's configuration at `meta.index` (`None` from a sender that predates membership
        /// changes: the receiver keeps the configuration it was started with).
        membership: Option<Membership>,
    },
    /// The answer to `InstallSnapshot`.
    InstallSnapshotResponse {
        /// Responder's term.
        term: Term,
        /// The index the responder now matches up to.
        match_index: Index,
    },
    /// Leadership transfer: start an election now.
    TimeoutNow {
        /// Leader's term.
        term: Term,
    },
    /// Follower reads: a read index for the reads that reached the sender since its last request.
    ReadIndex {
        /// Sender's term.
        term: Term,
        /// The sender's number for the request, echoed in the answer.
        request: u64,
    },
    /// The answer to `ReadIndex`.
    ReadIndexResponse {
        /// Responder's term.
        term: Term,
        /// Echo of the request's number.
        request: u64,
        /// The leader's commit index when the request arrived (or its first commit of its term, if
        /// later), sent as for a read of its own: after a quorum confirmed it still led, or at once
        /// within its lease; or why the leader refused (not the leader, or too many of the
        /// follower's requests queued).
        index: Result<Index, ReadFailure>,
    },
}

impl Message {
    /// The sender's term, which every message carries.
    pub fn term(&self) -> Term {
        match self {
            Message::AppendEntries { term, .. }
            | Message::AppendEntriesResponse { term, .. }
            | Message::RequestVote { term, .. }
            | Message::RequestVoteResponse { term, .. }
            | Message::InstallSnapshot { term, .. }
            | Message::InstallSnapshotResponse { term, .. }
            | Message::TimeoutNow { term }
            | Message::ReadIndex { term, .. }
            | Message::ReadIndexResponse { term, .. } => *term,
        }
    }

    /// Requests start an exchange; responses finish one. Statistics count requests as "RPCs".
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::AppendEntries { .. }
                | Message::RequestVote { .. }
                | Message::InstallSnapshot { .. }
                | Message::TimeoutNow { .. }
                | Message::ReadIndex { .. }
        )
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::AppendEntries { .. } => "AppendEntries",
            Message::AppendEntriesResponse { .. } => "AppendEntriesResponse",
            Message::RequestVote { pre_vote: true, .. } => "PreVote",
            Message::RequestVote { .. } => "RequestVote",
            Message::RequestVoteResponse { pre_vote: true, .. } => "PreVoteResponse",
            Message::RequestVoteResponse { .. } => "RequestVoteResponse",
            Message::InstallSnapshot { .. } => "InstallSnapshot",
            Message::InstallSnapshotResponse { .. } => "InstallSnapshotResponse",
            Message::TimeoutNow { .. } => "TimeoutNow",
            Message::ReadIndex { .. } => "ReadIndex",
            Message::ReadIndexResponse { .. } => "ReadIndexResponse",
        }
    }
}
