//! The replicated state machine as a network service: client requests in, Raft proposals and ReadIndex
//! reads out, for any [`StateMachine`]. The gRPC services of the KV store and the shard controller are thin
//! translations around an [`RsmService`].
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

use super::sessions::{plausible_client, unix_ms, Owner};
use super::{Completion, Prepared, Rsm, RsmError, SnapshotJob, StateMachine, Token};
use crate::metrics::ServiceMetrics;
use crate::pacer::LinePacer;
use crate::raft::{Applied, NodeError, NodeId, NotLeader, RaftHandle, Role};
use crate::raft::{Index, Term};
use crate::stages::ServiceStages;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn, Instrument, Span};

/// How the service behaves; the daemon fills it from its flags.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// A request not finished within this time is answered `TIMEOUT` (the client retries, possibly
    /// elsewhere). Short enough that a client notices a dead leader quickly, long enough for a commit.
    pub request_timeout: Duration,
    /// Snapshot once the persisted Raft state (log + hard state) exceeds this many bytes; 0 never does.
    pub snapshot_threshold: u64,
    /// Every node's client-facing address (`host:port`), so a follower can tell clients where the leader is.
    pub addresses: HashMap<NodeId, String>,
    /// Where to count requests, latency and snapshots (`--metrics-listen`), if anywhere.
    pub metrics: Option<ServiceMetrics>,
    /// Who may call the service's RPCs (open without TLS).
    pub guard: crate::security::Guard,
    /// When client sessions are dropped and how many bytes the store may hold (stamped on this
    /// node's proposals while it leads).
    pub policy: super::sessions::LogPolicy,
    /// The cluster id (`<cluster>/<group>`) this service's node belongs to, written into backups.
    pub cluster_id: String,
    /// A deliberate safety bug for the `chaos` self-test (only debug builds of `kvd` can set it):
    /// services that honour it acknowledge a write once the leader appended it, before a majority
    /// has it, so a partition or a crash loses acknowledged writes — which the harness's checker
    /// must then catch. Never set otherwise.
    pub unsafe_ack_before_commit: bool,
    /// Followers answer reads too (`kvd --follower-reads`): a follower asks the leader for the read
    /// index and serves the read once it applied that far, so reads spread over every replica and
    /// stay linearizable. Off: a follower refuses reads with a hint to the leader.
    pub follower_reads: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            request_timeout: Duration::from_secs(1),
            snapshot_threshold: 8 << 20,
            addresses: HashMap::new(),
            metrics: None,
            guard: crate::security::Guard::open(),
            policy: super::sessions::LogPolicy::default(),
            cluster_id: "ds824/raft".into(),
            unsafe_ack_before_commit: false,
            follower_reads: false,
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
enum Reply<O> {
    Done(O),
    Retry,
    /// Proposed, then leadership was lost: answered as a timeout (the outcome is unknown).
    Unknown,
    SessionExpired(u64),
}

impl<O> Reply<O> {
    /// The reply to `completion`, and whose it is.
    fn of(completion: Completion<O>) -> (Token, Reply<O>) {
        match completion {
            Completion::Done { token, output } => (token, Reply::Done(output)),
            Completion::Retry { token } => (token, Reply::Retry),
            Completion::Unknown { token } => (token, Reply::Unknown),
            Completion::SessionExpired {
                token,
                min_client_id,
            } => (token, Reply::SessionExpired(min_client_id)),
        }
    }

    /// What the request answers its caller.
    fn into_result(self) -> Result<O, Refusal> {
        match self {
            Reply::Done(output) => Ok(output),
            Reply::Retry => Err(Refusal::WrongLeader(None)),
            Reply::Unknown => Err(Refusal::Timeout),
            Reply::SessionExpired(mark) => Err(Refusal::SessionExpired(mark)),
        }
    }
}

struct Inner<S: StateMachine> {
    rsm: Rsm<S>,
    waiters: HashMap<Token, oneshot::Sender<Reply<S::Output>>>,
    next_token: Token,
    restored_snapshot_index: u64,
    entries_applied: u64,
    started: bool,
}

impl<S: StateMachine> Inner<S> {
    fn register(&mut self) -> (Token, oneshot::Receiver<Reply<S::Output>>) {
        self.next_token += 1;
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(self.next_token, tx);
        (self.next_token, rx)
    }

    fn complete(&mut self, completions: Vec<Completion<S::Output>>) {
        for completion in completions {
            let (token, reply) = Reply::of(completion);
            if let Some(waiter) = self.waiters.remove(&token) {
                // The request may have given up (deadline, client gone): nothing to do then.
                let _ = waiter.send(reply);
            }
        }
    }
}

struct Shared<S: StateMachine> {
    inner: Mutex<Inner<S>>,
    /// The applied index, for those who wait for it without a query of the machine's (backups).
    applied: watch::Sender<Index>,
    /// Held while a backup is encoded and streamed: one at a time, as each holds a copy of the state.
    backup_slot: Arc<tokio::sync::Mutex<()>>,
    /// Paces the `request refused` lines.
    refusal_lines: LinePacer,
    /// Time successful writes spent in each stage here ([`ServiceStats::stages`]).
    stages: Mutex<ServiceStages>,
}

impl<S: StateMachine> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters more
        // than stopping would; keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Forgets a waiting request when its handler returns or is dropped (deadline or client cancellation),
/// so the waiter table only holds requests someone still waits for.
struct WaiterGuard<'a, S: StateMachine> {
    shared: &'a Shared<S>,
    token: Token,
    /// A read's index: its query is queued in the state machine until applied reaches it.
    read_index: Option<Index>,
}

impl<S: StateMachine> Drop for WaiterGuard<'_, S> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.waiters.remove(&self.token);
        if let Some(index) = self.read_index {
            inner.rsm.withdraw_read(self.token, index);
        }
    }
}

/// Withdraws a proposal's expectation ([`Rsm::expect`]) unless `track` took it over.
struct ExpectationGuard<'a, S: StateMachine> {
    shared: &'a Shared<S>,
    client: u64,
    seq: u64,
    owner: Owner,
}

impl<S: StateMachine> Drop for ExpectationGuard<'_, S> {
    fn drop(&mut self) {
        self.shared
            .lock()
            .rsm
            .withdraw(self.client, self.seq, self.owner);
    }
}

/// One node's replicated service: requests in, Raft proposals and reads out. Cheap to clone; a gRPC
/// service wraps it and translates its [`Refusal`]s.
pub struct RsmService<S: StateMachine> {
    shared: Arc<Shared<S>>,
    handle: RaftHandle,
    config: Arc<ServiceConfig>,
}

impl<S: StateMachine> Clone for RsmService<S> {
    fn clone(&self) -> Self {
        RsmService {
            shared: self.shared.clone(),
            handle: self.handle.clone(),
            config: self.config.clone(),
        }
    }
}

/// Counters a status report shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Last applied log index.
    pub applied: u64,
    /// Client sessions in the dedup table.
    pub sessions: u64,
    /// Index of the snapshot loaded at start-up (0: none).
    pub restored_snapshot_index: u64,
    /// Entries applied since the process started (the replay after a restart shows here).
    pub entries_applied: u64,
    /// Time successful writes served here spent in each stage since the process started.
    pub stages: ServiceStages,
}

/// Why a request could not be served here; the gRPC layer turns it into an error code or a status.
pub enum Refusal {
    /// Not the leader (hint: who may be).
    WrongLeader(Option<NodeId>),
    /// Not seen finished: the request timeout passed, or leadership was lost with a command in
    /// flight. A command's outcome is unknown (the next leader may still commit it).
    Timeout,
    /// The client's session was dropped; it must start a new one with an id above this.
    SessionExpired(u64),
    /// Anything else, as a gRPC status.
    Status(Status),
}

/// Refuse a command whose session tag cannot be right: ids and sequence numbers start at 1, and an id
/// starts with its clerk's clock, which may not be far ahead of ours (see [`super::sessions`]).
pub fn check_session(client_id: u64, seq: u64) -> Result<(), Status> {
    if client_id == 0 || seq == 0 {
        return Err(Status::invalid_argument(
            "client_id and seq must be non-zero (seq counts 1, 2, ... per client)",
        ));
    }
    if !plausible_client(client_id, unix_ms()) {
        return Err(Status::invalid_argument(format!(
            "client_id {client_id} is from the future: ids start with the clerk's clock (ms since \
             the Unix epoch, shifted left by {} bits); check the client's clock",
            super::sessions::CLIENT_ID_RANDOM_BITS
        )));
    }
    Ok(())
}

/// A state machine that can be served from tokio tasks: it and its commands, queries and outputs move
/// between threads.
pub trait ServedMachine:
    StateMachine<Command: Send + 'static, Query: Send + 'static, Output: Send + 'static>
    + Send
    + 'static
{
}

impl<S> ServedMachine for S where
    S: StateMachine<Command: Send + 'static, Query: Send + 'static, Output: Send + 'static>
        + Send
        + 'static
{
}

impl<S: ServedMachine> RsmService<S> {
    /// Start serving on top of a running node: spawns the applier and the leadership watcher. `applied`
    /// is the stream [`crate::raft::RaftNode::start`] returned. The returned task ends when the node
    /// stops (`Ok`) or when the log cannot be applied (`Err`).
    pub fn start(
        span: Span,
        machine: S,
        handle: RaftHandle,
        applied: mpsc::UnboundedReceiver<Applied>,
        config: ServiceConfig,
    ) -> (RsmService<S>, JoinHandle<Result<(), ServiceError>>) {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rsm: Rsm::with_policy(machine, config.policy),
                waiters: HashMap::new(),
                next_token: 0,
                restored_snapshot_index: 0,
                entries_applied: 0,
                started: false,
            }),
            applied: watch::Sender::new(0),
            backup_slot: Arc::new(tokio::sync::Mutex::new(())),
            refusal_lines: LinePacer::new(REFUSAL_LINE_EVERY),
            stages: Mutex::default(),
        });
        let config = Arc::new(config);
        // One span for both tasks (it must have empty `term` and `role` fields); the watcher keeps them
        // current, so every log line of the service says which node wrote it and what it was at the time.
        tokio::spawn(
            watch_leadership(shared.clone(), handle.clone(), span.clone()).instrument(span.clone()),
        );
        let applier = tokio::spawn(
            apply_loop(shared.clone(), handle.clone(), applied, config.clone()).instrument(span),
        );
        (
            RsmService {
                shared,
                handle,
                config,
            },
            applier,
        )
    }

    /// A leader id and client address to send a client to (0 and "" if unknown).
    pub fn leader_hint(&self, hint: Option<NodeId>) -> (u64, String) {
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
            // Over the entry limit on every node: final.
            e @ NodeError::TooLarge { .. } => {
                Refusal::Status(Status::invalid_argument(e.to_string()))
            }
            // Too much in flight: the clerk backs off and tries again within its deadline.
            e @ NodeError::Overloaded(_) => Refusal::Status(Status::resource_exhausted(format!(
                "{e}; retry after a pause"
            ))),
            other => Refusal::Status(Status::unavailable(format!("node unavailable: {other}"))),
        }
    }

    async fn wait(
        &self,
        token: Token,
        read_index: Option<Index>,
        rx: oneshot::Receiver<Reply<S::Output>>,
        deadline: Instant,
    ) -> Result<S::Output, Refusal> {
        let _guard = WaiterGuard {
            shared: &self.shared,
            token,
            read_index,
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply.into_result(),
            // The waiter table was dropped: the service is shutting down.
            Ok(Err(_)) => Err(Refusal::Status(Status::unavailable(
                "service shutting down",
            ))),
            Err(_) => Err(Refusal::Timeout),
        }
    }

    /// Apply `command` exactly once for (`client`, `seq`), sent by `owner` (the caller's identity:
    /// [`crate::rsm::sessions::owner_of`]), and return its output.
    pub async fn mutate(
        &self,
        client: u64,
        seq: u64,
        owner: Owner,
        command: S::Command,
    ) -> Result<S::Output, Refusal> {
        let started = Instant::now();
        let result = self.mutate_inner(client, seq, owner, command).await;
        self.observe("write", started, &result);
        result
    }

    /// Whether this service runs with the self-test's deliberate bug
    /// ([`ServiceConfig::unsafe_ack_before_commit`]).
    pub fn acknowledges_before_commit(&self) -> bool {
        self.config.unsafe_ack_before_commit
    }

    /// The self-test's deliberate bug: propose `command` and return once the leader has appended
    /// it — not committed, not applied. Only for [`ServiceConfig::unsafe_ack_before_commit`].
    pub async fn append_unconfirmed(
        &self,
        client: u64,
        seq: u64,
        owner: Owner,
        command: S::Command,
    ) -> Result<(), Refusal> {
        let deadline = Instant::now() + self.config.request_timeout;
        let bytes = match self
            .shared
            .lock()
            .rsm
            .prepare(client, seq, owner, &command, unix_ms())
        {
            Prepared::Answered(_) => return Ok(()),
            Prepared::Expired(mark) => return Err(Refusal::SessionExpired(mark)),
            Prepared::Stale => {
                return Err(Refusal::Status(Status::failed_precondition(
                    "stale request",
                )))
            }
            Prepared::Propose(bytes) => bytes,
        };
        match tokio::time::timeout_at(deadline, self.handle.propose(bytes)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Self::refusal(e)),
            Err(_) => Err(Refusal::Timeout),
        }
    }

    /// Answer `query` linearizably (ReadIndex, no log write).
    pub async fn read(&self, query: S::Query) -> Result<S::Output, Refusal> {
        let started = Instant::now();
        let result = self.read_inner(query).await;
        self.observe("read", started, &result);
        result
    }

    fn observe<T>(&self, kind: &str, started: Instant, result: &Result<T, Refusal>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(Refusal::WrongLeader(_)) => "wrong_leader",
            Err(Refusal::Timeout) => "timeout",
            Err(Refusal::SessionExpired(_)) => "session_expired",
            // Admission control's refusals, apart: an operator sizing a cluster needs them.
            Err(Refusal::Status(status)) if status.code() == tonic::Code::ResourceExhausted => {
                "overloaded"
            }
            Err(Refusal::Status(_)) => "error",
        };
        // Refusals an operator acts on get a line (at most one a second, with how many were not
        // shown: a client can cause them cheaply, and an overloaded node most of all); routing
        // answers (wrong leader, timeout) are a client's everyday business and only counted.
        let refused = matches!(result, Err(Refusal::SessionExpired(_) | Refusal::Status(_)));
        if refused {
            if let Some(unlogged) = self.shared.refusal_lines.admit() {
                match result {
                    Err(Refusal::SessionExpired(mark)) => info!(
                        kind,
                        min_client_id = mark,
                        unlogged,
                        "request refused: session expired"
                    ),
                    Err(Refusal::Status(status)) => info!(
                        kind,
                        outcome,
                        code = ?status.code(),
                        reason = status.message(),
                        unlogged,
                        "request refused"
                    ),
                    _ => {}
                }
            }
        }
        if let Some(metrics) = &self.config.metrics {
            metrics.observe(kind, outcome, started.elapsed().as_secs_f64());
        }
    }

    async fn mutate_inner(
        &self,
        client: u64,
        seq: u64,
        owner: Owner,
        command: S::Command,
    ) -> Result<S::Output, Refusal> {
        let started = Instant::now();
        let deadline = started + self.config.request_timeout;
        let bytes = {
            let mut inner = self.shared.lock();
            match inner.rsm.prepare(client, seq, owner, &command, unix_ms()) {
                Prepared::Answered(output) => return Ok(output),
                Prepared::Expired(mark) => return Err(Refusal::SessionExpired(mark)),
                Prepared::Stale => {
                    return Err(Refusal::Status(Status::failed_precondition(format!(
                        "stale request: client {client} already moved past sequence number {seq}"
                    ))))
                }
                Prepared::Propose(bytes) => {
                    inner.rsm.expect(client, seq, owner);
                    bytes
                }
            }
        };
        // Withdraws the expectation on every way out before `track` takes it over (a failed proposal,
        // the deadline, or the caller going away while Raft appends).
        let expectation = ExpectationGuard {
            shared: &self.shared,
            client,
            seq,
            owner,
        };
        let (index, term) =
            match tokio::time::timeout_at(deadline, self.handle.propose(bytes)).await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => return Err(Self::refusal(e)),
                Err(_) => return Err(Refusal::Timeout),
            };
        let (token, rx) = {
            let mut inner = self.shared.lock();
            let (token, rx) = inner.register();
            if let Some(done) = inner.rsm.track(token, index, (client, seq, owner)) {
                inner.complete(vec![done]);
            } else if !self.leads_in(term) {
                // Leadership was lost since the proposal: the watcher's `leadership_lost`, which sends
                // the waiting writes elsewhere, may have run before `track`, and would leave this one
                // waiting out its deadline. (If it runs after, under this lock, it answers it.)
                inner.complete(vec![Completion::Unknown { token }]);
            }
            (token, rx)
        };
        std::mem::forget(expectation); // `track` took it
        let proposed = Instant::now();
        let output = self.wait(token, None, rx, deadline).await?;
        let mut stages = self
            .shared
            .stages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stages.propose.add(proposed - started);
        stages.replicate_and_apply.add(proposed.elapsed());
        Ok(output)
    }

    /// Whether this node may still lead in `term`, as the leadership watch says now (the one the
    /// leadership watcher acts on, so the two never disagree): not once it shows a later term, or a
    /// follower (or pre-candidate) in that term. The driver publishes it after it handles what a pass
    /// brought, so a proposal accepted in the pass that won the election is answered while the watch
    /// still shows the candidate of that term (or an earlier term): that node leads.
    fn leads_in(&self, term: Term) -> bool {
        let (role, now) = self.handle.leadership();
        now < term || (now == term && matches!(role, Role::Candidate | Role::Leader))
    }

    /// An index the leader confirmed committed with a quorum after the call (ReadIndex): what a
    /// linearizable read, and a backup, must have applied before answering. `anywhere`: this node
    /// may be a follower asking the leader (follower reads); else it must lead.
    async fn confirmed_index(&self, deadline: Instant, anywhere: bool) -> Result<Index, Refusal> {
        let asked = async {
            if anywhere {
                self.handle.read_index_anywhere().await
            } else {
                self.handle.read_index().await
            }
        };
        match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(e)) => Err(Self::refusal(e)),
            Err(_) => Err(Refusal::Timeout),
        }
    }

    async fn read_inner(&self, query: S::Query) -> Result<S::Output, Refusal> {
        let deadline = Instant::now() + self.config.request_timeout;
        let index = self
            .confirmed_index(deadline, self.config.follower_reads)
            .await?;
        let (token, rx) = {
            let mut inner = self.shared.lock();
            inner.next_token += 1;
            let token = inner.next_token;
            // Applied far enough already (a leader's usual case): answered here, without a waiter,
            // its channel and its timer.
            if let Some(done) = inner.rsm.read(token, index, query) {
                return Reply::of(done).1.into_result();
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(token, tx);
            (token, rx)
        };
        self.wait(token, Some(index), rx, deadline).await
    }

    /// A backup file ([`super::backup`]) of the whole service: state and sessions at an index this
    /// node confirmed committed (as a leader, after the call arrived), so every write acknowledged
    /// before the call is in it. Only the leader answers; the snapshot is encoded off the runtime's
    /// threads, from the same cheap copy compaction uses, so applies go on meanwhile. One backup at a
    /// time: a second is refused as overloaded while the returned guard lives (each holds an encoded
    /// copy of the whole state).
    pub async fn backup(&self) -> Result<(Bytes, tokio::sync::OwnedMutexGuard<()>), Refusal> {
        let slot = self
            .shared
            .backup_slot
            .clone()
            .try_lock_owned()
            .map_err(|_| {
                Refusal::Status(Status::resource_exhausted(
                    "a backup is already being taken from this node; try again when it is done",
                ))
            })?;
        let deadline = Instant::now() + self.config.request_timeout;
        let index = self.confirmed_index(deadline, false).await?;
        let mut applied = self.shared.applied.subscribe();
        match tokio::time::timeout_at(deadline, applied.wait_for(|&at| at >= index)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                return Err(Refusal::Status(Status::unavailable(
                    "service shutting down",
                )))
            }
            Err(_) => return Err(Refusal::Timeout),
        }
        let job = self.shared.lock().rsm.snapshot_job();
        // Read after the copy: no entry it holds has a later term than this.
        let status = self.handle.status();
        let header = super::backup::BackupHeader {
            version: super::backup::VERSION,
            service: self
                .config
                .cluster_id
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            cluster_id: self.config.cluster_id.clone(),
            index: job.index(),
            term: status.raft.term,
            snapshot_bytes: 0,
            created_unix_ms: unix_ms(),
            taken_by: status.raft.id,
        };
        // The slot goes with the encoding: a caller that gives up meanwhile does not free it for
        // another copy of the state while this one is still being made.
        let encode = move || {
            let (_, snapshot) = job.encode();
            (Bytes::from(super::backup::encode(header, &snapshot)), slot)
        };
        let (file, slot) = tokio::task::spawn_blocking(encode).await.map_err(|e| {
            Refusal::Status(Status::internal(format!("encoding the backup failed: {e}")))
        })?;
        info!(index, bytes = file.len(), "backup taken");
        Ok((file, slot))
    }

    /// The guard its RPCs check callers with.
    pub fn guard(&self) -> &crate::security::Guard {
        &self.config.guard
    }

    /// The Raft handle (status, proposals).
    pub fn handle(&self) -> &RaftHandle {
        &self.handle
    }

    /// Counters for status reports.
    pub fn stats(&self) -> ServiceStats {
        let inner = self.shared.lock();
        ServiceStats {
            applied: inner.rsm.applied(),
            sessions: inner.rsm.sessions() as u64,
            restored_snapshot_index: inner.restored_snapshot_index,
            entries_applied: inner.entries_applied,
            stages: *self
                .shared
                .stages
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }

    /// Look at the state machine (for status reports; keep it short, the applier waits meanwhile).
    pub fn with_machine<R>(&self, look: impl FnOnce(&S) -> R) -> R {
        look(self.shared.lock().rsm.machine())
    }
}

/// Between two `request refused` lines.
const REFUSAL_LINE_EVERY: Duration = Duration::from_secs(1);

/// Bytes of a backup file per streamed message (well under the 4 MiB a gRPC client takes by default).
const BACKUP_CHUNK_BYTES: usize = 1 << 20;

/// What a `Backup` RPC answers with: the backup file, in pieces.
pub type BackupStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<crate::proto::rsm::BackupChunk, Status>> + Send>,
>;

/// The `Backup` RPC of every replicated service (the KV store, a shard group, the controllers): an
/// operator's call (an admin certificate with TLS), answered by the leader with the file of
/// [`RsmService::backup`]; any other node refuses with `FAILED_PRECONDITION`, naming the leader if
/// it knows it.
pub async fn serve_backup<S: ServedMachine, T>(
    service: &RsmService<S>,
    request: &tonic::Request<T>,
) -> Result<tonic::Response<BackupStream>, Status> {
    service.guard().allow(request, "take backups", |role| {
        *role == crate::security::Role::Admin
    })?;
    let (file, slot) = service.backup().await.map_err(|refusal| match refusal {
        Refusal::WrongLeader(hint) => {
            let (id, address) = service.leader_hint(hint);
            Status::failed_precondition(match id {
                0 => "not the leader (no leader known yet)".to_string(),
                _ => format!("not the leader (the leader is node {id} at {address})"),
            })
        }
        Refusal::Timeout => Status::unavailable("timed out confirming leadership; try again"),
        Refusal::SessionExpired(_) => Status::internal("a backup was answered SESSION_EXPIRED"),
        Refusal::Status(status) => status,
    })?;
    let chunks: Vec<Result<crate::proto::rsm::BackupChunk, Status>> = (0..file.len())
        .step_by(BACKUP_CHUNK_BYTES)
        .map(|start| {
            let end = (start + BACKUP_CHUNK_BYTES).min(file.len());
            Ok(crate::proto::rsm::BackupChunk {
                data: file.slice(start..end),
            })
        })
        .collect();
    // The slot is released when the stream ends or the caller goes away.
    let stream = tokio_stream::StreamExt::map(tokio_stream::iter(chunks), move |chunk| {
        let _held = &slot;
        chunk
    });
    Ok(tonic::Response::new(Box::pin(stream)))
}

/// Largest number of queued apply batches handled under one lock.
const APPLY_BATCH: usize = 64;

async fn apply_loop<S: ServedMachine>(
    shared: Arc<Shared<S>>,
    handle: RaftHandle,
    mut applied: mpsc::UnboundedReceiver<Applied>,
    config: Arc<ServiceConfig>,
) -> Result<(), ServiceError> {
    let mut last_compacted = 0;
    // From now on the node hands this applier only a window beyond what it reports applied.
    handle.report_applied(shared.lock().rsm.applied());
    // At most one snapshot is encoded and stored at a time, beside the applier, never in its way.
    let mut compaction: Option<JoinHandle<Option<Index>>> = None;
    while let Some(first) = applied.recv().await {
        let busy = compaction.as_ref().is_some_and(|c| !c.is_finished());
        if let Some(done) = compaction.take_if(|c| c.is_finished()) {
            if let Ok(Some(index)) = done.await {
                last_compacted = index;
            }
        }
        let job = {
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
            handle.report_applied(inner.rsm.applied());
            shared.applied.send_replace(inner.rsm.applied());
            let status = handle.status();
            // The log may grow to half the size of the last snapshot before the next one: with a
            // large state, snapshotting every few MiB of log would rewrite all of it again and again.
            let threshold = config
                .snapshot_threshold
                .max(status.snapshot_bytes / SNAPSHOT_LOG_FRACTION);
            let due = config.snapshot_threshold > 0
                && !busy
                && status.raft_state_bytes > threshold
                // The previous compaction has reached the log (otherwise its bytes still count).
                && status.raft.snapshot_index >= last_compacted
                && inner.rsm.applied() > status.raft.snapshot_index;
            // Only a cheap copy is taken under the lock; encoding happens on a blocking thread.
            due.then(|| inner.rsm.snapshot_job())
        };
        if let Some(job) = job {
            compaction = Some(tokio::spawn(
                compact(job, handle.clone(), config.metrics.clone()).in_current_span(),
            ));
        }
    }
    Ok(())
}

/// The log may grow to the last snapshot's size divided by this before the next snapshot.
const SNAPSHOT_LOG_FRACTION: u64 = 2;

/// Encode `job` off the runtime's threads and hand it to Raft (which stores it off its loop, then drops
/// the covered log). Returns the index compacted to.
async fn compact<S: ServedMachine>(
    job: SnapshotJob<S>,
    handle: RaftHandle,
    metrics: Option<ServiceMetrics>,
) -> Option<Index> {
    let started = Instant::now();
    let (index, data) = tokio::task::spawn_blocking(move || job.encode())
        .await
        .ok()?;
    let bytes = data.len();
    match handle.compact(index, data).await {
        Ok(()) => {
            info!(
                index,
                bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "snapshot taken"
            );
            if let Some(metrics) = &metrics {
                metrics.snapshot_taken();
            }
            Some(index)
        }
        Err(e) => {
            warn!(index, error = %e, "snapshot refused");
            None
        }
    }
}

async fn watch_leadership<S: StateMachine>(shared: Arc<Shared<S>>, handle: RaftHandle, span: Span) {
    let mut leadership = handle.subscribe_leadership();
    let (mut role, mut term) = *leadership.borrow_and_update();
    span.record("term", term);
    span.record("role", tracing::field::display(role));
    while leadership.changed().await.is_ok() {
        let (now_role, now_term) = *leadership.borrow_and_update();
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

#[cfg(test)]
mod leadership_tests {
    use super::*;
    use crate::kv::{KvCommand, KvStore};
    use crate::raft::node::DetachedNode;

    /// A write proposed to a service whose node has `role` in `term`: the test answers the proposal
    /// through `accepted`; `write` ends when the service answers.
    struct Proposed {
        node: DetachedNode,
        write: JoinHandle<Result<crate::kv::KvOutput, Refusal>>,
        accepted: oneshot::Sender<Result<(Index, Term), NodeError>>,
        /// Kept open: the applier stops when it closes.
        _applied: mpsc::UnboundedSender<Applied>,
    }

    async fn propose_write(role: Role, term: Term) -> Proposed {
        let (handle, mut node) = DetachedNode::new();
        node.set_role(role, term);
        let (applied, applied_rx) = mpsc::unbounded_channel();
        let (service, _applier) = RsmService::start(
            Span::none(),
            KvStore::default(),
            handle,
            applied_rx,
            ServiceConfig::default(),
        );
        let write = tokio::spawn(async move {
            let put = KvCommand::Put {
                key: "k".into(),
                value: "v".into(),
            };
            let client = crate::rsm::client::new_client_id();
            service.mutate(client, 1, 0, put).await
        });
        let accepted = node.next_proposal().await;
        Proposed {
            node,
            write,
            accepted,
            _applied: applied,
        }
    }

    /// A follower read whose index this node has not applied waits in the state machine's queue; when
    /// its caller gives up, its query goes too. (Before, a follower that could not catch up kept
    /// every read sent to it, found by review.)
    #[tokio::test(start_paused = true)]
    async fn a_read_given_up_leaves_nothing_queued() {
        let (handle, mut node) = DetachedNode::new();
        node.set_role(Role::Follower, 2);
        let (_applied, applied_rx) = mpsc::unbounded_channel();
        let config = ServiceConfig {
            follower_reads: true,
            ..ServiceConfig::default()
        };
        let (service, _applier) =
            RsmService::start(Span::none(), KvStore::default(), handle, applied_rx, config);
        let reader = service.clone();
        let read = tokio::spawn(async move {
            let get = crate::kv::KvQuery::Get { key: "k".into() };
            reader.read(get).await
        });
        // The leader confirms index 5; nothing is applied here.
        let _ = node.next_read_index().await.send(Ok(5));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            service.shared.lock().rsm.queued_reads(),
            1,
            "the read waits"
        );
        let result = read.await.expect("the read's task");
        assert!(matches!(result, Err(Refusal::Timeout)), "timed out");
        assert_eq!(
            service.shared.lock().rsm.queued_reads(),
            0,
            "nothing left queued"
        );
    }

    /// A write Raft accepted just before its leader stepped down, where the leadership watcher saw the
    /// step-down before the write was tracked: it is sent elsewhere at once, not left to wait out its
    /// deadline (1 s) for an entry that may never be applied.
    #[tokio::test(start_paused = true)]
    async fn a_write_accepted_just_before_a_step_down_is_sent_elsewhere_at_once() {
        step_down_before_tracking(|node| node.set_role(Role::Follower, 3)).await;
    }

    /// The same when only the leadership watch shows the step-down yet (the status is sent on its
    /// own): the watcher and the check after tracking read the same watch, so they agree. (With the
    /// check reading the status, the write waited out its deadline: found by review.)
    #[tokio::test(start_paused = true)]
    async fn the_check_after_tracking_reads_the_watch_the_leadership_watcher_acts_on() {
        step_down_before_tracking(|node| {
            node.leadership.send_replace((Role::Follower, 3));
        })
        .await;
    }

    /// A write Raft accepts in term 2 as leader, after `step_down` published a step-down the
    /// leadership watcher acted on: it must be sent elsewhere at once, its outcome unknown.
    async fn step_down_before_tracking(step_down: impl FnOnce(&DetachedNode)) {
        let started = Instant::now();
        let Proposed {
            node,
            write,
            accepted,
            _applied,
        } = propose_write(Role::Leader, 2).await;
        step_down(&node);
        // The clock is paused: this runs every task (the watcher too) until all wait, then moves on.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = accepted.send(Ok((1, 2)));
        let result = write.await.expect("the write's task");
        let answer = match result {
            Ok(_) => "served",
            Err(Refusal::WrongLeader(_)) => "wrong leader",
            Err(Refusal::Timeout) => "timeout",
            Err(_) => "another refusal",
        };
        // Answered at once, as an unknown outcome: the entry may still commit under the next leader.
        assert_eq!(answer, "timeout");
        let timeout = ServiceConfig::default().request_timeout;
        assert!(
            started.elapsed() < timeout / 2,
            "took {:?}",
            started.elapsed()
        );
    }

    /// A write accepted in the driver's pass that won the election is answered before the status
    /// says leader: it waits for its entry like any other, it is not sent elsewhere.
    #[tokio::test(start_paused = true)]
    async fn a_write_accepted_as_the_election_is_won_waits_for_its_entry() {
        let Proposed {
            write,
            accepted,
            _applied,
            ..
        } = propose_write(Role::Candidate, 2).await;
        let _ = accepted.send(Ok((1, 2)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !write.is_finished(),
            "answered before its entry was applied"
        );
    }
}
