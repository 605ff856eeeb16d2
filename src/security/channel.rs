//! The clerks' connection to one server: gRPC over hyper's HTTP/2 client directly.
//!
//! # Why not tonic's `Channel`
//!
//! tonic's `Channel` puts a tower `Buffer` in front of every request: the call is handed to a worker
//! task through a channel, and that task hands it to hyper's connection. A clerk sends one request at a
//! time and waits for its answer, so the buffer only adds a task wake-up and a channel hop to every
//! call. Measured on the 2-core CI VM, 64 clients reading through lease reads from a 3-node cluster on
//! loopback (the client loop uses half the machine): a bare get loop did 41.5–43.1k gets/s through
//! `Channel`, 46.5–49.0k straight through hyper's `SendRequest`; through the clerks, 41.2k → 43.5k. The Raft peer links keep `Channel`: they open one stream
//! and send every message on it, so the buffer is crossed once per connection, not per message.
//!
//! # What it keeps of `Channel`
//!
//! - It connects lazily, on the first call, and again on the next call after the connection broke
//!   (the call that found it broken fails, and the clerk retries). The connect timeout bounds each TCP
//!   connect to one of the name's addresses, as tonic's did; name resolution and the TLS handshake are
//!   bounded by the caller's attempt timeout (every clerk attempt has one).
//! - The same security: plaintext, or TLS with the cluster CA, this process's certificate, ALPN `h2` and
//!   the server name the caller requires ([`super::Security::channel`]).
//! - Failures read as tonic's did: a connection that cannot be made is UNAVAILABLE; a call the
//!   connection failed gets the gRPC code tonic maps hyper's error to (an HTTP/2 reason as its code,
//!   else UNKNOWN) and a message saying `transport error` (the clerk's cue to probe whether a plaintext
//!   client faces a TLS server). The cause (a rustls error for a TLS failure) is the status's source,
//!   which [`super::is_tls_failure`] looks for.

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::Status;
use tracing::debug;

/// What a call over a [`ClientChannel`] fails with: a [`Status`], which tonic passes on as it is.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A lazily connected HTTP/2 connection to one server, for generated gRPC clients
/// (`KvClient::new(channel)`). Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct ClientChannel {
    shared: Arc<Shared>,
}

/// TLS for a connection: the client configuration and the name the server's certificate must carry.
pub(crate) type ClientTls = (Arc<rustls::ClientConfig>, ServerName<'static>);

struct Shared {
    /// `host:port` (resolved at each connect).
    host: String,
    /// Put on every request: HTTP/2 requires the scheme and authority that generated clients leave out.
    scheme: Scheme,
    authority: Authority,
    tls: Option<ClientTls>,
    connect_timeout: Duration,
    /// The live connection's sender, if any.
    live: Mutex<Option<SendRequest<Body>>>,
    /// Held while connecting: concurrent calls on a cold channel open one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ClientChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientChannel")
            .field("host", &self.shared.host)
            .field("tls", &self.shared.tls.is_some())
            .finish()
    }
}

impl ClientChannel {
    /// A channel to `address` (`host:port`, or a URL whose scheme and path are ignored); nothing is
    /// connected until the first call. Fails only on an address that names no host and port.
    pub(crate) fn new(
        address: &str,
        tls: Option<ClientTls>,
        connect_timeout: Duration,
    ) -> Result<ClientChannel, String> {
        let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
        let authority: Authority = rest
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("not a host:port address: {e}"))?;
        if authority.as_str().contains('@') {
            return Err("not a host:port address: it carries a user name".into());
        }
        let Some(port) = authority.port_u16() else {
            return Err("no port in the address".into());
        };
        Ok(ClientChannel {
            shared: Arc::new(Shared {
                host: format!("{}:{port}", authority.host()),
                scheme: if tls.is_some() {
                    Scheme::HTTPS
                } else {
                    Scheme::HTTP
                },
                authority,
                tls,
                connect_timeout,
                live: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The live connection's sender, if it has not closed.
    fn live(&self) -> Option<SendRequest<Body>> {
        let live = self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        live.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// A sender on a live connection: the current one, or a new one (one connect at a time).
    async fn sender(&self) -> Result<SendRequest<Body>, Status> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _connecting = self.shared.connecting.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let sender = self.connect().await?;
        *self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self) -> Result<SendRequest<Body>, Status> {
        let host = &self.shared.host;
        let tcp = self.connect_tcp().await?;
        // Requests and answers are small writes each waiting for the other side: never delay them.
        tcp.set_nodelay(true).map_err(|e| connect_failed(host, e))?;
        match &self.shared.tls {
            None => handshake(host, TokioIo::new(tcp)).await,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| connect_failed(host, e))?;
                // Our servers speak HTTP/2 only; anything else there is not one of them.
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(Status::unavailable(format!(
                        "cannot connect to {host}: the server did not agree to HTTP/2 (ALPN h2)"
                    )));
                }
                handshake(host, TokioIo::new(tls)).await
            }
        }
    }

    /// A TCP connection to the first of the host's addresses that accepts one, each given the
    /// connect timeout.
    async fn connect_tcp(&self) -> Result<tokio::net::TcpStream, Status> {
        let host = &self.shared.host;
        let addresses = tokio::net::lookup_host(host)
            .await
            .map_err(|e| connect_failed(host, e))?;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolves to no address",
        );
        for address in addresses {
            let connect = tokio::net::TcpStream::connect(address);
            match tokio::time::timeout(self.shared.connect_timeout, connect).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "connecting to {address} timed out after {:?}",
                            self.shared.connect_timeout
                        ),
                    )
                }
            }
        }
        Err(connect_failed(host, last))
    }
}

/// Start HTTP/2 on `io`; the connection is driven by a task of its own until either side closes it.
async fn handshake<T>(host: &str, io: T) -> Result<SendRequest<Body>, Status>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await
        .map_err(|e| transport_error(e, &format!("HTTP/2 with {host}")))?;
    let host = host.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(server = %host, error = %e, "client connection closed");
        }
    });
    Ok(sender)
}

/// A connection that could not be made: unavailable (the clerk tries elsewhere), with the cause kept.
fn connect_failed(host: &str, error: std::io::Error) -> Status {
    let mut status = Status::unavailable(format!("cannot connect to {host}: {error}"));
    status.set_source(Arc::new(error));
    status
}

/// A call the connection failed: the gRPC code tonic maps hyper's error to (a timeout or a refused
/// stream: UNAVAILABLE, a cancel: CANCELLED, else UNKNOWN), and a message saying `transport error`
/// (the clerk's cue to probe whether a plaintext client faces a TLS server), with tonic's status,
/// and through it hyper's error, as the source.
fn transport_error(error: hyper::Error, what: &str) -> Status {
    let mapped = Status::from_error(Box::new(error));
    let mut status = Status::new(
        mapped.code(),
        format!("transport error: {what}: {}", mapped.message()),
    );
    status.set_source(Arc::new(mapped));
    status
}

impl tower_service::Service<http::Request<Body>> for ClientChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is the connection's, which the call waits for (it may have to connect first).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            let mut parts = std::mem::take(request.uri_mut()).into_parts();
            parts.scheme = Some(channel.shared.scheme.clone());
            parts.authority = Some(channel.shared.authority.clone());
            *request.uri_mut() = http::Uri::from_parts(parts)
                .map_err(|e| Status::internal(format!("request URI: {e}")))?;
            let mut sender = channel.sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| transport_error(e, "connection"))?;
            sender
                .send_request(request)
                .await
                .map_err(|e| Box::new(transport_error(e, "request")) as BoxError)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ClientChannel;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_stream::StreamExt;
    use tower_service::Service;

    /// A gRPC request to a method no server has: any of our servers answers it (UNIMPLEMENTED), which
    /// is all a test of the connection needs.
    fn request() -> http::Request<tonic::body::Body> {
        http::Request::post("/test.Nothing/Here")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .expect("request")
    }

    /// Serve `listener` as every server of ours does, counting the connections accepted.
    fn serve(listener: tokio::net::TcpListener, accepted: Arc<AtomicUsize>) {
        let incoming = super::super::incoming(listener).map(move |connection| {
            accepted.fetch_add(1, Ordering::SeqCst);
            connection
        });
        let server = super::super::Security::Insecure
            .server()
            .expect("server")
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming);
        tokio::spawn(server);
    }

    /// A listener on a free loopback port, and its address.
    async fn listen() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        (listener, address)
    }

    /// Whether `channel` gets an answer from the server (UNIMPLEMENTED, as a gRPC status).
    async fn answered(channel: &mut ClientChannel) -> Result<(), String> {
        let response = channel.call(request()).await.map_err(|e| e.to_string())?;
        let status = tonic::Status::from_header_map(response.headers());
        match status {
            Some(status) if status.code() == tonic::Code::Unimplemented => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    #[tokio::test]
    async fn concurrent_calls_on_a_new_channel_open_one_connection() {
        let (listener, address) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        serve(listener, accepted.clone());
        let channel = ClientChannel::new(&address, None, Duration::from_secs(5)).expect("channel");
        let calls = (0..8).map(|_| {
            let mut channel = channel.clone();
            async move { answered(&mut channel).await }
        });
        for answer in futures::future::join_all(calls).await {
            answer.expect("answered");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The call that finds the connection broken fails as a transport error (the clerk's cue to try
    /// another server); the channel connects again for the next one.
    #[tokio::test]
    async fn a_broken_connection_fails_its_call_and_the_next_call_reconnects() {
        let (listener, address) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        // The first connection is accepted and closed at once; then the listener serves.
        let (first, listener) = {
            let mut channel =
                ClientChannel::new(&address, None, Duration::from_secs(5)).expect("channel");
            let call = tokio::spawn(async move {
                let failed = answered(&mut channel).await;
                (channel, failed)
            });
            let (connection, _) = listener.accept().await.expect("accept");
            drop(connection);
            (call.await.expect("call"), listener)
        };
        let (mut channel, failed) = first;
        // hyper's "connection closed": CANCELLED, as tonic maps it, and a transport error.
        let error = failed.expect_err("a call over a closed connection");
        assert!(error.contains("transport error"), "{error}");
        assert!(error.contains("cancel"), "{error}");
        serve(listener, accepted.clone());
        answered(&mut channel).await.expect("the next call");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_is_unavailable_within_the_connect_timeout() {
        // A port nothing listens on: bound, then closed.
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").to_string()
        };
        let mut channel =
            ClientChannel::new(&address, None, Duration::from_secs(5)).expect("channel");
        let error = channel.call(request()).await.expect_err("nothing listens");
        let status = tonic::Status::from_error(error);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(
            status
                .message()
                .starts_with(&format!("cannot connect to {address}")),
            "{status}"
        );
    }

    /// With TLS a call is served; a plaintext client at a TLS port fails as a transport error, which
    /// is what makes the clerk probe the port and say "requires TLS" at once instead of retrying.
    #[tokio::test]
    async fn tls_calls_are_served_and_plaintext_ones_fail_as_transport_errors() {
        use super::super::{certs, Security};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        certs::init(&ca, "test", 1).expect("CA");
        let load = |role: &str, name: &str| {
            let issued = certs::issue(&ca, role, name, &[], 1).expect("certificate");
            Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).expect("load")
        };
        let (listener, address) = listen().await;
        let server = load("kv", "1")
            .server()
            .expect("server")
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(super::super::incoming(listener));
        tokio::spawn(server);
        let timeout = Duration::from_secs(5);
        let mut tls = load("client", "user")
            .channel(&address, None, timeout)
            .expect("channel");
        answered(&mut tls).await.expect("a TLS call");
        let mut plaintext = Security::Insecure
            .channel(&address, None, timeout)
            .expect("channel");
        let error = answered(&mut plaintext)
            .await
            .expect_err("plaintext was served");
        assert!(error.contains("transport error"), "{error}");
    }

    #[test]
    fn an_address_without_a_port_is_refused_when_the_channel_is_made() {
        for bad in ["localhost", "http://", "a b:1", "user@host:7"] {
            assert!(
                ClientChannel::new(bad, None, Duration::from_secs(1)).is_err(),
                "{bad} was taken"
            );
        }
        for good in [
            "127.0.0.1:7",
            "http://127.0.0.1:7/",
            "https://[::1]:7/x",
            "kv-1:7",
        ] {
            assert!(
                ClientChannel::new(good, None, Duration::from_secs(1)).is_ok(),
                "{good} was refused"
            );
        }
    }
}
