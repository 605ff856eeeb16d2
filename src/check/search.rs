//! The WGL search (Wing & Gong backtracking with Lowe's memoization) over one
//! partition, as in porcupine's `checkSingle`, with indeterminate ops handled
//! lazily so hundreds of them do not explode the search.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::bitset::Bitset;
use super::budget::{Account, MemoryPool, OutOfMemory};
use super::checker::UnknownReason;
use super::events::EventList;
use super::memo::Memo;
use super::model::Model;
use super::op::Operation;

/// How often (in search steps) the deadline and stop flag are polled: often
/// enough to honor a budget within a millisecond, rarely enough that
/// `Instant::now()` costs nothing measurable. (Memory is checked on every
/// allocation, not polled.)
const POLL_EVERY: u64 = 1024;

/// Bytes per op of the structures a search allocates once, up front (event
/// list, orderings, bitsets, stack, longest prefix): charged before they
/// are built, so a huge partition is refused by the budget, not the kernel.
const FIXED_BYTES_PER_OP: usize = 160;

/// When a search must give up.
pub(crate) struct Limits<'a> {
    /// Wall-clock deadline (`None` = no time limit).
    pub(crate) deadline: Option<Instant>,
    /// Set by another worker once the overall answer is known.
    pub(crate) stop: &'a AtomicBool,
    /// The memory every search of this check draws from.
    pub(crate) pool: &'a MemoryPool,
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
        /// linearized after that prefix: the not-yet-linearized definite op
        /// with the earliest return event.
        failed: usize,
    },
    /// Gave up; nothing is known.
    Aborted(UnknownReason),
}

/// What a search cost, for reports and measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SearchStats {
    /// Most bytes the search held from the pool at once.
    pub(crate) peak_bytes: usize,
    /// Configurations recorded in the memo.
    pub(crate) configurations: usize,
    /// Distinct model states interned.
    pub(crate) states: usize,
}

/// One linearization choice on the search stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// A definite op, by its call node in the event list.
    Definite(usize),
    /// An info op, by its id (index into the info ops, invocation order).
    Info(usize),
}

/// Where the scan for the next candidate of one configuration stands.
///
/// Candidates are the definite ops whose call precedes the first pending
/// return (WGL) and the pending info ops invoked no later than that return,
/// merged in invocation order.
///
/// Why not "definite ops first, info ops last" (Knossos-style laziness)? It
/// was measured on the issue #13 histories and on the simulator's: a lost
/// write that *did* take effect is read soon after its invocation, and
/// deferring it makes the search exhaust every order of the concurrent
/// definite ops first — 40× more configurations on the paused histories,
/// and timeouts where time order decides in milliseconds. Info ops that are
/// never needed are made cheap differently: the search stops as soon as the
/// definite ops are linearized, no-op and irrelevant info steps are skipped,
/// unread values collapse into one state ([`Model::canonicalizer`]) and the
/// memo subsumes supersets of info ops.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Next definite event node to look at.
    node: usize,
    /// Next info id to look at (skipping linearized ones).
    info: usize,
    /// Latest invocation a candidate may have: the time of the first pending
    /// return (calls sort before returns at equal times).
    bound: u64,
}

/// Searches for a linearization of `ops` under `model`, drawing memory from
/// `limits.pool`.
pub(crate) fn search<M: Model>(
    model: &M,
    ops: &[&Operation],
    limits: &Limits<'_>,
) -> (SearchOutcome, SearchStats) {
    let mut acct = limits.pool.account();
    let mut stats = SearchStats::default();
    let outcome = match run(model, ops, limits, &mut acct, &mut stats) {
        Ok(outcome) => outcome,
        Err(OutOfMemory) => SearchOutcome::Aborted(UnknownReason::MemoryLimit),
    };
    stats.peak_bytes = acct.peak();
    (outcome, stats)
}

/// The search proper.
///
/// Definite (`ok`) ops walk the WGL event list; info ops, which never return,
/// are kept apart (an id list in invocation order) and merged into the
/// candidates by invocation time (see [`Cursor`]). At each configuration the
/// search tries the candidates in order: a legal model step to a
/// configuration not explored before is taken (and the scan restarts in the
/// new configuration); when none is left, it backtracks the latest choice.
///
/// Rules that keep info ops from multiplying the search, each sound (a
/// linearization exists iff the search finds one):
/// * the history is accepted as soon as every definite op is linearized —
///   the info ops still pending never happened (Knossos), so no subset of
///   them is enumerated at the end;
/// * states are replaced by their class representative
///   ([`Model::canonicalizer`], a bisimulation), so orders of unread writes
///   collapse;
/// * an info op that leaves the state unchanged is not tried: the
///   configuration it leads to is subsumed by the current one;
/// * an info op whose resulting state [`Model::info_relevance`] rejects is
///   not tried (see the KV model's proof);
/// * the memo refuses a configuration subsumed by an explored one with the
///   same definite set and state and fewer info ops ([`Memo`]).
///
/// Proof sketch for the last three, by contradiction: suppose a
/// linearization exists but the search reports a violation. Among the
/// configurations it expanded that can still be completed, take one, `C`,
/// with the shortest completion, of length `m`. Its first step `C → C'` was
/// tried (every candidate is). If `C'` was expanded, it is completable with
/// `m - 1` steps: contradiction. If it was refused as subsumed by an
/// expanded `C''`, then `C''` completes with at most `m - 1` steps too:
/// contradiction. If the op was an info op skipped as a no-op, `C` itself
/// completes in `m - 1` steps (drop that op): contradiction. If it was
/// skipped by the relevance rule, the rule's own proof gives a completion of
/// `C` without it, shorter: contradiction.
///
/// Every container that grows with the search is paid for from `acct`
/// first ([`super::budget`]); running out is `Err(OutOfMemory)`.
fn run<M: Model>(
    model: &M,
    ops: &[&Operation],
    limits: &Limits<'_>,
    acct: &mut Account<'_>,
    stats: &mut SearchStats,
) -> Result<SearchOutcome, OutOfMemory> {
    acct.charge(ops.len().saturating_mul(FIXED_BYTES_PER_OP))?;
    // Internal ids follow invocation order (ties: input order), separately
    // for definite and info ops; the memo's compact key relies on it.
    let mut def_order: Vec<usize> = Vec::with_capacity(ops.len());
    let mut info_order: Vec<usize> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if op.effective_complete().is_some() {
            def_order.push(i);
        } else {
            info_order.push(i);
        }
    }
    let invoke = |i: &usize| ops.get(*i).map(|op| op.invoke);
    def_order.sort_by_key(invoke);
    info_order.sort_by_key(invoke);
    let defs: Vec<&Operation> = def_order
        .iter()
        .filter_map(|&i| ops.get(i).copied())
        .collect();
    let infos: Vec<&Operation> = info_order
        .iter()
        .filter_map(|&i| ops.get(i).copied())
        .collect();
    let (n, n_info) = (defs.len(), infos.len());
    // horizon[id]: definite ops 0..horizon[id] are invoked no later than op
    // id returns; none at or past it can be linearized while op id is pending.
    let horizon: Vec<usize> = defs
        .iter()
        .map(|op| {
            let t = op.effective_complete().unwrap_or(u64::MAX);
            defs.partition_point(|o| o.invoke <= t)
        })
        .collect();
    let relevant = model.info_relevance(ops);
    let canonical = model.canonicalizer(ops);
    let canon = |state: M::State| match &canonical {
        Some(f) => f(state),
        None => state,
    };

    let mut list = EventList::new(&defs);
    let mut linearized = Bitset::new(n);
    let mut info_linearized = Bitset::new(n_info);
    let mut window: Vec<u64> = Vec::with_capacity(n / 64 + 2);
    let mut info_key: Vec<u32> = Vec::with_capacity(n_info);
    let mut cache: Memo<M::State> = Memo::new();
    // (choice, state before it, where the scan of that configuration stood)
    let mut stack: Vec<(Choice, u32, Cursor)> = Vec::with_capacity(n + n_info);
    let initial = canon(model.init());
    let bytes = model.state_heap_bytes(&initial);
    let mut state = cache.intern(initial, bytes, acct)?;
    let mut best: Vec<Choice> = Vec::with_capacity(n + n_info);
    // Length of the common prefix of `best` and the current stack.
    let mut agree: usize = 0;
    let mut steps: u64 = 0;
    // The first pending info id at or after `k`.
    let pending_from = |linearized: &Bitset, mut k: usize| {
        while k < n_info && linearized.contains(k) {
            k += 1;
        }
        k
    };
    // The scan's start in the current configuration (definite list not empty).
    let enter = |list: &EventList, info_linearized: &Bitset| {
        let bound = list
            .first_return()
            .and_then(|id| defs.get(id))
            .and_then(|op| op.effective_complete())
            .unwrap_or(u64::MAX);
        Cursor {
            node: list.first(),
            info: pending_from(info_linearized, 0),
            bound,
        }
    };
    let mut cursor = enter(&list, &info_linearized);

    let outcome = loop {
        if list.is_empty() {
            // No definite op at all (only info ops): none has to happen.
            break SearchOutcome::Linearizable;
        }
        if steps.is_multiple_of(POLL_EVERY) {
            if limits.stop.load(Ordering::Relaxed) {
                break SearchOutcome::Aborted(UnknownReason::Cancelled);
            }
            if limits.deadline.is_some_and(|d| Instant::now() >= d) {
                break SearchOutcome::Aborted(UnknownReason::Timeout);
            }
        }
        steps += 1;
        let Some(current) = cache.state(state) else {
            break SearchOutcome::Aborted(UnknownReason::Internal);
        };
        // Pick the next candidate of this configuration, if any.
        let info_invoke = infos
            .get(cursor.info)
            .map(|op| op.invoke)
            .filter(|&t| t <= cursor.bound);
        let def_invoke = (!list.is_tail(cursor.node) && list.is_call(cursor.node))
            .then(|| defs.get(list.op(cursor.node)).map_or(0, |op| op.invoke));
        let candidate = match (def_invoke, info_invoke) {
            (Some(d), Some(i)) if i < d => Some(Choice::Info(cursor.info)),
            (Some(_), _) => Some(Choice::Definite(cursor.node)),
            (None, Some(_)) => Some(Choice::Info(cursor.info)),
            (None, None) => None,
        };
        let Some(choice) = candidate else {
            // Every candidate failed here: backtrack.
            let Some((choice, prev_state, at)) = stack.pop() else {
                let failed = blocking_op(&list, n, &best);
                let prefix = best
                    .iter()
                    .filter_map(|c| match *c {
                        Choice::Definite(node) => def_order.get(list.op(node)),
                        Choice::Info(i) => info_order.get(i),
                    })
                    .copied()
                    .collect();
                break SearchOutcome::Violation {
                    prefix,
                    failed: def_order.get(failed).copied().unwrap_or(0),
                };
            };
            state = prev_state;
            agree = agree.min(stack.len());
            cursor = at;
            match choice {
                Choice::Definite(node) => {
                    linearized.clear(list.op(node));
                    list.unlift(node);
                    cursor.node = list.next(node);
                }
                Choice::Info(i) => {
                    info_linearized.clear(i);
                    cursor.info = pending_from(&info_linearized, i + 1);
                }
            }
            continue;
        };

        // Try it: a legal step to a configuration not explored before.
        let taken = match choice {
            Choice::Definite(node) => {
                let id = list.op(node);
                match defs
                    .get(id)
                    .and_then(|op| model.step(current, op))
                    .map(canon)
                {
                    None => None,
                    Some(next) => {
                        let bytes = model.state_heap_bytes(&next);
                        let next = cache.intern(next, bytes, acct)?;
                        linearized.set(id);
                        list.lift(node);
                        if list.is_empty() {
                            // Every definite op is linearized; the pending
                            // info ops never happened.
                            break SearchOutcome::Linearizable;
                        }
                        if record(
                            &mut cache,
                            acct,
                            (&list, &horizon, &linearized, &info_linearized),
                            (&mut window, &mut info_key),
                            next,
                        )? {
                            Some(next)
                        } else {
                            list.unlift(node);
                            linearized.clear(id);
                            None
                        }
                    }
                }
            }
            Choice::Info(i) => {
                let next = infos
                    .get(i)
                    .and_then(|op| model.step(current, op))
                    .map(canon)
                    .filter(|next| next != current)
                    .filter(|next| relevant.as_ref().is_none_or(|r| r(next)));
                match next {
                    None => None,
                    Some(next) => {
                        let bytes = model.state_heap_bytes(&next);
                        let next = cache.intern(next, bytes, acct)?;
                        info_linearized.set(i);
                        if record(
                            &mut cache,
                            acct,
                            (&list, &horizon, &linearized, &info_linearized),
                            (&mut window, &mut info_key),
                            next,
                        )? {
                            Some(next)
                        } else {
                            info_linearized.clear(i);
                            None
                        }
                    }
                }
            }
        };
        let Some(next) = taken else {
            match choice {
                Choice::Definite(node) => cursor.node = list.next(node),
                Choice::Info(i) => cursor.info = pending_from(&info_linearized, i + 1),
            }
            continue;
        };
        stack.push((choice, std::mem::replace(&mut state, next), cursor));
        // Keep `best` = longest stack seen, copying only the part that
        // differs from it (amortized O(1) per push).
        let depth = stack.len();
        if agree + 1 == depth && best.get(agree) == Some(&choice) {
            agree = depth;
        }
        if depth > best.len() {
            best.truncate(agree);
            best.extend(stack.iter().skip(agree).map(|&(c, _, _)| c));
            agree = depth;
        }
        cursor = enter(&list, &info_linearized);
    };
    stats.configurations = cache.len();
    stats.states = cache.states();
    Ok(outcome)
}

/// Records the configuration just reached in the memo; `Ok(false)` if it (or
/// one subsuming it) was explored before. `scratch` holds the key buffers.
fn record<S: std::hash::Hash + Eq>(
    cache: &mut Memo<S>,
    acct: &mut Account<'_>,
    (list, horizon, linearized, info_linearized): (&EventList, &[usize], &Bitset, &Bitset),
    (window, info_key): (&mut Vec<u64>, &mut Vec<u32>),
    state: u32,
) -> Result<bool, OutOfMemory> {
    // The first live event is the call of the lowest-id pending op; the
    // linearized ops past it were all invoked before it returns.
    let frontier = list.op(list.first());
    let end = horizon.get(frontier).copied().unwrap_or(horizon.len());
    linearized.extract_into(frontier, end, window);
    info_linearized.members_into(info_key);
    cache.insert(frontier, window, info_key, state, acct)
}

/// The definite op with the earliest return event that is not in `prefix`:
/// after the longest prefix, this op had to be linearized before its return
/// and could not be.
fn blocking_op(list: &EventList, n: usize, prefix: &[Choice]) -> usize {
    let mut done = Bitset::new(n);
    for c in prefix {
        if let Choice::Definite(node) = *c {
            done.set(list.op(node));
        }
    }
    list.nodes_in_time_order()
        .find(|&node| !list.is_call(node) && !done.contains(list.op(node)))
        .map(|node| list.op(node))
        .or_else(|| (0..n).find(|&id| !done.contains(id)))
        .unwrap_or(0)
}
