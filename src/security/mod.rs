//! The trust boundary: mutual TLS on every connection and the identities certificates carry.
//!
//! Every daemon and client loads a [`Security`] from `--tls-ca/--tls-cert/--tls-key` (or, for local
//! development only, `--insecure`). With TLS, a server accepts only clients whose certificate the
//! cluster CA signed (the handshake refuses anyone else), and every service asks its [`Guard`] who the
//! caller is before acting: the identity is a `ds824://<cluster>/<role>/<name>` URI in the certificate
//! ([`principal`]), so a Raft message's sender, a shard group pulling a shard, or an operator calling
//! `Join` is whoever the CA said, not whoever the request claims. [`certs`] makes the CA and
//! certificates (`kvctl certs`); [`args`] is the command-line surface every binary shares.
//!
//! Clients verify servers under one name, [`SERVER_NAME`], which only server roles' certificates
//! carry: nodes move between hosts and addresses (containers, pods), identities do not.

pub mod args;
pub mod certs;
mod channel;
pub mod principal;
mod serve;

pub use self::args::TlsArgs;
pub use self::channel::{ClientChannel, NOT_CONNECTED};
pub use self::principal::{Principal, PrincipalError, Role};
pub use self::serve::{Admit, BoundedListener, Limited, ServeError};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The DNS name every replica's certificate carries (kv, ctrler, shard-GID) and clients verify when
/// any replica will do (`kvctl status` of whatever `--cluster` names). Clients that want one role verify
/// [`Role::server_name`] instead, which only that role's certificates carry.
pub const SERVER_NAME: &str = "server.ds824";

/// Why TLS material could not be used.
#[derive(Debug, Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file is not what its flag says.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Neither TLS files nor `--insecure` were given, or only some of the files.
    #[error("{0}")]
    Usage(String),
    /// The certificate is not one this process may use.
    #[error("{0}")]
    Identity(String),
    /// tonic refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A server address that names no host and port.
    #[error("{0}")]
    Address(String),
}

/// Loaded TLS material: the CA to trust and this process's certificate, key and identity.
pub struct TlsMaterial {
    ca: Certificate,
    identity: tonic::transport::Identity,
    /// The same CA and identity for [`ClientChannel`]s, which speak rustls without tonic.
    client: Arc<rustls::ClientConfig>,
    /// The same for servers, whose handshakes [`Security::serve`] does itself.
    server: serve::ServerIdentity,
    principal: Principal,
}

/// How this process connects and accepts connections.
#[derive(Clone)]
pub enum Security {
    /// Plaintext, no identities: anyone who reaches a port may do anything. Local development only.
    Insecure,
    /// Mutual TLS with the cluster CA.
    Tls(Arc<TlsMaterial>),
}

impl Default for Security {
    /// Plaintext: what in-process tests and the simulator use. Binaries never fall back to it; they
    /// require `--insecure` to choose it.
    fn default() -> Self {
        Security::Insecure
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Insecure => f.write_str("Insecure"),
            Security::Tls(tls) => write!(f, "Tls({})", tls.principal),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The DER certificates in a PEM file's contents.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem)
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect();
    match certs {
        Ok(certs) if certs.is_empty() => Err("no PEM certificate in it".into()),
        Ok(certs) => Ok(certs),
        Err(e) => Err(format!("not a PEM certificate: {e}")),
    }
}

impl Security {
    /// Load the CA, certificate and key (PEM files) and read this process's identity from the
    /// certificate. Every problem is reported now, naming the file, rather than at the first handshake.
    pub fn load_tls(ca: &Path, cert: &Path, key: &Path) -> Result<Security, SecurityError> {
        let invalid = |path: &Path| {
            let path = path.to_path_buf();
            move |detail: String| SecurityError::Invalid { path, detail }
        };
        let ca_pem = read(ca)?;
        let roots = pem_certificates(&ca_pem).map_err(invalid(ca))?;
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain = pem_certificates(&cert_pem).map_err(invalid(cert))?;
        let private_key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid(key)(format!("not a PEM private key: {e}")))?;
        let principal =
            Principal::from_certificate(&chain[0]).map_err(|e| invalid(cert)(e.to_string()))?;
        let server = serve::ServerIdentity::new(&roots, &chain, private_key.clone_key())
            .map_err(invalid(cert))?;
        let client = client_config(roots, chain, private_key).map_err(invalid(cert))?;
        Ok(Security::Tls(Arc::new(TlsMaterial {
            client,
            server,
            ca: Certificate::from_pem(ca_pem),
            identity: tonic::transport::Identity::from_pem(cert_pem, key_pem),
            principal,
        })))
    }

    /// Whether connections are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// This process's identity, with TLS.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Security::Insecure => None,
            Security::Tls(tls) => Some(&tls.principal),
        }
    }

    /// The URL for `address` (`host:port`, or a URL whose scheme is replaced to match).
    pub fn url(&self, address: &str) -> String {
        let host = address.split_once("://").map_or(address, |(_, rest)| rest);
        match self {
            Security::Insecure => format!("http://{host}"),
            Security::Tls(_) => format!("https://{host}"),
        }
    }

    /// An endpoint for `address` that speaks this process's security (callers add their timeouts);
    /// with TLS, the server must be a replica of some group ([`SERVER_NAME`]).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        self.endpoint_verifying(address, SERVER_NAME)
    }

    /// An endpoint for a server of `role` only: with TLS, a certificate of any other role fails the
    /// handshake ([`Role::server_name`]).
    pub fn endpoint_for(
        &self,
        address: &str,
        role: &Role,
    ) -> Result<Endpoint, tonic::transport::Error> {
        self.endpoint_verifying(address, &role.server_name())
    }

    /// An endpoint for replica `node` of `role` only ([`Role::replica_server_name`]).
    pub fn endpoint_for_replica(
        &self,
        address: &str,
        role: &Role,
        node: u64,
    ) -> Result<Endpoint, tonic::transport::Error> {
        self.endpoint_verifying(address, &role.replica_server_name(node))
    }

    /// A [`ClientChannel`] to `address` that speaks this process's security; with TLS, the server must
    /// be a replica of some group ([`SERVER_NAME`]), or of `role` only if given
    /// ([`Role::server_name`]). What the clerks use; nothing connects until the first call.
    pub fn channel(
        &self,
        address: &str,
        role: Option<&Role>,
        connect_timeout: std::time::Duration,
    ) -> Result<ClientChannel, SecurityError> {
        let tls = match self {
            Security::Insecure => None,
            Security::Tls(tls) => {
                let name = role.map_or_else(|| SERVER_NAME.to_string(), Role::server_name);
                let name = rustls_pki_types::ServerName::try_from(name)
                    .map_err(|e| SecurityError::Tls(format!("server name: {e}")))?;
                Some((tls.client.clone(), name))
            }
        };
        ClientChannel::new(
            address,
            tls,
            connect_timeout,
            Some(channel::CLIENT_KEEP_ALIVE),
        )
        .map_err(SecurityError::Address)
    }

    fn endpoint_verifying(
        &self,
        address: &str,
        name: &str,
    ) -> Result<Endpoint, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(self.url(address))?;
        match self {
            Security::Insecure => Ok(endpoint),
            Security::Tls(tls) => endpoint.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(tls.ca.clone())
                    .identity(tls.identity.clone())
                    .domain_name(name),
            ),
        }
    }

    /// The guard services check callers with.
    pub fn guard(&self) -> Guard {
        Guard {
            cluster: self.principal().map(|p| p.cluster.clone()),
        }
    }

    /// Check that this process's certificate is one `role` may serve with: the right role, name and
    /// cluster. Without TLS there is nothing to check.
    pub fn expect_identity(&self, expected: &Principal) -> Result<(), SecurityError> {
        match self.principal() {
            Some(own) if own != expected => Err(SecurityError::Identity(format!(
                "this process must run as {expected}, but its certificate says {own}"
            ))),
            _ => Ok(()),
        }
    }

    /// Check that this process's certificate has `role` (for processes of a role whose members are not
    /// numbered, like MapReduce workers). Without TLS there is nothing to check.
    pub fn expect_role(&self, role: &Role) -> Result<(), SecurityError> {
        match self.principal() {
            Some(own) if &own.role != role => Err(SecurityError::Identity(format!(
                "this process must run with a {role} certificate, but its certificate says {own}"
            ))),
            _ => Ok(()),
        }
    }

    /// Log at start-up what this process trusts: plaintext is worth a warning every time.
    pub fn log_startup(&self, process: &str) {
        match self.principal() {
            None => tracing::warn!(
                process,
                "running WITHOUT TLS (--insecure): anyone who can reach a port can act as any peer, \
                 client or operator; use this for local development only"
            ),
            Some(principal) => tracing::info!(process, identity = %principal, "mutual TLS on"),
        }
    }
}

/// Paces the guard's `request refused` lines, all servers of the process together: any holder of
/// a cluster certificate can cause them at will.
static REFUSAL_LINES: crate::pacer::LinePacer =
    crate::pacer::LinePacer::new(std::time::Duration::from_secs(1));

/// Who may call a service. Open (no TLS) lets everyone in; with TLS, the caller is the identity in its
/// certificate, which must belong to this cluster.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    cluster: Option<String>,
}

impl Guard {
    /// A guard that admits everyone (plaintext mode, in-process tests).
    pub fn open() -> Guard {
        Guard { cluster: None }
    }

    /// Whether callers are authenticated.
    pub fn is_open(&self) -> bool {
        self.cluster.is_none()
    }

    /// The caller's identity: `None` when the guard is open. A TLS connection without a usable
    /// identity (no certificate, no ds824 URI, another cluster's) is refused.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Option<Principal>, Status> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let first = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let principal = Principal::from_certificate(first.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        if &principal.cluster != cluster {
            return Err(Status::permission_denied(format!(
                "{principal} belongs to cluster {:?}, this is cluster {cluster:?}",
                principal.cluster
            )));
        }
        Ok(Some(principal))
    }

    /// Admit the caller if `allowed` says its role may do `what`; refuse with PERMISSION_DENIED
    /// naming both otherwise.
    pub fn allow<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl Fn(&Role) -> bool,
    ) -> Result<Option<Principal>, Status> {
        let caller = self.caller(request).inspect_err(|status| {
            if let Some(unlogged) = REFUSAL_LINES.admit() {
                tracing::warn!(what, peer = ?request.remote_addr(), reason = status.message(), unlogged, "request refused");
            }
        })?;
        match &caller {
            Some(principal) if !allowed(&principal.role) => {
                if let Some(unlogged) = REFUSAL_LINES.admit() {
                    tracing::warn!(what, caller = %principal, unlogged, "request refused: not allowed");
                }
                Err(Status::permission_denied(format!(
                    "{principal} may not {what}"
                )))
            }
            _ => Ok(caller),
        }
    }
}

/// The rustls client configuration of a [`ClientChannel`]: trust the cluster CA (`roots`, DER) only,
/// present this process's certificate `chain` (DER) and key, speak HTTP/2 (ALPN `h2`, which our
/// servers require).
fn client_config(
    roots: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der))
            .map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What rustls says of a fatal alert from the other side (its `Error::AlertReceived`). A TLS 1.3
/// server refuses a client's certificate with such an alert after the client's handshake has ended,
/// so it reaches a client as the failure of its first call, and through h2 as text only (h2 keeps an
/// I/O error's kind and message, not the error): the text is all there is to recognise it by.
const ALERT_RECEIVED: &str = "received fatal alert";

/// Whether an error (from a failed call or connection) came from TLS: an untrusted certificate, a
/// refused client certificate, plaintext against a TLS port. Such a failure does not go away by
/// retrying, so clients report it at once.
pub fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut is_cause = false;
    while let Some(e) = current {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // The alert's text counts only in an I/O error this process saw (the cause of a broken
            // connection), never in a message the server chose (a status, a GOAWAY's debug data).
            let alert = is_cause && io.to_string().contains(ALERT_RECEIVED);
            if alert
                || io
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        is_cause = true;
        current = e.source();
    }
    false
}

/// Whether the server at `address` requires TLS: it answers a plaintext HTTP/2 preface with a TLS alert
/// record (content type 21, version 3.x) where an HTTP/2 server would send its settings. Lets a
/// plaintext (`--insecure`) client say "this server needs TLS" at once instead of retrying a connection
/// that can never work until its deadline.
pub async fn requires_tls(address: &str, within: std::time::Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.split_once("://").map_or(address, |(_, rest)| rest);
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        Some(head == [0x15, 0x03])
    };
    matches!(tokio::time::timeout(within, probe).await, Ok(Some(true)))
}

/// The alert with which our servers refuse a certificate the CA signed for an identity the port
/// does not serve (`serve::Admit`).
const ACCESS_DENIED: &str = "AccessDenied";

/// The alerts (as rustls names them) with which a server refuses the client's certificate.
const CERTIFICATE_ALERTS: [&str; 9] = [
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "UnknownCA",
    "DecryptError",
    "CertificateRequired",
    "AccessDenied",
];

/// A TLS failure ([`is_tls_failure`]) on one line, for a CLI to print: its reason is deep in the
/// chain, and an alert from the server refusing the client's certificate (which names only the check
/// that failed, e.g. `DecryptError` for a certificate another CA signed) is followed by what it means
/// for the operator.
pub fn describe_tls_failure(error: &(dyn std::error::Error + 'static)) -> String {
    let text = describe_chain(error);
    let alerts = || text.split(ALERT_RECEIVED).skip(1);
    let refused_certificate =
        alerts().any(|after| CERTIFICATE_ALERTS.iter().any(|alert| after.contains(alert)));
    if alerts().any(|after| after.contains(ACCESS_DENIED)) {
        // A certificate the CA signed, of a role this port does not serve (`serve::Admit`).
        format!(
            "{text} (the server refused this certificate's identity on this port: a Raft peer \
             port serves only its own group's replicas, and no port serves another cluster's \
             identities; is this the right port and cluster?)"
        )
    } else if refused_certificate {
        format!(
            "{text} (the server refused this client's certificate: is it issued by the cluster's \
             CA, not expired, and for this cluster? see --tls-cert, --tls-key)"
        )
    } else {
        text
    }
}

/// An error and its causes on one line.
fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Roles that use the data services: ordinary clients and operators.
pub fn is_user(role: &Role) -> bool {
    matches!(role, Role::Client | Role::Admin)
}

/// Test support: a server with no services on a free loopback port, with TLS from a new CA in
/// `dir/ca` (clients load `dir/ca/ca.pem`) and a certificate of kv node 1; its address.
#[cfg(test)]
pub(crate) async fn tls_server_for_test(dir: &Path) -> std::net::SocketAddr {
    let ca = dir.join("ca");
    certs::init(&ca, "test", 1).expect("CA");
    let issued = certs::issue(&ca, "kv", "1", &[], 1).expect("certificate");
    let security = Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let routes = tonic::service::Routes::default();
    tokio::spawn(async move {
        security
            .serve(routes, listener, Admit::Cluster, std::future::pending())
            .await
    });
    address
}

#[cfg(test)]
mod failure_tests {
    use super::{describe_tls_failure, is_tls_failure, Guard};
    use std::sync::Arc;
    use tonic::{Code, Request, Status};

    /// A failure seen here: a status whose cause is an I/O error with `text` (as the clerks'
    /// channel reports a broken connection).
    fn failed_with(text: &str) -> Status {
        let mut status = Status::new(Code::Unavailable, format!("transport error: {text}"));
        status.set_source(Arc::new(std::io::Error::other(text.to_string())));
        status
    }

    /// A server's alert after the handshake arrives as a transport failure whose text alone says TLS
    /// (as h2 passes it on): it is a TLS failure, explained; a connection reset is not.
    #[test]
    fn an_alert_from_the_server_is_a_tls_failure_and_a_reset_is_not() {
        let alert = failed_with("received fatal alert: DecryptError");
        assert!(is_tls_failure(&alert));
        let said = describe_tls_failure(&alert);
        assert!(said.contains("DecryptError"), "{said}");
        assert!(said.contains("refused this client's certificate"), "{said}");
        // Another alert is a TLS failure, but not a refused certificate.
        let other = failed_with("received fatal alert: ProtocolVersion");
        assert!(is_tls_failure(&other));
        assert!(!describe_tls_failure(&other).contains("certificate"));
        assert!(!is_tls_failure(&failed_with("connection reset by peer")));
        // A server's own status message saying so is not this process's TLS failure.
        let said_by_server = Status::new(Code::Unavailable, "received fatal alert: DecryptError");
        assert!(!is_tls_failure(&said_by_server));
    }

    /// Every refused call used to write a line: any holder of a cluster certificate could fill a
    /// node's disk with them. A flood of refusals writes about one a second (with the count held
    /// back); the refusal itself is unchanged.
    #[test]
    fn a_flood_of_refused_calls_writes_a_line_a_second() {
        let lines = crate::daemon::LogBuffer::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let guard = Guard {
            cluster: Some("prod".into()),
        };
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                // No client certificate: refused.
                let refused = guard.allow(&Request::new(()), "test", |_| true);
                assert_eq!(refused.expect_err("refused").code(), Code::Unauthenticated);
            }
        });
        let written = lines.text();
        let refusals = written.matches("request refused").count();
        assert!(refusals <= 2, "{refusals} lines for 1000 refusals");
    }
}
