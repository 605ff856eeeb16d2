//! The tokio driver that turns a [`RaftCore`] into a running node.
//!
//! One task owns the core. It waits for the next input — a command from the service ([`RaftHandle`]), a
//! message from a peer, or the tick timer — takes everything else already queued (so a burst of proposals
//! becomes one `Ready`, one flush and one message per follower), then handles the `Ready` as the driver
//! contract says: **persist and flush** (on a blocking thread, so the runtime keeps serving), **send**,
//! then **apply** by pushing to the service's [`Applied`] stream and answering confirmed reads.
//!
//! Proposals are answered with the (index, term) the entry got, not with its commit: the service waits
//! for the entry on the apply stream and checks the term (that is the `rsm` layer's job).

use super::admission::{Admission, AppliedIndex, Refused};
use super::config::Config;
use super::core::{CompactError, NotLeader, RaftCore, RestoreError, Status};
use super::local_lease::{lease_end, PublishedLease};
use super::log::ApplyBudget;
use super::membership::{Membership, MembershipChange, MembershipError};
use super::message::Envelope;
use super::read_only::ReadFailure;
use super::storage::{StagedSnapshot, Storage, StorageError};
use super::transport::{
    cluster_id, InboundConfig, InboundQueue, RaftService, Transport, TransportConfig,
};
use super::types::{Entry, Index, NodeId, Role, Snapshot, Term};
use super::Ready;
use crate::proto::raft::raft_transport_server::RaftTransportServer;
use crate::security::Guard;
use crate::stages::RaftStages;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, info_span, warn, Instrument};

/// Largest peer message accepted: far above the batching size, so that no single log entry a service
/// can propose is ever refused by followers (which would stop replication of everything after it).
pub const MAX_PEER_MESSAGE_BYTES: usize = crate::limits::MAX_PEER_MESSAGE_BYTES;

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The protocol configuration (id, voters, timeouts in ticks, ...).
    pub raft: Config,
    /// Real time per tick. With the default 10 ms and `Config::new`'s tick counts, heartbeats go out every
    /// 100 ms and elections start after 1–2 s of silence.
    pub tick: Duration,
    /// Address (`http://host:port`) of every other voter.
    pub peers: HashMap<NodeId, String>,
    /// Transport knobs.
    pub transport: TransportConfig,
    /// Largest snapshot accepted from a peer.
    pub max_snapshot_bytes: u64,
    /// Whether the service can load a snapshot a peer sent ([`InboundConfig::snapshot_check`]).
    pub snapshot_check: Option<crate::raft::transport::SnapshotCheck>,
    /// The deployment's cluster name (`--cluster`); with [`NodeConfig::group`] it makes the cluster id
    /// every message carries.
    pub cluster: String,
    /// This node's Raft group (`kv`, `ctrler`, `shard-3`): with TLS, peers' certificates must name it.
    pub group: String,
    /// Who may send this node messages (open without TLS).
    pub guard: Guard,
    /// This node's own peer address as the others reach it, if known: reported in the membership
    /// (`kvctl member list`) and written into configuration entries it proposes.
    pub address: Option<String>,
    /// For a node whose data was restored from a backup: a tag of that backup, made part of the
    /// cluster id on the wire, so only nodes restored from the same backup talk to each other (not a
    /// node of the old cluster left with its own data, nor one restored from another file).
    pub restored: Option<String>,
}

impl NodeConfig {
    /// A configuration with default timing for node `id` among `peers` (which must not include `id`).
    pub fn new(id: NodeId, peers: HashMap<NodeId, String>) -> Self {
        let mut voters: Vec<NodeId> = peers.keys().copied().collect();
        voters.push(id);
        voters.sort_unstable();
        let mut raft = Config::new(id, voters);
        raft.seed = rand::random();
        // Elections after 1 to 1.5 s of silence (10 ms ticks): a killed or frozen leader is replaced
        // within about 1.5 s plus a round of votes, so clients see at most ~2 s without service.
        raft.election_spread_ticks = Some(raft.election_ticks / 2);
        // The leader's flush and its followers' run in parallel (see `handle_ready`).
        raft.persist_after_send = true;
        NodeConfig {
            raft,
            tick: Duration::from_millis(10),
            peers,
            transport: TransportConfig::default(),
            max_snapshot_bytes: 4 << 30,
            snapshot_check: None,
            cluster: "ds824".into(),
            group: "raft".into(),
            guard: Guard::open(),
            restored: None,
            address: None,
        }
    }

    /// The id this node's messages carry.
    pub fn cluster_id(&self) -> String {
        let id = cluster_id(&self.cluster, &self.group);
        match &self.restored {
            Some(tag) => format!("{id}~{tag}"),
            None => id,
        }
    }
}

/// What the service must apply, in order.
#[derive(Clone, Debug)]
pub enum Applied {
    /// Replace the state machine with this snapshot (sent by a leader, or the stored one on restart).
    Snapshot(Snapshot),
    /// Apply these committed entries (no-ops included, so indices stay contiguous).
    Entries(Vec<Entry>),
}

/// Why a request to the node failed.
#[derive(Debug, Error)]
pub enum NodeError {
    /// Only the leader accepts proposals and reads.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// The node has stopped (shut down, crashed or failed).
    #[error("raft node stopped")]
    Stopped,
    /// The node lost leadership (or could not confirm it) before the read was confirmed.
    #[error("read not confirmed: leadership lost")]
    ReadAborted,
    /// Storage failed; the node stops rather than risk acknowledging what is not durable.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stored state could not be loaded into the core.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The snapshot request was invalid.
    #[error(transparent)]
    Compact(#[from] CompactError),
    /// A membership change was refused.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The proposal is larger than any log entry may be; it was not appended.
    #[error("a proposal of {bytes} bytes is over the log entry limit of {limit} bytes")]
    TooLarge {
        /// The proposal's size.
        bytes: usize,
        /// [`crate::limits::MAX_ENTRY_BYTES`].
        limit: usize,
    },
    /// Too much is in flight on this leader (see [`super::admission`]); retry after a pause.
    #[error("leader overloaded: {0}")]
    Overloaded(String),
}

impl From<Refused> for NodeError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::TooLarge { bytes } => NodeError::TooLarge {
                bytes,
                limit: crate::limits::MAX_ENTRY_BYTES,
            },
            Refused::Overloaded(why) => NodeError::Overloaded(why),
        }
    }
}

/// A node's state as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The core's view (role, term, leader, indices, follower progress).
    pub raft: Status,
    /// Bytes of persisted log and hard state.
    pub raft_state_bytes: u64,
    /// Bytes of the stored snapshot.
    pub snapshot_bytes: u64,
    /// Time spent in the write path's stages since the node started (`kvctl bench --breakdown`).
    pub stages: RaftStages,
}

enum Command {
    Propose(Bytes, oneshot::Sender<Result<(Index, Term), NodeError>>),
    /// A read point; `anywhere`: on a follower too (follower reads).
    ReadIndex {
        anywhere: bool,
        reply: oneshot::Sender<Result<Index, NodeError>>,
    },
    Compact(Index, Bytes, oneshot::Sender<Result<(), NodeError>>),
    Transfer(NodeId, oneshot::Sender<Result<(), NodeError>>),
    ChangeMembership(
        MembershipChange,
        oneshot::Sender<Result<(Index, Term), NodeError>>,
    ),
    Shutdown,
}

/// A snapshot whose bytes a blocking task finished writing, back to the loop that compacts with it.
struct Staged {
    snapshot: Snapshot,
    result: Result<StagedSnapshot, StorageError>,
    reply: oneshot::Sender<Result<(), NodeError>>,
}

/// A cheap, cloneable way for services to talk to a running node.
#[derive(Clone)]
pub struct RaftHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<NodeStatus>,
    /// Role and term: changes only when they do, unlike the status, which changes on every `Ready`.
    leadership: watch::Receiver<(Role, Term)>,
    applied: AppliedIndex,
    /// The leader's read lease as the driver last published it (lease reads only).
    lease: Arc<PublishedLease>,
}

impl RaftHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Propose a command; returns the index and term it got (not yet committed), or why the driver
    /// did not admit it (see [`super::admission`]).
    pub async fn propose(&self, data: Bytes) -> Result<(Index, Term), NodeError> {
        self.ask(|tx| Command::Propose(data, tx)).await
    }

    /// The service applied every entry up to `index`: the driver admits proposals only while the
    /// service keeps up (see [`super::admission`]).
    pub fn report_applied(&self, index: Index) {
        self.applied.report(index);
    }

    /// Within the lease the driver published, the index it would answer a read with at once.
    fn lease_read_index(&self) -> Option<Index> {
        self.lease.read_index(boot_time())
    }

    /// A linearizable read point: once the service applied this index, its state reflects every write
    /// that completed before the call.
    pub async fn read_index(&self) -> Result<Index, NodeError> {
        if let Some(index) = self.lease_read_index() {
            return Ok(index);
        }
        self.ask(|reply| Command::ReadIndex {
            anywhere: false,
            reply,
        })
        .await
    }

    /// [`RaftHandle::read_index`] on a follower too: it asks the leader for the read point (see
    /// [`RaftCore::read_index_anywhere`]), so reads can be spread over every replica.
    pub async fn read_index_anywhere(&self) -> Result<Index, NodeError> {
        // A leader answers it as `read_index`, from its lease too.
        if let Some(index) = self.lease_read_index() {
            return Ok(index);
        }
        self.ask(|reply| Command::ReadIndex {
            anywhere: true,
            reply,
        })
        .await
    }

    /// The service snapshotted its state after applying `index`.
    pub async fn compact(&self, index: Index, data: Bytes) -> Result<(), NodeError> {
        self.ask(|tx| Command::Compact(index, data, tx)).await
    }

    /// Hand leadership to `target`.
    pub async fn transfer_leadership(&self, target: NodeId) -> Result<(), NodeError> {
        self.ask(|tx| Command::Transfer(target, tx)).await
    }

    /// Propose one membership change (see [`crate::raft::membership`]); returns the index and term
    /// of its entry, not yet committed (see [`RaftHandle::wait_committed`]).
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<(Index, Term), NodeError> {
        self.ask(|tx| Command::ChangeMembership(change, tx)).await
    }

    /// Wait (at most `within`) until the entry this node appended at `index` in `term` commits.
    /// `Ok(false)` if leadership changed first: the entry may or may not have survived.
    pub async fn wait_committed(
        &self,
        index: Index,
        term: Term,
        within: Duration,
    ) -> Result<bool, NodeError> {
        let mut watch = self.subscribe();
        let settled = tokio::time::timeout(
            within,
            watch.wait_for(|s| s.raft.commit >= index || s.raft.term != term),
        )
        .await;
        match settled {
            Ok(Ok(status)) => Ok(status.raft.term == term),
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Ok(false),
        }
    }

    /// If this node leads, hand leadership to its most up-to-date follower and wait (at most `within`)
    /// until it no longer leads: a leader stopped cleanly then costs its clients one election round
    /// instead of an election timeout of silence. Returns the follower it handed to, if it did.
    pub async fn hand_off_leadership(&self, within: Duration) -> Option<NodeId> {
        let status = self.status().raft;
        if status.role != Role::Leader {
            return None;
        }
        let (target, _, _) = status
            .progress
            .iter()
            .copied()
            .filter(|&(id, _, _)| status.membership.is_voter(id))
            .max_by_key(|&(id, match_index, _)| (match_index, std::cmp::Reverse(id)))?;
        self.transfer_leadership(target).await.ok()?;
        let mut watch = self.subscribe();
        let stepped_down = tokio::time::timeout(
            within,
            watch.wait_for(|status| status.raft.role != Role::Leader),
        )
        .await;
        matches!(stepped_down, Ok(Ok(_))).then_some(target)
    }

    /// The latest status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every status change (for waiting on a condition without polling).
    pub fn subscribe(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// The node's role and term as the driver last published them.
    pub fn leadership(&self) -> (Role, Term) {
        *self.leadership.borrow()
    }

    /// A receiver that wakes only when the node's role or term changes: for a task that lives as long
    /// as the node and acts on leadership changes, which the status would wake on every `Ready`.
    pub fn subscribe_leadership(&self) -> watch::Receiver<(Role, Term)> {
        self.leadership.clone()
    }
}

/// A handle with no node behind it, for tests of what a service does around Raft: the test answers
/// its proposals and sets its status.
#[cfg(test)]
pub(crate) struct DetachedNode {
    commands: mpsc::Receiver<Command>,
    /// The status the handle's subscribers see.
    pub status: watch::Sender<NodeStatus>,
    /// The role and term the handle's leadership subscribers see.
    pub leadership: watch::Sender<(Role, Term)>,
    /// The lease the handle answers reads from.
    pub lease: Arc<PublishedLease>,
}

#[cfg(test)]
impl DetachedNode {
    /// A handle, and the node's end, of node 1 of {1, 2, 3}, a follower in term 0.
    pub(crate) fn new() -> (RaftHandle, DetachedNode) {
        let core = RaftCore::new(super::Config::new(1, vec![1, 2, 3])).expect("config");
        let (commands_tx, commands) = mpsc::channel(16);
        let (status, status_rx) = watch::channel(NodeStatus {
            raft: core.status(),
            raft_state_bytes: 0,
            snapshot_bytes: 0,
            stages: RaftStages::default(),
        });
        let (leadership, leadership_rx) = watch::channel((Role::Follower, 0));
        let handle = RaftHandle {
            commands: commands_tx,
            status: status_rx,
            leadership: leadership_rx,
            applied: AppliedIndex::default(),
            lease: Arc::default(),
        };
        let lease = handle.lease.clone();
        (
            handle,
            DetachedNode {
                commands,
                status,
                leadership,
                lease,
            },
        )
    }

    /// Set the role and term the handle reports.
    pub(crate) fn set_role(&self, role: super::Role, term: Term) {
        self.status.send_modify(|s| {
            s.raft.role = role;
            s.raft.term = term;
        });
        self.leadership.send_replace((role, term));
    }

    /// Wait for the next ReadIndex request; the test answers it through the returned sender.
    pub(crate) async fn next_read_index(&mut self) -> oneshot::Sender<Result<Index, NodeError>> {
        loop {
            if let Command::ReadIndex { reply, .. } =
                self.commands.recv().await.expect("handle gone")
            {
                return reply;
            }
        }
    }

    /// Wait for the next proposal; the test answers it through the returned sender.
    pub(crate) async fn next_proposal(
        &mut self,
    ) -> oneshot::Sender<Result<(Index, Term), NodeError>> {
        loop {
            if let Command::Propose(_, reply) = self.commands.recv().await.expect("handle gone") {
                return reply;
            }
        }
    }
}

/// A running node: its handle, its gRPC service and its driver task.
pub struct RaftNode {
    handle: RaftHandle,
    service: RaftService,
    task: JoinHandle<Result<(), NodeError>>,
}

impl RaftNode {
    /// Load `storage`, start the driver and the transport. Returns the node and the stream of entries and
    /// snapshots the service must apply. Must run inside a tokio runtime.
    pub fn start(
        config: NodeConfig,
        storage: impl Storage,
    ) -> Result<(RaftNode, mpsc::UnboundedReceiver<Applied>), NodeError> {
        let persisted = storage.load()?;
        let id = config.raft.id;
        let core = RaftCore::restore(config.raft.clone(), persisted)?;
        let (command_tx, command_rx) = mpsc::channel(4096);
        let mut inbound = InboundConfig::new(id);
        inbound.cluster = config.cluster_id();
        inbound.group = config.group.clone();
        inbound.guard = config.guard.clone();
        inbound.max_snapshot_bytes = config.max_snapshot_bytes;
        inbound.snapshot_check = config.snapshot_check.clone();
        let (service, inbound_rx) = RaftService::new(inbound);
        let (apply_tx, apply_rx) = mpsc::unbounded_channel();
        let transport = Transport::start(&config.peers, &config.transport, &config.cluster_id());
        let mut addresses = config.peers.clone();
        if let Some(own) = &config.address {
            addresses.insert(id, own.clone());
        }
        let wall_ticks = config.raft.lease_reads.then(|| WallTicks {
            start: boot_time(),
            tick: config.tick,
            delivered: 0,
            max_burst: 2 * u64::from(config.raft.election_ticks) + 1,
        });
        let (driver, watched, staged_rx) = Driver::new(
            core,
            Some(Box::new(storage)),
            transport,
            apply_tx,
            wall_ticks,
            addresses,
        );
        let task = tokio::spawn(
            driver
                .run(config.tick, command_rx, inbound_rx, staged_rx)
                .instrument(info_span!(
                    "raft",
                    node = id,
                    term = tracing::field::Empty,
                    role = tracing::field::Empty
                )),
        );
        let node = RaftNode {
            handle: RaftHandle {
                commands: command_tx,
                status: watched.status,
                leadership: watched.leadership,
                applied: watched.applied,
                lease: watched.lease,
            },
            service,
            task,
        };
        Ok((node, apply_rx))
    }

    /// A handle for services.
    pub fn handle(&self) -> RaftHandle {
        self.handle.clone()
    }

    /// The peer-facing gRPC service, to be added to the node's tonic server. Batches are cut at
    /// `max_bytes_per_message`, but one entry always travels whole, so the limit must exceed the
    /// largest entry a service proposes (a shard page with its dedup records can pass 8 MiB).
    pub fn service(&self) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(self.service.clone())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
    }

    /// Stop abruptly, as a crash would: nothing more is persisted, sent or applied.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Stop after the current `Ready` is handled; returns the driver's final result.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let _ = self.handle.commands.send(Command::Shutdown).await;
        match self.task.await {
            Ok(result) => result,
            Err(_) => Err(NodeError::Stopped),
        }
    }

    /// Wait until the driver task has fully stopped (after `abort`), so its storage is closed.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Driver {
    core: RaftCore,
    storage: Option<Box<dyn Storage>>,
    transport: Transport,
    apply: mpsc::UnboundedSender<Applied>,
    status: watch::Sender<NodeStatus>,
    /// Role and term, sent only when they change ([`RaftHandle::subscribe_leadership`]).
    leadership: watch::Sender<(Role, Term)>,
    reads: HashMap<u64, oneshot::Sender<Result<Index, NodeError>>>,
    next_read: u64,
    /// Where lease reads are answered without this loop ([`super::local_lease`]).
    lease: Arc<PublishedLease>,
    last_role: Role,
    last_term: Term,
    admission: Admission,
    /// Where blocking snapshot writes report back ([`Driver::compact`]).
    staged_tx: mpsc::UnboundedSender<Staged>,
    /// Batches of committed entries handed to the service and not yet reported applied, as (last
    /// index, entries, bytes): what bounds the apply queue ([`APPLY_WINDOW_ENTRIES`]).
    apply_ledger: VecDeque<(Index, usize, usize)>,
    /// Time spent in the write path's stages ([`NodeStatus::stages`]).
    stages: RaftStages,
    /// Leader: entries proposed here and not yet seen committed, as (index, when appended), for
    /// [`RaftStages::commit`]. Dropped when leadership is.
    uncommitted: VecDeque<(Index, std::time::Instant)>,
    /// With lease reads: ticks follow the wall clock ([`WallTicks`]).
    wall_ticks: Option<WallTicks>,
    /// Every peer address this node knows: `--peers`, then those the configurations carry.
    addresses: HashMap<NodeId, String>,
}

/// The receiving ends of what a driver publishes, for its [`RaftHandle`].
struct Watched {
    status: watch::Receiver<NodeStatus>,
    leadership: watch::Receiver<(Role, Term)>,
    applied: AppliedIndex,
    lease: Arc<PublishedLease>,
}

impl Driver {
    /// A driver for `core` (restored from `storage`), with the receivers its handle reads and the
    /// queue its snapshot writes report to.
    fn new(
        core: RaftCore,
        storage: Option<Box<dyn Storage>>,
        transport: Transport,
        apply: mpsc::UnboundedSender<Applied>,
        wall_ticks: Option<WallTicks>,
        addresses: HashMap<NodeId, String>,
    ) -> (Driver, Watched, mpsc::UnboundedReceiver<Staged>) {
        let (raft_state_bytes, snapshot_bytes) = storage
            .as_ref()
            .map_or((0, 0), |s| (s.raft_state_size(), s.snapshot_size()));
        let raft = core.status();
        let (leadership, leadership_rx) = watch::channel((raft.role, raft.term));
        let (status, status_rx) = watch::channel(NodeStatus {
            raft,
            raft_state_bytes,
            snapshot_bytes,
            stages: RaftStages::default(),
        });
        let admission = Admission::default();
        let (staged_tx, staged_rx) = mpsc::unbounded_channel();
        let watched = Watched {
            status: status_rx,
            leadership: leadership_rx,
            applied: admission.applied.clone(),
            lease: Arc::default(),
        };
        let driver = Driver {
            core,
            storage,
            transport,
            apply,
            status,
            leadership,
            reads: HashMap::new(),
            next_read: 0,
            lease: watched.lease.clone(),
            last_role: Role::Follower,
            last_term: 0,
            admission,
            staged_tx,
            apply_ledger: VecDeque::new(),
            stages: RaftStages::default(),
            uncommitted: VecDeque::new(),
            wall_ticks,
            addresses,
        };
        (driver, watched, staged_rx)
    }
}

/// A stopped (or aborted) node answers no read from a lease its loop no longer looks after.
impl Drop for Driver {
    fn drop(&mut self) {
        self.lease.publish(None);
    }
}

/// Ticks by the wall clock, for lease reads: a lease is measured in ticks, so a loop that fell behind
/// (a long flush, a starved CPU, SIGSTOP) must not count fewer ticks than time passed, or a leader
/// frozen past its lease would answer reads from it on waking. The interval timer drops the ticks it
/// missed; this delivers them, from CLOCK_BOOTTIME: monotonic, and running while the process is
/// stopped and while the machine is suspended (CLOCK_MONOTONIC, `Instant`'s clock, stops then).
struct WallTicks {
    /// [`boot_time`] when the node started.
    start: Duration,
    tick: Duration,
    delivered: u64,
    /// Most ticks delivered at once: enough to end any lease and let CheckQuorum depose a stale
    /// leader (two election timeouts); beyond that a long pause would only replay elections.
    max_burst: u64,
}

/// Time since boot, suspensions included (CLOCK_BOOTTIME).
fn boot_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

impl WallTicks {
    /// Ticks due now and not yet delivered (at most `max_burst`; the rest are skipped).
    fn due(&mut self) -> u64 {
        let elapsed =
            boot_time().saturating_sub(self.start).as_nanos() / self.tick.as_nanos().max(1);
        let due = u64::try_from(elapsed)
            .unwrap_or(u64::MAX)
            .saturating_sub(self.delivered);
        self.delivered += due;
        due.min(self.max_burst)
    }
}

/// Most entries timed from append to commit at once; beyond it the breakdown samples fewer.
const UNCOMMITTED_TIMED: usize = 1 << 16;

/// Most committed entries handed to the service beyond what it has reported applying; the rest wait
/// in the log. Large enough that a busy applier never waits on the driver.
pub const APPLY_WINDOW_ENTRIES: usize = 4096;

/// Most bytes of committed entries handed to the service beyond what it has reported applying (one
/// entry may overshoot it by its own size).
pub const APPLY_WINDOW_BYTES: usize = 64 << 20;

/// Where a persist runs while the driver waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlushPlace {
    /// On the driver's thread, blocking the runtime's only worker until the flush is done.
    Inline,
    /// On the driver's thread, after handing the worker's other tasks to a new worker
    /// ([`tokio::task::block_in_place`]).
    InPlace,
    /// On the blocking pool ([`tokio::task::spawn_blocking`]).
    Pool,
}

/// Where `ready`'s persist runs, on a runtime of `flavor` with `workers` worker threads; `short` asks
/// the storage's [`Storage::persist_is_short`] of it, only where the answer matters (a follower's
/// persist on one worker), so a leader's persists never pay for the sizing.
///
/// - **A leader's: on the pool.** It has just handed its entries to the peer links, which must get
///   to run while it flushes (in place, with a yield first to let them, it was no faster), and its
///   runtime keeps taking proposals meanwhile, the next batch.
/// - **A follower's: on its own thread.** Its persist is the middle of the write path (the leader
///   waits for its acknowledgement), and a trip to the pool adds two thread wake-ups to it (in
///   place, a follower's persist took 0.19 ms instead of 0.25 in `kvctl bench --breakdown`).
///   - With one worker (`kvd --worker-threads 1`) and a persist the storage calls `short`
///     ([`Storage::persist_is_short`]: one small write and a flush) it blocks that worker:
///     `block_in_place` would wake a thread to take the worker's tasks over, and the
///     acknowledgement, sent from a thread that no longer is the worker, would wake it again. Those
///     tasks lose little by waiting one flush: the driver, which most of them feed, waits for it
///     anyway. Measured on three nodes of one worker each on 2 cores: a single client's put p50
///     0.51–0.53 ms instead of 0.57–0.59, 64 clients' puts and YCSB-A unchanged. Anything longer
///     (a snapshot, a checkpoint of a full journal) goes in place: client calls, pings and
///     metrics must keep being served meanwhile.
///   - With more workers, in place.
/// - **A current-thread runtime (tests): on the pool.** It has no place to block in, and several
///   nodes may share its thread.
///
/// An aborted node stops once a persist on its own thread is done, so its storage is closed when
/// the task has ended.
fn flush_place(
    ready: &Ready,
    short: impl FnOnce() -> bool,
    flavor: tokio::runtime::RuntimeFlavor,
    workers: usize,
) -> FlushPlace {
    if ready.persist_after_send || flavor != tokio::runtime::RuntimeFlavor::MultiThread {
        FlushPlace::Pool
    } else if workers == 1 && short() {
        FlushPlace::Inline
    } else {
        FlushPlace::InPlace
    }
}

/// A persist longer than this is logged: the Raft loop does not tick while it waits.
const SLOW_PERSIST: Duration = Duration::from_millis(200);

/// Inputs taken per wake-up at most, so ticks are never starved by a flood of messages.
const BATCH: usize = 512;

impl Driver {
    async fn run(
        mut self,
        tick: Duration,
        mut commands: mpsc::Receiver<Command>,
        mut inbound: InboundQueue,
        mut staged_rx: mpsc::UnboundedReceiver<Staged>,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(term = self.core.term(), "raft node started");
        loop {
            tokio::select! {
                biased;
                _ = ticker.tick() => self.tick(),
                command = commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => self.command(command),
                },
                Some(envelope) = inbound.recv() => self.step(envelope),
                Some(staged) = staged_rx.recv() => {
                    if let Err(e) = self.staged(staged) {
                        error!(error = %e, "stopping: cannot store a snapshot");
                        return Err(e);
                    }
                }
            }
            for _ in 0..BATCH {
                match inbound.try_recv() {
                    Some(envelope) => self.step(envelope),
                    None => break,
                }
            }
            for _ in 0..BATCH {
                match commands.try_recv() {
                    Ok(Command::Shutdown) => return self.handle_ready().await,
                    Ok(command) => self.command(command),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.handle_ready().await {
                error!(error = %e, "stopping: cannot persist raft state");
                return Err(e);
            }
        }
        self.handle_ready().await
    }

    /// One tick, or with lease reads every tick the wall clock says is due.
    fn tick(&mut self) {
        if self.wall_ticks.is_some() {
            self.catch_up_ticks();
        } else {
            self.core.tick();
        }
    }

    /// With lease reads: deliver the ticks due by the wall clock (before a read is answered from the
    /// lease, so the lease is judged on the time that really passed).
    fn catch_up_ticks(&mut self) {
        let due = self.wall_ticks.as_mut().map_or(0, WallTicks::due);
        for _ in 0..due {
            self.core.tick();
        }
    }

    fn step(&mut self, envelope: Envelope) {
        // With lease reads, the ticks already due count before the message does: a follower whose
        // loop fell behind (a stall, a suspended VM) and then hears its leader must count its promise
        // not to vote from now, not have the missed ticks delivered after the reset (which ended the
        // promise at once while the leader's lease ran on).
        self.catch_up_ticks();
        let from = envelope.from;
        if let Err(e) = self.core.step(envelope) {
            warn!(from, error = %e, "refused a message");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Propose(data, reply) => {
                let bytes = data.len();
                let result = match self.admission.check(bytes, self.core.commit_index()) {
                    Err(refused) => Err(refused.into()),
                    Ok(()) => self.core.propose(data).map_err(NodeError::from),
                };
                if let Ok((index, _)) = result {
                    self.admission.admitted(index, bytes);
                    if self.uncommitted.len() < UNCOMMITTED_TIMED {
                        self.uncommitted
                            .push_back((index, std::time::Instant::now()));
                    }
                }
                let _ = reply.send(result);
            }
            Command::ReadIndex { anywhere, reply } => {
                self.catch_up_ticks();
                self.next_read += 1;
                let id = self.next_read;
                let asked = if anywhere {
                    self.core.read_index_anywhere(id)
                } else {
                    self.core.read_index(id)
                };
                match asked {
                    Ok(()) => {
                        self.reads.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Compact(index, data, reply) => self.compact(index, data, reply),
            Command::Transfer(target, reply) => {
                let result = self.core.transfer_leadership(target);
                // A caller that reads after the transfer returned reads through a round.
                self.publish_lease();
                let _ = reply.send(result.map_err(NodeError::from));
            }
            Command::ChangeMembership(change, reply) => {
                let addresses = &self.addresses;
                let result = self
                    .core
                    .propose_membership(change, |id| addresses.get(&id).cloned())
                    .map_err(NodeError::from);
                self.publish_lease();
                let _ = reply.send(result);
            }
            Command::Shutdown => {}
        }
    }

    /// Take the service's snapshot. Its bytes (as large as the state) are written on a blocking thread
    /// while this loop goes on ticking, replicating and answering; only then does the core compact, and
    /// the `persist` that follows just switches to the written bytes. Without this, writing a large
    /// snapshot would stop heartbeats for long enough to start an election.
    fn compact(
        &mut self,
        index: Index,
        data: Bytes,
        reply: oneshot::Sender<Result<(), NodeError>>,
    ) {
        let meta = match self.core.compaction_meta(index) {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                let _ = reply.send(Ok(()));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let Some(stager) = self.storage.as_mut().and_then(|s| s.snapshot_stager()) else {
            let _ = reply.send(self.core.compact(index, data).map_err(NodeError::from));
            return;
        };
        let snapshot = Snapshot {
            meta,
            data,
            // The staged file holds only the data; the core records the configuration when it
            // compacts, and storage writes it with the switch to this snapshot.
            membership: None,
        };
        let staged = self.staged_tx.clone();
        info!(
            index = meta.index,
            bytes = snapshot.data.len(),
            "writing a snapshot"
        );
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _node = span.enter();
            let started = std::time::Instant::now();
            let result = stager.stage(&snapshot);
            info!(index = snapshot.meta.index, took = ?started.elapsed(), ok = result.is_ok(), "snapshot written");
            let _ = staged.send(Staged {
                snapshot,
                result,
                reply,
            });
        });
    }

    /// A snapshot's bytes are on disk: compact to it (or drop them if the log moved past meanwhile).
    fn staged(&mut self, staged: Staged) -> Result<(), NodeError> {
        let Staged {
            snapshot,
            result,
            reply,
        } = staged;
        let written = match result {
            Ok(written) => written,
            Err(e) => {
                warn!(index = snapshot.meta.index, error = %e, "cannot write a snapshot");
                let _ = reply.send(Err(e.into()));
                return Ok(());
            }
        };
        let meta = snapshot.meta;
        let result = self.core.compact(meta.index, snapshot.data);
        let storage = self.storage.as_mut().ok_or(NodeError::Stopped)?;
        if result.is_ok() && self.core.snapshot_meta() == meta {
            storage.offer_staged(written)?;
        } else {
            // A leader's snapshot overtook this one while it was being written.
            storage.discard_staged(written)?;
        }
        let _ = reply.send(result.map_err(NodeError::from));
        Ok(())
    }

    /// Let the core hand out only what fits in the apply window, given what the service has applied.
    fn refresh_apply_budget(&mut self) {
        let Some(applied) = self.admission.applied.get() else {
            // A service that does not report is handed everything (tests driving a bare node).
            self.core.set_apply_budget(None);
            return;
        };
        while self
            .apply_ledger
            .front()
            .is_some_and(|&(last, _, _)| last <= applied)
        {
            self.apply_ledger.pop_front();
        }
        let (entries, bytes) = self
            .apply_ledger
            .iter()
            .fold((0, 0), |(n, b), &(_, en, eb)| (n + en, b + eb));
        self.core.set_apply_budget(Some(ApplyBudget {
            entries: APPLY_WINDOW_ENTRIES.saturating_sub(entries),
            bytes: APPLY_WINDOW_BYTES.saturating_sub(bytes),
        }));
    }

    /// Handles `Ready`s until the core has none. More than one when a leader's own flush completed a
    /// commit ([`RaftCore::persisted`]): that commit must not wait for the next input.
    async fn handle_ready(&mut self) -> Result<(), NodeError> {
        // Revocations are published before any send (`Driver::send`); this publishes what the pass
        // changed without sending (a renewal, a commit, a step-down).
        let handled = self.handle_readies().await;
        self.publish_lease();
        handled
    }

    /// Every message leaves through here: whatever ended the lease is published before it does.
    fn send(&mut self, messages: Vec<Envelope>) {
        self.publish_lease();
        self.transport.send(messages);
    }

    /// The core's lease, as [`RaftHandle::read_index`] answers from it without this loop.
    fn publish_lease(&self) {
        // Without lease reads nothing is ever published.
        let Some(clock) = &self.wall_ticks else {
            return;
        };
        let grant = self.core.lease_read_grant().map(|(index, ticks_left)| {
            (
                index,
                lease_end(clock.start, clock.tick, clock.delivered, ticks_left),
            )
        });
        self.lease.publish(grant);
    }

    async fn handle_readies(&mut self) -> Result<(), NodeError> {
        for _ in 0..4 {
            self.refresh_apply_budget();
            if !self.core.has_ready() {
                break;
            }
            self.handle_one_ready().await?;
        }
        Ok(())
    }

    async fn handle_one_ready(&mut self) -> Result<(), NodeError> {
        let mut ready = self.core.ready();
        self.time_commits();
        if let Some(membership) = ready.membership.take() {
            // Before anything is sent: a new member must be reachable for this Ready's messages.
            self.follow_membership(&membership);
        }
        if ready.persist_after_send {
            // A leader's new entries go to the followers now, so their flushes overlap this one.
            self.send(std::mem::take(&mut ready.messages));
        }
        if ready.commit_only {
            // No flush: a memory write, not worth a trip to the blocking pool.
            self.storage
                .as_mut()
                .ok_or(NodeError::Stopped)?
                .persist(&ready)?;
        } else if ready.must_persist() {
            let mut storage = self.storage.take().ok_or(NodeError::Stopped)?;
            let started = std::time::Instant::now();
            let runtime = tokio::runtime::Handle::current();
            let place = flush_place(
                &ready,
                || storage.persist_is_short(&ready),
                runtime.runtime_flavor(),
                runtime.metrics().num_workers(),
            );
            let persist = move || {
                let result = storage.persist(&ready);
                (storage, ready, result)
            };
            let (storage, ready_back, result) = match place {
                FlushPlace::Inline => persist(),
                FlushPlace::InPlace => tokio::task::block_in_place(persist),
                FlushPlace::Pool => tokio::task::spawn_blocking(persist)
                    .await
                    .map_err(|_| NodeError::Stopped)?,
            };
            let took = started.elapsed();
            let entries = ready_back.log_write.as_ref().map_or(0, |w| w.entries.len());
            if entries > 0 {
                self.stages.persisted_entries += entries as u64;
                if self.core.is_leader() {
                    self.stages.leader_persist.add(took);
                } else {
                    self.stages.follower_persist.add(took);
                }
            }
            if took > SLOW_PERSIST {
                // The loop waited this long without ticking: worth an operator's attention.
                warn!(
                    took = ?took,
                    entries = ready_back.log_write.as_ref().map_or(0, |w| w.entries.len()),
                    snapshot = ready_back.snapshot.as_ref().map(|s| s.meta.index),
                    "slow persist"
                );
            }
            self.storage = Some(storage);
            ready = ready_back;
            result?;
            if ready.persist_after_send {
                if let Some(last) = ready.log_write.as_ref().and_then(|w| w.entries.last()) {
                    self.core.persisted(last.index, last.term);
                }
            }
        }
        self.after_persist(ready);
        Ok(())
    }

    /// The configuration in force changed: learn the addresses it carries and connect to every
    /// member. Links to nodes no longer in it stay: a removed leader must still hear the
    /// acknowledgements that commit its removal, and a node re-added by the same id reuses its link.
    fn follow_membership(&mut self, membership: &Membership) {
        let me = self.core.id();
        for (id, member) in membership.members() {
            if !member.address.is_empty() {
                self.addresses.insert(id, member.address.clone());
            }
        }
        for id in membership.ids().filter(|&id| id != me) {
            if !self.addresses.contains_key(&id) {
                warn!(
                    peer = id,
                    "no address known for a member; it cannot be reached"
                );
            }
        }
        let peers: HashMap<NodeId, String> = self
            .addresses
            .iter()
            .filter(|(&id, _)| id != me)
            .map(|(&id, address)| (id, address.clone()))
            .collect();
        info!(membership = %membership, "configuration in force");
        self.transport.set_peers(&peers);
    }

    /// Leader: the entries proposed here that are now committed passed [`RaftStages::commit`].
    fn time_commits(&mut self) {
        if !self.core.is_leader() {
            self.uncommitted.clear();
            return;
        }
        let (commit, now) = (self.core.commit_index(), std::time::Instant::now());
        while let Some(&(index, appended)) = self.uncommitted.front() {
            if index > commit {
                break;
            }
            self.stages.commit.add(now - appended);
            self.uncommitted.pop_front();
        }
    }

    fn after_persist(&mut self, ready: Ready) {
        let soft = ready.soft_state;
        if soft.term != self.last_term || soft.role != self.last_role {
            // Every later log line of this node carries its current term and role.
            let span = tracing::Span::current();
            span.record("term", soft.term);
            span.record("role", tracing::field::display(soft.role));
            self.last_term = soft.term;
        }
        if soft.role != self.last_role {
            info!(term = soft.term, role = %soft.role, leader = ?soft.leader, "role changed");
            self.last_role = soft.role;
        }
        self.admission
            .settle(self.core.commit_index(), self.core.is_leader());

        self.send(ready.messages);
        if let Some(snapshot) = ready.snapshot_to_apply {
            let _ = self.apply.send(Applied::Snapshot(snapshot));
        }
        if let Some(last) = ready.committed_entries.last() {
            let bytes = ready.committed_entries.iter().map(|e| e.data.len()).sum();
            self.apply_ledger
                .push_back((last.index, ready.committed_entries.len(), bytes));
            let _ = self.apply.send(Applied::Entries(ready.committed_entries));
        }
        for read in ready.read_states {
            if let Some(reply) = self.reads.remove(&read.id) {
                let _ = reply.send(Ok(read.index));
            }
        }
        for failed in ready.failed_reads {
            if let Some(reply) = self.reads.remove(&failed.id) {
                let _ = reply.send(Err(match failed.why {
                    ReadFailure::LeadershipLost => NodeError::ReadAborted,
                    ReadFailure::LeaderBusy => NodeError::Overloaded(format!(
                        "the leader holds {} read requests of this follower already",
                        super::read_only::MAX_FORWARDED_REQUESTS
                    )),
                }));
            }
        }
        let (raft_state_bytes, snapshot_bytes) = self
            .storage
            .as_ref()
            .map_or((0, 0), |s| (s.raft_state_size(), s.snapshot_size()));
        let mut raft = self.core.status();
        raft.membership
            .fill_addresses(|id| self.addresses.get(&id).cloned());
        let leadership = (raft.role, raft.term);
        self.status.send_replace(NodeStatus {
            raft,
            raft_state_bytes,
            snapshot_bytes,
            stages: self.stages,
        });
        // After the status, from the same view: a service that sees leadership lost here and then
        // reads the status (or this watch) finds it lost there too.
        self.leadership.send_if_modified(|published| {
            let changed = *published != leadership;
            *published = leadership;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{boot_time, flush_place, Command, DetachedNode, FlushPlace, WallTicks};
    use crate::raft::Ready;
    use std::time::Duration;
    use tokio::runtime::RuntimeFlavor::{CurrentThread, MultiThread};

    #[test]
    fn a_follower_flushes_on_its_only_worker_and_a_leader_on_the_pool() {
        let follower = Ready::default();
        let leader = Ready {
            persist_after_send: true,
            ..Ready::default()
        };
        // One worker: handing it over would cost two thread wake-ups on the write path.
        assert_eq!(
            flush_place(&follower, || true, MultiThread, 1),
            FlushPlace::Inline
        );
        // More: the others keep serving while this one flushes.
        assert_eq!(
            flush_place(&follower, || true, MultiThread, 2),
            FlushPlace::InPlace
        );
        // A persist that may take long (a snapshot, a checkpoint): the runtime keeps serving
        // meanwhile, even on one worker.
        assert_eq!(
            flush_place(&follower, || false, MultiThread, 1),
            FlushPlace::InPlace
        );
        // A leader's runtime takes the next proposals while it flushes, however many workers.
        assert_eq!(
            flush_place(&leader, || true, MultiThread, 1),
            FlushPlace::Pool
        );
        assert_eq!(
            flush_place(&leader, || true, MultiThread, 4),
            FlushPlace::Pool
        );
        // A current-thread runtime has no place to block in, and its thread may run several nodes.
        assert_eq!(
            flush_place(&follower, || true, CurrentThread, 1),
            FlushPlace::Pool
        );
    }

    fn clock_started_ago(ago: Duration, max_burst: u64) -> WallTicks {
        WallTicks {
            start: boot_time().saturating_sub(ago),
            tick: Duration::from_millis(10),
            delivered: 0,
            max_burst,
        }
    }

    #[test]
    fn ticks_missed_while_stopped_are_delivered_on_waking() {
        // The loop was frozen for a second: the next wake-up counts all hundred ticks, once.
        let mut clock = clock_started_ago(Duration::from_secs(1), 1000);
        let due = clock.due();
        assert!((100..=102).contains(&due), "{due} ticks due after 1 s");
        assert!(clock.due() <= 1, "ticks delivered twice");
    }

    #[test]
    fn a_long_pause_delivers_a_bounded_burst() {
        let mut clock = clock_started_ago(Duration::from_secs(600), 201);
        assert_eq!(clock.due(), 201);
        assert!(clock.due() <= 1, "the skipped ticks came back");
    }

    /// A read within the lease the driver published is answered on the caller's task; once the lease
    /// is revoked the driver is asked.
    #[tokio::test]
    async fn a_read_within_the_published_lease_does_not_wait_for_the_driver() {
        let (handle, mut node) = DetachedNode::new();
        node.lease
            .publish(Some((5, boot_time() + Duration::from_secs(3600))));
        // Nothing takes the node's commands: only the published lease can answer.
        let read = tokio::time::timeout(Duration::from_secs(10), handle.read_index()).await;
        assert_eq!(read.expect("answered").expect("a read index"), 5);
        let read =
            tokio::time::timeout(Duration::from_secs(10), handle.read_index_anywhere()).await;
        assert_eq!(read.expect("answered").expect("a read index"), 5);
        node.lease.publish(None);
        let asking = tokio::spawn(async move { handle.read_index().await });
        let command = node.commands.recv().await.expect("the driver is asked");
        assert!(matches!(
            command,
            Command::ReadIndex {
                anywhere: false,
                ..
            }
        ));
        asking.abort();
    }

    /// The leadership watch, which every service's leadership watcher waits on for as long as the node
    /// runs, wakes when the role or term changes and not on the driver's other passes: commits change
    /// the status without waking it.
    #[tokio::test]
    async fn the_leadership_watch_wakes_on_a_new_role_or_term_only() {
        use super::super::storage::{Identity, SledStorage};
        use super::{NodeConfig, RaftNode, Role};
        let dir = tempfile::tempdir().expect("temp dir");
        let identity = Identity {
            cluster: "test".into(),
            node: 1,
        };
        let storage = SledStorage::open(dir.path(), &identity).expect("storage");
        let mut config = NodeConfig::new(1, Default::default());
        config.raft.election_ticks = 10;
        config.raft.election_spread_ticks = Some(5);
        config.raft.heartbeat_ticks = 2;
        config.tick = Duration::from_millis(5);
        let (node, _applied) = RaftNode::start(config, storage).expect("node starts");
        let handle = node.handle();
        let mut leadership = handle.subscribe_leadership();
        let leads = leadership.wait_for(|&(role, _)| role == Role::Leader);
        let (_, term) = *tokio::time::timeout(Duration::from_secs(10), leads)
            .await
            .expect("a lone node leads")
            .expect("the node runs");
        let mut status = handle.subscribe();
        status.borrow_and_update();
        for i in 0..20u8 {
            let (index, _) = handle
                .propose(bytes::Bytes::from(vec![i]))
                .await
                .expect("proposed");
            let committed = handle.wait_committed(index, term, Duration::from_secs(10));
            assert!(committed.await.expect("the node runs"), "entry {index}");
        }
        assert!(status.has_changed().expect("the node runs"));
        assert!(
            !leadership.has_changed().expect("the node runs"),
            "woken without a new role or term: {:?}",
            *leadership.borrow()
        );
        node.shutdown().await.expect("a clean stop");
    }

    /// A driver of node 1 of {1, 2, 3} (a fresh follower, lease reads on) whose wall clock started
    /// `ago`, with no storage and no peers: enough to feed it inputs and look at its core.
    fn lagging_driver(ago: Duration) -> super::Driver {
        let mut config = super::Config::new(1, vec![1, 2, 3]);
        config.lease_reads = true;
        let core = super::RaftCore::new(config).expect("config");
        let transport = super::Transport::start(
            &std::collections::HashMap::new(),
            &super::TransportConfig::default(),
            "test",
        );
        let max_burst = 2 * 100 + 1;
        let (driver, _, _) = super::Driver::new(
            core,
            None,
            transport,
            tokio::sync::mpsc::unbounded_channel().0,
            Some(clock_started_ago(ago, max_burst)),
            Default::default(),
        );
        driver
    }

    /// A follower whose loop fell behind the wall clock (here: 3 s of ticks due, more than its
    /// election timeout) and then hears its leader counts the missed ticks first: its promise not to
    /// vote (and its election timer) start from the heartbeat. Delivered after it, the missed ticks
    /// ended the promise at once while the leader's lease ran on (found by review), and started a
    /// campaign against a live leader.
    #[tokio::test]
    async fn missed_ticks_count_before_a_message_not_after_it() {
        let mut driver = lagging_driver(Duration::from_secs(3));
        driver.step(super::Envelope {
            from: 2,
            to: 1,
            message: super::super::message::Message::AppendEntries {
                term: 1,
                prev_log_index: 0,
                prev_log_term: 0,
                entries: Vec::new(),
                leader_commit: 0,
                read_round: 1,
            },
        });
        driver.tick();
        assert_eq!(driver.core.role(), super::Role::Follower);
        assert_eq!(driver.core.leader(), Some(2));
    }
}
