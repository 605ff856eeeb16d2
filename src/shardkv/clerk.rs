//! The client library of the sharded KV store: the same get/put/append/delete/cas as [`crate::kv::Clerk`],
//! addressed to the whole sharded cluster through its controllers.
//!
//! Why it does what it does:
//! - it **caches the latest configuration** from the controllers and sends each key to the group its
//!   shard ([`key_to_shard`]) belongs to, keeping one [`Replicas`] per group (so leader caching, hints
//!   and backoff work per group as in the KV clerk);
//! - it **refreshes the configuration** when a group answers `WRONG_GROUP`, when the shard has no group
//!   (gid 0) or the group is unknown, and when a group does not answer within one attempt window
//!   (the configuration may have moved the shard away from a group that is gone);
//! - it uses **one client id and one sequence number across all groups** and keeps the number when it
//!   retries a mutation at another group: the shard's dedup records move with the shard, so a mutation
//!   applied by the old owner just before the hand-over is recognised by the new owner as a retry and
//!   not applied twice. That is what exactly-once across migrations rests on;
//! - it gives up at the [`ClerkConfig::call_timeout`] deadline with the last error seen.

use super::key_to_shard;
use crate::ctrler::addresses::{client_addresses, AddressView};
use crate::ctrler::{Config, CtrlerClerk, Gid};
use crate::kv::clerk::{classify_reply, mutate_parts, Mutation, Routed};
use crate::kv::validate::{validate_command, validate_key};
use crate::kv::KvCommand;
use crate::kv::KvOps;
use crate::proto::kv as pb;
use crate::proto::kv::kv_client::KvClient;
use crate::rsm::client::{ClerkConfig, ClerkError, Replicas, Session};
use crate::security::ClientChannel;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// One group's servers as the configuration lists them, and the clerk's connection state for them.
struct Group {
    servers: Vec<String>,
    replicas: Replicas,
}

/// A client of a sharded KV cluster. Methods take `&mut self` (one outstanding request per client id,
/// as the groups' dedup records assume): use one `ShardClerk` per concurrent caller.
pub struct ShardClerk {
    ctrler: CtrlerClerk,
    config: Option<Config>,
    groups: HashMap<Gid, Group>,
    clerk_config: ClerkConfig,
    session: Session,
    view: AddressView,
}

/// Where a request went wrong in one try, and whether the configuration should be re-read.
enum Try<T> {
    Done(T),
    /// Not served; why.
    Again(String),
}

impl ShardClerk {
    /// A clerk for the cluster whose controllers are at `ctrlers` (`host:port`). Nothing is contacted
    /// until the first request.
    pub fn new(ctrlers: &[String], config: ClerkConfig) -> Result<ShardClerk, ClerkError> {
        Ok(ShardClerk {
            ctrler: CtrlerClerk::new(ctrlers, config.clone())?,
            config: None,
            groups: HashMap::new(),
            clerk_config: config,
            session: Session::default(),
            view: AddressView::default(),
        })
    }

    /// Reach the groups at the addresses `view` picks (default: the client addresses they advertise;
    /// [`AddressView::Internal`] for a clerk inside the cluster's network).
    pub fn with_address_view(mut self, view: AddressView) -> ShardClerk {
        self.view = view;
        self
    }

    /// This clerk's session id (the same at every group).
    pub fn client_id(&self) -> u64 {
        self.session.client_id()
    }

    /// The configuration the clerk last read, if any.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// The value of `key`, `None` if absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClerkError> {
        validate_key(key)?;
        let request = pb::GetRequest {
            key: key.to_string(),
        };
        self.route(key, true, move |channel, timeout| {
            let mut client = KvClient::new(channel);
            let request = request.clone();
            async move {
                let reply = tokio::time::timeout(timeout, client.get(request)).await;
                classify_reply(reply, |r: pb::GetResponse| {
                    (r.error, r.leader_address, r.found.then_some(r.value))
                })
            }
        })
        .await?
        .map_err(|_| ClerkError::Rejected("a read was answered SESSION_EXPIRED".into()))
    }

    /// Send a request for `key` to the group serving it until one serves it (`Ok`) or says the session
    /// expired (`Err`), or the deadline passes.
    /// `read`: a read, which [`ClerkConfig::read_anywhere`] sends to any replica of the group.
    async fn route<T, F, Fut>(
        &mut self,
        key: &str,
        read: bool,
        attempt: F,
    ) -> Result<Result<T, T>, ClerkError>
    where
        F: Fn(ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<
            Output = Result<crate::rsm::client::Attempt<Routed<T>>, ClerkError>,
        >,
    {
        let deadline = Instant::now() + self.clerk_config.call_timeout;
        let mut backoff = self.clerk_config.min_backoff;
        let mut last_error = String::from("no attempt made");
        let mut refresh = self.config.is_none();
        // Whether a group may have applied this mutation without saying so (the attempts of every
        // group tried count): a later final error is then in doubt.
        let mut doubt = false;
        loop {
            if Instant::now() >= deadline {
                return Err(ClerkError::Timeout {
                    timeout: self.clerk_config.call_timeout,
                    last_error,
                });
            }
            if refresh {
                let before = self.config.as_ref().map_or(0, |c| c.num);
                match tokio::time::timeout_at(deadline, self.ctrler.query(None)).await {
                    Ok(Ok(config)) => {
                        let moved_on = config.num != before;
                        self.config = Some(config);
                        if moved_on {
                            backoff = self.clerk_config.min_backoff;
                        }
                    }
                    Ok(Err(ClerkError::Timeout { last_error: e, .. })) => {
                        last_error = format!("controllers: {e}");
                        continue;
                    }
                    Ok(Err(e)) => return Err(e.in_doubt_if(doubt)),
                    Err(_) => continue,
                }
            }
            let tried = self
                .try_once(key, read, &attempt, deadline, &mut doubt)
                .await
                .map_err(|e| e.in_doubt_if(doubt))?;
            last_error = match tried {
                Try::Done(value) => return Ok(value),
                Try::Again(why) => why,
            };
            refresh = true;
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.clerk_config.max_backoff);
        }
    }

    /// One try at the group the cached configuration names for `key`. `doubt`: whether an attempt of
    /// this mutation may have been applied (see [`Replicas::call_command`]), kept across tries.
    async fn try_once<T, F, Fut>(
        &mut self,
        key: &str,
        read: bool,
        attempt: &F,
        deadline: Instant,
        doubt: &mut bool,
    ) -> Result<Try<Result<T, T>>, ClerkError>
    where
        F: Fn(ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<
            Output = Result<crate::rsm::client::Attempt<Routed<T>>, ClerkError>,
        >,
    {
        let Some(config) = &self.config else {
            return Ok(Try::Again("no configuration yet".into()));
        };
        let shard = key_to_shard(key, config.shards.len());
        let gid = config.shards.get(shard as usize).copied().unwrap_or(0);
        let servers = match config.groups.get(&gid) {
            Some(servers) if gid != 0 && !servers.is_empty() => {
                client_addresses(servers, self.view)
            }
            _ => {
                return Ok(Try::Again(format!(
                    "shard {shard} has no group in configuration {} (join a group with `kvctl ctrler join`)",
                    config.num
                )))
            }
        };
        let num = config.num;
        let group = match self.groups.get_mut(&gid) {
            Some(group) if group.servers == servers => group,
            _ => {
                let replicas = Replicas::of_role(
                    &servers,
                    ClerkConfig {
                        // One window per group and configuration: if the group does not serve within it,
                        // re-read the configuration (the shard may have moved from a group that is gone).
                        call_timeout: self.clerk_config.attempt_timeout,
                        ..self.clerk_config.clone()
                    },
                    crate::security::Role::Shard(gid),
                )?;
                self.groups
                    .entry(gid)
                    .insert_entry(Group { servers, replicas })
                    .into_mut()
            }
        };
        let call = async {
            if read {
                group.replicas.call_read(attempt).await
            } else {
                group.replicas.call_command(&mut *doubt, attempt).await
            }
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(Routed::Served(value))) => Ok(Try::Done(Ok(value))),
            Ok(Ok(Routed::SessionExpired(value))) => Ok(Try::Done(Err(value))),
            Ok(Ok(Routed::WrongGroup)) => Ok(Try::Again(format!(
                "group {gid} does not serve shard {shard} (configuration {num} says it does; it may be still receiving it)"
            ))),
            Ok(Err(ClerkError::Timeout { last_error, .. })) => Ok(Try::Again(format!(
                "group {gid}: {last_error}"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // Cut off mid-attempt: that attempt may have been delivered.
                *doubt |= !read;
                Ok(Try::Again(format!("group {gid} did not answer in time")))
            }
        }
    }
}

impl KvOps for ShardClerk {
    async fn mutate(&mut self, command: KvCommand) -> Result<pb::Outcome, ClerkError> {
        validate_command(&command)?;
        let key = command.key().to_string();
        loop {
            // One number per mutation, kept across every retry at every group.
            let mutation = Mutation::next(&mut self.session, &command);
            let answer = self
                .route(&key, false, |channel, timeout| {
                    let reply = mutation.send(channel, timeout);
                    async move { classify_reply(reply.await, mutate_parts) }
                })
                .await?;
            if let Some(outcome) = mutation.finish(&mut self.session, answer)? {
                return Ok(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn validates_locally_and_gives_up_at_the_deadline() {
        assert!(matches!(
            ShardClerk::new(&[], ClerkConfig::default()),
            Err(ClerkError::NoServers)
        ));
        let config = ClerkConfig {
            call_timeout: Duration::from_millis(300),
            ..ClerkConfig::default()
        };
        let mut clerk = ShardClerk::new(&["127.0.0.1:1".into()], config).expect("lazy connect");
        assert_ne!(clerk.client_id(), 0);
        assert!(matches!(clerk.get("").await, Err(ClerkError::Invalid(_))));
        let started = Instant::now();
        assert!(matches!(
            clerk.put("k", "v").await,
            Err(ClerkError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
