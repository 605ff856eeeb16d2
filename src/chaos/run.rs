//! One run, start to verdict: the composition of target, workload, nemesis, recorder and checker.
//!
//! The order matters and is written once here: the cluster is up (a leader elected) before the clock
//! starts; clients and nemesis run together for `--time`; everything is healed; the workload goes on
//! for `--recovery-time`; clients are stopped and joined (each finishes its current operation); the
//! append and bank workloads read every key; the cluster is torn down; only then the checker runs, so
//! its budget is not shared with the servers.
//!
//! Cleanup does not depend on reaching the end: the cluster value owns the processes and the network
//! and removes them when dropped — after an error, a panic, or the future being dropped on Ctrl-C —
//! and client tasks live in a `JoinSet`, which aborts them when dropped.

use super::args::{ArgsError, RunArgs, Target};
use super::cluster::compose::{ComposeCluster, ComposeConfig};
use super::cluster::local::{LocalCluster, LocalConfig};
use super::cluster::{Cluster, ClusterError};
use super::history::{Clock, RecordError, Recorder};
use super::nemesis::{self, schedule, NemesisError, NemesisKind};
use super::report::{self, ReportInput};
use super::verdict::{
    append_invariant, bank_invariant, decide, decide_self_test, fault_outages, fault_windows,
    linearizability, recovery_invariant, resolve_info_appends, stats, Summary,
};
use super::workload::{
    client, final_reads, Clients, KeySpace, Store, StoreKind, WorkloadError, WorkloadKind,
};
use crate::check::{check_with, CheckOptions, CheckResult, History, KvModel, OpKind};
use crate::ctrler::CtrlerClerk;
use crate::kv::{ClerkConfig, ClerkError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};

/// Why a run could not be made (exit status 2).
#[derive(Debug, Error)]
pub enum RunError {
    /// A flag value out of range.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The compose target's clients have no usable certificates.
    #[error("client TLS for --target compose: {0}")]
    Tls(#[from] crate::security::SecurityError),
    /// The run directory could not be used.
    #[error("{path}: {detail}")]
    Out {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No `kvd` was given and none is next to this binary.
    #[error("cannot locate kvd next to this binary ({0}); pass --kvd PATH")]
    NoKvd(String),
    /// The cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The nemesis failed.
    #[error(transparent)]
    Nemesis(#[from] NemesisError),
    /// A client failed.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The timeline could not be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// `--nemesis reconfigure` cannot work against these controllers (unreachable, or fewer than
    /// two groups to move shards between).
    #[error("--nemesis reconfigure: {0}")]
    Reconfigure(String),
    /// A client task panicked or the checker's thread did.
    #[error("internal: {0}")]
    Task(String),
}

impl From<JoinError> for RunError {
    fn from(e: JoinError) -> Self {
        RunError::Task(e.to_string())
    }
}

/// The tag of this process's run: every namespace, link and rule it makes is named after it.
pub fn tag() -> String {
    format!("chaos-{}", std::process::id())
}

/// A new or empty run directory.
fn prepare_out(out: Option<PathBuf>) -> Result<PathBuf, RunError> {
    let out = out.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("chaos-runs").join(format!("{now}-{}", std::process::id()))
    });
    let problem = |detail: String| RunError::Out {
        path: out.clone(),
        detail,
    };
    if out.exists() {
        let mut entries = std::fs::read_dir(&out).map_err(|e| problem(e.to_string()))?;
        if entries.next().is_some() {
            return Err(problem(
                "exists and is not empty: choose a new directory for the run".into(),
            ));
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| problem(e.to_string()))?;
    // Absolute, so servers started in other namespaces find their files whatever the cwd.
    std::fs::canonicalize(&out).map_err(|e| problem(e.to_string()))
}

fn default_kvd() -> Result<PathBuf, RunError> {
    let exe = std::env::current_exe().map_err(|e| RunError::NoKvd(e.to_string()))?;
    let dir = exe
        .parent()
        .ok_or_else(|| RunError::NoKvd(exe.display().to_string()))?;
    Ok(dir.join("kvd"))
}

fn write(path: &Path, contents: &str) -> Result<(), RunError> {
    std::fs::write(path, contents).map_err(|e| RunError::Out {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// What the driven phase leaves for the verdict.
struct Recorded {
    recorder: Recorder,
    finals: BTreeMap<String, Option<String>>,
    /// Workload start and stop, and the moment everything was healed (ns on the run's clock).
    from: u64,
    to: u64,
    healed_at: u64,
}

/// Make one run as `args` say and judge it. `Ok` carries the verdict (which may be a violation);
/// `Err` means no verdict could be reached.
pub async fn run(args: RunArgs) -> Result<Summary, RunError> {
    args.validate()?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let tag = tag();
    let out = prepare_out(args.out.clone())?;
    match args.target {
        Target::Local => {
            let kvd = match &args.kvd {
                Some(kvd) => kvd.clone(),
                None => default_kvd()?,
            };
            tracing::info!(%tag, seed, out = %out.display(), "starting {} kvd nodes", args.nodes);
            let cluster = LocalCluster::start(LocalConfig {
                tag: tag.clone(),
                nodes: args.nodes as usize,
                kvd,
                out: out.clone(),
                snapshot_threshold: args.snapshot_threshold,
                unsafe_ack_before_commit: args.self_test,
                lease_reads: args.lease_reads,
                follower_reads: args.follower_reads,
                clock: args.nemesis.contains(&NemesisKind::Clock),
            })
            .await?;
            run_on(cluster, &args, seed, tag, &out).await
        }
        Target::Compose => {
            tracing::info!(%tag, seed, out = %out.display(), services = ?args.services(),
                "attaching to the compose cluster");
            let cluster = ComposeCluster::attach(ComposeConfig {
                tag: tag.clone(),
                project: args.compose_project.clone(),
                services: args.services(),
                client_addresses: args.service_addresses(),
                security: args.tls.security()?,
            })
            .await?;
            run_on(cluster, &args, seed, tag, &out).await
        }
    }
}

/// Drive, tear down (also when driving failed), then judge.
async fn run_on<C: Cluster>(
    mut cluster: C,
    args: &RunArgs,
    seed: u64,
    tag: String,
    out: &Path,
) -> Result<Summary, RunError> {
    // The run's keys live under a name no earlier run on the same cluster used.
    let namespace = format!("{tag}.{}", crate::rsm::sessions::unix_ms() / 1000);
    let recorded = drive(&mut cluster, args, seed, &namespace, out).await;
    let torn_down = cluster.teardown().await;
    let recorded = recorded?;
    torn_down?;
    judge(args, seed, tag, out, recorded).await
}

/// Clients and nemesis together, then healing, recovery and the final reads.
async fn drive<C: Cluster>(
    cluster: &mut C,
    args: &RunArgs,
    seed: u64,
    namespace: &str,
    out: &Path,
) -> Result<Recorded, RunError> {
    let config = ClerkConfig {
        call_timeout: args.op_timeout,
        // The servers answer TIMEOUT after 1 s themselves; this only bounds a frozen (paused)
        // one, which the clerk then avoids until the others elect a new leader (1–1.5 s). At most a
        // third of the operation's deadline leaves time to retry elsewhere: with one attempt per
        // operation, every request to a paused leader would end `info`.
        attempt_timeout: (args.op_timeout / 3).min(Duration::from_millis(1000)),
        connect_timeout: Duration::from_millis(500),
        // Short: while a new leader is being elected the clerk circles the followers, and a long
        // backoff would add to the outage after the election.
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        security: cluster.client_security(),
        read_anywhere: args.follower_reads,
    };
    let mut ctrler = match args.nemesis.contains(&NemesisKind::Reconfigure) {
        true => Some(reconfigurer(&args.compose_ctrlers, &config).await?),
        false => None,
    };
    let clock = Clock::start();
    let recorder = Recorder::create(out)?;
    let shared = Arc::new(Clients {
        kind: args.workload,
        store: match args.store {
            StoreKind::Replicated => Store::Replicated(cluster.client_addresses()),
            StoreKind::Sharded => Store::Sharded(args.compose_ctrlers.clone()),
        },
        config,
        clock,
        recorder: recorder.clone(),
        keys: KeySpace::new(
            args.workload,
            namespace,
            args.keys_at_once(),
            args.ops_per_key,
        ),
        clients: args.clients,
        interval: Duration::from_secs_f64(args.clients as f64 / f64::from(args.rate)),
        seed,
    });
    let (stop, stopped) = watch::channel(false);
    let mut clients = JoinSet::new();
    let from = clock.now();
    for index in 0..args.clients {
        clients.spawn(client(index, shared.clone(), stopped.clone()));
    }
    let windows = schedule(
        seed,
        &args.nemesis,
        args.time,
        args.fault_window,
        args.heal_window,
        &args.network_faults(),
    );
    tracing::info!(
        windows = windows.len(),
        "workload {:?} for {:?} with nemesis {:?}",
        args.workload,
        args.time,
        args.nemesis
    );
    let faulty_phase = async {
        nemesis::run(cluster, ctrler.as_mut(), &windows, seed, clock, &recorder).await?;
        tokio::time::sleep_until(clock.at(args.time)).await;
        nemesis::heal_all(cluster, clock, &recorder).await
    };
    // A client that stops on its own (it cannot record) ends the run at once.
    tokio::select! {
        done = faulty_phase => done?,
        Some(joined) = clients.join_next() => return Err(early_exit(joined)),
    }
    let healed_at = clock.now();
    tracing::info!("every fault healed; recovery for {:?}", args.recovery_time);
    tokio::select! {
        () = tokio::time::sleep(args.recovery_time) => {}
        Some(joined) = clients.join_next() => return Err(early_exit(joined)),
    }
    let _ = stop.send(true);
    let to = clock.now();
    while let Some(joined) = clients.join_next().await {
        joined??;
    }
    let finals = match args.workload {
        WorkloadKind::Register => BTreeMap::new(),
        WorkloadKind::Append | WorkloadKind::Bank => {
            // Append: every key appended to. Bank: every ledger touched (a read of a ledger nobody
            // opened finds it absent, which the invariant accepts).
            let keys: BTreeSet<String> = recorder
                .history()
                .ops()
                .iter()
                .filter(|op| op.op == OpKind::Append || args.workload == WorkloadKind::Bank)
                .map(|op| op.key.clone())
                .collect();
            tracing::info!("final read of {} keys", keys.len());
            let within = args.recovery_time.max(Duration::from_secs(10));
            final_reads(shared.clone(), &keys, within).await?
        }
    };
    recorder.flush()?;
    Ok(Recorded {
        recorder,
        finals,
        from,
        to,
        healed_at,
    })
}

/// The controller clerk of `--nemesis reconfigure`, once the controllers at `ctrlers` showed a
/// configuration with at least two groups: with one there is nowhere to move a shard, and a run
/// whose every reconfigure window does nothing should not pass for a test of migrations.
async fn reconfigurer(ctrlers: &[String], config: &ClerkConfig) -> Result<CtrlerClerk, RunError> {
    let unusable =
        |e: ClerkError| RunError::Reconfigure(format!("the controllers {ctrlers:?}: {e}"));
    let mut clerk = CtrlerClerk::new(ctrlers, config.clone()).map_err(unusable)?;
    let latest = clerk.query(None).await.map_err(unusable)?;
    if latest.groups.len() < 2 {
        let gids: Vec<u64> = latest.groups.keys().copied().collect();
        return Err(RunError::Reconfigure(format!(
            "configuration {} has group(s) {gids:?}: moves need at least two; join more first, e.g. \
             kvctl --ctrlers 127.0.0.1:17101 ctrler join \
             2=g2a:7201@127.0.0.1:17204,g2b:7201@127.0.0.1:17205,g2c:7201@127.0.0.1:17206 \
             (docker-compose.yml lists groups 2 and 3)",
            latest.num
        )));
    }
    tracing::info!(
        config = latest.num,
        groups = ?latest.groups.keys().collect::<Vec<_>>(),
        "reconfigure: shards will move between these groups"
    );
    Ok(clerk)
}

fn early_exit(joined: Result<Result<(), WorkloadError>, JoinError>) -> RunError {
    match joined {
        Ok(Ok(())) => RunError::Task("a client stopped before the end of the run".into()),
        Ok(Err(e)) => e.into(),
        Err(e) => e.into(),
    }
}

/// Statistics, checker, invariants; write check.txt and summary.json.
async fn judge(
    args: &RunArgs,
    seed: u64,
    tag: String,
    out: &Path,
    recorded: Recorded,
) -> Result<Summary, RunError> {
    let history = recorded.recorder.history();
    let events = recorded.recorder.events();
    let windows = fault_windows(&events);
    let mut stats = stats(
        history.ops(),
        &windows,
        recorded.from,
        recorded.to,
        recorded.healed_at,
    );
    stats.outage_by_fault = fault_outages(history.ops(), &events, recorded.to);
    let mut invariants = vec![recovery_invariant(history.ops(), recorded.healed_at)];
    match args.workload {
        WorkloadKind::Register => {}
        WorkloadKind::Append => invariants.push(append_invariant(history.ops(), &recorded.finals)),
        WorkloadKind::Bank => invariants.push(bank_invariant(history.ops(), &recorded.finals)),
    }
    invariants.extend(crate::chaos::verdict::log_line_invariant(&out.join("logs")));
    tracing::info!(
        ops = history.len(),
        budget_secs = args.check_budget_secs,
        "checking linearizability"
    );
    let (checked, info_appends_resolved) = match args.workload {
        WorkloadKind::Register | WorkloadKind::Bank => (history, 0),
        WorkloadKind::Append => {
            let (ops, resolved) = resolve_info_appends(history.ops(), &recorded.finals);
            (History::new(ops).map_err(RecordError::from)?, resolved)
        }
    };
    let options = CheckOptions::with_budget(Duration::from_secs(args.check_budget_secs));
    let result =
        tokio::task::spawn_blocking(move || check_with(&checked, &KvModel, &options)).await?;
    write(&out.join("check.txt"), &format!("{result}\n"))?;
    let (linearizable, check) = linearizability(&result);
    let (verdict, exit_code) = match args.self_test {
        true => decide_self_test(linearizable, &invariants),
        false => decide(linearizable, &invariants),
    };
    let summary = Summary {
        tag,
        seed,
        target: args.target,
        workload: args.workload,
        store: args.store,
        nemesis: args.nemesis.clone(),
        nodes: args.node_count(),
        self_test: args.self_test,
        clients: args.clients,
        rate: args.rate,
        time_secs: args.time.as_secs_f64(),
        faults: windows.len(),
        stats,
        info_appends_resolved,
        linearizable,
        check,
        invariants,
        verdict,
        exit_code,
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| RunError::Out {
        path: out.join("summary.json"),
        detail: e.to_string(),
    })?;
    write(&out.join("summary.json"), &format!("{json}\n"))?;
    let violation = match &result {
        CheckResult::Violation(v) => Some(v.as_ref()),
        CheckResult::Ok | CheckResult::Unknown { .. } => None,
    };
    let ops = recorded.recorder.history();
    let report_path = out.join(report::FILE);
    report::write(
        &report_path,
        &ReportInput {
            summary: &summary,
            ops: ops.ops(),
            events: &events,
            from: recorded.from,
            to: recorded.to,
            healed_at: recorded.healed_at,
            violation,
        },
    )
    .map_err(|e| RunError::Out {
        path: report_path.clone(),
        detail: e.to_string(),
    })?;
    Ok(summary)
}
