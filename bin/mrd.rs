//! `mrd`: the MapReduce daemons and their command-line client. All logic lives in `ds824::mr`; this file
//! only parses flags, sets up logging and turns errors into one line and a non-zero exit status: 2 for
//! what the operator must fix first (a flag, a certificate, a refused identity or handshake), 1 for
//! anything else.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ds824::mr::app::AppPolicy;
use ds824::mr::job::{Admission, JobSpec, ShuffleMode};
use ds824::mr::roots::DataRoots;
use ds824::mr::{app, client, coordinator_service, sequential, worker, MrError};
use ds824::proto::mr as pb;
use ds824::security::{Role, Security, SecurityError, TlsArgs};

/// The default coordinator address, so a single-machine setup needs no flags.
const DEFAULT_COORDINATOR: &str = "127.0.0.1:7824";

/// MapReduce coordinator, worker and client (MIT 6.824 lab 1 as daemons).
///
/// Security: coordinator, worker, submit and status speak mutual TLS. Give the cluster CA and a
/// certificate with --tls-ca, --tls-cert, --tls-key (or DS824_TLS_CA, DS824_TLS_CERT, DS824_TLS_KEY;
/// `kvctl certs issue` makes them): the coordinator needs a "coordinator" certificate, workers a
/// "worker" one; submitting needs "admin", status "client" or "admin". --insecure runs plaintext without
/// identities, for local development only.
///
/// Exit status: 0 on success; 2 if the command cannot succeed until something is fixed (a flag, a
/// certificate, a refused identity or TLS handshake, output that could not be written: one line on
/// stderr says which); 1 otherwise. A reader that stops reading (`mrd status | head`) cuts the output
/// short, not the command.
#[derive(Parser)]
#[command(name = "mrd", version)]
struct Cli {
    #[command(flatten)]
    logs: ds824::daemon::LogArgs,
    #[command(flatten)]
    runtime: ds824::daemon::RuntimeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: queues jobs, hands tasks to workers, persists progress so a restart resumes.
    ///
    /// Jobs run with the workers' permissions, so the coordinator admits a job only if its inputs and
    /// output directory lie under a --data-root (after resolving `..` and symbolic links), its output
    /// directory is new or empty, and its app is a built-in one (wc, indexer, grep) or named in
    /// --allow-apps.
    ///
    /// Example: mrd coordinator --listen 0.0.0.0:7824 --data-dir /var/lib/mrd --data-root /srv/mr
    ///   --tls-ca certs/ca.pem --tls-cert certs/coordinator-1.pem --tls-key certs/coordinator-1-key.pem
    Coordinator {
        /// Address to serve gRPC on (port 0 picks a free port; the bound address is printed on stdout).
        #[arg(long, env = "MRD_LISTEN", default_value = DEFAULT_COORDINATOR)]
        listen: SocketAddr,
        /// Directory for the durable job state (sled); restart with the same directory to resume.
        #[arg(long, env = "MRD_DATA_DIR")]
        data_dir: PathBuf,
        /// How long a worker may take on a task before it is handed to another worker (e.g. 10s, 500ms).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        task_timeout: Duration,
        /// Hand a task out at most this many times (a worker that dies on it, or times out, uses one);
        /// then its job fails with a message and the next queued job runs. As Hadoop's default.
        #[arg(long, default_value_t = ds824::mr::coordinator::DEFAULT_MAX_ATTEMPTS,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_attempts: u32,
        /// Keep this many finished jobs (done or failed), the newest, for `mrd status`; older ones are
        /// forgotten, in memory and on disk. Their outputs stay where they were written. At most
        /// 10000 (a status reply lists every job kept).
        #[arg(long, default_value_t = ds824::mr::coordinator::DEFAULT_KEEP_FINISHED_JOBS,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
                  .range(1..=ds824::mr::coordinator::MAX_KEEP_FINISHED_JOBS as u64))]
        keep_jobs: usize,
        /// Take at most this many jobs queued or running at once; a submit beyond it is refused
        /// (RESOURCE_EXHAUSTED) until some finish. Also refused: a job that would bring the tasks of
        /// all queued and running jobs past 4,000,000.
        #[arg(long, default_value_t = ds824::mr::coordinator::DEFAULT_MAX_QUEUED_JOBS,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_queued_jobs: usize,
        /// Serve Prometheus metrics (jobs, tasks by kind and state, attempts, failures) at
        /// http://<this address>/metrics.
        #[arg(long, env = "MRD_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Directory jobs may read inputs from and write outputs to (repeatable, or comma-separated);
        /// required. Use the directory every worker mounts; anything outside it is refused at submit.
        #[arg(
            long = "data-root",
            env = "MRD_DATA_ROOT",
            value_name = "DIR",
            value_delimiter = ',',
            required = true
        )]
        data_roots: Vec<PathBuf>,
        /// Restricted apps to accept, comma-separated: `streaming` (runs any shell command on every
        /// worker) and the 6.824 test apps (crash, nocrash, early_exit, jobcount, mtiming, rtiming:
        /// they kill, stall or write into the workers' working directory). Refused unless listed.
        #[arg(long, value_name = "APP,...", value_delimiter = ',')]
        allow_apps: Vec<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Run a worker: pulls tasks from the coordinator and runs them, serving its map outputs over gRPC.
    ///
    /// Needs a "worker" certificate: the coordinator hands tasks, and other workers' shuffle servers
    /// hand map outputs, only to workers.
    ///
    /// Example: mrd worker --coordinator mr-coordinator:7824 --dir /var/lib/mrd-worker
    ///   --tls-ca certs/ca.pem --tls-cert certs/worker-1.pem --tls-key certs/worker-1-key.pem
    Worker {
        /// Coordinator address, host:port.
        #[arg(long, env = "MRD_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
        coordinator: String,
        /// Private directory where this worker keeps the map outputs it serves in the gRPC shuffle.
        #[arg(long)]
        dir: PathBuf,
        /// Exit once the coordinator has no queued or running job (or stays unreachable), instead of
        /// polling forever.
        #[arg(long)]
        exit_when_idle: bool,
        /// With --exit-when-idle: how long the coordinator may be unreachable before the worker exits.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        give_up_after: Duration,
        /// Address to serve map outputs on for the gRPC shuffle (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        shuffle_listen: SocketAddr,
        /// Address other workers should fetch map outputs from, if not the bound --shuffle-listen address
        /// (e.g. behind NAT or when listening on 0.0.0.0).
        #[arg(long)]
        advertise: Option<String>,
        /// Which tasks to take: dedicated mapper or reducer pools, or both.
        #[arg(long, value_enum, default_value_t = Only::All)]
        only: Only,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Submit a job and print its id (with --wait, follow it to the end with a progress bar).
    ///
    /// Needs an "admin" certificate. The coordinator refuses inputs or an output directory outside its
    /// --data-root, an existing non-empty output directory, and apps it was not started to allow.
    Submit {
        /// Coordinator address, host:port.
        #[arg(long, env = "MRD_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
        coordinator: String,
        #[command(flatten)]
        job: JobArgs,
        /// Number of reduce tasks, i.e. of output files mr-out-0 .. mr-out-(N-1).
        #[arg(long, default_value_t = 10)]
        reduces: u32,
        /// Directory for the outputs (and, with the shared-dir shuffle, the intermediate files).
        #[arg(long)]
        output: PathBuf,
        /// How map outputs reach reducers: a directory all workers share, or fetched from mappers over gRPC.
        #[arg(long, value_enum, default_value_t = Shuffle::SharedDir)]
        shuffle: Shuffle,
        /// Wait for the job to finish, showing progress; exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// Accept an --output directory that holds an earlier job's outputs (mr-out-*, intermediates)
        /// and remove them first, so none is taken for part of this job's output. Anything else in
        /// the directory is still refused. Without it the directory must be new or empty.
        #[arg(long)]
        overwrite: bool,
        /// Bytes of input per map task (e.g. 64MiB, 1GiB, 4096): each input file is cut into map tasks
        /// of this size on line boundaries, so one big file is read by many workers at once.
        #[arg(long, default_value = "64MiB", value_parser = parse_split_size)]
        split_size: u64,
        /// Input files; each is one or more map tasks (see --split-size).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Show every job with its progress and a one-character-per-task map (`#` done, `r` running, `.`
    /// waiting), or with --job one line per task. Needs a "client" or "admin" certificate.
    Status {
        /// Coordinator address, host:port.
        #[arg(long, env = "MRD_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
        coordinator: String,
        /// Only this job, with one line per task.
        #[arg(long)]
        job: Option<u64>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Run a job in this process, writing mr-out-0 into --output (the reference distributed runs must match).
    Sequential {
        #[command(flatten)]
        job: JobArgs,
        /// Directory for mr-out-0.
        #[arg(long, default_value = ".")]
        output: PathBuf,
        /// Input files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the apps jobs can use, and the test-only apps.
    Apps,
    /// Write a deterministic Zipf-distributed text corpus (test and benchmark inputs).
    GenCorpus {
        /// Directory to write pg-*.txt into.
        #[arg(long)]
        dir: PathBuf,
        /// Number of files.
        #[arg(long, default_value_t = 8)]
        files: usize,
        /// Approximate size of each file in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        bytes_per_file: usize,
        /// Seed; the same seed always gives the same corpus.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct JobArgs {
    /// App to run (see `mrd apps`).
    #[arg(long)]
    app: String,
    /// App argument as key=value (repeatable), e.g. --arg pattern=foo for grep, or --arg mapper=CMD
    /// --arg reducer=CMD for streaming.
    #[arg(long = "arg")]
    args: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shuffle {
    SharedDir,
    Grpc,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    All,
    Map,
    Reduce,
}

/// Parses `--split-size`: bytes, or with a unit (`64MiB`, `1g`, ...).
fn parse_split_size(raw: &str) -> Result<u64, String> {
    ds824::kvctl::check::parse_size(raw).map(|bytes| bytes as u64)
}

/// Parses `10s`, `500ms`, `2m` or a bare number of seconds.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration like 10s or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{raw}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{raw}`: {err}"))
}

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Done) => "done",
        Ok(pb::JobState::Failed) => "failed",
        Err(_) => "unknown",
    }
}

/// Renders one job's status into `out`, for `mrd status`.
fn print_job(out: &mut impl std::fmt::Write, job: &pb::JobStatus, tasks: bool) -> std::fmt::Result {
    let spec = job.spec.clone().unwrap_or_default();
    writeln!(
        out,
        "job {} [{}] app={} inputs={} maps {}/{} reduces {}/{} shuffle={} output={}",
        job.id,
        state_name(job.state),
        spec.app,
        job.inputs,
        job.maps_done,
        job.maps,
        job.reduces_done,
        spec.n_reduce,
        if spec.shuffle == pb::ShuffleMode::Grpc as i32 {
            "grpc"
        } else {
            "shared-dir"
        },
        spec.output_dir,
    )?;
    if !job.error.is_empty() {
        writeln!(out, "  error: {}", job.error)?;
    }
    if !tasks {
        // One character per task: `#` done, `r` running, `.` waiting.
        for (kind, name) in [
            (pb::TaskKind::Map, "maps"),
            (pb::TaskKind::Reduce, "reduces"),
        ] {
            let line: String = job
                .tasks
                .iter()
                .filter(|t| t.kind == kind as i32)
                .map(|t| match t.state.as_str() {
                    "done" => '#',
                    "running" => 'r',
                    _ => '.',
                })
                .collect();
            writeln!(out, "  {name:<8}{line}")?;
        }
        if job.tasks_truncated {
            writeln!(out, "  (only the first {} tasks shown)", job.tasks.len())?;
        }
    } else {
        for task in &job.tasks {
            let kind = if task.kind == pb::TaskKind::Map as i32 {
                "map"
            } else {
                "reduce"
            };
            writeln!(
                out,
                "  {kind:<6} {:>5} {:<8} runs={} {}",
                task.index, task.state, task.runs, task.worker
            )?;
        }
    }
    Ok(())
}

/// Stops the metrics server when the coordinator stops.
struct AbortOnDrop(tokio::task::JoinHandle<std::io::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_metrics(
    addr: SocketAddr,
    service: Arc<coordinator_service::CoordinatorService>,
) -> anyhow::Result<AbortOnDrop> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let registry = prometheus::Registry::new();
    let gauges = ds824::mr::metrics::MrGauges::register(&registry)?;
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || service.refresh_metrics(&gauges));
    Ok(AbortOnDrop(tokio::spawn(ds824::metrics::serve(
        listener, registry, refresh,
    ))))
}

/// A problem the operator must fix before the command can succeed (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MustFix(String);

/// 2 for errors no retry fixes (see [`MustFix`], TLS set-up, refused identities), 1 otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    let must_fix = err.chain().any(|cause| {
        cause.is::<MustFix>()
            || cause.is::<SecurityError>()
            || cause
                .downcast_ref::<MrError>()
                .is_some_and(MrError::is_refusal)
    });
    if must_fix {
        2
    } else {
        1
    }
}

/// The security `tls` asks for, with a certificate of `role` if the process serves as one.
fn security(tls: &TlsArgs, role: Option<Role>) -> anyhow::Result<Security> {
    let security = tls.security()?;
    if let Some(role) = role {
        security.expect_role(&role)?;
    }
    Ok(security)
}

/// Plaintext against a TLS port fails as an HTTP/2 protocol error or a cancelled call; if the
/// coordinator at `addr` speaks TLS, say so and make it a [`MustFix`] (no retry helps).
async fn explain_plaintext(security: &Security, addr: &str, err: MrError) -> anyhow::Error {
    let transport = matches!(&err, MrError::Rpc(_) | MrError::Connect { .. });
    if transport
        && !security.is_tls()
        && ds824::security::requires_tls(addr, Duration::from_secs(2)).await
    {
        return MustFix(format!(
            "{err}: the coordinator at {addr} requires TLS, and this mrd runs with --insecure; \
             pass --tls-ca, --tls-cert and --tls-key"
        ))
        .into();
    }
    err.into()
}

/// What the coordinator admits, from its flags.
fn admission(data_roots: &[PathBuf], allow_apps: &[String]) -> anyhow::Result<Admission> {
    let roots = DataRoots::new(data_roots).map_err(|err| MustFix(err.to_string()))?;
    let apps = AppPolicy::new(allow_apps).map_err(|err| MustFix(format!("--allow-apps: {err}")))?;
    Ok(Admission { apps, roots })
}

async fn run_coordinator(
    listen: SocketAddr,
    data_dir: PathBuf,
    policy: coordinator_service::Policy,
    metrics_listen: Option<SocketAddr>,
    admission: Admission,
    security: Security,
) -> anyhow::Result<()> {
    if policy.task_timeout.is_zero() {
        return Err(MustFix(
            "--task-timeout must be positive: every task would be handed out over and over".into(),
        )
        .into());
    }
    let roots: Vec<String> = admission
        .roots
        .roots()
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    let service = Arc::new(coordinator_service::CoordinatorService::open(
        &data_dir,
        policy,
        admission,
        security.guard(),
    )?);
    let _metrics = match metrics_listen {
        Some(addr) => Some(serve_metrics(addr, service.clone()).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| MustFix(format!("cannot listen on {listen}: {err}")))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    security.log_startup("mrd coordinator");
    tracing::info!(data_roots = %roots.join(","), "jobs may read and write only under these roots");
    // Tests and scripts read this line to learn the port when --listen asked for port 0. A stdout
    // that cannot take it is no failure of the coordinator's (the address is logged too), so this
    // line does not go through the commands' writer, which would fail the exit status at shutdown.
    {
        let mut out = std::io::stdout().lock();
        if let Err(e) =
            writeln!(out, "mrd coordinator listening on {bound}").and_then(|()| out.flush())
        {
            tracing::warn!(error = %e, "cannot print the bound address on stdout");
        }
    }
    coordinator_service::serve(
        listener,
        service,
        &security,
        ds824::daemon::shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let log_format = cli.logs.log_format;
    match cli.command {
        Command::Coordinator {
            listen,
            data_dir,
            task_timeout,
            max_attempts,
            keep_jobs,
            max_queued_jobs,
            metrics_listen,
            data_roots,
            allow_apps,
            tls,
        } => {
            ds824::daemon::init_logging_as("info", log_format);
            let security = security(&tls, Some(Role::Coordinator))?;
            let admission = admission(&data_roots, &allow_apps)?;
            let policy = coordinator_service::Policy {
                task_timeout,
                max_attempts,
                keep_finished: keep_jobs,
                max_queued_jobs,
                max_pending_tasks: ds824::mr::coordinator::MAX_PENDING_TASKS,
            };
            run_coordinator(
                listen,
                data_dir,
                policy,
                metrics_listen,
                admission,
                security,
            )
            .await?;
        }
        Command::Worker {
            coordinator,
            dir,
            exit_when_idle,
            give_up_after,
            shuffle_listen,
            advertise,
            only,
            tls,
        } => {
            ds824::daemon::init_logging_as("info", log_format);
            let security = security(&tls, Some(Role::Worker))?;
            security.log_startup("mrd worker");
            worker::run(worker::WorkerConfig {
                coordinator,
                dir,
                exit_when_idle,
                unreachable_timeout: give_up_after,
                shuffle_listen,
                advertise,
                accept_map: only != Only::Reduce,
                accept_reduce: only != Only::Map,
                security,
            })
            .await?;
        }
        Command::Submit {
            coordinator,
            job,
            reduces,
            output,
            shuffle,
            wait,
            overwrite,
            split_size,
            files,
            tls,
        } => {
            ds824::daemon::init_logging_as("warn", log_format);
            let security = security(&tls, None)?;
            let shuffle = match shuffle {
                Shuffle::SharedDir => ShuffleMode::SharedDir,
                Shuffle::Grpc => ShuffleMode::Grpc,
            };
            let spec = JobSpec::prepare(&job.app, &job.args, &files, reduces, &output, shuffle)?
                .with_split_size(split_size);
            let submitted = async {
                let mut client = client::connect(&coordinator, &security).await?;
                client::submit(&mut client, &spec, overwrite).await
            };
            let id = match submitted.await {
                Ok(id) => id,
                Err(err) => return Err(explain_plaintext(&security, &coordinator, err).await),
            };
            ds824::outln!("{id}");
            let started = std::time::Instant::now();
            if wait {
                // The length is known once the coordinator has cut the inputs into splits.
                let bar = indicatif::ProgressBar::new(u64::from(spec.n_reduce));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} job {msg} [{bar:40}] {pos}/{len} tasks {elapsed}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                let last = client::wait(
                    &coordinator,
                    &security,
                    id,
                    Duration::from_secs(60),
                    |status| {
                        bar.set_length(u64::from(status.maps + spec.n_reduce));
                        bar.set_position(u64::from(status.maps_done + status.reduces_done));
                        bar.set_message(format!("{id} {}", state_name(status.state)));
                    },
                )
                .await?;
                bar.finish_and_clear();
                // One last line, whatever stdout is (a terminal, a file, a pipe): how it ended.
                let took = started.elapsed().as_secs_f64();
                if last.state == pb::JobState::Failed as i32 {
                    bail!("job {id} failed after {took:.1} s: {}", last.error);
                }
                ds824::outln!(
                    "job {id} done in {took:.1} s: {} maps, {} reduces; output {}/mr-out-0..{}",
                    last.maps_done,
                    last.reduces_done,
                    output.display(),
                    spec.n_reduce.saturating_sub(1)
                );
            }
        }
        Command::Status {
            coordinator,
            job,
            tls,
        } => {
            ds824::daemon::init_logging_as("warn", log_format);
            let security = security(&tls, None)?;
            let listed = async {
                let mut client = client::connect(&coordinator, &security).await?;
                client::status_reply(&mut client, job, true).await
            };
            let reply = match listed.await {
                Ok(reply) => reply,
                Err(err) => return Err(explain_plaintext(&security, &coordinator, err).await),
            };
            if reply.jobs.is_empty() {
                ds824::outln!("no jobs");
            }
            if reply.omitted_jobs > 0 {
                ds824::outln!(
                    "({} older jobs not shown, to keep the reply small: ask for one with --job)",
                    reply.omitted_jobs
                );
            }
            for status in &reply.jobs {
                let mut text = String::new();
                print_job(&mut text, status, job.is_some()).context("rendering the status")?;
                ds824::out!("{text}");
            }
        }
        Command::Sequential { job, output, files } => {
            ds824::daemon::init_logging_as("warn", log_format);
            let path = sequential::run(&job.app, &job.args, &files, &output)?;
            ds824::outln!("{}", path.display());
        }
        Command::GenCorpus {
            dir,
            files,
            bytes_per_file,
            seed,
        } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for path in ds824::mr::corpus::write_zipf_corpus(&dir, files, bytes_per_file, seed)? {
                ds824::outln!("{}", path.display());
            }
        }
        Command::Apps => {
            for testing in [false, true] {
                ds824::outln!(
                    "{}",
                    if testing {
                        "\ntest apps (they crash, sleep or leave marker files on purpose):"
                    } else {
                        "apps:"
                    }
                );
                for info in app::registry()
                    .iter()
                    .filter(|info| info.for_testing == testing)
                {
                    ds824::outln!("  {:<11} {}", info.name, info.summary);
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match ds824::daemon::runtime_with("mrd", &cli.runtime) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(err) => {
            ds824::errln!("mrd: {err:#}");
            exit_code(&err)
        }
    };
    // Output that could not be written (a full disk) is the operator's to fix.
    ExitCode::from(ds824::daemon::exit_status("mrd", code, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
