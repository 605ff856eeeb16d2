//! The clerks' connection to one server: gRPC straight over h2's HTTP/2 client.
//!
//! # Why not tonic's `Channel`, nor hyper's client
//!
//! tonic's `Channel` puts a tower `Buffer` in front of every request: the call is handed to a worker
//! task through a channel, and that task hands it to hyper's connection. hyper's HTTP/2 client, under
//! it, hands each request to its connection task through another channel, and spawns a task per
//! request to wait for the answer and pass it back. A clerk sends one request at a time and waits for
//! its answer, so each of these is a task wake-up and a hop per call that buys it nothing. Here the
//! calling task opens the stream, writes the request and reads the answer itself; only the
//! connection's own task (h2's, which does the socket I/O) runs besides it.
//!
//! Measured on the 2-core CI VM, 64 clients reading through lease reads from a 3-node cluster on
//! loopback, the client sharing the machine: through tonic's `Channel` → hyper's `SendRequest`,
//! 41.2k → 43.5k gets/s; hyper's → h2's, the client's CPU per get fell from 42–55 µs to 25–33 µs and
//! the leader's from 43–54 µs to 27–39 µs (it receives each request as one write), and throughput rose
//! 27–58 % (3 alternating rounds on a noisy host). The Raft peer links keep `Channel`: they open one
//! stream and send every message on it, so its layers are crossed once per connection, not per message.
//!
//! # What it keeps of `Channel`
//!
//! - It connects lazily, on the first call, and again after the connection broke or went away: a
//!   call that finds it so before sending connects anew itself; a call already sent on it fails (and
//!   the clerk retries). The connect timeout bounds each TCP
//!   connect to one of the name's addresses, as tonic's did; name resolution, the TLS handshake and
//!   the wait for a TLS server's first answer (below) are bounded by the caller's attempt timeout
//!   (every clerk attempt has one).
//! - The same security: plaintext, or TLS with the cluster CA, this process's certificate, ALPN `h2` and
//!   the server name the caller requires ([`super::Security::channel`]).
//! - hyper's HTTP/2 windows (2 MiB per stream, 5 MiB per connection), so a backup downloads as fast.
//! - Failures as gRPC names transport failures: a connection that cannot be made is UNAVAILABLE
//!   saying [`NOT_CONNECTED`] (nothing was sent: the clerk may send the request elsewhere as not acted
//!   on); one that broke or closed under a call is UNAVAILABLE saying `transport error` (the clerk's
//!   cue to probe whether a plaintext client faces a TLS server; tonic said CANCELLED for a closed one);
//!   an HTTP/2 error gets the code tonic gives its reason. The cause (an I/O error, a rustls error for
//!   a TLS failure in the handshake) is the status's source, which [`super::is_tls_failure`] looks
//!   for. (A TLS alert after the handshake, as TLS 1.3 servers send when they refuse a client
//!   certificate, reaches us through h2 as text only, as it did through hyper.)
//! - A new TLS connection is handed out once the server answered a PING ([`Confirm`]): a TLS 1.3
//!   server's refusal of the client's certificate fails the connect, before any request was sent
//!   on it, so the clerk knows that nothing was acted on.
//! - A connection that opens no more streams (GOAWAY, stream ids used up) is replaced on the call
//!   that finds it so, not when its task ends (which waits for the calls still on it), and at most
//!   [`MAX_CALLS_IN_FLIGHT`] calls are in flight on one, as hyper let only one wait to open.
//! - Requests are sent whole: every request a clerk makes is one message (answers may stream).
//!
//! # What it adds
//!
//! Pings while calls are in flight ([`KeepAlive`]): a server gone silent (its host vanished, or a
//! partition cut it off) without closing the connection is given up within seconds, and the next
//! call connects anew. tonic's `Channel`, as the clerks used it, had none: every call to that server
//! waited out its deadline on the dead connection, until TCP gave up on it (about 15 minutes) or, once
//! the partition healed, until TCP's next retransmission got through (its interval doubles up to 2
//! minutes).

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::Status;
use tracing::debug;

/// What a call over a [`ClientChannel`] fails with: a [`Status`], which tonic passes on as it is.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 windows and limits, as hyper's client sets them (h2's own defaults are the protocol's
/// 64 KiB windows, which would hold a backup download to a window per round trip, and no bound on the
/// streams opened before the server's SETTINGS arrive).
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
const MAX_HEADER_LIST: u32 = 16 << 10;
const INITIAL_MAX_STREAMS: usize = 100;

/// Calls in flight on one connection at most; more wait for one to end. Our servers allow as many
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`); without this bound a server that allowed fewer (or none) would
/// have h2 queue every call beyond it, and keep each abandoned one's request until the connection ends.
const MAX_CALLS_IN_FLIGHT: usize = crate::limits::MAX_REQUESTS_PER_CONNECTION as usize;

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
    /// Pings that find a server gone silent ([`KeepAlive`]).
    keep_alive: Option<KeepAlive>,
    /// The live connection, if any.
    live: Mutex<Option<Connection>>,
    /// Held while connecting: concurrent calls on a cold channel open one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
    /// Requests handed to a connection so far ([`ClientChannel::requests_sent`]).
    requests_sent: AtomicU64,
}

/// One HTTP/2 connection: the handle that opens streams on it, the task that drives it (its end is
/// the connection's: closed by either side or broken), the bound on its calls in flight, and how its
/// keep-alive hears that a call started ([`KeepAlive::run`]).
#[derive(Clone)]
struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    driver: Arc<JoinHandle<()>>,
    calls: Arc<tokio::sync::Semaphore>,
    started: Arc<tokio::sync::Notify>,
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
        keep_alive: Option<KeepAlive>,
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
                keep_alive,
                live: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                requests_sent: AtomicU64::new(0),
            }),
        })
    }

    /// How many requests calls on this channel (and its clones) have handed to a connection. A call
    /// that failed or ran out of time while this stayed the same failed before its request went out
    /// (connecting, or waiting for a stream), so no server can have acted on it.
    pub(crate) fn requests_sent(&self) -> u64 {
        self.shared.requests_sent.load(Ordering::SeqCst)
    }

    /// Count a request as sent without sending one: for tests of what a sent request changes.
    #[cfg(test)]
    pub(crate) fn pretend_sent(&self) {
        self.shared.requests_sent.fetch_add(1, Ordering::SeqCst);
    }

    /// The live connection, if it has not ended.
    fn live(&self) -> Option<Connection> {
        let live = self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        live.as_ref().filter(|c| !c.driver.is_finished()).cloned()
    }

    /// A live connection: the current one, or a new one (one connect at a time).
    async fn connection(&self) -> Result<Connection, Status> {
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let _connecting = self.shared.connecting.lock().await;
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let connection = self.connect().await?;
        *self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    /// Stop using the connection `dead` drives (if it is still the live one): it opens no more
    /// streams. Its task may run on for a while (until the calls still on it end), so its end cannot
    /// tell.
    fn forget(&self, dead: &Arc<JoinHandle<()>>) {
        let mut live = self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if live.as_ref().is_some_and(|c| Arc::ptr_eq(&c.driver, dead)) {
            *live = None;
        }
    }

    /// A stream opener ready for one more call, and the permit that counts the call in flight. A
    /// connection that opens no more streams (the server said GOAWAY, its stream ids ran out, it
    /// broke) is replaced at once, once: nothing was sent on it.
    async fn ready(
        &self,
    ) -> Result<(h2::client::SendRequest<Bytes>, OwnedSemaphorePermit), Status> {
        let mut tries = 0;
        loop {
            // Taken apart, not cloned: each clone and drop of h2's `SendRequest` takes the connection's
            // stream lock.
            let Connection {
                sender,
                driver,
                calls,
                started,
            } = self.connection().await?;
            let permit = calls
                .acquire_owned()
                .await
                .map_err(|_| Status::internal("the connection's call bound was closed"))?;
            started.notify_one();
            match sender.ready().await {
                Ok(sender) if sender.current_max_send_streams() == 0 => {
                    // h2 would queue the call until the server allows a stream, which it may never.
                    return Err(Status::unavailable(format!(
                        "transport error: {} allows no requests on this connection now",
                        self.shared.host
                    )));
                }
                Ok(sender) => return Ok((sender, permit)),
                Err(e) => {
                    self.forget(&driver);
                    tries += 1;
                    if tries == 2 {
                        return Err(transport_error(e, "connection"));
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Connection, Status> {
        let host = &self.shared.host;
        let tcp = self.connect_tcp().await?;
        // Requests and answers are small writes each waiting for the other side: never delay them.
        tcp.set_nodelay(true).map_err(|e| connect_failed(host, e))?;
        match &self.shared.tls {
            None => handshake(host, tcp, self.shared.keep_alive, Confirm::No).await,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| connect_failed(host, e))?;
                // Our servers speak HTTP/2 only; anything else there is not one of them.
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(connect_failed(
                        host,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the server did not agree to HTTP/2 (ALPN h2)",
                        ),
                    ));
                }
                handshake(host, tls, self.shared.keep_alive, Confirm::FirstAnswer).await
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

    /// One gRPC call: the request, whole, on a new stream of the live connection; the answer's
    /// headers, with its body (messages and trailers) read as the caller polls it.
    async fn send(
        self,
        request: http::Request<Body>,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let (mut head, body) = request.into_parts();
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(self.shared.scheme.clone());
        uri.authority = Some(self.shared.authority.clone());
        head.uri = http::Uri::from_parts(uri)
            .map_err(|e| Status::internal(format!("request URI: {e}")))?;
        // A clerk's request is one message, encoded as soon as it is polled: sent as one DATA frame
        // that ends the stream, right behind the headers.
        let message = body.collect().await?.to_bytes();
        let (mut sender, permit) = self.ready().await?;
        // From here the server may get the request.
        self.shared.requests_sent.fetch_add(1, Ordering::SeqCst);
        let (response, mut stream) = sender
            .send_request(http::Request::from_parts(head, ()), message.is_empty())
            .map_err(|e| transport_error(e, "request"))?;
        if !message.is_empty() {
            stream
                .send_data(message, true)
                .map_err(|e| transport_error(e, "request"))?;
        }
        let (head, recv) = response
            .await
            .map_err(|e| transport_error(e, "response"))?
            .into_parts();
        Ok(http::Response::from_parts(
            head,
            ResponseBody {
                recv,
                data_done: false,
                done: false,
                _call: permit,
            },
        ))
    }
}

/// Whether a new connection waits for the server's first answer before any call is sent on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Confirm {
    No,
    /// TLS 1.3: the server judges this client's certificate after the client's side of the handshake
    /// is done, and says it refused it (an alert) only with its next bytes. A request sent before
    /// then fails with the alert, or, when h2 notices first, as an "inactive stream" that names no
    /// cause; either way the clerk cannot tell it from a request the server took. A PING answered
    /// first (one round trip per connection) settles it: a refusal fails the connect, before
    /// anything was sent.
    FirstAnswer,
}

/// Start HTTP/2 on `io`; the connection is driven by a task of its own until either side closes it
/// (or every handle on it is dropped).
async fn handshake<T>(
    host: &str,
    io: T,
    keep_alive: Option<KeepAlive>,
    confirm: Confirm,
) -> Result<Connection, Status>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_max_send_streams(INITIAL_MAX_STREAMS)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| transport_error(e, &format!("HTTP/2 with {host}")))?;
    let mut ping_pong = connection.ping_pong();
    if let (Confirm::FirstAnswer, Some(first)) = (confirm, ping_pong.as_mut()) {
        let failed = tokio::select! {
            // The connection's own error is the cause (a PING failed with it says less).
            biased;
            closed = &mut connection => Some(match closed {
                Err(error) => unanswered(host, error),
                Ok(()) => connect_failed(
                    host,
                    std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server closed the connection before answering",
                    ),
                ),
            }),
            pong = first.ping(h2::Ping::opaque()) => pong.err().map(|e| unanswered(host, e)),
        };
        if let Some(status) = failed {
            return Err(status);
        }
    }
    let host = host.to_string();
    let calls = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT));
    let started = Arc::new(tokio::sync::Notify::new());
    let pings = keep_alive
        .zip(ping_pong)
        .map(|(keep_alive, ping_pong)| keep_alive.run(ping_pong, calls.clone(), started.clone()));
    let driver = tokio::spawn(async move {
        let silent = async {
            match pings {
                Some(pings) => pings.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            closed = &mut connection => if let Err(e) = closed {
                debug!(server = %host, error = %e, "client connection closed");
            },
            () = silent => {
                // Dropping the connection fails every call on it at once, and the next call connects
                // anew.
                debug!(server = %host, "the server stopped answering pings: connection dropped");
            }
        }
    });
    Ok(Connection {
        sender,
        driver: Arc::new(driver),
        calls,
        started,
    })
}

/// How a connection finds out that its server went silent: a server whose host vanished, or one cut
/// off by a network partition, never closes the TCP connection, and calls on it would each wait out
/// their deadline until TCP gives up (about 15 minutes), or until a retransmission gets through after
/// the partition healed (their interval doubles up to 2 minutes). With pings, the connection is
/// dropped once one goes unanswered for `timeout`, and the next call connects anew. Pings go only
/// while calls are in flight (as hyper's keep-alive by default), so an idle client costs its servers
/// nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    /// Time between pings (counted from the last answer).
    pub every: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub timeout: Duration,
}

/// The clerks' keep-alive: a silent server is given up within 6 s of the first unanswered ping, as
/// etcdctl's defaults (`--keepalive-time 2s --keepalive-timeout 6s`).
pub(crate) const CLIENT_KEEP_ALIVE: KeepAlive = KeepAlive {
    every: Duration::from_secs(2),
    timeout: Duration::from_secs(6),
};

impl KeepAlive {
    /// Ping while calls are in flight on the connection (`calls` lends each call in flight one of
    /// its permits; `started` is notified as each takes one), at most once per `every`, until a ping
    /// goes unanswered (or h2 fails it: the connection is ending anyway).
    ///
    /// An idle connection costs nothing: the task waits for a call to start, with no timer (it used
    /// to look for calls eight times per period). A call on a connection that has not answered a
    /// ping for `every` gets one at once; one in flight when the period ends, then. That ping is
    /// waited for even if the call gives up first (a clerk's attempt, 1–1.5 s, is shorter than the
    /// period): the connection is judged even when every attempt on it ends early.
    async fn run(
        self,
        mut ping_pong: h2::PingPong,
        calls: Arc<tokio::sync::Semaphore>,
        started: Arc<tokio::sync::Notify>,
    ) {
        // The handshake was the last answer.
        let mut answered = tokio::time::Instant::now();
        loop {
            if calls.available_permits() == MAX_CALLS_IN_FLIGHT {
                // A call that started since the last look left a permit: this returns at once.
                started.notified().await;
                continue;
            }
            let due = answered + self.every;
            if tokio::time::Instant::now() < due {
                tokio::time::sleep_until(due).await;
                continue;
            }
            let pong = tokio::time::timeout(self.timeout, ping_pong.ping(h2::Ping::opaque())).await;
            if !matches!(pong, Ok(Ok(_))) {
                return;
            }
            answered = tokio::time::Instant::now();
        }
    }
}

/// How a connection that could not be made begins its status message: nothing was sent on it, so the
/// clerk may send the request elsewhere as not acted on.
pub const NOT_CONNECTED: &str = "cannot connect to";

/// A connection that could not be made: unavailable (the clerk tries elsewhere), with the cause kept.
fn connect_failed(host: &str, error: std::io::Error) -> Status {
    let mut status = Status::unavailable(format!("{NOT_CONNECTED} {host}: {error}"));
    status.set_source(Arc::new(error));
    status
}

/// A new connection that failed before the server's first answer: nothing was sent on it. An I/O
/// error (a TLS alert among them) is the cause, as for any connect; h2's own error is kept as h2's (a
/// GOAWAY's text carries debug data the server chose, which must not pass for a TLS failure this
/// process saw: [`super::is_tls_failure`] reads only I/O errors' text).
fn unanswered(host: &str, error: h2::Error) -> Status {
    if error.is_io() {
        let io = error
            .into_io()
            .unwrap_or_else(|| std::io::Error::other("connection failed"));
        return connect_failed(host, io);
    }
    let mut status = Status::unavailable(format!("{NOT_CONNECTED} {host}: {error}"));
    status.set_source(Arc::new(error));
    status
}

/// A call the connection failed, with a message saying `transport error` (the clerk's cue to probe
/// whether a plaintext client faces a TLS server). A broken or closed connection is UNAVAILABLE, with
/// the I/O error as the source (h2 keeps only its kind and text: a TLS alert after the handshake reads
/// as text, not as a rustls error). So is a stream the server will not serve because it is going away
/// (GOAWAY: not processed, so safe to send elsewhere). Any other HTTP/2 error gets the code tonic gives
/// its reason (a refused stream: UNAVAILABLE, a cancel: CANCELLED, ...), with tonic's status as the
/// source.
fn transport_error(error: h2::Error, what: &str) -> Status {
    let going_away = error.is_go_away() && error.is_remote();
    if error.is_io() {
        let io = error
            .into_io()
            .unwrap_or_else(|| std::io::Error::other("connection failed"));
        let mut status = Status::unavailable(format!("transport error: {what}: {io}"));
        status.set_source(Arc::new(io));
        return status;
    }
    let mapped = Status::from_error(Box::new(error));
    let code = if going_away {
        tonic::Code::Unavailable
    } else {
        mapped.code()
    };
    let mut status = Status::new(
        code,
        format!("transport error: {what}: {}", mapped.message()),
    );
    status.set_source(Arc::new(mapped));
    status
}

/// An answer's body, as tonic reads it: the DATA frames (their flow-control capacity handed back as
/// they are taken, so the server may send more), then the trailers that carry the gRPC status.
#[derive(Debug)]
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
    /// Counts the call in flight on its connection until the answer is read or dropped.
    _call: OwnedSemaphorePermit,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, which the next poll reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(transport_error(e, "response body"))));
                }
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(transport_error(e, "response trailers")))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl tower_service::Service<http::Request<Body>> for ClientChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is the connection's, which the call waits for (it may have to connect first).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move { Ok(channel.send(request).await?) })
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
        let incoming = super::super::serve::incoming(listener).map(move |connection| {
            accepted.fetch_add(1, Ordering::SeqCst);
            connection
        });
        let server = tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming);
        tokio::spawn(server);
    }

    /// A channel to `address` that pings every `every` ms while calls are in flight and gives the
    /// server `timeout` ms to answer.
    fn pinging(address: &str, every: u64, timeout: u64) -> ClientChannel {
        let keep_alive = super::KeepAlive {
            every: Duration::from_millis(every),
            timeout: Duration::from_millis(timeout),
        };
        ClientChannel::new(address, None, Duration::from_secs(5), Some(keep_alive))
            .expect("channel")
    }

    /// The first connection `listener` accepts, as a bare h2 server, and the first call on it.
    async fn first_stream(
        listener: &tokio::net::TcpListener,
    ) -> (
        h2::server::Connection<tokio::net::TcpStream, bytes::Bytes>,
        (
            http::Request<h2::RecvStream>,
            h2::server::SendResponse<bytes::Bytes>,
        ),
    ) {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut connection = h2::server::handshake(tcp).await.expect("handshake");
        let stream = connection
            .accept()
            .await
            .expect("a request")
            .expect("a stream");
        (connection, stream)
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
        let channel =
            ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
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
                ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
            let call = tokio::spawn(async move {
                let failed = answered(&mut channel).await;
                (channel, failed)
            });
            let (connection, _) = listener.accept().await.expect("accept");
            drop(connection);
            (call.await.expect("call"), listener)
        };
        let (mut channel, failed) = first;
        // A transport failure, as gRPC names it: UNAVAILABLE, and a transport error.
        let error = failed.expect_err("a call over a closed connection");
        assert!(error.contains("transport error"), "{error}");
        assert!(error.contains("currently unavailable"), "{error}");
        serve(listener, accepted.clone());
        tokio::time::timeout(Duration::from_secs(10), answered(&mut channel))
            .await
            .expect("the next call waited")
            .expect("the next call");
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
            ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
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
        let server = load("kv", "1");
        tokio::spawn(async move {
            server
                .serve(
                    tonic::service::Routes::default(),
                    listener,
                    super::super::Admit::Cluster,
                    std::future::pending(),
                )
                .await
        });
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

    /// A server that refuses this client's certificate (issued by another CA; TLS 1.3 says so with an
    /// alert after the client's handshake is done) fails the connect, before any request went out:
    /// the failure is a TLS failure, and the clerk may take it as refused before acting. (Without
    /// waiting for the server's first answer, the alert arrived with the request: as the request's or
    /// the answer's transport error, or h2's "inactive stream" with the alert lost.)
    #[tokio::test]
    async fn a_refused_client_certificate_fails_the_connect_before_any_request_is_sent() {
        use super::super::{certs, is_tls_failure, tls_server_for_test, Security};
        let dir = tempfile::tempdir().expect("temp dir");
        let address = tls_server_for_test(dir.path()).await.to_string();
        let (ca, other) = (dir.path().join("ca"), dir.path().join("other"));
        certs::init(&other, "test", 1).expect("another CA");
        let stranger = certs::issue(&other, "client", "user", &[], 1).expect("certificate");
        let stranger =
            Security::load_tls(&ca.join("ca.pem"), &stranger.cert, &stranger.key).expect("load");
        for _ in 0..20 {
            let mut channel = stranger
                .channel(&address, None, Duration::from_secs(5))
                .expect("channel");
            let error = channel
                .call(request())
                .await
                .expect_err("a refused certificate");
            let status = error.downcast::<tonic::Status>().expect("a status");
            assert!(is_tls_failure(&status), "{status:?}");
            assert!(
                status.message().starts_with(super::NOT_CONNECTED),
                "{status:?}"
            );
        }
    }

    /// The request's message reaches the server whole, and an answer far larger than the HTTP/2
    /// windows (a backup download) arrives whole: the channel hands back flow-control capacity as the
    /// body is read, or the server would stall at the first window.
    #[tokio::test]
    async fn a_request_arrives_whole_and_an_answer_larger_than_the_windows_is_read_whole() {
        use bytes::Bytes;
        use http_body_util::BodyExt;
        const ANSWER: usize = 3 * super::CONNECTION_WINDOW as usize;
        let (listener, address) = listen().await;
        let server = tokio::spawn(async move {
            let (mut connection, (request, mut respond)) = first_stream(&listener).await;
            // The connection must go on being driven while the answer is sent.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut body = request.into_body();
            let mut received = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.expect("request data");
                let _ = body.flow_control().release_capacity(data.len());
                received.extend_from_slice(&data);
            }
            let head = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .expect("response");
            let mut send = respond.send_response(head, false).expect("headers");
            let mut left = ANSWER;
            while left > 0 {
                send.reserve_capacity(left.min(1 << 16));
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("stream open");
                send.send_data(Bytes::from(vec![7u8; granted]), false)
                    .expect("data");
                left -= granted;
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            send.send_trailers(trailers).expect("trailers");
            received
        });
        let mut channel =
            ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
        let mut call = request();
        *call.body_mut() = tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(
            b"the request's message",
        )));
        let read = async {
            let response = channel.call(call).await.expect("answered");
            response.into_body().collect().await.expect("the body")
        };
        let body = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the answer stalled");
        let trailers = body.trailers().cloned().expect("trailers");
        assert_eq!(trailers.get("grpc-status").expect("grpc-status"), "0");
        let data = body.to_bytes();
        assert_eq!(data.len(), ANSWER);
        assert!(data.iter().all(|&b| b == 7));
        assert_eq!(server.await.expect("server"), b"the request's message");
    }

    /// A server going away (GOAWAY) opens no more streams on that connection, which stays up until
    /// the calls still on it end: the next call goes on a new connection at once, instead of failing
    /// until the old one's last call is over (or, with stream ids used up, for ever).
    #[tokio::test]
    async fn a_connection_going_away_is_replaced_on_the_next_call_while_its_calls_finish() {
        let (listener, address) = listen().await;
        let channel =
            ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
        let mut held = channel.clone();
        let first = tokio::spawn(async move { held.call(request()).await.map(|_| ()) });
        let (mut connection, (_request, respond)) = first_stream(&listener).await;
        connection.graceful_shutdown();
        // Driven on, with the first call's stream open, the old connection stays up.
        let old = tokio::spawn(async move { while connection.accept().await.is_some() {} });
        let going = channel.live().expect("connected");
        let goaway_seen = async {
            while going.sender.clone().ready().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), goaway_seen)
            .await
            .expect("the client saw the GOAWAY");
        assert!(!going.driver.is_finished(), "the old connection ended");
        let accepted = Arc::new(AtomicUsize::new(0));
        serve(listener, accepted.clone());
        let mut next = channel.clone();
        answered(&mut next).await.expect("the next call");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert!(
            !first.is_finished(),
            "the first call ended with its stream open"
        );
        drop(respond);
        first.abort();
        old.abort();
    }

    /// A server that went silent (it stopped reading its connection, as a host that vanished or a
    /// partition looks from the client) fails the call in flight once a ping goes unanswered, and
    /// the next call connects anew; without pings the call waited for ever.
    #[tokio::test]
    async fn a_silent_server_is_given_up_once_a_ping_goes_unanswered() {
        let (listener, address) = listen().await;
        let channel = pinging(&address, 100, 200);
        let mut held = channel.clone();
        let first = tokio::spawn(async move { held.call(request()).await.map(|_| ()) });
        let (connection, stream) = first_stream(&listener).await;
        // From here on nothing reads the connection (it is kept open, never polled): no answer,
        // no pong.
        let silent = tokio::spawn(async move {
            let _kept = (connection, stream);
            std::future::pending::<()>().await
        });
        let failed = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the call failed once the server stopped answering pings")
            .expect("call task");
        let error = failed.expect_err("a silent server cannot answer");
        let status = error.downcast::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("transport error"), "{status:?}");
        let accepted = Arc::new(AtomicUsize::new(0));
        serve(listener, accepted.clone());
        let mut next = channel.clone();
        answered(&mut next).await.expect("the next call");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the next call connected anew"
        );
        silent.abort();
    }

    /// An idle connection is not pinged: a server that stopped reading after answering keeps the
    /// connection as long as no call is made (pings in each of these 5 periods would have ended it).
    #[tokio::test]
    async fn an_idle_connection_is_not_pinged() {
        let (channel, server) = answered_then_silent(200, 50).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let live = channel.live().expect("the idle connection was kept");
        assert!(!live.driver.is_finished());
        server.abort();
    }

    /// A call that gives up before any ping period ends still gets the connection pinged, and
    /// judged: a clerk's attempts are shorter than the period, and checking for calls in flight only
    /// at each period's end missed them.
    #[tokio::test]
    async fn a_short_call_on_a_silent_connection_gets_it_pinged_and_dropped() {
        let (channel, server) = answered_then_silent(400, 200).await;
        // Past the first period since the handshake; then one attempt of 100 ms, given up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut attempt = channel.clone();
        let gave_up = tokio::time::timeout(Duration::from_millis(100), async move {
            attempt.call(request()).await.map(|_| ())
        })
        .await;
        assert!(gave_up.is_err(), "a silent server answered");
        let live = channel.live().expect("still the live connection");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !live.driver.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection was dropped once its ping went unanswered");
        server.abort();
    }

    /// A channel pinging as [`pinging`] says, connected to a server that answered its first call and
    /// then fell silent ([`answer_once_then_fall_silent`]); the server's task, to abort.
    async fn answered_then_silent(
        every: u64,
        timeout: u64,
    ) -> (ClientChannel, tokio::task::JoinHandle<()>) {
        let (listener, address) = listen().await;
        let mut channel = pinging(&address, every, timeout);
        let server = tokio::spawn(answer_once_then_fall_silent(listener));
        answered(&mut channel).await.expect("answered");
        (channel, server)
    }

    /// A server that answers the first call (UNIMPLEMENTED) on the first connection `listener`
    /// accepts, then never reads that connection again (kept open): no answers, no pongs.
    async fn answer_once_then_fall_silent(listener: tokio::net::TcpListener) {
        let (mut connection, (_, mut respond)) = first_stream(&listener).await;
        let answer = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "12")
            .body(())
            .expect("answer");
        respond.send_response(answer, true).expect("answered");
        // Flushed to the client by polling the connection until it has nothing left to send.
        let _ = tokio::time::timeout(Duration::from_millis(200), connection.accept()).await;
        std::future::pending::<()>().await;
        drop(connection);
    }

    /// A server that allows no streams gets calls failed at once as unavailable, not queued in h2
    /// until the caller gives up (and kept there with their requests).
    #[tokio::test]
    async fn a_server_that_allows_no_streams_fails_calls_at_once() {
        let (listener, address) = listen().await;
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::Builder::new()
                .max_concurrent_streams(0)
                .handshake::<_, bytes::Bytes>(tcp)
                .await
                .expect("handshake");
            while connection.accept().await.is_some() {}
        });
        let mut channel =
            ClientChannel::new(&address, None, Duration::from_secs(5), None).expect("channel");
        // The first call may go before the server's SETTINGS arrive (it is refused); the second
        // comes after them.
        for call in ["first", "second"] {
            let answer = tokio::time::timeout(Duration::from_secs(10), channel.call(request()))
                .await
                .unwrap_or_else(|_| panic!("the {call} call waited"));
            let status = tonic::Status::from_error(answer.expect_err("no stream is allowed"));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{call}: {status}");
        }
    }

    #[test]
    fn an_address_without_a_port_is_refused_when_the_channel_is_made() {
        for bad in ["localhost", "http://", "a b:1", "user@host:7"] {
            assert!(
                ClientChannel::new(bad, None, Duration::from_secs(1), None).is_err(),
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
                ClientChannel::new(good, None, Duration::from_secs(1), None).is_ok(),
                "{good} was refused"
            );
        }
    }
}
