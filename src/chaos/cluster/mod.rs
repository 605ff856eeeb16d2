//! Targets: a cluster the harness can start, break and tear down.
//!
//! The nemesis and the run speak only to [`Cluster`], so a new target (Kubernetes, say) is one
//! implementation of it: [`local`] is the network-namespace one, [`compose`] the docker-compose
//! cluster. Nodes are numbered from 0 here (node `i` is `kvd --id i+1`, or the `i`-th compose
//! service).

pub mod compose;
pub mod local;
pub mod netns;

use super::cmd::CommandError;
use super::proxy::SlowLinks;
use crate::kv::clerk::node_status;
use crate::security::certs::CertError;
use crate::security::{Security, SecurityError};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Why a cluster could not be started, faulted, healed or torn down.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// The network could not be made or changed.
    #[error(transparent)]
    Net(#[from] netns::NetError),
    /// A tool failed (sending a signal, ...).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The `kvd` binary is missing.
    #[error("kvd not found at {0} (build it, or pass --kvd PATH)")]
    KvdMissing(PathBuf),
    /// A server process could not be started.
    #[error("cannot start kvd node {node}: {source}")]
    Spawn {
        /// The node (1-based, as its id).
        node: usize,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory of the run could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The run's certificates could not be made.
    #[error("certificates: {0}")]
    Certs(#[from] CertError),
    /// The run's certificates could not be loaded.
    #[error("client TLS: {0}")]
    Security(#[from] SecurityError),
    /// No leader was elected in time.
    #[error("no leader within {0:?} (see the node logs under the run directory)")]
    NoLeader(Duration),
    /// The target is not as the run needs it (a compose service missing or stopped, ...).
    #[error("{0}")]
    Target(String),
    /// The fault proxy could not listen.
    #[error("fault proxy: {0}")]
    Proxy(#[source] std::io::Error),
    /// A node number out of range (a bug in the caller).
    #[error("no node {0}")]
    NoSuchNode(usize),
}

/// A cluster under test. Every fault method is undone by its counterpart or by [`Cluster::heal_all`];
/// [`Cluster::teardown`] removes everything the target made (implementations also do it on drop).
pub trait Cluster: Send {
    /// Number of nodes.
    fn size(&self) -> usize;

    /// Where clients reach each node (`host:port`), in node order.
    fn client_addresses(&self) -> Vec<String>;

    /// How clients authenticate to the nodes.
    fn client_security(&self) -> Security;

    /// SIGKILL node `node` (no-op if it is down).
    fn kill(&mut self, node: usize) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Start node `node` again on its data (no-op if it runs).
    fn restart(&mut self, node: usize) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// SIGSTOP node `node` (no-op if it is down or already paused).
    fn pause(&mut self, node: usize) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// SIGCONT node `node` (no-op unless paused).
    fn resume(&mut self, node: usize) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Drop every packet between nodes `a` and `b`, both ways.
    fn cut(&mut self, a: usize, b: usize) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Drop a share `probability` of the packets node `node` receives.
    fn lossy(
        &mut self,
        node: usize,
        probability: f64,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Move node `node`'s wall clock `skew_ms` from the machine's (0: back to it). Only where a
    /// node's clock can move alone: the local target with a debug build of kvd.
    fn skew_clock(
        &mut self,
        node: usize,
        skew_ms: i64,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Send every node's outgoing peer (Raft) connections through a [`super::proxy::FaultProxy`] on this machine
    /// that misbehaves as `links` says (randomness from `seed`); connections open before are reset,
    /// so they come back through it.
    fn slow(
        &mut self,
        links: SlowLinks,
        seed: u64,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// What the fault proxy of a `slow` fault did so far (`None`: no proxy runs).
    fn slow_summary(&self) -> Option<String>;

    /// Remove every network fault (cuts, loss, and the proxy of `slow`).
    fn heal_network(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Undo every fault: network healed, paused nodes resumed, killed nodes restarted.
    fn heal_all(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Stop every node and remove everything the target made.
    fn teardown(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send;
}

/// The node that leads a term no other reachable node has moved past, if any: ask every node's
/// status at once (each within `timeout`) and take the leader of the highest term.
pub async fn find_leader(
    addresses: &[String],
    security: &Security,
    timeout: Duration,
) -> Option<usize> {
    let statuses = futures::future::join_all(
        addresses
            .iter()
            .map(|address| node_status(address, timeout, security)),
    )
    .await;
    let max_term = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok().map(|s| s.term))
        .max()?;
    statuses.iter().position(|s| {
        s.as_ref()
            .is_ok_and(|s| s.role == "leader" && s.term == max_term)
    })
}

/// Poll [`find_leader`] until there is one or `within` passes.
pub async fn wait_for_leader(
    addresses: &[String],
    security: &Security,
    within: Duration,
) -> Result<usize, ClusterError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(leader) = find_leader(addresses, security, Duration::from_millis(500)).await {
            return Ok(leader);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::NoLeader(within));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
