//! A port of 6.824's `test-mr.sh` with real `mrd` processes, plus coordinator-crash and gRPC-shuffle
//! mapper-loss scenarios, and the trust boundary: restricted apps, data roots, mutual TLS and roles.
//!
//! Every test runs in its own temporary directory, which is also the workers' working directory (the
//! 6.824 test apps leave marker files there). Waiting is always for an event (a job state, a process exit)
//! with a deadline, never a fixed sleep.

#[path = "support/ports.rs"]
mod ports;
#[path = "support/scrape.rs"]
mod scrape;
#[path = "support/signals.rs"]
mod signals;
#[path = "support/tls.rs"]
mod tls;

use signals::signal;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ds824::mr::{client, corpus};
use ds824::proto::mr as pb;
use ds824::security::Security;

/// Every process and wait in these tests is bounded like 6.824's `timeout 180s`.
const DEADLINE: Duration = Duration::from_secs(120);

/// `mrd` in plaintext (`DS824_INSECURE`), whatever the developer's environment says about TLS.
fn mrd() -> Command {
    let mut cmd = mrd_without_tls();
    cmd.env("DS824_INSECURE", "1");
    cmd
}

/// `mrd` with neither TLS files nor --insecure.
fn mrd_without_tls() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mrd"));
    for var in [
        "DS824_INSECURE",
        "DS824_TLS_CA",
        "DS824_TLS_CERT",
        "DS824_TLS_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `mrd` with the certificate of `role`/`name` from the test CA in `ca`.
fn mrd_tls(ca: &Path, role: &str, name: &str) -> Command {
    let (cert, key) = tls::issue(ca, role, name);
    let mut cmd = mrd_without_tls();
    cmd.env("DS824_TLS_CA", ca.join("ca.pem"))
        .env("DS824_TLS_CERT", cert)
        .env("DS824_TLS_KEY", key);
    cmd
}

/// The plaintext security the tests' library clients use.
const PLAIN: &Security = &Security::Insecure;

struct Env {
    dir: tempfile::TempDir,
    inputs: Vec<PathBuf>,
    workers: usize,
}

impl Env {
    /// A fresh directory with the 8 generated "books".
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mr-test-")
            .tempdir()
            .unwrap();
        let input_dir = dir.path().join("inputs");
        std::fs::create_dir_all(&input_dir).unwrap();
        let inputs = corpus::write_zipf_corpus(&input_dir, 8, 40_000, 824).unwrap();
        Env {
            dir,
            inputs,
            workers: 0,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.path().join(format!("{name}.log"))).unwrap()
    }

    /// Starts a coordinator on `listen` (port 0 for any) and learns its address from its first line.
    fn coordinator(&self, listen: &str, task_timeout: &str) -> Coordinator {
        self.coordinator_with(listen, task_timeout, &[])
    }

    /// [`Env::coordinator`] with extra flags; the test directory is its data root.
    fn coordinator_with(&self, listen: &str, task_timeout: &str, extra: &[&str]) -> Coordinator {
        self.start_coordinator(mrd(), self.path(), listen, task_timeout, extra)
    }

    /// Starts `mrd` (plaintext or TLS) as a coordinator with data root `data_root`.
    fn start_coordinator(
        &self,
        mut mrd: Command,
        data_root: &Path,
        listen: &str,
        task_timeout: &str,
        extra: &[&str],
    ) -> Coordinator {
        let mut child = mrd
            .args([
                "coordinator",
                "--listen",
                listen,
                "--task-timeout",
                task_timeout,
                "--data-dir",
            ])
            .arg(self.path().join("coordinator-data"))
            .arg("--data-root")
            .arg(data_root)
            .args(extra)
            // The crash apps kill workers on purpose, on most attempts; those jobs must still finish
            // (the 6.824 tests). A test of the limit itself passes its own.
            .args(
                (!extra.contains(&"--max-attempts"))
                    .then_some(["--max-attempts", "1000"])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .stderr(self.log(&format!("coordinator-{}", listen.replace(':', "_"))))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("coordinator did not print its address: {line:?}"))
            .to_string();
        Coordinator { child, addr }
    }

    /// Starts a worker (with --exit-when-idle) whose working directory is the test directory.
    fn worker(&mut self, coordinator: &str, extra: &[&str]) -> Child {
        self.workers += 1;
        let n = self.workers;
        spawn_worker(self.path(), coordinator, n, extra)
    }

    /// [`Env::worker`] run by `mrd` (plaintext or TLS).
    fn worker_with(&mut self, mrd: Command, coordinator: &str) -> Child {
        self.workers += 1;
        spawn_worker_with(mrd, self.path(), coordinator, self.workers, &[])
    }

    /// Runs `mrd sequential` and returns its sorted non-empty lines.
    fn sequential(&self, app: &str, args: &[&str]) -> Vec<String> {
        let out = self.path().join(format!("seq-{app}"));
        let mut cmd = mrd();
        cmd.args(["sequential", "--app", app, "--output"]).arg(&out);
        for arg in args {
            cmd.args(["--arg", arg]);
        }
        let status = cmd.args(&self.inputs).status().unwrap();
        assert!(status.success(), "sequential {app} failed");
        sorted_lines(&out)
    }

    /// `mrd submit` of a 3-reduce `app` job over the generated inputs into `output`, to be completed
    /// with flags and run.
    fn submit_command(&self, mut mrd: Command, addr: &str, app: &str, output: &Path) -> Command {
        mrd.args(["submit", "--coordinator", addr, "--app", app])
            .args(["--reduces", "3", "--output"])
            .arg(output)
            .args(&self.inputs);
        mrd
    }

    /// Submits a job over the generated inputs and returns its id.
    fn submit(
        &self,
        addr: &str,
        app: &str,
        args: &[&str],
        reduces: u32,
        shuffle: &str,
        output: &str,
    ) -> u64 {
        let mut cmd = mrd();
        cmd.args([
            "submit",
            "--coordinator",
            addr,
            "--app",
            app,
            "--shuffle",
            shuffle,
        ])
        .args(["--reduces", &reduces.to_string(), "--output"])
        .arg(self.path().join(output));
        for arg in args {
            cmd.args(["--arg", arg]);
        }
        let out = cmd.args(&self.inputs).output().unwrap();
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn output(&self, output: &str) -> Vec<String> {
        sorted_lines(&self.path().join(output))
    }

    /// The tail of every log, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                all.push_str(&format!("--- {name}\n"));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    }
}

fn spawn_worker(dir: &Path, coordinator: &str, n: usize, extra: &[&str]) -> Child {
    spawn_worker_with(mrd(), dir, coordinator, n, extra)
}

fn spawn_worker_with(
    mut mrd: Command,
    dir: &Path,
    coordinator: &str,
    n: usize,
    extra: &[&str],
) -> Child {
    let log = std::fs::File::create(dir.join(format!("worker-{n}.log"))).unwrap();
    mrd.args([
        "worker",
        "--exit-when-idle",
        "--coordinator",
        coordinator,
        "--dir",
    ])
    .arg(dir.join("workers").join(n.to_string()))
    .args(extra)
    .current_dir(dir)
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .unwrap()
}

struct Coordinator {
    child: Child,
    addr: String,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every non-empty line of every `mr-out*` file in `dir`, sorted: 6.824's `sort mr-out* | grep .`.
fn sorted_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("mr-out") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            lines.extend(text.lines().filter(|l| !l.is_empty()).map(String::from));
        }
    }
    lines.sort();
    lines
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How many times each task of `kind` was handed out, in task order, from a status with task rows.
fn runs(status: &pb::JobStatus, kind: pb::TaskKind) -> Vec<u32> {
    status
        .tasks
        .iter()
        .filter(|t| t.kind == kind as i32)
        .map(|t| t.runs)
        .collect()
}

/// Waits until job `id` is done and returns its final status.
fn wait_job(env: &Env, addr: &str, id: u64) -> pb::JobStatus {
    let status = runtime()
        .block_on(async {
            tokio::time::timeout(
                DEADLINE,
                client::wait(addr, PLAIN, id, Duration::from_secs(30), |_| {}),
            )
            .await
        })
        .unwrap_or_else(|_| panic!("job {id} not done within {DEADLINE:?}\n{}", env.logs()))
        .unwrap_or_else(|err| panic!("waiting for job {id}: {err}\n{}", env.logs()));
    assert_eq!(
        status.state,
        pb::JobState::Done as i32,
        "job {id}: {}\n{}",
        status.error,
        env.logs()
    );
    status
}

/// Polls job `id` until `done` holds of its status.
fn wait_until(
    env: &Env,
    addr: &str,
    id: u64,
    what: &str,
    done: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    let rt = runtime();
    let started = Instant::now();
    loop {
        let status = rt.block_on(async {
            let mut c = client::connect(addr, PLAIN).await?;
            client::status(&mut c, Some(id), true).await
        });
        if let Ok(Some(job)) = status.map(|jobs| jobs.into_iter().next()) {
            if done(&job) {
                return job;
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("process did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_all(children: &mut [Child]) {
    for child in children {
        let status = wait_exit(child);
        assert!(status.success(), "worker exited with {status}");
    }
}

#[test]
fn wc_matches_sequential() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let id = env.submit(&coord.addr, "wc", &[], 10, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..3).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
    // Each reducer removed the intermediates it read once the coordinator took its output: the job
    // leaves its outputs and nothing else (it left all 8 × 10 intermediates before).
    let left: Vec<String> = std::fs::read_dir(env.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with("mr-out-"))
        .collect();
    assert!(left.is_empty(), "left beside the outputs: {left:?}");
}

/// The intermediate files of map `map` for reduce `reduce` of job `job` in `dir`, of any attempt.
fn intermediates(dir: &Path, job: u64, map: u32, reduce: u32) -> Vec<PathBuf> {
    let prefix = format!("mr-{map}-{reduce}.job{job}.");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn wc_grpc_shuffle_matches_sequential() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let id = env.submit(&coord.addr, "wc", &[], 10, "grpc", "out");
    let mut workers: Vec<Child> = (0..3).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
    // Intermediate files stayed with the mappers.
    assert!(intermediates(&env.path().join("out"), id, 0, 0).is_empty());
}

#[test]
fn indexer_and_queued_jobs_match_sequential() {
    let mut env = Env::new();
    let expected_indexer = env.sequential("indexer", &[]);
    let expected_wc = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "10s");
    // Two queued jobs run one after the other on the same two workers.
    let first = env.submit(&coord.addr, "indexer", &[], 10, "shared-dir", "out-indexer");
    let second = env.submit(&coord.addr, "wc", &[], 5, "grpc", "out-wc");
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, first);
    wait_job(&env, &coord.addr, second);
    wait_all(&mut workers);
    assert_eq!(env.output("out-indexer"), expected_indexer);
    assert_eq!(env.output("out-wc"), expected_wc);
}

#[test]
fn map_parallelism() {
    let mut env = Env::new();
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "mtiming"]);
    let id = env.submit(&coord.addr, "mtiming", &[], 10, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    let lines = env.output("out");
    let times = lines.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(times, 2, "both workers must run maps: {lines:?}");
    let overlapped = lines
        .iter()
        .filter(|l| l.starts_with("parallel-"))
        .any(|l| l.split(' ').skip(1).any(|v| v == "2"));
    assert!(overlapped, "map tasks never ran in parallel: {lines:?}");
}

#[test]
fn reduce_parallelism() {
    let mut env = Env::new();
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "rtiming"]);
    let id = env.submit(&coord.addr, "rtiming", &[], 10, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    let lines = env.output("out");
    let parallel = lines
        .iter()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() >= 3 && b[0].is_ascii_lowercase() && &b[1..3] == b" 2"
        })
        .count();
    assert!(parallel >= 2, "too few parallel reduces: {lines:?}");
}

#[test]
fn job_count() {
    let mut env = Env::new();
    let metrics = format!("127.0.0.1:{}", ports::free_port());
    let coord = env.coordinator_with(
        "127.0.0.1:0",
        "10s",
        &["--metrics-listen", &metrics, "--allow-apps", "jobcount"],
    );
    let id = env.submit(&coord.addr, "jobcount", &[], 10, "shared-dir", "out");
    let mut first = env.worker(&coord.addr, &[]);
    let mut second = env.worker(&coord.addr, &[]);
    assert!(wait_exit(&mut second).success());
    // These two may well start after the job is over: they must exit cleanly.
    let mut late = vec![env.worker(&coord.addr, &[]), env.worker(&coord.addr, &[])];
    wait_all(&mut late);
    assert!(wait_exit(&mut first).success());
    let status = wait_job(&env, &coord.addr, id);
    assert_eq!(
        env.output("out"),
        vec!["a 8".to_string()],
        "\n{}",
        env.logs()
    );
    let map_runs: u32 = runs(&status, pb::TaskKind::Map).iter().sum();
    assert_eq!(map_runs, 8);
    // The coordinator's metrics tell the same story.
    let page = scrape::scrape(&metrics);
    for line in [
        "mr_jobs{state=\"done\"} 1",
        "mr_tasks{kind=\"map\",state=\"done\"} 8",
        "mr_tasks{kind=\"reduce\",state=\"done\"} 10",
        "mr_tasks{kind=\"map\",state=\"pending\"} 0",
        "mr_task_attempts{kind=\"map\"} 8",
        "mr_task_failures{kind=\"map\"} 0",
    ] {
        assert!(page.contains(line), "{line} not in\n{page}");
    }
    scrape::assert_dashboard_metrics_exported("mr coordinator", &page);
}

#[test]
fn early_exit() {
    let mut env = Env::new();
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "early_exit"]);
    let id = env.submit(&coord.addr, "early_exit", &[], 10, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..3).map(|_| env.worker(&coord.addr, &[])).collect();
    // Wait for the first worker to exit, then snapshot the outputs.
    let started = Instant::now();
    let first = loop {
        if let Some(i) = workers
            .iter_mut()
            .position(|w| w.try_wait().unwrap().is_some())
        {
            break i;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no worker exited\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let snapshot = env.output("out");
    wait_all(&mut workers);
    wait_job(&env, &coord.addr, id);
    let final_output = env.output("out");
    assert_eq!(
        snapshot, final_output,
        "worker {first} exited before the output was final"
    );
    assert_eq!(final_output.len(), 8);
}

#[test]
fn crash_recovery() {
    let mut env = Env::new();
    let expected = env.sequential("nocrash", &[]);
    let coord = env.coordinator_with("127.0.0.1:0", "3s", &["--allow-apps", "crash"]);
    // Half of the app's calls crash (the Go test's third left a run of about ten calls without a
    // crash, and so without a test, about once in fifty; now about once in a thousand).
    let id = env.submit(
        &coord.addr,
        "crash",
        &["max_sleep_ms=4000", "crash_permille=500"],
        10,
        "shared-dir",
        "out",
    );
    let done = Arc::new(AtomicBool::new(false));
    let mut background = env.worker(&coord.addr, &[]);
    // Three loops keep restarting crashed workers until the job is done.
    let loops: Vec<_> = (0..3)
        .map(|l| {
            let done = done.clone();
            let dir = env.path().to_path_buf();
            let addr = coord.addr.clone();
            std::thread::spawn(move || {
                let (mut n, mut crashes) = (0, 0);
                while !done.load(Ordering::SeqCst) {
                    n += 1;
                    let mut worker = spawn_worker(&dir, &addr, 100 * (l + 1) + n, &[]);
                    if !wait_exit(&mut worker).success() {
                        crashes += 1;
                    }
                }
                crashes
            })
        })
        .collect();
    wait_job(&env, &coord.addr, id);
    done.store(true, Ordering::SeqCst);
    let crashes: usize = loops.into_iter().map(|h| h.join().unwrap()).sum();
    // The first worker runs the crash app too: its crash counts as much as the loops' ones.
    let background_crashed = usize::from(!wait_exit(&mut background).success());
    let crashes = crashes + background_crashed;
    assert_eq!(env.output("out"), expected, "\n{}", env.logs());
    assert!(
        crashes > 0,
        "no worker crashed, so nothing was tested\n{}",
        env.logs()
    );
}

#[test]
fn coordinator_sigkill_resumes_job() {
    let mut env = Env::new();
    let expected = env.sequential("nocrash", &[]);
    let mut coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "crash"]);
    let addr = coord.addr.clone();
    let args = [
        "crash_permille=0",
        "sleep_permille=1000",
        "max_sleep_ms=800",
    ];
    let id = env.submit(&addr, "crash", &args, 10, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..3).map(|_| env.worker(&addr, &[])).collect();
    let before = wait_until(&env, &addr, id, "a few maps", |job| job.maps_done >= 3);
    assert_ne!(before.state, pb::JobState::Done as i32);
    coord.child.kill().unwrap();
    coord.child.wait().unwrap();
    // Restart on the same address and data directory; the workers ride out the gap.
    let coord = env.coordinator_with(&addr, "10s", &["--allow-apps", "crash"]);
    let resumed = wait_until(&env, &coord.addr, id, "restarted coordinator", |_| true);
    assert!(
        resumed.maps_done >= before.maps_done,
        "finished maps were forgotten"
    );
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
    // Killed again once the job is done: it comes back done, every task with it (the header, the
    // job's state and each task record are stored apart).
    let mut coord = coord;
    coord.child.kill().unwrap();
    coord.child.wait().unwrap();
    let coord = env.coordinator_with(&addr, "10s", &["--allow-apps", "crash"]);
    let after = wait_until(&env, &coord.addr, id, "restarted coordinator", |_| true);
    assert_eq!(after.state, pb::JobState::Done as i32);
    assert_eq!((after.maps_done, after.reduces_done), (8, 10));
}

#[test]
fn grpc_shuffle_survives_lost_mapper() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let id = env.submit(&coord.addr, "wc", &[], 10, "grpc", "out");
    // A map-only worker does every map task, then dies holding all the map outputs.
    let mut mapper = env.worker(&coord.addr, &["--only", "map"]);
    wait_until(&env, &coord.addr, id, "all maps", |job| job.maps_done == 8);
    mapper.kill().unwrap();
    mapper.wait().unwrap();
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    let status = wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
    let reran = runs(&status, pb::TaskKind::Map)
        .into_iter()
        .filter(|&runs| runs >= 2)
        .count();
    assert!(reran > 0, "no map task was re-run after its mapper died");
}

#[test]
fn streaming_app_matches_wc() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "streaming"]);
    let mapper = "mapper=tr -cs A-Za-z '\\n' | grep -v '^$' | sed 's/$/\t1/'";
    let reducer = "reducer=awk -F'\t' '$1 != k { if (NR > 1) print k, n; k = $1; n = 0 } { n += $2 } END { if (NR > 0) print k, n }'";
    let id = env.submit(
        &coord.addr,
        "streaming",
        &[mapper, reducer],
        4,
        "grpc",
        "out",
    );
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
}

#[test]
fn bad_submissions_are_refused() {
    let env = Env::new();
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let out = env.path().join("out");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--app", "wc", "--reduces", "3", "/nonexistent/input.txt"],
            "nonexistent",
        ),
        (&["--app", "nope", "--reduces", "3"], "unknown app"),
        (&["--app", "wc", "--reduces", "0"], "reduce tasks"),
        (&["--app", "grep", "--reduces", "1"], "pattern"),
    ];
    for (args, reason) in cases {
        let mut cmd = mrd();
        cmd.args(["submit", "--coordinator", &coord.addr, "--output"])
            .arg(&out)
            .args(args);
        if !args.iter().any(|a| a.starts_with('/')) {
            cmd.arg(&env.inputs[0]);
        }
        let result = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    // Nothing was queued.
    let jobs = runtime().block_on(async {
        let mut c = client::connect(&coord.addr, PLAIN).await.unwrap();
        client::status(&mut c, None, true).await.unwrap()
    });
    assert!(jobs.is_empty());
}

#[test]
fn failing_app_fails_its_job_and_the_queue_moves_on() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "streaming"]);
    let failing = env.submit(
        &coord.addr,
        "streaming",
        &["mapper=exit 3", "reducer=cat"],
        2,
        "shared-dir",
        "bad",
    );
    let good = env.submit(&coord.addr, "wc", &[], 3, "shared-dir", "good");
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    let failed = wait_until(
        &env,
        &coord.addr,
        failing,
        "the failing job to fail",
        client::finished,
    );
    assert_eq!(failed.state, pb::JobState::Failed as i32);
    assert!(failed.error.contains("exited"), "{}", failed.error);
    wait_job(&env, &coord.addr, good);
    wait_all(&mut workers);
    assert_eq!(env.output("good"), expected);
    // `mrd status` reports both, and `submit --wait` on a failed job would exit non-zero.
    let out = mrd()
        .args(["status", "--coordinator", &coord.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("job {failing} [failed]")), "{text}");
    assert!(text.contains(&format!("job {good} [done]")), "{text}");
}

/// A map task that kills every worker that takes it (#17): only reported failures used to count, so it
/// was handed out forever and every job queued behind it waited forever. With `--max-attempts 3` its
/// job fails after three hand-outs, saying why, and the next job completes.
#[test]
fn a_task_that_kills_its_workers_fails_its_job_and_the_queue_moves_on() {
    let env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator_with(
        "127.0.0.1:0",
        "1s",
        &["--allow-apps", "crash", "--max-attempts", "3"],
    );
    let deadly = env.submit(
        &coord.addr,
        "crash",
        &["crash_permille=1000"],
        2,
        "shared-dir",
        "deadly",
    );
    let good = env.submit(&coord.addr, "wc", &[], 3, "shared-dir", "good");
    let done = Arc::new(AtomicBool::new(false));
    // Two loops keep restarting workers, as a cluster manager would.
    let loops: Vec<_> = (0..2)
        .map(|l| {
            let done = done.clone();
            let dir = env.path().to_path_buf();
            let addr = coord.addr.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(Ordering::SeqCst) && n < 100 {
                    n += 1;
                    let mut worker = spawn_worker(&dir, &addr, 100 * (l + 1) + n, &[]);
                    wait_exit(&mut worker);
                }
            })
        })
        .collect();
    let failed = wait_until(
        &env,
        &coord.addr,
        deadly,
        "the deadly job to fail",
        client::finished,
    );
    wait_job(&env, &coord.addr, good);
    done.store(true, Ordering::SeqCst);
    for handle in loops {
        handle.join().unwrap();
    }
    assert_eq!(failed.state, pb::JobState::Failed as i32, "{failed:?}");
    assert!(
        failed.error.contains("handed out 3 times"),
        "{}",
        failed.error
    );
    assert_eq!(env.output("good"), expected);
}

#[test]
fn submit_wait_follows_the_job_and_reports_failure() {
    let mut env = Env::new();
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "streaming"]);
    let submit = |app_args: &[&str], output: &str| {
        let mut cmd = mrd();
        cmd.args([
            "submit",
            "--wait",
            "--coordinator",
            &coord.addr,
            "--reduces",
            "2",
            "--output",
        ])
        .arg(env.path().join(output))
        .args(app_args)
        .args(&env.inputs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let good = submit(&["--app", "wc"], "good");
    let bad = submit(
        &[
            "--app",
            "streaming",
            "--arg",
            "mapper=exit 3",
            "--arg",
            "reducer=cat",
        ],
        "bad",
    );
    // Start the worker only once both jobs are queued, or it could find nothing to do and exit.
    let started = Instant::now();
    while runtime()
        .block_on(async {
            client::status(&mut client::connect(&coord.addr, PLAIN).await?, None, true).await
        })
        .map_or(0, |jobs| jobs.len())
        < 2
    {
        assert!(started.elapsed() < DEADLINE, "jobs were never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut worker = env.worker(&coord.addr, &[]);
    let good = good.wait_with_output().unwrap();
    let bad = bad.wait_with_output().unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    // Output to a pipe still ends with a summary line after the job id.
    let stdout = String::from_utf8_lossy(&good.stdout);
    let lines: Vec<&str> = stdout.trim().lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[1].starts_with(&format!("job {} done in ", lines[0]))
            && lines[1].contains(" reduces; output ")
            && lines[1].ends_with("/good/mr-out-0..1"),
        "{stdout}"
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("failed 3 times"), "{stderr}");
    assert!(stderr.contains(" failed after "), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    assert!(wait_exit(&mut worker).success());
}

/// Runs `cmd` and returns (exit code, stderr, how long it took).
fn run_refused(mut cmd: Command) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Every job the plaintext coordinator at `addr` knows.
fn jobs(addr: &str) -> Vec<pb::JobStatus> {
    runtime().block_on(async {
        let mut c = client::connect(addr, PLAIN).await.unwrap();
        client::status(&mut c, None, true).await.unwrap()
    })
}

/// A coordinator that runs for months keeps only the newest `--keep-jobs` finished jobs: an older
/// one is answered "forgotten", and it is gone from disk too (a restart allowed to keep more does not
/// bring it back). Ids never repeat.
#[test]
fn only_the_newest_finished_jobs_are_kept_on_disk_too() {
    let mut env = Env::new();
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--keep-jobs", "1"]);
    let first = env.submit(&coord.addr, "wc", &[], 2, "grpc", "out-1");
    let second = env.submit(&coord.addr, "wc", &[], 2, "grpc", "out-2");
    let mut workers: Vec<Child> = (0..2).map(|_| env.worker(&coord.addr, &[])).collect();
    wait_job(&env, &coord.addr, second);
    wait_all(&mut workers);
    let ids = |addr: &str| jobs(addr).iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(&coord.addr), vec![second]);
    let refused = runtime().block_on(async {
        let mut c = client::connect(&coord.addr, PLAIN).await.unwrap();
        client::status(&mut c, Some(first), false)
            .await
            .unwrap_err()
    });
    assert!(refused.to_string().contains("forgotten"), "{refused}");
    drop(coord);
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--keep-jobs", "10"]);
    assert_eq!(ids(&coord.addr), vec![second]);
    assert_eq!(
        env.submit(&coord.addr, "wc", &[], 2, "grpc", "out-3"),
        second + 1
    );
}

#[test]
fn restricted_apps_are_refused_unless_allowed() {
    let env = Env::new();
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let streaming = ["--arg", "mapper=cat", "--arg", "reducer=cat"];
    for (app, args) in [("streaming", &streaming[..]), ("crash", &[][..])] {
        let mut cmd = env.submit_command(mrd(), &coord.addr, app, &env.path().join(app));
        let (code, stderr, _) = run_refused({
            cmd.args(args);
            cmd
        });
        assert_ne!(code, Some(0), "{app} was accepted");
        assert!(stderr.contains(&format!("--allow-apps {app}")), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    assert!(jobs(&coord.addr).is_empty());
    drop(coord);
    // Allowed by the operator: accepted.
    let coord = env.coordinator_with("127.0.0.1:0", "10s", &["--allow-apps", "streaming"]);
    let mut cmd = env.submit_command(mrd(), &coord.addr, "streaming", &env.path().join("ok"));
    let out = cmd.args(streaming).output().unwrap();
    assert_succeeded(&out);
    assert_eq!(jobs(&coord.addr).len(), 1);
    // An unknown name in --allow-apps is a start-up error, not a silently ignored typo.
    let (code, stderr, _) = run_refused({
        let mut cmd = mrd();
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(env.path().join("other-data"))
            .arg("--data-root")
            .arg(env.path())
            .args(["--allow-apps", "stremaing"]);
        cmd
    });
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("stremaing"), "{stderr}");
}

#[test]
fn job_paths_must_lie_under_a_data_root_and_outputs_must_be_new() {
    let env = Env::new();
    let root = env.path().join("root");
    let elsewhere = env.path().join("elsewhere");
    std::fs::create_dir_all(root.join("in")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let input = root.join("in/book.txt");
    std::fs::copy(&env.inputs[0], &input).unwrap();
    let secret = elsewhere.join("secret.txt");
    std::fs::write(&secret, "secret words").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("in/link.txt")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("out-link")).unwrap();
    std::fs::create_dir_all(root.join("full")).unwrap();
    std::fs::write(root.join("full/mr-out-0"), "earlier results").unwrap();
    let coord = env.start_coordinator(mrd(), &root, "127.0.0.1:0", "10s", &[]);
    let cases: [(PathBuf, PathBuf, &str); 6] = [
        (secret.clone(), root.join("o1"), "outside"),
        (
            root.join("../elsewhere/secret.txt"),
            root.join("o2"),
            "outside",
        ),
        (root.join("in/link.txt"), root.join("o3"), "outside"),
        (input.clone(), elsewhere.join("out"), "outside"),
        (input.clone(), root.join("../elsewhere/out"), "outside"),
        (input.clone(), root.join("full"), "not empty"),
    ];
    for (input, output, reason) in &cases {
        let out = mrd()
            .args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
            .arg("--output")
            .arg(output)
            .arg(input)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{input:?} -> {output:?} was accepted"
        );
        assert!(stderr.contains(reason), "{input:?} -> {output:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    // A symlinked output directory, and a spec the coordinator gets without the CLI resolving it.
    let raw = |input: PathBuf, output: PathBuf| pb::JobSpec {
        app: "wc".into(),
        inputs: vec![input.to_string_lossy().into_owned()],
        n_reduce: 1,
        output_dir: output.to_string_lossy().into_owned(),
        ..Default::default()
    };
    for spec in [
        raw(input.clone(), root.join("out-link/new")),
        raw(root.join("../elsewhere/secret.txt"), root.join("o4")),
        raw(root.join("in/link.txt"), root.join("o5")),
    ] {
        let refused = runtime().block_on(async {
            let mut c = client::connect(&coord.addr, PLAIN).await.unwrap();
            c.submit(pb::SubmitRequest {
                spec: Some(spec),
                overwrite: false,
            })
            .await
        });
        let status = refused.expect_err("a path outside the root was accepted");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert!(status.message().contains("--data-root"), "{status}");
    }
    assert!(jobs(&coord.addr).is_empty(), "a refused job was queued");
    // Under the root, resolved: accepted, with the resolved paths.
    let out = mrd()
        .args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
        .arg("--output")
        .arg(root.join("in/../new-out"))
        .arg(root.join("in/../in/book.txt"))
        .output()
        .unwrap();
    assert_succeeded(&out);
    // The same (still empty) output directory for a second job while the first is queued: refused.
    let out = mrd()
        .args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
        .arg("--output")
        .arg(root.join("new-out"))
        .arg(&input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "two jobs share an output directory");
    assert!(stderr.contains("already the output of job"), "{stderr}");
    // The inputs are listed when one job is asked for.
    let id = jobs(&coord.addr).remove(0).id;
    let spec = runtime()
        .block_on(async {
            let mut c = client::connect(&coord.addr, PLAIN).await?;
            client::status(&mut c, Some(id), true).await
        })
        .unwrap()
        .remove(0)
        .spec
        .unwrap();
    let canonical = std::fs::canonicalize(&root).unwrap();
    assert_eq!(spec.output_dir, canonical.join("new-out").to_string_lossy());
    assert_eq!(
        spec.inputs,
        [canonical.join("in/book.txt").to_string_lossy()]
    );
}

#[test]
fn the_coordinator_refuses_to_start_without_tls_or_a_data_root() {
    let env = Env::new();
    let (code, stderr, _) = run_refused({
        let mut cmd = mrd_without_tls();
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(env.path().join("data"))
            .arg("--data-root")
            .arg(env.path());
        cmd
    });
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TLS is required"), "{stderr}");
    let (code, stderr, _) = run_refused({
        let mut cmd = mrd();
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(env.path().join("data"));
        cmd
    });
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--data-root"), "{stderr}");
}

/// A test directory with a CA and a TLS coordinator (certificate role `coordinator`) on it.
fn tls_env() -> (Env, PathBuf, Coordinator) {
    let env = Env::new();
    let ca = tls::ca(env.path(), "ca", "mrtest");
    let coord = env.start_coordinator(
        mrd_tls(&ca, "coordinator", "1"),
        env.path(),
        "127.0.0.1:0",
        "10s",
        &[],
    );
    (env, ca, coord)
}

#[test]
fn with_tls_worker_certificates_run_a_job_an_admin_submitted() {
    let (mut env, ca, coord) = tls_env();
    let expected = env.sequential("wc", &[]);
    let out = env
        .submit_command(
            mrd_tls(&ca, "admin", "op"),
            &coord.addr,
            "wc",
            &env.path().join("out"),
        )
        .args(["--shuffle", "grpc"])
        .output()
        .unwrap();
    assert_succeeded(&out);
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let mut workers: Vec<Child> = (1..=2)
        .map(|n| env.worker_with(mrd_tls(&ca, "worker", &n.to_string()), &coord.addr))
        .collect();
    let admin = tls::security(&ca, "admin", "op");
    let status = runtime()
        .block_on(async {
            tokio::time::timeout(
                DEADLINE,
                client::wait(&coord.addr, &admin, id, Duration::from_secs(30), |_| {}),
            )
            .await
        })
        .unwrap_or_else(|_| panic!("job not done\n{}", env.logs()))
        .unwrap_or_else(|err| panic!("{err}\n{}", env.logs()));
    assert_eq!(status.state, pb::JobState::Done as i32, "{}", env.logs());
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected);
    // A client certificate reads the status, and so does the coordinator's own (its health check).
    for (role, name) in [("client", "user"), ("coordinator", "1")] {
        let out = mrd_tls(&ca, role, name)
            .args(["status", "--coordinator", &coord.addr])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("job {id} [done]")), "{role}: {text}");
    }
}

#[test]
fn with_tls_only_an_admin_submits_and_refusals_are_immediate() {
    let (mut env, ca, coord) = tls_env();
    let output = env.path().join("out");
    // A client certificate is authenticated but may not submit.
    let (code, stderr, _) =
        run_refused(env.submit_command(mrd_tls(&ca, "client", "user"), &coord.addr, "wc", &output));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert!(
        stderr.contains("client/user"),
        "names the identity: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    // No certificate at all: refused before connecting.
    let (code, stderr, elapsed) =
        run_refused(env.submit_command(mrd_without_tls(), &coord.addr, "wc", &output));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TLS is required"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // Plaintext against the TLS port fails at once, not after a timeout.
    let (code, stderr, elapsed) =
        run_refused(env.submit_command(mrd(), &coord.addr, "wc", &output));
    assert_eq!(code, Some(2), "plaintext: {stderr}");
    assert!(stderr.contains("requires TLS"), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}: {stderr}");
    // Another CA's admin certificate: refused at the handshake.
    let other = tls::ca(env.path(), "other-ca", "mrtest");
    let (code, stderr, elapsed) =
        run_refused(env.submit_command(mrd_tls(&other, "admin", "op"), &coord.addr, "wc", &output));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TLS"), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // A worker needs a worker certificate: refused at start with a client one.
    let mut worker = env.worker_with(mrd_tls(&ca, "client", "user"), &coord.addr);
    assert_eq!(wait_exit(&mut worker).code(), Some(2));
    assert!(env.logs().contains("worker certificate"), "{}", env.logs());
    // Nothing was queued; and only workers take tasks, not even an admin.
    let admin = tls::security(&ca, "admin", "op");
    let (jobs, take) = runtime().block_on(async {
        let mut c = client::connect(&coord.addr, &admin).await.unwrap();
        let jobs = client::status(&mut c, None, true).await.unwrap();
        let take = c
            .request_task(pb::TaskRequest {
                worker_id: "impostor".into(),
                accept_map: true,
                accept_reduce: true,
                ..Default::default()
            })
            .await;
        (jobs, take)
    });
    assert!(jobs.is_empty());
    let refused = take.expect_err("an admin took a task");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
}

/// Fail with the command's stderr unless it succeeded.
fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A map output cut short after its map finished (a crash or power loss before the disk had it) is
/// refused by the reducer, never read as fewer records: its map runs again and the output is right.
#[test]
fn a_truncated_map_output_is_detected_and_its_map_runs_again() {
    let mut env = Env::new();
    let inputs = env.path().join("two-inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::write(inputs.join("a.txt"), "x y").unwrap();
    std::fs::write(inputs.join("b.txt"), "slow z").unwrap();
    env.inputs = vec![inputs.join("a.txt"), inputs.join("b.txt")];
    let go = env.path().join("go");
    // Map 1 waits for the test, so map 0's output can be damaged before any reduce reads it.
    let mapper = format!(
        "case \"$MR_INPUT_FILE\" in *b.txt) while [ ! -e {} ]; do sleep 0.05; done;; esac; \
         tr ' ' '\\n' | sed 's/$/\\t1/'",
        go.display()
    );
    let coord = env.coordinator_with("127.0.0.1:0", "20s", &["--allow-apps", "streaming"]);
    let id = env.submit(
        &coord.addr,
        "streaming",
        &[
            &format!("mapper={mapper}"),
            "reducer=cut -f1 | sort | uniq -c | awk '{print $2, $1}'",
        ],
        1,
        "shared-dir",
        "out",
    );
    let mut worker = env.worker(&coord.addr, &[]);
    let started = Instant::now();
    let first = loop {
        if let Some(first) = intermediates(&env.path().join("out"), id, 0, 0).pop() {
            break first;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "map 0 never wrote its output\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let whole = std::fs::read(&first).unwrap();
    std::fs::write(&first, &whole[..whole.len() / 2]).unwrap();
    std::fs::write(&go, "").unwrap();
    let status = wait_job(&env, &coord.addr, id);
    assert!(wait_exit(&mut worker).success());
    assert_eq!(
        env.output("out"),
        vec!["slow 1", "x 1", "y 1", "z 1"],
        "\n{}",
        env.logs()
    );
    let map_runs = runs(&status, pb::TaskKind::Map);
    assert_eq!(map_runs, vec![2, 1], "map 0 must have run again");
    assert!(env.logs().contains("map output refused"), "{}", env.logs());
}

/// A second job into the directory a first one left (8 reduces, so a stale `mr-out-7`) is refused;
/// with --overwrite the earlier outputs are removed first and the directory holds exactly the new
/// job's output.
#[test]
fn a_directory_left_by_a_job_is_refused_unless_overwritten() {
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "10s");
    let first = env.submit(&coord.addr, "wc", &[], 8, "shared-dir", "out");
    let mut worker = env.worker(&coord.addr, &[]);
    wait_job(&env, &coord.addr, first);
    assert!(wait_exit(&mut worker).success());
    let out = env.path().join("out");
    assert!(out.join("mr-out-7").exists());
    let again = |overwrite: bool| {
        let mut cmd = mrd();
        cmd.args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
            .args(["--reduces", "3", "--output"])
            .arg(&out);
        if overwrite {
            cmd.arg("--overwrite");
        }
        cmd.args(&env.inputs).output().unwrap()
    };
    let refused = again(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("not empty"), "{stderr}");
    // Something no job wrote is never removed, --overwrite or not.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let refused = again(true);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("notes.txt"), "{stderr}");
    assert!(
        out.join("mr-out-7").exists(),
        "nothing removed on a refusal"
    );
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    let accepted = again(true);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let second: u64 = String::from_utf8_lossy(&accepted.stdout)
        .trim()
        .parse()
        .unwrap();
    let mut worker = env.worker(&coord.addr, &[]);
    wait_job(&env, &coord.addr, second);
    assert!(wait_exit(&mut worker).success());
    assert!(!out.join("mr-out-7").exists(), "the stale output is gone");
    assert!(out.join("mr-out-2").exists());
    assert_eq!(env.output("out"), expected);
}

/// `mr_task_message_bytes` and the summed `mr_task_attempts` of a coordinator's metrics page.
fn task_bytes_and_attempts(metrics: &str) -> (u64, u64) {
    let page = scrape::scrape(metrics);
    let value = |prefix: &str| -> u64 {
        page.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    (value("mr_task_message_bytes "), value("mr_task_attempts{"))
}

#[test]
fn forty_thousand_inputs_complete_and_a_task_costs_no_more_than_in_a_small_job() {
    let env = Env::new();
    let metrics = format!("127.0.0.1:{}", ports::free_port());
    let coord = env.coordinator_with("127.0.0.1:0", "60s", &["--metrics-listen", &metrics]);
    let inputs_dir = env.path().join("many");
    std::fs::create_dir_all(&inputs_dir).unwrap();
    const INPUTS: usize = 40_000;
    // Words are runs of letters: `k` spelled in letters.
    let word = |k: usize| {
        format!(
            "w{}{}",
            (b'a' + (k / 26) as u8) as char,
            (b'a' + (k % 26) as u8) as char
        )
    };
    let inputs: Vec<PathBuf> = (0..INPUTS)
        .map(|n| {
            let path = inputs_dir.join(n.to_string());
            std::fs::write(&path, format!("{} common\n", word(n % 97))).unwrap();
            path
        })
        .collect();
    let rt = runtime();
    // Through the library: a command line cannot carry 40,000 paths.
    let submit = |inputs: &[PathBuf], output: &str| -> u64 {
        let spec = ds824::mr::job::JobSpec::prepare(
            "wc",
            &[],
            inputs,
            2,
            &env.path().join(output),
            ds824::mr::job::ShuffleMode::Grpc,
        )
        .unwrap();
        rt.block_on(async {
            let mut c = client::connect(&coord.addr, PLAIN).await?;
            client::submit(&mut c, &spec, false).await
        })
        .unwrap()
    };
    let mut per_task = Vec::new();
    let mut before = (0, 0);
    for (n, output) in [(400, "small"), (INPUTS, "big")] {
        let id = submit(&inputs[..n], output);
        let mut workers: Vec<Child> = (0..2)
            .map(|i| spawn_worker(env.path(), &coord.addr, 100 * n + i, &[]))
            .collect();
        let status = wait_job(&env, &coord.addr, id);
        wait_all(&mut workers);
        assert_eq!(status.maps as usize, n);
        let mut expected: Vec<String> = (0..97usize)
            .map(|k| format!("{} {}", word(k), (0..n).filter(|i| i % 97 == k).count()))
            .collect();
        expected.push(format!("common {n}"));
        expected.sort();
        assert_eq!(env.output(output), expected);
        let after = task_bytes_and_attempts(&metrics);
        let (bytes, tasks) = (after.0 - before.0, after.1 - before.1);
        assert!(tasks >= n as u64 + 2, "{tasks} attempts for {n} maps");
        per_task.push(bytes as f64 / tasks as f64);
        println!(
            "{n} inputs: {bytes} bytes of task messages for {tasks} task attempts: {:.0} bytes per task",
            per_task[per_task.len() - 1]
        );
        before = after;
    }
    // A hundred times the tasks, and a task costs the same (it carried every input path before).
    assert!(
        per_task[1] <= per_task[0] * 1.25,
        "bytes per task grew with the job: {per_task:?}"
    );
}

/// The reduce tasks of `status` running on the worker process `pid`.
fn running_on(status: &pb::JobStatus, pid: u32) -> Vec<u32> {
    let prefix = format!("w{pid}-");
    status
        .tasks
        .iter()
        .filter(|t| {
            t.kind == pb::TaskKind::Reduce as i32
                && t.state == "running"
                && t.worker.starts_with(&prefix)
        })
        .map(|t| t.index)
        .collect()
}

/// Issue #17: a reducer of job 1 paused (SIGSTOP) past its timeout, resumed (SIGCONT) after job 2 has
/// written the same directory with --overwrite, must not put its output there. It is caught before it
/// wrote anything (fetching from a mapper that is itself stopped), so removing staged files cannot save
/// the day: it asks to commit, is refused (job 1 is over) and removes what it staged. Without the
/// commit step it renamed its count of job 1's inputs over job 2's.
#[test]
fn a_paused_straggler_of_a_finished_job_cannot_change_the_next_jobs_output() {
    let env = Env::new();
    let expected = env.sequential("wc", &[]);
    let coord = env.coordinator("127.0.0.1:0", "3s");
    let out = env.path().join("out");
    let submit = |inputs: &[PathBuf], shuffle: &str, overwrite: bool| -> u64 {
        let mut cmd = mrd();
        cmd.args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
            .args(["--reduces", "10", "--shuffle", shuffle, "--output"])
            .arg(&out)
            .args(inputs);
        if overwrite {
            cmd.arg("--overwrite");
        }
        let submitted = cmd.output().unwrap();
        assert_succeeded(&submitted);
        String::from_utf8_lossy(&submitted.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    // Job 1 counts half the books, so its outputs differ from job 2's.
    let first = submit(&env.inputs[..4], "grpc", false);
    // The mapper serves job 1's outputs and stays up (no --exit-when-idle).
    let mut mapper = mrd()
        .args([
            "worker",
            "--only",
            "map",
            "--coordinator",
            &coord.addr,
            "--dir",
        ])
        .arg(env.path().join("workers/mapper"))
        .current_dir(env.path())
        .stdout(Stdio::null())
        .stderr(env.log("worker-mapper"))
        .spawn()
        .unwrap();
    wait_until(&env, &coord.addr, first, "job 1's maps", |s| {
        s.maps_done == s.maps
    });
    // With the mapper stopped, the straggler's reduce waits in its first fetch: nothing staged yet.
    signal(mapper.id(), "-STOP");
    let mut straggler = spawn_worker(env.path(), &coord.addr, 1, &["--only", "reduce"]);
    let pid = straggler.id();
    let held = running_on(
        &wait_until(&env, &coord.addr, first, "a reduce on the straggler", |s| {
            !running_on(s, pid).is_empty()
        }),
        pid,
    );
    signal(pid, "-STOP");
    signal(mapper.id(), "-CONT");
    // Another worker finishes job 1, taking over the straggler's task after its timeout.
    let mut helper = spawn_worker(env.path(), &coord.addr, 2, &[]);
    wait_job(&env, &coord.addr, first);
    assert!(wait_exit(&mut helper).success());
    // Job 2 writes the same directory; the mapper, stopped, takes no part (and keeps job 1's outputs).
    signal(mapper.id(), "-STOP");
    let second = submit(&env.inputs, "shared-dir", true);
    let mut helper = spawn_worker(env.path(), &coord.addr, 3, &[]);
    wait_job(&env, &coord.addr, second);
    assert!(wait_exit(&mut helper).success());
    assert_eq!(env.output("out"), expected);
    // Both wake up: the straggler fetches, reduces, stages its output, asks to commit.
    signal(mapper.id(), "-CONT");
    signal(pid, "-CONT");
    assert!(wait_exit(&mut straggler).success());
    let _ = mapper.kill();
    let _ = mapper.wait();
    assert_eq!(env.output("out"), expected, "job 2's output changed");
    let log = std::fs::read_to_string(env.path().join("worker-1.log")).unwrap();
    assert!(
        log.contains("output discarded"),
        "the straggler (reduce {held:?}) was not refused:\n{log}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staged files left behind: {leftovers:?}"
    );
}

/// Peak resident memory (VmHWM) of a live process, in bytes; 0 once it is gone.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The id `mrd submit` printed, after checking it succeeded.
fn submitted_id(submitted: &std::process::Output) -> u64 {
    assert_succeeded(submitted);
    String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// `n` workers whose peak memory is watched.
fn watched_workers(env: &Env, coordinator: &str, n: usize) -> (Vec<Child>, PeakWatch) {
    let workers: Vec<Child> = (0..n)
        .map(|n| spawn_worker(env.path(), coordinator, n, &[]))
        .collect();
    let watch = PeakWatch::start(&workers);
    (workers, watch)
}

/// The peak resident memory of running processes. Workers exit when idle, taking their high-water
/// mark with them, so it is read every 20 ms while they run.
struct PeakWatch {
    watching: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl PeakWatch {
    fn start(children: &[Child]) -> Self {
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let watching = Arc::new(AtomicBool::new(true));
        let thread = {
            let watching = watching.clone();
            std::thread::spawn(move || {
                let mut peak = vec![0u64; pids.len()];
                while watching.load(Ordering::Relaxed) {
                    for (seen, pid) in peak.iter_mut().zip(&pids) {
                        *seen = (*seen).max(peak_rss(*pid));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            })
        };
        PeakWatch { watching, thread }
    }

    /// Each process's peak, in the order they were given.
    fn stop(self) -> Vec<u64> {
        self.watching.store(false, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Issue #17: the shuffle streams. A grep that matches every line of 32 files of 4 MiB sends every line,
/// keyed by its file and number, to the one reducer: a partition of about twice the input. The reducer
/// fetches the map outputs to disk and merges them a record at a time, so no worker holds more than
/// 96 MiB; before, a reducer decoded its whole partition into memory to sort it.
#[test]
fn a_reducer_streams_a_partition_far_bigger_than_its_memory() {
    let env = Env::new();
    let inputs = corpus::write_zipf_corpus(&env.path().join("in"), 32, 4 << 20, 5).unwrap();
    let lines: usize = inputs
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum();
    let coord = env.coordinator("127.0.0.1:0", "60s");
    let output = env.path().join("out");
    let submitted = mrd()
        .args(["submit", "--coordinator", &coord.addr, "--app", "grep"])
        .args(["--arg", "pattern=^", "--reduces", "1", "--shuffle", "grpc"])
        .arg("--output")
        .arg(&output)
        .args(&inputs)
        .output()
        .unwrap();
    let id = submitted_id(&submitted);
    let (mut workers, watch) = watched_workers(&env, &coord.addr, 2);
    wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    let peaks = watch.stop();
    let reduced = std::fs::metadata(output.join("mr-out-0")).unwrap().len();
    println!(
        "{lines} lines; one partition of {} MiB reduced; worker peak RSS {:?} MiB",
        reduced >> 20,
        peaks.iter().map(|p| p >> 20).collect::<Vec<_>>()
    );
    assert!(reduced > 160 << 20, "the partition is only {reduced} bytes");
    let out = std::fs::read_to_string(output.join("mr-out-0")).unwrap();
    assert_eq!(out.lines().count(), lines, "a line was lost or repeated");
    assert!(out.lines().is_sorted(), "the output is not in key order");
    for peak in peaks {
        assert!(
            peak > 0 && peak < 96 << 20,
            "a worker peaked at {} MiB",
            peak >> 20
        );
    }
}

/// Issue #17: one 2 GiB file is cut into at least 32 map tasks (the default 64 MiB splits, on line
/// boundaries), counted right, and no worker holds more than 256 MiB while reading it (maps stream
/// their split a chunk at a time). The file is one generated 64 MiB block written 32 times, so every
/// count is 32 times the block's, which `mrd sequential` computes cheaply.
#[test]
fn a_two_gib_file_is_split_into_many_maps_and_counted_in_bounded_memory() {
    let env = Env::new();
    let block_dir = env.path().join("block");
    std::fs::create_dir_all(&block_dir).unwrap();
    let mut block =
        std::fs::read(&corpus::write_zipf_corpus(&block_dir, 1, 64 << 20, 17).unwrap()[0]).unwrap();
    block.push(b'\n');
    let seq_out = env.path().join("seq-block");
    let status = mrd()
        .args(["sequential", "--app", "wc", "--output"])
        .arg(&seq_out)
        .arg(block_dir.join("pg-being_ernest.txt"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut expected: Vec<String> = sorted_lines(&seq_out)
        .iter()
        .map(|line| {
            let (word, count) = line.rsplit_once(' ').unwrap();
            format!("{word} {}", 32 * count.parse::<u64>().unwrap())
        })
        .collect();
    expected.sort();
    let big = env.path().join("big.txt");
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        for _ in 0..32 {
            file.write_all(&block).unwrap();
        }
        file.flush().unwrap();
    }
    assert!(std::fs::metadata(&big).unwrap().len() >= 2 << 30);
    let coord = env.coordinator("127.0.0.1:0", "60s");
    let submitted = mrd()
        .args([
            "submit",
            "--coordinator",
            &coord.addr,
            "--app",
            "wc",
            "--reduces",
            "4",
        ])
        .args(["--shuffle", "grpc", "--output"])
        .arg(env.path().join("out"))
        .arg(&big)
        .output()
        .unwrap();
    let id = submitted_id(&submitted);
    let (mut workers, watch) = watched_workers(&env, &coord.addr, 2);
    let status = wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    let peaks = watch.stop();
    println!(
        "2 GiB in {} map tasks; worker peak RSS {:?} MiB",
        status.maps,
        peaks.iter().map(|p| p >> 20).collect::<Vec<_>>()
    );
    assert!(status.maps >= 32, "only {} map tasks", status.maps);
    assert_eq!(env.output("out"), expected);
    for peak in peaks {
        assert!(
            peak > 0 && peak < 256 << 20,
            "a worker peaked at {} MiB",
            peak >> 20
        );
    }
}

/// A worker that asks while the last map runs is held until a task exists, not told to come back
/// later: the reduce reaches it the moment the map reports (the hold replaces polling, which cost a
/// poll interval at every phase change). With a told-to-wait reply this gets `Wait`.
#[test]
fn a_worker_waiting_for_reduces_gets_one_as_soon_as_the_last_map_reports() {
    let env = Env::new();
    let coord = env.coordinator("127.0.0.1:0", "60s");
    let input = env.path().join("one.txt");
    std::fs::write(&input, "a b a\n").unwrap();
    let submitted = mrd()
        .args(["submit", "--coordinator", &coord.addr, "--app", "wc"])
        .args(["--reduces", "1", "--shuffle", "shared-dir", "--output"])
        .arg(env.path().join("out"))
        .arg(&input)
        .output()
        .unwrap();
    let job = submitted_id(&submitted);
    let ask = |worker: &str| pb::TaskRequest {
        worker_id: worker.into(),
        accept_map: true,
        accept_reduce: true,
        ..Default::default()
    };
    let reply = runtime().block_on(async {
        let mut mapper = client::connect(&coord.addr, PLAIN).await.unwrap();
        let map = mapper
            .request_task(ask("mapper"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(map.action, pb::Action::Run as i32);
        assert_eq!(map.kind, pb::TaskKind::Map as i32);
        let mut reducer = client::connect(&coord.addr, PLAIN).await.unwrap();
        let waiting = tokio::spawn(async move {
            reducer
                .request_task(ask("reducer"))
                .await
                .map(|r| r.into_inner())
        });
        // Let the second request reach the coordinator while the map still runs.
        tokio::time::sleep(Duration::from_millis(100)).await;
        mapper
            .report_task(pb::TaskReport {
                worker_id: "mapper".into(),
                job_id: job,
                kind: pb::TaskKind::Map as i32,
                index: map.index,
                attempt: map.attempt,
                outcome: pb::Outcome::Succeeded as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        waiting.await.unwrap().unwrap()
    });
    assert_eq!(reply.action, pb::Action::Run as i32, "{reply:?}");
    assert_eq!(reply.kind, pb::TaskKind::Reduce as i32, "{reply:?}");
}

#[test]
fn a_task_slower_than_the_task_timeout_still_finishes() {
    // The one reduce task takes 1.5 task timeouts, and idle workers take it over at each deadline.
    // When only the latest hand-out was heard, every attempt's success came after the next hand-out
    // and the job failed at the fourth; now the first attempt to succeed completes it.
    let mut env = Env::new();
    let expected = env.sequential("nocrash", &[]);
    let coord = env.coordinator_with("127.0.0.1:0", "1s", &["--allow-apps", "crash"]);
    let args = [
        "crash_permille=0",
        "sleep_permille=0",
        "slow_reduce_ms=1500",
    ];
    let id = env.submit(&coord.addr, "crash", &args, 1, "shared-dir", "out");
    let mut workers: Vec<Child> = (0..4).map(|_| env.worker(&coord.addr, &[])).collect();
    let status = wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    assert_eq!(env.output("out"), expected, "\n{}", env.logs());
    let reduce_runs = runs(&status, pb::TaskKind::Reduce);
    assert!(
        reduce_runs.iter().all(|&runs| runs >= 2),
        "the reduce was not taken over, so nothing was tested: runs {reduce_runs:?}\n{}",
        env.logs()
    );
}

#[test]
fn grpc_shuffle_survives_a_paused_mapper() {
    // A paused process's kernel still accepts connections and bytes, so only the reducer's pings
    // notice it: its fetches must give up, and the maps run again elsewhere, well within the reduce's
    // task timeout (waiting out the fetch's 30 s idle limit three times, the job failed).
    let mut env = Env::new();
    let expected = env.sequential("wc", &[]);
    // Two hand-outs per task, one reduce and idle workers to take it over: a reducer stuck on the
    // mapper past its timeout makes the job fail.
    let coord = env.coordinator_with("127.0.0.1:0", "15s", &["--max-attempts", "2"]);
    let id = env.submit(&coord.addr, "wc", &[], 1, "grpc", "out");
    let mut mapper = env.worker(&coord.addr, &["--only", "map"]);
    wait_until(&env, &coord.addr, id, "all maps", |job| job.maps_done == 8);
    signal(mapper.id(), "-STOP");
    let mut workers: Vec<Child> = (0..3).map(|_| env.worker(&coord.addr, &[])).collect();
    let status = wait_job(&env, &coord.addr, id);
    wait_all(&mut workers);
    signal(mapper.id(), "-CONT");
    mapper.kill().unwrap();
    mapper.wait().unwrap();
    assert_eq!(env.output("out"), expected);
    let reduce_runs = runs(&status, pb::TaskKind::Reduce);
    assert!(
        reduce_runs.iter().all(|&runs| runs <= 2),
        "a reduce was handed out again and again while the mapper was paused: runs {reduce_runs:?}"
    );
}

#[test]
fn a_reader_that_went_away_ends_mrd_quietly_and_output_lost_otherwise_is_exit_2() {
    // `mrd apps | head -0`: the pipe's reader is gone before mrd starts.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = mrd().arg("apps").stdout(writer).output().expect("run mrd");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    // `mrd apps > /dev/full`: the list is lost, so the command did not succeed.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = mrd().arg("apps").stdout(full).output().expect("run mrd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mrd: error: cannot write the output"),
        "{out:?}"
    );
}
