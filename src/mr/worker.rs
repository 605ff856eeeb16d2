//! The worker daemon: asks the coordinator for a task, runs it, reports how it went, forever (or until
//! there is nothing left to do, with `exit_when_idle`).
//!
//! A worker holds no state the job depends on except, in the gRPC shuffle, the map outputs it serves; if
//! it dies those are re-created by re-running the map tasks when a reducer misses them. Everything it
//! writes goes through [`write_atomic`], so dying at any instant is safe.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

use crate::mr::coordinator::MapOutput;
use crate::mr::fsutil::{self, Staged};
use crate::mr::job::{intermediate_name, JobSpec, ShuffleMode};
use crate::mr::merge::{MergeOptions, Run};
use crate::mr::shuffle::{self, Fetched, Fetcher};
use crate::mr::{app, exec, records, MrError};
use crate::proto::mr as pb;
use crate::proto::mr::coordinator_client::CoordinatorClient;
use crate::security::Security;

/// How a worker is run; see `mrd worker --help` for what each knob is for.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Coordinator address, `host:port`.
    pub coordinator: String,
    /// Private directory for the map outputs this worker serves in the gRPC shuffle.
    pub dir: PathBuf,
    /// Exit when the coordinator has no job, or has been unreachable for `unreachable_timeout`.
    pub exit_when_idle: bool,
    /// How long an unreachable coordinator is waited for before `exit_when_idle` gives up.
    pub unreachable_timeout: Duration,
    /// Where to serve map outputs; port 0 picks a free port.
    pub shuffle_listen: SocketAddr,
    /// Address other workers should use to reach the shuffle server, when it differs from the bound one.
    pub advertise: Option<String>,
    /// Take map tasks (false for a dedicated reducer).
    pub accept_map: bool,
    /// Take reduce tasks (false for a dedicated mapper).
    pub accept_reduce: bool,
    /// TLS for the coordinator connection, the shuffle server and fetches from other workers; with
    /// TLS the certificate must have role `worker`.
    pub security: Security,
}

/// A task as the worker sees it.
struct Task {
    job_id: u64,
    /// Without its inputs (see [`JobSpec::without_inputs`]).
    spec: JobSpec,
    index: u32,
    attempt: u64,
    /// Map tasks: the input file, offset and length to read.
    split: Option<(PathBuf, u64, u64)>,
    /// Number of map tasks of the job.
    n_map: u32,
}

/// Where a reducer found one map output.
enum Local {
    /// A file: in the shared directory, among this worker's own outputs, or fetched to scratch.
    File(PathBuf),
    /// Fetched and small enough to hold (within [`FETCH_MEMORY`]).
    Memory(Vec<u8>),
}

/// Bytes of fetched map outputs a reducer holds in memory instead of writing them to its scratch
/// directory: most outputs of a combining job are small, and thousands of tiny files cost more to
/// create, check and merge than to hold. Bigger outputs go to disk (as Hadoop holds in memory only
/// segments under a quarter of its shuffle buffer).
const FETCH_MEMORY: usize = 32 << 20;
/// The largest single fetched output held in memory.
const FETCH_MEMORY_EACH: usize = 1 << 20;

enum Outcome {
    Succeeded,
    Failed(String),
    FetchFailed(Vec<(u32, MapOutput)>),
    /// The coordinator refused this attempt's commit (it is no longer the current one): its output
    /// was discarded and there is nothing to report.
    NotCommitted,
    /// The coordinator could not be asked what the task needed: nothing is reported, the task times
    /// out and runs again.
    Abandoned(String),
}

struct Worker {
    config: WorkerConfig,
    dir: PathBuf,
    id: String,
    addr: String,
    client: CoordinatorClient<Channel>,
    fetcher: Fetcher,
    last_job: u64,
}

/// How soon a worker told to wait asks again.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// Transport trouble (coordinator down or restarting) as opposed to the coordinator refusing a request
/// or this worker's identity (which no retry fixes).
fn transient(status: &tonic::Status) -> bool {
    !crate::security::is_tls_failure(status)
        && !matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::Unimplemented
                | Code::PermissionDenied
                | Code::Unauthenticated
        )
}

/// The address other workers fetch this worker's map outputs from: `advertise`, or the bound
/// listener's. Refused before the worker registers (a reducer could never fetch from it, and its maps
/// would run again and again): an address that is not `HOST:PORT` with a port, and a listener on
/// every interface (0.0.0.0, ::) without `advertise`, which names no host another worker can reach.
fn shuffle_address(bound: SocketAddr, advertise: Option<&str>) -> Result<String, MrError> {
    match advertise {
        None if bound.ip().is_unspecified() => Err(MrError::Other(format!(
            "the shuffle listener is on every interface ({bound}): other workers cannot fetch from \
             that address; give --advertise HOST:PORT, the address they reach this worker at"
        ))),
        None => Ok(bound.to_string()),
        Some(address) => {
            if crate::address::is_dialable(address) {
                Ok(address.to_string())
            } else {
                Err(MrError::Other(format!(
                    "--advertise {address:?} is not an address other workers can reach: give \
                     HOST:PORT with a host name or a specific IP and the listener's port"
                )))
            }
        }
    }
}

/// Removes the intermediate files `names` (`what` they are, for warnings) from `dir`, on the
/// blocking pool (there may be many, on a shared file system); how many went. The directory is
/// opened as the files were written, so a link swapped in for it since is refused, not followed to
/// remove files of the same names elsewhere. Files already gone, or a directory gone, are not
/// errors.
async fn remove_intermediates(
    worker: String,
    dir: PathBuf,
    names: Vec<String>,
    what: &'static str,
) -> u32 {
    tokio::task::spawn_blocking(move || {
        let opened = match fsutil::ExactDir::open(&dir) {
            Ok(opened) => opened,
            Err(err) => {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(%worker, dir = %dir.display(), %err, what, "could not open a directory to remove intermediate files");
                }
                return 0;
            }
        };
        let mut removed = 0;
        for name in names {
            match opened.remove_file(std::ffi::OsStr::new(&name)) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(%worker, path = %dir.join(&name).display(), %err, "could not remove {what}");
                }
                Err(_) => {}
            }
        }
        removed
    })
    .await
    .unwrap_or(0)
}

/// Runs a worker until it is told there is nothing to do (with `exit_when_idle`) or fails to start.
pub async fn run(config: WorkerConfig) -> Result<(), MrError> {
    std::fs::create_dir_all(&config.dir).map_err(MrError::io(&config.dir))?;
    let dir = std::fs::canonicalize(&config.dir).map_err(MrError::io(&config.dir))?;
    let listener = TcpListener::bind(config.shuffle_listen)
        .await
        .map_err(|err| {
            MrError::Other(format!("cannot listen on {}: {err}", config.shuffle_listen))
        })?;
    let bound = listener
        .local_addr()
        .map_err(|err| MrError::Other(format!("shuffle listener: {err}")))?;
    let addr = shuffle_address(bound, config.advertise.as_deref())?;
    shuffle::spawn_server(listener, dir.clone(), &config.security)?;
    let id = format!(
        "w{}-{:04x}",
        std::process::id(),
        rand::rng().random::<u16>()
    );
    let endpoint = config
        .security
        .endpoint_for(&config.coordinator, &crate::security::Role::Coordinator)
        .map_err(|err| {
            MrError::Other(format!(
                "bad coordinator address {}: {err}",
                config.coordinator
            ))
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30));
    let client = CoordinatorClient::new(endpoint.connect_lazy());
    tracing::info!(worker = %id, shuffle = %addr, coordinator = %config.coordinator, "worker started");
    let fetcher = Fetcher::new(config.security.clone());
    let mut worker = Worker {
        config,
        dir,
        id,
        addr,
        client,
        fetcher,
        last_job: 0,
    };
    worker.run().await
}

impl Worker {
    async fn run(&mut self) -> Result<(), MrError> {
        let mut last_contact = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let request = pb::TaskRequest {
                worker_id: self.id.clone(),
                shuffle_addr: self.addr.clone(),
                accept_map: self.config.accept_map,
                accept_reduce: self.config.accept_reduce,
            };
            let reply = match self.client.request_task(request).await {
                Ok(reply) => reply.into_inner(),
                Err(status) if transient(&status) => {
                    if self.config.exit_when_idle
                        && last_contact.elapsed() >= self.config.unreachable_timeout
                    {
                        tracing::info!(worker = %self.id, "coordinator unreachable; exiting");
                        return Ok(());
                    }
                    if !warned {
                        self.refuse_plaintext_against_tls().await?;
                        tracing::warn!(worker = %self.id, %status, "coordinator unreachable; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(status) => return Err(status.into()),
            };
            last_contact = Instant::now();
            warned = false;
            match pb::Action::try_from(reply.action) {
                Ok(pb::Action::Idle) if self.config.exit_when_idle => {
                    tracing::info!(worker = %self.id, "no jobs left; exiting");
                    return Ok(());
                }
                Ok(pb::Action::Idle) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(pb::Action::Wait) => {
                    // A running job's next task (the reduces after the last map) comes soon: ask
                    // again shortly, a cheap call, rather than leave a core idle for 100 ms.
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(WAIT_POLL).await;
                }
                Ok(pb::Action::Run) => {
                    backoff = Duration::from_millis(100);
                    self.run_task(reply).await;
                    // The outage clock starts when we next need the coordinator, not when the task began.
                    last_contact = Instant::now();
                }
                Err(_) => {
                    return Err(MrError::Other(format!(
                        "coordinator sent unknown action {}",
                        reply.action
                    )))
                }
            }
        }
    }

    /// A plaintext (`--insecure`) worker against a TLS coordinator would retry forever: stop instead.
    async fn refuse_plaintext_against_tls(&self) -> Result<(), MrError> {
        let coordinator = &self.config.coordinator;
        if !self.config.security.is_tls()
            && crate::security::requires_tls(coordinator, Duration::from_secs(2)).await
        {
            return Err(MrError::Tls {
                addr: coordinator.clone(),
                detail: "the coordinator requires TLS, and this worker runs with --insecure".into(),
            });
        }
        Ok(())
    }

    async fn run_task(&mut self, reply: pb::TaskReply) {
        let job_id = reply.job_id;
        let kind = pb::TaskKind::try_from(reply.kind).unwrap_or(pb::TaskKind::Unspecified);
        let spec = match reply.spec.as_ref().map(JobSpec::try_from) {
            Some(Ok(spec)) => spec,
            Some(Err(err)) => {
                let failed = Outcome::Failed(err.to_string());
                self.report(
                    job_id,
                    kind,
                    reply.index,
                    reply.attempt,
                    String::new(),
                    failed,
                )
                .await
                .ok();
                return;
            }
            None => {
                tracing::warn!(worker = %self.id, job = job_id, "task without a job spec; ignoring it");
                return;
            }
        };
        if job_id != self.last_job {
            prune_old_jobs(&self.dir, job_id);
            self.last_job = job_id;
        }
        let task = Task {
            job_id,
            spec,
            index: reply.index,
            attempt: reply.attempt,
            split: reply
                .split
                .map(|s| (PathBuf::from(s.path), s.offset, s.length)),
            n_map: reply.maps,
        };
        let started = Instant::now();
        tracing::info!(worker = %self.id, job = job_id, kind = ?kind, index = task.index, attempt = task.attempt, "running task");
        // The map outputs a reduce read: its inputs, once the coordinator has taken its success.
        let mut read = Vec::new();
        let outcome = match kind {
            pb::TaskKind::Map => self.run_map(&task).await,
            pb::TaskKind::Reduce => self.run_reduce(&task, &mut read).await,
            pb::TaskKind::Unspecified => {
                Outcome::Failed(format!("unknown task kind {}", reply.kind))
            }
        };
        match &outcome {
            Outcome::Succeeded => tracing::info!(
                worker = %self.id, job = job_id, kind = ?kind, index = task.index,
                ms = started.elapsed().as_millis() as u64, "task done"
            ),
            Outcome::Failed(error) => tracing::warn!(
                worker = %self.id, job = job_id, kind = ?kind, index = task.index, %error, "task failed"
            ),
            Outcome::FetchFailed(missing) => tracing::warn!(
                worker = %self.id, job = job_id, index = task.index, ?missing, "map outputs unavailable"
            ),
            Outcome::Abandoned(why) => {
                tracing::warn!(worker = %self.id, job = job_id, index = task.index, %why, "task given up");
                return;
            }
            Outcome::NotCommitted => {
                tracing::warn!(
                    worker = %self.id, job = job_id, index = task.index, attempt = task.attempt,
                    "output discarded: the coordinator no longer waits for this attempt"
                );
                return;
            }
        }
        // Only gRPC map outputs live with this worker; shared-directory ones are found by name.
        let served_from = match (kind, task.spec.shuffle) {
            (pb::TaskKind::Map, ShuffleMode::Grpc) => self.addr.clone(),
            _ => String::new(),
        };
        let succeeded = matches!(outcome, Outcome::Succeeded);
        let taken = self
            .report(job_id, kind, task.index, task.attempt, served_from, outcome)
            .await;
        // A map attempt that failed (perhaps after renaming some partitions), or whose success was not
        // taken (a duplicate, a straggler the coordinator no longer waits for, or one of a job it has
        // since forgotten, --keep-jobs), wrote files no reducer will read: remove them now.
        let refused = matches!(&taken, Err(status)
            if matches!(status.code(), Code::FailedPrecondition | Code::NotFound));
        let garbage = !succeeded || refused || matches!(taken, Ok(false));
        if kind == pb::TaskKind::Map && garbage {
            self.remove_map_outputs(&task).await;
        }
        if kind == pb::TaskKind::Reduce
            && task.spec.shuffle == ShuffleMode::SharedDir
            && matches!(taken, Ok(true))
        {
            self.remove_reduce_inputs(&task, read).await;
        }
    }

    /// Deletes the shared-directory map outputs reduce `task` read, once the coordinator has taken
    /// its success: no attempt of that partition runs again, so they are garbage, and a job of
    /// M maps and R reduces would otherwise leave M × R files beside its output (Hadoop removes a
    /// job's intermediate data too). After the report, not before: a superseded attempt of the same
    /// reduce that found them gone first would send the maps to run again. (gRPC shuffle outputs
    /// live in the mappers' own directories, pruned when they start the next job.)
    async fn remove_reduce_inputs(&self, task: &Task, read: Vec<MapOutput>) {
        let (job_id, reduce) = (task.job_id, task.index);
        let names = read
            .iter()
            .enumerate()
            .map(|(map, output)| intermediate_name(job_id, map as u32, reduce, output.attempt))
            .collect();
        let dir = task.spec.output_dir.clone();
        let removed = remove_intermediates(self.id.clone(), dir, names, "a reduce's input").await;
        tracing::debug!(worker = %self.id, job = job_id, reduce, removed, "reduce inputs removed");
    }

    /// Deletes what map attempt `task` wrote.
    async fn remove_map_outputs(&self, task: &Task) {
        let (job_id, index, attempt) = (task.job_id, task.index, task.attempt);
        let names = (0..task.spec.n_reduce)
            .map(|reduce| intermediate_name(job_id, index, reduce, attempt))
            .collect();
        let dir = self.map_output_dir(task);
        let removed = remove_intermediates(self.id.clone(), dir, names, "a stale map output").await;
        if removed > 0 {
            tracing::info!(
                worker = %self.id, job = job_id, index, attempt, removed,
                "map outputs removed: this attempt failed or the coordinator took another's"
            );
        }
    }

    /// Where this task's map outputs go (map tasks) or come from (shared directory).
    fn map_output_dir(&self, task: &Task) -> PathBuf {
        match task.spec.shuffle {
            ShuffleMode::SharedDir => task.spec.output_dir.clone(),
            ShuffleMode::Grpc => shuffle::local_job_dir(&self.dir, task.job_id),
        }
    }

    async fn run_map(&mut self, task: &Task) -> Outcome {
        let Some((input, offset, length)) = task.split.clone() else {
            return Outcome::Failed(format!("map task {} has no input split", task.index));
        };
        let dir = self.map_output_dir(task);
        // Map outputs are not fsynced, in either mode (Hadoop's neither): what a power loss can do to one
        // — leave it missing, empty, cut short or holding garbage — the reducer sees (absent, or the seal
        // fails) and reports, and the map runs again. Only committed reduce outputs must survive.
        let (app_name, args, n_reduce, index, job_id, attempt) = (
            task.spec.app.clone(),
            task.spec.args.clone(),
            task.spec.n_reduce,
            task.index,
            task.job_id,
            task.attempt,
        );
        let result = tokio::task::spawn_blocking(move || -> Result<(), MrError> {
            let app = app::build(&app_name, &args)?;
            let partitions = exec::run_map(app.as_ref(), &input, offset, length, n_reduce)?;
            let mut staged = Vec::with_capacity(partitions.len());
            for (reduce, data) in partitions.iter().enumerate() {
                let path = dir.join(intermediate_name(job_id, index, reduce as u32, attempt));
                // Sealed: a reducer must never take a cut-short file for a whole one.
                staged.push(fsutil::stage(&path, false, |w| {
                    w.write_all(data).map_err(MrError::io(&path))?;
                    w.write_all(&records::seal(data))
                        .map_err(MrError::io(&path))
                })?);
            }
            // Renamed only once every partition is written: a reducer never finds some of a map's
            // outputs from an attempt that then failed.
            staged
                .into_iter()
                .try_for_each(|file| file.commit().map(drop))
        })
        .await;
        finish(result)
    }

    /// A reduce attempt's private scratch directory (fetched map outputs, merge spills), created empty
    /// and named by the attempt: two attempts of one reduce never share one, even on workers that
    /// share a `--dir`.
    async fn reduce_scratch(&self, task: &Task) -> Result<PathBuf, MrError> {
        let dir = shuffle::local_job_dir(&self.dir, task.job_id)
            .join(format!("reduce-{}.{}", task.index, task.attempt));
        let made = dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&made).map_err(MrError::io(&made))
        })
        .await
        .map_err(|err| MrError::Other(format!("creating the reduce scratch: {err}")))??;
        Ok(dir)
    }

    /// Brings partition `task.index` of every map output the coordinator accepted to a local file (in
    /// the shared-directory mode it already is one) and checks its seal; `Ok(Err)` lists the outputs
    /// that are missing or damaged, whose maps must run again. Nothing is read into memory: the reduce
    /// streams the files.
    async fn gather(
        &mut self,
        task: &Task,
        locations: &[MapOutput],
        scratch: &Path,
    ) -> Result<Result<Vec<Run>, Vec<(u32, MapOutput)>>, MrError> {
        // (map, the output looked for, where it is here if it is)
        let mut found: Vec<(u32, MapOutput, Option<Local>)> =
            Vec::with_capacity(task.n_map as usize);
        // Bytes of fetched outputs held in memory rather than written to the scratch directory.
        let mut held = 0;
        // A worker that failed one fetch (after retries) is presumed gone: don't wait on it again.
        let mut dead: HashSet<String> = HashSet::new();
        for map in 0..task.n_map {
            let output = locations.get(map as usize).cloned().unwrap_or_default();
            let name = intermediate_name(task.job_id, map, task.index, output.attempt);
            let local = if output.attempt == 0 {
                // Not finished (re-running after a lost output): missing, as far as we know.
                None
            } else {
                match task.spec.shuffle {
                    ShuffleMode::SharedDir => Some(Local::File(task.spec.output_dir.join(&name))),
                    ShuffleMode::Grpc if output.addr.is_empty() || dead.contains(&output.addr) => {
                        None
                    }
                    // Our own output: skip the network.
                    ShuffleMode::Grpc if output.addr == self.addr => Some(Local::File(
                        shuffle::local_job_dir(&self.dir, task.job_id).join(&name),
                    )),
                    ShuffleMode::Grpc => {
                        let into = scratch.join(format!("map-{map}"));
                        let wanted = shuffle::Wanted {
                            job_id: task.job_id,
                            map,
                            reduce: task.index,
                            attempt: output.attempt,
                        };
                        let keep = FETCH_MEMORY.saturating_sub(held).min(FETCH_MEMORY_EACH);
                        match self
                            .fetcher
                            .fetch_to(&output.addr, wanted, &into, keep)
                            .await
                        {
                            Ok(Fetched::File(_)) => Some(Local::File(into)),
                            Ok(Fetched::Memory(data)) => {
                                held += data.len();
                                Some(Local::Memory(data))
                            }
                            // Our own disk failed, not the mapper: the reduce fails (and counts).
                            Err(err @ MrError::Io { .. }) => return Err(err),
                            Err(err) => {
                                tracing::warn!(worker = %self.id, addr = %output.addr, map, %err, "fetch failed");
                                dead.insert(output.addr.clone());
                                None
                            }
                        }
                    }
                }
            };
            found.push((map, output, local));
        }
        let worker = self.id.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let mut runs = Vec::with_capacity(found.len());
            let mut missing = Vec::new();
            for (map, addr, local) in found {
                let checked = match local {
                    None => {
                        missing.push((map, addr));
                        continue;
                    }
                    Some(Local::Memory(mut data)) => {
                        let what = format!("the output of map {map} fetched from {}", addr.addr);
                        match records::open_sealed(&data, &what).map(<[u8]>::len) {
                            Ok(len) => {
                                data.truncate(len);
                                Ok(Run::memory(data, what))
                            }
                            Err(err) => Err(err),
                        }
                    }
                    Some(Local::File(path)) => {
                        let what = format!("{} ({})", path.display(), addr.addr);
                        records::check_sealed_file(&path, &what)
                            .map(|len| Run::file(path, len, what))
                    }
                };
                match checked {
                    Ok(run) => runs.push(run),
                    Err(MrError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        missing.push((map, addr))
                    }
                    // Damaged like a lost one: the map runs again.
                    Err(err @ MrError::Corrupt(_)) => {
                        tracing::warn!(%worker, %err, "map output refused; its map will run again");
                        missing.push((map, addr));
                    }
                    Err(err) => return Err(err),
                }
            }
            Ok(if missing.is_empty() {
                Ok(runs)
            } else {
                Err(missing)
            })
        })
        .await;
        checked.map_err(|err| MrError::Other(format!("checking map outputs panicked: {err}")))?
    }

    /// Runs reduce `task`; `read` is left holding the map outputs it read.
    async fn run_reduce(&mut self, task: &Task, read: &mut Vec<MapOutput>) -> Outcome {
        let scratch = match self.reduce_scratch(task).await {
            Ok(scratch) => scratch,
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        let outcome = self.reduce_in(task, &scratch, read).await;
        let removed = {
            let scratch = scratch.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(scratch)).await
        };
        if let Ok(Err(err)) = removed {
            tracing::warn!(worker = %self.id, path = %scratch.display(), %err, "could not remove reduce scratch");
        }
        outcome
    }

    async fn reduce_in(
        &mut self,
        task: &Task,
        scratch: &Path,
        read: &mut Vec<MapOutput>,
    ) -> Outcome {
        // Trouble reaching the coordinator is not the app failing: give the task up (it times out and
        // runs again) rather than count it towards failing the job.
        let locations = match self.locations(task).await {
            Ok(locations) => locations,
            Err(err) => return Outcome::Abandoned(format!("reading map locations: {err}")),
        };
        read.clone_from(&locations);
        let runs = match self.gather(task, &locations, scratch).await {
            Ok(Ok(runs)) => runs,
            Ok(Err(missing)) => return Outcome::FetchFailed(missing),
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        let output = task.spec.output_path(task.index);
        let (app_name, args) = (task.spec.app.clone(), task.spec.args.clone());
        let options = MergeOptions::spilling_to(scratch);
        let staged = tokio::task::spawn_blocking(move || -> Result<Staged, MrError> {
            let app = app::build(&app_name, &args)?;
            fsutil::stage(&output, true, |w| {
                exec::run_reduce(app.as_ref(), runs, &options, w)
            })
        })
        .await;
        let staged = match staged {
            Ok(Ok(staged)) => staged,
            Ok(Err(err)) => return Outcome::Failed(err.to_string()),
            Err(err) => return Outcome::Failed(format!("task panicked: {err}")),
        };
        // Only the attempt holding the task's commit grant publishes its output: a straggler of a
        // finished job must not replace a file a later job wrote into the same directory, nor two
        // attempts of one task rename over each other.
        match self.may_commit(task).await {
            Ok(true) => {}
            Ok(false) => {
                drop(staged);
                return Outcome::NotCommitted;
            }
            Err(err) => return Outcome::Abandoned(format!("asking to commit: {err}")),
        }
        let (worker, job_id, index) = (self.id.clone(), task.job_id, task.index);
        finish(
            tokio::task::spawn_blocking(move || {
                // What killed or superseded attempts of this partition left behind.
                let removed = staged.commit()?.remove_stale_temps();
                if removed > 0 {
                    tracing::info!(%worker, job = job_id, index, removed, "removed temporary files earlier attempts left");
                }
                Ok(())
            })
            .await,
        )
    }

    /// Where every map task's output lives and which attempt wrote it, read from the coordinator a
    /// page at a time.
    async fn locations(&mut self, task: &Task) -> Result<Vec<MapOutput>, MrError> {
        let mut locations = Vec::with_capacity(task.n_map as usize);
        while locations.len() < task.n_map as usize {
            let request = pb::LocationsRequest {
                job_id: task.job_id,
                start: locations.len() as u32,
            };
            let page = self
                .call(|mut client| async move { client.map_locations(request).await })
                .await?;
            if page.addrs.is_empty() || page.addrs.len() != page.attempts.len() {
                break;
            }
            locations.extend(
                page.addrs
                    .into_iter()
                    .zip(page.attempts)
                    .map(|(addr, attempt)| MapOutput { addr, attempt }),
            );
        }
        Ok(locations)
    }

    /// Asks the coordinator whether this attempt may move its output into place.
    async fn may_commit(&mut self, task: &Task) -> Result<bool, MrError> {
        let request = pb::CommitRequest {
            worker_id: self.id.clone(),
            job_id: task.job_id,
            kind: pb::TaskKind::Reduce as i32,
            index: task.index,
            attempt: task.attempt,
        };
        let reply = self
            .call(|mut client| {
                let request = request.clone();
                async move { client.commit_task(request).await }
            })
            .await?;
        Ok(reply.granted)
    }

    /// Makes one coordinator call, riding out a coordinator restart: transient failures are retried
    /// for up to the worker's `unreachable_timeout` (at least a second); a refusal is returned at once.
    async fn call<T, F, Fut>(&self, mut rpc: F) -> Result<T, tonic::Status>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let give_up = Instant::now() + self.config.unreachable_timeout.max(Duration::from_secs(1));
        loop {
            match rpc(self.client.clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if transient(&status) && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Reports an outcome, riding out a coordinator restart; if the coordinator stays away the report is
    /// dropped and the task will simply time out and run again.
    /// Reports how an attempt ended: `Ok(true)` if the coordinator took it, `Ok(false)` if it ignored it
    /// (a duplicate or a straggler) or there was nothing to report, `Err` if it refused it or could not
    /// be reached.
    async fn report(
        &mut self,
        job_id: u64,
        kind: pb::TaskKind,
        index: u32,
        attempt: u64,
        served_from: String,
        outcome: Outcome,
    ) -> Result<bool, tonic::Status> {
        let mut report = pb::TaskReport {
            worker_id: self.id.clone(),
            job_id,
            kind: kind as i32,
            index,
            attempt,
            shuffle_addr: served_from,
            ..Default::default()
        };
        match outcome {
            Outcome::Succeeded => report.outcome = pb::Outcome::Succeeded as i32,
            Outcome::Failed(error) => {
                report.outcome = pb::Outcome::Failed as i32;
                report.error = error;
            }
            Outcome::FetchFailed(missing) => {
                report.outcome = pb::Outcome::FetchFailed as i32;
                report.missing = missing
                    .into_iter()
                    .map(|(map_index, lost)| pb::MapLocation {
                        map_index,
                        addr: lost.addr,
                        attempt: lost.attempt,
                    })
                    .collect();
            }
            Outcome::NotCommitted | Outcome::Abandoned(_) => return Ok(false),
        }
        let sent = self
            .call(|mut client| {
                let report = report.clone();
                async move { client.report_task(report).await }
            })
            .await;
        match sent {
            Ok(reply) => Ok(reply.accepted),
            Err(status) => {
                tracing::warn!(worker = %self.id, job = job_id, index, %status, "could not report task");
                Err(status)
            }
        }
    }
}

fn finish(result: Result<Result<(), MrError>, tokio::task::JoinError>) -> Outcome {
    match result {
        Ok(Ok(())) => Outcome::Succeeded,
        Ok(Err(err)) => Outcome::Failed(err.to_string()),
        Err(err) => Outcome::Failed(format!("task panicked: {err}")),
    }
}

/// Deletes the served map outputs of jobs before `current`: jobs run in order, so those are finished.
fn prune_old_jobs(dir: &Path, current: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let old = name
            .to_str()
            .and_then(|n| n.strip_prefix("job-"))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|job| job < current);
        if old {
            if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), %err, "could not remove old map outputs");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_advertise_only_addresses_others_can_reach() {
        let loopback: SocketAddr = "127.0.0.1:7001".parse().expect("address");
        let everywhere: SocketAddr = "0.0.0.0:7001".parse().expect("address");
        let everywhere6: SocketAddr = "[::]:7001".parse().expect("address");
        assert_eq!(
            shuffle_address(loopback, None).expect("bound"),
            "127.0.0.1:7001"
        );
        for bound in [everywhere, everywhere6] {
            let refused = shuffle_address(bound, None).expect_err("no host to reach");
            assert!(refused.to_string().contains("--advertise"), "{refused}");
        }
        for good in ["w1.mr:7001", "10.0.0.5:7001", "[fd00::5]:7001"] {
            assert_eq!(shuffle_address(everywhere, Some(good)).expect(good), good);
        }
        for bad in [
            "w1.mr",
            ":7001",
            "w1.mr:x",
            "w1.mr:0",
            "0.0.0.0:7001",
            "[::]:7001",
            "",
            "fd00::5:7001",
            "[fd00::5:7001",
            "http://w1.mr:80",
        ] {
            let refused = shuffle_address(everywhere, Some(bad)).expect_err(bad);
            assert!(
                refused.to_string().contains("--advertise"),
                "{bad}: {refused}"
            );
        }
    }
}
