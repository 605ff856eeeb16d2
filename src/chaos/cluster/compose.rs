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

use super::netns::loss_rule;
use super::{wait_for_leader, Cluster, ClusterError};
use crate::chaos::cmd::{run, run_blocking, CommandError};
use crate::security::Security;
use std::time::Duration;

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
        self.faulted = true;
        let mut args = rule.to_vec();
        args.extend_from_slice(&["-m", "comment", "--comment", &self.config.tag, "-j", "DROP"]);
        self.iptables(node, &args).await.map(drop)
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
        for chain in ["INPUT", "OUTPUT"] {
            let listed = self.iptables(node, &["-S", chain]).await?;
            for rule in tagged_rules(&listed, &self.config.tag) {
                let args: Vec<&str> = rule.iter().map(String::as_str).collect();
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

    async fn heal_network(&mut self) -> Result<(), ClusterError> {
        for node in 0..self.containers.len() {
            self.remove_rules(node).await?;
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
            for chain in ["INPUT", "OUTPUT"] {
                let listed = run_blocking(
                    "nsenter",
                    &["--target", pid, "--net", "iptables", "-w", "-S", chain],
                )
                .unwrap_or_default();
                for rule in tagged_rules(&listed, &self.config.tag) {
                    let mut args = vec!["--target", pid, "--net", "iptables", "-w"];
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
