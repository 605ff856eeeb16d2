//! Entry point: split a history into partitions, search each within a time
//! budget (in parallel), and combine the verdicts.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::budget::MemoryPool;
use super::history::History;
use super::model::{Model, Partition};
use super::op::{OpKind, Operation, Status};
use super::search::{search, Limits, SearchOutcome};

/// Verdict of [`check`].
///
/// `Unknown` is distinct from `Ok` on purpose: a search cut short by the
/// budget proves nothing, and callers (CI, `kvctl check`) must not pass it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// Every partition is linearizable.
    Ok,
    /// Some partition is not linearizable; details of one such partition
    /// (the first in partition order among those found).
    Violation(Box<Violation>),
    /// No violation was found, but some partition could not be decided.
    Unknown {
        /// Why the first undecided partition was given up.
        reason: UnknownReason,
        /// Keys of the partitions left undecided, in partition order.
        undecided: Vec<String>,
    },
}

/// Why a partition was left undecided; tells the caller what to change
/// (a longer budget, more memory, or a bug report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnknownReason {
    /// The time budget ran out.
    Timeout,
    /// The search reached the memory limit ([`CheckOptions::max_memo_bytes`],
    /// shared by all partitions).
    MemoryLimit,
    /// Stopped because another partition already decided the answer (only
    /// visible if that answer could not be reported).
    Cancelled,
    /// A worker thread panicked or an internal invariant failed.
    Internal,
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnknownReason::Timeout => "time budget exhausted",
            UnknownReason::MemoryLimit => "memory limit reached",
            UnknownReason::Cancelled => "search cancelled",
            UnknownReason::Internal => "internal checker error",
        })
    }
}

/// Tuning knobs for [`check_with`]; [`check`] uses the defaults with a given
/// budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Wall-clock budget for the whole check (all partitions share one
    /// deadline).
    pub budget: Duration,
    /// Worker threads; `0` = `std::thread::available_parallelism()`. Always
    /// capped at the number of partitions.
    pub threads: usize,
    /// Cap on the memory the check holds, in bytes, **in total over all
    /// partitions searched in parallel**: memo caches, interned model
    /// states, event lists, stacks and the per-partition copies. A search
    /// that would exceed it gives up with [`UnknownReason::MemoryLimit`]
    /// (freeing what it held for the others), so a pathological history
    /// yields Unknown rather than exhausting RAM. (The name is kept from when
    /// it capped one memo cache; the history itself is the caller's.)
    pub max_memo_bytes: usize,
}

impl CheckOptions {
    /// Defaults (auto threads, 1 GiB in total) with `budget`.
    pub fn with_budget(budget: Duration) -> Self {
        CheckOptions {
            budget,
            threads: 0,
            max_memo_bytes: 1 << 30,
        }
    }
}

impl Default for CheckOptions {
    /// One minute, auto threads, 1 GiB in total.
    fn default() -> Self {
        CheckOptions::with_budget(Duration::from_secs(60))
    }
}

impl CheckResult {
    /// True only for a proven-linearizable history.
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }

    /// True for a proven violation.
    pub fn is_violation(&self) -> bool {
        matches!(self, CheckResult::Violation(_))
    }
}

/// Explanation of a non-linearizable partition, porcupine-style.
///
/// Semantics of the fields (all operations are clones from the history):
/// * `linearized_prefix`: the longest sequence of this partition's ops the
///   search could linearize (a legal sequential execution that respects real
///   time), in linearization order;
/// * `failed_op`: the op that could not be linearized after that prefix — the
///   not-yet-linearized op with the earliest completion;
/// * `sub_history`: the offending sub-history: every checked op of this
///   partition invoked no later than `failed_op` completed (i.e. ops that
///   precede or are concurrent with it, `failed_op` included), sorted by
///   invocation. Ops invoked after `failed_op` completed cannot influence
///   where it is linearized, so they are left out. `fail` ops and `info`
///   gets, which the checker ignores, never appear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Partition label (the key, for the KV model).
    pub key: String,
    /// Longest linearizable prefix found, in linearization order.
    pub linearized_prefix: Vec<Operation>,
    /// Op that could not be linearized.
    pub failed_op: Operation,
    /// Index of `failed_op` in [`History::ops`].
    pub failed_index: usize,
    /// Ops preceding or concurrent with `failed_op` in this partition.
    pub sub_history: Vec<Operation>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "linearizability violation on key {:?}", self.key)?;
        writeln!(
            f,
            "cannot linearize op #{}: {}",
            self.failed_index,
            describe(&self.failed_op)
        )?;
        writeln!(
            f,
            "longest linearizable prefix ({} ops):",
            self.linearized_prefix.len()
        )?;
        for op in &self.linearized_prefix {
            writeln!(f, "  {}", describe(op))?;
        }
        writeln!(f, "offending sub-history ({} ops):", self.sub_history.len())?;
        for op in &self.sub_history {
            writeln!(f, "  {}", describe(op))?;
        }
        Ok(())
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => write!(f, "ok: history is linearizable"),
            CheckResult::Violation(v) => write!(f, "{v}"),
            CheckResult::Unknown { reason, undecided } => write!(
                f,
                "unknown: {reason} with {} partition(s) undecided: {:?}",
                undecided.len(),
                undecided
            ),
        }
    }
}

/// One-line human description of an op for reports.
fn describe(op: &Operation) -> String {
    let end = op
        .effective_complete()
        .map_or_else(|| "inf".to_owned(), |t| t.to_string());
    let what = match op.op {
        OpKind::Get => format!("get({:?}) -> {:?}", op.key, op.output),
        OpKind::Put => format!("put({:?}, {:?})", op.key, op.value),
        OpKind::Append => format!("append({:?}, {:?})", op.key, op.value),
        OpKind::Delete => format!("delete({:?})", op.key),
        OpKind::Cas => format!(
            "cas({:?}, {:?} -> {:?}) -> {:?}",
            op.key,
            op.expected,
            op.value,
            op.cas_outcome()
        ),
    };
    format!(
        "client {} {} [{}, {}] {:?}",
        op.client, what, op.invoke, end, op.status
    )
}

/// Whether the checker must consider `op` at all: `fail` ops never happened,
/// and an `info` get has no effect and no known output, so both are dropped.
fn is_checked(op: &Operation) -> bool {
    match op.status {
        Status::Fail => false,
        Status::Info => op.op != OpKind::Get,
        Status::Ok => true,
    }
}

/// Checks `history` for linearizability against `model` within `budget`
/// (default [`CheckOptions`] otherwise).
pub fn check<M: Model>(history: &History, model: &M, budget: Duration) -> CheckResult {
    check_with(history, model, &CheckOptions::with_budget(budget))
}

/// Checks `history` for linearizability against `model` under `options`.
///
/// The history is split with [`Model::partition`]; partitions are searched
/// concurrently on up to [`CheckOptions::threads`] threads, smallest first,
/// all drawing on one memory pool of [`CheckOptions::max_memo_bytes`]. The
/// budget is a wall-clock deadline shared by all partitions; any partition
/// still undecided at the deadline makes the result [`CheckResult::Unknown`]
/// (unless another partition already proved a violation). A found violation
/// stops the remaining searches early. [`check_report`] says, per partition,
/// what was decided and why not.
pub fn check_with<M: Model>(history: &History, model: &M, options: &CheckOptions) -> CheckResult {
    check_report(history, model, options).result
}

/// What [`check_report`] found: the verdict and how each partition fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The verdict, as [`check_with`] returns it.
    pub result: CheckResult,
    /// One entry per partition with checked ops, in partition order.
    pub partitions: Vec<PartitionReport>,
    /// Most memory the check held at once (the quantity
    /// [`CheckOptions::max_memo_bytes`] bounds), in bytes.
    pub peak_bytes: usize,
}

/// How one partition fared: lets a caller say *which* keys were left
/// undecided and why (a longer budget helps a timeout, not a memory limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    /// Partition label (the key, for the KV model).
    pub key: String,
    /// Ops searched (`fail` ops and `info` gets are dropped first).
    pub ops: usize,
    /// Of those, indeterminate (`info`) ones.
    pub info_ops: usize,
    /// `None` if decided (linearizable, or the violation in
    /// [`CheckReport::result`]); otherwise why it was given up.
    pub undecided: Option<UnknownReason>,
    /// Whether this partition is not linearizable.
    pub violation: bool,
    /// Wall-clock time its searches took.
    pub elapsed: Duration,
    /// Most memory its search held at once, in bytes.
    pub peak_bytes: usize,
}

/// Bytes the checker itself holds per op for the partitioning (indices and
/// per-partition op references), charged before the searches start.
const PARTITION_BYTES_PER_OP: usize = 3 * std::mem::size_of::<usize>();

/// Like [`check_with`], with a report per partition.
pub fn check_report<M: Model>(history: &History, model: &M, options: &CheckOptions) -> CheckReport {
    let start = Instant::now();
    let deadline = start.checked_add(options.budget);
    let pool = MemoryPool::new(options.max_memo_bytes);
    let ops = history.ops();
    let mut fixed = pool.account();
    if fixed
        .charge(ops.len().saturating_mul(PARTITION_BYTES_PER_OP))
        .is_err()
    {
        // Not even the partitioning fits: every key is undecided.
        let partitions: Vec<PartitionReport> = model
            .partition(ops)
            .into_iter()
            .map(|p| PartitionReport {
                key: p.key,
                ops: p.indices.len(),
                info_ops: 0,
                undecided: Some(UnknownReason::MemoryLimit),
                violation: false,
                elapsed: Duration::ZERO,
                peak_bytes: 0,
            })
            .collect();
        let result = match partitions.is_empty() {
            true => CheckResult::Ok,
            false => CheckResult::Unknown {
                reason: UnknownReason::MemoryLimit,
                undecided: partitions.iter().map(|p| p.key.clone()).collect(),
            },
        };
        return CheckReport {
            result,
            partitions,
            peak_bytes: pool.peak(),
        };
    }
    let partitions: Vec<Partition> = model
        .partition(ops)
        .into_iter()
        .map(|p| Partition {
            key: p.key,
            indices: p
                .indices
                .into_iter()
                .filter(|&i| ops.get(i).is_some_and(is_checked))
                .collect(),
        })
        .filter(|p| !p.indices.is_empty())
        .collect();
    if partitions.is_empty() {
        return CheckReport {
            result: CheckResult::Ok,
            partitions: Vec::new(),
            peak_bytes: pool.peak(),
        };
    }

    let mut order: Vec<usize> = (0..partitions.len()).collect();
    // Smallest first: cheap partitions (and their violations) are decided
    // before a huge one can eat the shared budget.
    order.sort_by_key(|&p| partitions[p].indices.len());
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let threads = threads.min(partitions.len()).max(1);

    let stop = AtomicBool::new(false);
    let mut outcomes: Vec<Option<SearchOutcome>> = vec![None; partitions.len()];
    let mut stats: Vec<(Duration, usize)> = vec![(Duration::ZERO, 0); partitions.len()];
    // Round one gives each partition a fair share of the remaining time, so
    // one hopeless key cannot starve the others; round two gives the ones
    // that ran out of their share whatever is left.
    let mut round: Vec<usize> = order;
    for fair in [true, false] {
        let slice_deadline = |remaining_parts: usize| -> Option<Instant> {
            let now = Instant::now();
            let left = deadline.map(|d| d.saturating_duration_since(now));
            match (fair, left) {
                (true, Some(left)) => {
                    let waves = remaining_parts.div_ceil(threads).max(1);
                    let share = left / u32::try_from(waves).unwrap_or(u32::MAX);
                    now.checked_add(share).min(deadline)
                }
                _ => deadline,
            }
        };
        let cursor = AtomicUsize::new(0);
        let worker = || {
            let mut done: Vec<(usize, SearchOutcome, Duration, usize)> = Vec::new();
            loop {
                let slot = cursor.fetch_add(1, Ordering::Relaxed);
                let Some(&p) = round.get(slot) else { break };
                let part_ops: Vec<&Operation> = partitions[p]
                    .indices
                    .iter()
                    .filter_map(|&i| ops.get(i))
                    .collect();
                let limits = Limits {
                    deadline: slice_deadline(round.len().saturating_sub(slot)),
                    stop: &stop,
                    pool: &pool,
                };
                let began = Instant::now();
                let (outcome, stats) = search(model, &part_ops, &limits);
                if matches!(outcome, SearchOutcome::Violation { .. }) {
                    stop.store(true, Ordering::Relaxed);
                }
                done.push((p, outcome, began.elapsed(), stats.peak_bytes));
            }
            done
        };
        let workers = threads.min(round.len()).max(1);
        // Always on scoped threads (even one), so a panicking model yields
        // Unknown for its partitions instead of unwinding into the caller.
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
            for handle in handles {
                if let Ok(results) = handle.join() {
                    for (p, outcome, took, peak) in results {
                        if let Some(slot) = outcomes.get_mut(p) {
                            *slot = Some(outcome);
                        }
                        if let Some(st) = stats.get_mut(p) {
                            st.0 += took;
                            st.1 = st.1.max(peak);
                        }
                    }
                }
            }
        });
        let time_left = deadline.is_none_or(|d| Instant::now() < d);
        round = round
            .iter()
            .copied()
            .filter(|&p| {
                matches!(
                    outcomes.get(p),
                    Some(Some(SearchOutcome::Aborted(UnknownReason::Timeout)))
                )
            })
            .collect();
        if !fair || round.is_empty() || !time_left || stop.load(Ordering::Relaxed) {
            break;
        }
    }

    let reports = partitions
        .iter()
        .zip(&outcomes)
        .zip(&stats)
        .map(
            |((part, outcome), &(elapsed, peak_bytes))| PartitionReport {
                key: part.key.clone(),
                ops: part.indices.len(),
                info_ops: part
                    .indices
                    .iter()
                    .filter(|&&i| ops.get(i).is_some_and(|o| o.status == Status::Info))
                    .count(),
                undecided: match outcome {
                    Some(SearchOutcome::Linearizable | SearchOutcome::Violation { .. }) => None,
                    Some(SearchOutcome::Aborted(why)) => Some(*why),
                    None => Some(UnknownReason::Internal),
                },
                violation: matches!(outcome, Some(SearchOutcome::Violation { .. })),
                elapsed,
                peak_bytes,
            },
        )
        .collect();
    let result = combine(ops, &partitions, outcomes);
    drop(fixed);
    CheckReport {
        result,
        partitions: reports,
        peak_bytes: pool.peak(),
    }
}

/// Turns per-partition outcomes into the overall verdict: any violation wins,
/// then any undecided partition makes it Unknown, else Ok.
fn combine(
    ops: &[Operation],
    partitions: &[Partition],
    outcomes: Vec<Option<SearchOutcome>>,
) -> CheckResult {
    let mut undecided = Vec::new();
    let mut reason: Option<UnknownReason> = None;
    for (part, outcome) in partitions.iter().zip(outcomes) {
        let why = match outcome {
            Some(SearchOutcome::Linearizable) => continue,
            Some(SearchOutcome::Violation { prefix, failed }) => {
                if let Some(v) = build_violation(ops, part, &prefix, failed) {
                    return CheckResult::Violation(Box::new(v));
                }
                UnknownReason::Internal
            }
            Some(SearchOutcome::Aborted(why)) => why,
            None => UnknownReason::Internal,
        };
        undecided.push(part.key.clone());
        if reason.is_none_or(|r| r == UnknownReason::Cancelled) {
            reason = Some(why);
        }
    }
    match reason {
        None => CheckResult::Ok,
        Some(reason) => CheckResult::Unknown { reason, undecided },
    }
}

/// Maps partition-local op ids back to history ops and cuts the offending
/// sub-history (see [`Violation`]).
fn build_violation(
    ops: &[Operation],
    part: &Partition,
    prefix: &[usize],
    failed: usize,
) -> Option<Violation> {
    let history_index = |local: usize| part.indices.get(local).copied();
    let failed_index = history_index(failed)?;
    let failed_op = ops.get(failed_index)?.clone();
    let linearized_prefix = prefix
        .iter()
        .filter_map(|&l| history_index(l).and_then(|i| ops.get(i)).cloned())
        .collect();
    let horizon = failed_op.effective_complete().unwrap_or(u64::MAX);
    let mut sub: Vec<(u64, usize)> = part
        .indices
        .iter()
        .filter_map(|&i| ops.get(i).map(|op| (op.invoke, i)))
        .filter(|&(invoke, _)| invoke <= horizon)
        .collect();
    sub.sort_unstable();
    let sub_history = sub
        .into_iter()
        .filter_map(|(_, i)| ops.get(i).cloned())
        .collect();
    Some(Violation {
        key: part.key.clone(),
        linearized_prefix,
        failed_op,
        failed_index,
        sub_history,
    })
}
