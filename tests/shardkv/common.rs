//! Helpers of 6.824 shardkv's `test_test.go`: keys one per shard, random values, appending clients.

use ds824::check::{check, CheckResult, History, KvModel};
use ds824::kv::KvCommand;
use ds824::shardkv::key_to_shard;
use ds824::sim::seed;
use ds824::sim::shardkv::{ShardClerk, ShardOp, ShardOptions, ShardWorld};
use ds824::sim::Actor;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use std::time::Duration;

/// Shards per configuration (6.824 NShards).
pub const SHARDS: usize = 10;

/// Three groups of three servers for test `name`.
pub fn world(name: &str, reliable: bool, max_raft_state: Option<usize>) -> ShardWorld {
    world_with(name, reliable, max_raft_state, false)
}

/// [`world`], with `follower_reads`: group followers answer Gets, which clerks send to a random server
/// of the group first.
pub fn world_with(
    name: &str,
    reliable: bool,
    max_raft_state: Option<usize>,
    follower_reads: bool,
) -> ShardWorld {
    ShardWorld::new(ShardOptions {
        groups: 3,
        servers: 3,
        reliable,
        max_raft_state,
        seed: seed::for_test(name),
        follower_reads,
    })
}

/// `n` keys, key `i` in shard `i % SHARDS` (6.824 uses "0".."9", one per shard by first byte; our shards
/// come from a hash, so the keys are chosen to land where the test needs them).
pub fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let shard = (i % SHARDS) as u64;
            (0..)
                .map(|j| format!("{i}-{j}"))
                .find(|k| key_to_shard(k, SHARDS) == shard)
                .unwrap_or_default()
        })
        .collect()
}

/// A random alphanumeric string of `n` characters (6.824 `randstring`).
pub fn randstring(world: &mut ShardWorld, n: usize) -> String {
    Alphanumeric.sample_string(&mut world.rng, n)
}

/// Every key has its expected value.
pub fn check_all(
    world: &mut ShardWorld,
    clerk: &mut ShardClerk,
    keys: &[String],
    values: &[String],
) {
    for (key, value) in keys.iter().zip(values) {
        let got = world.get(clerk, key);
        if &got != value {
            world.fail(format!("Get({key}): expected:\n{value}\nreceived:\n{got}"));
        }
    }
}

/// 6.824's check-then-append round: verify every key, then append a fresh 5-char string to each.
pub fn check_and_append(
    world: &mut ShardWorld,
    clerk: &mut ShardClerk,
    keys: &[String],
    values: &mut [String],
) {
    for (key, value) in keys.iter().zip(values.iter_mut()) {
        let got = world.get(clerk, key);
        if &got != value {
            world.fail(format!("Get({key}): expected:\n{value}\nreceived:\n{got}"));
        }
        let x = randstring(world, 5);
        world.append(clerk, key, &x);
        value.push_str(&x);
    }
}

/// Check the recorded history for linearizability (6.824 uses porcupine with a 1 s budget and lets
/// "unknown" pass; here a history the checker cannot judge within 10 s fails the test: it verified
/// nothing).
pub fn check_linearizable(world: &ShardWorld) {
    let history = History::new(world.history().to_vec())
        .unwrap_or_else(|e| world.fail(format!("invalid history: {e}")));
    match check(&history, &KvModel, Duration::from_secs(10)) {
        CheckResult::Ok => {}
        CheckResult::Violation(v) => world.fail(format!("history is not linearizable: {v}")),
        unknown => world.fail(format!(
            "the linearizability check gave no answer ({unknown}); {} ops were not judged",
            history.len()
        )),
    }
}

/// A client goroutine of the concurrent tests: appends `len`-char random strings to its key every
/// `interval_ms` (0: back to back) until stopped, remembering what the key must hold. With
/// `random_keys` it instead mixes appends, puts and gets over all keys (6.824 TestUnreliable3).
pub struct Appender {
    clerk: ShardClerk,
    key: String,
    /// What the key must hold (only meaningful without `random_keys`).
    pub expected: String,
    len: usize,
    interval_ms: u64,
    random_keys: Option<Vec<String>>,
    pending: Option<String>,
    next_at: u64,
    wake_at: u64,
    stopped: bool,
}

impl Appender {
    /// A client appending to `key`.
    pub fn new(clerk: ShardClerk, key: &str, expected: &str, len: usize, interval_ms: u64) -> Self {
        Appender {
            clerk,
            key: key.to_string(),
            expected: expected.to_string(),
            len,
            interval_ms,
            random_keys: None,
            pending: None,
            next_at: 0,
            wake_at: 0,
            stopped: false,
        }
    }

    /// A client of random operations over `keys`.
    pub fn random(clerk: ShardClerk, keys: &[String]) -> Self {
        let mut appender = Appender::new(clerk, "", "", 5, 0);
        appender.random_keys = Some(keys.to_vec());
        appender
    }

    /// Finish the operation in flight, then stop.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// The key this client appends to.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Actor<ShardWorld> for Appender {
    fn next_wake(&self) -> Option<u64> {
        (!self.stopped || self.clerk.busy()).then_some(self.wake_at)
    }

    fn wake(&mut self, world: &mut ShardWorld) {
        let now = world.now();
        if self.clerk.busy() && self.clerk.poll(world).is_some() {
            if let Some(x) = self.pending.take() {
                self.expected.push_str(&x);
            }
            self.next_at = now + self.interval_ms;
        }
        if !self.clerk.busy() && !self.stopped && now >= self.next_at {
            let x = randstring(world, self.len);
            let op = match &self.random_keys {
                None => {
                    self.pending = Some(x.clone());
                    ShardOp::Command(KvCommand::Append {
                        key: self.key.clone(),
                        value: x,
                    })
                }
                Some(keys) => {
                    let key = keys[world.rng.random_range(0..keys.len())].clone();
                    match world.rng.random_range(0..100) {
                        0..50 => ShardOp::Command(KvCommand::Append { key, value: x }),
                        50..55 => ShardOp::Command(KvCommand::Put { key, value: x }),
                        _ => ShardOp::Get(key),
                    }
                }
            };
            self.clerk.begin(world, op);
        }
        self.wake_at = if self.clerk.busy() {
            now + 1
        } else {
            self.next_at.max(now + 1)
        };
    }
}

/// Run `clients` for `ms` of simulated time.
pub fn run(world: &mut ShardWorld, clients: &mut [Appender], ms: u64) {
    let mut actors: Vec<&mut dyn Actor<ShardWorld>> = clients
        .iter_mut()
        .map(|c| c as &mut dyn Actor<ShardWorld>)
        .collect();
    world.run_for(ms, &mut actors);
}

/// Stop `clients` and wait for their last operations.
pub fn stop(world: &mut ShardWorld, clients: &mut [Appender]) {
    for client in clients.iter_mut() {
        client.stop();
    }
    let mut actors: Vec<&mut dyn Actor<ShardWorld>> = clients
        .iter_mut()
        .map(|c| c as &mut dyn Actor<ShardWorld>)
        .collect();
    world.run_until_done(&mut actors);
}

/// One operation as an actor, for tests that watch several operations that may never finish.
pub struct OneOp {
    clerk: ShardClerk,
    op: Option<ShardOp>,
    /// The output, once finished.
    pub done: Option<ds824::kv::KvOutput>,
    wake_at: u64,
}

impl OneOp {
    /// `op` through a fresh clerk.
    pub fn new(clerk: ShardClerk, op: ShardOp) -> Self {
        OneOp {
            clerk,
            op: Some(op),
            done: None,
            wake_at: 0,
        }
    }
}

impl Actor<ShardWorld> for OneOp {
    fn next_wake(&self) -> Option<u64> {
        self.done.is_none().then_some(self.wake_at)
    }

    fn wake(&mut self, world: &mut ShardWorld) {
        if let Some(op) = self.op.take() {
            self.clerk.begin(world, op);
        }
        self.done = self.clerk.poll(world);
        self.wake_at = world.now() + 1;
    }
}
