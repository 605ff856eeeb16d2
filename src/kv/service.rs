//! The `Kv` gRPC service: validation and translation around an [`RsmService`]. All replication logic is
//! in [`crate::rsm`].
//!
//! Why it is generic: a shard group speaks the same `kv.Kv` protocol to clients as a plain KV cluster
//! (clients only add "ask another group" on `ERROR_CODE_WRONG_GROUP`), so the one service serves any
//! [`KvMachine`] — the [`KvStore`] of a KV cluster or the [`crate::shardkv::ShardKv`] of a shard group —
//! instead of a copy per machine drifting apart.

use super::state::{KvCommand, KvOutput, KvQuery, KvStore};
use super::validate::{validate_command, validate_key};
use crate::proto::kv as pb;
use crate::proto::kv::kv_server::Kv;
use crate::proto::kv::kv_server::KvServer;
use crate::raft::{Applied, NodeId, RaftHandle};
use crate::rsm::answers::{self, AnswerBudget, BudgetExceeded, HoldsAnswerPermits};
use crate::rsm::service::{
    check_session, Refusal, RsmService, ServedMachine, ServiceConfig, ServiceError,
};
use crate::rsm::sessions::{owner_of, Owner};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::info_span;

/// How a machine answered a client's KV request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvAnswer {
    /// Served.
    Done(KvOutput),
    /// The key's shard is not served here (shard groups only): the client must refresh its
    /// configuration and ask the owner.
    WrongGroup,
    /// Not applied: the client's session expired; new client ids must be above this one.
    SessionExpired(u64),
    /// The machine produced an output that is no answer to a client request (a bug, not the client's
    /// fault); reported as an internal error rather than guessed at.
    Unexpected(String),
}

/// What a status report shows about the machine itself. Shard fields are zero/empty for a plain store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineStatus {
    /// Keys held.
    pub keys: u64,
    /// The shard group's id (0: not a shard group).
    pub gid: u64,
    /// The configuration the group has reached.
    pub config_num: u64,
    /// Shards served now.
    pub serving: Vec<u64>,
    /// Shards owned but still being pulled from their previous owner.
    pub pulling: Vec<u64>,
    /// Frozen copies of given-away shards still held (until the new owner confirms).
    pub outgoing: u64,
    /// Shards installed whose previous owner has not yet confirmed deleting its copy.
    pub confirming: u64,
}

/// A replicated machine the `Kv` service can serve: how a client's get and mutation become the
/// machine's query and command, and how its output becomes an answer.
pub trait KvMachine: ServedMachine {
    /// The query reading `key`.
    fn get_query(key: String) -> Self::Query;
    /// The command applying `command` for (`client`, `seq`) sent by `owner`. Machines with rsm
    /// sessions ignore the tag (the rsm layer deduplicates); shard groups keep it, because their dedup
    /// records move with shards.
    fn client_command(client: u64, seq: u64, owner: Owner, command: KvCommand) -> Self::Command;
    /// Translate an output for the client.
    fn answer(output: Self::Output) -> KvAnswer;
    /// Figures for `Status`.
    fn describe(&self) -> MachineStatus;
}

impl KvMachine for KvStore {
    fn get_query(key: String) -> KvQuery {
        KvQuery::Get { key }
    }

    fn client_command(_client: u64, _seq: u64, _owner: Owner, command: KvCommand) -> KvCommand {
        command
    }

    fn answer(output: KvOutput) -> KvAnswer {
        KvAnswer::Done(output)
    }

    fn describe(&self) -> MachineStatus {
        MachineStatus {
            keys: self.len() as u64,
            ..MachineStatus::default()
        }
    }
}

/// The `Kv` service of one node. Cheap to clone; hand it to tonic with [`KvService::into_server`].
pub struct KvService<M: KvMachine = KvStore> {
    service: RsmService<M>,
    /// What its answers' values may hold unread ([`crate::rsm::answers`]).
    answers: Arc<AnswerBudget>,
}

impl<M: KvMachine> Clone for KvService<M> {
    fn clone(&self) -> Self {
        KvService {
            service: self.service.clone(),
            answers: self.answers.clone(),
        }
    }
}

/// Answers shorter than this reserve nothing from the [`AnswerBudget`]: what one holds is of the
/// order of its HTTP/2 stream's own state, which the per-connection stream bound already limits.
const MIN_BUDGETED_ANSWER_BYTES: usize = 256;

/// What a write refused for the store's quota is told.
const OVER_QUOTA: &str = "the store is at its quota (kvd --quota-bytes): nothing was written; \
                          delete keys or raise the quota";

/// Largest `kv.Kv` request or answer.
const MAX_MESSAGE_BYTES: usize = crate::limits::MAX_CLIENT_MESSAGE_BYTES;

impl KvService<KvStore> {
    /// Start serving on top of a running node: spawns the applier and the leadership watcher. `applied`
    /// is the stream [`crate::raft::RaftNode::start`] returned. The returned task ends when the node
    /// stops (`Ok`) or when the log cannot be applied (`Err`).
    pub fn start(
        id: NodeId,
        handle: RaftHandle,
        applied: mpsc::UnboundedReceiver<Applied>,
        config: ServiceConfig,
    ) -> (KvService, JoinHandle<Result<(), ServiceError>>) {
        let span = info_span!("kv", node = id, term = Empty, role = Empty);
        let (service, applier) =
            RsmService::start(span, KvStore::default(), handle, applied, config);
        (KvService::over(service), applier)
    }
}

impl<M: KvMachine> KvService<M> {
    /// The `Kv` service over an already started replicated service (a shard group starts its
    /// [`RsmService`] itself because its transfer service and driver share it).
    pub fn over(service: RsmService<M>) -> Self {
        KvService {
            service,
            answers: AnswerBudget::process(),
        }
    }

    /// The tonic service: messages up to [`crate::limits::MAX_CLIENT_MESSAGE_BYTES`] both ways, and
    /// each answer's budget reservation held until its body is gone.
    pub fn into_server(self) -> HoldsAnswerPermits<KvServer<Self>> {
        HoldsAnswerPermits(
            KvServer::new(self)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// `answer`, with its encoded size reserved from `caller`'s budget for as long as it waits to be
    /// sent if it is large enough to count ([`MIN_BUDGETED_ANSWER_BYTES`]).
    /// `caller` names who it is counted against ([`answers::caller_key`]), asked only for an answer
    /// that counts: most are small, and naming the caller allocates.
    fn reserved<T: prost::Message>(
        &self,
        caller: impl FnOnce() -> String,
        answer: T,
    ) -> Result<Response<T>, (BudgetExceeded, T)> {
        let bytes = answer.encoded_len();
        let mut response = Response::new(answer);
        if bytes >= MIN_BUDGETED_ANSWER_BYTES {
            match self.answers.reserve(&caller(), bytes) {
                Ok(permit) => {
                    response.extensions_mut().insert(permit);
                }
                Err(refused) => return Err((refused, response.into_inner())),
            }
        }
        Ok(response)
    }

    /// The error code, leader hint and leader address telling a client where to retry, or the status
    /// to fail the call with.
    fn refusal(&self, refusal: Refusal) -> Result<(pb::ErrorCode, u64, String), Status> {
        match refusal {
            Refusal::WrongLeader(hint) => {
                let (id, address) = self.service.leader_hint(hint);
                Ok((pb::ErrorCode::WrongLeader, id, address))
            }
            Refusal::Timeout => Ok((pb::ErrorCode::Timeout, 0, String::new())),
            Refusal::SessionExpired(_) => Ok((pb::ErrorCode::SessionExpired, 0, String::new())),
            Refusal::Status(status) => Err(status),
        }
    }
}

#[tonic::async_trait]
impl<M: KvMachine> Kv for KvService<M> {
    type BackupStream = crate::rsm::service::BackupStream;

    async fn backup(
        &self,
        request: Request<crate::proto::rsm::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        crate::rsm::service::serve_backup(&self.service, &request).await
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let caller = self
            .service
            .guard()
            .allow(&request, "read keys", crate::security::is_user)?;
        let remote = request.remote_addr();
        let key = request.into_inner().key;
        validate_key(&key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut response = pb::GetResponse::default();
        match self.service.read(M::get_query(key)).await {
            Ok(output) => match M::answer(output) {
                KvAnswer::Done(output) => {
                    response.found = output.value.is_some();
                    response.value = output.value.unwrap_or_default();
                }
                KvAnswer::WrongGroup => response.set_error(pb::ErrorCode::WrongGroup),
                KvAnswer::SessionExpired(_) => {
                    return Err(Status::internal("a read was answered SESSION_EXPIRED"))
                }
                KvAnswer::Unexpected(what) => return Err(Status::internal(what)),
            },
            Err(refusal) => {
                let (error, hint, address) = self.refusal(refusal)?;
                response.set_error(error);
                (response.leader_hint, response.leader_address) = (hint, address);
            }
        }
        let caller = || answers::caller_key(caller.as_ref(), remote);
        self.reserved(caller, response).map_err(|(refused, _)| {
            Status::resource_exhausted(format!("{}: {refused}", answers::OVERLOADED))
        })
    }

    async fn mutate(
        &self,
        request: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateResponse>, Status> {
        let caller =
            self.service
                .guard()
                .allow(&request, "write keys", crate::security::is_user)?;
        let owner = owner_of(caller.as_ref());
        let remote = request.remote_addr();
        let request = request.into_inner();
        check_session(request.client_id, request.seq)?;
        let command = request
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))
            .and_then(|c| {
                KvCommand::try_from(c)
                    .map_err(|_| Status::invalid_argument("command has no operation"))
            })?;
        validate_command(&command).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut response = pb::MutateResponse::default();
        let (client, seq) = (request.client_id, request.seq);
        let blind = self.service.acknowledges_before_commit()
            && matches!(command, KvCommand::Put { .. } | KvCommand::Append { .. });
        let command = M::client_command(client, seq, owner, command);
        let answered = match blind {
            // The self-test's deliberate bug (see `ServiceConfig::unsafe_ack_before_commit`).
            true => self
                .service
                .append_unconfirmed(client, seq, owner, command)
                .await
                .map(|()| {
                    KvAnswer::Done(KvOutput {
                        ok: true,
                        value: None,
                        elided: false,
                        over_quota: false,
                    })
                }),
            false => self
                .service
                .mutate(client, seq, owner, command)
                .await
                .map(M::answer),
        };
        match answered {
            Ok(answer) => match answer {
                // A status, not an outcome: clerks of every version take FAILED_PRECONDITION as a
                // final refusal, where one before quotas would have read the outcome as written.
                KvAnswer::Done(output) if output.over_quota => {
                    return Err(Status::failed_precondition(OVER_QUOTA))
                }
                KvAnswer::Done(output) => response.outcome = Some(pb::Outcome::from(&output)),
                KvAnswer::WrongGroup => response.set_error(pb::ErrorCode::WrongGroup),
                KvAnswer::SessionExpired(mark) => {
                    response.set_error(pb::ErrorCode::SessionExpired);
                    response.min_client_id = mark;
                }
                KvAnswer::Unexpected(what) => return Err(Status::internal(what)),
            },
            Err(refusal) => {
                if let Refusal::SessionExpired(mark) = refusal {
                    response.min_client_id = mark;
                }
                let (error, hint, address) = self.refusal(refusal)?;
                response.set_error(error);
                (response.leader_hint, response.leader_address) = (hint, address);
            }
        }
        let caller = || answers::caller_key(caller.as_ref(), remote);
        match self.reserved(caller, response) {
            Ok(answer) => Ok(answer),
            // Applied already, so answered all the same: without the current value of a failed
            // swap, as a retry answered from a dedup record too long to remember it is.
            Err((_, mut response)) => {
                if let Some(outcome) = response.outcome.as_mut() {
                    if outcome.current.take().is_some() {
                        outcome.current_elided = true;
                    }
                }
                Ok(Response::new(response))
            }
        }
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Any identity of the cluster may see status (operators, monitoring, peers).
        self.service.guard().caller(&request)?;
        let node = self.service.handle().status();
        let raft = &node.raft;
        let stats = self.service.stats();
        let machine = self.service.with_machine(M::describe);
        let (_, leader_address) = self.service.leader_hint(raft.leader);
        Ok(Response::new(pb::StatusResponse {
            id: raft.id,
            role: raft.role.to_string(),
            term: raft.term,
            leader: raft.leader.unwrap_or(0),
            commit_index: raft.commit,
            applied_index: stats.applied,
            first_index: raft.first_index,
            last_index: raft.last_index,
            snapshot_index: raft.snapshot_index,
            raft_state_bytes: node.raft_state_bytes,
            snapshot_bytes: node.snapshot_bytes,
            keys: machine.keys,
            leader_address,
            restored_snapshot_index: stats.restored_snapshot_index,
            entries_applied_since_start: stats.entries_applied,
            sessions: stats.sessions,
            gid: machine.gid,
            config_num: machine.config_num,
            serving_shards: machine.serving,
            pulling_shards: machine.pulling,
            outgoing_shards: machine.outgoing,
            confirming_shards: machine.confirming,
            stages: (node.stages.named().into_iter())
                .chain(stats.stages.named())
                .map(|(name, total)| pb::StageTime {
                    name: name.to_string(),
                    count: total.count,
                    micros: total.micros,
                })
                .collect(),
            persisted_entries: node.stages.persisted_entries,
        }))
    }
}
