//! The coordinator daemon: the [`Coordinator`] state machine behind gRPC, made durable with sled.
//!
//! Every change a client or worker is told about is flushed to disk before the reply goes out, so a
//! coordinator killed with SIGKILL and restarted on the same data directory resumes each job where it
//! stood: finished tasks stay finished, in-flight tasks are handed out again.
//!
//! The trust boundary: with TLS every caller is identified by its certificate. Only `admin` may submit
//! jobs, only `worker` may take and report tasks, and users, workers and the coordinator itself (its
//! health check) may read job status. A submitted job must also pass the coordinator's [`Admission`]
//! (`--allow-apps`, `--data-root`), checked once at submit: a job resumed after a restart is not
//! checked again (its output directory is legitimately non-empty by then).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::mr::coordinator::{
    Assignment, Changes, Coordinator, JobRecord, JobState, JobView, MapOutput, Outcome,
    ReportError, TaskKind, TaskRecord, WorkerInfo,
};
use crate::mr::job::{Admission, JobSpec};
use crate::mr::MrError;
use crate::proto::mr as pb;
use crate::proto::mr::coordinator_server::CoordinatorServer;
use crate::security::{is_user, Admit, Guard, Role, Security};

/// How the coordinator schedules and what it keeps (`mrd coordinator` flags).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// How long a worker may take on a task before it is handed to another (`--task-timeout`).
    pub task_timeout: Duration,
    /// Hand-outs of one task that fail its job (`--max-attempts`).
    pub max_attempts: u32,
    /// Finished jobs kept, the newest (`--keep-jobs`).
    pub keep_finished: usize,
    /// Jobs queued or running at once; more are refused until some finish (`--max-queued-jobs`).
    pub max_queued_jobs: usize,
    /// Tasks of the jobs queued or running, all told ([`MAX_PENDING_TASKS`]); a job that would pass it
    /// is refused.
    pub max_pending_tasks: usize,
}

/// The gRPC service; cheap to share, all state is behind one short-held lock.
pub struct CoordinatorService {
    state: Mutex<Coordinator>,
    db: sled::Db,
    /// Job id → [`JobRecord::header`] (JSON).
    jobs: sled::Tree,
    /// (job id, kind, index) → [`TaskRecord`] (JSON), see [`task_key`].
    tasks: sled::Tree,
    /// Job id → [`JobState`] (JSON), newer than the header's.
    states: sled::Tree,
    admission: Admission,
    guard: Guard,
    /// Output directories submits with `--overwrite` are emptying (see [`Clearing`]).
    clearing: ClearingSet,
    /// Jobs queued or running at once ([`Policy::max_queued_jobs`]).
    max_queued_jobs: usize,
    /// Their tasks, all told ([`Policy::max_pending_tasks`]).
    max_pending_tasks: usize,
    /// Bytes of task messages sent (`mr_task_message_bytes`).
    task_bytes: std::sync::atomic::AtomicU64,
    /// Woken when a report may have made a task available (or finished a job): workers told to wait
    /// are held on it rather than polling (see [`WAIT_HOLD`]).
    progress: tokio::sync::Notify,
}

/// How long a worker that would be told to wait is held for a task to become available: the reduces
/// after the last map, or the end of the job, reach it at once instead of at its next poll. Short enough
/// that a running task's timeout is still noticed promptly (timeouts are checked when a worker asks).
const WAIT_HOLD: Duration = Duration::from_millis(250);

/// Refuse to empty `dir` (`--overwrite`) while a job that has not finished reads inputs from it:
/// chained jobs read the previous one's output, and emptying it under a queued or running reader
/// would fail that job, or make it count a partial input.
fn check_no_inputs_in(state: &Coordinator, dir: &Path) -> Result<(), Status> {
    let reader = state.jobs().find(|view| {
        !view.record.state.finished()
            && view
                .record
                .spec
                .inputs
                .iter()
                .any(|input| input.starts_with(dir))
    });
    match reader {
        Some(view) => Err(Status::invalid_argument(format!(
            "output directory {} holds inputs of job {}, which has not finished: --overwrite \
             would delete them under it",
            dir.display(),
            view.record.id
        ))),
        None => Ok(()),
    }
}

impl CoordinatorService {
    /// Opens (or creates) the state in `data_dir` and restores every job found there. New jobs must
    /// pass `admission`; callers are identified and checked by `guard`.
    pub fn open(
        data_dir: &Path,
        policy: Policy,
        admission: Admission,
        guard: Guard,
    ) -> Result<Self, MrError> {
        std::fs::create_dir_all(data_dir).map_err(MrError::io(data_dir))?;
        let db = sled::open(data_dir.join("coordinator.sled"))?;
        let jobs = db.open_tree("jobs")?;
        let tasks = db.open_tree("tasks")?;
        let states = db.open_tree("states")?;
        let mut records = std::collections::BTreeMap::new();
        for entry in jobs.iter() {
            let (key, value) = entry?;
            let mut record: JobRecord = serde_json::from_slice(&value)
                .map_err(|err| MrError::CorruptState(format!("job key {key:?}: {err}")))?;
            record.normalize();
            records.insert(record.id, record);
        }
        for entry in states.iter() {
            let (key, value) = entry?;
            let corrupt = |why: String| MrError::CorruptState(format!("state key {key:?}: {why}"));
            let id = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt("malformed key".into()))?;
            let state: JobState =
                serde_json::from_slice(&value).map_err(|err| corrupt(err.to_string()))?;
            records
                .get_mut(&id)
                .ok_or_else(|| corrupt("no such job".into()))?
                .state = state;
        }
        for entry in tasks.iter() {
            let (key, value) = entry?;
            let corrupt = |why: String| MrError::CorruptState(format!("task key {key:?}: {why}"));
            let (job, kind, index) =
                parse_task_key(&key).ok_or_else(|| corrupt("malformed key".into()))?;
            let task: TaskRecord =
                serde_json::from_slice(&value).map_err(|err| corrupt(err.to_string()))?;
            let slot = records.get_mut(&job).and_then(|record| match kind {
                TaskKind::Map => record.maps.get_mut(index as usize),
                TaskKind::Reduce => record.reduces.get_mut(index as usize),
            });
            *slot.ok_or_else(|| corrupt("no such task".into()))? = task;
        }
        let records: Vec<JobRecord> = records
            .into_values()
            .map(|mut record| {
                record.settle();
                record
            })
            .collect();
        for record in &records {
            if !record.state.finished() {
                tracing::info!(
                    job = record.id,
                    maps_done = record.done_count(TaskKind::Map),
                    reduces_done = record.done_count(TaskKind::Reduce),
                    "resuming job"
                );
            }
        }
        let coordinator = Coordinator::restore(records, policy.task_timeout)
            .with_max_attempts(policy.max_attempts)
            .with_keep_finished(policy.keep_finished);
        let service = Self {
            state: Mutex::new(coordinator),
            db,
            jobs,
            tasks,
            states,
            admission,
            guard,
            clearing: ClearingSet::default(),
            max_queued_jobs: policy.max_queued_jobs,
            max_pending_tasks: policy.max_pending_tasks,
            task_bytes: Default::default(),
            progress: Default::default(),
        };
        // Jobs beyond --keep-jobs (it was lowered, or an older version kept every job) go now.
        let forgotten = service.lock().take_changed();
        if !forgotten.is_empty() {
            tracing::info!(
                jobs = forgotten.forgotten.len(),
                keep = policy.keep_finished,
                "forgetting the oldest finished jobs"
            );
            service
                .try_stage(&forgotten)
                .map_err(|status| MrError::CorruptState(status.message().to_string()))?;
            service.db.flush()?;
        }
        Ok(service)
    }

    /// Update the metrics gauges from the current state (called at scrape time).
    pub fn refresh_metrics(&self, gauges: &crate::mr::metrics::MrGauges) {
        let sent = self.task_bytes.load(std::sync::atomic::Ordering::Relaxed);
        gauges.refresh(&self.lock(), sent);
    }

    /// Whether a job of `new_tasks` tasks fits among those queued and running
    /// ([`Policy::max_queued_jobs`], [`Policy::max_pending_tasks`]).
    fn check_room(&self, state: &Coordinator, new_tasks: usize) -> Result<(), Status> {
        let (queued, tasks) = state.pending();
        if queued >= self.max_queued_jobs {
            return Err(Status::resource_exhausted(format!(
                "{queued} jobs are queued or running, the most this coordinator takes \
                 (--max-queued-jobs); submit again once some have finished"
            )));
        }
        let most = self.max_pending_tasks;
        if tasks + new_tasks > most {
            return Err(Status::resource_exhausted(format!(
                "the jobs queued or running have {tasks} tasks and this one {new_tasks}: more than \
                 the {most} a coordinator holds at once; submit again once some have finished, or \
                 use a larger --split-size"
            )));
        }
        Ok(())
    }

    /// Whether no unfinished job writes `dir` and no submit but the one holding `ours` is emptying it.
    fn check_output_free(
        &self,
        state: &Coordinator,
        dir: &Path,
        ours: Option<&Clearing>,
    ) -> Result<(), Status> {
        if let Some(other) = state
            .jobs()
            .find(|view| !view.record.state.finished() && view.record.spec.output_dir == dir)
        {
            return Err(Status::invalid_argument(format!(
                "output directory {} is already the output of job {}, which has not finished",
                dir.display(),
                other.record.id
            )));
        }
        if ours.is_none_or(|ours| ours.dir != dir) && Clearing::busy(&self.clearing, dir) {
            return Err(Status::invalid_argument(format!(
                "output directory {} is being emptied for another job submitted with --overwrite",
                dir.display()
            )));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Coordinator> {
        // A panic while holding the lock cannot leave the state half-updated in a way later calls care
        // about (every update is a few field writes), so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stages `changes` (taken from `state`) in sled and says whether there were any (then the caller
    /// must flush before answering); called under the state lock so records reach sled in the order
    /// they changed. If storing fails, the changes go back to `state`, to be stored with the next.
    fn stage(&self, state: &mut Coordinator, changes: &Changes) -> Result<bool, Status> {
        let staged = self.try_stage(changes);
        if staged.is_err() {
            state.requeue(changes);
        }
        staged
    }

    fn try_stage(&self, changes: &Changes) -> Result<bool, Status> {
        for header in &changes.jobs {
            let value = serde_json::to_vec(header)
                .map_err(|err| Status::internal(format!("encoding job {}: {err}", header.id)))?;
            self.jobs
                .insert(header.id.to_be_bytes(), value)
                .map_err(|err| Status::internal(format!("storing job {}: {err}", header.id)))?;
        }
        for (job, state) in &changes.states {
            let value = serde_json::to_vec(state)
                .map_err(|err| Status::internal(format!("encoding job {job}'s state: {err}")))?;
            self.states
                .insert(job.to_be_bytes(), value)
                .map_err(|err| Status::internal(format!("storing job {job}'s state: {err}")))?;
        }
        for (job, kind, index, task) in &changes.tasks {
            let value = serde_json::to_vec(task)
                .map_err(|err| Status::internal(format!("encoding a task of job {job}: {err}")))?;
            self.tasks
                .insert(task_key(*job, *kind, *index), value)
                .map_err(|err| Status::internal(format!("storing a task of job {job}: {err}")))?;
        }
        for &job in &changes.forgotten {
            self.forget(job)
                .map_err(|err| Status::internal(format!("removing job {job}: {err}")))?;
        }
        Ok(!changes.is_empty())
    }

    /// Remove everything stored of job `id`: header, state and every task record, in one sled
    /// transaction. A crash part-way through a plain sequence of removals could leave a state or task
    /// record without its header (which the next start refuses as corrupt) or a header without its
    /// final state (the finished job would run again).
    fn forget(&self, id: u64) -> Result<(), String> {
        use sled::Transactional as _;
        let key = id.to_be_bytes();
        let task_keys = self
            .tasks
            .scan_prefix(key)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| err.to_string())?;
        (&self.jobs, &self.states, &self.tasks)
            .transaction(|(jobs, states, tasks)| {
                jobs.remove(&key)?;
                states.remove(&key)?;
                for task in &task_keys {
                    tasks.remove(task)?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|err| format!("{err:?}"))
    }

    /// Counts a task message's bytes towards `mr_task_message_bytes`.
    fn sent(&self, message: &impl prost::Message) {
        self.task_bytes.fetch_add(
            message.encoded_len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Makes everything staged so far durable; done outside the lock so concurrent reports share fsyncs.
    async fn flush(&self) -> Result<(), Status> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|err| Status::internal(format!("flushing coordinator state: {err}")))
    }
}

/// A task record's key: job id, kind (0 map, 1 reduce), index, big-endian so a job's tasks sort
/// together.
fn task_key(job: u64, kind: TaskKind, index: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[..8].copy_from_slice(&job.to_be_bytes());
    key[8] = match kind {
        TaskKind::Map => 0,
        TaskKind::Reduce => 1,
    };
    key[9..].copy_from_slice(&index.to_be_bytes());
    key
}

fn parse_task_key(key: &[u8]) -> Option<(u64, TaskKind, u32)> {
    let key: &[u8; 13] = key.try_into().ok()?;
    let job = u64::from_be_bytes(key[..8].try_into().ok()?);
    let kind = match key[8] {
        0 => TaskKind::Map,
        1 => TaskKind::Reduce,
        _ => return None,
    };
    Some((job, kind, u32::from_be_bytes(key[9..].try_into().ok()?)))
}

/// Output directories being emptied (see [`Clearing`]).
type ClearingSet = Arc<Mutex<std::collections::HashSet<PathBuf>>>;

/// An output directory a submit with `--overwrite` is emptying, outside the coordinator's lock;
/// released when dropped (the submit accepted or refused, or the emptying of a cancelled one done).
struct Clearing {
    set: ClearingSet,
    dir: PathBuf,
}

impl Clearing {
    /// Takes `dir`; the caller checked it was free ([`Clearing::busy`]) under the coordinator's lock.
    fn reserve(set: &ClearingSet, dir: &Path) -> Self {
        set.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_path_buf());
        Clearing {
            set: Arc::clone(set),
            dir: dir.to_path_buf(),
        }
    }

    /// Whether a submit is emptying `dir`.
    fn busy(set: &Mutex<std::collections::HashSet<PathBuf>>, dir: &Path) -> bool {
        set.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(dir)
    }

    /// The first of `inputs` inside a directory a submit is emptying.
    fn holds_any<'a>(
        set: &Mutex<std::collections::HashSet<PathBuf>>,
        inputs: &'a [PathBuf],
    ) -> Option<&'a PathBuf> {
        let emptying = set.lock().unwrap_or_else(PoisonError::into_inner);
        if emptying.is_empty() {
            return None;
        }
        inputs
            .iter()
            .find(|input| emptying.iter().any(|dir| input.starts_with(dir)))
    }
}

impl Drop for Clearing {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.dir);
    }
}

/// Most task rows one job's status carries (`StatusRequest.tasks`).
pub const MAX_STATUS_TASKS: usize = 10_000;

/// Encoded bytes of a status reply: older jobs are left out beyond it (`omitted_jobs`), and a job's
/// inputs are left out if they alone would pass it. Well under gRPC's 4 MiB default, which a client
/// would otherwise refuse the whole reply for.
pub const STATUS_REPLY_BYTES: usize = 3 << 20;

/// The job statuses, newest first, that fit in `budget` encoded bytes, and how many older ones were
/// left out: a client refuses a whole reply over its message limit, so a coordinator keeping many
/// jobs (or jobs with long arguments and paths) must still answer with the newest. A job too big
/// alone loses its inputs (its `inputs` count still tells how many), then its task rows, then the
/// end of its error: what is left is bounded (arguments, output path, a cut error) and always fits.
fn fit_in_reply(
    newest_first: impl ExactSizeIterator<Item = pb::JobStatus>,
    budget: usize,
) -> (Vec<pb::JobStatus>, u32) {
    let mut newest_first = newest_first;
    let mut fitted = Vec::new();
    let mut bytes = 0;
    while let Some(mut status) = newest_first.next() {
        // Too big alone: its inputs go, then its task rows, then all but the start of its error.
        if prost::Message::encoded_len(&status) > budget {
            if let Some(spec) = status.spec.as_mut() {
                spec.inputs = Vec::new();
            }
        }
        if prost::Message::encoded_len(&status) > budget {
            status.tasks_truncated |= !status.tasks.is_empty();
            status.tasks = Vec::new();
        }
        if prost::Message::encoded_len(&status) > budget {
            status.error = crate::limits::truncated(&status.error, MAX_ERROR_BYTES).to_string();
        }
        // The field's tag and length prefix, at most 1 + 5 bytes.
        let len = prost::Message::encoded_len(&status) + 6;
        if bytes + len > budget {
            let left_out = 1 + newest_first.len();
            return (fitted, u32::try_from(left_out).unwrap_or(u32::MAX));
        }
        bytes += len;
        fitted.push(status);
    }
    (fitted, 0)
}

/// Bytes of a worker id: it is kept with every task a worker ran (in memory, in sled, in status).
pub const MAX_WORKER_ID_BYTES: usize = 256;

/// Bytes of a task's error kept (a worker's report of an app failure); the rest is cut.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Refuses an empty or oversized worker id.
fn check_worker_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_WORKER_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "worker_id must be 1 to {MAX_WORKER_ID_BYTES} bytes, not {}",
            id.len()
        )));
    }
    Ok(())
}

fn task_kind(raw: i32) -> Result<TaskKind, Status> {
    match pb::TaskKind::try_from(raw) {
        Ok(pb::TaskKind::Map) => Ok(TaskKind::Map),
        Ok(pb::TaskKind::Reduce) => Ok(TaskKind::Reduce),
        _ => Err(Status::invalid_argument(format!("invalid task kind {raw}"))),
    }
}

fn pb_kind(kind: TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::Map => pb::TaskKind::Map,
        TaskKind::Reduce => pb::TaskKind::Reduce,
    }
}

/// One job's status with at most `rows` task rows (0: none) and, with `inputs`, its input list.
fn job_status(view: JobView<'_>, rows: usize, inputs: bool) -> pb::JobStatus {
    let with_tasks = rows > 0;
    let record = view.record;
    let (state, error) = match &record.state {
        JobState::Queued => (pb::JobState::Queued, String::new()),
        JobState::Running => (pb::JobState::Running, String::new()),
        JobState::Done => (pb::JobState::Done, String::new()),
        JobState::Failed(error) => (pb::JobState::Failed, error.clone()),
    };
    let mut tasks = Vec::new();
    let total = record.maps.len() + record.reduces.len();
    for (kind, records, running) in [
        (TaskKind::Map, &record.maps, view.running_maps),
        (TaskKind::Reduce, &record.reduces, view.running_reduces),
    ] {
        if !with_tasks {
            break;
        }
        for (index, (task, running)) in records.iter().zip(running).enumerate() {
            if tasks.len() >= rows {
                break;
            }
            let (state, worker) = match (&task.done, running) {
                (Some(done), _) => ("done", done.worker.clone()),
                (None, Some(running)) => ("running", running.worker.clone()),
                (None, None) => ("idle", String::new()),
            };
            tasks.push(pb::TaskStatus {
                kind: pb_kind(kind) as i32,
                index: index as u32,
                state: state.into(),
                worker,
                runs: task.runs,
            });
        }
    }
    pb::JobStatus {
        id: record.id,
        // The inputs only in the detailed view, and only if few: they can be a million paths.
        spec: Some(pb::JobSpec::from(
            &if inputs && record.spec.inputs.len() <= MAX_STATUS_TASKS {
                record.spec.clone()
            } else {
                record.spec.without_inputs()
            },
        )),
        state: state as i32,
        maps_done: record.done_count(TaskKind::Map) as u32,
        reduces_done: record.done_count(TaskKind::Reduce) as u32,
        error,
        tasks_truncated: with_tasks && tasks.len() < total,
        tasks,
        maps: record.n_map(),
        inputs: record.spec.inputs.len() as u32,
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let caller = self
            .guard
            .allow(&request, "submit jobs", |role| *role == Role::Admin)?;
        let request = request.into_inner();
        let overwrite = request.overwrite;
        let wire = request
            .spec
            .ok_or_else(|| Status::invalid_argument("the job spec is missing"))?;
        let invalid = |err: MrError| Status::invalid_argument(err.to_string());
        let spec = JobSpec::try_from(&wire).map_err(invalid)?;
        // Admission first: a refused app's arguments are not even parsed.
        let spec = self.admission.admit(spec, overwrite).map_err(invalid)?;
        spec.validate().map_err(invalid)?;
        let splits = spec.splits().map_err(invalid)?;
        let maps = splits.len();
        let new_tasks = maps + spec.n_reduce as usize;
        let mut clearing = None;
        if overwrite {
            let reservation = {
                let state = self.lock();
                self.check_room(&state, new_tasks)?;
                self.check_output_free(&state, &spec.output_dir, None)?;
                check_no_inputs_in(&state, &spec.output_dir)?;
                // Reserved while its earlier outputs go: no other job may take the directory.
                Clearing::reserve(&self.clearing, &spec.output_dir)
            };
            // Outside the lock: a directory of millions of files takes a while to empty, and workers
            // and status must not wait on it. The reservation goes with the emptying, so a submit
            // cancelled meanwhile frees the directory only once nothing more is removed from it.
            let dir = spec.output_dir.clone();
            let (removed, reservation) = tokio::task::spawn_blocking(move || {
                (crate::mr::roots::clear_outputs(&dir), reservation)
            })
            .await
            .map_err(|err| Status::internal(format!("emptying the output directory: {err}")))?;
            let removed = removed.map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracing::info!(output = %spec.output_dir.display(), removed, "--overwrite: removed an earlier job's outputs");
            clearing = Some(reservation);
        }
        let job_id = {
            let mut state = self.lock();
            // Checked again under the lock the job is queued under (other submits may have come
            // meanwhile); a directory this submit emptied is its own.
            self.check_room(&state, new_tasks)?;
            self.check_output_free(&state, &spec.output_dir, clearing.as_ref())?;
            // Nor the other way round: a reader of a directory being emptied would lose its inputs.
            // (Readers queued before the reservation was taken, under the same lock as that check,
            // were refused there.)
            if let Some(input) = Clearing::holds_any(&self.clearing, &spec.inputs) {
                return Err(Status::invalid_argument(format!(
                    "input {} lies in a directory another submit with --overwrite is emptying",
                    input.display()
                )));
            }
            let id = state.submit(spec, splits);
            let changes = state.take_changed();
            self.stage(&mut state, &changes)?;
            id
        };
        drop(clearing);
        self.flush().await?;
        self.progress.notify_waiters();
        let by = caller.map_or_else(|| "anyone (no TLS)".to_string(), |c| c.to_string());
        tracing::info!(job = job_id, app = %wire.app, inputs = wire.inputs.len(), maps, reduces = wire.n_reduce, %by, "job queued");
        Ok(Response::new(pb::SubmitReply { job_id }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        // Users follow their jobs; workers and the coordinator's own identity (its container health
        // check) may look too.
        self.guard.allow(&request, "read job status", |role| {
            is_user(role) || matches!(role, Role::Worker | Role::Coordinator)
        })?;
        let request = request.into_inner();
        let wanted = request.job_id;
        let (mut jobs, omitted_jobs) = {
            let state = self.lock();
            // At most MAX_STATUS_TASKS task rows in the whole reply, newest jobs first in line for
            // them, inputs only for one job asked for by id, and at most STATUS_REPLY_BYTES in all:
            // however many big jobs there are, the reply stays under gRPC's 4 MiB.
            let mut rows = if request.tasks { MAX_STATUS_TASKS } else { 0 };
            let views = state
                .jobs()
                .filter(|view| wanted == 0 || view.record.id == wanted)
                .collect::<Vec<_>>();
            let newest_first = views.into_iter().rev().map(|view| {
                let status = job_status(view, rows, wanted != 0);
                rows -= status.tasks.len();
                status
            });
            fit_in_reply(newest_first, STATUS_REPLY_BYTES)
        };
        jobs.reverse();
        if wanted != 0 && jobs.is_empty() {
            let (newest, keep) = {
                let state = self.lock();
                (state.newest_id(), state.keep_finished())
            };
            return Err(Status::not_found(if wanted < newest {
                format!(
                    "no job {wanted}: it finished and was forgotten (the coordinator keeps the \
                     newest {keep} finished jobs, --keep-jobs)"
                )
            } else {
                format!("no job {wanted}")
            }));
        }
        // A report shows in memory (and was written to sled under the same lock) a moment before its
        // flush: flush before answering, so what status shows survives a crash of the coordinator.
        self.flush().await?;
        Ok(Response::new(pb::StatusReply { jobs, omitted_jobs }))
    }

    async fn request_task(
        &self,
        request: Request<pb::TaskRequest>,
    ) -> Result<Response<pb::TaskReply>, Status> {
        self.guard
            .allow(&request, "take tasks", |role| *role == Role::Worker)?;
        let request = request.into_inner();
        check_worker_id(&request.worker_id)?;
        let worker = WorkerInfo {
            id: &request.worker_id,
            accept_map: request.accept_map,
            accept_reduce: request.accept_reduce,
        };
        let hold_until = tokio::time::Instant::now() + WAIT_HOLD;
        let mut held_out = false;
        let assignment = loop {
            // Registered before looking, so a report landing in between still wakes this request.
            let progressed = self.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            let (assignment, changed) = {
                let mut state = self.lock();
                let assignment = state.assign(&worker, Instant::now());
                let changes = state.take_changed();
                for (job, job_state) in &changes.states {
                    if let JobState::Failed(why) = job_state {
                        tracing::warn!(job, %why, "job failed");
                    }
                }
                (assignment, self.stage(&mut state, &changes)?)
            };
            if changed {
                // Re-runs and failures for attempts are durable before the task goes out.
                self.flush().await?;
                self.progress.notify_waiters();
            }
            if !matches!(assignment, Assignment::Wait) || held_out {
                break assignment;
            }
            // At the end of the hold, look once more: a running task may have timed out meanwhile.
            held_out = tokio::time::timeout_at(hold_until, progressed)
                .await
                .is_err();
        };
        let reply = match assignment {
            Assignment::Idle => pb::TaskReply {
                action: pb::Action::Idle as i32,
                ..Default::default()
            },
            Assignment::Wait => pb::TaskReply {
                action: pb::Action::Wait as i32,
                ..Default::default()
            },
            Assignment::Run(task) => {
                match &task.took_over_from {
                    Some(previous) => tracing::warn!(
                        job = task.job_id, kind = %task.kind, index = task.index, worker = %request.worker_id,
                        %previous, "task timed out; handing it to another worker"
                    ),
                    None => tracing::info!(
                        job = task.job_id, kind = %task.kind, index = task.index, worker = %request.worker_id,
                        attempt = task.attempt, "task assigned"
                    ),
                }
                pb::TaskReply {
                    action: pb::Action::Run as i32,
                    kind: pb_kind(task.kind) as i32,
                    job_id: task.job_id,
                    spec: Some(pb::JobSpec::from(&task.spec)),
                    index: task.index,
                    attempt: task.attempt,
                    split: task.split.map(|(path, split)| pb::Split {
                        path: path.to_string_lossy().into_owned(),
                        offset: split.offset,
                        length: split.length,
                    }),
                    maps: task.n_map,
                }
            }
        };
        self.sent(&reply);
        Ok(Response::new(reply))
    }

    async fn report_task(
        &self,
        request: Request<pb::TaskReport>,
    ) -> Result<Response<pb::ReportReply>, Status> {
        self.guard
            .allow(&request, "report tasks", |role| *role == Role::Worker)?;
        let report = request.into_inner();
        check_worker_id(&report.worker_id)?;
        let kind = task_kind(report.kind)?;
        let outcome = match pb::Outcome::try_from(report.outcome) {
            Ok(pb::Outcome::Succeeded) => Outcome::Succeeded {
                addr: report.shuffle_addr.clone(),
            },
            // Kept with the job and shown in every status: bounded.
            Ok(pb::Outcome::Failed) => Outcome::Failed(
                crate::limits::truncated(&report.error, MAX_ERROR_BYTES).to_string(),
            ),
            Ok(pb::Outcome::FetchFailed) if kind == TaskKind::Reduce => Outcome::FetchFailed(
                report
                    .missing
                    .iter()
                    .map(|m| {
                        let lost = MapOutput {
                            addr: m.addr.clone(),
                            attempt: m.attempt,
                        };
                        (m.map_index, lost)
                    })
                    .collect(),
            ),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "invalid outcome {}",
                    report.outcome
                )))
            }
        };
        let changed = {
            let mut state = self.lock();
            state
                .report(
                    report.job_id,
                    kind,
                    report.index,
                    &report.worker_id,
                    report.attempt,
                    outcome.clone(),
                )
                .map_err(|err| match err {
                    ReportError::NoSuchJob(_) => Status::not_found(err.to_string()),
                    ReportError::NoSuchTask { .. } => Status::invalid_argument(err.to_string()),
                    ReportError::NotCurrent { .. } => {
                        tracing::info!(%err, "report refused: not an attempt handed out");
                        Status::failed_precondition(err.to_string())
                    }
                    ReportError::Uncommitted { .. } => {
                        tracing::warn!(%err, "report refused");
                        Status::failed_precondition(err.to_string())
                    }
                })?;
            let (job, kind_name, index, worker) =
                (report.job_id, kind, report.index, &report.worker_id);
            match &outcome {
                Outcome::Succeeded { .. } => {
                    tracing::info!(job, kind = %kind_name, index, %worker, "task finished")
                }
                Outcome::Failed(error) => {
                    tracing::warn!(job, kind = %kind_name, index, %worker, %error, "task failed")
                }
                Outcome::FetchFailed(missing) => tracing::warn!(
                    job, kind = %kind_name, index, %worker, ?missing, "reducer could not fetch map outputs; re-running those maps"
                ),
            }
            let changes = state.take_changed();
            for (job, job_state) in &changes.states {
                match job_state {
                    JobState::Done => tracing::info!(job, "job done"),
                    JobState::Failed(error) => tracing::error!(job, %error, "job failed"),
                    _ => {}
                }
            }
            self.stage(&mut state, &changes)?
        };
        if changed {
            self.flush().await?;
            self.progress.notify_waiters();
        }
        let accepted = self.lock().took(
            report.job_id,
            kind,
            report.index,
            &report.worker_id,
            report.attempt,
        );
        if accepted && !changed {
            // A retried report (the first one's flush failed, or its reply was lost) finds the task
            // taken in memory with nothing of its own to stage: the completion may still be unflushed,
            // and a reducer told "taken" removes its inputs. (Cheap when nothing is dirty.)
            self.flush().await?;
        }
        Ok(Response::new(pb::ReportReply { accepted }))
    }

    async fn map_locations(
        &self,
        request: Request<pb::LocationsRequest>,
    ) -> Result<Response<pb::LocationsReply>, Status> {
        self.guard
            .allow(&request, "read map locations", |role| *role == Role::Worker)?;
        let request = request.into_inner();
        let outputs = self
            .lock()
            .locations(request.job_id, request.start)
            .map_err(|err| Status::not_found(err.to_string()))?;
        let reply = pb::LocationsReply {
            attempts: outputs.iter().map(|o| o.attempt).collect(),
            addrs: outputs.into_iter().map(|o| o.addr).collect(),
        };
        self.sent(&reply);
        Ok(Response::new(reply))
    }

    async fn commit_task(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitReply>, Status> {
        self.guard.allow(&request, "commit task outputs", |role| {
            *role == Role::Worker
        })?;
        let request = request.into_inner();
        check_worker_id(&request.worker_id)?;
        let kind = task_kind(request.kind)?;
        let granted = self
            .lock()
            .may_commit(
                request.job_id,
                kind,
                request.index,
                &request.worker_id,
                request.attempt,
                std::time::Instant::now(),
            )
            .map_err(|err| match err {
                ReportError::NoSuchJob(_) => Status::not_found(err.to_string()),
                _ => Status::invalid_argument(err.to_string()),
            })?;
        if !granted {
            tracing::info!(
                job = request.job_id, kind = %kind, index = request.index, worker = %request.worker_id,
                attempt = request.attempt, "commit refused: the task is done, its job ended, or another attempt is committing"
            );
        }
        let reply = pb::CommitReply { granted };
        self.sent(&reply);
        Ok(Response::new(reply))
    }
}

/// Serves the coordinator on an already-bound listener with `security`'s TLS until `shutdown` resolves.
///
/// Taking a listener rather than an address lets callers bind port 0 and learn the real port first.
pub async fn serve(
    listener: TcpListener,
    service: Arc<CoordinatorService>,
    security: &Security,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MrError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "coordinator serving");
    let routes = tonic::service::Routes::new(CoordinatorServer::from_arc(service));
    security
        .serve(routes, listener, Admit::Cluster, shutdown)
        .await
        .map_err(|err| MrError::Other(format!("coordinator server: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::app::AppPolicy;
    use crate::mr::roots::DataRoots;
    use crate::proto::mr::coordinator_server::Coordinator as _;

    fn status_of(id: u64, error_bytes: usize, inputs: usize) -> pb::JobStatus {
        pb::JobStatus {
            id,
            error: "e".repeat(error_bytes),
            spec: Some(pb::JobSpec {
                inputs: vec![format!("/data/{}", "i".repeat(400)); inputs],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A client refuses a whole reply over its 4 MiB limit: however many jobs, and however long
    /// their fields, the reply keeps the newest that fit and says how many older ones it left out.
    #[test]
    fn a_status_reply_keeps_the_newest_jobs_that_fit() {
        let newest_first: Vec<_> = (1..=5).rev().map(|id| status_of(id, 1 << 20, 0)).collect();
        let (jobs, omitted_jobs) = fit_in_reply(newest_first.into_iter(), STATUS_REPLY_BYTES);
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [5, 4]);
        assert_eq!(omitted_jobs, 3);
        let reply = pb::StatusReply { jobs, omitted_jobs };
        assert!(prost::Message::encoded_len(&reply) <= STATUS_REPLY_BYTES);
        // A job too big alone: shown without its task rows and with the start of its error.
        let mut huge = status_of(8, 5 << 20, 0);
        huge.tasks = vec![
            pb::TaskStatus {
                worker: "w".repeat(200),
                ..Default::default()
            };
            10_000
        ];
        let (jobs, omitted_jobs) = fit_in_reply(vec![huge].into_iter(), STATUS_REPLY_BYTES);
        assert_eq!((jobs.len(), omitted_jobs), (1, 0));
        assert!(jobs[0].tasks.is_empty() && jobs[0].tasks_truncated);
        assert_eq!(jobs[0].error.len(), MAX_ERROR_BYTES);
        // One job whose inputs alone would pass the budget is shown without them.
        let (jobs, omitted_jobs) = fit_in_reply(
            vec![status_of(9, 0, 10_000)].into_iter(),
            STATUS_REPLY_BYTES,
        );
        assert_eq!((jobs.len(), omitted_jobs), (1, 0));
        assert!(jobs[0].spec.as_ref().is_some_and(|s| s.inputs.is_empty()));
        let (jobs, _) = fit_in_reply(vec![status_of(9, 0, 100)].into_iter(), STATUS_REPLY_BYTES);
        assert_eq!(jobs[0].spec.as_ref().map(|s| s.inputs.len()), Some(100));
    }

    fn submit_request(root: &Path, output: &str, n_reduce: u32) -> Request<pb::SubmitRequest> {
        Request::new(pb::SubmitRequest {
            spec: Some(pb::JobSpec {
                app: "wc".into(),
                inputs: vec![root.join("input").display().to_string()],
                n_reduce,
                output_dir: root.join(output).display().to_string(),
                ..Default::default()
            }),
            overwrite: false,
        })
    }

    /// A coordinator over a data root holding one small input, taking at most `max_queued_jobs`
    /// jobs of `max_pending_tasks` tasks in all.
    fn small_coordinator(
        max_queued_jobs: usize,
        max_pending_tasks: usize,
    ) -> (tempfile::TempDir, PathBuf, CoordinatorService) {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("input"), b"a b c\n").unwrap();
        let admission = Admission {
            apps: AppPolicy::new(&[]).unwrap(),
            roots: DataRoots::new(std::slice::from_ref(&root)).unwrap(),
        };
        let policy = Policy {
            task_timeout: Duration::from_secs(10),
            max_attempts: 4,
            keep_finished: 10,
            max_queued_jobs,
            max_pending_tasks,
        };
        let service =
            CoordinatorService::open(&dir.path().join("state"), policy, admission, Guard::open())
                .unwrap();
        (dir, root, service)
    }

    /// A worker id is kept with every task the worker ran: an oversized one is refused.
    #[tokio::test]
    async fn an_oversized_worker_id_is_refused() {
        let (_dir, _root, service) = small_coordinator(10, 100);
        let request = pb::TaskRequest {
            worker_id: "w".repeat(MAX_WORKER_ID_BYTES + 1),
            accept_map: true,
            accept_reduce: true,
            ..Default::default()
        };
        let refused = service
            .request_task(Request::new(request))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("worker_id"), "{refused:?}");
    }

    /// An `--overwrite` submit empties its directory outside the lock, holding it meanwhile: no
    /// other job may take that directory until the emptying is over and its own job is queued.
    #[tokio::test]
    async fn a_directory_being_emptied_is_no_other_jobs_output() {
        let (_dir, root, service) = small_coordinator(10, 100);
        let emptying = Clearing::reserve(&service.clearing, &root.join("out"));
        let refused = service
            .submit(submit_request(&root, "out", 1))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("being emptied"), "{refused:?}");
        drop(emptying);
        service
            .submit(submit_request(&root, "out", 1))
            .await
            .unwrap();
        // Queued, the directory is that job's: a later --overwrite submit may not empty it.
        let mut again = submit_request(&root, "out", 1);
        again.get_mut().overwrite = true;
        let refused = service.submit(again).await.unwrap_err();
        assert!(
            refused.message().contains("has not finished"),
            "{refused:?}"
        );
    }

    /// Chained jobs read the previous one's output: an --overwrite submit may not empty the
    /// directory a job that has not finished reads its inputs from.
    #[tokio::test]
    async fn overwrite_keeps_the_inputs_of_unfinished_jobs() {
        let (_dir, root, service) = small_coordinator(10, 100);
        let prev = root.join("prev");
        std::fs::create_dir(&prev).unwrap();
        std::fs::write(prev.join("mr-out-0"), "a 1\n").unwrap();
        let mut reads_prev = submit_request(&root, "next", 1);
        let input = prev.join("mr-out-0").display().to_string();
        reads_prev.get_mut().spec.as_mut().unwrap().inputs = vec![input];
        let reader = service
            .submit(reads_prev)
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let mut overwrite = submit_request(&root, "prev", 1);
        overwrite.get_mut().overwrite = true;
        let refused = service.submit(overwrite).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let says = format!("holds inputs of job {reader}");
        assert!(refused.message().contains(&says), "{refused:?}");
        assert!(
            prev.join("mr-out-0").exists(),
            "the reader's input was removed"
        );
        // And a reader is not queued while its directory is being emptied.
        let emptying = Clearing::reserve(&service.clearing, &prev);
        let mut reads_prev = submit_request(&root, "later", 1);
        let input = prev.join("mr-out-0").display().to_string();
        reads_prev.get_mut().spec.as_mut().unwrap().inputs = vec![input];
        let refused = service.submit(reads_prev).await.unwrap_err();
        assert!(refused.message().contains("is emptying"), "{refused:?}");
        drop(emptying);
    }

    /// Each queued job is held in memory and in sled until it finishes: a submitter in a loop is
    /// told to come back later, by job count and by task count, and is taken again once a job ends.
    #[tokio::test]
    async fn submits_past_the_queue_bounds_are_refused_until_a_job_finishes() {
        let (_dir, root, service) = small_coordinator(2, 8);
        let refused_for = |output: &'static str, n_reduce: u32, why: &'static str| {
            let (service, root) = (&service, &root);
            async move {
                let refused = service
                    .submit(submit_request(root, output, n_reduce))
                    .await
                    .unwrap_err();
                assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
                assert!(refused.message().contains(why), "{refused:?}");
            }
        };
        let first = service.submit(submit_request(&root, "a", 1)).await.unwrap();
        // One map and six reduces would make 2 + 7 tasks pending: more than 8.
        refused_for("b", 6, "tasks").await;
        service.submit(submit_request(&root, "b", 1)).await.unwrap();
        refused_for("c", 1, "--max-queued-jobs").await;
        {
            // The first job runs to its end.
            let id = first.into_inner().job_id;
            let mut state = service.lock();
            let now = Instant::now();
            let worker = WorkerInfo {
                id: "w",
                accept_map: true,
                accept_reduce: true,
            };
            for kind in [TaskKind::Map, TaskKind::Reduce] {
                let Assignment::Run(task) = state.assign(&worker, now) else {
                    panic!("no {kind} task handed out");
                };
                assert_eq!((task.job_id, task.kind), (id, kind));
                if kind == TaskKind::Reduce {
                    assert!(state
                        .may_commit(id, kind, 0, "w", task.attempt, now)
                        .unwrap());
                }
                let done = Outcome::Succeeded {
                    addr: String::new(),
                };
                state.report(id, kind, 0, "w", task.attempt, done).unwrap();
            }
            assert_eq!(
                state.record(id).map(|r| r.state.clone()),
                Some(JobState::Done)
            );
        }
        service.submit(submit_request(&root, "c", 1)).await.unwrap();
    }
}
