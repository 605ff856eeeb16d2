//! Prometheus gauges of the MapReduce coordinator (`mrd coordinator --metrics-listen`).
//!
//! Everything is read from the coordinator's state when Prometheus scrapes, so task handling pays
//! nothing for metrics. Attempts and failures are summed from the persisted task records, so they keep
//! counting across coordinator restarts (what an operator wants when asking "how often do tasks run
//! twice?").

use crate::mr::coordinator::{Coordinator, JobState};
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};

/// The coordinator's gauges.
#[derive(Clone)]
pub struct MrGauges {
    jobs: IntGaugeVec,
    tasks: IntGaugeVec,
    attempts: IntGaugeVec,
    failures: IntGaugeVec,
    task_bytes: IntGauge,
}

impl MrGauges {
    /// Register the gauges in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let jobs = IntGaugeVec::new(
            Opts::new("mr_jobs", "Jobs by state (queued, running, done, failed)"),
            &["state"],
        )?;
        let tasks = IntGaugeVec::new(
            Opts::new(
                "mr_tasks",
                "Tasks of every job by kind (map, reduce) and state (pending, running, done)",
            ),
            &["kind", "state"],
        )?;
        let attempts = IntGaugeVec::new(
            Opts::new(
                "mr_task_attempts",
                "Times tasks were handed out, by kind (more than tasks: re-runs after timeouts, crashes or lost map outputs)",
            ),
            &["kind"],
        )?;
        let failures = IntGaugeVec::new(
            Opts::new("mr_task_failures", "Application failures reported, by kind"),
            &["kind"],
        )?;
        for gauge in [&jobs, &tasks, &attempts, &failures] {
            registry.register(Box::new(gauge.clone()))?;
        }
        let task_bytes = IntGauge::new(
            "mr_task_message_bytes",
            "Bytes of task hand-outs, map-location pages and commit answers sent to workers since the \
             coordinator started (divided by mr_task_attempts: the cost of a task, which must not grow \
             with the job)",
        )?;
        registry.register(Box::new(task_bytes.clone()))?;
        Ok(MrGauges {
            jobs,
            tasks,
            attempts,
            failures,
            task_bytes,
        })
    }

    /// Recompute every gauge from `coordinator`, which has sent `task_bytes` in task messages.
    pub fn refresh(&self, coordinator: &Coordinator, task_bytes: u64) {
        self.task_bytes
            .set(i64::try_from(task_bytes).unwrap_or(i64::MAX));
        let mut jobs = [0i64; 4];
        // [kind][pending, running, done], [kind] attempts, [kind] failures
        let mut tasks = [[0i64; 3]; 2];
        let mut attempts = [0i64; 2];
        let mut failures = [0i64; 2];
        for view in coordinator.jobs() {
            jobs[match view.record.state {
                JobState::Queued => 0,
                JobState::Running => 1,
                JobState::Done => 2,
                JobState::Failed(_) => 3,
            }] += 1;
            let kinds = [
                (&view.record.maps, view.running_maps),
                (&view.record.reduces, view.running_reduces),
            ];
            for (k, (records, running)) in kinds.into_iter().enumerate() {
                for (i, task) in records.iter().enumerate() {
                    let state = if task.done.is_some() {
                        2
                    } else if running.get(i).is_some_and(Option::is_some) {
                        1
                    } else {
                        0
                    };
                    tasks[k][state] += 1;
                    attempts[k] += i64::from(task.runs);
                    failures[k] += i64::from(task.failures);
                }
            }
        }
        for (state, count) in ["queued", "running", "done", "failed"].iter().zip(jobs) {
            self.jobs.with_label_values(&[state]).set(count);
        }
        for (k, kind) in ["map", "reduce"].iter().enumerate() {
            for (s, state) in ["pending", "running", "done"].iter().enumerate() {
                self.tasks
                    .with_label_values(&[kind, state])
                    .set(tasks[k][s]);
            }
            self.attempts.with_label_values(&[kind]).set(attempts[k]);
            self.failures.with_label_values(&[kind]).set(failures[k]);
        }
    }
}
