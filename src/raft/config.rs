//! Knobs of one Raft node, with the trade-off each one makes written next to it.

use super::types::NodeId;
use thiserror::Error;

/// Configuration of one node of a Raft group.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub id: NodeId,
    /// The group's first configuration: used until the log or a snapshot holds one (configurations
    /// then change through the log: [`crate::raft::membership`]). A node that is not among them (or
    /// an empty list) starts as a non-member: it never campaigns and waits for a leader to add it.
    pub voters: Vec<NodeId>,
    /// Base election timeout in ticks; the real timeout is drawn uniformly from `[election_ticks,
    /// 2 * election_ticks)` after each reset so that split votes do not repeat (Raft §5.2). Also the length
    /// of the leader lease and of the CheckQuorum window.
    pub election_ticks: u32,
    /// Width of the randomized part of the election timeout: the timeout is drawn from
    /// `[election_ticks, election_ticks + spread)`; `None` means `election_ticks` (the range above).
    /// The daemons narrow it: the silence before an election stays at least `election_ticks` (a
    /// healthy but slow leader is not deposed sooner), but a dead leader is replaced within
    /// `election_ticks + spread` instead of twice the base — with three nodes split votes are rare,
    /// and PreVote keeps a lost one cheap.
    pub election_spread_ticks: Option<u32>,
    /// A leader sends heartbeats every `heartbeat_ticks`. Must be well below `election_ticks`, or followers
    /// start elections against a healthy leader whenever a heartbeat is lost.
    pub heartbeat_ticks: u32,
    /// PreVote (thesis §9.6): a node first asks whether it could win before raising its term, so a node
    /// returning from a partition cannot depose a healthy leader. Costs one extra round trip per election.
    pub pre_vote: bool,
    /// CheckQuorum: a leader that has not heard from a majority within an election timeout steps down, and
    /// followers that heard from a leader within the timeout ignore vote requests (the leader lease). Keeps
    /// a partitioned leader from believing it still leads; depends on ticks advancing at similar rates on
    /// all nodes (bounded clock drift).
    pub check_quorum: bool,
    /// Append a no-op entry when elected, so the leader commits an entry of its term promptly. Needed for
    /// ReadIndex to answer without waiting for a client write; off only to reproduce the 6.824 tests' exact
    /// log indices.
    pub noop_on_election: bool,
    /// Upper bound on entries in one AppendEntries.
    pub max_entries_per_message: usize,
    /// Upper bound on payload bytes in one AppendEntries (at least one entry is always sent).
    pub max_bytes_per_message: usize,
    /// AppendEntries messages with entries that may be unacknowledged per follower. Higher values keep a
    /// fast network busy; lower ones waste less on a lossy one.
    pub max_inflight_messages: usize,
    /// Seed for the election-timeout randomness, so a simulation is reproducible. Use a random seed in
    /// production.
    pub seed: u64,
    /// A leader may send new entries to its followers *before* its own write of them is durable, and
    /// counts itself toward their commit only once the driver reports them persisted
    /// ([`crate::raft::RaftCore::persisted`]): the two flushes run in parallel instead of one after the
    /// other (Raft dissertation §10.2.1, etcd's raft). Safe because a commit still needs a majority of
    /// durable copies, with or without the leader's. Off for drivers that do not call `persisted`.
    pub persist_after_send: bool,
    /// Lease reads (thesis §6.4.1, etcd's `ReadOnlyLeaseBased`, TiKV's lease): for about an election
    /// timeout after a majority acknowledged a heartbeat, the leader answers reads without a round of
    /// messages, because CheckQuorum keeps those followers from voting for anyone else until then.
    /// Safe only if (1) every member runs with it (a member without it may vote for a new leader after
    /// a restart while the old lease runs), (2) tick rates differ by less than 10 % between members
    /// ([`Config::lease_ticks`] keeps that margin) and (3) the driver delivers ticks by the wall clock,
    /// catching up after a pause before it asks for a read. Requires `check_quorum`. Off by default:
    /// ReadIndex needs no clock assumption.
    pub lease_reads: bool,
    /// Refuse every vote while the log is empty (no entry, no snapshot): set for a node that joins a
    /// running group with an empty data directory, so that if the group still counts it as a voter
    /// that lost its data it cannot help elect a leader lacking acknowledged writes.
    pub no_vote_until_replicated: bool,
}

impl Config {
    /// A configuration with the defaults used by the daemons: 10 ms ticks, heartbeats every 100 ms,
    /// elections after 1 to 2 s of silence (the daemons narrow it to 1 to 1.5 s: [`crate::raft::node::NodeConfig::new`]),
    /// PreVote, CheckQuorum and a no-op on election.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Self {
        Config {
            id,
            voters,
            election_ticks: 100,
            election_spread_ticks: None,
            heartbeat_ticks: 10,
            pre_vote: true,
            check_quorum: true,
            noop_on_election: true,
            max_entries_per_message: 256,
            max_bytes_per_message: 1 << 20,
            max_inflight_messages: 32,
            seed: 0,
            persist_after_send: false,
            lease_reads: false,
            no_vote_until_replicated: false,
        }
    }

    /// How many ticks after a majority-acknowledged broadcast the leader may serve lease reads: one
    /// tick short of a follower's lease (a follower may count its first tick at once), less 10 % for
    /// clock drift.
    pub fn lease_ticks(&self) -> u64 {
        u64::from(self.election_ticks.saturating_sub(1)) * 9 / 10
    }

    /// Checks the invariants the core relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.voters.contains(&0) {
            return Err(ConfigError::ZeroId);
        }
        let mut sorted = self.voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.voters.len() {
            return Err(ConfigError::DuplicateVoter);
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(ConfigError::Timing {
                heartbeat: self.heartbeat_ticks,
                election: self.election_ticks,
            });
        }
        if self.max_entries_per_message == 0 || self.max_inflight_messages == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        if self.lease_reads && !self.check_quorum {
            return Err(ConfigError::LeaseWithoutCheckQuorum);
        }
        Ok(())
    }
}

/// A configuration the core refuses to run with.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// Id 0 means "nobody" on the wire.
    #[error("node ids must be non-zero")]
    ZeroId,
    /// The same id twice would be counted twice in every quorum.
    #[error("the voter list names a node twice")]
    DuplicateVoter,
    /// Heartbeats must come more often than elections start.
    #[error(
        "heartbeat ticks ({heartbeat}) must be non-zero and below election ticks ({election})"
    )]
    Timing {
        /// The configured heartbeat interval.
        heartbeat: u32,
        /// The configured election timeout.
        election: u32,
    },
    /// Replication limits of zero would stall the log.
    #[error("max entries per message and max in-flight messages must be non-zero")]
    ZeroLimit,
    /// A lease is only as good as the followers' promise not to vote, which CheckQuorum makes.
    #[error("lease reads need CheckQuorum")]
    LeaseWithoutCheckQuorum,
}
