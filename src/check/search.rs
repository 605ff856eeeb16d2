//! The WGL search (Wing & Gong backtracking with Lowe's memoization) over one
//! partition, as in porcupine's `checkSingle`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::bitset::Bitset;
use super::checker::UnknownReason;
use super::events::EventList;
use super::memo::Memo;
use super::model::Model;
use super::op::Operation;

/// How often (in search steps) the deadline, stop flag and memory cap are
/// polled: often enough to honor a budget within a millisecond, rarely enough
/// that `Instant::now()` costs nothing measurable.
const POLL_EVERY: u64 = 1024;

/// When a search must give up.
pub(crate) struct Limits<'a> {
    /// Wall-clock deadline (`None` = no time limit).
    pub(crate) deadline: Option<Instant>,
    /// Set by another worker once the overall answer is known.
    pub(crate) stop: &'a AtomicBool,
    /// Cap on the memo cache's approximate size.
    pub(crate) max_memo_bytes: usize,
}

/// Result of searching one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SearchOutcome {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists.
    Violation {
        /// Longest linearizable prefix the search found, as indices into the
        /// searched slice, in linearization order.
        prefix: Vec<usize>,
        /// Index (into the searched slice) of the op that could not be
        /// linearized after that prefix: the not-yet-linearized op with the
        /// earliest return event.
        failed: usize,
    },
    /// Gave up; nothing is known.
    Aborted(UnknownReason),
}

/// Searches for a linearization of `ops` under `model`.
///
/// Walks the event list: at a call event it tries to linearize that op now
/// (model step legal and the resulting configuration not seen before), lifts
/// it and restarts from the front; at a return event of a still-pending op it
/// backtracks the most recent choice. Reaching the return of an `info` op
/// means every definite op is linearized; the remaining info ops are taken
/// never to have happened, so the history is accepted.
pub(crate) fn search<M: Model>(
    model: &M,
    ops: &[&Operation],
    limits: &Limits<'_>,
) -> SearchOutcome {
    // Internal op ids follow invocation order (ties: input order); the memo's
    // compact key relies on it.
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| ops.get(i).map(|op| op.invoke));
    let sorted: Vec<&Operation> = order.iter().filter_map(|&i| ops.get(i).copied()).collect();
    let n = sorted.len();
    // horizon[id]: ops 0..horizon[id] are invoked no later than op id returns;
    // no op at or past it can be linearized while op id is pending.
    let horizon: Vec<usize> = sorted
        .iter()
        .map(|op| match op.effective_complete() {
            Some(t) => sorted.partition_point(|o| o.invoke <= t),
            None => n,
        })
        .collect();

    let mut list = EventList::new(&sorted);
    let mut linearized = Bitset::new(n);
    let mut window: Vec<u64> = Vec::new();
    let mut cache: Memo<M::State> = Memo::new();
    // Search state is an interned id: cheap to push, compare and memoize.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let mut state = cache.intern(model.init());
    let mut best: Vec<usize> = Vec::new();
    // Length of the common prefix of `best` and the current stack.
    let mut agree: usize = 0;
    let mut entry = list.first();
    let mut steps: u64 = 0;

    while !list.is_empty() {
        if steps.is_multiple_of(POLL_EVERY) {
            if limits.stop.load(Ordering::Relaxed) {
                return SearchOutcome::Aborted(UnknownReason::Cancelled);
            }
            if limits.deadline.is_some_and(|d| Instant::now() >= d) {
                return SearchOutcome::Aborted(UnknownReason::Timeout);
            }
            if cache.approx_bytes() > limits.max_memo_bytes {
                return SearchOutcome::Aborted(UnknownReason::MemoryLimit);
            }
        }
        steps += 1;
        if list.is_tail(entry) {
            // Unreachable when the list is consistent (every live call is
            // followed by its return); refuse to claim anything if it happens.
            return SearchOutcome::Aborted(UnknownReason::Internal);
        }
        let id = list.op(entry);
        if list.is_call(entry) {
            let (Some(op), Some(current)) = (sorted.get(id), cache.state(state)) else {
                return SearchOutcome::Aborted(UnknownReason::Internal);
            };
            let mut advanced = false;
            if let Some(next_state) = model.step(current, op) {
                let next_state = cache.intern(next_state);
                linearized.set(id);
                list.lift(entry);
                // The first live event is the call of the lowest-id pending op.
                let frontier = if list.is_empty() {
                    n
                } else {
                    list.op(list.first())
                };
                // Linearized ops past the frontier were all invoked before
                // every pending op returns. An info frontier never returns, so
                // bound the window by the first pending definite op instead
                // (still a function of the linearized set, so keys stay exact).
                let bound_op = match sorted.get(frontier) {
                    Some(f) if f.effective_complete().is_none() => list.first_definite_return(),
                    _ => Some(frontier),
                };
                let end = bound_op.and_then(|b| horizon.get(b)).copied().unwrap_or(n);
                linearized.extract_into(frontier, end, &mut window);
                if cache.insert(frontier, &window, next_state) {
                    stack.push((entry, std::mem::replace(&mut state, next_state)));
                    // Keep `best` = longest stack seen, copying only the part
                    // that differs from it (amortized O(1) per push).
                    let depth = stack.len();
                    if agree + 1 == depth && best.get(agree) == Some(&id) {
                        agree = depth;
                    }
                    if depth > best.len() {
                        best.truncate(agree);
                        best.extend(stack.iter().skip(agree).map(|&(e, _)| list.op(e)));
                        agree = depth;
                    }
                    entry = list.first();
                    advanced = true;
                } else {
                    list.unlift(entry);
                    linearized.clear(id);
                }
            }
            if !advanced {
                entry = list.next(entry);
            }
        } else if list.is_info_return(entry) {
            return SearchOutcome::Linearizable;
        } else {
            let Some((call, prev_state)) = stack.pop() else {
                let failed = blocking_op(&list, n, &best);
                let original = |id: usize| order.get(id).copied().unwrap_or(id);
                return SearchOutcome::Violation {
                    prefix: best.into_iter().map(original).collect(),
                    failed: original(failed),
                };
            };
            state = prev_state;
            agree = agree.min(stack.len());
            linearized.clear(list.op(call));
            list.unlift(call);
            entry = list.next(call);
        }
    }
    SearchOutcome::Linearizable
}

/// The definite op with the earliest return event that is not in `prefix`:
/// after the longest prefix, this op had to be linearized before its return
/// and could not be.
fn blocking_op(list: &EventList, n: usize, prefix: &[usize]) -> usize {
    let mut done = Bitset::new(n);
    for &id in prefix {
        done.set(id);
    }
    list.nodes_in_time_order()
        .find(|&node| {
            !list.is_call(node) && !list.is_info_return(node) && !done.contains(list.op(node))
        })
        .map(|node| list.op(node))
        .or_else(|| (0..n).find(|&id| !done.contains(id)))
        .unwrap_or(0)
}
