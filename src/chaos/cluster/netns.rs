//! The local target's network: one bridge, one network namespace per node joined to it by a veth pair,
//! and the firewall rules that make faults — all named after the run's tag, so that teardown removes
//! exactly what this run made.
//!
//! Layout for tag `chaos-1234` and three nodes:
//! ```text
//!  host: bridge chaos-1234 (10.213.X.1/24) ── veth chaos-1234-1 ─┬─ netns chaos-1234-1: eth0 10.213.X.11
//!                                          ── veth chaos-1234-2 ─┼─ netns chaos-1234-2: eth0 10.213.X.12
//!                                          ── veth chaos-1234-3 ─┴─ netns chaos-1234-3: eth0 10.213.X.13
//! ```
//! Interface names are limited to 15 bytes, so a tag is at most 13 (`chaos-` and a pid of up to 7
//! digits) and nodes are numbered 1-9.
//!
//! Faults are iptables rules *inside* the nodes' namespaces (INPUT/OUTPUT DROP for a partition, a
//! `statistic` match for loss): they vanish with the namespace and cannot touch the host's firewall.
//! The one host rule is an ACCEPT for traffic within our bridge in the host's FORWARD chain, needed
//! where `br_netfilter` sends bridged frames through a FORWARD chain whose policy is DROP (Docker
//! sets that); it carries the tag as its comment and is deleted by exact match.

use super::super::cmd::{run, run_blocking, CommandError};
use std::net::Ipv4Addr;
use thiserror::Error;

/// Why the network could not be made or changed.
#[derive(Debug, Error)]
pub enum NetError {
    /// `ip`/`iptables` need root (CAP_NET_ADMIN).
    #[error(
        "the local target needs root (it creates network namespaces, a bridge and iptables rules); \
         run as root or use --target compose"
    )]
    NotRoot,
    /// A tag that could make interface names too long or match another run's objects.
    #[error("invalid tag {0:?}: expected chaos-<digits or lowercase letters>, at most 13 bytes")]
    BadTag(String),
    /// No free /24 under 10.213.0.0/16 for this run.
    #[error("no free subnet 10.213.X.0/24 on this host")]
    NoSubnet,
    /// The host-wide lock runs take to pick their subnets one at a time could not be taken.
    #[error("cannot lock {path} (runs pick their subnets one at a time): {why}")]
    SubnetLock {
        /// The lock file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// A tool failed.
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// Whether `tag` is one this module makes (and may therefore delete objects by).
pub fn valid_tag(tag: &str) -> bool {
    tag.len() <= 13
        && tag.strip_prefix("chaos-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        })
}

/// The iptables match (without its target) that picks a share `probability` of the packets a node
/// receives: the `loss` fault of every target.
pub fn loss_rule(probability: f64) -> Vec<String> {
    let probability = format!("{probability:.4}");
    [
        "-A",
        "INPUT",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        &probability,
    ]
    .map(String::from)
    .to_vec()
}

/// The two rules of the `slow` fault in a node's namespace, as (matches, target) pairs so a target
/// can put its own tag between them: a DNAT in nat OUTPUT that sends the node's new TCP connections to
/// `to:port` to the fault proxy at `proxy` (`HOST:PORT`), and a REJECT in filter OUTPUT that resets
/// the ones opened before (new connections leave with the proxy as destination and never meet it).
pub fn redirect_rules(to: &str, port: u16, proxy: &str) -> [(Vec<String>, Vec<String>); 2] {
    let strings = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let port = port.to_string();
    let matches = ["-A", "OUTPUT", "-p", "tcp", "-d", to, "--dport", &port];
    let mut nat = strings(&["-t", "nat"]);
    nat.extend(strings(&matches));
    [
        (nat, strings(&["-j", "DNAT", "--to-destination", proxy])),
        (
            strings(&matches),
            strings(&["-j", "REJECT", "--reject-with", "tcp-reset"]),
        ),
    ]
}

/// Whether this process runs as root, read from /proc (no `unsafe` `geteuid`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The run's bridge, namespaces and addresses. Dropping it tears everything down (see [`remove_tag`]),
/// so a failed start, an error, a panic or Ctrl-C leaves nothing behind.
#[derive(Debug)]
pub struct Network {
    tag: String,
    nodes: usize,
    subnet: u8,
    torn_down: bool,
}

impl Network {
    /// Create the bridge and `nodes` namespaces for `tag`.
    pub async fn create(tag: &str, nodes: usize) -> Result<Network, NetError> {
        if !valid_tag(tag) || !(1..=9).contains(&nodes) {
            return Err(NetError::BadTag(tag.to_string()));
        }
        if !is_root() {
            return Err(NetError::NotRoot);
        }
        // Choosing a subnet and claiming it (the bridge's address) are one step for every run on
        // this host: two runs starting together could otherwise both find the same /24 free.
        let claim = SubnetClaim::lock().await?;
        let subnet = free_subnet(tag).await?;
        // From here on, dropping `network` removes whatever was made, also on an early return.
        let network = Network {
            tag: tag.to_string(),
            nodes,
            subnet,
            torn_down: false,
        };
        let bridge = tag;
        run("ip", &["link", "add", bridge, "type", "bridge"]).await?;
        let host = format!("{}/24", network.host_ip());
        run("ip", &["addr", "add", &host, "dev", bridge]).await?;
        drop(claim);
        run("ip", &["link", "set", bridge, "up"]).await?;
        run("iptables", &forward_rule("-I", tag)).await?;
        for node in 0..nodes {
            let ns = network.namespace(node);
            let veth = network.veth(node);
            run("ip", &["netns", "add", &ns]).await?;
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )
            .await?;
            run("ip", &["link", "set", &veth, "master", bridge, "up"]).await?;
            let address = format!("{}/24", network.node_ip(node));
            run("ip", &["-n", &ns, "addr", "add", &address, "dev", "eth0"]).await?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]).await?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]).await?;
        }
        // Fail now, not at the first `loss` window, if the kernel lacks the statistic match.
        let probe = ["-A", "INPUT", "-m", "statistic", "--mode", "random"];
        let probe: Vec<&str> = probe
            .into_iter()
            .chain(["--probability", "0.0", "-j", "DROP"])
            .collect();
        network.iptables(0, &probe).await?;
        network.heal().await?;
        Ok(network)
    }

    /// The run's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Node `node`'s namespace (nodes are counted from 0 here, named from 1).
    pub fn namespace(&self, node: usize) -> String {
        format!("{}-{}", self.tag, node + 1)
    }

    fn veth(&self, node: usize) -> String {
        self.namespace(node)
    }

    /// The host's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Node `node`'s address.
    pub fn node_ip(&self, node: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 11 + node as u8)
    }

    /// A command that runs `program` inside node `node`'s namespace and dies with this process
    /// (`setpriv --pdeathsig KILL`), so even a harness killed with SIGKILL leaves no server running.
    /// `ip netns exec` and `setpriv` exec in place: the child's pid is the program's.
    pub fn command_in(&self, node: usize, program: &std::path::Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(node)])
            .args(["setpriv", "--pdeathsig", "KILL", "--"])
            .arg(program);
        command
    }

    async fn iptables(&self, node: usize, rule: &[&str]) -> Result<(), NetError> {
        let ns = self.namespace(node);
        let args: Vec<&str> = ["netns", "exec", &ns, "iptables", "-w"]
            .into_iter()
            .chain(rule.iter().copied())
            .collect();
        run("ip", &args).await?;
        Ok(())
    }

    /// Drop all traffic between nodes `a` and `b`, both ways, on both sides.
    pub async fn cut(&self, a: usize, b: usize) -> Result<(), NetError> {
        for (me, other) in [(a, b), (b, a)] {
            let other = self.node_ip(other).to_string();
            self.iptables(me, &["-A", "INPUT", "-s", &other, "-j", "DROP"])
                .await?;
            self.iptables(me, &["-A", "OUTPUT", "-d", &other, "-j", "DROP"])
                .await?;
        }
        Ok(())
    }

    /// Drop a share `probability` of the packets node `node` receives (from peers and clients).
    pub async fn lossy(&self, node: usize, probability: f64) -> Result<(), NetError> {
        let mut rule = loss_rule(probability);
        rule.extend(["-j".to_string(), "DROP".to_string()]);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        self.iptables(node, &rule).await
    }

    /// Send node `from`'s new TCP connections to `to`'s `port` to `proxy_port` on the host instead
    /// (DNAT), and reset the ones already open (a REJECT that only they can meet: new connections
    /// leave with the host as destination), so they come back through the proxy.
    pub async fn redirect(
        &self,
        from: usize,
        to: usize,
        port: u16,
        proxy_port: u16,
    ) -> Result<(), NetError> {
        let proxy = format!("{}:{proxy_port}", self.host_ip());
        for (matches, target) in redirect_rules(&self.node_ip(to).to_string(), port, &proxy) {
            let rule: Vec<&str> = matches.iter().chain(&target).map(String::as_str).collect();
            self.iptables(from, &rule).await?;
        }
        Ok(())
    }

    /// Remove every fault rule: the namespaces' INPUT and OUTPUT chains (and nat OUTPUT, where
    /// `slow` redirects) hold only ours.
    pub async fn heal(&self) -> Result<(), NetError> {
        for node in 0..self.nodes {
            self.iptables(node, &["-F", "INPUT"]).await?;
            self.iptables(node, &["-F", "OUTPUT"]).await?;
            self.iptables(node, &["-t", "nat", "-F", "OUTPUT"]).await?;
        }
        Ok(())
    }

    /// Remove the namespaces (killing what still runs in them), the bridge and the host rule. Safe to
    /// call more than once; returns what could not be removed.
    pub fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        remove_tag(&self.tag)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if !self.torn_down {
            for problem in self.teardown() {
                crate::errln!("chaos: cleanup: {problem}");
            }
        }
    }
}

fn forward_rule<'a>(op: &'a str, tag: &'a str) -> [&'a str; 13] {
    [
        // Wait for the xtables lock: another run may be changing the host's rules at this moment.
        "-w",
        op,
        "FORWARD",
        "-i",
        tag,
        "-o",
        tag,
        "-m",
        "comment",
        "--comment",
        tag,
        "-j",
        "ACCEPT",
    ]
}

/// A host-wide exclusive lock (`flock` on a file under /run) held while a run picks its subnet and
/// puts its address on its bridge; released when dropped (the kernel releases it if the process dies).
struct SubnetClaim {
    _file: std::fs::File,
}

impl SubnetClaim {
    /// Where the lock lives: /run is root's and on every systemd or container host; elsewhere the
    /// temporary directory.
    fn path() -> std::path::PathBuf {
        let run = std::path::Path::new("/run");
        let dir = if run.is_dir() {
            run.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join("ds824-chaos-subnets.lock")
    }

    async fn lock() -> Result<SubnetClaim, NetError> {
        let path = Self::path();
        let failed = |e: std::io::Error| NetError::SubnetLock {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(failed)?;
        // Another run holds it for a few `ip` commands at most; a holder that keeps it longer (a
        // stuck run, or anyone who can write the file) is reported rather than waited on for ever.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(SubnetClaim { _file: file }),
                Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR)
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(failed(std::io::Error::other(
                        "held by another process for 30 s",
                    )))
                }
                Err(e) => return Err(failed(e.into())),
            }
        }
    }
}

/// The X of the subnet 10.213.X.0/24 (1 to 250) a run tagged `tag` tries first: spread by the tag, so
/// that runs seldom have to move on.
pub fn preferred_subnet(tag: &str) -> u8 {
    let seed = tag
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (seed % 250 + 1) as u8
}

/// The run's subnet: 10.213.X.0/24 with X from the tag, moving on while the host already routes it.
async fn free_subnet(tag: &str) -> Result<u8, NetError> {
    let routes = run("ip", &["-4", "route", "show"]).await?;
    let addresses = run("ip", &["-4", "-o", "addr", "show"]).await?;
    let first = u32::from(preferred_subnet(tag)) - 1;
    (0..250u32)
        .map(|i| ((first + i) % 250 + 1) as u8)
        .find(|x| {
            let prefix = format!("10.213.{x}.");
            !routes.contains(&prefix) && !addresses.contains(&prefix)
        })
        .ok_or(NetError::NoSubnet)
}

/// Whether `name` is `tag` itself or `tag-<node digits>`: ours, and no other run's.
fn is_ours(name: &str, tag: &str) -> bool {
    name == tag
        || name
            .strip_prefix(tag)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Remove everything tagged `tag`: kill the processes in its namespaces, delete the veth pairs, the
/// namespaces, the bridge and the host FORWARD rule. Blocking, for `Drop` and `chaos clean`.
/// Returns what could not be removed (empty: all gone).
pub fn remove_tag(tag: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !valid_tag(tag) {
        problems.push(NetError::BadTag(tag.to_string()).to_string());
        return problems;
    }
    let namespaces: Vec<String> = match run_blocking("ip", &["netns", "list"]) {
        Ok(list) => list
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| is_ours(name, tag))
            .map(str::to_string)
            .collect(),
        Err(e) => {
            problems.push(e.to_string());
            Vec::new()
        }
    };
    for ns in &namespaces {
        // Whatever runs in our namespace is ours: a server we started (perhaps stopped by SIGSTOP).
        if let Ok(pids) = run_blocking("ip", &["netns", "pids", ns]) {
            for pid in pids.split_whitespace() {
                let _ = run_blocking("kill", &["-KILL", pid]);
            }
        }
        // Deleting the host end removes the pair at once; a namespace's own links go asynchronously.
        if run_blocking("ip", &["link", "show", ns]).is_ok() {
            if let Err(e) = run_blocking("ip", &["link", "del", ns]) {
                problems.push(e.to_string());
            }
        }
        if let Err(e) = run_blocking("ip", &["netns", "del", ns]) {
            problems.push(e.to_string());
        }
    }
    if run_blocking("ip", &["link", "show", tag]).is_ok() {
        if let Err(e) = run_blocking("ip", &["link", "del", tag]) {
            problems.push(e.to_string());
        }
    }
    // Deleted by exact specification, so no other rule can go; repeated in case of duplicates.
    for _ in 0..8 {
        if run_blocking("iptables", &forward_rule("-D", tag)).is_err() {
            break;
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_names_are_ours() {
        assert!(valid_tag("chaos-4194304"));
        assert!(
            !valid_tag("chaos-41943040"),
            "veth names would pass 15 bytes"
        );
        assert!(!valid_tag("docker0"));
        assert!(!valid_tag("chaos-"));
        assert!(is_ours("chaos-12", "chaos-12"));
        assert!(is_ours("chaos-12-3", "chaos-12"));
        assert!(!is_ours("chaos-123-1", "chaos-12"), "another run's node");
        assert!(!is_ours("chaos-12-x", "chaos-12"));
    }
}
