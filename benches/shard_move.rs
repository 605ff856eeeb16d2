//! Moving one large shard between two shard groups of real `kvd` processes on 127.0.0.1, and what the
//! other shards' clients see meanwhile.
//!
//! Three controllers and two groups of three; both groups join (five shards each). One shard of group 1
//! is filled with `SHARD_MOVE_MB` MiB (default 100) of 1,000,000-byte values; then eight clients put
//! 100-byte values to keys of the other nine shards for a baseline of 5 s, the controller moves the big
//! shard to group 2, and the clients keep going until group 2 serves it. Printed: the time until the
//! shard serves at its new owner and until the old owner deleted its copy, and the clients' throughput
//! and p50/p99 latency before and during the move.
//!
//! Run with `cargo bench --bench shard_move` (`SHARD_MOVE_MB` changes the size).

#[path = "../tests/support/ports.rs"]
mod ports;
#[path = "../tests/support/replicas.rs"]
mod replicas;
#[path = "../tests/support/tls.rs"]
mod tls;

use ds824::ctrler::CtrlerClerk;
use ds824::kv::KvOps;
use ds824::rsm::client::ClerkConfig;
use ds824::shardkv::{key_to_shard, ShardClerk};
use replicas::Replicas;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 10;
const VALUE_BYTES: usize = 1_000_000;
const WRITERS: usize = 8;

fn clerk_config() -> ClerkConfig {
    ClerkConfig {
        call_timeout: Duration::from_secs(60),
        attempt_timeout: Duration::from_secs(5),
        ..ClerkConfig::default()
    }
}

/// Keys `prefix-N` whose shard satisfies `wanted`, `count` of them.
fn keys_where(prefix: &str, count: usize, wanted: impl Fn(u64) -> bool) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| wanted(key_to_shard(k, SHARDS)))
        .take(count)
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Latencies of the writers' puts, tagged with when they completed.
type Samples = Arc<Mutex<Vec<(Instant, Duration)>>>;

fn report(label: &str, samples: &[(Instant, Duration)], from: Instant, to: Instant) {
    let mut window: Vec<Duration> = samples
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, d)| *d)
        .collect();
    window.sort_unstable();
    let seconds = (to - from).as_secs_f64();
    println!(
        "{label:<28} {:>6} puts in {seconds:>6.2} s = {:>7.0} puts/s, p50 {:>7.2} ms, p99 {:>7.2} ms",
        window.len(),
        window.len() as f64 / seconds,
        percentile(&window, 0.50).as_secs_f64() * 1e3,
        percentile(&window, 0.99).as_secs_f64() * 1e3,
    );
}

async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let megabytes: usize = std::env::var("SHARD_MOVE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let root = tempfile::tempdir().expect("temp dir");
    let threshold = 64 << 20;
    let ctrlers = Replicas::start_with(root.path(), 0, "", threshold);
    let ctrler_list = ctrlers.addrs.join(",");
    let g1 = Replicas::start_with(root.path(), 1, &ctrler_list, threshold);
    let g2 = Replicas::start_with(root.path(), 2, &ctrler_list, threshold);
    g1.wait_for_leader().await;
    g2.wait_for_leader().await;
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    let groups: BTreeMap<u64, Vec<String>> = [(1, g1.addrs.clone()), (2, g2.addrs.clone())].into();
    let config = admin.join(groups).await.expect("join");
    let big_shard = config
        .shards
        .iter()
        .position(|&gid| gid == 1)
        .expect("group 1 owns a shard") as u64;

    // Fill the shard.
    let values = (megabytes << 20).div_ceil(VALUE_BYTES);
    let big_keys = keys_where("big", values, |s| s == big_shard);
    let value = "v".repeat(VALUE_BYTES);
    let load_started = Instant::now();
    let mut loaders = Vec::new();
    for chunk in big_keys.chunks(values.div_ceil(4)) {
        let (chunk, value, ctrlers) = (chunk.to_vec(), value.clone(), ctrlers.addrs.clone());
        loaders.push(tokio::spawn(async move {
            let mut clerk = ShardClerk::new(&ctrlers, clerk_config()).expect("clerk");
            for key in chunk {
                clerk.put(&key, &value).await.expect("load put");
            }
        }));
    }
    for loader in loaders {
        loader.await.expect("loader");
    }
    println!(
        "loaded shard {big_shard} with {values} values of {VALUE_BYTES} bytes ({megabytes} MiB) in {:.1} s",
        load_started.elapsed().as_secs_f64()
    );

    // Writers on the other shards.
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let small_keys = keys_where("small", 4 * WRITERS, |s| s != big_shard);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let keys: Vec<String> = small_keys
            .iter()
            .skip(w)
            .step_by(WRITERS)
            .cloned()
            .collect();
        let (samples, stop, ctrlers) = (samples.clone(), stop.clone(), ctrlers.addrs.clone());
        writers.push(tokio::spawn(async move {
            let mut clerk = ShardClerk::new(&ctrlers, clerk_config()).expect("clerk");
            let payload = "x".repeat(100);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                clerk
                    .put(&keys[n % keys.len()], &payload)
                    .await
                    .expect("put");
                samples
                    .lock()
                    .expect("samples")
                    .push((Instant::now(), t0.elapsed()));
                n += 1;
            }
        }));
    }
    let baseline_from = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Move it.
    let move_started = Instant::now();
    admin.move_shard(big_shard, 2).await.expect("move");
    wait_for(
        "the new owner to serve the shard",
        Duration::from_secs(600),
        async || {
            let leader = g2.wait_for_leader().await;
            g2.status(leader)
                .await
                .is_some_and(|s| s.serving_shards.contains(&big_shard))
        },
    )
    .await;
    let serving_after = move_started.elapsed();
    let serving_at = Instant::now();
    wait_for(
        "the old owner to delete its copy",
        Duration::from_secs(600),
        async || {
            let mut deleted = 0;
            for i in 0..3 {
                deleted += usize::from(g1.status(i).await.is_some_and(|s| s.outgoing_shards == 0));
            }
            deleted == 3
        },
    )
    .await;
    let deleted_after = move_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }

    // The data arrived intact.
    let mut clerk = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
    for key in [&big_keys[0], &big_keys[big_keys.len() - 1]] {
        let got = clerk.get(key).await.expect("get moved key");
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "{key} lost in the move"
        );
    }

    println!(
        "moved {megabytes} MiB shard {big_shard}: served by the new owner after {:.2} s ({:.1} MiB/s), old copy deleted after {:.2} s",
        serving_after.as_secs_f64(),
        megabytes as f64 / serving_after.as_secs_f64(),
        deleted_after.as_secs_f64(),
    );
    let samples = samples.lock().expect("samples").clone();
    report(
        "other shards, before move:",
        &samples,
        baseline_from,
        move_started,
    );
    report(
        "other shards, during move:",
        &samples,
        move_started,
        serving_at,
    );
}
