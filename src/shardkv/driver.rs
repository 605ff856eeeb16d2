//! The shard group's background worker: what makes a group move through configurations, fetch the
//! shards it gains and let the old owners delete what they gave away.
//!
//! Why it is this simple: the replicated [`ShardKv`] already knows what has to happen next
//! ([`ShardKv::duties`]), and every command it takes is idempotent (it checks configuration numbers and
//! shard states itself). So the driver keeps no state of its own: every ~100 ms, if this replica leads,
//! it reads the duties, does each one concurrently (one request to the controller or another group,
//! with a short timeout) and proposes what the answer calls for. A duty that fails is simply found
//! again next round; a new leader finds the same duties in its replica. Rounds follow each other without
//! pause while they make progress, so a chain of configurations, many shards or a shard of many pages
//! (each `Install` advances a replicated cursor; the next duty asks for the page after it) move quickly.
//!
//! Followers do nothing: only a leader's proposals can commit, and duplicates from a deposed leader are
//! harmless anyway (the machine ignores them).

use super::service::MAX_TRANSFER_BYTES;
use super::state::{page_from_proto, Duty, ShardCommand, ShardKv, ShardOutput, Source};
use crate::ctrler::{CtrlerClerk, Gid};
use crate::proto::shardkv as pb;
use crate::proto::shardkv::shard_transfer_client::ShardTransferClient;
use crate::raft::{NodeId, Role};
use crate::rsm::client::{channel, ClerkConfig, ClerkError};
use crate::rsm::service::{Refusal, RsmService};
use crate::shardkv::last_owner;
use futures::future::join_all;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tonic::transport::Channel;
use tracing::{debug, info, info_span, warn, Instrument};

/// How the driver behaves; the daemon fills it from its flags.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The shard controllers (`host:port`).
    pub ctrlers: Vec<String>,
    /// Pause between rounds that made no progress. Short enough that a configuration change starts
    /// moving shards promptly; the cost when nothing is due is one controller query per round.
    pub interval: Duration,
    /// Deadline of one request to the controller or to one server of another group.
    pub attempt_timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            ctrlers: Vec::new(),
            interval: Duration::from_millis(100),
            attempt_timeout: Duration::from_millis(1000),
        }
    }
}

/// Most back-to-back rounds before the driver pauses for one interval anyway (a bound, so a bug that
/// keeps "progressing" cannot spin a core).
const MAX_ROUNDS_WITHOUT_PAUSE: usize = 64;

/// Start the driver of group `gid`'s replica `node`. Fails only if a controller address is unusable.
/// The task runs until aborted (the server aborts it when it stops).
pub fn spawn(
    gid: Gid,
    node: NodeId,
    rsm: RsmService<ShardKv>,
    config: DriverConfig,
) -> Result<JoinHandle<()>, ClerkError> {
    let clerk_config = ClerkConfig {
        call_timeout: config.attempt_timeout,
        attempt_timeout: config.attempt_timeout,
        connect_timeout: config.attempt_timeout,
        ..ClerkConfig::default()
    };
    let ctrler = CtrlerClerk::new(&config.ctrlers, clerk_config.clone())?;
    let driver = Driver {
        rsm,
        ctrler: tokio::sync::Mutex::new(ctrler),
        channels: Mutex::new(HashMap::new()),
        leaders: Mutex::new(HashMap::new()),
        deleting: AtomicBool::new(false),
        clerk_config,
        config,
    };
    let span = info_span!("driver", gid, node);
    Ok(tokio::spawn(Arc::new(driver).run().instrument(span)))
}

struct Driver {
    rsm: RsmService<ShardKv>,
    /// One controller clerk (it allows one request at a time; there is one FetchConfig per round).
    ctrler: tokio::sync::Mutex<CtrlerClerk>,
    /// A lazily connected channel per server of another group, reused across rounds.
    channels: Mutex<HashMap<String, Channel>>,
    /// The index (in its server list) of the server of each group that last answered.
    leaders: Mutex<HashMap<Gid, usize>>,
    /// A sweep of delete duties is running.
    deleting: AtomicBool,
    clerk_config: ClerkConfig,
    config: DriverConfig,
}

/// What asking another group achieved.
enum Asked<T> {
    /// Its leader answered OK with this.
    Ok(T),
    /// Its leader answered NOT_READY: ask again later.
    NotReady,
    /// No server answered as leader.
    NoLeader(String),
}

impl Driver {
    async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_config = self.rsm.with_machine(|m| m.config().num);
        loop {
            ticker.tick().await;
            for _ in 0..MAX_ROUNDS_WITHOUT_PAUSE {
                if self.rsm.handle().status().raft.role != Role::Leader {
                    break;
                }
                let duties = self.rsm.with_machine(ShardKv::duties);
                // Deletes run on their own: an old owner that is gone for good (decommissioned after
                // leaving) must not slow every pull and configuration step behind its timeouts.
                let (deletes, duties): (Vec<Duty>, Vec<Duty>) = duties
                    .into_iter()
                    .partition(|d| matches!(d, Duty::Delete { .. }));
                if !deletes.is_empty() && !self.deleting.swap(true, Ordering::AcqRel) {
                    let driver = self.clone();
                    tokio::spawn(
                        async move {
                            join_all(deletes.into_iter().map(|duty| driver.perform(duty))).await;
                            driver.deleting.store(false, Ordering::Release);
                        }
                        .in_current_span(),
                    );
                }
                let progress = join_all(duties.into_iter().map(|duty| self.perform(duty))).await;
                let (num, serving, pulling) = self
                    .rsm
                    .with_machine(|m| (m.config().num, m.serving(), m.pulling()));
                if num != last_config {
                    info!(
                        config = num,
                        ?serving,
                        ?pulling,
                        "moved to a new configuration"
                    );
                    last_config = num;
                }
                if !progress.into_iter().any(|p| p) {
                    break;
                }
            }
        }
    }

    /// Do one duty; true if it changed the group's state.
    async fn perform(&self, duty: Duty) -> bool {
        match duty {
            Duty::FetchConfig { num } => {
                let fetched = self.ctrler.lock().await.query(Some(num)).await;
                match fetched {
                    Ok(config) if config.num == num => {
                        self.propose(ShardCommand::NextConfig(config)).await
                    }
                    Ok(_) => false,
                    Err(e) => {
                        debug!(config = num, error = %e, "cannot reach the controllers");
                        false
                    }
                }
            }
            Duty::FindOwner { shard, before } => {
                // Every group had left: look back through the controller's history (newest first) for
                // the last group that owned the shard.
                let mut history = Vec::new();
                let mut ctrler = self.ctrler.lock().await;
                for num in (1..before).rev() {
                    match ctrler.query(Some(num)).await {
                        Ok(config) if config.num == num => {
                            let owned = config.shards.get(shard as usize).is_some_and(|&g| g != 0);
                            history.insert(0, config);
                            if owned {
                                break;
                            }
                        }
                        Ok(_) => return false,
                        Err(e) => {
                            debug!(config = num, error = %e, "cannot reach the controllers");
                            return false;
                        }
                    }
                }
                drop(ctrler);
                let found = last_owner(shard, &history);
                info!(shard, owner = ?found.as_ref().map(|(_, s)| s.gid), "found where an orphaned shard is frozen");
                let (config_num, source) = match found {
                    Some((config_num, source)) => (config_num, Some(source)),
                    None => (0, None),
                };
                self.propose(ShardCommand::Adopt {
                    shard,
                    config_num,
                    source,
                })
                .await
            }
            Duty::Pull {
                config_num,
                shard,
                after,
                from,
            } => {
                let request = pb::PullRequest {
                    shard: Some(pb::ShardRef { config_num, shard }),
                    after: after.clone(),
                };
                let asked = self
                    .ask(&from, |mut client| {
                        let request = request.clone();
                        async move {
                            let response = client.pull(request).await?.into_inner();
                            Ok((response.status(), response.contents))
                        }
                    })
                    .await;
                match asked {
                    Asked::Ok(Some(contents)) => {
                        let page = page_from_proto(contents);
                        if (page.config_num, page.shard, &page.after) != (config_num, shard, &after)
                        {
                            warn!(
                                config_num,
                                shard,
                                from = from.gid,
                                got_config = page.config_num,
                                got_shard = page.shard,
                                "group answered a pull with another page; ignoring it"
                            );
                            return false;
                        }
                        let (keys, last) = (page.data.len(), page.last);
                        let installed = self.propose(ShardCommand::Install(page)).await;
                        if installed && last {
                            info!(config_num, shard, from = from.gid, "shard installed");
                        } else if installed {
                            debug!(
                                config_num,
                                shard,
                                from = from.gid,
                                keys,
                                "shard page installed"
                            );
                        }
                        installed
                    }
                    Asked::Ok(None) => {
                        warn!(
                            config_num,
                            shard,
                            from = from.gid,
                            "pull answered OK without data"
                        );
                        false
                    }
                    Asked::NotReady => false,
                    Asked::NoLeader(error) => {
                        debug!(config_num, shard, from = from.gid, %error, "pull failed");
                        false
                    }
                }
            }
            Duty::Delete {
                config_num,
                shard,
                to,
            } => {
                let request = pb::DeleteRequest {
                    shard: Some(pb::ShardRef { config_num, shard }),
                };
                let asked = self
                    .ask(&to, |mut client| async move {
                        let response = client.delete(request).await?.into_inner();
                        Ok((response.status(), ()))
                    })
                    .await;
                match asked {
                    Asked::Ok(()) => {
                        let confirmed = self
                            .propose(ShardCommand::Confirmed { config_num, shard })
                            .await;
                        if confirmed {
                            info!(config_num, shard, to = to.gid, "old owner deleted its copy");
                        }
                        confirmed
                    }
                    Asked::NotReady => false,
                    Asked::NoLeader(error) => {
                        debug!(config_num, shard, to = to.gid, %error, "delete failed");
                        false
                    }
                }
            }
        }
    }

    /// Propose an internal command; true if it applied (the machine ignores what is stale or early).
    async fn propose(&self, command: ShardCommand) -> bool {
        match self
            .rsm
            .mutate(0, crate::rsm::internal_seq(), command)
            .await
        {
            Ok(ShardOutput::Ignored | ShardOutput::NotReady) => false,
            Ok(_) => true,
            Err(Refusal::WrongLeader(_)) => false,
            Err(Refusal::Timeout) => {
                debug!("internal proposal timed out");
                false
            }
            Err(Refusal::Status(status)) => {
                warn!(error = %status.message(), "internal proposal failed");
                false
            }
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, ClerkError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let new = channel(address, &self.clerk_config)?;
        channels.insert(address.to_string(), new.clone());
        Ok(new)
    }

    /// Ask `group` (starting at the server that last answered it, then each other server once) until
    /// its leader answers OK or NOT_READY.
    async fn ask<T, F, Fut>(&self, group: &Source, call: F) -> Asked<T>
    where
        F: Fn(ShardTransferClient<Channel>) -> Fut,
        Fut: Future<Output = Result<(pb::TransferStatus, T), tonic::Status>>,
    {
        // A group that rejoined since may listen elsewhere now: prefer its servers in the current
        // configuration to the ones recorded when the shard moved.
        let servers = self
            .rsm
            .with_machine(|m| m.config().groups.get(&group.gid).cloned())
            .filter(|servers| !servers.is_empty())
            .unwrap_or_else(|| group.servers.clone());
        let count = servers.len();
        if count == 0 {
            return Asked::NoLeader(format!("group {} has no servers listed", group.gid));
        }
        let first = self
            .leaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group.gid)
            .copied()
            .unwrap_or(0);
        let mut last_error = String::new();
        for i in (0..count).map(|k| (first + k) % count) {
            let address = &servers[i];
            let client = match self.channel(address) {
                Ok(channel) => ShardTransferClient::new(channel)
                    .max_decoding_message_size(MAX_TRANSFER_BYTES)
                    .max_encoding_message_size(MAX_TRANSFER_BYTES),
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            let status = match tokio::time::timeout(self.config.attempt_timeout, call(client)).await
            {
                Ok(Ok((status, value))) => match status {
                    pb::TransferStatus::Ok => Some(Asked::Ok(value)),
                    pb::TransferStatus::NotReady => Some(Asked::NotReady),
                    pb::TransferStatus::WrongLeader => None,
                },
                Ok(Err(status)) => {
                    last_error = format!("{address}: {}", status.message());
                    None
                }
                Err(_) => {
                    last_error = format!("{address}: no answer");
                    None
                }
            };
            if let Some(asked) = status {
                self.leaders
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(group.gid, i);
                return asked;
            }
        }
        Asked::NoLeader(if last_error.is_empty() {
            "no server is the leader".into()
        } else {
            last_error
        })
    }
}
