//! `kvctl bench`: a closed-loop load generator. N clients (one [`Clerk`] each, so each has its own
//! session) issue M operations in total back to back; the report gives throughput and latency
//! percentiles, the two numbers that tell whether batching in the Raft driver pays off. Besides plain
//! puts and gets it runs the YCSB core workloads ([`ycsb`](super::ycsb)), seeded per client so a run
//! can be repeated.
//!
//! The loop is generic over the store ([`BenchStore`]), so another system can be measured by exactly
//! the same loop: `tools/etcd-bench` drives etcd with it for `benches/compare-etcd.sh`.

use super::shard::AnyClerk;
use super::ycsb::{self, Op, Workload, Zipfian};
use crate::ctrler::addresses::AddressView;
use crate::kv::KvOps;
use crate::kv::{Clerk, ClerkConfig, ClerkError};
use crate::shardkv::ShardClerk;
use rand::SeedableRng;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchKind {
    /// Puts (each a Raft log entry).
    Put,
    /// Gets (each a ReadIndex round, no log entry).
    Get,
    /// A YCSB core workload over keys filled beforehand.
    Ycsb(Workload),
}

/// `--kind` on the command line of `kvctl bench` and `tools/etcd-bench`, one name per [`BenchKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Puts to keys in turn.
    Put,
    /// Gets of keys filled first.
    Get,
    /// YCSB A: 50 % read, 50 % update, Zipfian keys.
    YcsbA,
    /// YCSB B: 95 % read, 5 % update, Zipfian keys.
    YcsbB,
    /// YCSB C: reads only, Zipfian keys.
    YcsbC,
    /// YCSB D: 95 % read (newest keys first), 5 % insert.
    YcsbD,
    /// YCSB F: 50 % read, 50 % read-modify-write, Zipfian keys.
    YcsbF,
}

impl From<KindArg> for BenchKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Put => BenchKind::Put,
            KindArg::Get => BenchKind::Get,
            KindArg::YcsbA => BenchKind::Ycsb(Workload::A),
            KindArg::YcsbB => BenchKind::Ycsb(Workload::B),
            KindArg::YcsbC => BenchKind::Ycsb(Workload::C),
            KindArg::YcsbD => BenchKind::Ycsb(Workload::D),
            KindArg::YcsbF => BenchKind::Ycsb(Workload::F),
        }
    }
}

/// Which store the clients load.
#[derive(Clone, Debug)]
pub enum Target {
    /// A replicated KV cluster, by its servers' addresses.
    Kv(Vec<String>),
    /// The sharded store, through its controllers (each client routes keys to groups itself).
    Sharded {
        /// The controllers' addresses.
        ctrlers: Vec<String>,
        /// Which of the groups' addresses the clients use.
        view: AddressView,
    },
}

impl Target {
    /// One client (its own session) of the store.
    fn clerk(&self, config: &ClerkConfig) -> Result<AnyClerk, ClerkError> {
        Ok(match self {
            Target::Kv(cluster) => AnyClerk::Kv(Box::new(Clerk::new(cluster, config.clone())?)),
            Target::Sharded { ctrlers, view } => AnyClerk::Sharded(Box::new(
                ShardClerk::new(ctrlers, config.clone())?.with_address_view(*view),
            )),
        })
    }
}

/// The benchmark's parameters against ds824.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The store loaded.
    pub target: Target,
    /// How the clients connect (their timeouts and security).
    pub clerk: ClerkConfig,
    /// What the clients do.
    pub load: Load,
}

/// What the clients do, whatever the store.
#[derive(Clone, Debug)]
pub struct Load {
    /// Concurrent clients.
    pub clients: usize,
    /// Operations in total (with `duration`: at most).
    pub ops: usize,
    /// Run for this long instead of until `ops` are done.
    pub duration: Option<Duration>,
    /// Operation kind.
    pub kind: BenchKind,
    /// Distinct keys used.
    pub keys: usize,
    /// Bytes per value.
    pub value_size: usize,
}

/// The load's flags, shared by `kvctl bench` and `tools/etcd-bench` so both stores get the same load
/// from the same words.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Concurrent clients (each its own session).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Operations in total.
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Run for this many seconds instead, however many operations that is (at most --ops, which
    /// then defaults to no limit).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// What to measure: puts, gets, or a YCSB core workload (E, range scans, is not supported:
    /// the store has no range reads). Gets and YCSB fill --keys keys first, unmeasured.
    #[arg(long, value_enum, default_value_t = KindArg::Put)]
    pub kind: KindArg,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    pub value_size: usize,
    /// Print the report as one JSON object (latencies in milliseconds).
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// The load the flags describe, or what is wrong with them.
    pub fn load(&self) -> Result<Load, String> {
        let duration = match self.duration.map(Duration::try_from_secs_f64) {
            None => None,
            Some(Ok(d)) if !d.is_zero() => Some(d),
            Some(_) => return Err("--duration must be a positive number of seconds".into()),
        };
        if self.clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        // With --duration and the default --ops, the time is the only limit.
        let ops = if duration.is_some() && self.ops == 1000 {
            usize::MAX
        } else {
            self.ops
        };
        Ok(Load {
            clients: self.clients,
            ops,
            duration,
            kind: self.kind.into(),
            keys: self.keys,
            value_size: self.value_size,
        })
    }
}

/// Why one client operation failed, whatever the store (a foreign client has its own error type).
pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

/// One client session of a store under load: the two operations every workload is made of.
pub trait BenchClient: Send + 'static {
    /// Read `key` (its value is not needed, only that the read completed).
    fn get(&mut self, key: &str) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// Write `value` under `key`, acknowledged once durable.
    fn put(
        &mut self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

/// A store the loop can open client sessions to, one per simulated client.
pub trait BenchStore {
    /// A session.
    type Client: BenchClient;
    /// Open one session (its own connection, where the store's client allows).
    fn connect(&self) -> impl Future<Output = Result<Self::Client, ClientError>> + Send;
}

impl BenchClient for AnyClerk {
    async fn get(&mut self, key: &str) -> Result<(), ClientError> {
        AnyClerk::get(self, key).await?;
        Ok(())
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), ClientError> {
        KvOps::put(self, key, value).await?;
        Ok(())
    }
}

impl BenchStore for BenchConfig {
    type Client = AnyClerk;

    async fn connect(&self) -> Result<AnyClerk, ClientError> {
        Ok(self.target.clerk(&self.clerk)?)
    }
}

/// The measurement.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The kind measured.
    pub kind: BenchKind,
    /// Concurrent clients.
    pub clients: usize,
    /// Operations that succeeded.
    pub ok: usize,
    /// Operations that failed (after the clerk's retries).
    pub errors: usize,
    /// What the first failed operation said, so a run with errors tells why.
    pub first_error: Option<String>,
    /// Wall time of the measured phase.
    pub elapsed: Duration,
    /// Mean latency.
    pub mean: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 90th percentile latency.
    pub p90: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// 99.9th percentile latency.
    pub p999: Duration,
    /// Slowest operation.
    pub max: Duration,
    /// The longest time no operation succeeded (between two successes, or from the start to the
    /// first): what clients saw of an outage, such as a leader's failover.
    pub longest_gap: Duration,
    /// When, from the start, the longest gap ended: to find its cause in the servers' logs.
    pub longest_gap_ended: Duration,
}

impl BenchReport {
    /// Successful operations per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as one JSON object (`kvctl bench --json`), latencies in milliseconds.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        serde_json::json!({
            "kind": format!("{:?}", self.kind),
            "clients": self.clients,
            "ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.elapsed.as_secs_f64(),
            "ops_per_second": self.throughput(),
            "mean_ms": ms(self.mean),
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "p999_ms": ms(self.p999),
            "max_ms": ms(self.max),
            "longest_gap_ms": ms(self.longest_gap),
            "longest_gap_ended_s": self.longest_gap_ended.as_secs_f64(),
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}: {} clients, {} ok, {} errors in {:.2} s: {:.0} ops/s, p50 {:.2} ms, p90 {:.2} ms, \
             p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, longest gap without a success {:.0} ms \
             (ended {:.2} s in)",
            self.kind,
            self.clients,
            self.ok,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.p50.as_secs_f64() * 1e3,
            self.p90.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.p999.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
            self.longest_gap.as_secs_f64() * 1e3,
            self.longest_gap_ended.as_secs_f64(),
        )?;
        match &self.first_error {
            Some(error) => write!(f, " (first error: {error})"),
            None => Ok(()),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Run the benchmark. Gets read keys written beforehand (the fill is not measured). `progress` is
/// called with the number of operations done so far, about ten times a second.
pub async fn run(
    config: &BenchConfig,
    progress: impl FnMut(u64),
) -> Result<BenchReport, ClientError> {
    fill(config, &config.load).await?;
    measure(config, &config.load, progress).await
}

/// Writes the keys gets and YCSB workloads read (puts need none): the unmeasured part of [`run`].
pub async fn fill(store: &impl BenchStore, config: &Load) -> Result<(), ClientError> {
    let keys = config.keys.max(1);
    let value = "x".repeat(config.value_size);
    let filled = match config.kind {
        BenchKind::Put => 0,
        BenchKind::Get => keys.min(config.ops.max(1)),
        BenchKind::Ycsb(_) => keys,
    };
    if filled > 0 {
        let mut clerk = store.connect().await?;
        for k in 0..filled {
            clerk.put(&format!("bench-{k}"), &value).await?;
        }
    }
    Ok(())
}

/// [`measure`] with a progress bar on the terminal (operations done, or seconds of `--duration`),
/// cleared when the run ends: what the command-line tools show.
pub async fn measure_showing_progress(
    store: &impl BenchStore,
    config: &Load,
) -> Result<BenchReport, ClientError> {
    let bar = match config.duration {
        Some(d) => indicatif::ProgressBar::new(d.as_secs().max(1)),
        None => indicatif::ProgressBar::new(config.ops as u64),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(if config.duration.is_some() {
            "{spinner} [{bar:40}] {elapsed} of {len} s, {msg}"
        } else {
            "{spinner} [{bar:40}] {pos}/{len} ops {elapsed} {msg}"
        })
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let result = measure(store, config, |n| {
        if config.duration.is_some() {
            bar.set_position(started.elapsed().as_secs());
            bar.set_message(format!("{n} ops"));
        } else {
            bar.set_position(n);
        }
    })
    .await;
    bar.finish_and_clear();
    result
}

/// The measured part of [`run`], after [`fill`].
pub async fn measure(
    store: &impl BenchStore,
    config: &Load,
    mut progress: impl FnMut(u64),
) -> Result<BenchReport, ClientError> {
    let clients = config.clients.max(1);
    let keys = config.keys.max(1);
    let value = "x".repeat(config.value_size);
    // YCSB: key popularity over the filled keys, and the next key an insert creates.
    let zipf = Arc::new(Zipfian::new(keys, ycsb::ZIPF_THETA));
    let inserted = Arc::new(AtomicU64::new(keys as u64));
    let done = Arc::new(AtomicU64::new(0));
    let gaps = Arc::new(Gaps::default());
    // Every client is made before the clock starts, so the run measures operations, not setup (with
    // 64 clients, making them one after another took a run's first 0.2 s, which then counted as an
    // outage). Their connections are still opened by their first operations, inside the run.
    let mut clerks = Vec::with_capacity(clients);
    for _ in 0..clients {
        clerks.push(store.connect().await?);
    }
    let start = Instant::now();
    let deadline = config.duration.map(|d| start + d);
    let mut tasks = Vec::with_capacity(clients);
    for (c, mut clerk) in clerks.into_iter().enumerate() {
        let share = config.ops / clients + usize::from(c < config.ops % clients);
        let (kind, value, done, gaps) = (config.kind, value.clone(), done.clone(), gaps.clone());
        let (zipf, inserted) = (zipf.clone(), inserted.clone());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
        let key_space = if kind == BenchKind::Get {
            keys.min(config.ops.max(1))
        } else {
            keys
        };
        tasks.push(tokio::spawn(async move {
            // Grown as needed: reserving a large share up front (16 MiB a client with --duration)
            // cost milliseconds a client before its first operation.
            let mut latencies = Vec::with_capacity(share.min(4096));
            let mut errors = 0;
            let mut first_error = None;
            for i in 0..share {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
                let key = format!("bench-{}", (c * 7919 + i) % key_space);
                let began = Instant::now();
                let result = match kind {
                    BenchKind::Put => clerk.put(&key, &value).await,
                    BenchKind::Get => clerk.get(&key).await,
                    BenchKind::Ycsb(workload) => {
                        let op = workload.next_op(&mut rng);
                        let existing = inserted.load(Ordering::Relaxed) as usize;
                        let key = match op {
                            Op::Insert => {
                                format!("bench-{}", inserted.fetch_add(1, Ordering::Relaxed))
                            }
                            _ => format!(
                                "bench-{}",
                                ycsb::key_index(workload, &zipf, &mut rng, existing)
                            ),
                        };
                        match op {
                            Op::Read => clerk.get(&key).await,
                            Op::Update | Op::Insert => clerk.put(&key, &value).await,
                            Op::ReadModifyWrite => match clerk.get(&key).await {
                                Ok(_) => clerk.put(&key, &value).await,
                                Err(err) => Err(err),
                            },
                        }
                    }
                };
                match result {
                    Ok(()) => {
                        latencies.push(began.elapsed());
                        gaps.success(start.elapsed());
                    }
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| error.to_string());
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, errors, first_error)
        }));
    }
    let mut all = futures::future::join_all(tasks);
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = tokio::time::sleep(Duration::from_millis(100)) => progress(done.load(Ordering::Relaxed)),
        }
    };
    let elapsed = start.elapsed();
    let mut latencies = Vec::with_capacity(config.ops.min(1 << 24));
    let mut errors = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok((l, e, first)) => {
                latencies.extend(l);
                errors += e;
                first_error = first_error.or(first);
            }
            Err(panic) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("client task failed: {panic}"));
            }
        }
    }
    latencies.sort_unstable();
    let total: Duration = latencies.iter().sum();
    let (longest_gap, longest_gap_ended) = gaps.longest();
    Ok(BenchReport {
        mean: total / u32::try_from(latencies.len().max(1)).unwrap_or(u32::MAX),
        kind: config.kind,
        clients,
        ok: latencies.len(),
        errors,
        first_error,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p90: percentile(&latencies, 0.90),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        max: latencies.last().copied().unwrap_or_default(),
        longest_gap,
        longest_gap_ended,
    })
}

/// The longest stretch without a successful operation, across all clients, and when it ended: each
/// success moves the time of the latest one forward and measures the gap it closes. The end time lets
/// a stall be matched with the servers' logs (a snapshot, an election).
#[derive(Default)]
struct Gaps {
    inner: std::sync::Mutex<GapsSoFar>,
}

#[derive(Clone, Copy, Default)]
struct GapsSoFar {
    /// From the start to the latest success.
    latest: Duration,
    /// The longest gap closed so far, and the time (from the start) of the success that closed it.
    longest: (Duration, Duration),
}

impl Gaps {
    fn success(&self, at: Duration) {
        // A poisoned lock only means another client panicked mid-update: the numbers stay usable.
        let mut gaps = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if at > gaps.latest {
            let gap = at - gaps.latest;
            if gap > gaps.longest.0 {
                gaps.longest = (gap, at);
            }
            gaps.latest = at;
        }
    }

    /// The longest gap and when (from the start) it ended.
    fn longest(&self) -> (Duration, Duration) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).longest
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;
    use std::time::Duration;

    #[test]
    fn the_longest_gap_is_between_successes_in_time_order() {
        let gaps = super::Gaps::default();
        for ms in [5, 10, 12, 400, 390, 405] {
            gaps.success(Duration::from_millis(ms));
        }
        assert_eq!(
            gaps.longest(),
            (Duration::from_millis(388), Duration::from_millis(400))
        );
    }

    /// A store whose sessions take a while to make and whose operations succeed at once; each
    /// session records how many sessions existed when it did its first operation.
    struct SlowToConnect {
        made: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        seen_at_first_op: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    struct Session {
        made: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        seen_at_first_op: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
        first: bool,
    }

    impl super::BenchClient for Session {
        async fn get(&mut self, _key: &str) -> Result<(), super::ClientError> {
            Ok(())
        }

        async fn put(&mut self, _key: &str, _value: &str) -> Result<(), super::ClientError> {
            if std::mem::take(&mut self.first) {
                let made = self.made.load(std::sync::atomic::Ordering::SeqCst);
                self.seen_at_first_op.lock().expect("lock").push(made);
            }
            tokio::task::yield_now().await;
            Ok(())
        }
    }

    impl super::BenchStore for SlowToConnect {
        type Client = Session;

        async fn connect(&self) -> Result<Session, super::ClientError> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Session {
                made: self.made.clone(),
                seen_at_first_op: self.seen_at_first_op.clone(),
                first: true,
            })
        }
    }

    /// Making 64 sessions one after another took a run's first 0.2 s; counted inside the run, it
    /// showed as an outage of the store (the longest gap) and cut the throughput of a short run.
    #[tokio::test]
    async fn every_client_is_made_before_any_operation_is_measured() {
        let store = SlowToConnect {
            made: Default::default(),
            seen_at_first_op: Default::default(),
        };
        let load = super::Load {
            clients: 4,
            ops: 40,
            duration: None,
            kind: super::BenchKind::Put,
            keys: 10,
            value_size: 8,
        };
        let report = super::measure(&store, &load, |_| {}).await.expect("run");
        assert_eq!(report.ok, 40);
        assert_eq!(*store.seen_at_first_op.lock().expect("lock"), vec![4; 4]);
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
