//! The nemesis: which faults happen when, decided by the seed, and applying and healing them.
//!
//! [`schedule`] is a pure function of the seed and the flags: a quiet window first (the workload
//! warms up), then alternating faulty and quiet windows until `--time`. Each faulty window holds one
//! [`Plan`] drawn from the enabled [`NemesisKind`]s; [`resolve`] turns it into concrete nodes when
//! the window opens (the leader is whoever leads at that moment; other choices come from the same
//! seeded stream), and [`Fault::heal`] undoes exactly that fault when it closes. Every event is
//! recorded on the run's clock. After the last window [`run`] heals everything at once
//! ([`Cluster::heal_all`]), whatever the windows did.
//!
//! Two faults are not about single nodes: `restart-all` SIGKILLs every node at once and restarts
//! them all, in an order drawn from the seed, when its window closes (the whole-cluster crash: every
//! node must recover from its own disk); `reconfigure` (sharded store only) asks the controllers to
//! [`choose_move`] a shard to another group, which the groups then carry out under the clients'
//! feet. A move is a legal, permanent change, so there is nothing to heal.

use super::cluster::{find_leader, Cluster, ClusterError};
use super::history::{Clock, NemesisEvent, RecordError, Recorder};
use super::proxy::SlowLinks;
use crate::ctrler::{Config, CtrlerClerk, Gid};
use crate::rsm::client::ClerkError;
use clap::ValueEnum;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use thiserror::Error;

/// Why the nemesis stopped.
#[derive(Debug, Error)]
pub enum NemesisError {
    /// A fault could not be applied or healed.
    #[error("nemesis: {0}")]
    Cluster(#[from] ClusterError),
    /// An event could not be recorded.
    #[error("nemesis: {0}")]
    Record(#[from] RecordError),
    /// The controllers will not let the run reconfigure (a certificate without the admin role, a
    /// `reconfigure` window with no controller clerk): every later move would fail the same way.
    #[error("nemesis reconfigure: {0}")]
    Reconfigure(String),
}

/// A family of faults, as `--nemesis` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NemesisKind {
    /// SIGKILL nodes, restart them at the window's end.
    Kill,
    /// SIGSTOP nodes, SIGCONT them at the window's end.
    Pause,
    /// Cut links between nodes.
    Partition,
    /// Drop a share of the packets every node receives.
    Loss,
    /// Route the nodes' peer links through a TCP fault proxy: delay with jitter, resets.
    Slow,
    /// Move the wall clock of one node, a minority or the leader by up to ±5 minutes, back at
    /// the window's end (`--target local` with a debug build of kvd only).
    Clock,
    /// SIGKILL every node, restart them all (in an order from the seed) at the window's end.
    #[serde(rename = "restart-all")]
    RestartAll,
    /// Move a random shard to another group through the controllers (`--store sharded` only).
    Reconfigure,
    /// No faults (a baseline run).
    None,
}

/// Which nodes a process fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// One node at random.
    One,
    /// A random minority (1 to (n-1)/2 nodes).
    Minority,
    /// The current leader (a random node if none is known).
    Leader,
}

/// The shape of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Two random halves (the smaller one a minority).
    Halves,
    /// The current leader alone against the rest.
    IsolateLeader,
    /// Two halves joined by one node that sees both (Jepsen's bridge).
    Bridge,
    /// Every node sees a majority, no two the same one (needs 5+ nodes; halves below that).
    Ring,
}

/// A fault as scheduled, before it is bound to nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Plan {
    /// SIGKILL, then restart.
    Kill(Who),
    /// SIGSTOP, then SIGCONT.
    Pause(Who),
    /// Cut links.
    Partition(Shape),
    /// Drop packets with this probability on every node.
    Loss(f64),
    /// Slow every peer link this way.
    Slow(SlowLinks),
    /// Move these nodes' wall clocks.
    Clock(Who),
    /// SIGKILL every node, restart all of them.
    RestartAll,
    /// Move a shard to another group.
    Reconfigure,
}

/// How hard the network faults hit: `--loss-probability` and the `--slow-*` flags.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetworkFaults {
    /// Share of incoming packets dropped in a `loss` window.
    pub loss: f64,
    /// The links of a `slow` window.
    pub slow: SlowLinks,
}

/// One faulty window of the schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// When it opens, from the run's start.
    pub start: Duration,
    /// When it closes.
    pub end: Duration,
    /// What happens in it.
    pub plan: Plan,
}

/// The schedule for a run of length `time`: a quiet `heal` window, then `fault`/`heal` windows in
/// turn while time remains (the last faulty window is cut at `time`). Same inputs, same schedule.
pub fn schedule(
    seed: u64,
    kinds: &[NemesisKind],
    time: Duration,
    fault: Duration,
    heal: Duration,
    network: &NetworkFaults,
) -> Vec<Window> {
    let kinds: Vec<NemesisKind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != NemesisKind::None)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut windows = Vec::new();
    let mut start = heal;
    while start < time && !kinds.is_empty() && !fault.is_zero() {
        let end = (start + fault).min(time);
        let whos = [Who::One, Who::Minority, Who::Leader];
        let shapes = [
            Shape::Halves,
            Shape::IsolateLeader,
            Shape::Bridge,
            Shape::Ring,
        ];
        let plan = match kinds.choose(&mut rng) {
            Some(NemesisKind::Kill) => Plan::Kill(*whos.choose(&mut rng).unwrap_or(&Who::One)),
            Some(NemesisKind::Pause) => Plan::Pause(*whos.choose(&mut rng).unwrap_or(&Who::One)),
            Some(NemesisKind::Partition) => {
                Plan::Partition(*shapes.choose(&mut rng).unwrap_or(&Shape::Halves))
            }
            Some(NemesisKind::Loss) => Plan::Loss(network.loss),
            Some(NemesisKind::Slow) => Plan::Slow(network.slow),
            Some(NemesisKind::Clock) => Plan::Clock(*whos.choose(&mut rng).unwrap_or(&Who::One)),
            Some(NemesisKind::RestartAll) => Plan::RestartAll,
            Some(NemesisKind::Reconfigure) => Plan::Reconfigure,
            Some(NemesisKind::None) | None => break,
        };
        windows.push(Window { start, end, plan });
        start = end + heal;
    }
    windows
}

/// A fault bound to nodes (numbered from 0), as applied.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// These nodes were SIGKILLed; who they were (`Leader` only if the leader was known).
    Kill(Vec<usize>, Who),
    /// These nodes were SIGSTOPped; who they were.
    Pause(Vec<usize>, Who),
    /// These pairs were cut.
    Partition {
        /// The shape, for the record.
        shape: Shape,
        /// Cut pairs.
        cuts: Vec<(usize, usize)>,
    },
    /// Every node drops incoming packets with this probability.
    Loss(f64),
    /// These nodes' wall clocks were moved by this many ms (who they were).
    Clock(Vec<usize>, Who, i64),
    /// Every node's peer links go through the fault proxy, whose randomness starts from this seed.
    Slow(SlowLinks, u64),
    /// Every node was SIGKILLed; they are restarted in this order.
    RestartAll(Vec<usize>),
    /// A shard move asked of the controllers, and what came of it.
    Reconfigure(Reconfiguration),
}

/// Largest clock skew a `clock` window applies, either way (ms).
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// A controller `Move` the nemesis chose: shard `shard` from group `from` to group `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMove {
    /// The shard.
    pub shard: u64,
    /// The group serving it in the configuration the move was chosen from (0: nobody).
    pub from: Gid,
    /// The group it is given to.
    pub to: Gid,
    /// The configuration it was chosen from.
    pub config: u64,
}

/// A `reconfigure` window: the move made (or why none was), and the controllers' answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconfiguration {
    /// The move asked for; `None` when none was possible or the configuration could not be read.
    pub chosen: Option<ShardMove>,
    /// What came of it, for the record (`configuration 12`, `outcome unknown: ...`, `no move: ...`).
    pub outcome: String,
}

/// The move a `reconfigure` window makes in `config`: a random shard to a random other group of that
/// configuration. A pure function of the stream's state and the configuration (a run's moves replay
/// from its seed against the same configurations); `None` when there is no shard or no second group.
pub fn choose_move(config: &Config, rng: &mut ChaCha8Rng) -> Option<ShardMove> {
    // With one group only there is nowhere to move a shard to (a shard nobody serves could be given
    // to it, but that is a repair, not a fault, and the controllers' own Join does it).
    if config.shards.is_empty() || config.groups.len() < 2 {
        return None;
    }
    let shard = rng.random_range(0..config.shards.len());
    let from = config.shards[shard];
    let others: Vec<Gid> = config
        .groups
        .keys()
        .copied()
        .filter(|&gid| gid != from)
        .collect();
    let &to = others.choose(rng)?;
    Some(ShardMove {
        shard: shard as u64,
        from,
        to,
        config: config.num,
    })
}

/// The order a `restart-all` window restarts nodes `0..n` in: a permutation from the seeded stream.
pub fn restart_order(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    order
}

/// A random minority of `0..n` (at least one node when n > 0).
fn minority(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let max = ((n.saturating_sub(1)) / 2).max(1).min(n);
    let count = rng.random_range(1..=max.max(1));
    let mut nodes: Vec<usize> = (0..n).collect();
    nodes.shuffle(rng);
    nodes.truncate(count.min(n));
    nodes.sort_unstable();
    nodes
}

/// Every pair (a, b) with a in `left` and b in `right`, a < b first.
fn cross(left: &[usize], right: &[usize]) -> Vec<(usize, usize)> {
    let mut cuts: Vec<(usize, usize)> = left
        .iter()
        .flat_map(|&a| right.iter().map(move |&b| (a.min(b), a.max(b))))
        .filter(|(a, b)| a != b)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// The pairs to cut for `shape` on `n` nodes (`leader`: who leads now, if known).
pub fn partition(
    shape: Shape,
    n: usize,
    leader: Option<usize>,
    rng: &mut ChaCha8Rng,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    match shape {
        Shape::Ring if n >= 5 => {
            // Ring order; each node keeps the nodes within `reach` steps: itself plus 2*reach is a
            // majority, and neighbours' majorities differ.
            let reach = (n / 2).div_ceil(2);
            let mut cuts = Vec::new();
            for i in 0..n {
                for j in (i + 1)..n {
                    let distance = (j - i).min(n - (j - i));
                    if distance > reach {
                        let (a, b) = (order[i], order[j]);
                        cuts.push((a.min(b), a.max(b)));
                    }
                }
            }
            cuts.sort_unstable();
            cuts
        }
        Shape::IsolateLeader => {
            let alone = leader.unwrap_or(order[0]);
            let rest: Vec<usize> = (0..n).filter(|&i| i != alone).collect();
            cross(&[alone], &rest)
        }
        Shape::Bridge if n >= 3 => {
            let (left, right) = order.split_at(n / 2);
            // right[0] is the bridge: it keeps its links to both sides.
            cross(left, &right[1..])
        }
        Shape::Halves | Shape::Ring | Shape::Bridge => {
            let (left, right) = order.split_at(n / 2);
            cross(left, right)
        }
    }
}

/// Bind `plan` to nodes of `cluster` now.
pub async fn resolve<C: Cluster>(plan: Plan, cluster: &C, rng: &mut ChaCha8Rng) -> Fault {
    let n = cluster.size();
    let leader = match plan {
        Plan::Kill(Who::Leader)
        | Plan::Pause(Who::Leader)
        | Plan::Clock(Who::Leader)
        | Plan::Partition(Shape::IsolateLeader) => {
            find_leader(
                &cluster.client_addresses(),
                &cluster.client_security(),
                Duration::from_millis(500),
            )
            .await
        }
        _ => None,
    };
    // The nodes, and who they turned out to be: the leader only if one was found.
    let who = |who: Who, rng: &mut ChaCha8Rng| match (who, leader) {
        (Who::Leader, Some(leader)) => (vec![leader], Who::Leader),
        (Who::Minority, _) => (minority(n, rng), Who::Minority),
        (Who::One | Who::Leader, _) => (vec![rng.random_range(0..n.max(1))], Who::One),
    };
    match plan {
        Plan::Kill(w) => {
            let (nodes, who) = who(w, rng);
            Fault::Kill(nodes, who)
        }
        Plan::Pause(w) => {
            let (nodes, who) = who(w, rng);
            Fault::Pause(nodes, who)
        }
        Plan::Partition(shape) => {
            // Below their sizes a ring and a bridge are plain halves: say what was done.
            let shape = match shape {
                Shape::Ring if n < 5 => Shape::Halves,
                Shape::Bridge if n < 3 => Shape::Halves,
                other => other,
            };
            Fault::Partition {
                shape,
                cuts: partition(shape, n, leader, rng),
            }
        }
        Plan::Clock(w) => {
            let (nodes, who) = who(w, rng);
            // Far enough to matter (past a session's idle time, both ways), at most 5 minutes.
            let skew = rng.random_range(1_000..=MAX_CLOCK_SKEW_MS);
            Fault::Clock(nodes, who, if rng.random_bool(0.5) { skew } else { -skew })
        }
        Plan::Loss(p) => Fault::Loss(p),
        Plan::Slow(links) => Fault::Slow(links, rng.random()),
        Plan::RestartAll => Fault::RestartAll(restart_order(n, rng)),
        // Made by `reconfigure`, which holds the controller clerk; reaching here is a bug in `run`.
        Plan::Reconfigure => Fault::Reconfigure(Reconfiguration {
            chosen: None,
            outcome: "no move: no controller clerk".into(),
        }),
    }
}

/// Whether a controller call was refused for this process's identity (its certificate's role).
fn refused_for_identity(error: &ClerkError) -> bool {
    match error {
        ClerkError::Denied(_) => true,
        ClerkError::InDoubt(inner) => matches!(**inner, ClerkError::Denied(_)),
        _ => false,
    }
}

/// Whether a failed controller call may still have taken effect (or may work when retried later):
/// then the window records it and the run goes on; otherwise it is [`NemesisError::Reconfigure`].
fn indeterminate(error: &ClerkError) -> bool {
    matches!(
        error,
        ClerkError::Timeout { .. }
            | ClerkError::Unreachable { .. }
            | ClerkError::SessionExpired
            | ClerkError::InDoubt(_)
    )
}

/// A `reconfigure` window: read the latest configuration, [`choose_move`], ask for it. A controller
/// that does not answer is recorded (the move may still happen); one that refuses the identity
/// ends the run, since every later window would be refused too.
pub async fn reconfigure(
    ctrler: &mut CtrlerClerk,
    rng: &mut ChaCha8Rng,
) -> Result<Reconfiguration, NemesisError> {
    let config = match ctrler.query(None).await {
        Ok(config) => config,
        Err(e) if indeterminate(&e) => {
            return Ok(Reconfiguration {
                chosen: None,
                outcome: format!("no move: the controllers did not answer a query: {e}"),
            })
        }
        Err(e) => return Err(NemesisError::Reconfigure(format!("query: {e}"))),
    };
    let Some(chosen) = choose_move(&config, rng) else {
        let groups: Vec<Gid> = config.groups.keys().copied().collect();
        return Ok(Reconfiguration {
            chosen: None,
            outcome: format!(
                "no move: configuration {} has group(s) {groups:?} only",
                config.num
            ),
        });
    };
    let outcome = match ctrler.move_shard(chosen.shard, chosen.to).await {
        Ok(next) => format!("configuration {}", next.num),
        // Refused for this identity (also after an attempt that went unanswered): every later
        // move would be too, so the run stops and says what to fix.
        Err(e) if refused_for_identity(&e) => {
            return Err(NemesisError::Reconfigure(format!(
                "the controllers refused a Move ({e}): moves need an admin certificate \
                 (--tls-cert/--tls-key, e.g. /tmp/ds824-certs/admin-operator.pem)"
            )))
        }
        Err(e) if indeterminate(&e) => format!("outcome unknown: {e}"),
        // Refused on its merits (the group left meanwhile, say): recorded, the run goes on.
        Err(e) => format!("refused: {e}"),
    };
    Ok(Reconfiguration {
        chosen: Some(chosen),
        outcome,
    })
}

impl Fault {
    /// The family, as recorded.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Kill(..) => "kill",
            Fault::Pause(..) => "pause",
            Fault::Partition { .. } => "partition",
            Fault::Loss(_) => "loss",
            Fault::Slow(..) => "slow",
            Fault::Clock(..) => "clock",
            Fault::RestartAll(_) => "restart-all",
            Fault::Reconfigure(_) => "reconfigure",
        }
    }

    /// The kind availability is reported by ([`NemesisEvent::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_, Who::Leader) => "kill-leader",
            Fault::Kill(_, Who::One) => "kill-one",
            Fault::Kill(_, Who::Minority) => "kill-minority",
            Fault::Pause(_, Who::Leader) => "pause-leader",
            Fault::Pause(_, Who::One) => "pause-one",
            Fault::Pause(_, Who::Minority) => "pause-minority",
            Fault::Partition { shape, .. } => match shape {
                Shape::Halves => "partition-halves",
                Shape::IsolateLeader => "partition-isolate-leader",
                Shape::Bridge => "partition-bridge",
                Shape::Ring => "partition-ring",
            },
            Fault::Loss(_) => "loss",
            Fault::Slow(..) => "slow",
            Fault::Clock(_, Who::Leader, _) => "clock-leader",
            Fault::Clock(..) => "clock",
            Fault::RestartAll(_) => "restart-all",
            Fault::Reconfigure(_) => "reconfigure",
        }
    }

    /// The nodes affected, numbered from 0 (none for a shard move: no process or link is touched).
    pub fn nodes(&self, n: usize) -> Vec<usize> {
        match self {
            Fault::Kill(nodes, _) | Fault::Pause(nodes, _) | Fault::Clock(nodes, _, _) => {
                nodes.clone()
            }
            Fault::RestartAll(_) => (0..n).collect(),
            Fault::Reconfigure(_) => Vec::new(),
            Fault::Partition { cuts, .. } => {
                let mut nodes: Vec<usize> = cuts.iter().flat_map(|&(a, b)| [a, b]).collect();
                nodes.sort_unstable();
                nodes.dedup();
                nodes
            }
            Fault::Loss(_) | Fault::Slow(..) => (0..n).collect(),
        }
    }

    /// A line for the record, with nodes named by id.
    pub fn describe(&self) -> String {
        let ids = |nodes: &[usize]| {
            nodes
                .iter()
                .map(|n| (n + 1).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Fault::Kill(nodes, who) => format!("SIGKILL node(s) {} ({who:?})", ids(nodes)),
            Fault::Pause(nodes, who) => format!("SIGSTOP node(s) {} ({who:?})", ids(nodes)),
            Fault::Clock(nodes, who, skew) => format!(
                "wall clock of node(s) {} ({who:?}) moved by {skew:+} ms",
                ids(nodes)
            ),
            Fault::RestartAll(order) => format!("SIGKILL every node; restart order {}", ids(order)),
            Fault::Reconfigure(r) => match r.chosen {
                Some(m) => format!(
                    "move shard {} from group {} to group {} (chosen from configuration {}): {}",
                    m.shard, m.from, m.to, m.config, r.outcome
                ),
                None => r.outcome.clone(),
            },
            Fault::Partition { shape, cuts } => format!(
                "partition ({shape:?}): cut {}",
                cuts.iter()
                    .map(|(a, b)| format!("{}-{}", a + 1, b + 1))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Fault::Loss(p) => format!("drop {:.0}% of incoming packets on every node", p * 100.0),
            Fault::Slow(links, _) => format!(
                "peer links through the fault proxy: delay {:?} + up to {:?} jitter per chunk, \
                 reset with probability {} per chunk",
                links.delay, links.jitter, links.reset_probability
            ),
        }
    }

    /// Inflict it.
    pub async fn apply<C: Cluster>(&self, cluster: &mut C) -> Result<(), ClusterError> {
        match self {
            Fault::Kill(nodes, _) => {
                for &node in nodes {
                    cluster.kill(node).await?;
                }
            }
            Fault::RestartAll(_) => {
                for node in 0..cluster.size() {
                    cluster.kill(node).await?;
                }
            }
            Fault::Pause(nodes, _) => {
                for &node in nodes {
                    cluster.pause(node).await?;
                }
            }
            Fault::Clock(nodes, _, skew) => {
                for &node in nodes {
                    cluster.skew_clock(node, *skew).await?;
                }
            }
            Fault::Partition { cuts, .. } => {
                for &(a, b) in cuts {
                    cluster.cut(a, b).await?;
                }
            }
            Fault::Loss(p) => {
                for node in 0..cluster.size() {
                    cluster.lossy(node, *p).await?;
                }
            }
            Fault::Slow(links, seed) => cluster.slow(*links, *seed).await?,
            // The move was made when the window was resolved ([`reconfigure`]).
            Fault::Reconfigure(_) => {}
        }
        Ok(())
    }

    /// Undo it.
    pub async fn heal<C: Cluster>(&self, cluster: &mut C) -> Result<(), ClusterError> {
        match self {
            Fault::Kill(nodes, _) | Fault::RestartAll(nodes) => {
                for &node in nodes {
                    cluster.restart(node).await?;
                }
            }
            Fault::Pause(nodes, _) => {
                for &node in nodes {
                    cluster.resume(node).await?;
                }
            }
            Fault::Clock(nodes, _, _) => {
                for &node in nodes {
                    cluster.skew_clock(node, 0).await?;
                }
            }
            Fault::Partition { .. } | Fault::Loss(_) | Fault::Slow(..) => {
                cluster.heal_network().await?
            }
            // Moves are permanent and legal: nothing to undo.
            Fault::Reconfigure(_) => {}
        }
        Ok(())
    }
}

fn ids(nodes: &[usize]) -> Vec<u64> {
    nodes.iter().map(|&n| n as u64 + 1).collect()
}

/// Play `windows` against `cluster`, recording each start and stop. `ctrler` makes the moves of
/// `reconfigure` windows (the sharded store's controllers; `None` elsewhere, where
/// [`super::args::RunArgs::validate`] refuses that nemesis).
///
/// A fault's `start` is stamped once it is in place — for `restart-all` once every node is down —
/// and its `stop` once it is healed: for `restart-all` that is the moment the last node was
/// restarted, from which its availability is measured.
pub async fn run<C: Cluster>(
    cluster: &mut C,
    mut ctrler: Option<&mut CtrlerClerk>,
    windows: &[Window],
    seed: u64,
    clock: Clock,
    recorder: &Recorder,
) -> Result<(), NemesisError> {
    // Targets come from their own stream, so the schedule does not depend on how many draws
    // resolving took.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    for window in windows {
        tokio::time::sleep_until(clock.at(window.start)).await;
        let fault = match (window.plan, ctrler.as_deref_mut()) {
            (Plan::Reconfigure, Some(ctrler)) => {
                Fault::Reconfigure(reconfigure(ctrler, &mut rng).await?)
            }
            (Plan::Reconfigure, None) => {
                return Err(NemesisError::Reconfigure(
                    "no controllers to ask: reconfigure needs --store sharded".into(),
                ))
            }
            (plan, _) => {
                let fault = resolve(plan, cluster, &mut rng).await;
                fault.apply(cluster).await?;
                fault
            }
        };
        let nodes = ids(&fault.nodes(cluster.size()));
        recorder.event(NemesisEvent {
            time: clock.now(),
            phase: "start",
            fault: fault.name(),
            kind: fault.kind(),
            nodes: nodes.clone(),
            detail: fault.describe(),
        })?;
        tokio::time::sleep_until(clock.at(window.end)).await;
        // What the proxy did, read before healing stops it.
        let slow_record = cluster.slow_summary();
        fault.heal(cluster).await?;
        let detail = match &fault {
            Fault::Reconfigure(_) => {
                format!("window over (a move is not undone): {}", fault.describe())
            }
            Fault::Slow(..) => format!(
                "healed: {} ({})",
                fault.describe(),
                slow_record.as_deref().unwrap_or("the proxy did not start")
            ),
            _ => format!("healed: {}", fault.describe()),
        };
        recorder.event(NemesisEvent {
            time: clock.now(),
            phase: "stop",
            fault: fault.name(),
            kind: fault.kind(),
            nodes,
            detail,
        })?;
    }
    Ok(())
}

/// Heal everything and record it (the end of the faulty phase, whatever the windows did).
pub async fn heal_all<C: Cluster>(
    cluster: &mut C,
    clock: Clock,
    recorder: &Recorder,
) -> Result<(), NemesisError> {
    cluster.heal_all().await?;
    recorder.event(NemesisEvent {
        time: clock.now(),
        phase: "stop",
        fault: "heal-all",
        kind: "heal-all",
        nodes: ids(&(0..cluster.size()).collect::<Vec<_>>()),
        detail:
            "every fault healed: network restored, paused nodes resumed, killed nodes restarted"
                .into(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETWORK: NetworkFaults = NetworkFaults {
        loss: 0.2,
        slow: SlowLinks {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(100),
            reset_probability: 0.001,
        },
    };

    #[test]
    fn the_seed_names_the_schedule() {
        let kinds = [
            NemesisKind::Kill,
            NemesisKind::Partition,
            NemesisKind::Pause,
        ];
        let s = Duration::from_secs;
        let a = schedule(7, &kinds, s(60), s(5), s(5), &NETWORK);
        assert_eq!(a, schedule(7, &kinds, s(60), s(5), s(5), &NETWORK));
        assert_ne!(a, schedule(8, &kinds, s(60), s(5), s(5), &NETWORK));
        // Quiet first, then 5 s faulty / 5 s quiet: windows open at 5, 15, ..., 55.
        assert_eq!(a.len(), 6);
        assert_eq!(a[0].start, s(5));
        assert!(a.windows(2).all(|w| w[1].start == w[0].end + s(5)));
        assert!(a.iter().all(|w| w.end <= s(60)));
        assert!(schedule(7, &[NemesisKind::None], s(60), s(5), s(5), &NETWORK).is_empty());
    }

    #[test]
    fn partitions_cut_what_their_shape_says() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // The leader alone: both of its links, nothing else.
        assert_eq!(
            partition(Shape::IsolateLeader, 3, Some(1), &mut rng),
            vec![(0, 1), (1, 2)]
        );
        // Halves of 3: one node loses both links.
        let cuts = partition(Shape::Halves, 3, None, &mut rng);
        assert_eq!(cuts.len(), 2);
        // A bridge of 3: one link cut, the bridge keeps both of its own.
        assert_eq!(partition(Shape::Bridge, 3, None, &mut rng).len(), 1);
        // A ring of 5: every node keeps 2 of 4 links (a majority with itself).
        let ring = partition(Shape::Ring, 5, None, &mut rng);
        assert_eq!(ring.len(), 5);
        for node in 0..5 {
            let lost = ring
                .iter()
                .filter(|(a, b)| *a == node || *b == node)
                .count();
            assert_eq!(lost, 2, "node {node} in {ring:?}");
        }
        for n in 1..=9 {
            let m = minority(n, &mut rng);
            assert!(!m.is_empty() && (n <= 2 || m.len() * 2 < n), "{n}: {m:?}");
        }
    }

    #[test]
    fn restart_all_windows_come_from_the_seed_and_restart_every_node_in_a_seeded_order() {
        let kinds = [
            NemesisKind::RestartAll,
            NemesisKind::Kill,
            NemesisKind::Pause,
        ];
        let s = Duration::from_secs;
        let a = schedule(11, &kinds, s(120), s(5), s(5), &NETWORK);
        assert_eq!(a, schedule(11, &kinds, s(120), s(5), s(5), &NETWORK));
        assert_ne!(a, schedule(12, &kinds, s(120), s(5), s(5), &NETWORK));
        assert!(a.iter().any(|w| w.plan == Plan::RestartAll), "{a:?}");
        assert!(a.iter().any(|w| w.plan != Plan::RestartAll), "{a:?}");
        let only = schedule(1, &[NemesisKind::RestartAll], s(60), s(5), s(5), &NETWORK);
        assert!(only.iter().all(|w| w.plan == Plan::RestartAll));
        assert_eq!(only.len(), 6);
        // The restart order is a permutation drawn from the seeded stream.
        let order = |seed| restart_order(5, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(order(3), order(3));
        let mut sorted = order(3);
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert!((0..20).any(|seed| order(seed) != order(3)));
        let fault = Fault::RestartAll(vec![2, 0, 1]);
        assert_eq!(fault.nodes(3), vec![0, 1, 2]);
        assert_eq!(fault.kind(), "restart-all");
        assert!(
            fault.describe().contains("restart order 3,1,2"),
            "{}",
            fault.describe()
        );
    }

    #[test]
    fn a_fault_kind_says_whom_it_hit() {
        assert_eq!(Fault::Kill(vec![1], Who::Leader).kind(), "kill-leader");
        assert_eq!(
            Fault::Pause(vec![0, 2], Who::Minority).kind(),
            "pause-minority"
        );
        let isolate = Fault::Partition {
            shape: Shape::IsolateLeader,
            cuts: vec![(0, 1), (0, 2)],
        };
        assert_eq!(isolate.kind(), "partition-isolate-leader");
        assert_eq!(isolate.name(), "partition");
    }

    fn config(num: u64, shards: &[Gid], gids: &[Gid]) -> Config {
        Config {
            num,
            shards: shards.to_vec(),
            groups: gids
                .iter()
                .map(|&gid| (gid, vec![format!("g{gid}:7201")]))
                .collect(),
        }
    }

    #[test]
    fn a_move_is_a_pure_function_of_the_seed_and_the_configuration() {
        let three = config(7, &[1, 1, 1, 1, 2, 2, 2, 3, 3, 3], &[1, 2, 3]);
        let pick =
            |seed, config: &Config| choose_move(config, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(pick(5, &three), pick(5, &three));
        let mut moved_to = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let m = pick(seed, &three).expect("three groups: a move exists");
            assert_eq!(m.config, 7);
            assert!(m.shard < 10);
            assert_eq!(m.from, three.shards[m.shard as usize]);
            assert_ne!(m.to, m.from, "a move to where the shard already is: {m:?}");
            assert!(three.groups.contains_key(&m.to), "{m:?}");
            moved_to.insert(m.to);
        }
        assert_eq!(
            moved_to.len(),
            3,
            "every group receives shards over 50 seeds"
        );
        // One stream, several windows: the sequence replays from the seed.
        let sequence = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..5)
                .map(|_| choose_move(&three, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(sequence(9), sequence(9));
        // Nowhere to go: one group, or none.
        assert_eq!(pick(1, &config(3, &[1; 10], &[1])), None);
        assert_eq!(pick(1, &config(0, &[0; 10], &[])), None);
        // A shard nobody serves goes to one of two groups.
        let unassigned = config(4, &[0; 10], &[1, 2]);
        let m = pick(2, &unassigned).expect("two groups");
        assert!(m.from == 0 && (m.to == 1 || m.to == 2), "{m:?}");
    }
}
