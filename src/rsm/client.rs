//! Talking to a replicated service from outside: the part of every clerk that is not about the
//! service's own requests.
//!
//! [`Replicas`] keeps the servers of one Raft group, **caches the leader** (the server that last answered),
//! **follows hints** (a wrong-leader answer may name the leader's address; an unknown one is added, up to a
//! bound), and **retries** on timeouts, wrong leaders and unreachable servers: the next server in a
//! round-robin kept apart from hint jumps (so an unreachable hinted address, e.g. a container-internal
//! name seen from outside, cannot trap it; a new hinted name must resolve within 300 ms, or it is
//! skipped for good), with exponential backoff after every full round, until the per-call deadline.
//! A server that **did not answer** within an attempt's deadline (paused, or cut off) is avoided for
//! [`AVOID_SILENT_FOR`]: neither tried nor followed as a hint while another server may serve. Without
//! this a frozen leader costs every call one attempt timeout per round, because until the others elect a
//! new leader their hints still name it. Service clerks (KV, controller) add their requests and error
//! codes on top.

use crate::security::Role;
use crate::security::{ClientChannel, NOT_CONNECTED};
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
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
    /// Send reads to every replica in turn instead of the leader (follower reads: the servers must
    /// run with `kvd --follower-reads`, or a follower refuses the read with a hint and the clerk
    /// retries it at the leader, costing a round trip).
    pub read_anywhere: bool,
}

impl Default for ClerkConfig {
    fn default() -> Self {
        ClerkConfig {
            call_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            security: crate::security::Security::Insecure,
            read_anywhere: false,
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
    /// A command failed for good after an earlier attempt of it went unanswered or unfinished (the
    /// attempt timed out, the server timed out waiting for its commit, the connection broke under
    /// it): that attempt may have applied it, so the failure must not read as "not applied". Read
    /// before deciding to repeat the command.
    #[error("{0} (after an earlier attempt went unanswered: the command may or may not have been applied)")]
    InDoubt(Box<ClerkError>),
}

impl ClerkError {
    /// This failure of a command, said to be in doubt if `doubt` (an earlier attempt may have applied
    /// it); failures that already say so are left as they are.
    pub fn in_doubt_if(self, doubt: bool) -> ClerkError {
        match self {
            ClerkError::Timeout { .. } | ClerkError::SessionExpired | ClerkError::InDoubt(_) => {
                self
            }
            error if doubt => ClerkError::InDoubt(Box::new(error)),
            error => error,
        }
    }
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
        self.client_id = id_above(min_client_id, rand::random());
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
    channel: ClientChannel,
}

/// What one attempt learned.
pub enum Attempt<T> {
    /// Served.
    Done(T),
    /// Refused here without being acted on (not the leader, overloaded): try the hinted address (if
    /// any) or the next server; the text says why.
    Elsewhere(Option<String>, String),
    /// Not known to be served: the server may have acted on it without saying so (it timed out
    /// waiting for the commit, the connection broke under the call). Try the next server; for a
    /// command whose request went out in this attempt, a final error from here on is in doubt
    /// ([`ClerkError::InDoubt`]).
    Unsure(String),
    /// No answer within the attempt's deadline: the server may be frozen or cut off, so it is avoided
    /// for [`AVOID_SILENT_FOR`]; the text says what was waited for. In doubt as [`Attempt::Unsure`].
    Silent(String),
}

/// What a call through [`Replicas`] is, for where it goes first and how its failures read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// A read or a query, at the leader first: failing it changes nothing.
    Query,
    /// A read sent to the replicas in turn ([`ClerkConfig::read_anywhere`]); the leader cached stays
    /// the one writes learned.
    SpreadRead,
    /// A command that changes state: once an attempt may have applied it, its failure is in doubt.
    Command,
}

/// How long a server that let an attempt time out is avoided (tried last, its hints ignored). About the
/// shortest election timeout (1 s): a frozen leader is replaced after 1–1.5 s of silence, and until then the
/// other servers' hints still name it. A server that was only slow is tried again after this.
pub const AVOID_SILENT_FOR: Duration = Duration::from_secs(1);

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
    /// When each server (same index as `servers`) last let an attempt time out, if it has not
    /// answered since.
    silent_since: Vec<Option<Instant>>,
    /// Where the next read goes under [`ClerkConfig::read_anywhere`] (round-robin from a random
    /// start, so many clerks spread their reads).
    next_reader: usize,
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
        let servers: Vec<Server> = addresses
            .iter()
            .map(|address| Self::connect(address, &config, role.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Replicas {
            silent_since: vec![None; servers.len()],
            servers,
            leader: 0,
            rotation: 0,
            config,
            role,
            unresolvable: Vec::new(),
            next_reader: rand::random_range(0..addresses.len()),
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
        F: Fn(ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        self.call_indexed(Call::Query, &mut false, |_, channel, timeout| {
            attempt(channel, timeout)
        })
        .await
    }

    /// [`Self::call`] for a command that changes state: a final error after an attempt that may have
    /// applied it ([`Attempt::Unsure`], [`Attempt::Silent`], or a TLS failure, each once its request
    /// went out: the channel's `requests_sent` moved) is [`ClerkError::InDoubt`]. `doubt`
    /// says whether an attempt may have applied it, before the call (a caller that tried other groups
    /// of servers already) and after it (it only ever turns true).
    pub async fn call_command<T, F, Fut>(
        &mut self,
        doubt: &mut bool,
        attempt: F,
    ) -> Result<T, ClerkError>
    where
        F: Fn(ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        self.call_indexed(Call::Command, doubt, |_, channel, timeout| {
            attempt(channel, timeout)
        })
        .await
    }

    /// [`Self::call`] for a read: with [`ClerkConfig::read_anywhere`] the first attempt goes to the
    /// next replica in turn, and the cached leader stays the one writes learned.
    pub async fn call_read<T, F, Fut>(&mut self, attempt: F) -> Result<T, ClerkError>
    where
        F: Fn(ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        let kind = if self.config.read_anywhere {
            Call::SpreadRead
        } else {
            Call::Query
        };
        self.call_indexed(kind, &mut false, |_, channel, timeout| {
            attempt(channel, timeout)
        })
        .await
    }

    /// [`Self::call`], telling `attempt` which server (index) it talks to, for tests. `doubt`: see
    /// [`Self::call_command`] (only a command's is kept).
    async fn call_indexed<T, F, Fut>(
        &mut self,
        kind: Call,
        doubt: &mut bool,
        attempt: F,
    ) -> Result<T, ClerkError>
    where
        F: Fn(usize, ClientChannel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ClerkError>>,
    {
        let spread = kind == Call::SpreadRead;
        let command = kind == Call::Command;
        // Servers whose TLS handshake failed in this call, and the first such failure: final once
        // every server failed so (one server's refusal, as in a CA rotation half done, is not).
        let mut tls_refused: Vec<usize> = Vec::new();
        let mut tls_failure = None;
        let deadline = Instant::now() + self.config.call_timeout;
        let mut backoff = self.config.min_backoff;
        let mut failed_this_round: Vec<usize> = Vec::new();
        let mut last_error = String::from("no attempt made");
        let mut probed = Vec::new();
        // A read sent to the replicas in turn says nothing about who leads: unless a hint led to the
        // server that answered, the leader cached stays the one writes learned.
        let mut hinted_to = None;
        let cached_leader = self.leader;
        if spread {
            let n = self.servers.len();
            let pick = self
                .first_available_from(self.next_reader, &[], Instant::now())
                .unwrap_or(self.next_reader % n);
            self.next_reader = (pick + 1) % n;
            self.leader = pick;
        }
        if self.avoided(self.leader, Instant::now()) {
            self.leader = self
                .next_in_rotation(&[], Instant::now())
                .unwrap_or(self.leader);
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                if spread {
                    self.leader = cached_leader;
                }
                // A server's TLS refusal is what an operator most needs to see when none answered;
                // still a timeout (a caller with time left, a sharded clerk between groups, retries).
                return Err(ClerkError::Timeout {
                    timeout: self.config.call_timeout,
                    last_error: match tls_failure {
                        Some(failure) => format!("{last_error}; TLS refused by {failure}"),
                        None => last_error,
                    },
                });
            }
            let timeout = self.config.attempt_timeout.min(deadline - now);
            let client = self.servers[self.leader].channel.clone();
            let sent_before = client.requests_sent();
            let outcome = attempt(self.leader, client, timeout).await;
            // An attempt that failed or timed out before its request went out (while connecting, or
            // waiting for a stream) cannot have been acted on, whatever the failure says.
            let may_have_acted =
                command && self.servers[self.leader].channel.requests_sent() != sent_before;
            let answer = match outcome {
                Err(ClerkError::Tls(failure)) => {
                    // A TLS failure after the request went out (not a refused certificate: that
                    // fails the connect) may have come after the server acted.
                    *doubt |= may_have_acted;
                    if !tls_refused.contains(&self.leader) {
                        tls_refused.push(self.leader);
                    }
                    if tls_refused.len() == self.servers.len() {
                        return Err(ClerkError::Tls(failure).in_doubt_if(*doubt && command));
                    }
                    let address = &self.servers[self.leader].address;
                    tls_failure.get_or_insert_with(|| format!("{address}: {failure}"));
                    Attempt::Elsewhere(None, format!("TLS: {failure}"))
                }
                answer => answer.map_err(|e| e.in_doubt_if(*doubt && command))?,
            };
            let (hint, error) = match answer {
                Attempt::Done(value) => {
                    self.silent_since[self.leader] = None;
                    if spread && hinted_to != Some(self.leader) {
                        self.leader = cached_leader;
                    }
                    return Ok(value);
                }
                Attempt::Elsewhere(hint, error) => {
                    self.silent_since[self.leader] = None;
                    (hint, error)
                }
                Attempt::Unsure(error) => {
                    self.silent_since[self.leader] = None;
                    self.refuse_plaintext_to_tls(self.leader, &error, &mut probed)
                        .await
                        .map_err(|e| e.in_doubt_if(*doubt && command))?;
                    *doubt |= may_have_acted;
                    (None, error)
                }
                Attempt::Silent(error) => {
                    self.silent_since[self.leader] = Some(Instant::now());
                    *doubt |= may_have_acted;
                    (None, error)
                }
            };
            last_error = format!("{}: {error}", self.servers[self.leader].address);
            failed_this_round.push(self.leader);
            let hinted = match hint {
                Some(address) => self.hinted(&address).await,
                None => None,
            };
            let now = Instant::now();
            let next = match hinted {
                Some(next) if !failed_this_round.contains(&next) && !self.avoided(next, now) => {
                    Some(next)
                }
                _ => self.next_in_rotation(&failed_this_round, now),
            };
            hinted_to = hinted.filter(|&h| next == Some(h));
            self.leader = match next {
                Some(next) => next,
                None => {
                    // Every server that may serve failed this round: back off, then go round again.
                    failed_this_round.clear();
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    let now = Instant::now();
                    self.next_in_rotation(&[], now).unwrap_or(self.leader)
                }
            };
        }
    }

    /// Whether server `i` let an attempt time out less than [`AVOID_SILENT_FOR`] before `now`.
    fn avoided(&self, i: usize, now: Instant) -> bool {
        self.silent_since[i].is_some_and(|since| now.duration_since(since) < AVOID_SILENT_FOR)
    }

    /// The next server in round-robin order after the last one this picked (see
    /// [`Self::first_available_from`]). `None` once all that may serve failed this round.
    fn next_in_rotation(&mut self, failed: &[usize], now: Instant) -> Option<usize> {
        let pick = self.first_available_from(self.rotation + 1, failed, now)?;
        self.rotation = pick;
        Some(pick)
    }

    /// The first server from `start` on, in round-robin order, that is not in `failed` and not
    /// avoided; if every server is avoided, the one not in `failed` that went silent longest ago
    /// (better a slow server than none). The one pick the retry rotation and spread reads share.
    fn first_available_from(&self, start: usize, failed: &[usize], now: Instant) -> Option<usize> {
        let n = self.servers.len();
        let untried = || {
            (0..n)
                .map(move |k| (start + k) % n)
                .filter(|i| !failed.contains(i))
        };
        let all_avoided = (0..n).all(|i| self.avoided(i, now));
        untried().find(|&i| !self.avoided(i, now)).or_else(|| {
            all_avoided
                .then(|| untried().min_by_key(|&i| self.silent_since[i]))
                .flatten()
        })
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
        self.silent_since.push(None);
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
pub fn channel(address: &str, config: &ClerkConfig) -> Result<ClientChannel, ClerkError> {
    channel_to(address, config, None)
}

/// A lazily connected channel to one server whose certificate must be of `role` (`None`: any replica).
pub fn channel_to(
    address: &str,
    config: &ClerkConfig,
    role: Option<&Role>,
) -> Result<ClientChannel, ClerkError> {
    config
        .security
        .channel(address, role, config.connect_timeout)
        .map_err(|e| ClerkError::Address {
            address: address.to_string(),
            detail: e.to_string(),
        })
}

/// How a server's admission control refusal begins ([`crate::raft::NodeError::Overloaded`]).
const OVERLOADED: &str = "leader overloaded";

/// How a gRPC error status should be treated: the server refused the request itself (final), or this
/// server could not serve it (try elsewhere).
pub fn status_attempt<T>(status: Status) -> Result<Attempt<T>, ClerkError> {
    if crate::security::is_tls_failure(&status) {
        return Err(ClerkError::Tls(crate::security::describe_tls_failure(
            &status,
        )));
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
        _ => {
            let said = format!("{:?}: {}", status.code(), status.message());
            if refused_before_acting(&status) {
                Ok(Attempt::Elsewhere(None, said))
            } else {
                // A transport failure (the connection broke, perhaps after the request went out)
                // or the server's own: it may have acted on the request.
                Ok(Attempt::Unsure(said))
            }
        }
    }
}

/// Whether a retryable status says nothing was done: admission control's or the answer budget's
/// "overloaded" (not any
/// RESOURCE_EXHAUSTED: HTTP/2 resets a stream it had taken with that code too), or a connection
/// this process could not make (a status it built carries its cause; a server's words do not count).
fn refused_before_acting(status: &Status) -> bool {
    match status.code() {
        Code::ResourceExhausted => {
            status.message().starts_with(OVERLOADED)
                || status.message().starts_with(super::answers::OVERLOADED)
        }
        Code::Unavailable => {
            status.message().starts_with(NOT_CONNECTED)
                && std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// Random bits of a restarted session's id above the servers' mark: every clerk restarting under one
/// mark draws from the same range, and two that drew the same id would share a session (the second's
/// first write answered with the first's outcome, never applied). 2^36 ids, at most about a minute of
/// id clock above the mark.
const RESTART_RANDOM_BITS: u32 = 36;

/// A client id above `mark` (the servers' `min_client_id`): a fresh id if this machine's clock is past
/// the mark, else the mark plus `random`'s low [`RESTART_RANDOM_BITS`] bits plus one.
fn id_above(mark: u64, random: u64) -> u64 {
    let offset = 1 + (random & ((1 << RESTART_RANDOM_BITS) - 1));
    new_client_id().max(mark.saturating_add(offset))
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

    #[test]
    fn sessions_restarted_under_one_mark_draw_from_a_wide_range() {
        // A mark far ahead of this clock (a dropped session of a client whose clock ran ahead): every
        // restarting clerk's id is the mark plus its random draw. With 16 random bits, a few hundred
        // clerks restarting under one mark shared ids, and the second's write was never applied.
        let mark = new_client_id() + (3_600_000 << crate::rsm::sessions::CLIENT_ID_RANDOM_BITS);
        let (lowest, highest) = (id_above(mark, 0), id_above(mark, u64::MAX));
        assert_eq!(lowest, mark + 1);
        assert!(highest - lowest >= (1 << 35), "range {}", highest - lowest);
        // Still an id the servers take (up to a day ahead of their clock).
        let now = crate::rsm::sessions::unix_ms();
        assert!(crate::rsm::sessions::plausible_client(highest, now));
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

    /// Three servers; server 0 is the leader and frozen, so the attempt to it times out. Until
    /// `elected`, servers 1 and 2 answer "wrong leader" and name server 0; after it, server 2 is the
    /// leader. Returns the number of attempts each server got and the time the call took.
    async fn call_around_a_frozen_leader(
        elected: Duration,
        frozen_answers_after: Option<usize>,
    ) -> ([usize; 3], Duration) {
        let given: Vec<String> = (1..=3).map(|p| format!("127.0.0.1:{p}")).collect();
        let config = ClerkConfig {
            attempt_timeout: Duration::from_secs(1),
            ..ClerkConfig::default()
        };
        let mut replicas = Replicas::new(&given, config).expect("replicas");
        let tries: [std::sync::atomic::AtomicUsize; 3] = Default::default();
        let started = Instant::now();
        let answer = replicas
            .call_indexed(Call::Query, &mut false, |server, _, timeout| {
                let n = tries[server].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let now = started.elapsed();
                async move {
                    Ok(match server {
                        0 if frozen_answers_after.is_some_and(|k| n >= k) => Attempt::Done(0),
                        0 => {
                            tokio::time::sleep(timeout).await;
                            Attempt::Silent("attempt timed out".into())
                        }
                        2 if now >= elected => Attempt::Done(2),
                        _ => {
                            let leader = if now >= elected { 3 } else { 1 };
                            Attempt::Elsewhere(
                                Some(format!("127.0.0.1:{leader}")),
                                "wrong leader".into(),
                            )
                        }
                    })
                }
            })
            .await
            .expect("answered");
        let tries = tries.map(|t| t.into_inner());
        assert_eq!(answer, frozen_answers_after.map_or(2, |_| 0), "{tries:?}");
        (tries, started.elapsed())
    }

    /// Reads spread over the replicas leave the leader writes learned cached, even when the replica
    /// a read went to first refused it and another in turn served it; one a hint named is taken.
    #[tokio::test(start_paused = true)]
    async fn spread_reads_keep_the_leader_writes_learned() {
        let given: Vec<String> = (1..=3).map(|p| format!("127.0.0.1:{p}")).collect();
        let config = ClerkConfig {
            read_anywhere: true,
            ..ClerkConfig::default()
        };
        let mut replicas = Replicas::new(&given, config).expect("replicas");
        replicas.leader = 2;
        let mut first_tries = Vec::new();
        for round in 0..6 {
            let tried = std::sync::Mutex::new(Vec::new());
            let served = replicas
                .call_indexed(Call::SpreadRead, &mut false, |server, _, _| {
                    tried.lock().expect("lock").push(server);
                    let first = tried.lock().expect("lock").len() == 1;
                    async move {
                        Ok(if first && round % 2 == 0 {
                            // Refused without a hint (a follower whose leader changed).
                            Attempt::Elsewhere(None, "wrong leader".into())
                        } else {
                            Attempt::Done(server)
                        })
                    }
                })
                .await
                .expect("served");
            let tried = tried.into_inner().expect("lock");
            assert_eq!(*tried.last().expect("tried"), served);
            first_tries.push(tried[0]);
            assert_eq!(replicas.leader, 2, "round {round}: tried {tried:?}");
        }
        first_tries.sort_unstable();
        first_tries.dedup();
        assert_eq!(
            first_tries,
            vec![0, 1, 2],
            "reads went to every replica in turn"
        );
        // A refusal naming the leader: the named server is the leader from now on.
        let tried = std::sync::Mutex::new(Vec::new());
        replicas
            .call_indexed(Call::SpreadRead, &mut false, |server, _, _| {
                tried.lock().expect("lock").push(server);
                async move {
                    Ok(if server == 0 {
                        Attempt::Done(())
                    } else {
                        Attempt::Elsewhere(Some("127.0.0.1:1".into()), "wrong leader".into())
                    })
                }
            })
            .await
            .expect("served");
        let tried = tried.into_inner().expect("lock");
        let expected = if tried == [0] { 2 } else { 0 };
        assert_eq!(replicas.leader, expected, "tried {tried:?}");
    }

    /// A frozen leader costs one attempt timeout, not one per round: while the others still name it
    /// (no election yet) the clerk keeps asking them, and takes the new leader as soon as one is named.
    #[tokio::test(start_paused = true)]
    async fn a_frozen_leader_costs_one_attempt_timeout_per_call_not_one_per_round() {
        let (tries, took) = call_around_a_frozen_leader(Duration::from_millis(1500), None).await;
        assert_eq!(
            tries[0], 1,
            "the frozen leader was waited on again: {tries:?}"
        );
        assert!(
            took < Duration::from_millis(1800),
            "took {took:?}: not within ~the election time plus one backoff"
        );
    }

    /// Avoiding a server that only was slow must not lock a client out of it: once
    /// [`AVOID_SILENT_FOR`] has passed and the others still name it, it is tried again.
    #[tokio::test(start_paused = true)]
    async fn a_leader_that_was_only_slow_is_tried_again_after_the_avoidance() {
        let (tries, took) = call_around_a_frozen_leader(Duration::from_secs(3600), Some(1)).await;
        assert_eq!(tries[0], 2, "{tries:?}");
        assert!(
            took >= Duration::from_secs(1) + AVOID_SILENT_FOR,
            "took {took:?}"
        );
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[test]
    fn only_what_another_server_could_answer_is_retried() {
        // Retried, and the server may have acted on it (the connection broke under the call).
        let unsure =
            |status: Status| matches!(status_attempt::<()>(status), Ok(Attempt::Unsure(_)));
        assert!(unsure(Status::unavailable("connection refused")));
        assert!(unsure(Status::unknown("transport error")));
        // Retried, and refused before anything was done.
        let refused = |status: Status| {
            matches!(
                status_attempt::<()>(status),
                Ok(Attempt::Elsewhere(None, _))
            )
        };
        let overloaded = crate::raft::NodeError::Overloaded("too many writes in flight".into());
        assert!(refused(Status::resource_exhausted(overloaded.to_string())));
        assert!(refused(Status::resource_exhausted(format!(
            "{}: this caller already has answers it has not read",
            crate::rsm::answers::OVERLOADED
        ))));
        // A connection never made, as the channel reports it (with its cause) ...
        let mut not_connected = Status::unavailable("cannot connect to 127.0.0.1:1: refused");
        not_connected.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(refused(not_connected));
        // ... but not a server's status saying the same words.
        assert!(unsure(Status::unavailable(
            "cannot connect to 127.0.0.1:1: refused"
        )));
        // An HTTP/2 reset of a stream the server had taken: it may have acted.
        assert!(unsure(Status::resource_exhausted(
            "transport error: stream reset: ENHANCE_YOUR_CALM"
        )));
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

    /// A command refused for good on its second attempt, after a first that may have applied it (no
    /// answer, or one that says nothing of it, to a request that went out), says it may have been
    /// applied; after a first that was refused outright, or that failed before its request went out
    /// (connecting, say), or for a query, it is the plain refusal.
    #[tokio::test]
    async fn a_final_error_after_an_unanswered_attempt_leaves_a_command_in_doubt() {
        let given = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let first_answers = [
            (|| Attempt::Silent("attempt timed out".into())) as fn() -> Attempt<()>,
            || Attempt::Unsure("server timed out".into()),
            || Attempt::Elsewhere(None, "wrong leader".into()),
        ];
        // (first answer, whether its request went out, whether the command is in doubt)
        let cases = first_answers
            .into_iter()
            .flat_map(|first| [(first, true), (first, false)])
            .zip([true, false, true, false, false, false]);
        for ((first, sent), in_doubt) in cases {
            for kind in [Call::Command, Call::Query] {
                let mut replicas = Replicas::new(&given, ClerkConfig::default()).expect("replicas");
                let calls = std::sync::atomic::AtomicUsize::new(0);
                let error = replicas
                    .call_indexed(kind, &mut false, |_, channel, _| {
                        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n == 0 && sent {
                            channel.pretend_sent();
                        }
                        async move {
                            match n {
                                0 => Ok(first()),
                                _ => Err(ClerkError::Denied("not for this role".into())),
                            }
                        }
                    })
                    .await
                    .expect_err("refused");
                let expect_doubt = in_doubt && kind == Call::Command;
                match &error {
                    ClerkError::InDoubt(inner) if expect_doubt => {
                        assert!(matches!(**inner, ClerkError::Denied(_)), "{error}");
                        assert!(error.to_string().contains("may or may not"), "{error}");
                    }
                    ClerkError::Denied(_) if !expect_doubt => {}
                    other => {
                        panic!("{kind:?}, sent {sent}, doubt expected {expect_doubt}: {other}")
                    }
                }
            }
        }
    }

    /// Doubt carried in from an earlier group (the sharded clerk's) makes a final error in doubt, and
    /// the doubt an attempt raises is handed back.
    #[tokio::test]
    async fn a_commands_doubt_is_carried_in_and_handed_back() {
        let given = ["127.0.0.1:1".to_string()];
        let mut replicas = Replicas::new(&given, ClerkConfig::default()).expect("replicas");
        let mut doubt = true;
        let error = replicas
            .call_command(&mut doubt, |_, _| async {
                Err::<Attempt<()>, _>(ClerkError::Denied("no".into()))
            })
            .await
            .expect_err("refused");
        assert!(matches!(error, ClerkError::InDoubt(_)), "{error}");
        let mut doubt = false;
        let calls = std::sync::atomic::AtomicUsize::new(0);
        replicas
            .call_command(&mut doubt, |channel, _| {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                channel.pretend_sent();
                async move {
                    Ok(match n {
                        0 => Attempt::Silent("attempt timed out".into()),
                        _ => Attempt::Done(()),
                    })
                }
            })
            .await
            .expect("served on the second attempt");
        assert!(doubt, "the silent attempt raised the doubt");
    }

    /// One server refusing the TLS handshake (a CA rotation half done) sends the call to the others;
    /// only when every server refused is it final, and reported as TLS.
    #[tokio::test]
    async fn a_tls_refusal_is_final_only_once_every_server_refused() {
        // One server refuses and the other never serves: a timeout (a caller may try again),
        // naming the refusal.
        let given = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let config = ClerkConfig {
            call_timeout: Duration::from_millis(300),
            ..ClerkConfig::default()
        };
        let mut replicas = Replicas::new(&given, config).expect("replicas");
        let error = replicas
            .call_indexed(Call::Query, &mut false, |server, _, _| async move {
                match server {
                    0 => Err::<Attempt<()>, _>(ClerkError::Tls("fatal alert: UnknownCA".into())),
                    _ => Ok(Attempt::Elsewhere(None, "wrong leader".into())),
                }
            })
            .await
            .expect_err("nobody served");
        match &error {
            ClerkError::Timeout { last_error, .. } => {
                assert!(last_error.contains("TLS refused by 127.0.0.1:1"), "{error}")
            }
            other => panic!("not a timeout: {other}"),
        }
        let given = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let mut replicas = Replicas::new(&given, ClerkConfig::default()).expect("replicas");
        let served = replicas
            .call_indexed(Call::Query, &mut false, |server, _, _| async move {
                match server {
                    0 => Err(ClerkError::Tls("received fatal alert: UnknownCA".into())),
                    _ => Ok(Attempt::Done(server)),
                }
            })
            .await
            .expect("the other server serves");
        assert_eq!(served, 1);
        let started = std::time::Instant::now();
        let error = replicas
            .call_indexed(Call::Query, &mut false, |_, _, _| async {
                Err::<Attempt<()>, _>(ClerkError::Tls("received fatal alert: UnknownCA".into()))
            })
            .await
            .expect_err("every server refused");
        assert!(matches!(error, ClerkError::Tls(_)), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // A command: refused before its request went out, plainly; a TLS failure after its
        // request went out (the server may have acted first), in doubt.
        for sent in [false, true] {
            let error = replicas
                .call_command(&mut false, |channel, _| {
                    if sent {
                        channel.pretend_sent();
                    }
                    async {
                        Err::<Attempt<()>, _>(ClerkError::Tls(
                            "received fatal alert: UnknownCA".into(),
                        ))
                    }
                })
                .await
                .expect_err("every server refused");
            match &error {
                ClerkError::InDoubt(inner) if sent => {
                    assert!(matches!(**inner, ClerkError::Tls(_)), "{error}")
                }
                ClerkError::Tls(_) if !sent => {}
                other => panic!("sent {sent}: {other}"),
            }
        }
    }
}
