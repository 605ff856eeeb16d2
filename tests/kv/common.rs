//! 6.824 kvraft's test helpers: the generic test, client actors, append checks.

use ds824::check::{check, CheckResult, History, KvModel};
use ds824::kv::KvCommand;
use ds824::sim::kv::{get_op, KvClerk, KvCluster, KvOp};
use ds824::sim::service::{ClerkOp, ServiceOptions};
use ds824::sim::{seed, Actor};
use rand::Rng;
use std::time::Duration;

/// 6.824's `electionTimeout` for the KV tests, in ms.
pub const ELECTION_TIMEOUT_MS: u64 = 1000;

/// A KV cluster for test `name`.
pub fn cluster(
    name: &str,
    servers: usize,
    reliable: bool,
    max_raft_state: Option<usize>,
) -> KvCluster {
    cluster_with(name, servers, reliable, max_raft_state, false)
}

/// [`cluster`], with `follower_reads`: followers answer Gets too, and clerks send each Get to a
/// random server first.
pub fn cluster_with(
    name: &str,
    servers: usize,
    reliable: bool,
    max_raft_state: Option<usize>,
    follower_reads: bool,
) -> KvCluster {
    KvCluster::new(ServiceOptions {
        servers,
        reliable,
        max_raft_state,
        seed: seed::for_test(name),
        follower_reads,
    })
}

/// The value client `cli` appends as its `j`-th element.
pub fn element(cli: usize, j: usize) -> String {
    format!("x {cli} {j} y")
}

/// Every element of client `cli` below `count` is in `value` exactly once and in order.
pub fn check_client_appends(cfg: &KvCluster, cli: usize, value: &str, count: usize) {
    let mut last = None;
    for j in 0..count {
        let wanted = element(cli, j);
        let Some(offset) = value.find(&wanted) else {
            cfg.fail(format!(
                "{cli} missing element {wanted} in Append result {value}"
            ));
        };
        if value.rfind(&wanted) != Some(offset) {
            cfg.fail(format!("duplicate element {wanted} in Append result"));
        }
        if last.is_some_and(|l| offset <= l) {
            cfg.fail(format!("wrong order for element {wanted} in Append result"));
        }
        last = Some(offset);
    }
}

/// Check the recorded history for linearizability (6.824 uses porcupine with a 1 s budget and lets
/// "unknown" pass; here a history the checker cannot judge within 10 s fails the test, as in the
/// process tests and the chaos harness: it verified nothing).
pub fn check_linearizable(cfg: &KvCluster) {
    let history = History::new(cfg.history().to_vec())
        .unwrap_or_else(|e| cfg.fail(format!("invalid history: {e}")));
    match check(&history, &KvModel, Duration::from_secs(10)) {
        CheckResult::Ok => {}
        CheckResult::Violation(v) => cfg.fail(format!("history is not linearizable: {v}")),
        unknown => cfg.fail(format!(
            "the linearizability check gave no answer ({unknown}); {} ops were not judged",
            history.len()
        )),
    }
}

/// A 6.824 GenericTest client: appends to its own key and checks every Get, or (random keys) mixes
/// appends, puts and gets over every client's key.
struct GenericClient {
    cli: usize,
    nclients: usize,
    clerk: KvClerk,
    random_keys: bool,
    expected: String,
    appended: usize,
    in_flight: Option<KvOp>,
    stopping: bool,
    started: bool,
    wake_at: u64,
}

impl Actor<KvCluster> for GenericClient {
    fn next_wake(&self) -> Option<u64> {
        (!(self.stopping && self.in_flight.is_none())).then_some(self.wake_at)
    }

    fn wake(&mut self, cfg: &mut KvCluster) {
        self.wake_at = cfg.now() + 1;
        if let Some(op) = &self.in_flight {
            let Some(output) = self.clerk.poll(cfg) else {
                return;
            };
            if let (ClerkOp::Query(ds824::kv::KvQuery::Get { key }), false) = (op, self.random_keys)
            {
                let got = output.value.unwrap_or_default();
                if got != self.expected {
                    cfg.fail(format!(
                        "get wrong value, key {key}, wanted:\n{}\n, got\n{got}",
                        self.expected
                    ));
                }
            }
            self.in_flight = None;
        }
        if self.stopping {
            return;
        }
        let own_key = self.cli.to_string();
        let op = if !self.started {
            self.started = true;
            self.expected.clear();
            ClerkOp::Command(KvCommand::Put {
                key: own_key,
                value: String::new(),
            })
        } else {
            let key = if self.random_keys {
                cfg.rng.random_range(0..self.nclients).to_string()
            } else {
                own_key
            };
            let roll = cfg.rng.random_range(0..1000);
            if roll < 500 {
                let value = element(self.cli, self.appended);
                self.appended += 1;
                self.expected.push_str(&value);
                ClerkOp::Command(KvCommand::Append { key, value })
            } else if self.random_keys && roll < 600 {
                ClerkOp::Command(KvCommand::Put {
                    key,
                    value: element(self.cli, self.appended),
                })
            } else {
                get_op(&key)
            }
        };
        self.clerk.begin(cfg, op.clone());
        self.in_flight = Some(op);
    }
}

/// Repartitions the servers at random every 1–1.2 s.
struct Partitioner {
    wake_at: u64,
    stopped: bool,
}

impl Actor<KvCluster> for Partitioner {
    fn next_wake(&self) -> Option<u64> {
        (!self.stopped).then_some(self.wake_at)
    }

    fn wake(&mut self, cfg: &mut KvCluster) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..cfg.len() {
            if cfg.rng.random_bool(0.5) {
                a.push(i);
            } else {
                b.push(i);
            }
        }
        cfg.partition(&a, &b);
        self.wake_at = cfg.now() + ELECTION_TIMEOUT_MS + cfg.rng.random_range(0..200);
    }
}

/// 6.824's GenericTest: 3 rounds of `nclients` clients running for 5 s, with optional message loss,
/// crashes of every server, random partitions, snapshots and random keys; then the append checks, the
/// size checks and the linearizability check.
#[allow(clippy::too_many_arguments)]
pub fn generic_test(
    name: &str,
    nclients: usize,
    nservers: usize,
    unreliable: bool,
    crash: bool,
    partitions: bool,
    max_raft_state: Option<usize>,
    random_keys: bool,
) {
    generic_test_with(
        name,
        nclients,
        nservers,
        unreliable,
        crash,
        partitions,
        max_raft_state,
        random_keys,
        false,
    );
}

/// [`generic_test`] on a [`cluster_with`] `follower_reads`; returns how many Gets followers served.
#[allow(clippy::too_many_arguments)]
pub fn generic_test_with(
    name: &str,
    nclients: usize,
    nservers: usize,
    unreliable: bool,
    crash: bool,
    partitions: bool,
    max_raft_state: Option<usize>,
    random_keys: bool,
    follower_reads: bool,
) -> u64 {
    let mut cfg = cluster_with(name, nservers, !unreliable, max_raft_state, follower_reads);
    let mut ck = cfg.make_clerk();
    for _round in 0..3 {
        let mut clients: Vec<GenericClient> = (0..nclients)
            .map(|cli| GenericClient {
                cli,
                nclients,
                clerk: cfg.make_clerk(),
                random_keys,
                expected: String::new(),
                appended: 0,
                in_flight: None,
                stopping: false,
                started: false,
                wake_at: 0,
            })
            .collect();
        let mut partitioner = Partitioner {
            wake_at: cfg.now() + ELECTION_TIMEOUT_MS,
            stopped: !partitions,
        };
        let until = cfg.now() + 5_000;
        {
            let mut actors: Vec<&mut dyn Actor<KvCluster>> = clients
                .iter_mut()
                .map(|c| c as &mut dyn Actor<KvCluster>)
                .collect();
            actors.push(&mut partitioner);
            ds824::sim::clock::run_until(&mut cfg, until, &mut actors);
        }
        // Tell the clients to quit and let each finish its operation in flight.
        for client in &mut clients {
            client.stopping = true;
        }
        if partitions {
            cfg.connect_all();
        }
        {
            let mut actors: Vec<&mut dyn Actor<KvCluster>> = clients
                .iter_mut()
                .map(|c| c as &mut dyn Actor<KvCluster>)
                .collect();
            ds824::sim::clock::run_until(&mut cfg, u64::MAX, &mut actors);
        }
        if partitions {
            // Give the servers time to settle into one majority again.
            cfg.sleep(ELECTION_TIMEOUT_MS);
        }
        if crash {
            for i in 0..nservers {
                cfg.shutdown_server(i);
            }
            cfg.sleep(ELECTION_TIMEOUT_MS);
            for i in 0..nservers {
                cfg.start_server(i);
            }
            cfg.connect_all();
        }
        for client in &clients {
            if !random_keys {
                let value = cfg.get(&mut ck, &client.cli.to_string());
                check_client_appends(&cfg, client.cli, &value, client.appended);
            }
        }
        match max_raft_state {
            Some(max) => {
                let size = cfg.max_raft_state_size();
                if size > 8 * max {
                    cfg.fail(format!("logs were not trimmed ({size} > 8*{max})"));
                }
            }
            None => {
                let size = cfg.max_snapshot_size();
                if size > 0 {
                    cfg.fail(format!(
                        "snapshot too large ({size}), should not be used when maxraftstate is off"
                    ));
                }
            }
        }
    }
    check_linearizable(&cfg);
    cfg.end(name);
    cfg.reads_served_by_followers()
}

/// 6.824's GenericTestSpeed: 1000 sequential appends must take under 33 ms each (simulated), i.e. the
/// leader replicates at once and learns of commits promptly.
pub fn speed_test(name: &str, max_raft_state: Option<usize>) {
    const OPS: usize = 1000;
    let mut cfg = cluster(name, 3, true, max_raft_state);
    let mut ck = cfg.make_clerk();
    cfg.get(&mut ck, "x"); // wait until the cluster is ready
    let start = cfg.now();
    for i in 0..OPS {
        cfg.append(&mut ck, "x", &element(0, i));
    }
    let elapsed = cfg.now() - start;
    let value = cfg.get(&mut ck, "x");
    check_client_appends(&cfg, 0, &value, OPS);
    let limit = OPS as u64 * 100 / 3;
    if elapsed > limit {
        cfg.fail(format!(
            "operations completed too slowly {} ms/op > {:.1} ms/op",
            elapsed / OPS as u64,
            100.0 / 3.0
        ));
    }
    cfg.end(name);
}
