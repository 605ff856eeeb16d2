//! The controller's client library: join, leave, move and query against a controller cluster, with the
//! leader chasing and retries of [`crate::rsm::client`] and exactly-once commands (client id, seq).

use super::state::{config_from_proto, Config, CtrlerCommand, Gid, ShardCtrler};
use crate::proto::ctrler as pb;
use crate::proto::ctrler::ctrler_client::CtrlerClient;
use crate::rsm::client::{
    new_client_id, status_attempt, Attempt, ClerkConfig, ClerkError, Replicas,
};
use crate::rsm::StateMachine;
use prost::Message as _;
use std::collections::BTreeMap;

/// A client of one controller cluster. One outstanding request per clerk (methods take `&mut self`).
pub struct CtrlerClerk {
    replicas: Replicas,
    client_id: u64,
    seq: u64,
}

impl CtrlerClerk {
    /// A clerk for the controllers at `addresses`.
    pub fn new(addresses: &[String], config: ClerkConfig) -> Result<CtrlerClerk, ClerkError> {
        Ok(CtrlerClerk {
            replicas: Replicas::of_role(addresses, config, crate::security::Role::Ctrler)?,
            client_id: new_client_id(),
            seq: 0,
        })
    }

    /// Add groups (gid → server addresses); returns the new configuration.
    pub async fn join(&mut self, groups: BTreeMap<Gid, Vec<String>>) -> Result<Config, ClerkError> {
        self.command(CtrlerCommand::Join(groups)).await
    }

    /// Remove groups; returns the new configuration.
    pub async fn leave(&mut self, gids: Vec<Gid>) -> Result<Config, ClerkError> {
        self.command(CtrlerCommand::Leave(gids)).await
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
        match reply {
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
        match self.send(command).await? {
            Reply::Oldest { oldest, .. } => Ok(oldest),
            Reply::Config(_) => Err(ClerkError::Invalid(
                "a progress report was answered with a configuration".into(),
            )),
        }
    }

    async fn command(&mut self, command: CtrlerCommand) -> Result<Config, ClerkError> {
        match self.send(command).await? {
            Reply::Config(config) => Ok(config),
            Reply::Oldest { .. } => Err(ClerkError::Invalid(
                "a configuration change was answered without a configuration".into(),
            )),
        }
    }

    async fn send(&mut self, command: CtrlerCommand) -> Result<Reply, ClerkError> {
        self.seq += 1;
        let encoded = ShardCtrler::encode_command(&command);
        let command = pb::Command::decode(encoded.as_ref())
            .map_err(|e| ClerkError::Invalid(e.to_string()))?;
        let request = pb::CommandRequest {
            client_id: self.client_id,
            seq: self.seq,
            command: Some(command),
        };
        self.replicas
            .call(move |channel, timeout| {
                let request = request.clone();
                async move {
                    let mut client = CtrlerClient::new(channel);
                    classify(tokio::time::timeout(timeout, client.command(request)).await)
                }
            })
            .await
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

fn classify(
    reply: Result<
        Result<tonic::Response<pb::ConfigResponse>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
) -> Result<Attempt<Reply>, ClerkError> {
    let response = match reply {
        Err(_) => return Ok(Attempt::Silent("attempt timed out".into())),
        Ok(Err(status)) => return status_attempt(status),
        Ok(Ok(response)) => response.into_inner(),
    };
    Ok(match pb::ErrorCode::try_from(response.error) {
        Ok(pb::ErrorCode::Ok) => match response.config {
            Some(config) => Attempt::Done(Reply::Config(config_from_proto(config))),
            None => Attempt::Done(Reply::Oldest {
                oldest: response.oldest_kept,
                compacted: false,
            }),
        },
        Ok(pb::ErrorCode::Compacted) => Attempt::Done(Reply::Oldest {
            oldest: response.oldest_kept,
            compacted: true,
        }),
        Ok(pb::ErrorCode::Refused) => return Err(ClerkError::Rejected(response.refusal)),
        Ok(pb::ErrorCode::WrongLeader) => Attempt::Elsewhere(
            (!response.leader_address.is_empty()).then_some(response.leader_address),
            "wrong leader".into(),
        ),
        Ok(pb::ErrorCode::Timeout) => Attempt::Elsewhere(None, "server timed out".into()),
        Err(_) => Attempt::Elsewhere(None, format!("unknown error code {}", response.error)),
    })
}
