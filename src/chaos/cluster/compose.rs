//! The `compose` target: the docker-compose cluster `deploy/up.sh` brought up, faulted from outside.
//!
//! Nothing runs inside the containers on the harness's behalf — the image has no shell and no tools.
//! Processes are faulted through the Docker engine (`docker kill --signal KILL`, `docker start`,
//! `docker pause`, `docker unpause`); the network through iptables run *in the container's network
//! namespace* from the host (`nsenter --target PID --net iptables ...`), so a rule drops exactly the
//! traffic of that container. Clients reach the nodes through the ports compose publishes on the host.
//!
//! What the harness owns here: its faults only. The cluster was there before the run and stays after
//! it; every rule it adds carries the run's tag as an iptables comment, and healing deletes exactly
//! the rules with that comment, unpauses what it paused and starts what it killed — at the end, on
//! Ctrl-C, on an error or a panic (the drop guard).

use super::netns::{loss_rule, redirect_rules};
use super::{wait_for_leader, Cluster, ClusterError};
use crate::chaos::cmd::{run, run_blocking, CommandError};
use crate::chaos::proxy::{FaultProxy, SlowLinks};
use crate::security::Security;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The (table, chain) pairs the run adds rules to: DROP rules for partitions and loss, and for
/// `slow` a DNAT in nat OUTPUT plus a REJECT that resets the connections open before it.
const TAGGED_CHAINS: [(&str, &str); 3] =
    [("filter", "INPUT"), ("filter", "OUTPUT"), ("nat", "OUTPUT")];

/// Why `clock` cannot run here.
pub const CLOCK_NEEDS_LOCAL: &str =
    "the clock nemesis needs --target local: containers share the host's clock (moving it would \
     move the harness's and every node's), and the images hold release builds, which have no \
     clock-skew hook";

/// How long the cluster may take to show a leader when the run attaches to it.
const FIRST_LEADER: Duration = Duration::from_secs(30);

/// What [`ComposeCluster::attach`] needs.
#[derive(Clone, Debug)]
pub struct ComposeConfig {
    /// The run's tag: the comment on every rule the run adds.
    pub tag: String,
    /// The compose project (`None`: any project, as long as each service names one container).
    pub project: Option<String>,
    /// The compose services of the nodes under test, in node order (`kv1,kv2,kv3`).
    pub services: Vec<String>,
    /// Where clients reach each node from this machine, in node order (the published ports).
    pub client_addresses: Vec<String>,
    /// How clients authenticate (the certificates `deploy/up.sh` copied out).
    pub security: Security,
}

/// The attached cluster. Dropping it heals every fault the run made.
pub struct ComposeCluster {
    config: ComposeConfig,
    /// Container id per node.
    containers: Vec<String>,
    paused: Vec<bool>,
    killed: Vec<bool>,
    /// Whether a fault may be in place (the drop guard then heals; after a full heal it has nothing
    /// to do).
    faulted: bool,
    /// The fault proxy while a `slow` fault is in place.
    proxy: Option<FaultProxy>,
}

impl ComposeCluster {
    /// Find each service's container (it must run) and wait for a leader.
    pub async fn attach(config: ComposeConfig) -> Result<ComposeCluster, ClusterError> {
        if config.services.len() != config.client_addresses.len() || config.services.is_empty() {
            return Err(ClusterError::Target(format!(
                "{} compose services but {} client addresses: give one address per service",
                config.services.len(),
                config.client_addresses.len()
            )));
        }
        let mut containers = Vec::new();
        for service in &config.services {
            containers.push(container_of(config.project.as_deref(), service).await?);
        }
        for (service, id) in config.services.iter().zip(&containers) {
            let state = inspect(id, "{{.State.Status}}").await?;
            if state != "running" {
                return Err(ClusterError::Target(format!(
                    "compose service {service} is {state}, not running: bring the cluster up \
                     (./deploy/up.sh) before a run"
                )));
            }
        }
        let n = containers.len();
        let cluster = ComposeCluster {
            config,
            containers,
            paused: vec![false; n],
            killed: vec![false; n],
            faulted: false,
            proxy: None,
        };
        wait_for_leader(
            &cluster.config.client_addresses,
            &cluster.config.security,
            FIRST_LEADER,
        )
        .await?;
        Ok(cluster)
    }

    fn container(&self, node: usize) -> Result<&str, ClusterError> {
        self.containers
            .get(node)
            .map(String::as_str)
            .ok_or(ClusterError::NoSuchNode(node))
    }

    /// Run `iptables -w ARGS` in the network namespace of `node`'s container.
    async fn iptables(&self, node: usize, args: &[&str]) -> Result<String, ClusterError> {
        let pid = inspect(self.container(node)?, "{{.State.Pid}}").await?;
        let mut line = vec!["--target", &pid, "--net", "iptables", "-w"];
        line.extend_from_slice(args);
        Ok(run("nsenter", &line).await?)
    }

    /// Add a DROP rule with the run's tag in `node`'s namespace.
    async fn drop_rule(&mut self, node: usize, rule: &[&str]) -> Result<(), ClusterError> {
        self.tagged_rule(node, rule, &["-j", "DROP"]).await
    }

    /// Add `rule` (its matches) with the run's tag and then `target` in `node`'s namespace.
    async fn tagged_rule(
        &mut self,
        node: usize,
        rule: &[&str],
        target: &[&str],
    ) -> Result<(), ClusterError> {
        self.faulted = true;
        let mut args = rule.to_vec();
        args.extend_from_slice(&["-m", "comment", "--comment", &self.config.tag]);
        args.extend_from_slice(target);
        self.iptables(node, &args).await.map(drop)
    }

    /// The port `node` listens on for its peers (`--peer-listen` in its command line).
    async fn peer_port(&self, node: usize) -> Result<u16, ClusterError> {
        let args = inspect(self.container(node)?, "{{json .Args}}").await?;
        let args: Vec<String> = serde_json::from_str(&args).unwrap_or_default();
        args.windows(2)
            .find(|w| w[0] == "--peer-listen")
            .and_then(|w| w[1].rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .ok_or_else(|| {
                ClusterError::Target(format!(
                    "node {} has no --peer-listen HOST:PORT in its command line",
                    node + 1
                ))
            })
    }

    /// The host's address on `node`'s network (its gateway): where the fault proxy listens.
    async fn gateway(&self, node: usize) -> Result<IpAddr, ClusterError> {
        let gateways = inspect(
            self.container(node)?,
            "{{range .NetworkSettings.Networks}}{{.Gateway}} {{end}}",
        )
        .await?;
        gateways
            .split_whitespace()
            .find_map(|g| g.parse().ok())
            .ok_or_else(|| ClusterError::Target(format!("node {} has no gateway", node + 1)))
    }

    /// The container's address on its (first) network: what its peers connect to.
    async fn address(&self, node: usize) -> Result<String, ClusterError> {
        let ips = inspect(
            self.container(node)?,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        )
        .await?;
        ips.split_whitespace()
            .next()
            .map(String::from)
            .ok_or_else(|| ClusterError::Target(format!("node {} has no IP address", node + 1)))
    }

    /// Delete every rule carrying the run's tag in `node`'s namespace (none if the container is down:
    /// a restarted container has a new, empty namespace).
    async fn remove_rules(&self, node: usize) -> Result<(), ClusterError> {
        if inspect(self.container(node)?, "{{.State.Running}}").await? != "true" {
            return Ok(());
        }
        for (table, chain) in TAGGED_CHAINS {
            let listed = self.iptables(node, &["-t", table, "-S", chain]).await?;
            for rule in tagged_rules(&listed, &self.config.tag) {
                let args: Vec<&str> = ["-t", table]
                    .into_iter()
                    .chain(rule.iter().map(String::as_str))
                    .collect();
                self.iptables(node, &args).await?;
            }
        }
        Ok(())
    }
}

/// The deletions (`-D CHAIN ...`) of the rules in `iptables -S` output that carry `tag` as comment.
fn tagged_rules(listed: &str, tag: &str) -> Vec<Vec<String>> {
    listed
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let tagged = words
                .windows(2)
                .any(|w| w[0] == "--comment" && w[1].trim_matches('"') == tag);
            match (words.first(), tagged) {
                (Some(&"-A"), true) => Some(
                    std::iter::once("-D".to_string())
                        .chain(words[1..].iter().map(|w| w.trim_matches('"').to_string()))
                        .collect(),
                ),
                _ => None,
            }
        })
        .collect()
}

/// `docker inspect --format FORMAT ID`, trimmed.
async fn inspect(id: &str, format: &str) -> Result<String, CommandError> {
    run("docker", &["inspect", "--format", format, id])
        .await
        .map(|s| s.trim().to_string())
}

/// The one container of compose service `service` (of `project`, if given).
async fn container_of(project: Option<&str>, service: &str) -> Result<String, ClusterError> {
    let service_filter = format!("label=com.docker.compose.service={service}");
    let mut args = vec!["ps", "--all", "--quiet", "--filter", &service_filter];
    let project_filter;
    if let Some(project) = project {
        project_filter = format!("label=com.docker.compose.project={project}");
        args.extend_from_slice(&["--filter", &project_filter]);
    }
    let listed = run("docker", &args).await?;
    let ids: Vec<&str> = listed.split_whitespace().collect();
    match ids.as_slice() {
        [id] => Ok(id.to_string()),
        [] => Err(ClusterError::Target(format!(
            "no container of compose service {service}{}: bring the cluster up (./deploy/up.sh) \
             or name its project with --compose-project",
            project.map_or(String::new(), |p| format!(" in project {p}"))
        ))),
        _ => Err(ClusterError::Target(format!(
            "{} containers of compose service {service}: name the project with --compose-project",
            ids.len()
        ))),
    }
}

impl Cluster for ComposeCluster {
    fn size(&self) -> usize {
        self.containers.len()
    }

    fn client_addresses(&self) -> Vec<String> {
        self.config.client_addresses.clone()
    }

    fn client_security(&self) -> Security {
        self.config.security.clone()
    }

    async fn kill(&mut self, node: usize) -> Result<(), ClusterError> {
        let id = self.container(node)?.to_string();
        self.faulted = true;
        if !self.killed[node] {
            // SIGKILL also ends a paused container; the engine does not restart a killed container
            // on its own (it counts as stopped by hand), so the node stays down until `restart`.
            run("docker", &["kill", "--signal", "KILL", &id]).await?;
            self.killed[node] = true;
            self.paused[node] = false;
        }
        Ok(())
    }

    async fn restart(&mut self, node: usize) -> Result<(), ClusterError> {
        let id = self.container(node)?.to_string();
        if self.killed[node] {
            run("docker", &["start", &id]).await?;
            self.killed[node] = false;
        }
        Ok(())
    }

    async fn pause(&mut self, node: usize) -> Result<(), ClusterError> {
        let id = self.container(node)?.to_string();
        self.faulted = true;
        if !self.paused[node] && !self.killed[node] {
            run("docker", &["pause", &id]).await?;
            self.paused[node] = true;
        }
        Ok(())
    }

    async fn resume(&mut self, node: usize) -> Result<(), ClusterError> {
        let id = self.container(node)?.to_string();
        if self.paused[node] {
            run("docker", &["unpause", &id]).await?;
            self.paused[node] = false;
        }
        Ok(())
    }

    async fn cut(&mut self, a: usize, b: usize) -> Result<(), ClusterError> {
        let (address_a, address_b) = (self.address(a).await?, self.address(b).await?);
        for (me, other) in [(a, &address_b), (b, &address_a)] {
            self.drop_rule(me, &["-A", "INPUT", "-s", other]).await?;
            self.drop_rule(me, &["-A", "OUTPUT", "-d", other]).await?;
        }
        Ok(())
    }

    async fn lossy(&mut self, node: usize, probability: f64) -> Result<(), ClusterError> {
        let rule = loss_rule(probability);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        self.drop_rule(node, &rule).await
    }

    async fn skew_clock(&mut self, _node: usize, _skew_ms: i64) -> Result<(), ClusterError> {
        Err(ClusterError::Target(CLOCK_NEEDS_LOCAL.into()))
    }

    async fn slow(&mut self, links: SlowLinks, seed: u64) -> Result<(), ClusterError> {
        let n = self.containers.len();
        let mut targets = Vec::new();
        for node in 0..n {
            let ip: IpAddr = self.address(node).await?.parse().map_err(|_| {
                ClusterError::Target(format!("node {} has no IPv4 address", node + 1))
            })?;
            targets.push(SocketAddr::new(ip, self.peer_port(node).await?));
        }
        let gateway = self.gateway(0).await?;
        let proxy = FaultProxy::start(gateway, &targets, links, seed)
            .await
            .map_err(ClusterError::Proxy)?;
        let ports: Vec<u16> = (0..n).filter_map(|to| proxy.port(to)).collect();
        self.faulted = true;
        self.proxy = Some(proxy);
        let alive: Vec<usize> = (0..n).filter(|&from| !self.killed[from]).collect();
        for from in alive {
            for (to, &proxy_port) in ports.iter().enumerate().filter(|&(to, _)| to != from) {
                let (ip, port) = (targets[to].ip().to_string(), targets[to].port());
                let proxy = format!("{gateway}:{proxy_port}");
                for (matches, target) in redirect_rules(&ip, port, &proxy) {
                    let matches: Vec<&str> = matches.iter().map(String::as_str).collect();
                    let target: Vec<&str> = target.iter().map(String::as_str).collect();
                    self.tagged_rule(from, &matches, &target).await?;
                }
            }
        }
        Ok(())
    }

    fn slow_summary(&self) -> Option<String> {
        self.proxy.as_ref().map(FaultProxy::summary)
    }

    async fn heal_network(&mut self) -> Result<(), ClusterError> {
        for node in 0..self.containers.len() {
            self.remove_rules(node).await?;
        }
        // After the redirection is gone: the proxy's connections break, the nodes reconnect directly.
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
        Ok(())
    }

    async fn heal_all(&mut self) -> Result<(), ClusterError> {
        self.heal_network().await?;
        for node in 0..self.containers.len() {
            self.resume(node).await?;
            self.restart(node).await?;
        }
        self.faulted = false;
        Ok(())
    }

    /// The cluster is not the run's to remove: teardown heals every fault and leaves it running.
    async fn teardown(&mut self) -> Result<(), ClusterError> {
        self.heal_all().await
    }
}

impl Drop for ComposeCluster {
    /// After an error, a panic or Ctrl-C: undo what the run did, without a runtime.
    fn drop(&mut self) {
        if !self.faulted {
            return;
        }
        for (node, id) in self.containers.iter().enumerate() {
            if self.paused[node] {
                let _ = run_blocking("docker", &["unpause", id]);
            }
            if self.killed[node] {
                let _ = run_blocking("docker", &["start", id]);
            }
            let Ok(pid) = run_blocking("docker", &["inspect", "--format", "{{.State.Pid}}", id])
            else {
                continue;
            };
            let pid = pid.trim();
            for (table, chain) in TAGGED_CHAINS {
                let iptables = ["--target", pid, "--net", "iptables", "-w", "-t", table];
                let list: Vec<&str> = iptables.iter().chain(&["-S", chain]).copied().collect();
                let listed = run_blocking("nsenter", &list).unwrap_or_default();
                for rule in tagged_rules(&listed, &self.config.tag) {
                    let mut args = iptables.to_vec();
                    args.extend(rule.iter().map(String::as_str));
                    let _ = run_blocking("nsenter", &args);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rules_with_the_runs_tag_are_deleted() {
        let listed = "-P INPUT ACCEPT\n\
            -A INPUT -s 172.18.0.3/32 -m comment --comment chaos-41 -j DROP\n\
            -A INPUT -s 172.18.0.4/32 -m comment --comment chaos-4 -j DROP\n\
            -A INPUT -m statistic --mode random --probability 0.20000000009 -m comment --comment \"chaos-41\" -j DROP\n\
            -A INPUT -s 10.0.0.1/32 -j ACCEPT\n";
        let deletions = tagged_rules(listed, "chaos-41");
        assert_eq!(deletions.len(), 2);
        assert_eq!(
            deletions[0].join(" "),
            "-D INPUT -s 172.18.0.3/32 -m comment --comment chaos-41 -j DROP"
        );
        assert!(deletions[1].join(" ").starts_with("-D INPUT -m statistic"));
        assert!(deletions[1].contains(&"chaos-41".to_string()));
    }
}
