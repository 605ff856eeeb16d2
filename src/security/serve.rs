//! How every gRPC server of ours accepts connections: at most a bound of them per port, Nagle off,
//! TCP keep-alive on, and with TLS the handshake done here (not by tonic), so a connection is judged
//! by its certificate before the server holds it ([`Admit`]).

use super::{Principal, Role, Security};
use crate::pacer::LinePacer;
use std::collections::HashMap;
use std::sync::Arc;

/// The connections a server accepts on `listener`, with Nagle's algorithm off, at most
/// [`crate::limits::MAX_CONNECTIONS_PER_LISTENER`] open at once: every gRPC server of ours is
/// served through this ([`Security::serve`]; the plain-HTTP metrics endpoint through
/// [`BoundedListener`]).
///
/// - Nagle off: our RPCs and Raft's acknowledgements are small writes in reply to small writes; with
///   Nagle on, a reply written while the previous one is unacknowledged waits for that
///   acknowledgement, which the peer may delay up to 40 ms. (tonic's `tcp_nodelay` applies only to
///   the listeners it binds itself, not to `serve_with_incoming`.)
/// - The bound: anyone who can reach a port can open connections, before any certificate is asked
///   for; tonic holds every one it is given. Unbounded, they used up the process's file
///   descriptors, and with them its Raft links and its storage. At the bound the server stops
///   accepting until one closes (new ones wait in the kernel's backlog).
pub(super) fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<Limited<tokio::net::TcpStream>>> {
    incoming_at_most(listener, connection_bound())
}

/// [`crate::limits::MAX_CONNECTIONS_PER_LISTENER`], or a quarter of this process's open-file limit
/// if that is less (at least 64).
fn connection_bound() -> usize {
    use rustix::process::{getrlimit, Resource};
    let open_files = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let bound = crate::limits::MAX_CONNECTIONS_PER_LISTENER as u64;
    (open_files / 4).clamp(64, bound) as usize
}

/// TCP keep-alive on accepted connections: a client whose host vanished (no FIN, no RST) would
/// otherwise hold its connection, and one of the listener's slots, for good. An idle connection is
/// probed after a minute of silence and given up after three unanswered probes 10 s apart: freed
/// within about 90 s. (One with data unacknowledged is given up by TCP's retransmission limit
/// instead, about 15 minutes.)
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// [`incoming`] with at most `bound` connections open at once.
pub(super) fn incoming_at_most(
    listener: tokio::net::TcpListener,
    bound: usize,
) -> impl futures::Stream<Item = std::io::Result<Limited<tokio::net::TcpStream>>> {
    let accepted = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE_IDLE))
        .with_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(KEEPALIVE_PROBES));
    let open = Arc::new(tokio::sync::Semaphore::new(bound));
    let state = (
        accepted,
        open,
        LinePacer::new(AT_BOUND_WARNING_EVERY),
        LinePacer::new(AT_BOUND_WARNING_EVERY),
    );
    futures::stream::unfold(
        state,
        move |(mut accepted, open, warned, failed)| async move {
            use futures::StreamExt;
            if open.available_permits() == 0 && warned.admit().is_some() {
                // Otherwise a full listener looks like a silent server from outside.
                tracing::warn!(
                    bound,
                    "connections at this listener's bound: new ones wait until one closes"
                );
            }
            // Never closed: the semaphore lives as long as the stream.
            let slot = open.clone().acquire_owned().await.ok()?;
            let next = accepted.next().await?;
            if let Err(e) = &next {
                use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
                if !matches!(
                    e.kind(),
                    ConnectionAborted | ConnectionRefused | ConnectionReset
                ) {
                    // Out of descriptors, most likely: give closing connections a moment (tonic would
                    // ask again at once).
                    if let Some(unlogged) = failed.admit() {
                        tracing::warn!(error = %e, unlogged, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
            Some((
                next.map(|io| Limited {
                    io,
                    _slot: slot,
                    deadline: None,
                }),
                (accepted, open, warned, failed),
            ))
        },
    )
}

/// A plain TCP listener for axum (the metrics endpoint) that holds at most a bound of connections
/// open at once, as [`Security::serve`] does for the gRPC ports: axum holds every connection it is
/// given (it sets no idle or header timeout), and at the bound this stops accepting until one
/// closes (new ones wait in the backlog). Each connection lives at most a set time, so neither
/// idle connections held on purpose nor those of a scraper whose host vanished keep the slots.
pub struct BoundedListener {
    listener: tokio::net::TcpListener,
    open: Arc<tokio::sync::Semaphore>,
    lifetime: std::time::Duration,
}

impl BoundedListener {
    /// `listener`, with at most `bound` connections open at once, each closed after `lifetime`.
    pub fn new(
        listener: tokio::net::TcpListener,
        bound: usize,
        lifetime: std::time::Duration,
    ) -> BoundedListener {
        BoundedListener {
            listener,
            open: Arc::new(tokio::sync::Semaphore::new(bound)),
            lifetime,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = Limited<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Never closed: the semaphore lives as long as the listener.
        let Ok(slot) = self.open.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        // axum's own accept: it retries what can be retried and pauses on the rest.
        let (io, address) = axum::serve::Listener::accept(&mut self.listener).await;
        let _ = io.set_nodelay(true);
        let deadline = Some(Box::pin(tokio::time::sleep(self.lifetime)));
        (
            Limited {
                io,
                _slot: slot,
                deadline,
            },
            address,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// How often a listener at its bound, or a refusal of one kind, is logged at most.
const AT_BOUND_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// An accepted connection holding one of its listener's slots ([`incoming`], [`BoundedListener`])
/// until it is dropped; with a deadline, its reads and writes fail once that has passed, so the
/// server closes it.
#[derive(Debug)]
pub struct Limited<T> {
    io: T,
    _slot: tokio::sync::OwnedSemaphorePermit,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Limited<T> {
    /// The error once the deadline has passed; until then registers for the wake-up at it.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        use std::future::Future;
        let deadline = self.deadline.as_mut()?;
        deadline.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection's lifetime is up",
            )
        })
    }
}

impl<T> std::ops::Deref for Limited<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.io
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    // The connection's own, so tonic's `remote_addr` and, under TLS, `peer_certs` still find it.
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(expired) = self.expired(cx) {
            return std::task::Poll::Ready(Err(expired));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(expired) = self.expired(cx) {
            return std::task::Poll::Ready(Err(expired));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(expired) = self.expired(cx) {
            return std::task::Poll::Ready(Err(expired));
        }
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Who may hold a connection to a port, judged right after its TLS handshake. The CA signs every
/// identity of the cluster, and a service checks each call's caller anyway; but a certificate whose
/// every call a port would refuse (a client's on a Raft peer port) must not hold that port's
/// connections either: held idle, up to the listener's bound, they kept the group's own links out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Any identity of this cluster: the client ports (clients, operators, other groups pulling
    /// shards, MapReduce workers).
    Cluster,
    /// Only replicas of the Raft group named so (`kv`, `ctrler`, `shard-<gid>`): a peer port.
    RaftGroup(String),
}

impl Admit {
    /// Only the replicas of `role`'s Raft group; any identity of the cluster for a role without one.
    pub fn raft_peers_of(role: &Role) -> Admit {
        role.raft_group().map_or(Admit::Cluster, Admit::RaftGroup)
    }

    /// Why the holder of `principal` may not connect, if it may not; `cluster` is this server's.
    fn refuses(&self, principal: &Principal, cluster: &str) -> Option<String> {
        if principal.cluster != cluster {
            return Some(format!("{principal} is not of cluster {cluster:?}"));
        }
        match self {
            Admit::Cluster => None,
            Admit::RaftGroup(group) => (principal.role.raft_group().as_deref() != Some(group))
                .then(|| {
                    format!("{principal} is not a replica of {group}, this port's only callers")
                }),
        }
    }
}

impl Security {
    /// Serve `routes` (the gRPC services) on `listener` until `shutdown`: the connections of
    /// [`incoming`], and with TLS only those whose certificate the CA signed and `admit` lets in
    /// (the handshake, at most [`crate::limits::TLS_HANDSHAKE_TIMEOUT`] long, happens here, not in
    /// tonic, so a refused identity never reaches the server). Every gRPC server of ours is served
    /// through this; it takes tonic's `Routes` rather than a server so that none can be started
    /// another way and serve plaintext by mistake.
    pub async fn serve(
        &self,
        routes: tonic::service::Routes,
        listener: tokio::net::TcpListener,
        admit: Admit,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        // A bound on the requests one connection may have in flight, as HTTP/2's
        // SETTINGS_MAX_CONCURRENT_STREAMS: a client cannot open more streams than that, so the server
        // never holds more (a tower concurrency limit let them open and queued their requests, at a
        // semaphore and a wrapped future per request besides).
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(crate::limits::MAX_REQUESTS_PER_CONNECTION)
            .add_routes(routes);
        let served = match self {
            Security::Insecure => {
                router
                    .serve_with_incoming_shutdown(incoming(listener), shutdown)
                    .await
            }
            Security::Tls(tls) => {
                let config = tls
                    .server
                    .config(admit, &tls.principal.cluster)
                    .map_err(ServeError::Tls)?;
                router
                    .serve_with_incoming_shutdown(tls_incoming(listener, config), shutdown)
                    .await
            }
        };
        Ok(served?)
    }
}

/// Why a server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS configuration could not be made (it was checked when the material was loaded).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// This process's certificate and the CA, as servers present and check them: each port makes its
/// rustls configuration from it, with its own [`Admit`].
pub(super) struct ServerIdentity {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// The CA (`roots`, DER), this process's certificate `chain` (DER) and key; checked now by
    /// making a configuration, so a bad file is reported at start-up, naming it.
    pub(super) fn new(
        roots: &[Vec<u8>],
        chain: &[Vec<u8>],
        key: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<ServerIdentity, String> {
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store
                .add(rustls_pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| format!("the CA certificate: {e}"))?;
        }
        let identity = ServerIdentity {
            roots: Arc::new(store),
            chain: chain
                .iter()
                .map(|der| rustls_pki_types::CertificateDer::from(der.clone()))
                .collect(),
            key,
        };
        identity.config(Admit::Cluster, "")?;
        Ok(identity)
    }

    /// The rustls server configuration of a port: a client certificate the CA signed, whose
    /// identity (of `cluster`) `admit` lets in, is required; HTTP/2 is spoken (ALPN `h2`, which our
    /// clients require).
    fn config(&self, admit: Admit, cluster: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signed_by_ca = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("the CA certificate: {e}"))?;
        let verifier = Arc::new(AdmittingVerifier {
            signed_by_ca,
            admit,
            cluster: cluster.to_string(),
            warned: LinePacer::new(AT_BOUND_WARNING_EVERY),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| format!("the certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The CA's check of a client certificate, then the port's [`Admit`]: a certificate the CA signed
/// for an identity this port does not serve fails the handshake with an `access_denied` alert,
/// which the client reports as a refused certificate (and does not retry).
#[derive(Debug)]
struct AdmittingVerifier {
    signed_by_ca: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    admit: Admit,
    cluster: String,
    /// Refusals, logged sparsely.
    warned: LinePacer,
}

impl rustls::server::danger::ClientCertVerifier for AdmittingVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.signed_by_ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .signed_by_ca
            .verify_client_cert(end_entity, intermediates, now)?;
        let refused = match Principal::from_certificate(end_entity.as_ref()) {
            Ok(principal) => self.admit.refuses(&principal, &self.cluster),
            Err(e) => Some(format!("client certificate: {e}")),
        };
        let Some(reason) = refused else {
            return Ok(verified);
        };
        if let Some(unlogged) = self.warned.admit() {
            // The peer's address is logged at debug by the handshake's task.
            tracing::warn!(
                reason,
                refused_without_a_log_line = unlogged,
                "connection refused in its TLS handshake"
            );
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signed_by_ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signed_by_ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.signed_by_ca.supported_verify_schemes()
    }
}

/// How long the accepting task pauses after a failed accept (as axum and hyper do), so that running
/// out of descriptors does not spin it.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A connection that completed its TLS handshake here.
type TlsConnection = tokio_rustls::server::TlsStream<Limited<tokio::net::TcpStream>>;

/// Handshakes done at once, at most, before the accepting task waits for the server to take them.
const HANDSHAKED_QUEUE: usize = 64;

/// The connections of [`incoming`] once their TLS handshake is done (which checks the client's
/// certificate: [`AdmittingVerifier`]). Each handshake runs in a task of its own (a slow one holds
/// up no other), within [`crate::limits::TLS_HANDSHAKE_TIMEOUT`]. The accepting task ends, and
/// frees the port, once the server drops the stream.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = std::io::Result<TlsConnection>> {
    let per_address = (connection_bound() / 8).clamp(1, crate::limits::MAX_HANDSHAKES_PER_ADDRESS);
    tls_incoming_with(listener, config, per_address)
}

/// [`tls_incoming`] with at most `per_address` handshakes under way from one IP address (an IPv6
/// /64, what one host is usually given): a connection beyond that is closed at once. Otherwise one
/// host that opens connections and sends nothing would hold the whole bound of the port (each for
/// the handshake's timeout), certificate or not, and keep a group's own Raft links out.
/// [`tls_incoming`] allows [`crate::limits::MAX_HANDSHAKES_PER_ADDRESS`], and never more than an
/// eighth of the port's bound.
fn tls_incoming_with(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    per_address: usize,
) -> impl futures::Stream<Item = std::io::Result<TlsConnection>> {
    let (handshaked, rx) = tokio::sync::mpsc::channel(HANDSHAKED_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let under_way = HandshakesUnderWay::default();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut accepted = std::pin::pin!(incoming(listener));
        loop {
            let next = tokio::select! {
                _ = handshaked.closed() => return,
                next = accepted.next() => next,
            };
            let connection = match next {
                Some(Ok(connection)) => connection,
                // `incoming` has paused after it, if it was worth a pause.
                Some(Err(_)) => continue,
                None => return,
            };
            let peer = connection.peer_addr().ok();
            let Some(_turn) = under_way.take(peer.map(|p| p.ip()), per_address) else {
                continue;
            };
            let (acceptor, handshaked) = (acceptor.clone(), handshaked.clone());
            tokio::spawn(async move {
                let handshake = acceptor.accept(connection).into_fallible();
                let handshake =
                    tokio::time::timeout(crate::limits::TLS_HANDSHAKE_TIMEOUT, handshake).await;
                // Its turn is over: waiting for the server to take it is not a handshake.
                drop(_turn);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = handshaked.send(Ok(tls)).await;
                    }
                    Ok(Err((e, io))) => {
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                        linger(io).await;
                    }
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|connection| (connection, rx))
    })
}

/// How long a refused connection is read from, at most, before it is closed ([`linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Closes a connection whose handshake was refused (its alert already written) the way that lets
/// the client read the alert: our side is shut first, then what the client still sends is read
/// and dropped for up to [`LINGER`], until it closes too. Closed at once, a socket holding unread
/// bytes (a TLS 1.3 client's first HTTP/2 frames, sent right after its side of the handshake)
/// answers with a reset, which can reach the client before it reads the alert: it then reports
/// "connection reset" instead of the refusal and its reason. (HTTP servers' "lingering close".)
/// The connection keeps its slot meanwhile, so lingering ones stay within the port's bound.
async fn linger(mut io: Limited<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(io.read(&mut sink).await, Ok(read) if read > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The TLS handshakes under way, by the client's IP address ([`tls_incoming_with`]).
#[derive(Clone)]
struct HandshakesUnderWay {
    by_address: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// Connections closed for it, logged sparsely.
    warned: Arc<LinePacer>,
}

impl Default for HandshakesUnderWay {
    fn default() -> Self {
        HandshakesUnderWay {
            by_address: Arc::default(),
            warned: Arc::new(LinePacer::new(AT_BOUND_WARNING_EVERY)),
        }
    }
}

impl HandshakesUnderWay {
    /// A turn for one more handshake from `address` (given back when dropped), unless `per_address`
    /// are under way from it already. A connection whose address is unknown gets one.
    fn take(&self, address: Option<std::net::IpAddr>, per_address: usize) -> Option<HandshakeTurn> {
        let Some(address) = address else {
            return Some(HandshakeTurn(None));
        };
        let address = host_of(address);
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let count = by_address.get(&address).copied().unwrap_or(0);
        if count >= per_address {
            drop(by_address);
            if let Some(unlogged) = self.warned.admit() {
                tracing::warn!(
                    %address,
                    per_address,
                    refused_without_a_log_line = unlogged,
                    "connection closed: too many TLS handshakes under way from its address"
                );
            }
            return None;
        }
        *by_address.entry(address).or_insert(0) += 1;
        Some(HandshakeTurn(Some((self.clone(), address))))
    }
}

/// What counts as one host for [`HandshakesUnderWay`]: an IPv4 address (mapped ones included), or
/// the /64 an IPv6 address is in (a host is usually given a whole /64, and could otherwise take a
/// turn per address).
fn host_of(address: std::net::IpAddr) -> std::net::IpAddr {
    match address.to_canonical() {
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !u128::from(u64::MAX),
        )),
        v4 => v4,
    }
}

/// One handshake's place among those of its address ([`HandshakesUnderWay::take`]).
struct HandshakeTurn(Option<(HandshakesUnderWay, std::net::IpAddr)>);

impl Drop for HandshakeTurn {
    fn drop(&mut self) {
        let Some((under_way, address)) = self.0.take() else {
            return;
        };
        let mut by_address = under_way
            .by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut count) = by_address.entry(address) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tls_server_for_test;
    use super::{Admit, Security};

    /// A listener on a free loopback port, and its address.
    async fn listen() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        (listener, address)
    }

    /// A CA of its own and the Raft peer port of kv node 1, served on loopback.
    struct PeerPort {
        dir: tempfile::TempDir,
        address: std::net::SocketAddr,
    }

    impl PeerPort {
        async fn of_kv_1() -> PeerPort {
            let dir = tempfile::tempdir().expect("temp dir");
            super::super::certs::init(&dir.path().join("ca"), "test", 1).expect("CA");
            let (listener, address) = listen().await;
            let port = PeerPort { dir, address };
            let server = port.load("kv", "1");
            tokio::spawn(async move {
                let peers = Admit::raft_peers_of(&super::Role::Kv);
                server
                    .serve(
                        tonic::service::Routes::default(),
                        listener,
                        peers,
                        std::future::pending(),
                    )
                    .await
            });
            port
        }

        /// TLS material of a process of `role` named `name`, from the port's CA.
        fn load(&self, role: &str, name: &str) -> Security {
            let ca = self.dir.path().join("ca");
            let issued = super::super::certs::issue(&ca, role, name, &[], 1).expect("certificate");
            Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).expect("load")
        }

        /// A TLS connection to the port as `role` `name`, once the client's side of the handshake
        /// is done (with TLS 1.3 the server may still refuse it: its alert comes with its next
        /// bytes).
        async fn connect_as(
            &self,
            role: &str,
            name: &str,
        ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
            let Security::Tls(tls) = self.load(role, name) else {
                panic!("TLS material expected");
            };
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            let tcp = tokio::net::TcpStream::connect(self.address)
                .await
                .expect("connect");
            let server_name = rustls_pki_types::ServerName::try_from(super::super::SERVER_NAME)
                .expect("name")
                .to_owned();
            connector
                .connect(server_name, tcp)
                .await
                .expect("the client's side of the handshake (the CA signed every certificate)")
        }
    }

    /// Every server advertises the per-connection bound in HTTP/2 SETTINGS, so a client cannot open
    /// more streams than that (tonic's default is no bound: a client could open any number and the
    /// server held each).
    #[tokio::test]
    async fn servers_let_a_connection_open_a_bounded_number_of_streams() {
        let (listener, address) = listen().await;
        let server = tokio::spawn(async move {
            Security::Insecure
                .serve(
                    tonic::service::Routes::default(),
                    listener,
                    Admit::Cluster,
                    std::future::pending(),
                )
                .await
        });
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (mut client, mut connection) = h2::client::handshake(tcp).await.expect("handshake");
        let request = tonic::codegen::http::Request::post(format!("http://{address}/x.Y/Z"))
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        let (response, _) = client.send_request(request, true).expect("send");
        // The server's SETTINGS come before any answer: once one is in, they are applied.
        tokio::select! {
            answer = response => { answer.expect("an answer"); }
            ended = &mut connection => panic!("the connection ended first: {ended:?}"),
        }
        assert_eq!(
            connection.max_concurrent_send_streams(),
            crate::limits::MAX_REQUESTS_PER_CONNECTION as usize
        );
        server.abort();
    }

    /// A connection that never starts its TLS handshake is closed once the handshake's time is up,
    /// not held (with its socket and task) for good.
    #[tokio::test]
    async fn a_connection_that_never_completes_its_tls_handshake_is_closed() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let address = tls_server_for_test(dir.path()).await;
        let mut silent = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        let limit = crate::limits::TLS_HANDSHAKE_TIMEOUT;
        let read = tokio::time::timeout(limit * 2, silent.read(&mut [0; 64])).await;
        // Closed (end of stream, or reset), not still waiting.
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        assert!(started.elapsed() >= limit / 2, "{:?}", started.elapsed());
    }

    /// A peer port keeps the connections of its own group's replicas only: a certificate of any
    /// other role (a client's, an operator's, another group's), though the CA signed it, fails its
    /// handshake with `access_denied`, before the server reads a byte of it. Before, such a
    /// connection was held, idle, as long as its holder liked, and enough of them kept the group's
    /// links out.
    #[tokio::test]
    async fn a_peer_port_keeps_only_its_groups_replicas_connected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = PeerPort::of_kv_1().await;
        let callers = [
            ("kv", "2", true),
            ("kv", "3", true),
            ("client", "user", false),
            ("admin", "ops", false),
            ("ctrler", "1", false),
            ("shard-1", "1", false),
            ("worker", "w1", false),
        ];
        for (role, name, admitted) in callers {
            let mut stream = port.connect_as(role, name).await;
            // HTTP/2's preface: a served connection is answered with the server's SETTINGS.
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut [0; 64]))
                    .await
                    .expect("neither answered nor closed");
            match read {
                Ok(n) if n > 0 => assert!(admitted, "{role}/{name} was served"),
                Err(e) if e.to_string().contains("AccessDenied") => {
                    assert!(!admitted, "{role}/{name} was refused: {e}")
                }
                other => panic!("{role}/{name}: neither served nor refused: {other:?}"),
            }
        }
    }

    /// A refused client that keeps writing after its side of the handshake (its HTTP/2 preface,
    /// SETTINGS, a PING) and reads later still gets to read the alert: closed at once, the server's
    /// socket answered those writes with a reset, a later write failed on it, and the client
    /// reported "connection reset" or "broken pipe" instead of the refusal.
    #[tokio::test]
    async fn a_refused_client_reads_why_even_after_writing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = PeerPort::of_kv_1().await;
        let mut stream = port.connect_as("client", "user").await;
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let _ = stream.flush().await;
        // The server has judged the certificate by now; this client writes on (as h2 does, its
        // SETTINGS and a PING) before it reads. A write into a closed socket draws a reset, and
        // the next write fails on it: the client then reports the reset, not the refusal.
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            let wrote = stream.write_all(&[0; 64]).await;
            let flushed = stream.flush().await;
            assert!(wrote.is_ok() && flushed.is_ok(), "{wrote:?} {flushed:?}");
        }
        let read = stream.read(&mut [0; 64]).await;
        assert!(
            matches!(&read, Err(e) if e.to_string().contains("AccessDenied")),
            "{read:?}"
        );
    }

    /// One address gets at most its share of handshakes under way: connections beyond it that send
    /// nothing are closed at once, not held for the handshake's timeout; once one of the others
    /// goes, a real client from the same address is served.
    #[tokio::test]
    async fn one_address_has_at_most_its_share_of_handshakes_under_way() {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        super::super::certs::init(&ca, "test", 1).expect("CA");
        let issued = super::super::certs::issue(&ca, "kv", "1", &[], 1).expect("certificate");
        let server =
            Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).expect("load");
        let Security::Tls(tls) = &server else {
            panic!("TLS material expected");
        };
        let config = tls.server.config(Admit::Cluster, "test").expect("config");
        let (listener, address) = listen().await;
        let mut served = Box::pin(super::tls_incoming_with(listener, config, 2));
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        let mut third = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut [0; 8]))
            .await
            .expect("the third was held for its handshake");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(silent.pop());
        let client =
            Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).expect("load");
        let Security::Tls(client) = client else {
            panic!("TLS material expected");
        };
        let server_name = rustls_pki_types::ServerName::try_from(super::super::SERVER_NAME)
            .expect("name")
            .to_owned();
        // The dropped one's turn comes back once the server sees it gone; until then a new
        // connection may be closed as the third was.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let tcp = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            let connector = tokio_rustls::TlsConnector::from(client.client.clone());
            if connector.connect(server_name.clone(), tcp).await.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no turn came back");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(5), served.next())
            .await
            .expect("the real client's connection reached the server");
        assert!(matches!(accepted, Some(Ok(_))));
    }

    /// Handshakes are counted per host: an IPv4 address (also when mapped into IPv6), or an IPv6
    /// /64, so a host cannot take a turn for each of its IPv6 addresses.
    #[test]
    fn handshakes_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let host = |a: &str| super::host_of(a.parse().expect("address"));
        assert_eq!(host("10.1.2.3"), host("::ffff:10.1.2.3"));
        assert_ne!(host("10.1.2.3"), host("10.1.2.4"));
        assert_eq!(host("2001:db8:1:2::1"), host("2001:db8:1:2:ffff::9"));
        assert_ne!(host("2001:db8:1:2::1"), host("2001:db8:1:3::1"));
        let under_way = super::HandshakesUnderWay::default();
        let a = under_way.take(Some("2001:db8::1".parse().expect("address")), 1);
        assert!(a.is_some());
        assert!(under_way
            .take(Some("2001:db8::2".parse().expect("address")), 1)
            .is_none());
        drop(a);
        assert!(under_way
            .take(Some("2001:db8::2".parse().expect("address")), 1)
            .is_some());
    }

    /// A listener holds at most its bound of connections open: the next one is accepted once one of
    /// them closes, not before.
    #[tokio::test]
    async fn a_listener_holds_at_most_its_bound_of_connections() {
        use tokio_stream::StreamExt;
        let (listener, address) = listen().await;
        let mut incoming = std::pin::pin!(super::incoming_at_most(listener, 2));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        let first = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        let _second = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(300), incoming.next()).await;
        assert!(
            third.is_err(),
            "a third connection was accepted over the bound"
        );
        drop(first);
        let third = tokio::time::timeout(std::time::Duration::from_secs(10), incoming.next())
            .await
            .expect("accepted once one closed");
        assert!(matches!(third, Some(Ok(_))));
        // The bound is the configured one where the open-file limit allows it.
        assert!(super::connection_bound() <= crate::limits::MAX_CONNECTIONS_PER_LISTENER);
        assert!(super::connection_bound() >= 64);
    }

    /// Accepted connections have Nagle's algorithm off and TCP keep-alive on (see [`super::incoming`]).
    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once_and_are_kept_alive() {
        use tokio_stream::StreamExt;
        let (listener, address) = listen().await;
        let mut incoming = std::pin::pin!(super::incoming(listener));
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
        // And TCP keep-alive: a vanished client's connection is given up.
        use rustix::net::sockopt;
        assert!(sockopt::socket_keepalive(&*accepted).expect("SO_KEEPALIVE"));
        assert_eq!(
            sockopt::tcp_keepidle(&*accepted).expect("TCP_KEEPIDLE"),
            super::KEEPALIVE_IDLE
        );
    }
}
