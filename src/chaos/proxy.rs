//! The `slow` nemesis's TCP fault proxy: peer links made slow, jittery and breakable from outside
//! the processes, on a kernel without `tc netem`.
//!
//! [`FaultProxy::start`] listens on the host, once per node, and forwards each accepted connection
//! to that node's Raft port. The target redirects the nodes' outgoing peer connections to it with a
//! DNAT rule in each node's network namespace (and resets the connections that were open before,
//! so gRPC reconnects through the proxy). Bytes are forwarded unchanged — TLS passes through — but
//! each chunk read is delivered [`SlowLinks::delay`] plus a random share of [`SlowLinks::jitter`]
//! later, and with [`SlowLinks::reset_probability`] per chunk the connection is reset (both sides get
//! an RST).
//!
//! What a byte stream allows: TCP delivers a connection's bytes once and in order, so duplication
//! and reordering *within* a connection cannot be injected without breaking the stream (and TLS
//! would refuse it). What the proxy does instead is what makes Raft see them: messages on different
//! connections overtake each other (each chunk's delay is drawn apart, and a node talks to each peer
//! on its own connection, a request and its reply on two different ones), and a reset fails the
//! requests in flight, so the sender sends them again — the receiver then gets again what it had
//! already received before the reset. Delivery within a connection stays in order: a chunk is never
//! delivered before the one read before it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How the proxied links misbehave.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowLinks {
    /// Added to every chunk's delivery.
    pub delay: Duration,
    /// Up to this much more, drawn per chunk (uniformly).
    pub jitter: Duration,
    /// Chance per chunk that the connection is reset instead (0 = never).
    pub reset_probability: f64,
}

/// What the proxy did, for the record.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections the proxy reset on purpose.
    pub resets: AtomicU64,
    /// Bytes forwarded (both ways).
    pub bytes: AtomicU64,
}

/// Chunks in flight per direction of one connection before reading pauses (back-pressure instead of
/// memory: at 64 KiB a chunk, 16 MiB).
const QUEUED_CHUNKS: usize = 256;
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// How long a connection to the real node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The running proxy: one listener per target. [`FaultProxy::stop`] (or drop) closes every listener
/// and resets every connection, so the nodes reconnect — directly, once the redirection is gone.
pub struct FaultProxy {
    ports: Vec<u16>,
    stop: watch::Sender<bool>,
    stats: Arc<ProxyStats>,
}

impl FaultProxy {
    /// Listen on `bind` (an ephemeral port per target) and forward to `targets`, misbehaving as
    /// `links` says with randomness from `seed`.
    pub async fn start(
        bind: IpAddr,
        targets: &[SocketAddr],
        links: SlowLinks,
        seed: u64,
    ) -> std::io::Result<FaultProxy> {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(ProxyStats::default());
        let mut ports = Vec::new();
        for (i, &target) in targets.iter().enumerate() {
            let listener = TcpListener::bind((bind, 0)).await?;
            ports.push(listener.local_addr()?.port());
            let rng = ChaCha8Rng::seed_from_u64(seed ^ ((i as u64 + 1) << 32));
            tokio::spawn(accept_loop(
                listener,
                target,
                links,
                rng,
                stopped.clone(),
                stats.clone(),
            ));
        }
        Ok(FaultProxy { ports, stop, stats })
    }

    /// The port forwarding to `targets[i]`.
    pub fn port(&self, i: usize) -> Option<u16> {
        self.ports.get(i).copied()
    }

    /// What it did so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// A line for the record: connections, resets and bytes so far.
    pub fn summary(&self) -> String {
        format!(
            "{} connection(s) proxied, {} reset on purpose, {} bytes forwarded",
            self.stats.connections.load(Ordering::Relaxed),
            self.stats.resets.load(Ordering::Relaxed),
            self.stats.bytes.load(Ordering::Relaxed)
        )
    }

    /// Close every listener and reset every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    links: SlowLinks,
    mut rng: ChaCha8Rng,
    mut stopped: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let Ok((inbound, _)) = accepted else {
            // Out of descriptors, say: the node's connection attempt fails and it tries again.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let connection_rng = ChaCha8Rng::seed_from_u64(rng.random());
        tokio::spawn(forward(
            inbound,
            target,
            links,
            connection_rng,
            stopped.clone(),
            stats.clone(),
        ));
    }
}

/// Why one direction of a connection ended.
enum End {
    /// The sender closed its side (EOF) and everything read was delivered.
    Closed,
    /// A read or write failed.
    Failed,
    /// The proxy chose to reset the connection.
    Reset,
}

/// One proxied connection: both directions until both close, one fails or is reset, or the proxy
/// stops. Dropping the sockets with `SO_LINGER` 0 sends RST, so the node sees the break at once.
async fn forward(
    inbound: TcpStream,
    target: SocketAddr,
    links: SlowLinks,
    mut rng: ChaCha8Rng,
    mut stopped: watch::Receiver<bool>,
    stats: Arc<ProxyStats>,
) {
    let Ok(Ok(outbound)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    else {
        let _ = inbound.set_zero_linger();
        return;
    };
    for stream in [&inbound, &outbound] {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_zero_linger();
    }
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let up = pump(
        in_read,
        out_write,
        links,
        ChaCha8Rng::seed_from_u64(rng.random()),
        &stats,
    );
    let down = pump(
        out_read,
        in_write,
        links,
        ChaCha8Rng::seed_from_u64(rng.random()),
        &stats,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            end = &mut up, if !up_done => { up_done = true; end }
            end = &mut down, if !down_done => { down_done = true; end }
            _ = stopped.wait_for(|stop| *stop) => End::Failed,
        };
        match end {
            End::Closed => {}
            End::Reset => {
                stats.resets.fetch_add(1, Ordering::Relaxed);
                return;
            }
            End::Failed => return,
        }
    }
}

/// Copy `from` to `to`, each chunk delivered `delay` + up to `jitter` after it was read, never before
/// the chunk read before it. Reading and writing are separate tasks joined by a bounded queue, so a
/// slow link delays bytes without limiting throughput (up to [`QUEUED_CHUNKS`] in flight).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    links: SlowLinks,
    mut rng: ChaCha8Rng,
    stats: &ProxyStats,
) -> End {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return End::Failed;
            }
        }
        // The reader saw EOF: pass the half-close on.
        match to.shutdown().await {
            Ok(()) => End::Closed,
            Err(_) => End::Failed,
        }
    };
    let reader = async move {
        let mut last_due = Instant::now();
        loop {
            let mut chunk = vec![0; CHUNK];
            let n = match from.read(&mut chunk).await {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(_) => return End::Failed,
            };
            if links.reset_probability > 0.0 && rng.random_bool(links.reset_probability.min(1.0)) {
                return End::Reset;
            }
            chunk.truncate(n);
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            let jitter = links.jitter.mul_f64(rng.random::<f64>());
            let due = (Instant::now() + links.delay + jitter).max(last_due);
            last_due = due;
            if queue.send((due, chunk)).await.is_err() {
                return End::Failed;
            }
        }
    };
    tokio::pin!(writer, reader);
    // The reader ends first on EOF (then the writer drains the queue and half-closes); any other end
    // of either side ends the direction.
    tokio::select! {
        end = &mut reader => match end {
            End::Closed => writer.await,
            other => other,
        },
        end = &mut writer => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback: what it reads it writes back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        address
    }

    fn links(delay_ms: u64, jitter_ms: u64, reset: f64) -> SlowLinks {
        SlowLinks {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            reset_probability: reset,
        }
    }

    async fn proxied(links: SlowLinks) -> (FaultProxy, TcpStream) {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1".parse().expect("ip"), &[echo], links, 7)
            .await
            .expect("proxy");
        let port = proxy.port(0).expect("port");
        let client = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        (proxy, client)
    }

    /// Every byte arrives, in order, and no sooner than the delay (twice: there and back).
    #[tokio::test]
    async fn bytes_arrive_whole_in_order_and_late() {
        let (proxy, mut client) = proxied(links(40, 30, 0.0)).await;
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        let (mut r, mut w) = client.split();
        let writing = async {
            for piece in sent.chunks(10_000) {
                w.write_all(piece).await.expect("write");
            }
        };
        let mut received = vec![0; sent.len()];
        let reading = r.read_exact(&mut received);
        let ((), read) = tokio::join!(writing, reading);
        read.expect("read");
        assert!(received == sent, "bytes changed or reordered");
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "took {:?}: the delay was not applied both ways",
            started.elapsed()
        );
        assert_eq!(proxy.stats().connections.load(Ordering::Relaxed), 1);
        assert_eq!(
            proxy.stats().bytes.load(Ordering::Relaxed),
            2 * sent.len() as u64
        );
    }

    /// With resets on, a connection is broken with an RST (the client sees an error or EOF, never
    /// altered bytes), and the break is counted.
    #[tokio::test]
    async fn a_reset_breaks_the_connection_and_is_counted() {
        let (proxy, mut client) = proxied(links(0, 0, 1.0)).await;
        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the reset reached the client");
        assert!(matches!(read, Ok(0) | Err(_)), "got data: {read:?}");
        assert_eq!(proxy.stats().resets.load(Ordering::Relaxed), 1);
    }

    /// Stopping the proxy breaks its open connections and refuses new ones, so the nodes go back to
    /// direct links once the redirection is removed.
    #[tokio::test]
    async fn stopping_breaks_open_connections_and_closes_the_port() {
        let (proxy, mut client) = proxied(links(0, 0, 0.0)).await;
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");
        let port = proxy.port(0).expect("port");
        proxy.stop();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the stop reached the client");
        assert!(matches!(read, Ok(0) | Err(_)), "still open: {read:?}");
        // The listener goes with the stop (the accept loop ends and drops it).
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the port still accepts after stop");
    }
}
