//! Raft messages over gRPC (tonic).
//!
//! **Outbound**, each peer gets two tasks: one keeps a long-lived client stream (`RaftTransport.Send`)
//! open and pushes every small message into it, reconnecting with exponential backoff; the other sends
//! snapshots through `RaftTransport.InstallSnapshot` in chunks, so a large snapshot never delays a
//! heartbeat. Chunks are zero-copy slices of the snapshot's `Bytes`: sending needs no second copy.
//!
//! Sending never blocks the node: queues are bounded and a message that does not fit is dropped, which
//! Raft tolerates like any network loss (the leader retransmits). Messages queued while a peer is
//! unreachable are discarded on each failed connection attempt: they would only be stale on arrival.
//!
//! **Inbound**, [`RaftService`] decodes and validates every message and hands it to the node's inbound
//! queue; malformed input is answered with `INVALID_ARGUMENT`, never passed on. Before anything is
//! allocated or queued it checks who sent it: the cluster id on the wire must be ours (a typo in
//! `--peers` cannot merge two groups), the sender must be one of our peers and, with TLS, the very node
//! its certificate names. The queue is bounded in bytes as well as messages, a snapshot's buffer grows
//! only as its chunks arrive, and each peer gets one snapshot stream at a time, dropped when idle.

use super::message::{Envelope, Message};
use super::types::{Index, NodeId, SnapshotMeta, Term};
use super::wire::{envelope_from_proto, envelope_to_proto};
use crate::proto::raft as pb;
use crate::proto::raft::raft_transport_client::RaftTransportClient;
use crate::proto::raft::raft_transport_server::RaftTransport;
use crate::security::{Guard, Principal, Security};
use bytes::BytesMut;
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn};

/// The id a cluster's messages carry: the deployment's cluster name and the Raft group
/// (`prod/shard-3`). Nodes record it in their data directory at first start.
pub fn cluster_id(cluster: &str, group: &str) -> String {
    format!("{cluster}/{group}")
}

/// Knobs of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// How long to wait for a TCP + HTTP/2 connection to a peer.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts (backoff doubles from 50 ms up to this).
    pub max_backoff: Duration,
    /// Messages queued per peer before new ones are dropped.
    pub queue_depth: usize,
    /// Bytes per snapshot chunk. Each chunk is one gRPC message, so it must stay below tonic's 4 MiB
    /// default decoding limit.
    pub snapshot_chunk_bytes: usize,
    /// A snapshot transfer during which no chunk goes out for this long is abandoned (the leader sends
    /// it again later). A stall, not a total: a snapshot of any size may take as long as it needs while
    /// it keeps moving.
    pub snapshot_timeout: Duration,
    /// Plaintext or mutual TLS to peers.
    pub security: Security,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            connect_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            queue_depth: 4096,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_timeout: Duration::from_secs(30),
            security: Security::Insecure,
        }
    }
}

struct PeerQueues {
    messages: mpsc::Sender<Envelope>,
    snapshots: mpsc::Sender<Envelope>,
    address: String,
}

/// The outbound side: routes each message to its peer's queue.
pub struct Transport {
    peers: HashMap<NodeId, PeerQueues>,
    config: TransportConfig,
    cluster: String,
}

impl Transport {
    /// Start the per-peer tasks for `peers` (id → `host:port`), stamping every message with `cluster`
    /// (see [`cluster_id`]). Must run inside a tokio runtime. The tasks stop when the `Transport` is
    /// dropped.
    pub fn start(peers: &HashMap<NodeId, String>, config: &TransportConfig, cluster: &str) -> Self {
        let mut transport = Transport {
            peers: HashMap::new(),
            config: config.clone(),
            cluster: cluster.to_string(),
        };
        transport.set_peers(peers);
        transport
    }

    /// Follow a configuration change: start links to new peers (or to a peer whose address
    /// changed), stop those to peers no longer listed (their tasks end with their queues).
    pub fn set_peers(&mut self, peers: &HashMap<NodeId, String>) {
        self.peers
            .retain(|id, queues| peers.get(id) == Some(&queues.address));
        for (&id, address) in peers {
            if self.peers.contains_key(&id) {
                continue;
            }
            let (messages, message_rx) = mpsc::channel(self.config.queue_depth);
            // One snapshot at a time: the core resends if one is dropped.
            let (snapshots, snapshot_rx) = mpsc::channel(1);
            let link = Link {
                peer: id,
                address: address.clone(),
                config: self.config.clone(),
                cluster: self.cluster.clone(),
            };
            tokio::spawn(stream_messages(link.clone(), message_rx));
            tokio::spawn(stream_snapshots(link, snapshot_rx));
            self.peers.insert(
                id,
                PeerQueues {
                    messages,
                    snapshots,
                    address: address.clone(),
                },
            );
        }
    }

    /// Queue messages for sending; never waits.
    pub fn send(&self, envelopes: Vec<Envelope>) {
        for envelope in envelopes {
            let Some(queues) = self.peers.get(&envelope.to) else {
                warn!(to = envelope.to, "dropping message for unknown peer");
                continue;
            };
            let queue = match envelope.message {
                Message::InstallSnapshot { .. } => &queues.snapshots,
                _ => &queues.messages,
            };
            if queue.try_send(envelope).is_err() {
                debug!("peer queue full; message dropped");
            }
        }
    }
}

/// What a per-peer task needs to reach its peer.
#[derive(Clone)]
struct Link {
    peer: NodeId,
    address: String,
    config: TransportConfig,
    cluster: String,
}

/// An endpoint to node `peer` of the group `cluster` names ([`cluster_id`]): with TLS, the peer's
/// certificate must be that node's (another node of the group, a replica of another group, or any
/// other identity cannot pass for it).
fn endpoint(
    peer: NodeId,
    address: &str,
    config: &TransportConfig,
    cluster: &str,
) -> Result<Endpoint, tonic::transport::Error> {
    let group = cluster.rsplit_once('/').map_or(cluster, |(_, group)| group);
    let endpoint = match group.parse::<crate::security::Role>() {
        Ok(role) => config.security.endpoint_for_replica(address, &role, peer)?,
        Err(_) => config.security.endpoint(address)?,
    };
    Ok(endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3)))
}

async fn connect(
    peer: NodeId,
    address: &str,
    config: &TransportConfig,
    cluster: &str,
) -> Option<RaftTransportClient<tonic::transport::Channel>> {
    match endpoint(peer, address, config, cluster) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => Some(RaftTransportClient::new(channel)),
            Err(e) => {
                debug!(peer, address, error = %e, "cannot connect to peer");
                None
            }
        },
        Err(e) => {
            warn!(peer, address, error = %e, "invalid peer address");
            None
        }
    }
}

/// Log a peer's refusal loudly the first time (a misconfiguration the operator must see), quietly
/// while it repeats.
fn report_refusal(peer: NodeId, status: &Status, reported: &mut bool) {
    let refused = matches!(
        status.code(),
        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated
    );
    if refused && !*reported {
        warn!(peer, error = %status.message(), "peer refuses our messages");
        *reported = true;
    } else {
        debug!(peer, error = %status, "message stream to peer ended");
    }
}

async fn stream_messages(link: Link, mut queue: mpsc::Receiver<Envelope>) {
    let Link {
        peer,
        address,
        config,
        cluster,
    } = link;
    let mut backoff = Duration::from_millis(50);
    let mut reported = false;
    loop {
        let Some(mut client) = connect(peer, &address, &config, &cluster).await else {
            // Whatever waited for this peer is stale by now.
            while queue.try_recv().is_ok() {}
            if queue.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(config.max_backoff);
            continue;
        };
        backoff = Duration::from_millis(50);
        let (stream_tx, stream_rx) = mpsc::channel::<pb::Envelope>(256);
        let mut call = Box::pin(async move { client.send(ReceiverStream::new(stream_rx)).await });
        loop {
            tokio::select! {
                result = &mut call => {
                    if let Err(status) = result {
                        report_refusal(peer, &status, &mut reported);
                    }
                    break;
                }
                next = queue.recv() => {
                    let Some(envelope) = next else { return };
                    let mut message = envelope_to_proto(&envelope);
                    message.cluster.clone_from(&cluster);
                    if stream_tx.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        // A refused stream is retried at the slowest pace: the operator must fix the configuration.
        tokio::time::sleep(if reported {
            config.max_backoff
        } else {
            backoff
        })
        .await;
    }
}

async fn stream_snapshots(link: Link, mut queue: mpsc::Receiver<Envelope>) {
    let Link {
        peer,
        address,
        config,
        cluster,
    } = link;
    let mut reported = false;
    // The snapshot (term, index) this stream just delivered while a copy of it was already queued.
    let mut delivered: Option<(Term, Index)> = None;
    while let Some(envelope) = queue.recv().await {
        let Message::InstallSnapshot {
            term,
            meta,
            data,
            membership,
        } = envelope.message
        else {
            continue;
        };
        if delivered.take() == Some((term, meta.index)) {
            // The core resends an unanswered snapshot after an election timeout; a large one is still
            // on its way by then, so the copy waits here and would follow the original in full. It was
            // queued while the original was being delivered: drop it. (A later resend, if the answer
            // was lost, is sent: `delivered` holds only the transfer that just finished.)
            debug!(
                peer,
                index = meta.index,
                "dropping a resend of the snapshot just delivered"
            );
            continue;
        }
        let Some(mut client) = connect(peer, &address, &config, &cluster).await else {
            continue; // the leader resends after an election timeout
        };
        let chunk = config.snapshot_chunk_bytes.max(1);
        let total = data.len();
        // Resume where a broken stream of this snapshot left off, if the peer kept it (an older peer
        // without the call, or any error: from the start).
        let wanted = pb::SnapshotRef {
            from: envelope.from,
            to: envelope.to,
            term,
            last_included_index: meta.index,
            last_included_term: meta.term,
            total_bytes: total as u64,
            cluster: cluster.clone(),
        };
        let resume = match tokio::time::timeout(
            config.snapshot_timeout,
            client.snapshot_resume_offset(wanted),
        )
        .await
        {
            Ok(Ok(reply)) => usize::try_from(reply.into_inner().offset)
                .unwrap_or(0)
                .min(total),
            _ => 0,
        };
        if resume > 0 {
            info!(
                peer,
                index = meta.index,
                offset = resume,
                bytes = total,
                "resuming a snapshot transfer"
            );
        }
        let mut offsets: Vec<usize> = (resume..total).step_by(chunk).collect();
        if offsets.is_empty() {
            offsets.push(resume);
        }
        let last = offsets.len() - 1;
        let (from, to) = (envelope.from, envelope.to);
        let cluster = cluster.clone();
        let membership = membership.as_ref().map(crate::raft::Membership::to_proto);
        let chunks = offsets.into_iter().enumerate().map(move |(n, offset)| {
            let end = (offset + chunk).min(total);
            pb::SnapshotChunk {
                from,
                to,
                term,
                last_included_index: meta.index,
                last_included_term: meta.term,
                offset: offset as u64,
                data: data.slice(offset..end),
                done: n == last,
                total_bytes: total as u64,
                cluster: if n == 0 {
                    cluster.clone()
                } else {
                    String::new()
                },
                membership: if n == 0 { membership.clone() } else { None },
            }
        });
        // Progress is the time the stream last handed tonic a chunk (it takes the next one only once
        // the previous is on its way).
        let started = tokio::time::Instant::now();
        let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = moved.clone();
        let all_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = all_sent.clone();
        let chunks = tokio_stream::StreamExt::map(tokio_stream::iter(chunks), move |chunk| {
            let at = started.elapsed().as_millis() as u64;
            progress.store(at, std::sync::atomic::Ordering::Relaxed);
            if chunk.done {
                sent.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            chunk
        });
        // Once the last chunk is out, the receiver checks that its service can load the snapshot
        // before it answers, which takes time in proportion to the snapshot's size.
        let answer_patience = config.snapshot_timeout * 4
            + Duration::from_secs_f64(total as f64 / SNAPSHOT_CHECK_BYTES_PER_SEC);
        let sending = client.install_snapshot(chunks);
        let stalled = async {
            loop {
                tokio::time::sleep(config.snapshot_timeout / 4).await;
                let last = moved.load(std::sync::atomic::Ordering::Relaxed);
                let idle = started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last));
                let patience = match all_sent.load(std::sync::atomic::Ordering::Relaxed) {
                    true => answer_patience,
                    false => config.snapshot_timeout,
                };
                if idle > patience {
                    return idle;
                }
            }
        };
        tokio::select! {
            result = sending => match result {
                Ok(_) => {
                    debug!(peer, index = meta.index, bytes = total, "snapshot sent");
                    // Only a copy already queued counts as a duplicate of this delivery.
                    if !queue.is_empty() {
                        delivered = Some((term, meta.index));
                    }
                }
                Err(status) => {
                    report_refusal(peer, &status, &mut reported);
                    warn!(peer, error = %status, "snapshot transfer failed");
                }
            },
            idle = stalled => warn!(peer, idle = ?idle, "snapshot transfer stalled; abandoned"),
        }
    }
}

/// Who a node accepts messages from, and how much it holds for them.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// This node.
    pub me: NodeId,
    /// Our cluster id (see [`cluster_id`]); a message carrying another is refused.
    pub cluster: String,
    /// Our Raft group (`kv`, `ctrler`, `shard-3`): with TLS, the sender's certificate must name it.
    pub group: String,
    /// Authenticates callers (open without TLS).
    pub guard: Guard,
    /// Snapshots larger than this are refused up front.
    pub max_snapshot_bytes: u64,
    /// Bytes of decoded messages waiting for the node; senders wait (HTTP/2 flow control pushes back
    /// to them) while the queue is full.
    pub max_queued_bytes: usize,
    /// A snapshot stream that sends nothing for this long is dropped.
    pub snapshot_idle_timeout: Duration,
    /// Loads a received snapshot as the service would, before the node sees it: one it cannot load
    /// is refused here, because once installed it would replace the node's state and log on disk and
    /// fail every start after (a leader of a newer version, or a bug, must not brick a follower).
    pub snapshot_check: Option<SnapshotCheck>,
}

/// Whether the service can load a snapshot's bytes (see [`InboundConfig::snapshot_check`]); the
/// error says why not.
#[derive(Clone)]
pub struct SnapshotCheck(Arc<LoadsSnapshot>);

/// The function behind a [`SnapshotCheck`]: it is handed the received bytes themselves (not a copy;
/// a snapshot may be gigabytes).
type LoadsSnapshot = dyn Fn(bytes::Bytes) -> Result<(), String> + Send + Sync;

impl SnapshotCheck {
    /// A check that runs `loads` on the bytes of every snapshot received.
    pub fn new(loads: impl Fn(bytes::Bytes) -> Result<(), String> + Send + Sync + 'static) -> Self {
        SnapshotCheck(Arc::new(loads))
    }

    /// Whether `snapshot` loads.
    pub fn check(&self, snapshot: bytes::Bytes) -> Result<(), String> {
        (self.0)(snapshot)
    }
}

impl std::fmt::Debug for SnapshotCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCheck")
    }
}

impl InboundConfig {
    /// Defaults for node `me`: cluster `ds824/raft`, no TLS, 4 GiB snapshots, 256 MiB queued, 10 s
    /// idle snapshot streams.
    pub fn new(me: NodeId) -> Self {
        InboundConfig {
            me,
            cluster: cluster_id("ds824", "raft"),
            group: "raft".into(),
            guard: Guard::open(),
            max_snapshot_bytes: 4 << 30,
            max_queued_bytes: 256 << 20,
            snapshot_idle_timeout: Duration::from_secs(10),
            snapshot_check: None,
        }
    }
}

/// A message waiting for the node, holding its share of the byte budget until taken.
struct Queued {
    envelope: Envelope,
    _budget: OwnedSemaphorePermit,
}

/// The node's end of the inbound queue.
pub struct InboundQueue {
    queue: mpsc::Receiver<Queued>,
}

impl InboundQueue {
    /// The next message (`None` once every sender is gone).
    pub async fn recv(&mut self) -> Option<Envelope> {
        self.queue.recv().await.map(|queued| queued.envelope)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Envelope> {
        self.queue.try_recv().ok().map(|queued| queued.envelope)
    }
}

/// The inbound side: a tonic service that feeds a node's inbound queue.
#[derive(Clone)]
pub struct RaftService {
    config: Arc<InboundConfig>,
    inbound: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    /// Peers with a snapshot stream open.
    snapshot_streams: Arc<Mutex<HashSet<NodeId>>>,
    /// What each peer's last broken snapshot stream delivered, kept for a while so the next stream
    /// resumes there (at most one per peer, and only from members of the group).
    partials: Arc<Mutex<HashMap<NodeId, Partial>>>,
    /// Snapshot bytes held in streams and partials, all told.
    snapshot_memory: Arc<SnapshotMemory>,
    /// Foreign cluster ids already logged (once each, at most [`MAX_FOREIGN_LOGGED`]).
    foreign: Arc<Mutex<HashSet<String>>>,
}

/// Foreign (cluster id, sender) pairs logged once each; later ones are refused without a line. A
/// misconfigured cluster shows in the first few; a caller inventing ids cannot grow the set.
const MAX_FOREIGN_LOGGED: usize = 64;

/// The part of a foreign cluster id that is logged and echoed.
const MAX_FOREIGN_ID_BYTES: usize = 256;

/// Which snapshot a stream carries: sender's term, last included index and term, and total size.
type SnapshotKey = (Term, Index, Term, u64);

/// The received prefix of a snapshot whose stream broke.
struct Partial {
    key: SnapshotKey,
    data: Received,
    /// Tells this prefix from a later one of the same peer when its expiry comes.
    generation: u64,
}

/// The slowest rate, in bytes per second, at which a receiver is expected to check that its service
/// loads a snapshot ([`InboundConfig::snapshot_check`]) before it answers the transfer.
const SNAPSHOT_CHECK_BYTES_PER_SEC: f64 = 8.0 * 1024.0 * 1024.0;

/// Bytes of snapshot data held for peers, in streams being received and in kept prefixes of broken
/// ones, all told. One limit for all of them (`max_snapshot_bytes`): each stream alone may come near
/// it, and without a total, a leader change mid-transfer (the old leader's prefix kept while the new
/// one sends its whole snapshot) or streams claiming ever new sender ids (without TLS) would hold
/// several times the memory.
struct SnapshotMemory {
    held: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl SnapshotMemory {
    /// Counts `bytes` more, unless that would pass the limit.
    fn take(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.held
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.held
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Snapshot bytes received from a peer, counted in [`SnapshotMemory`] until dropped or delivered.
struct Received {
    data: BytesMut,
    memory: Arc<SnapshotMemory>,
}

impl Received {
    fn new(memory: &Arc<SnapshotMemory>) -> Self {
        Received {
            data: BytesMut::new(),
            memory: Arc::clone(memory),
        }
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Appends `bytes` if the node may hold them.
    fn extend(&mut self, bytes: &[u8]) -> bool {
        if !self.memory.take(bytes.len() as u64) {
            return false;
        }
        self.data.extend_from_slice(bytes);
        true
    }

    /// The bytes, no longer counted: they go to the node, whose inbound queue bounds them.
    fn into_bytes(mut self) -> bytes::Bytes {
        self.memory.give_back(self.data.len() as u64);
        std::mem::take(&mut self.data).freeze()
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        self.memory.give_back(self.data.len() as u64);
    }
}

/// How long the prefix of a broken snapshot stream is kept for the sender to resume: a few of the
/// sender's retries (the leader resends after an election timeout).
const RESUME_WINDOW: Duration = Duration::from_secs(60);

/// Why a snapshot stream ended early: the link broke (what arrived is kept for a resume) or the
/// sender broke the protocol (nothing is kept).
enum Receive {
    Broken(Status),
    Invalid(Status),
}

fn key_of(chunk: &pb::SnapshotChunk) -> SnapshotKey {
    (
        chunk.term,
        chunk.last_included_index,
        chunk.last_included_term,
        chunk.total_bytes,
    )
}

/// Releases a peer's snapshot slot when its stream ends, however it ends.
struct SnapshotSlot {
    streams: Arc<Mutex<HashSet<NodeId>>>,
    peer: NodeId,
}

impl Drop for SnapshotSlot {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(&self.peer);
        }
    }
}

impl RaftService {
    /// A service admitting what `config` allows, and the queue the node reads it from.
    pub fn new(config: InboundConfig) -> (Self, InboundQueue) {
        let (inbound, queue) = mpsc::channel(4096);
        let budget = Arc::new(Semaphore::new(config.max_queued_bytes.max(1)));
        let service = RaftService {
            config: Arc::new(config.clone()),
            inbound,
            budget,
            snapshot_streams: Arc::default(),
            partials: Arc::default(),
            snapshot_memory: Arc::new(SnapshotMemory {
                held: Default::default(),
                limit: config.max_snapshot_bytes,
            }),
            foreign: Arc::default(),
        };
        (service, InboundQueue { queue })
    }

    /// Refuse a message unless it comes from our cluster, from one of our peers, to us, and (with TLS)
    /// from the node the caller's certificate names.
    fn admit(
        &self,
        caller: Option<&Principal>,
        from: NodeId,
        to: NodeId,
        cluster: &str,
    ) -> Result<(), Status> {
        let config = &self.config;
        // Authenticate first: a caller the certificate does not name learns nothing about
        // the group's membership from the answer.
        if let Some(principal) = caller {
            let group = principal.role.raft_group();
            if group.as_deref() != Some(config.group.as_str()) || principal.node_id() != Some(from)
            {
                return Err(Status::permission_denied(format!(
                    "{principal} may not send Raft messages as node {from} of {}",
                    config.group
                )));
            }
        }
        if cluster != config.cluster {
            // What a caller sends is echoed and remembered only in part: the id is any string it likes.
            let theirs = crate::limits::truncated(cluster, MAX_FOREIGN_ID_BYTES);
            if let Ok(mut foreign) = self.foreign.lock() {
                if foreign.len() < MAX_FOREIGN_LOGGED && foreign.insert(format!("{theirs}#{from}"))
                {
                    warn!(
                        node = config.me,
                        ours = %config.cluster,
                        theirs,
                        from,
                        "refusing messages from another cluster: check --peers and --cluster"
                    );
                }
            }
            return Err(Status::failed_precondition(format!(
                "cluster id mismatch: node {} is in cluster {:?}, node {from} sent cluster {theirs:?}",
                config.me, config.cluster
            )));
        }
        if to != config.me {
            return Err(Status::invalid_argument(format!(
                "message for node {to} sent to node {}",
                config.me
            )));
        }
        // Not checked against a member list: the configuration changes through the log, and a node
        // must hear a leader (or candidate) it does not know yet to learn of it. A sender is one of
        // the group by its cluster id and, with TLS, its certificate.
        if from == 0 || from == config.me {
            return Err(Status::invalid_argument(format!(
                "message claims to come from node {from}"
            )));
        }
        Ok(())
    }

    async fn deliver(&self, envelope: Envelope, bytes: usize) -> Result<(), Status> {
        let cost = bytes.clamp(1, self.config.max_queued_bytes.max(1));
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX))
            .await
            .map_err(|_| Status::unavailable("raft node is stopped"))?;
        self.inbound
            .send(Queued {
                envelope,
                _budget: permit,
            })
            .await
            .map_err(|_| Status::unavailable("raft node is stopped"))
    }

    /// Keep what a broken stream delivered so the sender can resume after it, for [`RESUME_WINDOW`].
    fn keep_partial(&self, peer: NodeId, key: SnapshotKey, data: Received) {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(mut partials) = self.partials.lock() else {
            return;
        };
        debug!(
            peer,
            index = key.1,
            bytes = data.len(),
            "keeping a broken snapshot stream's data to resume"
        );
        partials.insert(
            peer,
            Partial {
                key,
                data,
                generation,
            },
        );
        let partials = Arc::clone(&self.partials);
        tokio::spawn(async move {
            tokio::time::sleep(RESUME_WINDOW).await;
            if let Ok(mut partials) = partials.lock() {
                if partials
                    .get(&peer)
                    .is_some_and(|p| p.generation == generation)
                {
                    partials.remove(&peer);
                }
            }
        });
    }

    /// The chunks after `first` until the last, appended to `data` (which holds what came before
    /// `first`, from this stream or a broken earlier one).
    async fn receive(
        &self,
        stream: &mut Streaming<pb::SnapshotChunk>,
        first: &pb::SnapshotChunk,
        data: &mut Received,
    ) -> Result<(), Receive> {
        let mut chunk = first.clone();
        loop {
            let same_snapshot =
                chunk.from == first.from && chunk.to == first.to && key_of(&chunk) == key_of(first);
            if !same_snapshot || chunk.offset != data.len() as u64 {
                return Err(Receive::Invalid(Status::invalid_argument(format!(
                    "snapshot chunk out of order: expected offset {}, got {}",
                    data.len(),
                    chunk.offset
                ))));
            }
            if data.len() as u64 + chunk.data.len() as u64 > first.total_bytes {
                return Err(Receive::Invalid(Status::invalid_argument(format!(
                    "snapshot longer than its announced {} bytes",
                    first.total_bytes
                ))));
            }
            if !data.extend(&chunk.data) {
                // Kept prefixes only save a resend: they go before a live stream is refused.
                if let Ok(mut partials) = self.partials.lock() {
                    partials.clear();
                }
                if !data.extend(&chunk.data) {
                    return Err(Receive::Invalid(Status::resource_exhausted(format!(
                        "node {} already holds {} bytes of snapshots from other peers' transfers \
                         (the limit is {} in all); retry later",
                        self.config.me,
                        self.snapshot_memory
                            .held
                            .load(std::sync::atomic::Ordering::Relaxed),
                        self.snapshot_memory.limit
                    ))));
                }
            }
            if chunk.done {
                if data.len() as u64 != first.total_bytes {
                    return Err(Receive::Invalid(Status::invalid_argument(format!(
                        "snapshot ended at {} of its announced {} bytes",
                        data.len(),
                        first.total_bytes
                    ))));
                }
                return Ok(());
            }
            chunk = match self.next_chunk(stream).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Err(Receive::Broken(Status::invalid_argument(
                        "snapshot stream ended before its last chunk",
                    )))
                }
                Err(status) => return Err(Receive::Broken(status)),
            };
        }
    }

    async fn next_chunk(
        &self,
        stream: &mut Streaming<pb::SnapshotChunk>,
    ) -> Result<Option<pb::SnapshotChunk>, Status> {
        match tokio::time::timeout(self.config.snapshot_idle_timeout, stream.message()).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "snapshot stream idle for {:?}",
                self.config.snapshot_idle_timeout
            ))),
        }
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<pb::Envelope>>,
    ) -> Result<Response<pb::SendAck>, Status> {
        let caller = self.config.guard.caller(&request)?;
        let mut stream = request.into_inner();
        while let Some(message) = stream.message().await? {
            self.admit(caller.as_ref(), message.from, message.to, &message.cluster)?;
            let bytes = message.encoded_len();
            let envelope = envelope_from_proto(message)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            // Snapshots come through InstallSnapshot only, where their size is bounded and the
            // service checks it can load them before the core sees them; none is sent this way.
            if matches!(envelope.message, Message::InstallSnapshot { .. }) {
                return Err(Status::invalid_argument(
                    "snapshots are sent with InstallSnapshot, not on the message stream",
                ));
            }
            self.deliver(envelope, bytes).await?;
        }
        Ok(Response::new(pb::SendAck {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SendAck>, Status> {
        let caller = self.config.guard.caller(&request)?;
        let mut stream = request.into_inner();
        let mut first = self
            .next_chunk(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.admit(caller.as_ref(), first.from, first.to, &first.cluster)?;
        if first.total_bytes > self.config.max_snapshot_bytes {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {} bytes exceeds the {} byte limit",
                first.total_bytes, self.config.max_snapshot_bytes
            )));
        }
        let _slot = {
            let mut streams = self
                .snapshot_streams
                .lock()
                .map_err(|_| Status::internal("snapshot stream registry poisoned"))?;
            if !streams.insert(first.from) {
                return Err(Status::resource_exhausted(format!(
                    "a snapshot stream from node {} is already open",
                    first.from
                )));
            }
            SnapshotSlot {
                streams: Arc::clone(&self.snapshot_streams),
                peer: first.from,
            }
        };
        // A stream starts at 0 (whatever was kept goes), or exactly where a broken stream of the same
        // snapshot left off.
        let kept = {
            let mut partials = self
                .partials
                .lock()
                .map_err(|_| Status::internal("snapshot resume registry poisoned"))?;
            let resumes = |p: &Partial| {
                first.offset > 0 && p.key == key_of(&first) && p.data.len() as u64 == first.offset
            };
            match partials.get(&first.from) {
                Some(partial) if first.offset == 0 || resumes(partial) => {
                    partials.remove(&first.from)
                }
                _ => None,
            }
        };
        // Grows as chunks arrive: the announced size is only a claim.
        let mut data = match kept {
            _ if first.offset == 0 => Received::new(&self.snapshot_memory),
            Some(partial) => partial.data,
            None => {
                return Err(Status::invalid_argument(format!(
                "cannot resume the snapshot at offset {}: that much of it is not kept (start at 0)",
                first.offset
            )))
            }
        };
        first.cluster.clear();
        let membership = super::wire::membership_from_proto(first.membership.take())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.receive(&mut stream, &first, &mut data).await {
            Ok(()) => {}
            Err(Receive::Broken(status)) => {
                if !data.is_empty() {
                    self.keep_partial(first.from, key_of(&first), data);
                }
                return Err(status);
            }
            Err(Receive::Invalid(status)) => return Err(status),
        }
        let bytes = data.len();
        let data = data.into_bytes();
        if let Some(check) = self.config.snapshot_check.clone() {
            let loaded = data.clone();
            let verdict = tokio::task::spawn_blocking(move || check.check(loaded))
                .await
                .map_err(|e| Status::internal(format!("checking the snapshot: {e}")))?;
            if let Err(why) = verdict {
                error!(
                    peer = first.from,
                    index = first.last_included_index,
                    %why,
                    "refused a snapshot this node could not load; it keeps its own state"
                );
                return Err(Status::invalid_argument(format!(
                    "node {} cannot load the snapshot at index {}: {why}",
                    self.config.me, first.last_included_index
                )));
            }
        }
        self.deliver(
            Envelope {
                from: first.from,
                to: first.to,
                message: Message::InstallSnapshot {
                    term: first.term,
                    meta: SnapshotMeta {
                        index: first.last_included_index,
                        term: first.last_included_term,
                    },
                    data,
                    membership,
                },
            },
            bytes,
        )
        .await?;
        Ok(Response::new(pb::SendAck {}))
    }

    async fn snapshot_resume_offset(
        &self,
        request: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::SnapshotOffset>, Status> {
        let caller = self.config.guard.caller(&request)?;
        let wanted = request.into_inner();
        self.admit(caller.as_ref(), wanted.from, wanted.to, &wanted.cluster)?;
        let key = (
            wanted.term,
            wanted.last_included_index,
            wanted.last_included_term,
            wanted.total_bytes,
        );
        let offset = self
            .partials
            .lock()
            .map_err(|_| Status::internal("snapshot resume registry poisoned"))?
            .get(&wanted.from)
            .filter(|partial| partial.key == key)
            .map_or(0, |partial| partial.data.len() as u64);
        Ok(Response::new(pb::SnapshotOffset { offset }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn messages_of_ever_new_foreign_clusters_are_refused_without_remembering_each() {
        let (service, _queue) = RaftService::new(InboundConfig::new(1));
        for i in 0..10 * MAX_FOREIGN_LOGGED {
            let cluster = format!("{i}{}", "x".repeat(100_000));
            let refused = service
                .admit(None, 2, 1, &cluster)
                .expect_err("another cluster's message");
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        }
        let foreign = service.foreign.lock().expect("lock");
        assert_eq!(foreign.len(), MAX_FOREIGN_LOGGED);
        assert!(foreign
            .iter()
            .all(|key| key.len() <= MAX_FOREIGN_ID_BYTES + 24));
    }

    /// A peer that takes its time over each snapshot and counts the transfers it completes.
    #[derive(Clone, Default)]
    struct SlowPeer {
        snapshots: Arc<AtomicUsize>,
        /// How long it takes to answer once every chunk has arrived (a check of the snapshot).
        answer_delay: Duration,
    }

    #[tonic::async_trait]
    impl RaftTransport for SlowPeer {
        async fn send(
            &self,
            _request: tonic::Request<tonic::Streaming<pb::Envelope>>,
        ) -> Result<tonic::Response<pb::SendAck>, Status> {
            Ok(tonic::Response::new(pb::SendAck::default()))
        }

        async fn install_snapshot(
            &self,
            request: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
        ) -> Result<tonic::Response<pb::SendAck>, Status> {
            let mut chunks = request.into_inner();
            while chunks.message().await?.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(self.answer_delay).await;
            self.snapshots.fetch_add(1, Ordering::SeqCst);
            Ok(tonic::Response::new(pb::SendAck::default()))
        }

        async fn snapshot_resume_offset(
            &self,
            _request: tonic::Request<pb::SnapshotRef>,
        ) -> Result<tonic::Response<pb::SnapshotOffset>, Status> {
            Ok(tonic::Response::new(pb::SnapshotOffset { offset: 0 }))
        }
    }

    /// A peer whose first snapshot stream breaks after two chunks; it keeps what arrived, as the real
    /// receiver does, and records where each stream starts.
    #[derive(Clone, Default)]
    struct BreakingPeer {
        received: Arc<Mutex<Vec<u8>>>,
        starts: Arc<Mutex<Vec<u64>>>,
        completed: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl RaftTransport for BreakingPeer {
        async fn send(
            &self,
            _request: tonic::Request<tonic::Streaming<pb::Envelope>>,
        ) -> Result<tonic::Response<pb::SendAck>, Status> {
            Ok(tonic::Response::new(pb::SendAck::default()))
        }

        async fn install_snapshot(
            &self,
            request: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
        ) -> Result<tonic::Response<pb::SendAck>, Status> {
            let mut chunks = request.into_inner();
            let first_stream = {
                let mut starts = self.starts.lock().expect("lock");
                starts.push(u64::MAX);
                starts.len() == 1
            };
            let mut taken = 0;
            while let Some(chunk) = chunks.message().await? {
                {
                    let mut starts = self.starts.lock().expect("lock");
                    if let Some(start) = starts.last_mut().filter(|s| **s == u64::MAX) {
                        *start = chunk.offset;
                    }
                    let mut received = self.received.lock().expect("lock");
                    assert_eq!(chunk.offset, received.len() as u64, "a gap or an overlap");
                    received.extend_from_slice(&chunk.data);
                }
                taken += 1;
                if first_stream && taken == 2 {
                    return Err(Status::unavailable("the link broke"));
                }
                if chunk.done {
                    self.completed.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(tonic::Response::new(pb::SendAck::default()))
        }

        async fn snapshot_resume_offset(
            &self,
            _request: tonic::Request<pb::SnapshotRef>,
        ) -> Result<tonic::Response<pb::SnapshotOffset>, Status> {
            let offset = self.received.lock().expect("lock").len() as u64;
            Ok(tonic::Response::new(pb::SnapshotOffset { offset }))
        }
    }

    #[tokio::test]
    async fn a_broken_snapshot_transfer_resumes_where_the_peer_says_it_stopped() {
        let peer = BreakingPeer::default();
        let transport = transport_to(peer.clone()).await;
        transport.send(vec![snapshot(1, 10)]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while peer.starts.lock().expect("lock").is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "nothing sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The core resends after an election timeout.
        tokio::time::sleep(Duration::from_millis(100)).await;
        transport.send(vec![snapshot(1, 10)]);
        while peer.completed.load(Ordering::SeqCst) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "never completed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*peer.starts.lock().expect("lock"), vec![0, 2 << 10]);
        assert_eq!(peer.received.lock().expect("lock").len(), 3 << 10);
    }

    /// A receiver checks that its service loads a snapshot before it answers: the sender waits for
    /// that answer beyond the stall timeout between chunks, or a follower whose check takes longer
    /// would never be caught up (each transfer abandoned, and the check cancelled with it).
    #[tokio::test]
    async fn a_receiver_checking_the_snapshot_is_waited_for() {
        let peer = SlowPeer {
            answer_delay: Duration::from_millis(700),
            ..SlowPeer::default()
        };
        let config = TransportConfig {
            snapshot_timeout: Duration::from_millis(400),
            ..TransportConfig::default()
        };
        let transport = transport_with(peer.clone(), config).await;
        transport.send(vec![snapshot(1, 10)]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while peer.snapshots.load(Ordering::SeqCst) < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the transfer was abandoned while the receiver checked it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A transport of node 1 whose peer 2 is `peer`, sending snapshots in 1 KiB chunks.
    async fn transport_to<P: RaftTransport>(peer: P) -> Transport {
        transport_with(peer, TransportConfig::default()).await
    }

    /// [`transport_to`] with `config` (its chunk size set to 1 KiB).
    async fn transport_with<P: RaftTransport>(peer: P, config: TransportConfig) -> Transport {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let routes = tonic::service::Routes::new(RaftTransportServer::new(peer));
        tokio::spawn(async move {
            crate::security::Security::Insecure
                .serve(
                    routes,
                    listener,
                    crate::security::Admit::Cluster,
                    std::future::pending(),
                )
                .await
        });
        let config = TransportConfig {
            snapshot_chunk_bytes: 1 << 10,
            ..config
        };
        Transport::start(&[(2, address.to_string())].into(), &config, "test")
    }

    fn snapshot(term: Term, index: Index) -> Envelope {
        Envelope {
            from: 1,
            to: 2,
            message: Message::InstallSnapshot {
                term,
                meta: SnapshotMeta { index, term },
                data: bytes::Bytes::from(vec![7u8; 3 << 10]),
                membership: None,
            },
        }
    }

    #[tokio::test]
    async fn a_resend_queued_during_a_slow_transfer_is_not_sent_again_in_full() {
        let peer = SlowPeer::default();
        let transport = transport_to(peer.clone()).await;
        let delivered = |n: usize| {
            let count = peer.snapshots.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while count.load(Ordering::SeqCst) < n {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{n} snapshots not delivered"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        // The core resends while the first copy (three slow chunks) is still on its way.
        transport.send(vec![snapshot(1, 10)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        transport.send(vec![snapshot(1, 10)]);
        delivered(1).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            peer.snapshots.load(Ordering::SeqCst),
            1,
            "the queued copy went too"
        );
        // A resend after the delivery (its answer may have been lost) is sent.
        transport.send(vec![snapshot(1, 10)]);
        delivered(2).await;
        // So is another snapshot.
        transport.send(vec![snapshot(1, 20)]);
        delivered(3).await;
    }
}
