//! The controller's client library: join, leave, move and query against a controller cluster, with the
//! leader chasing and retries of [`crate::rsm::client`] and exactly-once commands (client id, seq).
//!
//! A shard group keeps one clerk for the life of its process and reports progress with it, perhaps
//! hours apart; meanwhile the controllers may drop its session (`--session-ttl`, `--max-sessions`). So
//! the clerk starts a new session when told SESSION_EXPIRED, as the KV clerk does.

use super::state::{config_from_proto, Config, CtrlerCommand, Gid, ShardCtrler};
use crate::proto::ctrler as pb;
use crate::proto::ctrler::ctrler_client::CtrlerClient;
use crate::rsm::client::{status_attempt, Attempt, ClerkConfig, ClerkError, Replicas, Session};
use crate::rsm::StateMachine;
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many new sessions one command may start before the clerk gives up: each is above the mark the
/// controllers named, so a second refusal means sessions are being dropped as fast as they are made
/// (far more clients than `--max-sessions`).
const MAX_SESSION_RESTARTS: u32 = 3;

/// A client of one controller cluster. One outstanding request per clerk (methods take `&mut self`).
pub struct CtrlerClerk {
    replicas: Replicas,
    session: Session,
}

impl CtrlerClerk {
    /// A clerk for the controllers at `addresses`.
    pub fn new(addresses: &[String], config: ClerkConfig) -> Result<CtrlerClerk, ClerkError> {
        Ok(CtrlerClerk {
            replicas: Replicas::of_role(addresses, config, crate::security::Role::Ctrler)?,
            session: Session::default(),
        })
    }

    /// Add groups (gid → server addresses); returns the new configuration.
    pub async fn join(&mut self, groups: BTreeMap<Gid, Vec<String>>) -> Result<Config, ClerkError> {
        self.command(CtrlerCommand::Join { groups, shards: 0 })
            .await
    }

    /// Remove groups; returns the new configuration.
    pub async fn leave(&mut self, gids: Vec<Gid>) -> Result<Config, ClerkError> {
        self.leave_with(gids, false).await
    }

    /// [`CtrlerClerk::leave`]; with `force`, past the controllers' check that each group took the
    /// shards it was given (see [`crate::ctrler::admission`]): for controllers run on their own, or
    /// a group that is gone for good.
    pub async fn leave_with(&mut self, gids: Vec<Gid>, force: bool) -> Result<Config, ClerkError> {
        self.command_with(CtrlerCommand::Leave(gids), force).await
    }

    /// Give `shard` to `gid`; returns the new configuration.
    pub async fn move_shard(&mut self, shard: u64, gid: Gid) -> Result<Config, ClerkError> {
        self.command(CtrlerCommand::Move { shard, gid }).await
    }

    /// Group `gid`'s servers are now `servers` (after a change of its Raft membership) — refused if
    /// `expected` is given and its servers are not those; returns the configuration that says so (the
    /// latest, if it already did).
    pub async fn set_servers(
        &mut self,
        gid: Gid,
        servers: Vec<String>,
        expected: Option<Vec<String>>,
    ) -> Result<Config, ClerkError> {
        self.command(CtrlerCommand::Servers {
            gid,
            servers,
            expected,
        })
        .await
    }

    /// Configuration `num`, or the latest for `None`. A configuration the controllers dropped is an
    /// error saying which is the oldest kept (see [`CtrlerClerk::fetch`] to act on it).
    pub async fn query(&mut self, num: Option<u64>) -> Result<Config, ClerkError> {
        match self.fetch(num).await? {
            Fetched::Config(config) => Ok(config),
            Fetched::Compacted { oldest } => Err(ClerkError::Rejected(format!(
                "configuration {} was dropped: no group needed it any more (the oldest kept is {oldest})",
                num.unwrap_or_default()
            ))),
        }
    }

    /// Configuration `num` (the latest for `None`), or the oldest one kept if `num` was dropped.
    pub async fn fetch(&mut self, num: Option<u64>) -> Result<Fetched, ClerkError> {
        let request = pb::QueryRequest {
            num: num.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1),
        };
        let reply = self
            .replicas
            .call(move |channel, timeout| async move {
                let mut client = CtrlerClient::new(channel);
                classify(tokio::time::timeout(timeout, client.query(request)).await)
            })
            .await?;
        match reply.served()? {
            Reply::Config(config) => Ok(Fetched::Config(config)),
            Reply::Oldest {
                oldest,
                compacted: true,
            } => Ok(Fetched::Compacted { oldest }),
            Reply::Oldest { .. } => Err(ClerkError::Invalid(
                "a query was answered without a configuration".into(),
            )),
        }
    }

    /// Tell the controllers group `gid` has reached configuration `num` (the group's leader does, once
    /// per configuration); returns the oldest configuration they keep.
    pub async fn report_progress(&mut self, gid: Gid, num: u64) -> Result<u64, ClerkError> {
        // `keep` is the controller's to fill in.
        let command = CtrlerCommand::Progress { gid, num, keep: 0 };
        match self.send(command, false).await? {
            Reply::Oldest { oldest, .. } => Ok(oldest),
            Reply::Config(_) => Err(ClerkError::Invalid(
                "a progress report was answered with a configuration".into(),
            )),
        }
    }

    async fn command(&mut self, command: CtrlerCommand) -> Result<Config, ClerkError> {
        self.command_with(command, false).await
    }

    /// [`CtrlerClerk::command`], past the admission checks with `force`.
    async fn command_with(
        &mut self,
        command: CtrlerCommand,
        force: bool,
    ) -> Result<Config, ClerkError> {
        match self.send(command, force).await? {
            Reply::Config(config) => Ok(config),
            Reply::Oldest { .. } => Err(ClerkError::Invalid(
                "a configuration change was answered without a configuration".into(),
            )),
        }
    }

    /// Apply `command` exactly once. If the controllers dropped the session, start a new one and send
    /// the command again — unless an earlier attempt may have applied it ([`ClerkError::SessionExpired`]).
    /// A progress report is sent again regardless: it only raises a maximum, so applying it twice is
    /// harmless, and a group's reports must not stop because its session expired.
    async fn send(&mut self, command: CtrlerCommand, force: bool) -> Result<Reply, ClerkError> {
        let encoded = ShardCtrler::encode_command(&command);
        let command_proto = pb::Command::decode(encoded.as_ref())
            .map_err(|e| ClerkError::Invalid(e.to_string()))?;
        let repeatable = matches!(command, CtrlerCommand::Progress { .. });
        let mut restarts = 0;
        let mut doubt = false;
        loop {
            let (client_id, seq) = self.session.next_command();
            let request = pb::CommandRequest {
                client_id,
                seq,
                command: Some(command_proto.clone()),
                restarts_sessions: true,
                force,
            };
            let attempts = AtomicU32::new(0);
            let answer = self
                .replicas
                .call_command(&mut doubt, |channel, timeout| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let request = request.clone();
                    async move {
                        let mut client = CtrlerClient::new(channel);
                        classify(tokio::time::timeout(timeout, client.command(request)).await)
                    }
                })
                .await?;
            let Answer::SessionExpired { min_client_id } = answer else {
                return answer.served();
            };
            restarts += 1;
            match self
                .session
                .restart(min_client_id, attempts.load(Ordering::Relaxed))
            {
                Ok(()) | Err(ClerkError::SessionExpired) if repeatable => {}
                Ok(()) => {}
                Err(error) => return Err(error),
            }
            if restarts > MAX_SESSION_RESTARTS {
                return Err(ClerkError::Rejected(format!(
                    "the controllers dropped {restarts} new sessions of this client in a row \
                     (more clients than --max-sessions?); the command was not applied by the last \
                     of them"
                )));
            }
        }
    }
}

/// What [`CtrlerClerk::fetch`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The configuration asked for (or the latest).
    Config(Config),
    /// The configuration asked for was dropped; `oldest` is the oldest the controllers keep.
    Compacted {
        /// The oldest configuration kept.
        oldest: u64,
    },
}

/// A successful answer of either RPC.
enum Reply {
    Config(Config),
    Oldest { oldest: u64, compacted: bool },
}

/// What the leader did with a request.
enum Answer {
    /// Served (or refused as compacted) with this reply.
    Served(Reply),
    /// Not applied: the session was dropped; new sessions must be above `min_client_id`.
    SessionExpired { min_client_id: u64 },
    /// Applied and refused by the controller's rules (say, joining a group already joined): a
    /// definite outcome, the same for every retry of the command.
    Refused(String),
}

impl Answer {
    /// The reply of a request that cannot be answered SESSION_EXPIRED (a query carries no session).
    fn served(self) -> Result<Reply, ClerkError> {
        match self {
            Answer::Served(reply) => Ok(reply),
            Answer::SessionExpired { .. } => Err(ClerkError::Invalid(
                "a request without a session was answered SESSION_EXPIRED".into(),
            )),
            Answer::Refused(why) => Err(ClerkError::Rejected(why)),
        }
    }
}

fn classify(
    reply: Result<
        Result<tonic::Response<pb::ConfigResponse>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
) -> Result<Attempt<Answer>, ClerkError> {
    let response = match reply {
        Err(_) => return Ok(Attempt::Silent("attempt timed out".into())),
        Ok(Err(status)) => return status_attempt(status),
        Ok(Ok(response)) => response.into_inner(),
    };
    Ok(match pb::ErrorCode::try_from(response.error) {
        Ok(pb::ErrorCode::Ok) => match response.config {
            Some(config) => Attempt::Done(Answer::Served(Reply::Config(config_from_proto(config)))),
            None => Attempt::Done(Answer::Served(Reply::Oldest {
                oldest: response.oldest_kept,
                compacted: false,
            })),
        },
        Ok(pb::ErrorCode::Compacted) => Attempt::Done(Answer::Served(Reply::Oldest {
            oldest: response.oldest_kept,
            compacted: true,
        })),
        Ok(pb::ErrorCode::SessionExpired) => Attempt::Done(Answer::SessionExpired {
            min_client_id: response.min_client_id,
        }),
        Ok(pb::ErrorCode::Refused) => Attempt::Done(Answer::Refused(response.refusal)),
        Ok(pb::ErrorCode::WrongLeader) => Attempt::Elsewhere(
            (!response.leader_address.is_empty()).then_some(response.leader_address),
            "wrong leader".into(),
        ),
        Ok(pb::ErrorCode::Timeout) => Attempt::Unsure(
            "the server did not see it finish (it timed out, or lost leadership with it in flight)"
                .into(),
        ),
        // A newer server's answer this client cannot read: it may have applied the command.
        Err(_) => Attempt::Unsure(format!("unknown error code {}", response.error)),
    })
}
