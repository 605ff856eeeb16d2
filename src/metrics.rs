//! Prometheus metrics over HTTP (`GET /metrics`), for the daemons' `--metrics-listen`.
//!
//! Gauges that mirror state the node already tracks (term, role, indices, sizes) are read from the node's
//! status when Prometheus scrapes, so the hot path pays nothing for them; counters and histograms that
//! need an event (requests, latency, snapshots) are updated where the event happens ([`ServiceMetrics`]).

use crate::raft::{RaftHandle, Role};
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serve `registry` at `/metrics` on `listener` until the task is dropped. `refresh` runs before each
/// scrape to update gauges read from elsewhere.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let listener = crate::security::BoundedListener::new(
        listener,
        crate::limits::MAX_METRICS_CONNECTIONS,
        crate::limits::METRICS_CONNECTION_LIFETIME,
    );
    serve_on(listener, registry, refresh).await
}

/// [`serve`] on a listener of given bounds.
async fn serve_on(
    listener: crate::security::BoundedListener,
    registry: Registry,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            let refresh = refresh.clone();
            async move {
                refresh();
                let mut body = Vec::new();
                match TextEncoder::new().encode(&registry.gather(), &mut body) {
                    Ok(()) => (axum::http::StatusCode::OK, body),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        e.to_string().into_bytes(),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Gauges of one Raft node, refreshed from its status.
#[derive(Clone)]
pub struct RaftGauges {
    term: IntGauge,
    role: IntGaugeVec,
    commit: IntGauge,
    applied: IntGauge,
    last_index: IntGauge,
    snapshot_index: IntGauge,
    raft_state_bytes: IntGauge,
    snapshot_bytes: IntGauge,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let gauge = IntGauge::new(name, help)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

impl RaftGauges {
    /// Register the gauges in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let role = IntGaugeVec::new(
            Opts::new(
                "ds824_raft_role",
                "1 for the role this node has, 0 for the others",
            ),
            &["role"],
        )?;
        registry.register(Box::new(role.clone()))?;
        Ok(RaftGauges {
            term: gauge(registry, "ds824_raft_term", "Current Raft term")?,
            role,
            commit: gauge(
                registry,
                "ds824_raft_commit_index",
                "Highest index known committed",
            )?,
            applied: gauge(
                registry,
                "ds824_raft_applied_index",
                "Highest index handed to the service",
            )?,
            last_index: gauge(registry, "ds824_raft_last_index", "Last index in the log")?,
            snapshot_index: gauge(
                registry,
                "ds824_raft_snapshot_index",
                "Index the latest snapshot covers",
            )?,
            raft_state_bytes: gauge(
                registry,
                "ds824_raft_state_bytes",
                "Bytes of persisted log and hard state",
            )?,
            snapshot_bytes: gauge(
                registry,
                "ds824_raft_snapshot_bytes",
                "Bytes of the stored snapshot",
            )?,
        })
    }

    /// Copy the node's current status into the gauges.
    pub fn refresh(&self, handle: &RaftHandle) {
        let status = handle.status();
        let raft = &status.raft;
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(as_gauge(raft.term));
        self.commit.set(as_gauge(raft.commit));
        self.applied.set(as_gauge(raft.applied));
        self.last_index.set(as_gauge(raft.last_index));
        self.snapshot_index.set(as_gauge(raft.snapshot_index));
        self.raft_state_bytes.set(as_gauge(status.raft_state_bytes));
        self.snapshot_bytes.set(as_gauge(status.snapshot_bytes));
        for role in [
            Role::Follower,
            Role::PreCandidate,
            Role::Candidate,
            Role::Leader,
        ] {
            self.role
                .with_label_values(&[&role.to_string()])
                .set(i64::from(raft.role == role));
        }
    }
}

/// Counters and histograms of a replicated service's requests.
#[derive(Clone)]
pub struct ServiceMetrics {
    requests: IntCounterVec,
    latency: Histogram,
    snapshots: IntCounter,
}

impl ServiceMetrics {
    /// Register the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "ds824_requests_total",
                "Client requests by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        let latency = Histogram::with_opts(HistogramOpts::new(
            "ds824_request_seconds",
            "Time from a request's arrival to its answer (commit and apply for writes)",
        ))?;
        let snapshots = IntCounter::new("ds824_snapshots_total", "Snapshots this node took")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(snapshots.clone()))?;
        Ok(ServiceMetrics {
            requests,
            latency,
            snapshots,
        })
    }

    /// Count one request of `kind` (read/write) that ended with `outcome`, taking `seconds`.
    pub fn observe(&self, kind: &str, outcome: &str, seconds: f64) {
        self.requests.with_label_values(&[kind, outcome]).inc();
        self.latency.observe(seconds);
    }

    /// Count a snapshot.
    pub fn snapshot_taken(&self) {
        self.snapshots.inc();
    }
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A scrape on a new connection: the status line's first bytes, or what went wrong.
    async fn scrape(address: std::net::SocketAddr) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok(String::from_utf8_lossy(&head).into_owned())
    }

    /// A metrics endpoint on a free port, with at most `bound` connections of `lifetime`.
    async fn endpoint(bound: usize, lifetime: std::time::Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let listener = crate::security::BoundedListener::new(listener, bound, lifetime);
        tokio::spawn(serve_on(listener, Registry::new(), Arc::new(|| {})));
        address
    }

    /// The metrics endpoint holds at most its bound of connections: with the bound held by idle
    /// connections a scrape waits, and it is answered once one of them closes.
    #[tokio::test]
    async fn the_metrics_endpoint_holds_at_most_its_bound_of_connections() {
        let address = endpoint(2, std::time::Duration::from_secs(600)).await;
        assert_eq!(scrape(address).await.expect("scrape"), "HTTP/1.1 200");
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        let waiting = tokio::spawn(scrape(address));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "a scrape beyond the bound was answered"
        );
        idle.pop();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("answered once a connection closed")
            .expect("task");
        assert_eq!(answered.expect("scrape"), "HTTP/1.1 200");
    }

    /// An idle connection to the metrics endpoint is closed once its lifetime is up, freeing its
    /// slot (axum itself would hold it as long as the client likes).
    #[tokio::test]
    async fn an_idle_metrics_connection_is_closed_when_its_lifetime_is_up() {
        let address = endpoint(1, std::time::Duration::from_secs(2)).await;
        let mut idle = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut [0; 16]))
                .await
                .expect("closed within its lifetime and then some");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(scrape(address).await.expect("scrape"), "HTTP/1.1 200");
    }
}
