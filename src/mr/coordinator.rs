//! The coordinator's scheduling logic as a pure state machine: no I/O, no clock (callers pass `now`), so
//! every rule below is unit-tested directly.
//!
//! Rules:
//! - jobs run one at a time, in submission order; a job's reduce tasks are handed out only once every map
//!   task is done (the reduces need every map's output);
//! - a task handed out and not reported within the timeout is handed to the next worker that asks; the
//!   first successful report of a task wins and later ones are ignored, so slow duplicates are harmless;
//! - a task whose app fails [`MAX_TASK_FAILURES`] times fails its job (bad input would otherwise be retried
//!   forever);
//! - a task handed out `max_attempts` times (default [`DEFAULT_MAX_ATTEMPTS`], as Hadoop) without finishing
//!   fails its job too: a task that kills its worker (out of memory on a big input, a crash) is never
//!   reported, and retried forever it would hold up every job queued behind it;
//! - a reducer that cannot fetch a map output makes that map task run again (paper §3.3), but only if the
//!   output is still believed to live where the reducer looked, so stale reports change nothing; that
//!   reduce attempt is then not counted toward `max_attempts` (the map's re-run is counted against the map);
//! - only the newest `keep_finished` finished jobs are kept (default [`DEFAULT_KEEP_FINISHED_JOBS`]):
//!   a coordinator that runs for months would otherwise hold every job it ever ran, in memory, in sled
//!   and in every status reply. The newest job is never forgotten, so job ids never repeat.
//!
//! What must survive a coordinator crash is in [`JobRecord`]; who is running what is deliberately not
//! persisted: after a restart every unfinished task is simply handed out again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mr::job::{intermediate_name, JobSpec, Split};

/// App failures of one task that fail the whole job.
pub const MAX_TASK_FAILURES: u32 = 3;

/// Times a shared-directory map output may be found missing or damaged by reducers after its map
/// finished before the job fails: it then never reaches them (the workers do not share the directory,
/// or something removes the files), and re-running the map forever would not help.
pub const MAX_LOST_OUTPUTS: u32 = 3;

/// Hand-outs of one task, without a success, that fail the whole job (`mrd coordinator --max-attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;

/// Jobs queued or running at once (`mrd coordinator --max-queued-jobs`): each holds its record, and one
/// entry per task, in memory and in sled until it finishes, so a submitter in a loop must be told
/// to wait rather than grow the coordinator without bound. As YARN's `maximum-applications`.
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 1000;

/// Tasks of the jobs queued or running, all told: a few jobs of [`crate::mr::job::MAX_MAPS`] maps
/// each, or many small ones, but not a thousand of the largest (each task is about 100 bytes in memory
/// and in sled).
pub const MAX_PENDING_TASKS: usize = 4_000_000;

/// Finished jobs (done or failed) kept for `mrd status`, newest first (`mrd coordinator --keep-jobs`).
pub const DEFAULT_KEEP_FINISHED_JOBS: usize = 1000;

/// The most `--keep-jobs` allows: a status reply lists every job kept (a few hundred bytes each, under
/// gRPC's 4 MiB), and a worker's request for a task walks past the finished ones.
pub const MAX_KEEP_FINISHED_JOBS: usize = 10_000;

/// The two phases of a job; tasks of one kind share an index space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskKind {
    /// Turns one input file into `n_reduce` partitions.
    Map,
    /// Turns one partition of every map output into `mr-out-<index>`.
    Reduce,
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskKind::Map => "map",
            TaskKind::Reduce => "reduce",
        })
    }
}

/// Who finished a task, and for map tasks where their output can be fetched (empty for the shared
/// directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The worker whose report won, for status and logs.
    pub worker: String,
    /// Where a map output is served from (gRPC shuffle); compared against fetch-failure reports.
    pub addr: String,
    /// The attempt whose output won: map outputs are named by attempt, so reducers read this one's
    /// and never a straggler's. 0 in records from before attempts named files (their outputs are
    /// then not found, and the map runs again).
    #[serde(default)]
    pub attempt: u64,
}

/// A finished map task's output as reducers look for it: the worker serving it (gRPC shuffle; empty
/// in the shared directory) and the attempt that wrote it, which names its files. Attempt 0: the map
/// is not finished (or re-running after its output was lost).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapOutput {
    /// The worker's shuffle address.
    pub addr: String,
    /// The attempt that wrote it.
    pub attempt: u64,
}

/// The durable part of a task's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Set by the first successful report; cleared only when a map output is found lost.
    pub done: Option<Completion>,
    /// Times handed out, for `mrd status` and the job-count test's diagnostics.
    pub runs: u32,
    /// App failures so far; [`MAX_TASK_FAILURES`] of them fail the job.
    pub failures: u32,
    /// Times a reducer could not read this map's output after it finished (see [`MAX_LOST_OUTPUTS`]).
    #[serde(default)]
    pub lost: u32,
}

/// Where a job is in its life; only the first unfinished job is ever `Running`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for the jobs before it.
    Queued,
    /// Handing out tasks.
    Running,
    /// Every `mr-out-*` is final.
    Done,
    /// A task failed too often; the reason is kept for `mrd status`.
    Failed(String),
}

impl JobState {
    /// Whether the job will never hand out another task.
    pub fn finished(&self) -> bool {
        matches!(self, JobState::Done | JobState::Failed(_))
    }
}

/// Everything the coordinator persists about a job.
///
/// The coordinator service stores the record's header ([`JobRecord::header`]: everything but the task
/// records) under the job's key and every task record under a key of its own, so finishing a task
/// writes a few dozen bytes however many tasks the job has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Assigned at submission, increasing, so id order is queue order.
    pub id: u64,
    /// What to run, as submitted.
    pub spec: JobSpec,
    /// Where the job stands.
    pub state: JobState,
    /// One per map task; empty in a header.
    pub maps: Vec<TaskRecord>,
    /// One per output partition; empty in a header.
    pub reduces: Vec<TaskRecord>,
    /// What each map task reads, fixed at submission (empty in records from before splits: one whole
    /// input each).
    #[serde(default)]
    pub splits: Vec<Split>,
}

impl JobRecord {
    /// The record without its task records, which are stored apart.
    pub fn header(&self) -> JobRecord {
        JobRecord {
            id: self.id,
            spec: self.spec.clone(),
            state: self.state.clone(),
            maps: Vec::new(),
            reduces: Vec::new(),
            splits: self.splits.clone(),
        }
    }

    /// Makes a record read back from storage whole: one split per input for records from before
    /// splits, and task records for every task (stored ones are filled in by the caller).
    pub fn normalize(&mut self) {
        if self.splits.is_empty() {
            self.splits = (0..self.spec.inputs.len())
                .map(|input| Split {
                    input: input as u32,
                    offset: 0,
                    length: u64::MAX,
                })
                .collect();
        }
        self.maps.resize(self.splits.len(), TaskRecord::default());
        self.reduces
            .resize(self.spec.n_reduce as usize, TaskRecord::default());
    }

    /// Called once the stored task records are filled in: a job whose every reduce is done is done,
    /// even if the header saying so never reached the disk (it would otherwise wait forever, and
    /// every job queued behind it).
    pub fn settle(&mut self) {
        if !self.state.finished()
            && !self.reduces.is_empty()
            && self.reduces.iter().all(|t| t.done.is_some())
        {
            self.state = JobState::Done;
        }
    }

    /// Number of map tasks.
    pub fn n_map(&self) -> u32 {
        self.maps.len() as u32
    }

    fn tasks(&self, kind: TaskKind) -> &[TaskRecord] {
        match kind {
            TaskKind::Map => &self.maps,
            TaskKind::Reduce => &self.reduces,
        }
    }

    fn tasks_mut(&mut self, kind: TaskKind) -> &mut Vec<TaskRecord> {
        match kind {
            TaskKind::Map => &mut self.maps,
            TaskKind::Reduce => &mut self.reduces,
        }
    }

    /// Finished tasks of one kind, for progress reports.
    pub fn done_count(&self, kind: TaskKind) -> usize {
        self.tasks(kind).iter().filter(|t| t.done.is_some()).count()
    }
}

/// A task currently handed out.
#[derive(Clone, Debug)]
pub struct Running {
    /// Who has it; only their failure report frees the slot early.
    pub worker: String,
    /// Which hand-out this is, for logs.
    pub attempt: u64,
    /// After this the task may be handed to someone else.
    pub deadline: Instant,
    /// Earlier hand-outs of the task that timed out (worker, attempt): still possibly at work, so
    /// the first of them or of this one to succeed completes the task — a task slower than the
    /// timeout would otherwise never finish. At most `max_attempts` long.
    pub superseded: Vec<(String, u64)>,
    /// Which attempt may move its output into place, until when: one at a time, so two attempts of
    /// a task never both rename into the job's output (a holder that neither reports nor commits
    /// within a task timeout loses it).
    pub commit_grant: Option<(String, u64, Instant)>,
    /// Every attempt granted the commit since the task was first handed out: each may have moved
    /// its output into place (a grant that expired after the rename, before the report, passes to
    /// another attempt), so a success from any of them is taken. At most one per attempt.
    pub granted: Vec<(String, u64)>,
    /// The latest hand-out reported a failure while superseded ones may still finish: the task may
    /// be handed out again at once, and their reports are still heard.
    pub latest_ended: bool,
}

/// Whether the (worker, attempt) pair `held` is `worker`'s `attempt`.
fn is_attempt((held_worker, held_attempt): (&str, u64), worker: &str, attempt: u64) -> bool {
    held_worker == worker && held_attempt == attempt
}

impl Running {
    /// Whether (`worker`, `attempt`) is this latest hand-out.
    fn is_latest(&self, worker: &str, attempt: u64) -> bool {
        is_attempt((&self.worker, self.attempt), worker, attempt)
    }

    /// Whether (`worker`, `attempt`) is this hand-out or one it superseded, and has not ended.
    fn holds(&self, worker: &str, attempt: u64) -> bool {
        (self.is_latest(worker, attempt) && !self.latest_ended)
            || self
                .superseded
                .iter()
                .any(|(w, a)| is_attempt((w, *a), worker, attempt))
    }

    /// The attempts of this task still at work: the latest unless it ended, and those it superseded.
    fn attempts_at_work(&self) -> impl Iterator<Item = u64> + '_ {
        (!self.latest_ended)
            .then_some(self.attempt)
            .into_iter()
            .chain(self.superseded.iter().map(|(_, attempt)| *attempt))
    }

    /// Whether the task may be handed out again at `now`.
    fn free_at(&self, now: Instant) -> bool {
        self.latest_ended || self.deadline <= now
    }

    /// Whether (`worker`, `attempt`) holds the commit grant (expired or not).
    fn granted_to(&self, worker: &str, attempt: u64) -> bool {
        self.commit_grant
            .as_ref()
            .is_some_and(|(w, a, _)| is_attempt((w, *a), worker, attempt))
    }

    /// Whether (`worker`, `attempt`) was ever granted the commit (it may have renamed its output).
    fn ever_granted(&self, worker: &str, attempt: u64) -> bool {
        self.granted
            .iter()
            .any(|(w, a)| is_attempt((w, *a), worker, attempt))
    }
}

struct Job {
    record: JobRecord,
    running_maps: Vec<Option<Running>>,
    running_reduces: Vec<Option<Running>>,
    /// Per map, the output last found lost, and the other reduce attempts at work when it was: each
    /// of those may report the same loss once and have its hand-out given back too (not persisted:
    /// after a restart every task is handed out afresh).
    lost_outputs: HashMap<u32, (MapOutput, HashSet<u64>)>,
}

impl Job {
    fn new(record: JobRecord) -> Self {
        let running_maps = vec![None; record.maps.len()];
        let running_reduces = vec![None; record.reduces.len()];
        Self {
            record,
            running_maps,
            running_reduces,
            lost_outputs: HashMap::new(),
        }
    }

    fn running_mut(&mut self, kind: TaskKind) -> &mut Vec<Option<Running>> {
        match kind {
            TaskKind::Map => &mut self.running_maps,
            TaskKind::Reduce => &mut self.running_reduces,
        }
    }

    fn running(&self, kind: TaskKind) -> &[Option<Running>] {
        match kind {
            TaskKind::Map => &self.running_maps,
            TaskKind::Reduce => &self.running_reduces,
        }
    }
}

/// The worker asking for a task.
#[derive(Clone, Debug)]
pub struct WorkerInfo<'a> {
    /// Stable for the worker process's lifetime.
    pub id: &'a str,
    /// Whether it takes map tasks (`mrd worker --only`).
    pub accept_map: bool,
    /// Whether it takes reduce tasks.
    pub accept_reduce: bool,
}

/// A task handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The job the task belongs to; reports name it.
    pub job_id: u64,
    /// The job's spec without its inputs ([`JobSpec::without_inputs`]): a task stays small however
    /// many inputs the job has.
    pub spec: JobSpec,
    /// Map or reduce.
    pub kind: TaskKind,
    /// Map task (split) index or partition (reduce).
    pub index: u32,
    /// Unique per hand-out: reports and commits must name it.
    pub attempt: u64,
    /// Map tasks: the input file and the part of it to read.
    pub split: Option<(std::path::PathBuf, Split)>,
    /// Number of map tasks: a reducer gathers one output from each.
    pub n_map: u32,
    /// The worker that had this task before it timed out, if any (for logs).
    pub took_over_from: Option<String>,
}

/// Map outputs' locations per page of [`Coordinator::locations`]: ~25 bytes each, so a page is a
/// few hundred KiB, far under gRPC's 4 MiB message limit.
pub const LOCATIONS_PAGE: usize = 8192;

/// What changed durably since the last [`Coordinator::take_changed`], for the caller to persist
/// before it answers: the headers of new jobs (written once: they hold every input and split), job
/// states and single task records (a few dozen bytes each).
#[derive(Debug, Default)]
pub struct Changes {
    /// Headers ([`JobRecord::header`]) of jobs just submitted.
    pub jobs: Vec<JobRecord>,
    /// Jobs whose state changed, with the new state.
    pub states: Vec<(u64, JobState)>,
    /// Task records that changed: (job, kind, index, record).
    pub tasks: Vec<(u64, TaskKind, u32, TaskRecord)>,
    /// Finished jobs forgotten (beyond the newest `keep_finished`): remove everything stored of them.
    pub forgotten: Vec<u64>,
}

impl Changes {
    /// Whether nothing needs persisting.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.states.is_empty()
            && self.tasks.is_empty()
            && self.forgotten.is_empty()
    }
}

/// What a worker should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// No job is queued or running.
    Idle,
    /// A job is running but has nothing for this worker right now.
    Wait,
    /// Run this task.
    Run(Box<Task>),
}

/// How a task attempt ended, as reported by its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Map tasks carry the address their output is served from.
    Succeeded {
        /// The worker's shuffle address its map output is served from (empty when outputs go through
        /// the shared directory).
        addr: String,
    },
    /// The attempt failed; the worker's error.
    Failed(String),
    /// Map outputs (index, the output looked for) a reducer could not read.
    FetchFailed(Vec<(u32, MapOutput)>),
}

/// A report the coordinator must refuse; the service turns it into an `InvalidArgument`/`NotFound` status.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The job id is unknown.
    #[error("no job {0}")]
    NoSuchJob(u64),
    /// The job has no such task.
    #[error("job {job} has no {kind} task {index}")]
    NoSuchTask {
        /// The job.
        job: u64,
        /// Map or reduce.
        kind: TaskKind,
        /// The task's index.
        index: u32,
    },
    /// The report is not from an attempt the coordinator handed out and waits for: the coordinator
    /// restarted since, the task failed and was handed out afresh, or the report is forged. Its outcome
    /// changes nothing (a stale success must not complete a task with its own output address).
    #[error("job {job} {kind} task {index}: attempt {attempt} of worker {worker:?} is not one it waits for")]
    NotCurrent {
        /// The job.
        job: u64,
        /// Map or reduce.
        kind: TaskKind,
        /// The task's index.
        index: u32,
        /// The attempt reported.
        attempt: u64,
        /// The worker that reported.
        worker: String,
    },
    /// A reduce attempt reported success without ever having been granted the commit: it cannot
    /// have moved its output into place ([`Coordinator::may_commit`]), so taking its word would finish a
    /// job whose output file is missing.
    #[error("job {job} reduce task {index}: attempt {attempt} of worker {worker:?} reported success without the commit grant")]
    Uncommitted {
        /// The job.
        job: u64,
        /// The task's index.
        index: u32,
        /// The attempt reported.
        attempt: u64,
        /// The worker that reported.
        worker: String,
    },
}

/// A new attempt number. Random, so that no worker can guess the attempt of a task handed to
/// another and report for it (a worker's id is in `mrd status`; counting attempts from the clock
/// let a worker narrow them down from its own), and none handed out after a restart repeats one
/// from before it but by a 2^-64 chance: a pre-restart attempt cannot pass for a current one.
/// Never 0, which `MapLocations` uses for "not finished".
fn fresh_attempt() -> u64 {
    loop {
        let attempt = rand::random::<u64>();
        if attempt != 0 {
            return attempt;
        }
    }
}

/// A job's state plus who is running what, for status displays.
pub struct JobView<'a> {
    /// The durable state.
    pub record: &'a JobRecord,
    /// Who runs each map task right now.
    pub running_maps: &'a [Option<Running>],
    /// Who runs each reduce task right now.
    pub running_reduces: &'a [Option<Running>],
}

/// The scheduling state of every job.
pub struct Coordinator {
    jobs: BTreeMap<u64, Job>,
    timeout: Duration,
    max_attempts: u32,
    /// Jobs submitted, whose header the caller must persist ([`Coordinator::take_changed`]).
    submitted: std::collections::BTreeSet<u64>,
    /// Jobs whose state changed, likewise.
    dirty_jobs: std::collections::BTreeSet<u64>,
    /// Task records that changed, likewise.
    dirty_tasks: std::collections::BTreeSet<(u64, TaskKind, u32)>,
    /// How many finished jobs are kept (at least 1).
    keep_finished: usize,
    /// Jobs forgotten whose stored records the caller must remove, likewise.
    forgotten: std::collections::BTreeSet<u64>,
}

impl Coordinator {
    /// Rebuilds the state from persisted records (none for a fresh coordinator). Jobs that were mid-way
    /// continue; their in-flight tasks are forgotten and handed out again.
    pub fn restore(records: impl IntoIterator<Item = JobRecord>, timeout: Duration) -> Self {
        let jobs = records
            .into_iter()
            .map(|mut record| {
                record.normalize();
                (record.id, Job::new(record))
            })
            .collect();
        Self {
            jobs,
            timeout,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            submitted: Default::default(),
            dirty_jobs: Default::default(),
            dirty_tasks: Default::default(),
            keep_finished: DEFAULT_KEEP_FINISHED_JOBS,
            forgotten: Default::default(),
        }
    }

    /// Keep only the newest `keep` finished jobs (at least 1); the older ones are forgotten at once
    /// (see [`Changes::forgotten`]). [`Coordinator::restore`] forgets nothing itself (this limit is
    /// not known yet there), so a raised limit keeps what the default would not.
    pub fn with_keep_finished(mut self, keep: usize) -> Self {
        self.keep_finished = keep.max(1);
        self.forget_beyond_limit();
        self
    }

    /// Forget finished jobs beyond the newest `keep_finished`. The newest job is never among them (it
    /// is either unfinished or the newest finished one), so the next id stays above every id used.
    fn forget_beyond_limit(&mut self) {
        let finished: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.record.state.finished())
            .map(|(&id, _)| id)
            .collect();
        let excess = finished.len().saturating_sub(self.keep_finished);
        for &id in &finished[..excess] {
            self.jobs.remove(&id);
            self.submitted.remove(&id);
            self.dirty_jobs.remove(&id);
            self.dirty_tasks.retain(|&(job, _, _)| job != id);
            self.forgotten.insert(id);
        }
    }

    /// The newest job id handed out that is still known (0: none), to tell a forgotten job from one
    /// that never was.
    pub fn newest_id(&self) -> u64 {
        self.jobs.keys().next_back().copied().unwrap_or(0)
    }

    /// How many finished jobs are kept.
    pub fn keep_finished(&self) -> usize {
        self.keep_finished
    }

    /// Fail a job once one of its tasks was handed out `max_attempts` times without finishing (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// What changed durably since the last call (submissions, re-runs counted, completions, jobs
    /// finished or failed): persist it before answering, so nothing a caller was told is lost in a
    /// restart. Task records are small, so this costs O(1) per task however big the job.
    pub fn take_changed(&mut self) -> Changes {
        if !self.dirty_jobs.is_empty() {
            // A job may have just finished: the oldest finished one may be one too many now.
            self.forget_beyond_limit();
        }
        let mut changes = Changes {
            forgotten: std::mem::take(&mut self.forgotten).into_iter().collect(),
            ..Changes::default()
        };
        for id in std::mem::take(&mut self.submitted) {
            if let Some(job) = self.jobs.get(&id) {
                changes.jobs.push(job.record.header());
            }
        }
        for id in std::mem::take(&mut self.dirty_jobs) {
            if let Some(job) = self.jobs.get(&id) {
                changes.states.push((id, job.record.state.clone()));
            }
        }
        for (id, kind, index) in std::mem::take(&mut self.dirty_tasks) {
            if let Some(task) = self
                .jobs
                .get(&id)
                .and_then(|job| job.record.tasks(kind).get(index as usize))
            {
                changes.tasks.push((id, kind, index, task.clone()));
            }
        }
        changes
    }

    /// Marks `changes` as still to persist (storing them failed), so the next
    /// [`Coordinator::take_changed`] returns them again rather than a later answer passing for durable.
    pub fn requeue(&mut self, changes: &Changes) {
        self.submitted
            .extend(changes.jobs.iter().map(|header| header.id));
        self.dirty_jobs
            .extend(changes.states.iter().map(|(id, _)| *id));
        self.dirty_tasks.extend(
            changes
                .tasks
                .iter()
                .map(|(id, kind, index, _)| (*id, *kind, *index)),
        );
        self.forgotten.extend(changes.forgotten.iter().copied());
    }

    /// Queues a job whose inputs are cut into `splits` ([`JobSpec::splits`]) and returns its id; the
    /// caller must persist [`Coordinator::take_changed`] before acknowledging.
    pub fn submit(&mut self, spec: JobSpec, splits: Vec<Split>) -> u64 {
        let id = self.jobs.keys().next_back().map_or(1, |last| last + 1);
        let record = JobRecord {
            id,
            maps: vec![TaskRecord::default(); splits.len()],
            reduces: vec![TaskRecord::default(); spec.n_reduce as usize],
            spec,
            state: JobState::Queued,
            splits,
        };
        self.jobs.insert(id, Job::new(record));
        self.submitted.insert(id);
        id
    }

    /// The persisted record of job `id`.
    pub fn record(&self, id: u64) -> Option<&JobRecord> {
        self.jobs.get(&id).map(|job| &job.record)
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = JobView<'_>> {
        self.jobs.values().map(|job| JobView {
            record: &job.record,
            running_maps: &job.running_maps,
            running_reduces: &job.running_reduces,
        })
    }

    /// Picks a task for `worker`: the first of the current phase's tasks that is neither done nor running
    /// within its deadline.
    pub fn assign(&mut self, worker: &WorkerInfo<'_>, now: Instant) -> Assignment {
        loop {
            match self.assign_in_current_job(worker, now) {
                // The job failed for a task's attempts: the queue moves on to the next job.
                None => continue,
                Some(assignment) => return assignment,
            }
        }
    }

    /// [`Coordinator::assign`] within the first unfinished job; `None` if that job just failed because
    /// the task it would hand out has had all its attempts.
    fn assign_in_current_job(
        &mut self,
        worker: &WorkerInfo<'_>,
        now: Instant,
    ) -> Option<Assignment> {
        let (timeout, max_attempts) = (self.timeout, self.max_attempts);
        let Some(job) = self
            .jobs
            .values_mut()
            .find(|job| !job.record.state.finished())
        else {
            return Some(Assignment::Idle);
        };
        job.record.state = JobState::Running;
        let maps_done = job.record.maps.iter().all(|t| t.done.is_some());
        let (kind, accepted) = if maps_done {
            (TaskKind::Reduce, worker.accept_reduce)
        } else {
            (TaskKind::Map, worker.accept_map)
        };
        if !accepted {
            return Some(Assignment::Wait);
        }
        let available = job
            .record
            .tasks(kind)
            .iter()
            .zip(job.running(kind))
            .position(|(task, running)| {
                task.done.is_none() && running.as_ref().is_none_or(|r| r.free_at(now))
            });
        let Some(index) = available else {
            return Some(Assignment::Wait);
        };
        let runs = job.record.tasks(kind)[index].runs;
        if runs >= max_attempts {
            let last = job.running(kind)[index]
                .as_ref()
                .map_or_else(|| "none".to_string(), |r| r.worker.clone());
            job.record.state = JobState::Failed(format!(
                "{kind} task {index} was handed out {runs} times without finishing (--max-attempts \
                 {max_attempts}); its workers may be dying on it (last worker: {last})"
            ));
            self.dirty_jobs.insert(job.record.id);
            return None;
        }
        if runs > 0 {
            // A re-run: count it durably, so a task that keeps killing workers fails its job even
            // across coordinator restarts.
            self.dirty_tasks.insert((job.record.id, kind, index as u32));
        }
        let attempt = fresh_attempt();
        let previous = job.running_mut(kind)[index].take();
        let (superseded, commit_grant, granted) = match &previous {
            Some(p) => {
                let mut superseded = p.superseded.clone();
                if !p.latest_ended {
                    // Timed out, perhaps still at work; one that reported a failure is done.
                    superseded.push((p.worker.clone(), p.attempt));
                }
                (superseded, p.commit_grant.clone(), p.granted.clone())
            }
            None => (Vec::new(), None, Vec::new()),
        };
        job.running_mut(kind)[index] = Some(Running {
            worker: worker.id.to_string(),
            attempt,
            deadline: now + timeout,
            superseded,
            commit_grant,
            granted,
            latest_ended: false,
        });
        job.record.tasks_mut(kind)[index].runs += 1;
        let split = match kind {
            TaskKind::Map => job.record.splits.get(index).and_then(|split| {
                let path = job.record.spec.inputs.get(split.input as usize)?;
                Some((path.clone(), *split))
            }),
            TaskKind::Reduce => None,
        };
        Some(Assignment::Run(Box::new(Task {
            job_id: job.record.id,
            spec: job.record.spec.without_inputs(),
            kind,
            index: index as u32,
            attempt,
            split,
            n_map: job.record.n_map(),
            took_over_from: previous.map(|r| r.worker),
        })))
    }

    /// How many jobs are queued or running, and how many tasks they have in all.
    pub fn pending(&self) -> (usize, usize) {
        self.jobs
            .values()
            .filter(|job| !job.record.state.finished())
            .fold((0, 0), |(jobs, tasks), job| {
                (
                    jobs + 1,
                    tasks + job.record.maps.len() + job.record.reduces.len(),
                )
            })
    }

    /// Where map tasks `start..` of job `job_id` serve their outputs and which attempt wrote them, at
    /// most [`LOCATIONS_PAGE`] of them; attempt 0 for a map not finished (re-running after a lost
    /// output). Reducers page through these instead of receiving them all with their task.
    pub fn locations(&self, job_id: u64, start: u32) -> Result<Vec<MapOutput>, ReportError> {
        let job = self
            .jobs
            .get(&job_id)
            .ok_or(ReportError::NoSuchJob(job_id))?;
        Ok(job
            .record
            .maps
            .iter()
            .skip(start as usize)
            .take(LOCATIONS_PAGE)
            .map(|t| {
                t.done
                    .as_ref()
                    .map_or_else(MapOutput::default, |c| MapOutput {
                        addr: c.addr.clone(),
                        attempt: c.attempt,
                    })
            })
            .collect())
    }

    /// The index of task `index` of `kind` in job `job_id`, or why a worker's message names nothing.
    fn locate(&self, job_id: u64, kind: TaskKind, index: u32) -> Result<usize, ReportError> {
        let job = self
            .jobs
            .get(&job_id)
            .ok_or(ReportError::NoSuchJob(job_id))?;
        if (index as usize) < job.record.tasks(kind).len() {
            Ok(index as usize)
        } else {
            Err(ReportError::NoSuchTask {
                job: job_id,
                kind,
                index,
            })
        }
    }

    /// Whether `worker` may move the output of `attempt` into place (an output committer, as
    /// Hadoop's): an attempt handed out (the latest or one it superseded) of a task not yet done, of a
    /// job still running, and only one attempt at a time — the first to ask holds the grant until it
    /// reports, or for a task timeout. An attempt refused (its job ended, perhaps followed by another
    /// job writing the same directory; its task done; another attempt committing) removes its staged
    /// file instead of replacing a file it does not own.
    pub fn may_commit(
        &mut self,
        job_id: u64,
        kind: TaskKind,
        index: u32,
        worker: &str,
        attempt: u64,
        now: Instant,
    ) -> Result<bool, ReportError> {
        let i = self.locate(job_id, kind, index)?;
        let timeout = self.timeout;
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Err(ReportError::NoSuchJob(job_id));
        };
        if job.record.state.finished() || job.record.tasks(kind)[i].done.is_some() {
            return Ok(false);
        }
        let Some(running) = job.running_mut(kind)[i].as_mut() else {
            return Ok(false);
        };
        if !running.holds(worker, attempt) {
            return Ok(false);
        }
        let grant_live = running
            .commit_grant
            .as_ref()
            .is_some_and(|(_, _, until)| now < *until);
        if grant_live && !running.granted_to(worker, attempt) {
            return Ok(false);
        }
        running.commit_grant = Some((worker.to_string(), attempt, now + timeout));
        if !running.ever_granted(worker, attempt) {
            running.granted.push((worker.to_string(), attempt));
        }
        Ok(true)
    }

    /// Whether `attempt`'s success is the one recorded for the task: a report retried after its reply
    /// was lost is told it was taken, so its worker keeps the outputs reducers will read.
    pub fn took(
        &self,
        job_id: u64,
        kind: TaskKind,
        index: u32,
        worker: &str,
        attempt: u64,
    ) -> bool {
        self.jobs
            .get(&job_id)
            .and_then(|job| job.record.tasks(kind).get(index as usize))
            .and_then(|task| task.done.as_ref())
            .is_some_and(|done| done.attempt == attempt && done.worker == worker)
    }

    /// Applies a worker's report of `attempt`. Returns whether the job's durable record changed (and so
    /// must be persisted before the report is acknowledged). Only an attempt handed out — the latest,
    /// or one it superseded after a timeout (a slow task, still at work) — by the worker reporting it,
    /// is taken ([`ReportError::NotCurrent`] otherwise); a report for a task already done or a job
    /// already finished changes nothing. A superseded attempt's failure is counted, but the latest
    /// attempt keeps running.
    pub fn report(
        &mut self,
        job_id: u64,
        kind: TaskKind,
        index: u32,
        worker: &str,
        attempt: u64,
        outcome: Outcome,
    ) -> Result<bool, ReportError> {
        let i = self.locate(job_id, kind, index)?;
        let job = self
            .jobs
            .get_mut(&job_id)
            .ok_or(ReportError::NoSuchJob(job_id))?;
        if job.record.state.finished() || job.record.tasks(kind)[i].done.is_some() {
            // A duplicate or a straggler from before a re-execution: the first completion already won.
            return Ok(false);
        }
        let slot = &mut job.running_mut(kind)[i];
        let Some(running) = slot.as_mut().filter(|r| r.holds(worker, attempt)) else {
            return Err(ReportError::NotCurrent {
                job: job_id,
                kind,
                index,
                attempt,
                worker: worker.to_string(),
            });
        };
        let failed = !matches!(outcome, Outcome::Succeeded { .. });
        if kind == TaskKind::Reduce && !failed && !running.ever_granted(worker, attempt) {
            return Err(ReportError::Uncommitted {
                job: job_id,
                index,
                attempt,
                worker: worker.to_string(),
            });
        }
        if running.is_latest(worker, attempt) && failed && !running.superseded.is_empty() {
            // Earlier attempts may still finish: keep hearing them, and free the task for another.
            running.latest_ended = true;
            if running.granted_to(worker, attempt) {
                running.commit_grant = None;
            }
        } else if running.is_latest(worker, attempt) {
            *slot = None;
        } else {
            // A superseded attempt has ended: heard once (a retried failure must not count twice).
            running
                .superseded
                .retain(|(w, a)| !is_attempt((w, *a), worker, attempt));
            if running.granted_to(worker, attempt) {
                // It reports without having committed: it gives the grant back.
                running.commit_grant = None;
            }
        }
        let state_before = job.record.state.clone();
        match outcome {
            Outcome::Succeeded { addr } => {
                job.running_mut(kind)[i] = None;
                job.record.tasks_mut(kind)[i].done = Some(Completion {
                    worker: worker.to_string(),
                    addr,
                    attempt,
                });
                self.dirty_tasks.insert((job_id, kind, index));
                if kind == TaskKind::Reduce && job.record.reduces.iter().all(|t| t.done.is_some()) {
                    job.record.state = JobState::Done;
                }
            }
            Outcome::Failed(error) => {
                let task = &mut job.record.tasks_mut(kind)[i];
                task.failures += 1;
                self.dirty_tasks.insert((job_id, kind, index));
                if task.failures >= MAX_TASK_FAILURES {
                    job.record.state = JobState::Failed(format!(
                        "{kind} task {index} failed {} times; last error: {error}",
                        task.failures
                    ));
                }
            }
            Outcome::FetchFailed(missing) => {
                let shared = job.record.spec.shuffle == crate::mr::job::ShuffleMode::SharedDir;
                let mut found_lost = false;
                for (map, lost) in missing {
                    let Some(task) = job.record.maps.get_mut(map as usize) else {
                        continue;
                    };
                    // Only the output that won counts: a report about an earlier attempt's (a
                    // reducer that looked before the map re-ran) must not undo the re-run.
                    if task
                        .done
                        .as_ref()
                        .is_some_and(|c| c.addr == lost.addr && c.attempt == lost.attempt)
                    {
                        found_lost = true;
                        // Other reducers at work may have looked for it too: their reports of it
                        // give their hand-outs back as well, once each.
                        let others = job
                            .running_reduces
                            .iter()
                            .flatten()
                            .flat_map(Running::attempts_at_work)
                            .filter(|other| *other != attempt)
                            .collect();
                        job.lost_outputs.insert(map, (lost.clone(), others));
                        task.done = None;
                        task.lost += 1;
                        self.dirty_tasks.insert((job_id, TaskKind::Map, map));
                        job.running_maps[map as usize] = None;
                        if shared && task.lost >= MAX_LOST_OUTPUTS {
                            job.record.state = JobState::Failed(format!(
                                "reduce task {index} could not read the output of map task {map} \
                                 ({}) in {} although the map finished {} times: every \
                                 worker must see that directory at the same path (a shared file \
                                 system), or use --shuffle grpc",
                                intermediate_name(job_id, map, index, lost.attempt),
                                job.record.spec.output_dir.display(),
                                task.lost
                            ));
                            break;
                        }
                    } else if job
                        .lost_outputs
                        .get_mut(&map)
                        .is_some_and(|(known, others)| *known == lost && others.remove(&attempt))
                    {
                        found_lost = true;
                    }
                }
                if found_lost {
                    // The attempt stopped on an output now re-running, not on its own fault: its
                    // hand-out is given back. The map's re-run is counted against the map.
                    let reduce = &mut job.record.tasks_mut(kind)[i];
                    reduce.runs = reduce.runs.saturating_sub(1);
                    self.dirty_tasks.insert((job_id, kind, index));
                }
            }
        }
        if job.record.state != state_before {
            self.dirty_jobs.insert(job_id);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::job::ShuffleMode;
    use std::path::PathBuf;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn spec(maps: usize, reduces: u32) -> JobSpec {
        JobSpec {
            app: "wc".into(),
            args: vec![],
            inputs: (0..maps)
                .map(|i| PathBuf::from(format!("/in/{i}")))
                .collect(),
            n_reduce: reduces,
            output_dir: PathBuf::from("/out"),
            shuffle: ShuffleMode::Grpc,
            split_size: 0,
        }
    }

    /// A coordinator with one job of one map and one reduce, whose map `a` has finished.
    fn one_map_done(now: Instant) -> (Coordinator, u64) {
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let map = run(c.assign(&worker("a"), now));
        c.report(id, TaskKind::Map, 0, "a", map.attempt, ok("a:1"))
            .unwrap();
        (c, id)
    }

    /// Submits `spec` with one whole-file split per input.
    fn submit(c: &mut Coordinator, spec: JobSpec) -> u64 {
        let splits = (0..spec.inputs.len() as u32)
            .map(|input| Split {
                input,
                offset: 0,
                length: u64::MAX,
            })
            .collect();
        c.submit(spec, splits)
    }

    fn worker(id: &str) -> WorkerInfo<'_> {
        WorkerInfo {
            id,
            accept_map: true,
            accept_reduce: true,
        }
    }

    fn run(assignment: Assignment) -> Task {
        match assignment {
            Assignment::Run(task) => *task,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    fn addrs(outputs: Vec<MapOutput>) -> Vec<String> {
        outputs.into_iter().map(|o| o.addr).collect()
    }

    /// Whether `worker`'s `attempt` of reduce 0 of job `id` may commit at `now`.
    fn reduce_commits(
        c: &mut Coordinator,
        id: u64,
        worker: &str,
        attempt: u64,
        now: Instant,
    ) -> bool {
        c.may_commit(id, TaskKind::Reduce, 0, worker, attempt, now)
            .unwrap()
    }

    /// `worker`'s `attempt` of reduce 0 of job `id` is granted the commit at `now` and reports its
    /// success, which is taken.
    fn finish_reduce(c: &mut Coordinator, id: u64, worker: &str, attempt: u64, now: Instant) {
        assert!(reduce_commits(c, id, worker, attempt, now));
        assert!(c
            .report(id, TaskKind::Reduce, 0, worker, attempt, ok(""))
            .unwrap());
    }

    fn ok(addr: &str) -> Outcome {
        Outcome::Succeeded { addr: addr.into() }
    }

    #[test]
    fn maps_then_reduces_then_done() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        assert_eq!(c.assign(&worker("w"), now), Assignment::Idle);
        let id = submit(&mut c, spec(2, 1));
        let m0 = run(c.assign(&worker("a"), now));
        let m1 = run(c.assign(&worker("b"), now));
        assert_eq!((m0.kind, m0.index, m1.index), (TaskKind::Map, 0, 1));
        // Reduces wait for every map.
        assert_eq!(c.assign(&worker("c"), now), Assignment::Wait);
        assert!(c
            .report(id, TaskKind::Map, 0, "a", m0.attempt, ok("a:1"))
            .unwrap());
        assert_eq!(c.assign(&worker("c"), now), Assignment::Wait);
        c.report(id, TaskKind::Map, 1, "b", m1.attempt, ok("b:1"))
            .unwrap();
        let r0 = run(c.assign(&worker("c"), now));
        assert_eq!(
            (r0.kind, r0.n_map, addrs(c.locations(id, 0).unwrap())),
            (TaskKind::Reduce, 2, vec!["a:1".to_string(), "b:1".into()])
        );
        // The attempts that won, which name the files reducers read.
        let attempts: Vec<u64> = c
            .locations(id, 0)
            .unwrap()
            .iter()
            .map(|o| o.attempt)
            .collect();
        assert_eq!(attempts, vec![m0.attempt, m1.attempt]);
        assert_eq!(addrs(c.locations(id, 1).unwrap()), vec!["b:1".to_string()]);
        assert!(reduce_commits(&mut c, id, "c", r0.attempt, now));
        c.report(id, TaskKind::Reduce, 0, "c", r0.attempt, ok(""))
            .unwrap();
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
        assert_eq!(c.assign(&worker("c"), now), Assignment::Idle);
    }

    #[test]
    fn timed_out_tasks_go_to_another_worker_and_the_first_success_of_any_attempt_completes() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let first = run(c.assign(&worker("slow"), now));
        assert_eq!(c.assign(&worker("b"), now + TIMEOUT / 2), Assignment::Wait);
        let again = run(c.assign(&worker("b"), now + TIMEOUT));
        assert_eq!(again.took_over_from.as_deref(), Some("slow"));
        // Reports naming an attempt with another worker than the one it went to are refused.
        assert!(matches!(
            c.report(id, TaskKind::Map, 0, "b", first.attempt, ok("b")),
            Err(ReportError::NotCurrent { .. })
        ));
        assert!(c
            .report(id, TaskKind::Map, 0, "slow", again.attempt, ok("slow"))
            .is_err());
        assert!(c.record(id).unwrap().maps[0].done.is_none());
        // The slow original, still at work, finishes first: its success completes the task.
        assert!(c
            .report(id, TaskKind::Map, 0, "slow", first.attempt, ok("slow"))
            .unwrap());
        assert_eq!(
            c.record(id).unwrap().maps[0]
                .done
                .as_ref()
                .map(|d| (d.addr.as_str(), d.attempt)),
            Some(("slow", first.attempt))
        );
        assert_eq!(c.record(id).unwrap().maps[0].runs, 2);
        // The newer attempt finishing later changes nothing and was not taken: it removes its files.
        assert!(!c
            .report(id, TaskKind::Map, 0, "b", again.attempt, ok("b"))
            .unwrap());
        assert!(!c.took(id, TaskKind::Map, 0, "b", again.attempt));
        // The winner's report again (its reply was lost): nothing changes, but it was taken.
        assert!(!c
            .report(id, TaskKind::Map, 0, "slow", first.attempt, ok("slow"))
            .unwrap());
        assert!(c.took(id, TaskKind::Map, 0, "slow", first.attempt));
    }

    #[test]
    fn a_superseded_attempt_is_still_heard_after_the_latest_one_failed() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let slow = run(c.assign(&worker("slow"), now));
        let later = run(c.assign(&worker("b"), now + TIMEOUT));
        let failed = Outcome::Failed("boom".into());
        c.report(id, TaskKind::Map, 0, "b", later.attempt, failed)
            .unwrap();
        // The task is free again at once, and the slow original is still heard.
        let third = run(c.assign(&worker("c"), now + TIMEOUT));
        assert_eq!((third.kind, third.index), (TaskKind::Map, 0));
        assert!(c
            .report(id, TaskKind::Map, 0, "slow", slow.attempt, ok("slow"))
            .unwrap());
        assert_eq!(
            c.record(id).unwrap().maps[0]
                .done
                .as_ref()
                .map(|d| d.attempt),
            Some(slow.attempt)
        );
    }

    #[test]
    fn a_task_slower_than_the_timeout_finishes_before_its_attempts_run_out() {
        // Every attempt takes 1.5 timeouts: with only the latest hand-out heard, each success came
        // after the next hand-out and the job failed at `max_attempts`.
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let map = run(c.assign(&worker("a"), now));
        let _second = run(c.assign(&worker("b"), now + TIMEOUT));
        assert!(c
            .report(id, TaskKind::Map, 0, "a", map.attempt, ok("a"))
            .unwrap());
        let reduce = run(c.assign(&worker("a"), now + TIMEOUT * 3 / 2));
        assert_eq!(reduce.kind, TaskKind::Reduce);
        let at = |timeouts: u32| now + TIMEOUT * 3 / 2 + TIMEOUT * timeouts;
        let second = run(c.assign(&worker("b"), at(1)));
        // The first attempt asks to commit after its deadline: granted, and the newer one is not
        // while the grant lasts (both would rename into the job's output).
        let later = at(1) + TIMEOUT / 2;
        assert!(reduce_commits(&mut c, id, "a", reduce.attempt, later));
        assert!(!reduce_commits(&mut c, id, "b", second.attempt, later));
        assert!(c
            .report(id, TaskKind::Reduce, 0, "a", reduce.attempt, ok(""))
            .unwrap());
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
    }

    #[test]
    fn a_commit_grant_that_is_never_used_passes_to_another_attempt_after_a_timeout() {
        let now = Instant::now();
        let (mut c, id) = one_map_done(now);
        let first = run(c.assign(&worker("a"), now));
        assert!(reduce_commits(&mut c, id, "a", first.attempt, now));
        // Asking again (a retry after a lost reply) keeps the grant.
        assert!(c
            .may_commit(
                id,
                TaskKind::Reduce,
                0,
                "a",
                first.attempt,
                now + TIMEOUT / 2
            )
            .unwrap());
        let second = run(c.assign(&worker("b"), now + TIMEOUT));
        assert!(!reduce_commits(
            &mut c,
            id,
            "b",
            second.attempt,
            now + TIMEOUT
        ));
        // `a` went silent: a timeout after its last grant, `b` may commit, and `a` no longer.
        let expired = now + TIMEOUT / 2 + TIMEOUT;
        assert!(reduce_commits(&mut c, id, "b", second.attempt, expired));
        assert!(!reduce_commits(&mut c, id, "a", first.attempt, expired));
        // A superseded attempt that fails gives nothing up for the latest one, which runs on.
        assert!(c
            .report(
                id,
                TaskKind::Reduce,
                0,
                "a",
                first.attempt,
                Outcome::Failed("x".into())
            )
            .unwrap());
        assert!(c
            .report(id, TaskKind::Reduce, 0, "b", second.attempt, ok(""))
            .unwrap());
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
    }

    /// Runs job `id` (one map, one reduce; the first unfinished job) to completion.
    fn finish(c: &mut Coordinator, id: u64, now: Instant) {
        for kind in [TaskKind::Map, TaskKind::Reduce] {
            let task = run(c.assign(&worker("a"), now));
            assert_eq!((task.job_id, task.kind), (id, kind));
            if kind == TaskKind::Reduce {
                assert!(reduce_commits(c, id, "a", task.attempt, now));
            }
            c.report(id, kind, 0, "a", task.attempt, ok("a:1")).unwrap();
        }
        assert_eq!(c.record(id).map(|r| &r.state), Some(&JobState::Done));
    }

    fn ids(c: &Coordinator) -> Vec<u64> {
        c.jobs().map(|view| view.record.id).collect()
    }

    #[test]
    fn only_the_newest_finished_jobs_are_kept_and_ids_never_repeat() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT).with_keep_finished(2);
        let jobs: Vec<u64> = (0..4).map(|_| submit(&mut c, spec(1, 1))).collect();
        c.take_changed();
        for &id in &jobs[..3] {
            finish(&mut c, id, now);
        }
        // Three finished, two kept: the oldest goes, from memory and (the caller's part) storage.
        assert_eq!(c.take_changed().forgotten, vec![jobs[0]]);
        assert_eq!(ids(&c), jobs[1..]);
        finish(&mut c, jobs[3], now);
        assert_eq!(c.take_changed().forgotten, vec![jobs[1]]);
        // The newest job is kept, so the next id is a new one.
        assert_eq!(submit(&mut c, spec(1, 1)), jobs[3] + 1);
        // A restart with a lower limit forgets the excess at once; storing that may fail and is
        // then asked for again.
        let records: Vec<JobRecord> = c.jobs().map(|view| view.record.clone()).collect();
        let mut restarted = Coordinator::restore(records, TIMEOUT).with_keep_finished(1);
        let changes = restarted.take_changed();
        assert_eq!(changes.forgotten, vec![jobs[2]]);
        restarted.requeue(&changes);
        assert_eq!(restarted.take_changed().forgotten, vec![jobs[2]]);
        assert_eq!(ids(&restarted), vec![jobs[3], jobs[3] + 1]);
    }

    #[test]
    fn a_limit_above_the_default_keeps_every_restored_job() {
        let finished = (1..=DEFAULT_KEEP_FINISHED_JOBS as u64 + 2).map(|id| JobRecord {
            id,
            spec: spec(0, 0),
            state: JobState::Done,
            splits: Vec::new(),
            maps: Vec::new(),
            reduces: Vec::new(),
        });
        let mut c = Coordinator::restore(finished, TIMEOUT)
            .with_keep_finished(DEFAULT_KEEP_FINISHED_JOBS + 10);
        assert_eq!(c.take_changed().forgotten, Vec::<u64>::new());
        assert_eq!(c.jobs().count(), DEFAULT_KEEP_FINISHED_JOBS + 2);
    }

    #[test]
    fn jobs_run_one_after_another() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let first = submit(&mut c, spec(1, 1));
        let second = submit(&mut c, spec(1, 1));
        let map = run(c.assign(&worker("a"), now));
        assert_eq!(map.job_id, first);
        assert_eq!(c.assign(&worker("b"), now), Assignment::Wait);
        c.report(first, TaskKind::Map, 0, "a", map.attempt, ok(""))
            .unwrap();
        let reduce = run(c.assign(&worker("a"), now));
        assert!(reduce_commits(&mut c, first, "a", reduce.attempt, now));
        c.report(first, TaskKind::Reduce, 0, "a", reduce.attempt, ok(""))
            .unwrap();
        assert_eq!(run(c.assign(&worker("a"), now)).job_id, second);
    }

    #[test]
    fn repeated_failures_fail_the_job_and_the_queue_moves_on() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let bad = submit(&mut c, spec(1, 1));
        let good = submit(&mut c, spec(1, 1));
        for _ in 0..MAX_TASK_FAILURES {
            let task = run(c.assign(&worker("a"), now));
            assert_eq!(task.job_id, bad);
            c.report(
                bad,
                TaskKind::Map,
                0,
                "a",
                task.attempt,
                Outcome::Failed("boom".into()),
            )
            .unwrap();
        }
        assert!(
            matches!(&c.record(bad).unwrap().state, JobState::Failed(msg) if msg.contains("boom"))
        );
        assert_eq!(run(c.assign(&worker("a"), now)).job_id, good);
    }

    #[test]
    fn fetch_failure_reruns_the_lost_map_only_if_still_there() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(2, 2));
        let m0 = run(c.assign(&worker("a"), now));
        let m1 = run(c.assign(&worker("b"), now));
        c.report(id, TaskKind::Map, 0, "a", m0.attempt, ok("a:1"))
            .unwrap();
        c.report(id, TaskKind::Map, 1, "b", m1.attempt, ok("b:1"))
            .unwrap();
        let r0 = run(c.assign(&worker("c"), now));
        let r1 = run(c.assign(&worker("d"), now));
        let first = c.locations(id, 0).unwrap()[0].clone();
        assert_eq!(first.addr, "a:1");
        // `a` died: r0 cannot fetch map 0.
        c.report(
            id,
            TaskKind::Reduce,
            r0.index,
            "c",
            r0.attempt,
            Outcome::FetchFailed(vec![(0, first.clone())]),
        )
        .unwrap();
        let rerun = run(c.assign(&worker("c"), now));
        assert_eq!((rerun.kind, rerun.index), (TaskKind::Map, 0));
        c.report(id, TaskKind::Map, 0, "c", rerun.attempt, ok("c:1"))
            .unwrap();
        // r1's stale report about the old output must not undo the re-run, even from the same
        // address (the shared directory has none): the attempt tells them apart.
        let same_addr = MapOutput {
            addr: "c:1".into(),
            attempt: first.attempt,
        };
        let mut reducer = r1;
        for stale in [first, same_addr] {
            c.report(
                id,
                TaskKind::Reduce,
                reducer.index,
                "d",
                reducer.attempt,
                Outcome::FetchFailed(vec![(0, stale)]),
            )
            .unwrap();
            assert!(c.record(id).unwrap().maps[0].done.is_some());
            reducer = run(c.assign(&worker("d"), now));
            assert_eq!(reducer.kind, TaskKind::Reduce);
        }
        assert_eq!(
            c.locations(id, 0).unwrap()[0],
            MapOutput {
                addr: "c:1".into(),
                attempt: rerun.attempt
            }
        );
    }

    #[test]
    fn a_shared_dir_output_reducers_never_see_fails_the_job_naming_the_directory() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let mut shared = spec(1, 1);
        shared.shuffle = ShuffleMode::SharedDir;
        let id = submit(&mut c, shared);
        for round in 1..=MAX_LOST_OUTPUTS {
            let map = run(c.assign(&worker("a"), now));
            assert_eq!(map.kind, TaskKind::Map, "round {round}");
            c.report(id, TaskKind::Map, 0, "a", map.attempt, ok(""))
                .unwrap();
            // The reducer runs where the directory is another one: the file is never there.
            let reduce = run(c.assign(&worker("b"), now));
            let looked_for = c.locations(id, 0).unwrap()[0].clone();
            assert_eq!(looked_for.attempt, map.attempt);
            c.report(
                id,
                TaskKind::Reduce,
                0,
                "b",
                reduce.attempt,
                Outcome::FetchFailed(vec![(0, looked_for)]),
            )
            .unwrap();
        }
        let state = &c.record(id).unwrap().state;
        assert!(
            matches!(state, JobState::Failed(why) if why.contains("/out") && why.contains("same path")),
            "{state:?}"
        );
    }

    #[test]
    fn restart_resumes_from_records_and_reissues_in_flight_tasks() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(2, 1));
        let m0 = run(c.assign(&worker("a"), now));
        run(c.assign(&worker("b"), now));
        c.report(id, TaskKind::Map, 0, "a", m0.attempt, ok(""))
            .unwrap();
        let saved = c.record(id).unwrap().clone();
        let mut restarted = Coordinator::restore([saved], TIMEOUT);
        // Map 1 was in flight at the crash: handed out again immediately, map 0 is not re-run.
        let task = run(restarted.assign(&worker("c"), now));
        assert_eq!((task.kind, task.index), (TaskKind::Map, 1));
        // New jobs get fresh ids after restored ones.
        assert_eq!(submit(&mut restarted, spec(1, 1)), id + 1);
    }

    #[test]
    fn bad_reports_are_refused() {
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        assert_eq!(
            c.report(id + 1, TaskKind::Map, 0, "a", 1, ok("")),
            Err(ReportError::NoSuchJob(id + 1))
        );
        assert!(c.report(id, TaskKind::Reduce, 5, "a", 1, ok("")).is_err());
        // A task nobody was handed: refused too.
        assert!(matches!(
            c.report(id, TaskKind::Map, 0, "a", 1, ok("")),
            Err(ReportError::NotCurrent { .. })
        ));
    }

    #[test]
    fn a_task_that_kills_its_workers_fails_its_job_after_max_attempts_and_the_queue_moves_on() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT).with_max_attempts(3);
        let deadly = submit(&mut c, spec(1, 1));
        let next = submit(&mut c, spec(1, 1));
        // Every worker that takes the map dies silently: no report, only timeouts.
        for n in 0..3u32 {
            let at = now + TIMEOUT * n;
            let task = run(c.assign(&worker(&format!("w{n}")), at));
            assert_eq!((task.job_id, task.index), (deadly, 0));
        }
        // The hand-outs were counted durably (attempts survive a coordinator restart).
        let changed = c.take_changed();
        assert_eq!(
            changed.tasks.iter().map(|(_, _, _, t)| t.runs).max(),
            Some(3)
        );
        let task = run(c.assign(&worker("w3"), now + TIMEOUT * 3));
        assert_eq!(task.job_id, next, "the next job runs");
        assert!(
            matches!(&c.record(deadly).unwrap().state, JobState::Failed(why) if why.contains("map task 0") && why.contains("w2")),
            "{:?}",
            c.record(deadly).unwrap().state
        );
        assert!(c.take_changed().states.iter().any(|(id, _)| *id == deadly));
        // Restored from that record, the job stays failed.
        let saved = c.record(deadly).unwrap().clone();
        let restarted = Coordinator::restore([saved], TIMEOUT);
        assert!(restarted.record(deadly).unwrap().state.finished());
    }

    #[test]
    fn map_only_workers_wait_during_reduces() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let mapper = WorkerInfo {
            id: "m",
            accept_map: true,
            accept_reduce: false,
        };
        let map = run(c.assign(&mapper, now));
        c.report(id, TaskKind::Map, 0, "m", map.attempt, ok("m"))
            .unwrap();
        assert_eq!(c.assign(&mapper, now), Assignment::Wait);
    }

    #[test]
    fn a_superseded_reducer_that_cannot_fetch_a_map_output_makes_the_map_run_again() {
        // A reducer stuck on a paused mapper outlives its deadline; its report of the lost output
        // still counts, or every later attempt would stall on the same mapper until the job failed.
        let now = Instant::now();
        let (mut c, id) = one_map_done(now);
        let lost = c.locations(id, 0).unwrap()[0].clone();
        let stuck = run(c.assign(&worker("r1"), now));
        let _again = run(c.assign(&worker("r2"), now + TIMEOUT));
        let missing = Outcome::FetchFailed(vec![(0, lost)]);
        assert!(c
            .report(id, TaskKind::Reduce, 0, "r1", stuck.attempt, missing)
            .unwrap());
        assert!(c.record(id).unwrap().maps[0].done.is_none());
        let rerun = run(c.assign(&worker("m"), now + TIMEOUT));
        assert_eq!((rerun.kind, rerun.index), (TaskKind::Map, 0));
    }

    /// A reduce that stops on a map output found lost did no wrong: its hand-out is given back, or a
    /// job whose mappers die one after another (each lost output costing a reduce attempt) would fail
    /// at the reduce's `--max-attempts` though every re-run map finished. The maps' own re-runs stay
    /// counted, so a reducer that cannot reach any mapper still ends its job.
    #[test]
    fn a_reduce_stopped_by_a_lost_map_output_keeps_its_attempts() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT).with_max_attempts(2);
        let id = submit(&mut c, spec(2, 2));
        for m in ["m0", "m1"] {
            let map = run(c.assign(&worker(m), now));
            c.report(id, TaskKind::Map, map.index, m, map.attempt, ok(m))
                .unwrap();
        }
        // Each mapper dies in turn under both reducers (both report it); each map re-runs once (its
        // second and last attempt), and each reduce is handed out a third time.
        for lost_map in 0..2u32 {
            let lost = c.locations(id, 0).unwrap()[lost_map as usize].clone();
            let reduces = [
                run(c.assign(&worker("r0"), now)),
                run(c.assign(&worker("r1"), now)),
            ];
            for (reduce, reducer) in reduces.iter().zip(["r0", "r1"]) {
                assert_eq!(reduce.kind, TaskKind::Reduce);
                let missing = Outcome::FetchFailed(vec![(lost_map, lost.clone())]);
                c.report(
                    id,
                    TaskKind::Reduce,
                    reduce.index,
                    reducer,
                    reduce.attempt,
                    missing,
                )
                .unwrap();
            }
            let rerun = run(c.assign(&worker("m2"), now));
            assert_eq!((rerun.kind, rerun.index), (TaskKind::Map, lost_map));
            c.report(id, TaskKind::Map, lost_map, "m2", rerun.attempt, ok("m2"))
                .unwrap();
        }
        for (index, reducer) in [(0u32, "r0"), (1, "r1")] {
            let reduce = run(c.assign(&worker(reducer), now));
            let state = &c.record(id).unwrap().state;
            assert_eq!(
                (reduce.kind, reduce.index),
                (TaskKind::Reduce, index),
                "{state:?}"
            );
            assert!(c
                .may_commit(id, TaskKind::Reduce, index, reducer, reduce.attempt, now)
                .unwrap());
            c.report(id, TaskKind::Reduce, index, reducer, reduce.attempt, ok(""))
                .unwrap();
        }
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
        // A reduce handed out after the loss cannot have been stopped by it: its report of that
        // output gives nothing back (or a reducer could keep its task alive for ever).
        let (mut c, id) = one_map_done(now);
        let lost = c.locations(id, 0).unwrap()[0].clone();
        let first = run(c.assign(&worker("r"), now));
        let missing = || Outcome::FetchFailed(vec![(0, lost.clone())]);
        c.report(id, TaskKind::Reduce, 0, "r", first.attempt, missing())
            .unwrap();
        let rerun = run(c.assign(&worker("m"), now));
        c.report(id, TaskKind::Map, 0, "m", rerun.attempt, ok("m"))
            .unwrap();
        assert_eq!(c.record(id).unwrap().reduces[0].runs, 0);
        let later = run(c.assign(&worker("r"), now));
        c.report(id, TaskKind::Reduce, 0, "r", later.attempt, missing())
            .unwrap();
        assert_eq!(c.record(id).unwrap().reduces[0].runs, 1);
        // A report about an output that was not the one recorded gives nothing back: a reducer cannot
        // keep its task alive with reports about outputs it was never told of.
        let (mut c, id) = one_map_done(now);
        let c = &mut c;
        let stale = MapOutput {
            addr: "elsewhere".into(),
            attempt: 7,
        };
        for _ in 0..DEFAULT_MAX_ATTEMPTS {
            let reduce = run(c.assign(&worker("r"), now));
            let missing = Outcome::FetchFailed(vec![(0, stale.clone())]);
            c.report(id, TaskKind::Reduce, 0, "r", reduce.attempt, missing)
                .unwrap();
        }
        assert_eq!(c.assign(&worker("r"), now), Assignment::Idle);
        assert!(matches!(c.record(id).unwrap().state, JobState::Failed(_)));
    }

    /// A reduce attempt moves its output into place only with the commit grant, so a success
    /// reported without it (forged, or from a worker that skipped the commit) would finish the job
    /// with its output file missing.
    #[test]
    fn a_reduce_success_without_the_commit_grant_is_refused() {
        let now = Instant::now();
        let (mut c, id) = one_map_done(now);
        let reduce = run(c.assign(&worker("r"), now));
        let refused = c.report(id, TaskKind::Reduce, 0, "r", reduce.attempt, ok(""));
        assert!(
            matches!(refused, Err(ReportError::Uncommitted { .. })),
            "{refused:?}"
        );
        assert_eq!(c.record(id).unwrap().state, JobState::Running);
        finish_reduce(&mut c, id, "r", reduce.attempt, now);
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
    }

    /// An attempt whose grant ran out after it renamed its output (and passed to a later attempt)
    /// still reports a success that counts: refused, a task whose every attempt commits slower
    /// than the timeout would fail its job.
    #[test]
    fn a_success_after_the_grant_passed_on_still_counts() {
        let now = Instant::now();
        let (mut c, id) = one_map_done(now);
        let first = run(c.assign(&worker("a"), now));
        assert!(reduce_commits(&mut c, id, "a", first.attempt, now));
        let second = run(c.assign(&worker("b"), now + TIMEOUT));
        // `a`'s grant has run out: `b` takes it over, then `a` reports.
        assert!(reduce_commits(
            &mut c,
            id,
            "b",
            second.attempt,
            now + TIMEOUT * 2
        ));
        assert!(c
            .report(id, TaskKind::Reduce, 0, "a", first.attempt, ok(""))
            .unwrap());
        assert_eq!(c.record(id).unwrap().state, JobState::Done);
    }

    /// A worker sees its own attempt numbers and, in `mrd status`, who runs what: attempts counted
    /// from one base let it guess another worker's and report for it.
    #[test]
    fn attempt_numbers_cannot_be_guessed_from_ones_own() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(8, 1));
        let attempts: Vec<u64> = (0..8)
            .map(|i| run(c.assign(&worker(&format!("w{i}")), now)).attempt)
            .collect();
        for pair in attempts.windows(2) {
            assert!(
                pair[0].abs_diff(pair[1]) > 1 << 20,
                "attempts {attempts:?} of job {id} are close together"
            );
        }
    }

    /// A report retried because its reply was lost is heard once: counted twice, a task's one real
    /// failure could fail its job early.
    #[test]
    fn a_retried_failure_report_counts_once() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(1, 1));
        let first = run(c.assign(&worker("a"), now));
        // `a` times out and `b` takes over; both still count until they report.
        let second = run(c.assign(&worker("b"), now + TIMEOUT));
        for (who, attempt) in [("b", second.attempt), ("a", first.attempt)] {
            let failed = || Outcome::Failed("disk full".into());
            assert!(c
                .report(id, TaskKind::Map, 0, who, attempt, failed())
                .unwrap());
            let again = c.report(id, TaskKind::Map, 0, who, attempt, failed());
            assert!(
                matches!(again, Err(ReportError::NotCurrent { .. })),
                "{who}: {again:?}"
            );
        }
        assert_eq!(c.record(id).unwrap().maps[0].failures, 2);
        assert_eq!(c.record(id).unwrap().state, JobState::Running);
    }

    #[test]
    fn only_an_attempt_handed_out_of_a_running_job_may_commit() {
        let now = Instant::now();
        let (mut c, id) = one_map_done(now);
        let slow = run(c.assign(&worker("slow"), now));
        assert!(!reduce_commits(&mut c, id, "other", slow.attempt, now));
        assert!(reduce_commits(&mut c, id, "slow", slow.attempt, now));
        // Timed out and handed to `b`: the straggler keeps its grant, `b` waits for it.
        let again = run(c.assign(&worker("b"), now + TIMEOUT));
        assert!(reduce_commits(
            &mut c,
            id,
            "slow",
            slow.attempt,
            now + TIMEOUT
        ));
        assert!(!reduce_commits(
            &mut c,
            id,
            "b",
            again.attempt,
            now + TIMEOUT
        ));
        c.report(id, TaskKind::Reduce, 0, "slow", slow.attempt, ok(""))
            .unwrap();
        // Done, and the job over: nobody may.
        for (who, attempt) in [("slow", slow.attempt), ("b", again.attempt)] {
            assert!(!reduce_commits(&mut c, id, who, attempt, now + TIMEOUT * 3));
        }
        assert!(c
            .may_commit(id + 1, TaskKind::Reduce, 0, "b", 1, now)
            .is_err());
        assert!(c.may_commit(id, TaskKind::Reduce, 9, "b", 1, now).is_err());
    }

    #[test]
    fn a_big_job_costs_small_messages_and_small_writes_per_task() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let maps = LOCATIONS_PAGE * 2 + 5;
        let id = submit(&mut c, spec(maps, 1));
        let changes = c.take_changed();
        assert_eq!((changes.jobs.len(), changes.tasks.len()), (1, 0));
        assert!(changes.jobs[0].maps.is_empty(), "a header carries no tasks");
        for _ in 0..maps {
            let task = run(c.assign(&worker("a"), now));
            assert!(task.spec.inputs.is_empty(), "a task carries its split only");
            assert_eq!(task.split.as_ref().unwrap().1.input, task.index);
            c.report(id, TaskKind::Map, task.index, "a", task.attempt, ok("a:1"))
                .unwrap();
            // One completion, one small record to write.
            let changes = c.take_changed();
            assert_eq!(
                (
                    changes.jobs.len(),
                    changes.states.len(),
                    changes.tasks.len()
                ),
                (0, 0, 1)
            );
        }
        let pages: Vec<usize> = [0, LOCATIONS_PAGE, 2 * LOCATIONS_PAGE, maps]
            .iter()
            .map(|&start| c.locations(id, start as u32).unwrap().len())
            .collect();
        assert_eq!(pages, vec![LOCATIONS_PAGE, LOCATIONS_PAGE, 5, 0]);
    }

    #[test]
    fn persisted_headers_and_task_records_restore_the_job() {
        let now = Instant::now();
        let mut c = Coordinator::restore([], TIMEOUT);
        let id = submit(&mut c, spec(3, 1));
        let mut header = c.take_changed().jobs.remove(0);
        let map = run(c.assign(&worker("a"), now));
        c.report(id, TaskKind::Map, map.index, "a", map.attempt, ok("a:1"))
            .unwrap();
        let (_, kind, index, task) = c.take_changed().tasks.remove(0);
        // What the service does on start: header, normalised, with the stored task records.
        header.normalize();
        assert_eq!((header.maps.len(), header.reduces.len()), (3, 1));
        assert_eq!(kind, TaskKind::Map);
        header.maps[index as usize] = task;
        let mut restarted = Coordinator::restore([header], TIMEOUT);
        let next = run(restarted.assign(&worker("b"), now));
        assert_eq!((next.kind, next.index), (TaskKind::Map, 1));
    }

    #[test]
    fn changes_that_could_not_be_stored_come_back_with_the_next() {
        let now = Instant::now();
        let (mut c, _) = one_map_done(now);
        let failed = c.take_changed();
        assert_eq!((failed.jobs.len(), failed.tasks.len()), (1, 1));
        c.requeue(&failed);
        let again = c.take_changed();
        assert_eq!((again.jobs.len(), again.tasks.len()), (1, 1));
        assert!(c.take_changed().is_empty());
    }
}
