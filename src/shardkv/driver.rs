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
//! (each `Install` advances a replicated cursor through the keys, then the dedup records; the next duty
//! asks for the page after it) move quickly.
//!
//! What to ask and what to propose with the answer is [`migration`]'s, shared with the simulator; this
//! file is the IO: the controller clerk, the groups' servers (one [`Replicas`] per group, the same
//! leader-finding every clerk uses) and the proposals.
//!
//! Followers do nothing: only a leader's proposals can commit, and duplicates from a deposed leader are
//! harmless anyway (the machine ignores them).

use super::migration::{self, Answer, Mismatch, Reply, Request};
use super::service::MAX_TRANSFER_BYTES;
use super::state::{Duty, ShardCommand, ShardKv, ShardOutput, Source};
use super::wire::{cursor_to_proto, page_from_proto};
use crate::ctrler::addresses::peer_addresses;
use crate::ctrler::{CtrlerClerk, Fetched, Gid};
use crate::proto::shardkv as pb;
use crate::proto::shardkv::shard_transfer_client::ShardTransferClient;
use crate::raft::{NodeId, Role};
use crate::rsm::client::{status_attempt, Attempt, ClerkConfig, ClerkError, Replicas};
use crate::rsm::service::{Refusal, RsmService};
use crate::security::ClientChannel;
use futures::future::join_all;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
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
    /// Plaintext or mutual TLS to the controllers and other groups.
    pub security: crate::security::Security,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            ctrlers: Vec::new(),
            interval: Duration::from_millis(100),
            attempt_timeout: Duration::from_millis(1000),
            security: crate::security::Security::Insecure,
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
        // Room for one attempt at each server of a group of three.
        call_timeout: config.attempt_timeout * 3,
        attempt_timeout: config.attempt_timeout,
        connect_timeout: config.attempt_timeout,
        security: config.security.clone(),
        ..ClerkConfig::default()
    };
    let ctrler = CtrlerClerk::new(&config.ctrlers, clerk_config.clone())?;
    let driver = Driver {
        rsm,
        ctrler: tokio::sync::Mutex::new(ctrler),
        groups: Mutex::new(HashMap::new()),
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
    /// The servers of each other group this one talks to, with the leader each last found.
    groups: Mutex<HashMap<Gid, Replicas>>,
    /// A sweep of delete duties is running.
    deleting: AtomicBool,
    clerk_config: ClerkConfig,
    config: DriverConfig,
}

impl Driver {
    async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_config = self.rsm.with_machine(|m| m.config().num);
        // The configuration last reported to the controllers (none yet: report once on leading).
        let mut reported: Option<u64> = None;
        loop {
            ticker.tick().await;
            if self.rsm.handle().status().raft.role == Role::Leader {
                let num = self.rsm.with_machine(|m| m.config().num);
                if reported != Some(num) && self.report_progress(num).await {
                    reported = Some(num);
                }
            } else {
                reported = None;
            }
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
    ///
    /// Refusals (another group owns the shard, PERMISSION_DENIED) are logged and the duty stays: the
    /// state that made it a duty is replicated, so only a fixed configuration or certificate ends it.
    async fn perform(&self, duty: Duty) -> bool {
        let answer = match migration::request(&duty) {
            Request::Config { num } => self.next_config(num).await.map(Some),
            Request::History { shard, before } => self
                .history(shard, before)
                .await
                .map(|h| Some(Answer::History(h))),
            Request::Pull { from, request } => {
                let (after, after_sessions) = cursor_to_proto(&request.after);
                let request = pb::PullRequest {
                    shard: Some(pb::ShardRef {
                        config_num: request.config_num,
                        shard: request.shard,
                    }),
                    after,
                    after_sessions,
                    session_pages: request.session_pages,
                };
                self.ask(&from, move |mut client| {
                    let request = request.clone();
                    async move {
                        let response = client.pull(request).await?.into_inner();
                        Ok((response.status(), response.contents))
                    }
                })
                .await
                .and_then(|reply| match reply {
                    Reply::Ok(Some(contents)) => Ok(Some(Answer::Page(page_from_proto(contents)))),
                    Reply::Ok(None) => Err("pull answered OK without data".into()),
                    Reply::NotReady => Ok(None),
                    Reply::NotOwner { owner } => Err(not_ours(owner)),
                })
            }
            Request::Delete { to, request } => {
                let request = pb::DeleteRequest {
                    shard: Some(pb::ShardRef {
                        config_num: request.config_num,
                        shard: request.shard,
                    }),
                };
                self.ask(&to, move |mut client| async move {
                    let response = client.delete(request).await?.into_inner();
                    Ok((response.status(), ()))
                })
                .await
                .and_then(|reply| match reply {
                    Reply::Ok(()) => Ok(Some(Answer::Deleted)),
                    Reply::NotReady => Ok(None),
                    Reply::NotOwner { owner } => Err(not_ours(owner)),
                })
            }
        };
        let answer = match answer {
            Ok(Some(answer)) => answer,
            Ok(None) => return false, // not ready: ask again next round
            Err(error) => {
                debug!(?duty, %error, "duty failed");
                return false;
            }
        };
        let command = match self
            .rsm
            .with_machine(|machine| migration::command(machine, &duty, answer))
        {
            Ok(command) => command,
            // The usual answer while no newer configuration exists: the latest one.
            Err(Mismatch::Config { .. }) => return false,
            Err(mismatch) => {
                // Paced: a lasting mismatch (another shard count) comes back every round.
                static LINES: crate::pacer::LinePacer =
                    crate::pacer::LinePacer::new(std::time::Duration::from_secs(10));
                if let Some(unlogged) = LINES.admit() {
                    warn!(?duty, %mismatch, unlogged, "answer refused");
                }
                return false;
            }
        };
        let summary = describe(&command);
        let applied = self.propose(command).await;
        if applied {
            match summary {
                Some(what) => info!(?duty, "{what}"),
                None => debug!(?duty, "applied"),
            }
        }
        applied
    }

    /// Configuration `num` from the controllers, or if they dropped it, the oldest they keep (a group
    /// that owns nothing may jump there, see [`ShardKv::can_jump_to`]).
    async fn next_config(&self, num: u64) -> Result<Answer, String> {
        let mut ctrler = self.ctrler.lock().await;
        let fetched = ctrler
            .fetch(Some(num))
            .await
            .map_err(|e| format!("cannot reach the controllers: {e}"))?;
        match fetched {
            Fetched::Config(config) => Ok(Answer::Config(config)),
            Fetched::Compacted { oldest } => {
                let config = ctrler
                    .query(Some(oldest))
                    .await
                    .map_err(|e| format!("cannot reach the controllers: {e}"))?;
                Ok(Answer::Compacted(config))
            }
        }
    }

    /// Tell the controllers the group has reached configuration `num`, so they may drop what it no
    /// longer needs. True once they have recorded it.
    async fn report_progress(&self, num: u64) -> bool {
        let gid = self.rsm.with_machine(|m| m.gid());
        match self.ctrler.lock().await.report_progress(gid, num).await {
            Ok(oldest) => {
                debug!(config = num, oldest_kept = oldest, "progress reported");
                true
            }
            Err(error) => {
                debug!(config = num, %error, "progress not reported");
                false
            }
        }
    }

    /// Configuration `num` from the controllers.
    async fn config(&self, num: u64) -> Result<crate::ctrler::Config, String> {
        let config = self
            .ctrler
            .lock()
            .await
            .query(Some(num))
            .await
            .map_err(|e| format!("cannot reach the controllers: {e}"))?;
        Ok(config)
    }

    /// The controllers' history that [`migration::next_in_history`] asks for, newest first.
    async fn history(&self, shard: u64, before: u64) -> Result<Vec<crate::ctrler::Config>, String> {
        let mut read = Vec::new();
        while let Some(num) = migration::next_in_history(shard, before, &read) {
            let config = self.config(num).await?;
            if config.num != num {
                return Err(format!("asked for configuration {num}, got {}", config.num));
            }
            read.push(config);
        }
        Ok(read)
    }

    /// Propose an internal command; true if it applied (the machine ignores what is stale or early).
    async fn propose(&self, command: ShardCommand) -> bool {
        match self
            .rsm
            .mutate(0, crate::rsm::internal_seq(), 0, command)
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
            Err(Refusal::SessionExpired(_)) => {
                warn!("internal proposal answered SESSION_EXPIRED (it uses no session)");
                false
            }
        }
    }

    /// Ask `group`'s leader (found as every clerk finds one) until it answers OK or NOT_READY.
    async fn ask<T, F, Fut>(&self, group: &Source, call: F) -> Result<Reply<T>, String>
    where
        F: Fn(ShardTransferClient<ClientChannel>) -> Fut,
        Fut: Future<Output = Result<(pb::TransferStatus, T), tonic::Status>>,
    {
        // A group that rejoined since may listen elsewhere now: prefer its servers in the current
        // configuration to the ones recorded when the shard moved.
        let servers = self
            .rsm
            .with_machine(|m| m.config().groups.get(&group.gid).map(|s| peer_addresses(s)))
            .filter(|servers| !servers.is_empty())
            .unwrap_or_else(|| peer_addresses(&group.servers));
        let mut replicas = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            match groups.get(&group.gid) {
                Some(replicas) if replicas.starts_with(&servers) => replicas.clone(),
                _ => {
                    let role = crate::security::Role::Shard(group.gid);
                    let replicas = Replicas::of_role(&servers, self.clerk_config.clone(), role)
                        .map_err(|e| format!("group {}: {e}", group.gid))?;
                    groups.insert(group.gid, replicas.clone());
                    replicas
                }
            }
        };
        let attempt_timeout = self.config.attempt_timeout;
        let result = replicas
            .call(|channel, timeout| {
                let client = ShardTransferClient::new(channel)
                    .max_decoding_message_size(MAX_TRANSFER_BYTES)
                    .max_encoding_message_size(MAX_TRANSFER_BYTES);
                let call = call(client);
                async move {
                    match tokio::time::timeout(timeout.min(attempt_timeout), call).await {
                        Ok(Ok((pb::TransferStatus::Ok, value))) => {
                            Ok(Attempt::Done(Reply::Ok(value)))
                        }
                        Ok(Ok((pb::TransferStatus::NotReady, _))) => {
                            Ok(Attempt::Done(Reply::NotReady))
                        }
                        Ok(Ok((pb::TransferStatus::WrongLeader, _))) => {
                            Ok(Attempt::Elsewhere(None, "not the leader".into()))
                        }
                        Ok(Err(status)) => status_attempt(status),
                        Err(_) => Ok(Attempt::Silent("no answer".into())),
                    }
                }
            })
            .await;
        // Remember where the leader was found for the next request to this group.
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group.gid, replicas);
        result.map_err(|e| e.to_string())
    }
}

/// What an applied command is worth an info line for (`None`: a page, or a configuration step, which
/// the round loop reports with its shards; logged at debug).
fn describe(command: &ShardCommand) -> Option<&'static str> {
    match command {
        ShardCommand::Install(page) if !page.last => None,
        ShardCommand::Install(_) => Some("shard installed"),
        ShardCommand::Confirmed { .. } => Some("old owner deleted its copy"),
        ShardCommand::Adopt { .. } => Some("found where an orphaned shard is frozen"),
        ShardCommand::NextConfig(_) => None,
        _ => Some("applied"),
    }
}

/// A transfer the old owner refused because the shard is another group's.
fn not_ours(owner: crate::ctrler::Gid) -> String {
    format!("the old owner says the shard was given to group {owner}")
}
