//! Talking to a replicated service from outside: the part of every clerk that is not about the
//! service's own requests.
//!
//! [`Replicas`] keeps the servers of one Raft group, **caches the leader** (the server that last answered),
//! **follows hints** (a wrong-leader answer may name the leader's address; an unknown one is added, up to a
//! bound), and **retries** on timeouts, wrong leaders and unreachable servers: the next server in a
//! round-robin kept apart from hint jumps (so an unreachable hinted address, e.g. a container-internal
//! name seen from outside, cannot trap it; a new hinted name must resolve within 300 ms, or it is
//! skipped for good), with exponential backoff after every full round, until the per-call deadline. Service clerks (KV, controller) add their requests and error codes on top.

use crate::security::Role;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

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
    /// Plaintext or mutual TLS (the servers' port must speak the same).
    pub security: crate::security::Security,
}

impl Default for ClerkConfig {
    fn default() -> Self {
        ClerkConfig {
            call_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            security: crate::security::Security::Insecure,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClerkError {
    /// The request itself is unacceptable; retrying cannot help.
    #[error("invalid request: {0}")]
    Invalid(String),
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
    /// The server does not let this identity do that (TLS on: the certificate's role is not enough).
    #[error("permission denied: {0}")]
    Denied(String),
    /// The TLS handshake failed: a certificate another CA signed, none at all, or plaintext against a
    /// TLS port (or the reverse). Retrying cannot fix it.
    #[error("TLS handshake with the server failed: {0}")]
    Tls(String),
    /// The clerk's session expired on the servers (idle past the TTL, or too many sessions) while it
    /// was retrying a mutation: an earlier attempt may have applied it, and the servers no longer
    /// remember. The clerk has started a new session; read before deciding to repeat the mutation.
    #[error(
        "the client session expired while retrying; the command may or may not have been applied \
         (the servers drop idle sessions: --session-ttl, --max-sessions)"
    )]
    SessionExpired,
}

/// A clerk's exactly-once session: its client id and the number of its latest mutation. Every mutation
/// takes the next number and keeps it across all its retries.
#[derive(Clone, Debug)]
pub struct Session {
    client_id: u64,
    seq: u64,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            client_id: new_client_id(),
            seq: 0,
        }
    }
}

impl Session {
    /// The session's client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// (client id, seq) for the next mutation.
    pub fn next_command(&mut self) -> (u64, u64) {
        self.seq += 1;
        (self.client_id, self.seq)
    }

    /// The servers dropped this session: start a new one with an id above `min_client_id`. Returns
    /// whether the mutation that was told so may simply be sent again under the new session — only if
    /// it had been sent exactly once (that one attempt was refused, not applied; see
    /// [`super::sessions`]). Otherwise the caller reports [`ClerkError::SessionExpired`].
    pub fn restart(&mut self, min_client_id: u64, attempts: u32) -> Result<(), ClerkError> {
        self.client_id =
            new_client_id().max(min_client_id.saturating_add(1 + rand::random::<u16>() as u64));
        self.seq = 0;
        if attempts <= 1 {
            Ok(())
        } else {
            Err(ClerkError::SessionExpired)
        }
    }
}

/// Most servers a clerk will remember (given ones plus those learned from hints).
const MAX_SERVERS: usize = 64;

/// How long a hinted address that is new to the clerk may take to resolve. A hint names the address
/// the cluster uses internally (`kv1:7001` in a container network), which from outside may not resolve
/// at all, or only after the resolver's own timeouts: better to go on round the servers the clerk was
/// given than to spend an attempt's deadline on it.
const HINT_RESOLVE_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Clone)]
struct Server {
    address: String,
    channel: Channel,
}

/// What one attempt learned.
pub enum Attempt<T> {
    /// Served.
    Done(T),
    /// Try this server next (a hint), or the next one in order.
    /// Not served here: try the hinted address (if any) or the next server; the text says why.
    Elsewhere(Option<String>, String),
}

/// The servers of one group and where a request should go next. See the module documentation.
///
/// Cloning is cheap (channels are shared): a caller that runs requests to one group concurrently can
/// work on a clone and keep the one that learned the leader.
#[derive(Clone)]
pub struct Replicas {
    servers: Vec<Server>,
    leader: usize,
    rotation: usize,
    config: ClerkConfig,
    /// The role the servers' certificates must have (`None`: any replica).
    role: Option<Role>,
    /// Hinted addresses that did not resolve here (at most [`MAX_SERVERS`]): not tried again.
    unresolvable: Vec<String>,
}

impl Replicas {
    /// Servers at `addresses` (`host:port` or URLs), any replica role. Connections are made lazily.
    pub fn new(addresses: &[String], config: ClerkConfig) -> Result<Replicas, ClerkError> {
        Self::with_role(addresses, config, None)
    }

    /// Servers at `addresses` whose certificates must be of `role` (with TLS): the controllers, or one
    /// shard group, so no other identity can pass for them.
    pub fn of_role(
        addresses: &[String],
        config: ClerkConfig,
        role: Role,
    ) -> Result<Replicas, ClerkError> {
        Self::with_role(addresses, config, Some(role))
    }

    fn with_role(
        addresses: &[String],
        config: ClerkConfig,
        role: Option<Role>,
    ) -> Result<Replicas, ClerkError> {
        if addresses.is_empty() {
            return Err(ClerkError::NoServers);
        }
        let servers = addresses
            .iter()
            .map(|address| Self::connect(address, &config, role.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Replicas {
            servers,
            leader: 0,
            rotation: 0,
            config,
            role,
            unresolvable: Vec::new(),
        })
    }

    /// Whether these are the servers at `addresses` (in this order), perhaps with more learned from
    /// hints: a caller whose list of a group changed builds new `Replicas`.
    pub fn starts_with(&self, addresses: &[String]) -> bool {
        addresses.len() <= self.servers.len()
            && self
                .servers
                .iter()
                .zip(addresses)
                .all(|(server, address)| server.address == *address)
    }

    fn connect(
        address: &str,
        config: &ClerkConfig,
        role: Option<&Role>,
    ) -> Result<Server, ClerkError> {
        Ok(Server {
            address: address.to_string(),
            channel: channel_to(address, config, role)?,
        })
    }

    /// Run `attempt` against the cached leader, then elsewhere, until it succeeds or the deadline passes.
    pub async fn call<T, F, Fut>(&mut self, attempt: F) -> Result<T, ClerkError>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        let deadline = Instant::now() + self.config.call_timeout;
        let mut backoff = self.config.min_backoff;
        let mut failures_this_round = 0;
        let mut failed_this_round: Vec<usize> = Vec::new();
        let mut last_error = String::from("no attempt made");
        let mut probed = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClerkError::Timeout {
                    timeout: self.config.call_timeout,
                    last_error,
                });
            }
            let timeout = self.config.attempt_timeout.min(deadline - now);
            let client = self.servers[self.leader].channel.clone();
            match attempt(client, timeout).await? {
                Attempt::Done(value) => return Ok(value),
                Attempt::Elsewhere(hint, error) => {
                    self.refuse_plaintext_to_tls(self.leader, &error, &mut probed)
                        .await?;
                    last_error = format!("{}: {error}", self.servers[self.leader].address);
                    failures_this_round += 1;
                    failed_this_round.push(self.leader);
                    let hinted = match hint {
                        Some(address) => self.hinted(&address).await,
                        None => None,
                    };
                    match hinted {
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

    /// A plaintext client whose connection to server `i` broke: if that server requires TLS, no retry
    /// can help, so say so now (once per server and call: `probed`).
    async fn refuse_plaintext_to_tls(
        &self,
        i: usize,
        error: &str,
        probed: &mut Vec<usize>,
    ) -> Result<(), ClerkError> {
        if self.config.security.is_tls()
            || !error.contains("transport error")
            || probed.contains(&i)
        {
            return Ok(());
        }
        probed.push(i);
        let address = &self.servers[i].address;
        if crate::security::requires_tls(address, self.config.connect_timeout).await {
            return Err(ClerkError::Tls(format!(
                "{address} requires TLS and this client runs without it (--insecure): pass \
                 --tls-ca, --tls-cert and --tls-key (or DS824_TLS_CA, DS824_TLS_CERT, DS824_TLS_KEY)"
            )));
        }
        Ok(())
    }

    /// The server a hint names, if it is worth trying: one the clerk knows, or a new one whose name
    /// resolves here within [`HINT_RESOLVE_TIMEOUT`] (one that does not is remembered and skipped).
    async fn hinted(&mut self, address: &str) -> Option<usize> {
        if let Some(i) = self.servers.iter().position(|s| s.address == address) {
            return Some(i);
        }
        if self.unresolvable.iter().any(|a| a == address) {
            return None;
        }
        if !resolves_quickly(address).await {
            if self.unresolvable.len() < MAX_SERVERS {
                self.unresolvable.push(address.to_string());
            }
            return None;
        }
        self.server_index(address)
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
        let server = Self::connect(address, &self.config, self.role.as_ref()).ok()?;
        self.servers.push(server);
        Some(self.servers.len() - 1)
    }
}

/// Whether `address` (`host:port` or a URL) resolves within [`HINT_RESOLVE_TIMEOUT`].
async fn resolves_quickly(address: &str) -> bool {
    let host_port = address
        .split_once("://")
        .map_or(address, |(_, rest)| rest)
        .trim_end_matches('/');
    match tokio::time::timeout(HINT_RESOLVE_TIMEOUT, tokio::net::lookup_host(host_port)).await {
        Ok(Ok(mut addresses)) => addresses.next().is_some(),
        _ => false,
    }
}

/// A lazily connected channel to one server (`host:port` or a URL), any replica.
pub fn channel(address: &str, config: &ClerkConfig) -> Result<Channel, ClerkError> {
    channel_to(address, config, None)
}

/// A lazily connected channel to one server whose certificate must be of `role` (`None`: any replica).
pub fn channel_to(
    address: &str,
    config: &ClerkConfig,
    role: Option<&Role>,
) -> Result<Channel, ClerkError> {
    let endpoint = match role {
        Some(role) => config.security.endpoint_for(address, role),
        None => config.security.endpoint(address),
    };
    let endpoint = endpoint
        .map_err(|e| ClerkError::Address {
            address: address.to_string(),
            detail: e.to_string(),
        })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// How a gRPC error status should be treated: the server refused the request itself (final), or this
/// server could not serve it (try elsewhere).
pub fn status_attempt<T>(status: Status) -> Result<Attempt<T>, ClerkError> {
    if crate::security::is_tls_failure(&status) {
        return Err(ClerkError::Tls(crate::security::describe_chain(&status)));
    }
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => {
            return Err(ClerkError::Denied(status.message().to_string()))
        }
        _ => {}
    }
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
            Err(ClerkError::Rejected(status.message().to_string()))
        }
        // A message over a size limit (the request, or the answer on either side) is over it on
        // every server: another one cannot help.
        Code::OutOfRange => Err(ClerkError::Rejected(format!(
            "a message is over its size limit: {}",
            status.message()
        ))),
        _ => Ok(Attempt::Elsewhere(
            None,
            format!("{:?}: {}", status.code(), status.message()),
        )),
    }
}

/// A new client id (the session key in a service's dedup table): this machine's clock in ms since the
/// Unix epoch, then [`super::sessions::CLIENT_ID_RANDOM_BITS`] random bits. Ids grow with time, so a
/// client created after a server dropped older sessions has an id above every dropped one and is not
/// mistaken for a dropped session (see [`super::sessions`]).
pub fn new_client_id() -> u64 {
    let bits = super::sessions::CLIENT_ID_RANDOM_BITS;
    let random = rand::random::<u64>() & ((1 << bits) - 1);
    (super::sessions::unix_ms() << bits) | random | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_session_restarts_above_the_mark_and_says_so_when_in_doubt() {
        let mut session = Session::default();
        let (id, seq) = session.next_command();
        assert_eq!(seq, 1);
        let mark = id + (1 << 30);
        // Refused on its only attempt: nothing was applied, send it again under a new session.
        assert!(session.restart(mark, 1).is_ok());
        let (new_id, seq) = session.next_command();
        assert!(new_id > mark && seq == 1);
        // Refused after earlier attempts that may have applied: the caller must be told.
        assert!(matches!(
            session.restart(new_id, 2),
            Err(ClerkError::SessionExpired)
        ));
        assert!(session.client_id() > new_id);
    }

    /// A hint naming an address that does not resolve here (a container-internal name seen from the
    /// host) costs no attempt's timeout: the clerk goes on to the next server it was given, and skips
    /// that hint from then on.
    #[tokio::test]
    async fn a_hint_that_does_not_resolve_here_is_skipped_at_once() {
        let given = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let mut replicas = Replicas::new(&given, ClerkConfig::default()).expect("replicas");
        let started = std::time::Instant::now();
        for _ in 0..3 {
            let calls = std::sync::atomic::AtomicUsize::new(0);
            let answer = replicas
                .call(|_, _| {
                    let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move {
                        Ok(match n {
                            0 => Attempt::Elsewhere(
                                Some("leader.invalid:7001".into()),
                                "not the leader".into(),
                            ),
                            _ => Attempt::Done(n),
                        })
                    }
                })
                .await
                .expect("answered");
            assert_eq!(answer, 1, "answered by the second attempt");
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            replicas.servers.len(),
            2,
            "the unresolvable hint was not added"
        );
        assert_eq!(
            replicas.unresolvable,
            vec!["leader.invalid:7001".to_string()]
        );
        // A hint that resolves is followed (and remembered as a server).
        assert!(replicas.hinted("127.0.0.1:3").await.is_some());
        assert_eq!(replicas.servers.len(), 3);
    }

    #[test]
    fn only_what_another_server_could_answer_is_retried() {
        let retried =
            |status: Status| matches!(status_attempt::<()>(status), Ok(Attempt::Elsewhere(..)));
        assert!(retried(Status::unavailable("connection refused")));
        assert!(retried(Status::unknown("transport error")));
        for (status, what) in [
            (
                Status::out_of_range("decoded message length too large"),
                "size limit",
            ),
            (Status::invalid_argument("the key is empty"), "key"),
            (Status::permission_denied("client may not join"), "may not"),
        ] {
            match status_attempt::<()>(status) {
                Err(e) => assert!(e.to_string().contains(what), "{e}"),
                Ok(_) => panic!("retried: {what}"),
            }
        }
    }
}
