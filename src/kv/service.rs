//! The `Kv` gRPC service: client requests in, Raft proposals and ReadIndex reads out.
//!
//! Why it looks like this: all replication logic (exactly-once sessions, matching applied entries with
//! waiting proposals, queueing reads until the ReadIndex is applied, snapshots) lives in the sans-IO
//! [`Rsm`] so the simulator tests the same code. This module only adds I/O around it:
//!
//! - one **applier task** consumes the node's [`Applied`] stream, feeds it to the `Rsm` and takes a
//!   snapshot when the persisted Raft state passes the threshold;
//! - one **leadership watcher** tells the `Rsm` when this node stops leading, so waiting requests are sent
//!   elsewhere at once instead of timing out;
//! - each request registers a oneshot under a fresh [`Token`] and waits for its [`Completion`] or its
//!   deadline, whichever comes first.
//!
//! The `Rsm` sits behind a std `Mutex` that is never held across an `.await`: every critical section is
//! a few map operations (or one snapshot encoding), far shorter than a Raft round trip.

use super::state::{KvCommand, KvOutput, KvQuery, KvStore};
use super::validate::{validate_command, validate_key};
use crate::proto::kv as pb;
use crate::proto::kv::kv_server::Kv;
use crate::raft::{Applied, NodeError, NodeId, NotLeader, RaftHandle, Role};
use crate::rsm::{Completion, Prepared, Rsm, RsmError, Token};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{debug, info, info_span, warn, Instrument, Span};

/// How the service behaves; the daemon fills it from its flags.
#[derive(Clone, Debug)]
pub struct KvServiceConfig {
    /// A request not finished within this time is answered `TIMEOUT` (the client retries, possibly
    /// elsewhere). Short enough that a client notices a dead leader quickly, long enough for a commit.
    pub request_timeout: Duration,
    /// Snapshot once the persisted Raft state (log + hard state) exceeds this many bytes; 0 never does.
    pub snapshot_threshold: u64,
    /// Every node's client-facing address (`host:port`), so a follower can tell clients where the leader is.
    pub addresses: HashMap<NodeId, String>,
}

impl Default for KvServiceConfig {
    fn default() -> Self {
        KvServiceConfig {
            request_timeout: Duration::from_secs(1),
            snapshot_threshold: 8 << 20,
            addresses: HashMap::new(),
        }
    }
}

/// The service's background work failed in a way that makes the replica unusable.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// The log or a snapshot could not be applied (corrupt data or a driver bug): serving on would
    /// return wrong answers, so the node must stop.
    #[error("cannot apply the replicated log: {0}")]
    Apply(#[from] RsmError),
}

/// How a waiting request ended.
enum Reply {
    Done(KvOutput),
    Retry,
}

struct Inner {
    rsm: Rsm<KvStore>,
    waiters: HashMap<Token, oneshot::Sender<Reply>>,
    next_token: Token,
    restored_snapshot_index: u64,
    entries_applied: u64,
    started: bool,
}

impl Inner {
    fn register(&mut self) -> (Token, oneshot::Receiver<Reply>) {
        self.next_token += 1;
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(self.next_token, tx);
        (self.next_token, rx)
    }

    fn complete(&mut self, completions: Vec<Completion<KvOutput>>) {
        for completion in completions {
            let (token, reply) = match completion {
                Completion::Done { token, output } => (token, Reply::Done(output)),
                Completion::Retry { token } => (token, Reply::Retry),
            };
            if let Some(waiter) = self.waiters.remove(&token) {
                // The request may have given up (deadline, client gone): nothing to do then.
                let _ = waiter.send(reply);
            }
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters more
        // than stopping would; keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Forgets a waiting request when its handler returns or is dropped (deadline or client cancellation),
/// so the waiter table only holds requests someone still waits for.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    token: Token,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiters.remove(&self.token);
    }
}

/// The `Kv` service of one node. Cheap to clone; hand it to tonic with
/// [`crate::proto::kv::kv_server::KvServer::new`].
#[derive(Clone)]
pub struct KvService {
    shared: Arc<Shared>,
    handle: RaftHandle,
    config: Arc<KvServiceConfig>,
}

/// Why a request could not be served here; becomes an error code or a gRPC status.
enum Refusal {
    WrongLeader(Option<NodeId>),
    Timeout,
    Status(Status),
}

impl KvService {
    /// Start serving on top of a running node: spawns the applier and the leadership watcher. `applied`
    /// is the stream [`crate::raft::RaftNode::start`] returned. The returned task ends when the node
    /// stops (`Ok`) or when the log cannot be applied (`Err`).
    pub fn start(
        id: NodeId,
        handle: RaftHandle,
        applied: mpsc::UnboundedReceiver<Applied>,
        config: KvServiceConfig,
    ) -> (KvService, JoinHandle<Result<(), ServiceError>>) {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rsm: Rsm::new(KvStore::default()),
                waiters: HashMap::new(),
                next_token: 0,
                restored_snapshot_index: 0,
                entries_applied: 0,
                started: false,
            }),
        });
        let config = Arc::new(config);
        // One span for both tasks; the watcher keeps its term and role fields current, so every log line
        // of the service says which node wrote it and what that node was at the time.
        let span = info_span!("kv", node = id, term = Empty, role = Empty);
        tokio::spawn(
            watch_leadership(shared.clone(), handle.clone(), span.clone()).instrument(span.clone()),
        );
        let applier = tokio::spawn(
            apply_loop(shared.clone(), handle.clone(), applied, config.clone()).instrument(span),
        );
        (
            KvService {
                shared,
                handle,
                config,
            },
            applier,
        )
    }

    fn leader_hint(&self, hint: Option<NodeId>) -> (u64, String) {
        let hint = hint.or(self.handle.status().raft.leader);
        let address = hint
            .and_then(|id| self.config.addresses.get(&id).cloned())
            .unwrap_or_default();
        (hint.unwrap_or(0), address)
    }

    fn refusal(error: NodeError) -> Refusal {
        match error {
            NodeError::NotLeader(NotLeader::NotLeader { leader_hint }) => {
                Refusal::WrongLeader(leader_hint)
            }
            // The leader is handing over: whoever it hands to will lead shortly.
            NodeError::NotLeader(NotLeader::TransferInProgress) => Refusal::WrongLeader(None),
            NodeError::ReadAborted => Refusal::WrongLeader(None),
            other => Refusal::Status(Status::unavailable(format!("node unavailable: {other}"))),
        }
    }

    async fn wait(
        &self,
        token: Token,
        rx: oneshot::Receiver<Reply>,
        deadline: Instant,
    ) -> Result<KvOutput, Refusal> {
        let _guard = WaiterGuard {
            shared: &self.shared,
            token,
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Reply::Done(output))) => Ok(output),
            Ok(Ok(Reply::Retry)) => Err(Refusal::WrongLeader(None)),
            // The waiter table was dropped: the service is shutting down.
            Ok(Err(_)) => Err(Refusal::Status(Status::unavailable(
                "service shutting down",
            ))),
            Err(_) => Err(Refusal::Timeout),
        }
    }

    async fn mutate(&self, client: u64, seq: u64, command: KvCommand) -> Result<KvOutput, Refusal> {
        let deadline = Instant::now() + self.config.request_timeout;
        let bytes = match self.shared.lock().rsm.prepare(client, seq, &command) {
            Prepared::Answered(output) => return Ok(output),
            Prepared::Stale => {
                return Err(Refusal::Status(Status::failed_precondition(format!(
                    "stale request: client {client} already moved past sequence number {seq}"
                ))))
            }
            Prepared::Propose(bytes) => bytes,
        };
        let (index, _term) =
            match tokio::time::timeout_at(deadline, self.handle.propose(bytes)).await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => return Err(Self::refusal(e)),
                Err(_) => return Err(Refusal::Timeout),
            };
        let (token, rx) = {
            let mut inner = self.shared.lock();
            let (token, rx) = inner.register();
            if let Some(done) = inner.rsm.track(token, index, client, seq) {
                inner.complete(vec![done]);
            }
            (token, rx)
        };
        self.wait(token, rx, deadline).await
    }

    async fn read(&self, query: KvQuery) -> Result<KvOutput, Refusal> {
        let deadline = Instant::now() + self.config.request_timeout;
        let index = match tokio::time::timeout_at(deadline, self.handle.read_index()).await {
            Ok(Ok(index)) => index,
            Ok(Err(e)) => return Err(Self::refusal(e)),
            Err(_) => return Err(Refusal::Timeout),
        };
        let (token, rx) = {
            let mut inner = self.shared.lock();
            let (token, rx) = inner.register();
            if let Some(done) = inner.rsm.read(token, index, query) {
                inner.complete(vec![done]);
            }
            (token, rx)
        };
        self.wait(token, rx, deadline).await
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let key = request.into_inner().key;
        validate_key(&key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut response = pb::GetResponse::default();
        match self.read(KvQuery::Get { key }).await {
            Ok(output) => {
                response.found = output.value.is_some();
                response.value = output.value.unwrap_or_default();
            }
            Err(Refusal::WrongLeader(hint)) => {
                response.set_error(pb::ErrorCode::WrongLeader);
                (response.leader_hint, response.leader_address) = self.leader_hint(hint);
            }
            Err(Refusal::Timeout) => response.set_error(pb::ErrorCode::Timeout),
            Err(Refusal::Status(status)) => return Err(status),
        }
        Ok(Response::new(response))
    }

    async fn mutate(
        &self,
        request: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateResponse>, Status> {
        let request = request.into_inner();
        if request.client_id == 0 || request.seq == 0 {
            return Err(Status::invalid_argument(
                "client_id and seq must be non-zero (seq counts 1, 2, ... per client)",
            ));
        }
        let command = request
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))
            .and_then(|c| {
                KvCommand::try_from(c)
                    .map_err(|_| Status::invalid_argument("command has no operation"))
            })?;
        validate_command(&command).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut response = pb::MutateResponse::default();
        match self.mutate(request.client_id, request.seq, command).await {
            Ok(output) => {
                response.outcome = Some(pb::Outcome {
                    ok: output.ok,
                    current: output.value,
                });
            }
            Err(Refusal::WrongLeader(hint)) => {
                response.set_error(pb::ErrorCode::WrongLeader);
                (response.leader_hint, response.leader_address) = self.leader_hint(hint);
            }
            Err(Refusal::Timeout) => response.set_error(pb::ErrorCode::Timeout),
            Err(Refusal::Status(status)) => return Err(status),
        }
        Ok(Response::new(response))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = self.handle.status();
        let raft = &node.raft;
        let (applied, keys, sessions, restored, replayed) = {
            let inner = self.shared.lock();
            (
                inner.rsm.applied(),
                inner.rsm.machine().len() as u64,
                inner.rsm.sessions() as u64,
                inner.restored_snapshot_index,
                inner.entries_applied,
            )
        };
        let (_, leader_address) = self.leader_hint(raft.leader);
        Ok(Response::new(pb::StatusResponse {
            id: raft.id,
            role: raft.role.to_string(),
            term: raft.term,
            leader: raft.leader.unwrap_or(0),
            commit_index: raft.commit,
            applied_index: applied,
            first_index: raft.first_index,
            last_index: raft.last_index,
            snapshot_index: raft.snapshot_index,
            raft_state_bytes: node.raft_state_bytes,
            snapshot_bytes: node.snapshot_bytes,
            keys,
            leader_address,
            restored_snapshot_index: restored,
            entries_applied_since_start: replayed,
            sessions,
        }))
    }
}

/// Largest number of queued apply batches handled under one lock.
const APPLY_BATCH: usize = 64;

async fn apply_loop(
    shared: Arc<Shared>,
    handle: RaftHandle,
    mut applied: mpsc::UnboundedReceiver<Applied>,
    config: Arc<KvServiceConfig>,
) -> Result<(), ServiceError> {
    let mut last_compacted = 0;
    while let Some(first) = applied.recv().await {
        let snapshot = {
            let mut inner = shared.lock();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(item) = next.take() {
                let completions = match item {
                    Applied::Snapshot(snapshot) => {
                        if !inner.started {
                            inner.restored_snapshot_index = snapshot.meta.index;
                        }
                        info!(
                            index = snapshot.meta.index,
                            bytes = snapshot.data.len(),
                            "loading snapshot"
                        );
                        inner.rsm.apply_snapshot(&snapshot)?
                    }
                    Applied::Entries(entries) => {
                        inner.entries_applied += entries.len() as u64;
                        inner.rsm.apply_entries(&entries)?
                    }
                };
                inner.started = true;
                inner.complete(completions);
                taken += 1;
                if taken < APPLY_BATCH {
                    next = applied.try_recv().ok();
                }
            }
            let status = handle.status();
            let due = config.snapshot_threshold > 0
                && status.raft_state_bytes > config.snapshot_threshold
                // The previous compaction has reached the log (otherwise its bytes still count).
                && status.raft.snapshot_index >= last_compacted
                && inner.rsm.applied() > status.raft.snapshot_index;
            due.then(|| inner.rsm.snapshot())
        };
        if let Some((index, data)) = snapshot {
            debug!(index, bytes = data.len(), "taking a snapshot");
            match handle.compact(index, data).await {
                Ok(()) => last_compacted = index,
                Err(e) => warn!(index, error = %e, "snapshot refused"),
            }
        }
    }
    Ok(())
}

async fn watch_leadership(shared: Arc<Shared>, handle: RaftHandle, span: Span) {
    let mut status = handle.subscribe();
    let (mut role, mut term) = {
        let s = status.borrow_and_update();
        (s.raft.role, s.raft.term)
    };
    span.record("term", term);
    span.record("role", tracing::field::display(role));
    while status.changed().await.is_ok() {
        let (now_role, now_term) = {
            let s = status.borrow_and_update();
            (s.raft.role, s.raft.term)
        };
        if (now_role, now_term) != (role, term) {
            span.record("term", now_term);
            span.record("role", tracing::field::display(now_role));
        }
        if role == Role::Leader && (now_role != Role::Leader || now_term != term) {
            info!(term = now_term, role = %now_role, "lost leadership; sending waiting clients elsewhere");
            let mut inner = shared.lock();
            let retries = inner.rsm.leadership_lost();
            inner.complete(retries);
        }
        (role, term) = (now_role, now_term);
    }
}
