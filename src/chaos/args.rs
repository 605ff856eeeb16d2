//! The command line of `chaos run` and `chaos clean`, in the library so the binary stays a thin shell
//! and tests can build the same values.

use super::nemesis::{NemesisKind, NetworkFaults};
use super::proxy::SlowLinks;
use super::workload::{StoreKind, WorkloadKind};
use crate::security::TlsArgs;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Where the cluster under test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// `kvd` processes in network namespaces this run creates (bridge, veth pairs, iptables inside
    /// the namespaces). Needs root; no Docker.
    Local,
    /// The docker-compose cluster, already up (`./deploy/up.sh`): faults through the Docker engine
    /// and iptables in each container's network namespace (`nsenter`); clients through the ports
    /// published on the host. Needs Docker, and root for `partition` and `loss`.
    Compose,
}

/// `chaos run`: start a cluster, drive a workload while a nemesis injects faults, check the history.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Where the cluster runs: `local` (kvd processes in network namespaces this run makes; needs
    /// root) or `compose` (the running docker-compose cluster; see --compose-* and --tls-*).
    #[arg(long, value_enum, default_value = "local")]
    pub target: Target,
    /// What the clients do: `register` (get/put/cas on a few keys at a time, checked for
    /// linearizability), `append` (unique appends and reads; afterwards every key is read and each
    /// acknowledged append must be in it exactly once, none twice) or `bank` (ledgers of 5 accounts
    /// of 100, one per key `bN`: reads, and transfers that read a ledger and cas it to one with a
    /// random amount moved between two accounts — a transfer is two operations in one step of
    /// --rate; every read and the final read of each ledger must total 500 with no balance
    /// negative). Each works on both stores; all are checked for linearizability per key.
    #[arg(long, value_enum, default_value = "register")]
    pub workload: WorkloadKind,
    /// Faults to inject, comma-separated; each faulty window picks one of them from the seed.
    /// `kill`: SIGKILL one node, a minority or the leader, restarted when the window ends.
    /// `pause`: SIGSTOP the same choice of nodes, SIGCONT at the window's end.
    /// `partition`: drop traffic between nodes (random halves, the leader alone, a bridge, a majority
    /// ring). `loss`: drop --loss-probability of the packets every node receives.
    /// `slow`: every node's peer (Raft) connections go through a TCP fault proxy of the harness
    /// that delivers each chunk --slow-delay plus up to --slow-jitter late and resets connections
    /// with --slow-reset-probability per chunk (messages then overtake each other across
    /// connections and are sent again after a reset; needs root).
    /// `clock` (--target local, debug build of kvd): move the wall clock of one node, a minority or
    /// the leader by 1 s to 5 min either way, back at the window's end; the nodes then drop sessions
    /// idle for 60 s, so a leader whose clock jumps ahead expires sessions for real (timers and
    /// timeouts run on the monotonic clock and are not moved).
    /// `restart-all`: SIGKILL every node at once, restart them all (in an order from the seed) at
    /// the window's end. `reconfigure` (--store sharded only): move a random shard to another group
    /// of the latest configuration through the controllers (needs two groups joined and an admin
    /// certificate; a move is permanent, nothing is healed). `none`: no faults.
    /// Availability is reported per kind of fault (kill-leader, pause-one, restart-all, ...).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,partition"
    )]
    pub nemesis: Vec<NemesisKind>,
    /// How long the workload runs with the nemesis active (`120s`, `2m`, `500ms`; a bare number is
    /// seconds). Recovery and the final reads come after.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub time: Duration,
    /// Operations per second, all clients together (each client paces itself at rate/clients; a
    /// client waiting on a slow operation does not make up for it afterwards).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Concurrent clients: in-process clerks, each with its own session.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Seed of the fault schedule, the fault targets and the workload's choices; printed and written
    /// to summary.json, so a run's plan can be replayed. Random if not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory for the history, nemesis events, summary, certificates, data directories and node
    /// logs. Must not exist or be empty. Default: chaos-runs/<unix time>-<pid>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The `kvd` binary to run. Default: the `kvd` next to this `chaos` binary.
    #[arg(long, value_name = "PATH")]
    pub kvd: Option<PathBuf>,
    /// Number of `kvd` replicas (1-9).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub nodes: u64,
    /// Length of each faulty window.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub fault_window: Duration,
    /// Length of each quiet window between faults (the run starts with one).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub heal_window: Duration,
    /// Share of incoming packets each node drops during a `loss` window (0 < p <= 1).
    #[arg(long, default_value_t = 0.2)]
    pub loss_probability: f64,
    /// `slow`: delay added to every chunk on a peer link.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    pub slow_delay: Duration,
    /// `slow`: up to this much more delay, drawn per chunk (so chunks on different links overtake
    /// each other).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub slow_jitter: Duration,
    /// `slow`: chance per chunk that the proxy resets the connection (0 <= p <= 1).
    #[arg(long, default_value_t = 0.002)]
    pub slow_reset_probability: f64,
    /// How long a client retries one operation before recording it as indeterminate (`info`).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub op_timeout: Duration,
    /// After the faulty phase, everything healed, the workload keeps running this long: at least one
    /// operation must succeed in it (the recovery invariant).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub recovery_time: Duration,
    /// Wall-clock budget of the linearizability checker; past it the verdict is "unknown" (exit 3).
    #[arg(long, default_value_t = 60)]
    pub check_budget_secs: u64,
    /// Keys in use at the same time. Default: half the clients, at least 5. Fewer keys mean more
    /// operations in flight on one key, and the checker's search grows with that: appends do not
    /// commute, so k concurrent appends between two reads can be ordered k! ways.
    #[arg(long)]
    pub keys: Option<u64>,
    /// Operations per key before the clients move on to fresh keys: short per-key histories keep the
    /// checker's search small even with many indeterminate operations.
    #[arg(long, default_value_t = 100)]
    pub ops_per_key: u64,
    /// `kvd --snapshot-threshold` (local target): small values make snapshots (and their
    /// installation on restarted nodes) part of the run.
    #[arg(long, default_value_t = 1 << 20)]
    pub snapshot_threshold: u64,
    /// Start the nodes with `kvd --lease-reads` (local target): reads are answered from the leader's
    /// lease, so a paused or partitioned leader that still believes in its lease is what the run
    /// tests.
    #[arg(long)]
    pub lease_reads: bool,
    /// Start the nodes with `kvd --follower-reads` and send every read to the replicas in turn
    /// (local target): reads served by followers, at the read index the leader confirms, are what
    /// the run tests.
    #[arg(long)]
    pub follower_reads: bool,
    /// Check the harness itself (local target, debug builds of kvd): every node runs with a
    /// deliberate safety bug — a put is acknowledged once the leader appended it, before a majority
    /// has it — and the run passes (exit 0) only if the checks catch the acknowledged writes that
    /// faults then lose, and fails (exit 1) if they miss them. Use with a `partition` nemesis and the
    /// `append` workload (a lost acknowledged append is then certain to show in the final read).
    #[arg(long)]
    pub self_test: bool,
    /// The compose project of the cluster (compose target). Default: any, as long as each service
    /// names one container.
    #[arg(long, value_name = "NAME")]
    pub compose_project: Option<String>,
    /// Which store the clients use: `replicated` (the KV cluster) or `sharded` (controllers and shard
    /// groups; compose target).
    #[arg(long, value_enum, default_value = "replicated")]
    pub store: StoreKind,
    /// The compose services the nemesis faults, in node order (compose target). Default: kv1,kv2,kv3;
    /// with --store sharded g1a,g1b,g1c,ctrler1,ctrler2,ctrler3.
    #[arg(long, value_delimiter = ',')]
    pub compose_services: Option<Vec<String>>,
    /// Where this machine reaches those services (their published ports), in the same order: the
    /// harness asks them who leads. Default: the ports of docker-compose.yml for the default services.
    #[arg(long, value_delimiter = ',')]
    pub compose_addresses: Option<Vec<String>>,
    /// The shard controllers as this machine reaches them (compose target, --store sharded).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103"
    )]
    pub compose_ctrlers: Vec<String>,
    /// The clients' certificates for the compose target (`deploy/up.sh` copies them to
    /// /tmp/ds824-certs and prints the DS824_TLS_* variables to export). The local target issues
    /// its own.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `chaos clean`: remove what a run with this tag left behind (namespaces, their processes, the
/// bridge, its firewall rule) — for a run that was itself killed before it could clean up.
#[derive(Args, Clone, Debug)]
pub struct CleanArgs {
    /// The run's tag, `chaos-<pid>`, as printed at start and written to summary.json.
    #[arg(long)]
    pub tag: String,
}

/// A flag value the run cannot work with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

impl RunArgs {
    /// How hard `loss` and `slow` hit, from the flags.
    pub fn network_faults(&self) -> NetworkFaults {
        NetworkFaults {
            loss: self.loss_probability,
            slow: SlowLinks {
                delay: self.slow_delay,
                jitter: self.slow_jitter,
                reset_probability: self.slow_reset_probability,
            },
        }
    }

    /// Nodes under test: `--nodes` locally, one per compose service.
    pub fn node_count(&self) -> u64 {
        match self.target {
            Target::Local => self.nodes,
            Target::Compose => self.services().len() as u64,
        }
    }

    /// The compose services under test: `--compose-services`, or docker-compose.yml's for the store.
    pub fn services(&self) -> Vec<String> {
        let default: &[&str] = match self.store {
            StoreKind::Replicated => &["kv1", "kv2", "kv3"],
            StoreKind::Sharded => &["g1a", "g1b", "g1c", "ctrler1", "ctrler2", "ctrler3"],
        };
        self.compose_services
            .clone()
            .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    }

    /// Where this machine reaches [`RunArgs::services`]: `--compose-addresses`, or the ports
    /// docker-compose.yml publishes for the default services.
    pub fn service_addresses(&self) -> Vec<String> {
        let default: &[u16] = match self.store {
            StoreKind::Replicated => &[17001, 17002, 17003],
            StoreKind::Sharded => &[17201, 17202, 17203, 17101, 17102, 17103],
        };
        self.compose_addresses.clone().unwrap_or_else(|| {
            default
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect()
        })
    }

    /// Keys in use at once: `--keys`, or half the clients (at least 5).
    pub fn keys_at_once(&self) -> u64 {
        self.keys.unwrap_or((self.clients as u64 / 2).max(5))
    }

    /// Check what clap's types cannot: ranges that depend on each other.
    pub fn validate(&self) -> Result<(), ArgsError> {
        let invalid = |text: &str| Err(ArgsError::Invalid(text.to_string()));
        if self.clients == 0 {
            return invalid("--clients must be at least 1");
        }
        if self.rate == 0 {
            return invalid("--rate must be at least 1");
        }
        if self.time.is_zero() {
            return invalid("--time must be longer than 0");
        }
        if !(self.loss_probability > 0.0 && self.loss_probability <= 1.0) {
            return invalid("--loss-probability must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.slow_reset_probability) {
            return invalid("--slow-reset-probability must be in [0, 1]");
        }
        if self.slow_delay + self.slow_jitter > Duration::from_secs(10) {
            return invalid("--slow-delay plus --slow-jitter must be at most 10s");
        }
        if self.fault_window.is_zero() || self.heal_window.is_zero() {
            return invalid("--fault-window and --heal-window must be longer than 0");
        }
        if self.op_timeout < Duration::from_millis(100) {
            return invalid("--op-timeout must be at least 100ms");
        }
        if self.keys == Some(0) || self.ops_per_key == 0 {
            return invalid("--keys and --ops-per-key must be at least 1");
        }
        if self.nemesis.contains(&NemesisKind::None) && self.nemesis.len() > 1 {
            return invalid("--nemesis none excludes the other nemeses");
        }
        if self.nemesis.contains(&NemesisKind::Clock) && self.target != Target::Local {
            return invalid(super::cluster::compose::CLOCK_NEEDS_LOCAL);
        }
        if self.self_test && self.target != Target::Local {
            return invalid(
                "--self-test runs on --target local only (it needs a debug build of kvd)",
            );
        }
        if self.target == Target::Compose && self.services().len() != self.service_addresses().len()
        {
            return invalid(
                "--compose-services and --compose-addresses need one entry each per node",
            );
        }
        if self.store == StoreKind::Sharded && self.target != Target::Compose {
            return invalid("--store sharded runs on --target compose only");
        }
        if self.nemesis.contains(&NemesisKind::Reconfigure) && self.store != StoreKind::Sharded {
            return invalid(
                "--nemesis reconfigure moves shards between groups: it needs --store sharded \
                 (--target compose; the local target runs one replicated group)",
            );
        }
        Ok(())
    }
}

/// `120s`, `2m`, `500ms`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 120s, 2m, 500ms)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(line: &str) -> RunArgs {
        Cli::try_parse_from(std::iter::once("chaos").chain(line.split_whitespace()))
            .map(|cli| cli.run)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn reconfigure_is_refused_without_the_sharded_store() {
        let local = args("--nemesis kill,reconfigure");
        let refusal = local
            .validate()
            .expect_err("no groups to move shards between");
        assert!(refusal.to_string().contains("--store sharded"), "{refusal}");
        assert!(
            args("--target compose --store sharded --nemesis reconfigure,restart-all")
                .validate()
                .is_ok()
        );
        let both = args("--nemesis restart-all --workload bank");
        assert_eq!(both.nemesis, vec![NemesisKind::RestartAll]);
        assert_eq!(both.workload, WorkloadKind::Bank);
        assert!(both.validate().is_ok());
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
