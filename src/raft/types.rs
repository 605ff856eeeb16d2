//! The vocabulary shared by every part of Raft: ids, terms, indices, entries and durable state.

use bytes::Bytes;

/// A node's id inside one Raft group. Zero is reserved for "nobody" on the wire, so ids start at 1.
pub type NodeId = u64;
/// A Raft term. Terms start at 1 once any election happened; 0 means "no term yet".
pub type Term = u64;
/// A log index. The first entry has index 1; 0 is the (empty) position before it.
pub type Index = u64;

/// Why an entry is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A command proposed by the service.
    Normal,
    /// An empty entry a new leader appends so that it can commit something from its own term: until it
    /// does, it may not know the true commit index (Raft §8), so ReadIndex waits for it.
    Noop,
    /// The group's configuration from this entry on (an encoded [`super::membership::Membership`]),
    /// in force as soon as it is appended. Services skip it like a no-op.
    Config,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: Index,
    /// Command or no-op.
    pub kind: EntryKind,
    /// The command, opaque to Raft. `Bytes` so that the log, messages and the apply stream share one copy.
    pub data: Bytes,
}

impl Entry {
    /// Size used for batching limits: the payload plus a fixed allowance for the header.
    pub fn approx_size(&self) -> usize {
        self.data.len() + 24
    }
}

/// The state Raft must persist before answering any message that depends on it (Figure 2 "persistent state",
/// plus the commit index so a restarted node can re-apply without waiting for a leader).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate this node voted for in `term`, if any. Persisted so a node never votes twice in a term.
    pub vote: Option<NodeId>,
    /// Highest index known committed.
    pub commit: Index,
}

/// What a snapshot covers: every entry up to and including `index`, the last of which had `term`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Last index the snapshot includes.
    pub index: Index,
    /// Term of that entry, kept so that AppendEntries consistency checks still work right after it.
    pub term: Term,
}

/// A service snapshot: the state machine after applying every entry up to `meta.index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Position in the log the snapshot replaces.
    pub meta: SnapshotMeta,
    /// The service's serialized state, opaque to Raft.
    pub data: Bytes,
    /// The group's configuration at `meta.index`. `None` only in snapshots written before membership
    /// changes existed: the configuration is then the one the node was started with.
    pub membership: Option<super::membership::Membership>,
}

/// Everything a node persisted, handed back to [`crate::raft::RaftCore::restore`] after a restart.
#[derive(Clone, Debug, Default)]
pub struct PersistedState {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// The latest snapshot, if the log was ever compacted.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, in index order with no gaps.
    pub entries: Vec<Entry>,
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether it could win an election, without raising its term (PreVote).
    PreCandidate,
    /// Campaigning in a new term.
    Candidate,
    /// Leads the current term.
    Leader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        };
        f.write_str(name)
    }
}
