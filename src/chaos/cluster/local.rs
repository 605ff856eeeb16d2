//! The `local` target: `kvd kv` replicas in network namespaces on this machine, with mutual TLS.
//!
//! [`LocalCluster::start`] issues the run's certificates (a CA for cluster `chaos`, `kv/N` for each
//! node, `client/chaos` for the harness) into `DIR/certs` with the project's own CA code — the same
//! as `kvctl certs init --issue` — builds the [`Network`], starts one `kvd` per namespace (data in
//! `DIR/data/node-N`, stderr in `DIR/logs/node-N.log`) and waits for a leader. Faults act on the
//! processes (signals to the pids this value holds) and on the network (rules in the namespaces).
//!
//! Servers run in their own process group, so a Ctrl-C meant for the harness reaches only the
//! harness, which then heals and tears down in order.

use super::netns::Network;
use super::{wait_for_leader, Cluster, ClusterError};
use crate::chaos::cmd::signal;
use crate::chaos::proxy::{FaultProxy, SlowLinks};
use crate::security::{certs, Security};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Child;

/// The client port every node listens on, inside its namespace.
const CLIENT_PORT: u16 = 7000;
/// The Raft port every node listens on, inside its namespace.
const PEER_PORT: u16 = 8000;
/// The cluster name in the run's certificates.
const CLUSTER: &str = "chaos";
/// `kvd --session-ttl` in a run with the `clock` nemesis: shorter than the skews it applies.
pub const CLOCK_SESSION_TTL_SECS: u64 = 60;
/// How long a fresh cluster may take to elect its first leader.
const FIRST_LEADER: Duration = Duration::from_secs(30);

/// What [`LocalCluster::start`] needs.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// The run's tag (names every namespace, link and rule).
    pub tag: String,
    /// Number of replicas (1-9).
    pub nodes: usize,
    /// The `kvd` binary.
    pub kvd: PathBuf,
    /// The run's directory (certificates, data, logs).
    pub out: PathBuf,
    /// `kvd --snapshot-threshold`.
    pub snapshot_threshold: u64,
    /// Start every node with `--unsafe-ack-before-commit` (the self-test's deliberate bug; only
    /// debug builds of kvd have it).
    pub unsafe_ack_before_commit: bool,
    /// Start every node with `--lease-reads`, so pauses and partitions test the lease.
    pub lease_reads: bool,
    /// Start every node with `--follower-reads`.
    pub follower_reads: bool,
    /// Let the `clock` nemesis move nodes' wall clocks: every node reads its skew from
    /// `DIR/clock/node-N` (`--unsafe-clock-skew-file`, debug builds of kvd only) and drops sessions
    /// idle for [`CLOCK_SESSION_TTL_SECS`], so a clock moved forward expires sessions for real.
    pub clock: bool,
}

/// A running local cluster. Dropping it kills the servers and removes the network.
pub struct LocalCluster {
    // Declared before `network`: on drop the servers are killed first, then their namespaces go.
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    /// The fault proxy while a `slow` fault is in place.
    proxy: Option<FaultProxy>,
    network: Network,
    config: LocalConfig,
    certs: PathBuf,
    security: Security,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LocalCluster {
    /// Make certificates and network, start every node and wait for a leader.
    pub async fn start(config: LocalConfig) -> Result<LocalCluster, ClusterError> {
        if !config.kvd.is_file() {
            return Err(ClusterError::KvdMissing(config.kvd.clone()));
        }
        let certs = config.out.join("certs");
        let security = issue_certificates(&certs, config.nodes)?;
        for dir in ["data", "logs", "clock"] {
            let path = config.out.join(dir);
            std::fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let network = Network::create(&config.tag, config.nodes).await?;
        let mut cluster = LocalCluster {
            children: (0..config.nodes).map(|_| None).collect(),
            paused: vec![false; config.nodes],
            proxy: None,
            network,
            config,
            certs,
            security,
        };
        for node in 0..cluster.config.nodes {
            cluster.spawn(node)?;
        }
        wait_for_leader(&cluster.client_addresses(), &cluster.security, FIRST_LEADER).await?;
        Ok(cluster)
    }

    /// The run's tag.
    pub fn tag(&self) -> &str {
        self.network.tag()
    }

    fn check(&self, node: usize) -> Result<(), ClusterError> {
        if node < self.children.len() {
            Ok(())
        } else {
            Err(ClusterError::NoSuchNode(node))
        }
    }

    fn list(&self, port: u16) -> String {
        (0..self.config.nodes)
            .map(|n| format!("{}={}:{port}", n + 1, self.network.node_ip(n)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where node `node` reads its clock skew (ms) from.
    fn clock_file(&self, node: usize) -> PathBuf {
        self.config
            .out
            .join("clock")
            .join(format!("node-{}", node + 1))
    }

    fn spawn(&mut self, node: usize) -> Result<(), ClusterError> {
        let id = (node + 1).to_string();
        let log_path = self.config.out.join("logs").join(format!("node-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let ip = self.network.node_ip(node);
        let mut command = self.network.command_in(node, &self.config.kvd);
        command
            .args(["kv", "--id", &id])
            .args(["--listen", &format!("{ip}:{CLIENT_PORT}")])
            .args(["--peer-listen", &format!("{ip}:{PEER_PORT}")])
            .args(["--peers", &self.list(PEER_PORT)])
            .args(["--clients", &self.list(CLIENT_PORT)])
            .arg("--data-dir")
            .arg(self.config.out.join("data").join(format!("node-{id}")))
            .args([
                "--snapshot-threshold",
                &self.config.snapshot_threshold.to_string(),
            ])
            .arg("--tls-ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--tls-cert")
            .arg(self.certs.join(format!("kv-{id}.pem")))
            .arg("--tls-key")
            .arg(self.certs.join(format!("kv-{id}-key.pem")))
            .args(
                self.config
                    .unsafe_ack_before_commit
                    .then_some("--unsafe-ack-before-commit"),
            )
            .args(self.config.lease_reads.then_some("--lease-reads"))
            .args(self.config.follower_reads.then_some("--follower-reads"))
            .args(if self.config.clock {
                let skew = self.clock_file(node);
                if !skew.exists() {
                    std::fs::write(&skew, "0").map_err(io_error(&skew))?;
                }
                vec![
                    "--unsafe-clock-skew-file".into(),
                    skew.into_os_string(),
                    "--session-ttl".into(),
                    CLOCK_SESSION_TTL_SECS.to_string().into(),
                ]
            } else {
                Vec::new()
            })
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ClusterError::Spawn {
            node: node + 1,
            source,
        })?;
        self.children[node] = Some(child);
        self.paused[node] = false;
        Ok(())
    }

    fn pid(&self, node: usize) -> Option<u32> {
        self.children.get(node)?.as_ref()?.id()
    }
}

/// A fresh CA for the run, a certificate per node and one for the harness's clients; returns the
/// clients' security.
fn issue_certificates(dir: &Path, nodes: usize) -> Result<Security, ClusterError> {
    certs::init(dir, CLUSTER, 7)?;
    for node in 1..=nodes {
        certs::issue(dir, "kv", &node.to_string(), &[], 7)?;
    }
    let client = certs::issue(dir, "client", "chaos", &[], 7)?;
    Ok(Security::load_tls(
        &dir.join("ca.pem"),
        &client.cert,
        &client.key,
    )?)
}

impl Cluster for LocalCluster {
    fn size(&self) -> usize {
        self.config.nodes
    }

    fn client_addresses(&self) -> Vec<String> {
        (0..self.config.nodes)
            .map(|n| format!("{}:{CLIENT_PORT}", self.network.node_ip(n)))
            .collect()
    }

    fn client_security(&self) -> Security {
        self.security.clone()
    }

    async fn kill(&mut self, node: usize) -> Result<(), ClusterError> {
        self.check(node)?;
        if let Some(mut child) = self.children[node].take() {
            // SIGKILL works on a stopped process too; wait so the pid is not reused while we hold it.
            child.kill().await.map_err(io_error(&self.config.kvd))?;
        }
        self.paused[node] = false;
        Ok(())
    }

    async fn restart(&mut self, node: usize) -> Result<(), ClusterError> {
        self.check(node)?;
        let exited = match self.children[node].as_mut() {
            None => true,
            Some(child) => child
                .try_wait()
                .map_err(io_error(&self.config.kvd))?
                .is_some(),
        };
        if exited {
            self.spawn(node)?;
        }
        Ok(())
    }

    async fn pause(&mut self, node: usize) -> Result<(), ClusterError> {
        self.check(node)?;
        if let (Some(pid), false) = (self.pid(node), self.paused[node]) {
            signal(pid, "STOP").await?;
            self.paused[node] = true;
        }
        Ok(())
    }

    async fn resume(&mut self, node: usize) -> Result<(), ClusterError> {
        self.check(node)?;
        if let (Some(pid), true) = (self.pid(node), self.paused[node]) {
            signal(pid, "CONT").await?;
        }
        self.paused[node] = false;
        Ok(())
    }

    async fn cut(&mut self, a: usize, b: usize) -> Result<(), ClusterError> {
        self.check(a)?;
        self.check(b)?;
        Ok(self.network.cut(a, b).await?)
    }

    async fn lossy(&mut self, node: usize, probability: f64) -> Result<(), ClusterError> {
        self.check(node)?;
        Ok(self.network.lossy(node, probability).await?)
    }

    async fn skew_clock(&mut self, node: usize, skew_ms: i64) -> Result<(), ClusterError> {
        self.check(node)?;
        if !self.config.clock {
            return Err(ClusterError::Target(
                "this cluster was started without the clock nemesis".into(),
            ));
        }
        // Written whole to a new file, then renamed: kvd never reads half a number.
        let path = self.clock_file(node);
        let staged = path.with_extension("new");
        std::fs::write(&staged, skew_ms.to_string()).map_err(io_error(&staged))?;
        std::fs::rename(&staged, &path).map_err(io_error(&path))
    }

    async fn slow(&mut self, links: SlowLinks, seed: u64) -> Result<(), ClusterError> {
        let n = self.config.nodes;
        let targets: Vec<SocketAddr> = (0..n)
            .map(|to| SocketAddr::from((self.network.node_ip(to), PEER_PORT)))
            .collect();
        let host = IpAddr::V4(self.network.host_ip());
        let proxy = FaultProxy::start(host, &targets, links, seed)
            .await
            .map_err(ClusterError::Proxy)?;
        // Held before the rules go in: healing (also after an error half-way) stops it.
        let ports: Vec<u16> = (0..n).filter_map(|to| proxy.port(to)).collect();
        self.proxy = Some(proxy);
        for from in 0..n {
            for (to, &port) in ports.iter().enumerate().filter(|&(to, _)| to != from) {
                self.network.redirect(from, to, PEER_PORT, port).await?;
            }
        }
        Ok(())
    }

    fn slow_summary(&self) -> Option<String> {
        self.proxy.as_ref().map(FaultProxy::summary)
    }

    async fn heal_network(&mut self) -> Result<(), ClusterError> {
        self.network.heal().await?;
        // After the redirection is gone: the proxy's connections break, the nodes reconnect directly.
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
        Ok(())
    }

    async fn heal_all(&mut self) -> Result<(), ClusterError> {
        self.heal_network().await?;
        for node in 0..self.config.nodes {
            self.resume(node).await?;
            self.restart(node).await?;
            if self.config.clock {
                self.skew_clock(node, 0).await?;
            }
        }
        Ok(())
    }

    async fn teardown(&mut self) -> Result<(), ClusterError> {
        for node in 0..self.config.nodes {
            self.kill(node).await?;
        }
        let problems = self.network.teardown();
        match problems.is_empty() {
            true => Ok(()),
            false => Err(ClusterError::Io {
                path: PathBuf::from(self.tag()),
                source: std::io::Error::other(problems.join("; ")),
            }),
        }
    }
}
