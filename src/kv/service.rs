//! The `Kv` gRPC service: validation and translation around an [`RsmService`] of the [`KvStore`]. All
//! replication logic is in [`crate::rsm`].

use super::state::{KvCommand, KvQuery, KvStore};
use super::validate::{validate_command, validate_key};
use crate::proto::kv as pb;
use crate::proto::kv::kv_server::Kv;
use crate::raft::{Applied, NodeId, RaftHandle};
use crate::rsm::service::{check_session, Refusal, RsmService, ServiceConfig, ServiceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::info_span;

/// The `Kv` service of one node. Cheap to clone; hand it to tonic with
/// [`crate::proto::kv::kv_server::KvServer::new`].
#[derive(Clone)]
pub struct KvService {
    service: RsmService<KvStore>,
}

impl KvService {
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
        (KvService { service }, applier)
    }
}

impl KvService {
    /// The error code, leader hint and leader address telling a client where to retry, or the status
    /// to fail the call with.
    fn refusal(&self, refusal: Refusal) -> Result<(pb::ErrorCode, u64, String), Status> {
        match refusal {
            Refusal::WrongLeader(hint) => {
                let (id, address) = self.service.leader_hint(hint);
                Ok((pb::ErrorCode::WrongLeader, id, address))
            }
            Refusal::Timeout => Ok((pb::ErrorCode::Timeout, 0, String::new())),
            Refusal::Status(status) => Err(status),
        }
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
        match self.service.read(KvQuery::Get { key }).await {
            Ok(output) => {
                response.found = output.value.is_some();
                response.value = output.value.unwrap_or_default();
            }
            Err(refusal) => {
                let (error, hint, address) = self.refusal(refusal)?;
                response.set_error(error);
                (response.leader_hint, response.leader_address) = (hint, address);
            }
        }
        Ok(Response::new(response))
    }

    async fn mutate(
        &self,
        request: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateResponse>, Status> {
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
        match self
            .service
            .mutate(request.client_id, request.seq, command)
            .await
        {
            Ok(output) => {
                response.outcome = Some(pb::Outcome {
                    ok: output.ok,
                    current: output.value,
                });
            }
            Err(refusal) => {
                let (error, hint, address) = self.refusal(refusal)?;
                response.set_error(error);
                (response.leader_hint, response.leader_address) = (hint, address);
            }
        }
        Ok(Response::new(response))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = self.service.handle().status();
        let raft = &node.raft;
        let stats = self.service.stats();
        let keys = self.service.with_machine(|store| store.len() as u64);
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
            keys,
            leader_address,
            restored_snapshot_index: stats.restored_snapshot_index,
            entries_applied_since_start: stats.entries_applied,
            sessions: stats.sessions,
        }))
    }
}
