//! Raft over loopback: three real nodes (tonic transport, sled storage behind the journal, one fdatasync per `Ready`) on 127.0.0.1.
//!
//! Prints, for 1 and 64 proposals in flight, the time to commit 10,000 proposals of 100 bytes, the
//! throughput and the p50/p99 latency from proposal to apply on the leader; then the size of the leader's
//! data directory after 100,000 proposals with a snapshot every 1,000 entries.
//!
//! Run with `cargo bench --bench raft_node` (`RAFT_BENCH_PROPOSALS` and `RAFT_BENCH_DISK_PROPOSALS` change
//! the counts).

#[path = "../tests/support/loopback.rs"]
mod loopback;

use bytes::Bytes;
use loopback::Cluster;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Commit `count` proposals keeping `window` in flight; returns (elapsed, sorted latencies).
async fn commit(cluster: Arc<Cluster>, count: usize, window: usize) -> (Duration, Vec<Duration>) {
    let payload = Bytes::from(vec![b'x'; 100]);
    let permits = Arc::new(Semaphore::new(window));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let (cluster, payload) = (cluster.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let (index, leader) = cluster.propose(payload).await;
            cluster
                .wait_for("apply", |c| c.last_applied(leader) >= index)
                .await;
            drop(permit);
            t0.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    (elapsed, latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for item in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = item.path();
        total += if p.is_dir() {
            dir_size(&p)
        } else {
            item.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let count = env_count("RAFT_BENCH_PROPOSALS", 10_000);
        for window in [1, 64] {
            let cluster = Arc::new(Cluster::with_production_timing(3, 0).await);
            let (elapsed, latencies) = commit(cluster.clone(), count, window).await;
            println!(
                "raft_node/commit in_flight={window:<3} {count} proposals of 100 B in {:>7.3} s: {:>8.0} ops/s, p50 {:>8.3} ms, p99 {:>8.3} ms",
                elapsed.as_secs_f64(),
                count as f64 / elapsed.as_secs_f64(),
                percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            );
            if let Ok(cluster) = Arc::try_unwrap(cluster) {
                cluster.shutdown().await;
            }
        }
        let disk_count = env_count("RAFT_BENCH_DISK_PROPOSALS", 100_000);
        let cluster = Arc::new(Cluster::with_production_timing(3, 1_000).await);
        let (elapsed, _) = commit(cluster.clone(), disk_count, 64).await;
        let leader = cluster.wait_for_leader().await;
        let status = cluster.handle(leader).status();
        println!(
            "raft_node/disk {disk_count} proposals in {:.1} s with a snapshot every 1000 entries: data dir {:.1} MiB \
             (log {} entries = {} B, snapshot {} B at index {})",
            elapsed.as_secs_f64(),
            dir_size(cluster.dirs[leader].path()) as f64 / (1 << 20) as f64,
            status.raft.last_index + 1 - status.raft.first_index,
            status.raft_state_bytes,
            status.snapshot_bytes,
            status.raft.snapshot_index,
        );
        if let Ok(cluster) = Arc::try_unwrap(cluster) {
            cluster.shutdown().await;
        }
    });
}
