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
//! queue; malformed input is answered with `INVALID_ARGUMENT`, never passed on.

use super::message::{Envelope, Message};
use super::types::{NodeId, SnapshotMeta};
use super::wire::{envelope_from_proto, envelope_to_proto};
use crate::proto::raft as pb;
use crate::proto::raft::raft_transport_client::RaftTransportClient;
use crate::proto::raft::raft_transport_server::RaftTransport;
use bytes::BytesMut;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

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
    /// Deadline for sending a whole snapshot.
    pub snapshot_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            connect_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            queue_depth: 4096,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_timeout: Duration::from_secs(120),
        }
    }
}

struct PeerQueues {
    messages: mpsc::Sender<Envelope>,
    snapshots: mpsc::Sender<Envelope>,
}

/// The outbound side: routes each message to its peer's queue.
pub struct Transport {
    peers: HashMap<NodeId, PeerQueues>,
}

impl Transport {
    /// Start the per-peer tasks for `peers` (id → `http://host:port`). Must run inside a tokio runtime.
    /// The tasks stop when the `Transport` is dropped.
    pub fn start(peers: &HashMap<NodeId, String>, config: &TransportConfig) -> Self {
        let peers = peers
            .iter()
            .map(|(&id, address)| {
                let (messages, message_rx) = mpsc::channel(config.queue_depth);
                // One snapshot at a time: the core resends if one is dropped.
                let (snapshots, snapshot_rx) = mpsc::channel(1);
                tokio::spawn(stream_messages(
                    id,
                    address.clone(),
                    config.clone(),
                    message_rx,
                ));
                tokio::spawn(stream_snapshots(
                    id,
                    address.clone(),
                    config.clone(),
                    snapshot_rx,
                ));
                (
                    id,
                    PeerQueues {
                        messages,
                        snapshots,
                    },
                )
            })
            .collect();
        Transport { peers }
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

fn endpoint(address: &str, config: &TransportConfig) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(address.to_string())?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3)))
}

async fn connect(
    peer: NodeId,
    address: &str,
    config: &TransportConfig,
) -> Option<RaftTransportClient<tonic::transport::Channel>> {
    match endpoint(address, config) {
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

async fn stream_messages(
    peer: NodeId,
    address: String,
    config: TransportConfig,
    mut queue: mpsc::Receiver<Envelope>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(mut client) = connect(peer, &address, &config).await else {
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
                        debug!(peer, error = %status, "message stream to peer ended");
                    }
                    break;
                }
                next = queue.recv() => {
                    let Some(envelope) = next else { return };
                    if stream_tx.send(envelope_to_proto(&envelope)).await.is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn stream_snapshots(
    peer: NodeId,
    address: String,
    config: TransportConfig,
    mut queue: mpsc::Receiver<Envelope>,
) {
    while let Some(envelope) = queue.recv().await {
        let Message::InstallSnapshot { term, meta, data } = envelope.message else {
            continue;
        };
        let Some(mut client) = connect(peer, &address, &config).await else {
            continue; // the leader resends after an election timeout
        };
        let chunk = config.snapshot_chunk_bytes.max(1);
        let total = data.len();
        let mut offsets: Vec<usize> = (0..total).step_by(chunk).collect();
        if offsets.is_empty() {
            offsets.push(0);
        }
        let last = offsets.len() - 1;
        let (from, to) = (envelope.from, envelope.to);
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
            }
        });
        let sending = client.install_snapshot(tokio_stream::iter(chunks));
        match tokio::time::timeout(config.snapshot_timeout, sending).await {
            Ok(Ok(_)) => debug!(peer, index = meta.index, bytes = total, "snapshot sent"),
            Ok(Err(status)) => warn!(peer, error = %status, "snapshot transfer failed"),
            Err(_) => warn!(peer, "snapshot transfer timed out"),
        }
    }
}

/// The inbound side: a tonic service that feeds a node's inbound queue.
#[derive(Clone)]
pub struct RaftService {
    me: NodeId,
    inbound: mpsc::Sender<Envelope>,
    max_snapshot_bytes: u64,
}

impl RaftService {
    /// A service for node `me` delivering into `inbound`. Snapshots larger than `max_snapshot_bytes`
    /// are refused, so a peer cannot make this node allocate without bound.
    pub fn new(me: NodeId, inbound: mpsc::Sender<Envelope>, max_snapshot_bytes: u64) -> Self {
        RaftService {
            me,
            inbound,
            max_snapshot_bytes,
        }
    }

    async fn deliver(&self, envelope: Envelope) -> Result<(), Status> {
        if envelope.to != self.me {
            return Err(Status::invalid_argument(format!(
                "message for node {} sent to node {}",
                envelope.to, self.me
            )));
        }
        self.inbound
            .send(envelope)
            .await
            .map_err(|_| Status::unavailable("raft node is stopped"))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<pb::Envelope>>,
    ) -> Result<Response<pb::SendAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(envelope) = stream.message().await? {
            let envelope = envelope_from_proto(envelope)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.deliver(envelope).await?;
        }
        Ok(Response::new(pb::SendAck {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SendAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        if first.offset != 0 || first.from == 0 {
            return Err(Status::invalid_argument(
                "snapshot stream must start at offset 0 from a non-zero node",
            ));
        }
        if first.total_bytes > self.max_snapshot_bytes {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {} bytes exceeds the {} byte limit",
                first.total_bytes, self.max_snapshot_bytes
            )));
        }
        let mut data = BytesMut::with_capacity(first.total_bytes as usize);
        let mut chunk = first.clone();
        loop {
            let same_snapshot = chunk.from == first.from
                && chunk.to == first.to
                && chunk.term == first.term
                && chunk.last_included_index == first.last_included_index
                && chunk.last_included_term == first.last_included_term;
            if !same_snapshot || chunk.offset != data.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk out of order: expected offset {}, got {}",
                    data.len(),
                    chunk.offset
                )));
            }
            if data.len() as u64 + chunk.data.len() as u64 > first.total_bytes {
                return Err(Status::invalid_argument(format!(
                    "snapshot longer than its announced {} bytes",
                    first.total_bytes
                )));
            }
            data.extend_from_slice(&chunk.data);
            if chunk.done {
                if data.len() as u64 != first.total_bytes {
                    return Err(Status::invalid_argument(format!(
                        "snapshot ended at {} of its announced {} bytes",
                        data.len(),
                        first.total_bytes
                    )));
                }
                break;
            }
            chunk = stream.message().await?.ok_or_else(|| {
                Status::invalid_argument("snapshot stream ended before its last chunk")
            })?;
        }
        self.deliver(Envelope {
            from: first.from,
            to: first.to,
            message: Message::InstallSnapshot {
                term: first.term,
                meta: SnapshotMeta {
                    index: first.last_included_index,
                    term: first.last_included_term,
                },
                data: data.freeze(),
            },
        })
        .await?;
        Ok(Response::new(pb::SendAck {}))
    }
}
