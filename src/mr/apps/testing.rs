//! Ports of the 6.824 test apps (`src/mrapps/*.go`), used by the integration tests.
//!
//! They crash, sleep and leave marker files in the worker's working directory on purpose: they exist to
//! prove the coordinator and workers survive crashes, run tasks in parallel and do not re-run tasks
//! needlessly. `mrd apps` lists them separately; do not use them for real work.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::mr::app::{App, AppError, Args, Emit};

/// `crash.go` / `nocrash.go`: every map and reduce call exits the process with probability
/// `crash_permille`/1000, else sleeps a random time below `max_sleep_ms` with probability
/// `sleep_permille`/1000 (both 330 by default, like the Go app). `slow_reduce_ms` (default 0) makes each
/// reduce task take at least that long (its first call sleeps it), for a task slower than the timeout.
pub struct Crash {
    crash: bool,
    crash_permille: u64,
    sleep_permille: u64,
    max_sleep_ms: u64,
    slow_reduce_ms: u64,
    /// Whether this task's slow reduce call happened (an app is built per task).
    slowed: std::sync::atomic::AtomicBool,
}

impl Crash {
    /// `crash` is false for `nocrash`, the reference run, which ignores both knobs.
    pub fn new(args: &mut Args<'_>, crash: bool) -> Result<Self, AppError> {
        Ok(Self {
            crash,
            crash_permille: args.number("crash_permille", 330)?.min(1000),
            sleep_permille: args.number("sleep_permille", 330)?.min(1000),
            max_sleep_ms: args.number("max_sleep_ms", 10_000)?,
            slow_reduce_ms: args.number("slow_reduce_ms", 0)?,
            slowed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn maybe_crash(&self) {
        if !self.crash {
            return;
        }
        let roll = rand::rng().random_range(0..1000);
        if roll < self.crash_permille {
            tracing::warn!("crash app: exiting on purpose");
            std::process::exit(1);
        } else if roll < self.crash_permille + self.sleep_permille && self.max_sleep_ms > 0 {
            let pause = rand::rng().random_range(0..self.max_sleep_ms);
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
}

impl App for Crash {
    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        self.maybe_crash();
        emit("a", filename);
        emit("b", &filename.len().to_string());
        emit("c", &contents.len().to_string());
        emit("d", "xyzzy");
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        if self.crash && self.slow_reduce_ms > 0 && !self.slowed.swap(true, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(self.slow_reduce_ms));
        }
        self.maybe_crash();
        let mut sorted = values.to_vec();
        sorted.sort();
        Ok(sorted.join(" "))
    }
}

/// `early_exit.go`: keys are input files; the reduces of files named like sherlock or tom take 3 s, so a
/// worker that exits before the job is really over gets caught.
pub struct EarlyExit;

impl App for EarlyExit {
    fn map(&self, filename: &str, _contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        emit(filename, "1");
        Ok(())
    }

    fn reduce(&self, key: &str, values: &[String]) -> Result<String, AppError> {
        // Only the file name counts: the directory the tests run in is random and could contain "tom".
        let name = Path::new(key)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(key);
        if name.contains("sherlock") || name.contains("tom") {
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(values.len().to_string())
    }
}

/// Distinguishes the map calls of one worker process, like the Go app's package-level counter.
static JOBCOUNT_CALLS: AtomicU64 = AtomicU64::new(0);

/// `jobcount.go`: each map call leaves a uniquely named marker file and sleeps 2–5 s; the single reduce
/// counts the markers, which equals the number of map executions.
pub struct JobCount {
    min_sleep_ms: u64,
    max_sleep_ms: u64,
}

impl JobCount {
    /// `min_sleep_ms` (2000) and `max_sleep_ms` (5000) bound each map call's sleep.
    pub fn new(args: &mut Args<'_>) -> Result<Self, AppError> {
        let min_sleep_ms = args.number("min_sleep_ms", 2000)?;
        let max_sleep_ms = args.number("max_sleep_ms", 5000)?.max(min_sleep_ms + 1);
        Ok(Self {
            min_sleep_ms,
            max_sleep_ms,
        })
    }
}

impl App for JobCount {
    fn map(&self, _filename: &str, _contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        let call = JOBCOUNT_CALLS.fetch_add(1, Ordering::SeqCst);
        std::fs::write(
            format!("mr-worker-jobcount-{}-{call}", std::process::id()),
            "x",
        )?;
        let pause = rand::rng().random_range(self.min_sleep_ms..self.max_sleep_ms);
        std::thread::sleep(Duration::from_millis(pause));
        emit("a", "x");
        Ok(())
    }

    fn reduce(&self, _key: &str, _values: &[String]) -> Result<String, AppError> {
        let mut invocations = 0;
        for entry in std::fs::read_dir(".")? {
            if entry?
                .file_name()
                .to_string_lossy()
                .starts_with("mr-worker-jobcount")
            {
                invocations += 1;
            }
        }
        Ok(invocations.to_string())
    }
}

/// `mtiming.go` and `rtiming.go`: measure how many workers run the `phase` at the same time.
pub struct Timing {
    /// `map` for mtiming, `reduce` for rtiming: the phase whose overlap is measured.
    pub phase: &'static str,
}

fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

impl Timing {
    /// Announces this process in a marker file, counts the live processes that announced themselves, holds
    /// the marker for a second so overlapping calls see each other, and returns the count.
    fn nparallel(&self) -> Result<usize, AppError> {
        let prefix = format!("mr-worker-{}-", self.phase);
        let mine = format!("{prefix}{}", std::process::id());
        std::fs::write(&mine, "x")?;
        let mut running = 0;
        for entry in std::fs::read_dir(".")? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<u32>().ok())
            {
                if alive(pid) {
                    running += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        std::fs::remove_file(&mine)?;
        Ok(running)
    }
}

impl App for Timing {
    fn map(&self, _filename: &str, _contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        if self.phase == "map" {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let pid = std::process::id();
            let parallel = self.nparallel()?;
            emit(
                &format!("times-{pid}"),
                &format!("{:.1}", now.as_secs_f64()),
            );
            emit(&format!("parallel-{pid}"), &parallel.to_string());
        } else {
            for key in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
                emit(key, "1");
            }
        }
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        if self.phase == "map" {
            let mut sorted = values.to_vec();
            sorted.sort();
            Ok(sorted.join(" "))
        } else {
            Ok(self.nparallel()?.to_string())
        }
    }
}
