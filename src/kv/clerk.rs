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
use super::validate::{validate_command, validate_key};
use crate::proto::kv as pb;
use crate::proto::kv::kv_client::KvClient;
use crate::rsm::client::{channel, status_attempt, Attempt, Replicas, Session};
pub use crate::rsm::client::{ClerkConfig, ClerkError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tonic::Code;

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
    /// The value did not match; nothing changed. The answer came from a dedup record (the request was
    /// retried) and the current value was too long to keep there
    /// ([`crate::limits::MAX_REMEMBERED_VALUE_BYTES`]): read it to see it.
    MismatchValueNotKept,
}

/// The key/value operations every clerk offers, built on its exactly-once `mutate`, so the plain and the
/// sharded clerk share one definition of what put, append, delete and compare-and-swap mean.
pub trait KvOps: Send {
    /// Apply `command` exactly once and return its outcome.
    fn mutate(
        &mut self,
        command: KvCommand,
    ) -> impl std::future::Future<Output = Result<pb::Outcome, ClerkError>> + Send;

    /// Set `key` to `value`.
    fn put(
        &mut self,
        key: &str,
        value: &str,
    ) -> impl std::future::Future<Output = Result<(), ClerkError>> + Send {
        let command = KvCommand::Put {
            key: key.into(),
            value: value.into(),
        };
        async move { self.mutate(command).await.map(|_| ()) }
    }

    /// Append `value` to `key` (an absent key counts as empty). Refused, with nothing appended, if the
    /// value would grow past [`super::validate::MAX_VALUE_BYTES`].
    fn append(
        &mut self,
        key: &str,
        value: &str,
    ) -> impl std::future::Future<Output = Result<(), ClerkError>> + Send {
        let command = KvCommand::Append {
            key: key.into(),
            value: value.into(),
        };
        let refused = format!(
            "appending {} bytes would make the value of {key:?} longer than the limit of {} \
             bytes; nothing was appended",
            value.len(),
            super::validate::MAX_VALUE_BYTES
        );
        async move {
            match self.mutate(command).await?.ok {
                true => Ok(()),
                false => Err(ClerkError::Rejected(refused)),
            }
        }
    }

    /// Remove `key`; returns whether it existed.
    fn delete(
        &mut self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<bool, ClerkError>> + Send {
        let command = KvCommand::Delete { key: key.into() };
        async move { self.mutate(command).await.map(|o| o.ok) }
    }

    /// Set `key` to `value` if its value is `expected` (`None`: if absent).
    fn cas(
        &mut self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> impl std::future::Future<Output = Result<CasOutcome, ClerkError>> + Send {
        let command = KvCommand::Cas {
            key: key.into(),
            expected: expected.map(str::to_string),
            value: value.into(),
        };
        async move {
            let outcome = self.mutate(command).await?;
            Ok(if outcome.ok {
                CasOutcome::Swapped
            } else if outcome.current_elided {
                CasOutcome::MismatchValueNotKept
            } else {
                CasOutcome::Mismatch {
                    current: outcome.current,
                }
            })
        }
    }
}

/// A client of one KV cluster. See the module documentation.
pub struct Clerk {
    replicas: Replicas,
    session: Session,
}

impl Clerk {
    /// A clerk for the servers at `addresses` (`host:port`, or full `http://` URLs). Connections are made
    /// lazily, so an unreachable server does not fail construction.
    pub fn new(addresses: &[String], config: ClerkConfig) -> Result<Clerk, ClerkError> {
        Ok(Clerk {
            replicas: Replicas::new(addresses, config)?,
            session: Session::default(),
        })
    }

    /// This clerk's session id.
    pub fn client_id(&self) -> u64 {
        self.session.client_id()
    }

    /// The value of `key`, `None` if absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClerkError> {
        validate_key(key)?;
        let request = pb::GetRequest {
            key: key.to_string(),
        };
        self.replicas
            .call_read(move |channel, timeout| {
                let mut client = KvClient::new(channel);
                let request = request.clone();
                async move {
                    let reply = tokio::time::timeout(timeout, client.get(request)).await;
                    Self::classify(reply, |r: pb::GetResponse| {
                        (r.error, r.leader_address, r.found.then_some(r.value))
                    })
                }
            })
            .await?
            .map_err(|_| ClerkError::Rejected("a read was answered SESSION_EXPIRED".into()))
    }

    /// Turn one RPC's result into done (`Ok`: served, `Err`: session expired) / try elsewhere / give up.
    /// A shard group's WRONG_GROUP is final here: this clerk has no controllers to ask who serves the key.
    fn classify<R, T>(
        reply: Result<Result<tonic::Response<R>, tonic::Status>, tokio::time::error::Elapsed>,
        parts: impl FnOnce(R) -> (i32, String, T),
    ) -> Result<Attempt<Result<T, T>>, ClerkError> {
        Ok(match classify_reply(reply, parts)? {
            Attempt::Done(Routed::Served(value)) => Attempt::Done(Ok(value)),
            Attempt::Done(Routed::SessionExpired(value)) => Attempt::Done(Err(value)),
            Attempt::Done(Routed::WrongGroup) => {
                return Err(ClerkError::Rejected(
                    "these servers are a shard group that does not serve this key; \
                     address the sharded cluster through its controllers (--ctrlers)"
                        .into(),
                ))
            }
            Attempt::Elsewhere(hint, why) => Attempt::Elsewhere(hint, why),
            Attempt::Unsure(why) => Attempt::Unsure(why),
            Attempt::Silent(why) => Attempt::Silent(why),
        })
    }
}

/// What a `Kv` server did with a request it answered as leader.
#[derive(Debug)]
pub enum Routed<T> {
    /// Served, with this result.
    Served(T),
    /// A shard group that does not serve the key's shard (now): ask the configuration's owner.
    WrongGroup,
    /// Not applied: the client's session expired (the response's fields, for its `min_client_id`).
    SessionExpired(T),
}

/// Turn one `Kv` RPC's result into served / wrong group / try another server / give up. Shared by the
/// KV clerk and the sharded clerk, so both read error codes and leader hints the same way.
pub fn classify_reply<R, T>(
    reply: Result<Result<tonic::Response<R>, tonic::Status>, tokio::time::error::Elapsed>,
    parts: impl FnOnce(R) -> (i32, String, T),
) -> Result<Attempt<Routed<T>>, ClerkError> {
    let response = match reply {
        Err(_) => return Ok(Attempt::Silent("attempt timed out".into())),
        Ok(Err(status)) => return status_attempt(status),
        Ok(Ok(response)) => response.into_inner(),
    };
    let (error, leader_address, value) = parts(response);
    Ok(match pb::ErrorCode::try_from(error) {
        Ok(pb::ErrorCode::Ok) => Attempt::Done(Routed::Served(value)),
        Ok(pb::ErrorCode::WrongLeader) => Attempt::Elsewhere(
            (!leader_address.is_empty()).then_some(leader_address),
            "wrong leader".into(),
        ),
        // Proposed, perhaps committed, not seen applied within the server's wait.
        Ok(pb::ErrorCode::Timeout) => Attempt::Unsure(
            "the server did not see it finish (it timed out, or lost leadership with it in flight)"
                .into(),
        ),
        Ok(pb::ErrorCode::WrongGroup) => Attempt::Done(Routed::WrongGroup),
        Ok(pb::ErrorCode::SessionExpired) => Attempt::Done(Routed::SessionExpired(value)),
        // A newer server's answer this client cannot read: it may have applied the command.
        Err(_) => Attempt::Unsure(format!("unknown error code {error}")),
    })
}

/// The parts of a `MutateResponse` a clerk uses once it was served: the outcome, and the id new
/// sessions must be above (after SESSION_EXPIRED).
pub fn mutate_parts(r: pb::MutateResponse) -> (i32, String, (pb::Outcome, u64)) {
    (
        r.error,
        r.leader_address,
        (r.outcome.unwrap_or_default(), r.min_client_id),
    )
}

/// One mutation under a clerk's session, however the clerk routes it: the request with the session's
/// next number, how many times it was sent, and what the final answer means for the session. Shared by
/// the KV clerk and the sharded clerk so both restart an expired session by the same rule.
pub struct Mutation {
    request: pb::MutateRequest,
    attempts: AtomicU32,
}

/// The answer a mutation ended with: `Ok` served, `Err` refused because the session expired (each with
/// the outcome and the `min_client_id` of the response).
pub type MutationAnswer = Result<(pb::Outcome, u64), (pb::Outcome, u64)>;

impl Mutation {
    /// `command` as the session's next mutation.
    pub fn next(session: &mut Session, command: &KvCommand) -> Self {
        let (client_id, seq) = session.next_command();
        Mutation {
            request: pb::MutateRequest {
                client_id,
                seq,
                command: Some(pb::Command::from(command)),
            },
            attempts: AtomicU32::new(0),
        }
    }

    /// Send it once over `channel`.
    pub fn send(
        &self,
        channel: crate::security::ClientChannel,
        timeout: Duration,
    ) -> impl std::future::Future<
        Output = Result<
            Result<tonic::Response<pb::MutateResponse>, tonic::Status>,
            tokio::time::error::Elapsed,
        >,
    > {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let mut client = KvClient::new(channel);
        let request = self.request.clone();
        async move { tokio::time::timeout(timeout, client.mutate(request)).await }
    }

    /// The outcome if served; `None` if the session expired and the mutation may simply be sent again
    /// under the new one (see [`Session::restart`]).
    pub fn finish(
        self,
        session: &mut Session,
        answer: MutationAnswer,
    ) -> Result<Option<pb::Outcome>, ClerkError> {
        match answer {
            Ok((outcome, _)) => Ok(Some(outcome)),
            Err((_, min_client_id)) => {
                session.restart(min_client_id, self.attempts.load(Ordering::Relaxed))?;
                Ok(None)
            }
        }
    }
}

impl KvOps for Clerk {
    async fn mutate(&mut self, command: KvCommand) -> Result<pb::Outcome, ClerkError> {
        validate_command(&command)?;
        let mut doubt = false;
        loop {
            let mutation = Mutation::next(&mut self.session, &command);
            let answer = self
                .replicas
                .call_command(&mut doubt, |channel, timeout| {
                    let reply = mutation.send(channel, timeout);
                    async move { Self::classify(reply.await, mutate_parts) }
                })
                .await?;
            if let Some(outcome) = mutation.finish(&mut self.session, answer)? {
                return Ok(outcome);
            }
        }
    }
}

/// Ask one node for its status (no retries: an operator wants to see which nodes are down).
pub async fn node_status(
    address: &str,
    timeout: Duration,
    security: &crate::security::Security,
) -> Result<pb::StatusResponse, ClerkError> {
    let config = ClerkConfig {
        connect_timeout: timeout,
        security: security.clone(),
        ..ClerkConfig::default()
    };
    let mut client = KvClient::new(channel(address, &config)?);
    match tokio::time::timeout(timeout, client.status(pb::StatusRequest {})).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) if crate::security::is_tls_failure(&status) => {
            Err(ClerkError::Tls(format!(
                "{address}: {}",
                crate::security::describe_tls_failure(&status)
            )))
        }
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
    use tokio::time::Instant;

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
