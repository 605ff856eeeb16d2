//! The nemesis: which faults happen when, decided by the seed, and applying and healing them.
//!
//! [`schedule`] is a pure function of the seed and the flags: a quiet window first (the workload
//! warms up), then alternating faulty and quiet windows until `--time`. Each faulty window holds one
//! [`Plan`] drawn from the enabled [`NemesisKind`]s; [`resolve`] turns it into concrete nodes when
//! the window opens (the leader is whoever leads at that moment; other choices come from the same
//! seeded stream), and [`Fault::heal`] undoes exactly that fault when it closes. Every event is
//! recorded on the run's clock. After the last window [`run`] heals everything at once
//! ([`Cluster::heal_all`]), whatever the windows did.

use super::cluster::{find_leader, Cluster, ClusterError};
use super::history::{Clock, NemesisEvent, RecordError, Recorder};
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
    loss: f64,
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
            Some(NemesisKind::Loss) => Plan::Loss(loss),
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
    /// These nodes were SIGKILLed.
    Kill(Vec<usize>),
    /// These nodes were SIGSTOPped.
    Pause(Vec<usize>),
    /// These pairs were cut.
    Partition {
        /// The shape, for the record.
        shape: Shape,
        /// Cut pairs.
        cuts: Vec<(usize, usize)>,
    },
    /// Every node drops incoming packets with this probability.
    Loss(f64),
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
    let who = |who: Who, rng: &mut ChaCha8Rng| match (who, leader) {
        (Who::Leader, Some(leader)) => vec![leader],
        (Who::Minority, _) => minority(n, rng),
        (Who::One | Who::Leader, _) => vec![rng.random_range(0..n.max(1))],
    };
    match plan {
        Plan::Kill(w) => Fault::Kill(who(w, rng)),
        Plan::Pause(w) => Fault::Pause(who(w, rng)),
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
        Plan::Loss(p) => Fault::Loss(p),
    }
}

impl Fault {
    /// The family, as recorded.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Partition { .. } => "partition",
            Fault::Loss(_) => "loss",
        }
    }

    /// The nodes affected, numbered from 0.
    pub fn nodes(&self, n: usize) -> Vec<usize> {
        match self {
            Fault::Kill(nodes) | Fault::Pause(nodes) => nodes.clone(),
            Fault::Partition { cuts, .. } => {
                let mut nodes: Vec<usize> = cuts.iter().flat_map(|&(a, b)| [a, b]).collect();
                nodes.sort_unstable();
                nodes.dedup();
                nodes
            }
            Fault::Loss(_) => (0..n).collect(),
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
            Fault::Kill(nodes) => format!("SIGKILL node(s) {}", ids(nodes)),
            Fault::Pause(nodes) => format!("SIGSTOP node(s) {}", ids(nodes)),
            Fault::Partition { shape, cuts } => format!(
                "partition ({shape:?}): cut {}",
                cuts.iter()
                    .map(|(a, b)| format!("{}-{}", a + 1, b + 1))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Fault::Loss(p) => format!("drop {:.0}% of incoming packets on every node", p * 100.0),
        }
    }

    /// Inflict it.
    pub async fn apply<C: Cluster>(&self, cluster: &mut C) -> Result<(), ClusterError> {
        match self {
            Fault::Kill(nodes) => {
                for &node in nodes {
                    cluster.kill(node).await?;
                }
            }
            Fault::Pause(nodes) => {
                for &node in nodes {
                    cluster.pause(node).await?;
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
        }
        Ok(())
    }

    /// Undo it.
    pub async fn heal<C: Cluster>(&self, cluster: &mut C) -> Result<(), ClusterError> {
        match self {
            Fault::Kill(nodes) => {
                for &node in nodes {
                    cluster.restart(node).await?;
                }
            }
            Fault::Pause(nodes) => {
                for &node in nodes {
                    cluster.resume(node).await?;
                }
            }
            Fault::Partition { .. } | Fault::Loss(_) => cluster.heal_network().await?,
        }
        Ok(())
    }
}

fn ids(nodes: &[usize]) -> Vec<u64> {
    nodes.iter().map(|&n| n as u64 + 1).collect()
}

/// Play `windows` against `cluster`, recording each start and stop, then heal everything.
pub async fn run<C: Cluster>(
    cluster: &mut C,
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
        let fault = resolve(window.plan, cluster, &mut rng).await;
        let nodes = ids(&fault.nodes(cluster.size()));
        fault.apply(cluster).await?;
        recorder.event(NemesisEvent {
            time: clock.now(),
            phase: "start",
            fault: fault.name(),
            nodes: nodes.clone(),
            detail: fault.describe(),
        })?;
        tokio::time::sleep_until(clock.at(window.end)).await;
        fault.heal(cluster).await?;
        recorder.event(NemesisEvent {
            time: clock.now(),
            phase: "stop",
            fault: fault.name(),
            nodes,
            detail: format!("healed: {}", fault.describe()),
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

    #[test]
    fn the_seed_names_the_schedule() {
        let kinds = [
            NemesisKind::Kill,
            NemesisKind::Partition,
            NemesisKind::Pause,
        ];
        let s = Duration::from_secs;
        let a = schedule(7, &kinds, s(60), s(5), s(5), 0.2);
        assert_eq!(a, schedule(7, &kinds, s(60), s(5), s(5), 0.2));
        assert_ne!(a, schedule(8, &kinds, s(60), s(5), s(5), 0.2));
        // Quiet first, then 5 s faulty / 5 s quiet: windows open at 5, 15, ..., 55.
        assert_eq!(a.len(), 6);
        assert_eq!(a[0].start, s(5));
        assert!(a.windows(2).all(|w| w[1].start == w[0].end + s(5)));
        assert!(a.iter().all(|w| w.end <= s(60)));
        assert!(schedule(7, &[NemesisKind::None], s(60), s(5), s(5), 0.2).is_empty());
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
}
