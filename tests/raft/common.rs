//! Helpers shared by the scenario tests.

use bytes::Bytes;
use ds824::sim::{seed, ClusterOptions, RaftCluster};
use rand::Rng;

/// 6.824's `RaftElectionTimeout`: the tester's allowance for an election, in ms.
pub const ELECTION_TIMEOUT_MS: u64 = 1000;

/// A cluster of `servers` for test `name`, seeded from the name or `RAFT_SEED`.
pub fn cluster(name: &str, servers: usize, reliable: bool) -> RaftCluster {
    RaftCluster::new(ClusterOptions::new(servers, reliable, seed::for_test(name)))
}

/// A cluster whose applier snapshots every 10 entries (6.824 2D).
pub fn snapshot_cluster(name: &str, servers: usize, reliable: bool) -> RaftCluster {
    RaftCluster::new(ClusterOptions::new(servers, reliable, seed::for_test(name)).snapshots(10))
}

/// An integer command, as the Go tests use.
pub fn cmd(x: u64) -> Bytes {
    Bytes::copy_from_slice(&x.to_be_bytes())
}

/// A random integer command.
pub fn rand_cmd(cfg: &mut RaftCluster) -> Bytes {
    let x: u64 = cfg.rng.random();
    cmd(x)
}

/// A random server number.
pub fn rand_server(cfg: &mut RaftCluster) -> usize {
    let n = cfg.len();
    cfg.rng.random_range(0..n)
}
