//! The `Ctrler` gRPC service: validation and translation around an [`RsmService`] of the [`ShardCtrler`].
//! Replication, exactly-once and linearizable queries come from [`crate::rsm`].

use super::state::{
    check_group, check_join, config_to_proto, CtrlerAnswer, CtrlerCommand, CtrlerOutput,
    CtrlerQuery, ShardCtrler,
};
use crate::proto::ctrler as pb;
use crate::proto::ctrler::ctrler_server::Ctrler;
use crate::raft::{Applied, NodeId, RaftHandle};
use crate::rsm::service::{check_session, Refusal, RsmService, ServiceConfig, ServiceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::info_span;

/// The `Ctrler` service of one controller node.
#[derive(Clone)]
pub struct CtrlerService {
    service: RsmService<ShardCtrler>,
    /// Stamped on every progress report this node proposes (see [`CtrlerCommand::Progress`]).
    keep_configs: u64,
    /// This node's `--shards`, stamped on every Join it proposes (see [`CtrlerCommand::Join`]).
    shards: u64,
}

impl CtrlerService {
    /// Start serving on top of a running node (see [`RsmService::start`]); `shards` is the shard count
    /// fixed when the controller cluster is created; `keep_configs` the most recent configurations kept
    /// whatever the groups report (older ones go once no group needs them).
    pub fn start(
        id: NodeId,
        shards: usize,
        keep_configs: u64,
        handle: RaftHandle,
        applied: mpsc::UnboundedReceiver<Applied>,
        config: ServiceConfig,
    ) -> (CtrlerService, JoinHandle<Result<(), ServiceError>>) {
        let span = info_span!("ctrler", node = id, term = Empty, role = Empty);
        let (service, applier) =
            RsmService::start(span, ShardCtrler::new(shards), handle, applied, config);
        (
            CtrlerService {
                service,
                keep_configs,
                shards: shards as u64,
            },
            applier,
        )
    }

    /// The answer to `result`; `restarts_sessions`: the client knows SESSION_EXPIRED (see the proto).
    fn respond(
        &self,
        result: Result<CtrlerOutput, Refusal>,
        restarts_sessions: bool,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        let mut response = pb::ConfigResponse::default();
        match result {
            Ok(Ok(CtrlerAnswer::Config(config))) => {
                response.config = Some(config_to_proto(&config))
            }
            Ok(Ok(CtrlerAnswer::Created(num))) => {
                // The session table keeps only the number; the configuration is in the state for good
                // (configurations are never dropped) and this node applied the command that made it.
                // Cloning it under the lock is cheap (its group map is shared); encoding happens after.
                let config = self.service.with_machine(|m| m.config(num).cloned());
                match config {
                    Some(config) => response.config = Some(config_to_proto(&config)),
                    None => {
                        return Err(Status::internal(format!(
                            "configuration {num} was made but is not in this replica's state"
                        )))
                    }
                }
            }
            Ok(Ok(CtrlerAnswer::Recorded { oldest })) => response.oldest_kept = oldest,
            Ok(Ok(CtrlerAnswer::Compacted { oldest })) => {
                response.set_error(pb::ErrorCode::Compacted);
                response.oldest_kept = oldest;
            }
            Ok(Err(refusal)) => {
                response.set_error(pb::ErrorCode::Refused);
                response.refusal = refusal;
            }
            Err(Refusal::WrongLeader(hint)) => {
                response.set_error(pb::ErrorCode::WrongLeader);
                (response.leader_hint, response.leader_address) = self.service.leader_hint(hint);
            }
            Err(Refusal::Timeout) => response.set_error(pb::ErrorCode::Timeout),
            Err(Refusal::SessionExpired(mark)) if restarts_sessions => {
                // Long-lived clerks (a shard group's, reporting progress) restart their session above
                // the mark; see `CtrlerClerk`.
                response.set_error(pb::ErrorCode::SessionExpired);
                response.min_client_id = mark;
            }
            Err(Refusal::SessionExpired(_)) => {
                // A clerk from before SESSION_EXPIRED: a refusal it knows.
                response.set_error(pb::ErrorCode::Refused);
                response.refusal = "this client's session expired before the command was applied; \
                                    the command may have been applied by an earlier attempt — check \
                                    the configuration and retry with a new client"
                    .into();
            }
            Err(Refusal::Status(status)) => return Err(status),
        }
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl Ctrler for CtrlerService {
    type BackupStream = crate::rsm::service::BackupStream;

    async fn backup(
        &self,
        request: Request<crate::proto::rsm::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        crate::rsm::service::serve_backup(&self.service, &request).await
    }

    async fn command(
        &self,
        request: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        let caller = self.service.guard().caller(&request)?;
        let request = request.into_inner();
        check_session(request.client_id, request.seq)?;
        // Read before the command is converted (a Join's groups become a map), said only once the
        // caller may make it.
        let named = match request.command.as_ref().and_then(|c| c.op.as_ref()) {
            Some(op) => super::admission::check_names(op),
            None => Ok(()),
        };
        let force = request.force;
        let mut command = request
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))
            .and_then(|c| {
                CtrlerCommand::try_from(c).map_err(|e| Status::invalid_argument(e.to_string()))
            })?;
        // Configuration changes are an operator's; a progress report is the group's own (a forged
        // report could drop configurations the group still needs).
        if let Some(principal) = &caller {
            let allowed = match &command {
                CtrlerCommand::Progress { gid, .. } => {
                    principal.role == crate::security::Role::Shard(*gid)
                }
                _ => principal.role == crate::security::Role::Admin,
            };
            if !allowed {
                let what = match &command {
                    CtrlerCommand::Progress { gid, .. } => {
                        format!("report progress for group {gid}")
                    }
                    _ => "change the configuration (join, leave, move, servers)".into(),
                };
                return Err(Status::permission_denied(format!(
                    "{principal} may not {what}"
                )));
            }
        }
        named.map_err(Status::invalid_argument)?;
        if !matches!(command, CtrlerCommand::Progress { .. }) {
            self.service
                .with_machine(|machine| super::admission::check_command(&command, machine, force))
                .map_err(Status::invalid_argument)?;
        }
        if let CtrlerCommand::Progress { keep, .. } = &mut command {
            *keep = self.keep_configs;
        }
        if let CtrlerCommand::Join { shards, .. } = &mut command {
            *shards = self.shards;
        }
        if let CtrlerCommand::Join { groups, .. } = &command {
            // What no configuration could take is refused before it costs a log entry, in the words
            // the state machine would use.
            check_join(groups).map_err(Status::invalid_argument)?;
        }
        if let CtrlerCommand::Servers { gid, servers, .. } = &command {
            check_group(*gid, servers).map_err(Status::invalid_argument)?;
        }
        let result = self
            .service
            .mutate(
                request.client_id,
                request.seq,
                crate::rsm::sessions::owner_of(caller.as_ref()),
                command,
            )
            .await;
        self.respond(result, request.restarts_sessions)
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        // Configurations are what every member and client routes by: any identity of the cluster.
        self.service.guard().caller(&request)?;
        let num = u64::try_from(request.into_inner().num).ok();
        let result = self.service.read(CtrlerQuery(num)).await;
        // A query has no session: never SESSION_EXPIRED.
        self.respond(result, true)
    }
}
