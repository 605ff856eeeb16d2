//! `kvctl bench --breakdown`: where a write's time went. Every node's stage counters
//! ([`crate::stages`]) are read before and after the benchmark; the differences give the mean time per
//! stage of exactly the writes in between, which the table lines up under the client's own mean.

use super::status::NodeReport;
use crate::stages::StageTotal;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// One node's counters at one moment, by stage name.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    stages: HashMap<String, StageTotal>,
    persisted_entries: u64,
}

impl Reading {
    fn stage(&self, name: &str) -> StageTotal {
        self.stages.get(name).copied().unwrap_or_default()
    }

    fn since(&self, before: &Reading) -> Reading {
        Reading {
            stages: self
                .stages
                .iter()
                .map(|(name, total)| (name.clone(), total.since(before.stage(name))))
                .collect(),
            persisted_entries: self
                .persisted_entries
                .saturating_sub(before.persisted_entries),
        }
    }
}

/// The counters of every node that answered, by address.
pub fn readings(reports: &[NodeReport]) -> HashMap<String, Reading> {
    reports
        .iter()
        .filter_map(|report| {
            let status = report.status.as_ref().ok()?;
            let stages = status
                .stages
                .iter()
                .map(|s| {
                    let total = StageTotal {
                        count: s.count,
                        micros: s.micros,
                    };
                    (s.name.clone(), total)
                })
                .collect();
            let reading = Reading {
                stages,
                persisted_entries: status.persisted_entries,
            };
            Some((report.address.clone(), reading))
        })
        .collect()
}

/// The per-stage means of one benchmark run.
#[derive(Clone, Debug)]
pub struct Breakdown {
    /// The node that served the writes (the most `propose`s in between), if any did.
    pub leader: Option<String>,
    /// The client's mean latency per operation.
    pub client: Duration,
    /// Writes served, as counted by the leader.
    pub writes: u64,
    /// Leader: arrival to log index.
    pub propose: Option<Duration>,
    /// Leader: log index to reply.
    pub replicate_and_apply: Option<Duration>,
    /// Leader: append to commit.
    pub commit: Option<Duration>,
    /// Leader: one persist, and entries per persist.
    pub leader_persist: (Option<Duration>, f64),
    /// Followers (all of them together): one persist, and entries per persist.
    pub follower_persist: (Option<Duration>, f64),
}

impl Breakdown {
    /// Compares two sets of [`readings`] around a run whose client-measured mean was `client`.
    pub fn between(
        before: &HashMap<String, Reading>,
        after: &HashMap<String, Reading>,
        client: Duration,
    ) -> Breakdown {
        let deltas: HashMap<&String, Reading> = after
            .iter()
            .map(|(address, now)| {
                let then = before.get(address).cloned().unwrap_or_default();
                (address, now.since(&then))
            })
            .collect();
        let leader = deltas
            .iter()
            .max_by_key(|(_, d)| d.stage("propose").count)
            .filter(|(_, d)| d.stage("propose").count > 0)
            .map(|(address, _)| (*address).clone());
        let none = Reading::default();
        let at_leader = leader.as_ref().and_then(|l| deltas.get(l)).unwrap_or(&none);
        let per_persist = |total: StageTotal, entries: u64| {
            (total.mean(), entries as f64 / total.count.max(1) as f64)
        };
        let mut followers = StageTotal::default();
        let mut follower_entries = 0;
        for (address, delta) in &deltas {
            if Some(*address) != leader.as_ref() {
                let total = delta.stage("follower_persist");
                followers.count += total.count;
                followers.micros += total.micros;
                follower_entries += delta.persisted_entries;
            }
        }
        Breakdown {
            writes: at_leader.stage("propose").count,
            propose: at_leader.stage("propose").mean(),
            replicate_and_apply: at_leader.stage("replicate_and_apply").mean(),
            commit: at_leader.stage("commit").mean(),
            leader_persist: per_persist(
                at_leader.stage("leader_persist"),
                at_leader.persisted_entries,
            ),
            follower_persist: per_persist(followers, follower_entries),
            leader,
            client,
        }
    }
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(leader) = &self.leader else {
            return writeln!(
                f,
                "breakdown: no node served a write during the run (reads only, or no counters)"
            );
        };
        let ms = |d: Option<Duration>| {
            d.map_or_else(
                || "-".to_string(),
                |d| format!("{:.3} ms", d.as_secs_f64() * 1e3),
            )
        };
        let server = self
            .propose
            .zip(self.replicate_and_apply)
            .map(|(a, b)| a + b);
        let network = server.map(|s| self.client.saturating_sub(s));
        let after_commit = self
            .replicate_and_apply
            .zip(self.commit)
            .map(|(r, c)| r.saturating_sub(c));
        writeln!(
            f,
            "where a write's time went (means over the run's {} writes; leader {leader}):",
            self.writes
        )?;
        let rows = [
            (
                "client: whole operation",
                ms(Some(self.client)),
                String::new(),
            ),
            (
                "  network, gRPC and the client library",
                ms(network),
                "client mean minus the leader's".into(),
            ),
            (
                "  leader: arrival -> log index",
                ms(self.propose),
                "queue for the Raft loop, encode".into(),
            ),
            (
                "  leader: log index -> reply",
                ms(self.replicate_and_apply),
                String::new(),
            ),
            (
                "    append -> commit",
                ms(self.commit),
                "own flush, then a quorum's round trip".into(),
            ),
            (
                "      leader persist (write + fsync)",
                ms(self.leader_persist.0),
                format!("{:.2} entries per persist", self.leader_persist.1),
            ),
            (
                "      follower persist (write + fsync)",
                ms(self.follower_persist.0),
                format!("{:.2} entries per persist", self.follower_persist.1),
            ),
            (
                "    commit -> reply",
                ms(after_commit),
                "apply, wake the request".into(),
            ),
        ];
        for (stage, mean, note) in rows {
            writeln!(f, "  {stage:<42} {mean:>10}  {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kv::{StageTime, StatusResponse};

    fn report(address: &str, stages: &[(&str, u64, u64)], entries: u64) -> NodeReport {
        NodeReport {
            address: address.into(),
            status: Ok(StatusResponse {
                stages: stages
                    .iter()
                    .map(|&(name, count, micros)| StageTime {
                        name: name.into(),
                        count,
                        micros,
                    })
                    .collect(),
                persisted_entries: entries,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_leader_is_the_node_that_served_the_writes_and_means_cover_only_the_run() {
        let before = readings(&[
            report(
                "a",
                &[("propose", 10, 10_000), ("follower_persist", 5, 500)],
                5,
            ),
            report("b", &[("propose", 0, 0), ("leader_persist", 1, 100)], 1),
        ]);
        let after = readings(&[
            report(
                "a",
                &[("propose", 10, 10_000), ("follower_persist", 105, 20_500)],
                205,
            ),
            report(
                "b",
                &[
                    ("propose", 100, 20_000),
                    ("replicate_and_apply", 100, 90_000),
                    ("commit", 100, 80_000),
                    ("leader_persist", 51, 15_100),
                ],
                101,
            ),
        ]);
        let b = Breakdown::between(&before, &after, Duration::from_millis(1));
        assert_eq!(b.leader.as_deref(), Some("b"));
        assert_eq!(b.writes, 100);
        assert_eq!(b.propose, Some(Duration::from_micros(200)));
        assert_eq!(b.commit, Some(Duration::from_micros(800)));
        assert_eq!(b.leader_persist, (Some(Duration::from_micros(300)), 2.0));
        assert_eq!(b.follower_persist, (Some(Duration::from_micros(200)), 2.0));
        let table = b.to_string();
        assert!(table.contains("leader b"), "{table}");
        assert!(table.contains("0.100 ms"), "network row: {table}");
    }
}
