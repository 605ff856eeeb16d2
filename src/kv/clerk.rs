//! The client library (the lab's "Clerk"): linearizable get/put/append/delete/cas against a KV cluster.
//!
//! Why it does what it does:
//! - it **caches the leader** (the index of the server that last answered), so a steady-state request is
//!   one RPC;
//! - it **follows hints**: a `WRONG_LEADER` answer names the leader's address when the follower knows it;
//! - it **retries** on timeouts, wrong leaders and unreachable servers, moving to the next server and
//!   backing off exponentially after every full round without success, until the per-call deadline;
//! - it tags each mutation with (client id, sequence number) and **keeps the number across retries**, so
//!   the service's session table applies a retried mutation exactly once. The id is random; the number
//!   counts 1, 2, ... Methods take `&mut self` because the service allows one outstanding request per
//!   client id: use one `Clerk` per concurrent caller.

use super::state::KvCommand;
use super::validate::{validate_command, validate_key, InvalidInput};
use crate::proto::kv as pb;
use crate::proto::kv::kv_client::KvClient;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How hard a clerk tries.
#[derive(Clone, Debug)]
pub struct ClerkConfig {
    /// Overall deadline of one call, retries included. After it, a mutation's fate is unknown.
    pub call_timeout: Duration,
    /// Deadline of one RPC attempt (the server answers `TIMEOUT` itself after its request timeout, so
    /// this only guards against a server that stopped answering).
    pub attempt_timeout: Duration,
    /// Timeout of a TCP + HTTP/2 connection attempt.
    pub connect_timeout: Duration,
    /// First backoff after a full round of failures; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
}

impl Default for ClerkConfig {
    fn default() -> Self {
        ClerkConfig {
            call_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClerkError {
    /// The request itself is unacceptable; retrying cannot help.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    /// A server address cannot be used.
    #[error("invalid server address {address:?}: {detail}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        detail: String,
    },
    /// No server addresses were given.
    #[error("no servers given")]
    NoServers,
    /// The call's deadline passed. For a mutation it may or may not have been applied.
    #[error("no answer within {timeout:?} (last error: {last_error})")]
    Timeout {
        /// The deadline that passed.
        timeout: Duration,
        /// What the last attempt saw.
        last_error: String,
    },
    /// The server could not be reached.
    #[error("cannot reach {address}: {detail}")]
    Unreachable {
        /// The server.
        address: String,
        /// What the transport said.
        detail: String,
    },
    /// A server refused the request for a reason retrying cannot fix.
    #[error("server refused the request: {0}")]
    Rejected(String),
}

/// The result of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The value matched and was replaced.
    Swapped,
    /// The value did not match; nothing changed. `current` is the value found (`None`: absent).
    Mismatch {
        /// The value found.
        current: Option<String>,
    },
}

/// Most servers a clerk will remember (given ones plus those learned from hints).
const MAX_SERVERS: usize = 64;

struct Server {
    address: String,
    client: KvClient<Channel>,
}

/// A client of one KV cluster. See the module documentation.
pub struct Clerk {
    servers: Vec<Server>,
    leader: usize,
    /// Where the round-robin over servers stands, kept apart from hint jumps so that an unreachable
    /// hinted address (e.g. a container-internal name seen from outside) cannot trap the clerk in a loop.
    rotation: usize,
    client_id: u64,
    seq: u64,
    config: ClerkConfig,
}

/// What one attempt learned.
enum Attempt<T> {
    Done(T),
    /// Try this server next (a hint), or the next one in order.
    Elsewhere(Option<String>, String),
}

impl Clerk {
    /// A clerk for the servers at `addresses` (`host:port`, or full `http://` URLs). Connections are made
    /// lazily, so an unreachable server does not fail construction.
    pub fn new(addresses: &[String], config: ClerkConfig) -> Result<Clerk, ClerkError> {
        if addresses.is_empty() {
            return Err(ClerkError::NoServers);
        }
        let mut servers = Vec::with_capacity(addresses.len());
        for address in addresses {
            servers.push(Self::connect(address, &config)?);
        }
        let mut client_id: u64 = rand::random();
        while client_id == 0 {
            client_id = rand::random();
        }
        Ok(Clerk {
            servers,
            leader: 0,
            rotation: 0,
            client_id,
            seq: 0,
            config,
        })
    }

    fn connect(address: &str, config: &ClerkConfig) -> Result<Server, ClerkError> {
        let url = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|e| ClerkError::Address {
                address: address.to_string(),
                detail: e.to_string(),
            })?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true);
        Ok(Server {
            address: address.to_string(),
            client: KvClient::new(endpoint.connect_lazy()),
        })
    }

    /// This clerk's session id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The value of `key`, `None` if absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClerkError> {
        validate_key(key)?;
        let request = pb::GetRequest {
            key: key.to_string(),
        };
        self.call(move |mut client, timeout| {
            let request = request.clone();
            async move {
                let reply = tokio::time::timeout(timeout, client.get(request)).await;
                Self::classify(reply, |r: pb::GetResponse| {
                    (r.error, r.leader_address, r.found.then_some(r.value))
                })
            }
        })
        .await
    }

    /// Set `key` to `value`.
    pub async fn put(&mut self, key: &str, value: &str) -> Result<(), ClerkError> {
        self.mutate(KvCommand::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
        .map(|_| ())
    }

    /// Append `value` to `key` (an absent key counts as empty).
    pub async fn append(&mut self, key: &str, value: &str) -> Result<(), ClerkError> {
        self.mutate(KvCommand::Append {
            key: key.into(),
            value: value.into(),
        })
        .await
        .map(|_| ())
    }

    /// Remove `key`; returns whether it existed.
    pub async fn delete(&mut self, key: &str) -> Result<bool, ClerkError> {
        self.mutate(KvCommand::Delete { key: key.into() })
            .await
            .map(|o| o.ok)
    }

    /// Set `key` to `value` if its value is `expected` (`None`: if absent).
    pub async fn cas(
        &mut self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<CasOutcome, ClerkError> {
        let outcome = self
            .mutate(KvCommand::Cas {
                key: key.into(),
                expected: expected.map(str::to_string),
                value: value.into(),
            })
            .await?;
        Ok(if outcome.ok {
            CasOutcome::Swapped
        } else {
            CasOutcome::Mismatch {
                current: outcome.current,
            }
        })
    }

    async fn mutate(&mut self, command: KvCommand) -> Result<pb::Outcome, ClerkError> {
        validate_command(&command)?;
        self.seq += 1;
        let request = pb::MutateRequest {
            client_id: self.client_id,
            seq: self.seq,
            command: Some(pb::Command::from(&command)),
        };
        self.call(move |mut client, timeout| {
            let request = request.clone();
            async move {
                let reply = tokio::time::timeout(timeout, client.mutate(request)).await;
                Self::classify(reply, |r: pb::MutateResponse| {
                    (r.error, r.leader_address, r.outcome.unwrap_or_default())
                })
            }
        })
        .await
    }

    /// Turn one RPC's result into done / try elsewhere / give up.
    fn classify<R, T>(
        reply: Result<Result<tonic::Response<R>, tonic::Status>, tokio::time::error::Elapsed>,
        parts: impl FnOnce(R) -> (i32, String, T),
    ) -> Result<Attempt<T>, ClerkError> {
        let response = match reply {
            Err(_) => return Ok(Attempt::Elsewhere(None, "attempt timed out".into())),
            Ok(Err(status)) => {
                return match status.code() {
                    Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
                        Err(ClerkError::Rejected(status.message().to_string()))
                    }
                    _ => Ok(Attempt::Elsewhere(
                        None,
                        format!("{:?}: {}", status.code(), status.message()),
                    )),
                }
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        let (error, leader_address, value) = parts(response);
        Ok(match pb::ErrorCode::try_from(error) {
            Ok(pb::ErrorCode::Ok) => Attempt::Done(value),
            Ok(pb::ErrorCode::WrongLeader) => Attempt::Elsewhere(
                (!leader_address.is_empty()).then_some(leader_address),
                "wrong leader".into(),
            ),
            Ok(pb::ErrorCode::Timeout) => Attempt::Elsewhere(None, "server timed out".into()),
            Err(_) => Attempt::Elsewhere(None, format!("unknown error code {error}")),
        })
    }

    /// Run `attempt` against the cached leader, then elsewhere, until it succeeds or the deadline passes.
    async fn call<T, F, Fut>(&mut self, attempt: F) -> Result<T, ClerkError>
    where
        F: Fn(KvClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        let deadline = Instant::now() + self.config.call_timeout;
        let mut backoff = self.config.min_backoff;
        let mut failures_this_round = 0;
        let mut failed_this_round: Vec<usize> = Vec::new();
        let mut last_error = String::from("no attempt made");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClerkError::Timeout {
                    timeout: self.config.call_timeout,
                    last_error,
                });
            }
            let timeout = self.config.attempt_timeout.min(deadline - now);
            let client = self.servers[self.leader].client.clone();
            match attempt(client, timeout).await? {
                Attempt::Done(value) => return Ok(value),
                Attempt::Elsewhere(hint, error) => {
                    last_error = format!("{}: {error}", self.servers[self.leader].address);
                    failures_this_round += 1;
                    failed_this_round.push(self.leader);
                    match hint.and_then(|h| self.server_index(&h)) {
                        Some(next) if !failed_this_round.contains(&next) => self.leader = next,
                        _ => {
                            self.rotation = (self.rotation + 1) % self.servers.len();
                            self.leader = self.rotation;
                        }
                    }
                    if failures_this_round >= self.servers.len() {
                        failures_this_round = 0;
                        failed_this_round.clear();
                        let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                        tokio::time::sleep(pause).await;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                }
            }
        }
    }

    /// The index of the server at `address`, added to the list if the cluster knows a server we did not
    /// (up to a bound, so a confused server cannot make the list grow without end).
    fn server_index(&mut self, address: &str) -> Option<usize> {
        if let Some(i) = self.servers.iter().position(|s| s.address == address) {
            return Some(i);
        }
        if self.servers.len() >= MAX_SERVERS {
            return None;
        }
        let server = Self::connect(address, &self.config).ok()?;
        self.servers.push(server);
        Some(self.servers.len() - 1)
    }
}

/// Ask one node for its status (no retries: an operator wants to see which nodes are down).
pub async fn node_status(
    address: &str,
    timeout: Duration,
) -> Result<pb::StatusResponse, ClerkError> {
    let config = ClerkConfig {
        connect_timeout: timeout,
        ..ClerkConfig::default()
    };
    let mut client = Clerk::connect(address, &config)?.client;
    match tokio::time::timeout(timeout, client.status(pb::StatusRequest {})).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) if status.code() == Code::Unavailable => Err(ClerkError::Unreachable {
            address: address.to_string(),
            detail: status.message().to_string(),
        }),
        Ok(Err(status)) => Err(ClerkError::Rejected(format!(
            "{address}: {:?}: {}",
            status.code(),
            status.message()
        ))),
        Err(_) => Err(ClerkError::Timeout {
            timeout,
            last_error: format!("{address} did not answer"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn construction_and_local_validation() {
        assert!(matches!(
            Clerk::new(&[], ClerkConfig::default()),
            Err(ClerkError::NoServers)
        ));
        assert!(matches!(
            Clerk::new(&["not an address".into()], ClerkConfig::default()),
            Err(ClerkError::Address { .. })
        ));
        let mut clerk =
            Clerk::new(&["127.0.0.1:1".into()], ClerkConfig::default()).expect("lazy connect");
        assert_ne!(clerk.client_id(), 0);
        // Invalid input fails before any network traffic (the server is unreachable anyway).
        assert!(matches!(clerk.get("").await, Err(ClerkError::Invalid(_))));
        assert!(matches!(
            clerk
                .put(
                    "k",
                    &"v".repeat(super::super::validate::MAX_VALUE_BYTES + 1)
                )
                .await,
            Err(ClerkError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_when_nothing_answers() {
        let config = ClerkConfig {
            call_timeout: Duration::from_millis(300),
            ..ClerkConfig::default()
        };
        let mut clerk = Clerk::new(&["127.0.0.1:1".into()], config).expect("clerk");
        let started = Instant::now();
        assert!(matches!(
            clerk.put("k", "v").await,
            Err(ClerkError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
