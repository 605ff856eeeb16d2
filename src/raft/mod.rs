//! Raft consensus, as a library the replicated services embed.
//!
//! # How to drive it
//!
//! The protocol lives in [`RaftCore`], a sans-IO state machine in the style of etcd-io/raft and
//! tikv/raft-rs: it never touches sockets, disks or clocks. A driver (the tokio node for the daemons, the
//! simulator for the tests) runs this loop:
//!
//! 1. **Tick** it at a fixed rate ([`RaftCore::tick`]); timeouts are counted in ticks.
//! 2. **Step** every message that arrives from a peer into it ([`RaftCore::step`]).
//! 3. **Propose** commands ([`RaftCore::propose`]) and ask for read points ([`RaftCore::read_index`]) on
//!    behalf of clients; snapshot the service now and then and tell the core ([`RaftCore::compact`]).
//! 4. After any of these, take the [`Ready`] ([`RaftCore::ready`]) and handle it in order: **persist**
//!    (snapshot, log write, hard state — and flush), then **send** the messages, then **apply** the
//!    snapshot and the committed entries, then answer the confirmed reads.
//!
//! Persist-before-send is the one rule the driver must never break: a vote or an acknowledgement is a
//! promise that has to survive a crash.
//!
//! # What the core guarantees
//!
//! - **Election safety**: at most one leader per term (votes are persisted before they are sent).
//! - **Log matching and leader completeness**: a committed entry is in every later leader's log; only
//!   entries of the leader's current term are committed by counting replicas (Figure 8).
//! - **State machine safety**: committed entries are handed out once, in index order, and never change.
//! - **No disruption**: PreVote and CheckQuorum stop a node that cannot reach the leader from raising the
//!   term and deposing it; a leader cut off from a majority steps down after an election timeout.
//! - **Linearizable reads**: a [`ReadState`] is released only after a quorum confirmed leadership after the
//!   read arrived.
//!
//! # Modules
//!
//! [`types`] (ids, entries, durable state), [`message`] (the peer protocol), [`log`] (the log and what is
//! not yet persisted), [`membership`] (voters, learners and single-server changes), [`progress`] (per-follower flow control), [`quorum`] (majority arithmetic),
//! [`read_only`] (the ReadIndex queue), [`ready`] (the driver's to-do list), [`config`], [`core`] (the
//! protocol itself) and [`wire`] (conversion to the protobuf messages of `proto/raft.proto`) are the
//! sans-IO part. [`storage`] (sled), [`transport`] (tonic) and [`node`] (the tokio driver) put it on disks
//! and networks.

pub mod admission;
pub mod config;
pub mod core;
pub mod forwarded_reads;
pub mod journal;
pub mod local_lease;
pub mod log;
pub mod membership;
pub mod message;
pub mod node;
pub mod progress;
pub mod quorum;
pub mod read_only;
pub mod ready;
mod sled_writer;
pub mod storage;
pub mod transport;
pub mod types;
pub mod value_log;
pub mod wire;

pub use self::config::{Config, ConfigError};
pub use self::core::{
    CompactError, NotLeader, RaftCore, RestoreError, Status, StepError, MAX_INDEX, MAX_TERM,
    MAX_TERM_STEP,
};
pub use self::log::{ApplyBudget, LogWrite};
pub use self::membership::{Member, Membership, MembershipChange, MembershipError};
pub use self::message::{Envelope, Message};
pub use self::node::{Applied, NodeConfig, NodeError, NodeStatus, RaftHandle, RaftNode};
pub use self::read_only::{FailedRead, ReadFailure, ReadState};
pub use self::ready::{Ready, SoftState};
pub use self::storage::{Identity, Seeded, SledStorage, Storage, StorageError};
pub use self::types::{
    Entry, EntryKind, HardState, Index, NodeId, PersistedState, Role, Snapshot, SnapshotMeta, Term,
};
