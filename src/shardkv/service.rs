//! A shard group server's gRPC faces: clients reach the group's [`ShardKv`] through the ordinary `kv.Kv`
//! service ([`KvService`] over a [`KvMachine`] impl here), and other groups pull shards from it and tell
//! it to delete them through the `ShardTransfer` service ([`ShardTransferService`]).
//!
//! What each handler does is [`super::migration`]'s (shared with the simulator); this file only
//! translates between gRPC and those functions.

use super::migration::{self, DeleteRequest, PullRequest, Reply};
use super::state::{Settled, ShardCommand, ShardKv, ShardOutput, ShardQuery};
use super::wire::{cursor_from_proto, page_to_proto};
use crate::ctrler::Gid;
use crate::kv::service::{KvAnswer, KvMachine, KvService, MachineStatus};
use crate::kv::KvCommand;
use crate::proto::shardkv as pb;
use crate::proto::shardkv::shard_transfer_server::{ShardTransfer, ShardTransferServer};
use crate::raft::{Applied, NodeId, RaftHandle};
use crate::rsm::service::{Refusal, RsmService, ServiceConfig, ServiceError};
use crate::rsm::sessions::Owner;
use crate::security::{Principal, Role};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{debug, info, info_span, warn};

/// Largest shard-transfer answer either side accepts: one page, which the new owner proposes as one
/// log entry. The size policy ([`crate::limits`]) bounds every page below it — keys and values to about
/// [`super::PAGE_BYTES`] plus one whole key, dedup records to what is left of a page by what each keeps
/// (and an old owner's final page with the whole table, from versions before session pages) — so no
/// answer is ever refused for its size.
pub const MAX_TRANSFER_BYTES: usize = crate::limits::MAX_TRANSFER_BYTES;

impl KvMachine for ShardKv {
    fn get_query(key: String) -> ShardQuery {
        ShardQuery::Get(key)
    }

    fn client_command(client: u64, seq: u64, owner: Owner, command: KvCommand) -> ShardCommand {
        ShardCommand::Client {
            client,
            seq,
            owner,
            command,
        }
    }

    fn answer(output: ShardOutput) -> KvAnswer {
        match output {
            ShardOutput::Kv(output) => KvAnswer::Done(output),
            ShardOutput::WrongGroup => KvAnswer::WrongGroup,
            ShardOutput::SessionExpired(mark) => KvAnswer::SessionExpired(mark),
            other => KvAnswer::Unexpected(format!(
                "shard group answered a client request with {other:?}"
            )),
        }
    }

    fn describe(&self) -> MachineStatus {
        MachineStatus {
            keys: self.keys() as u64,
            gid: self.gid(),
            config_num: self.config().num,
            serving: self.serving(),
            pulling: self.pulling(),
            outgoing: self.outgoing().len() as u64,
            confirming: self.confirming().len() as u64,
        }
    }
}

/// Everything a shard group server serves, sharing one replicated [`ShardKv`].
pub struct ShardGroupServices {
    /// The replicated state (the driver proposes through it).
    pub rsm: RsmService<ShardKv>,
    /// The client-facing `kv.Kv` service.
    pub kv: KvService<ShardKv>,
    /// The group-to-group `ShardTransfer` service.
    pub transfer: ShardTransferService,
}

/// Start a shard group replica's services on top of a running node (see [`RsmService::start`]). The
/// returned task ends when the node stops (`Ok`) or when the log cannot be applied (`Err`).
pub fn start(
    gid: u64,
    id: NodeId,
    handle: RaftHandle,
    applied: mpsc::UnboundedReceiver<Applied>,
    config: ServiceConfig,
) -> (ShardGroupServices, JoinHandle<Result<(), ServiceError>>) {
    let span = info_span!("shard", gid, node = id, term = Empty, role = Empty);
    let (rsm, applier) = RsmService::start(span, ShardKv::new(gid), handle, applied, config);
    let services = ShardGroupServices {
        kv: KvService::over(rsm.clone()),
        transfer: ShardTransferService { rsm: rsm.clone() },
        rsm,
    };
    (services, applier)
}

/// The `ShardTransfer` service of one shard group replica. Cheap to clone.
#[derive(Clone)]
pub struct ShardTransferService {
    rsm: RsmService<ShardKv>,
}

/// Largest transfer *request* accepted: a shard reference and at most one key. Requests are decoded
/// before anyone is authenticated, so only answers get [`MAX_TRANSFER_BYTES`].
const MAX_TRANSFER_REQUEST_BYTES: usize = 64 << 10;

impl ShardTransferService {
    /// The tonic server for it: answers up to [`MAX_TRANSFER_BYTES`], requests small.
    pub fn into_server(self) -> ShardTransferServer<ShardTransferService> {
        ShardTransferServer::new(self)
            .max_decoding_message_size(MAX_TRANSFER_REQUEST_BYTES)
            .max_encoding_message_size(MAX_TRANSFER_BYTES)
    }

    /// What the state already decides about this transfer (see [`ShardKv::transfer_settled`]): a
    /// caller the copy was not given to is refused, and a request nothing could change is answered
    /// without a log entry. The machine checks again when a proposed transfer applies (this read may
    /// be stale); this keeps other groups' requests and settled ones out of the log.
    fn settled(
        &self,
        config_num: u64,
        shard: u64,
        by: Option<Gid>,
    ) -> Result<Option<Settled>, Status> {
        let settled = self
            .rsm
            .with_machine(|machine| machine.transfer_settled(config_num, shard, by));
        match settled {
            Some(Settled::NotOwner(owner)) => Err(not_owner(by, owner, config_num, shard)),
            other => Ok(other),
        }
    }
}

fn shard_ref(shard: Option<pb::ShardRef>) -> Result<pb::ShardRef, Status> {
    shard.ok_or_else(|| Status::invalid_argument("missing shard reference"))
}

/// A refusal as a transfer status. A timeout counts as "not the leader": the caller then tries another
/// server of the group, which is right when this one is a leader cut off from its majority.
fn refused(refusal: Refusal) -> Result<pb::TransferStatus, Status> {
    match refusal {
        Refusal::WrongLeader(_) | Refusal::Timeout => Ok(pb::TransferStatus::WrongLeader),
        Refusal::SessionExpired(_) => Err(Status::internal(
            "a shard transfer was answered SESSION_EXPIRED (it uses no session)",
        )),
        Refusal::Status(status) => Err(status),
    }
}

/// The group a transfer's caller belongs to, from its certificate (`None` in plaintext mode, where
/// nobody is authenticated; the guard has already refused every role but `shard-GID`).
fn caller_group(caller: Option<Principal>) -> Option<Gid> {
    caller.and_then(|principal| match principal.role {
        Role::Shard(gid) => Some(gid),
        _ => None,
    })
}

/// A transfer asked by a group the configuration did not give the shard to.
fn not_owner(by: Option<Gid>, owner: Gid, config_num: u64, shard: u64) -> Status {
    let by = by.map_or_else(|| "the caller".to_string(), |gid| format!("group {gid}"));
    // Paced: another group can ask as often as it likes.
    static LINES: crate::pacer::LinePacer =
        crate::pacer::LinePacer::new(std::time::Duration::from_secs(1));
    if let Some(unlogged) = LINES.admit() {
        warn!(
            config_num,
            shard, owner, unlogged, "refused a shard transfer to {by}: not the shard's new owner"
        );
    }
    Status::permission_denied(format!(
        "{by} may not take shard {shard} of configuration {config_num}: it was given to group {owner}"
    ))
}

#[tonic::async_trait]
impl ShardTransfer for ShardTransferService {
    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let by = caller_group(self.rsm.guard().allow(&request, "pull shards", |role| {
            matches!(role, crate::security::Role::Shard(_))
        })?);
        let request = request.into_inner();
        let pb::ShardRef { config_num, shard } = shard_ref(request.shard)?;
        if let Some(after) = &request.after {
            crate::kv::validate::validate_key(after)
                .map_err(|e| Status::invalid_argument(format!("the key to pull after: {e}")))?;
        }
        if self.settled(config_num, shard, by)? == Some(Settled::Absent) {
            // Deleted, or never held: whoever asks is behind.
            return Ok(Response::new(pb::PullResponse {
                status: pb::TransferStatus::NotReady.into(),
                contents: None,
            }));
        }
        let request = PullRequest {
            config_num,
            shard,
            after: cursor_from_proto(request.after, request.after_sessions),
            session_pages: request.session_pages,
        };
        // Internal commands carry no session (client 0): the machine's own checks make them idempotent.
        let command = migration::serve_pull(&request, by);
        let reply = match self
            .rsm
            .mutate(0, crate::rsm::internal_seq(), 0, command)
            .await
        {
            Ok(output) => {
                migration::pull_reply(output).map_err(|e| Status::internal(e.to_string()))?
            }
            Err(refusal) => {
                return Ok(Response::new(pb::PullResponse {
                    status: refused(refusal)?.into(),
                    contents: None,
                }))
            }
        };
        Ok(Response::new(match reply {
            Reply::Ok(page) => {
                debug!(
                    config_num,
                    shard,
                    keys = page.data.len(),
                    sessions = page.sessions.len(),
                    last = page.last,
                    "shard page pulled"
                );
                pb::PullResponse {
                    status: pb::TransferStatus::Ok.into(),
                    contents: Some(page_to_proto(&page)),
                }
            }
            Reply::NotReady => pb::PullResponse {
                status: pb::TransferStatus::NotReady.into(),
                contents: None,
            },
            Reply::NotOwner { owner } => return Err(not_owner(by, owner, config_num, shard)),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let by = caller_group(self.rsm.guard().allow(&request, "delete shards", |role| {
            matches!(role, crate::security::Role::Shard(_))
        })?);
        let pb::ShardRef { config_num, shard } = shard_ref(request.into_inner().shard)?;
        match self.settled(config_num, shard, by)? {
            Some(Settled::Absent) => {
                return Ok(Response::new(pb::DeleteResponse {
                    status: pb::TransferStatus::Ok.into(),
                }))
            }
            Some(Settled::NotOwner(_)) | None => {}
        }
        let request = DeleteRequest { config_num, shard };
        // Internal commands carry no session (client 0): the machine's own checks make them idempotent.
        let status = match self
            .rsm
            .mutate(
                0,
                crate::rsm::internal_seq(),
                0,
                migration::delete_command(&request, by),
            )
            .await
        {
            Ok(output) => match migration::delete_reply(output)
                .map_err(|e| Status::internal(e.to_string()))?
            {
                Reply::Ok(()) => {
                    info!(config_num, shard, "deleted the copy of a given-away shard");
                    pb::TransferStatus::Ok
                }
                Reply::NotReady => pb::TransferStatus::NotReady,
                Reply::NotOwner { owner } => return Err(not_owner(by, owner, config_num, shard)),
            },
            Err(refusal) => refused(refusal)?,
        };
        Ok(Response::new(pb::DeleteResponse {
            status: status.into(),
        }))
    }
}
