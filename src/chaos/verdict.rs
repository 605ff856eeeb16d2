//! The verdict of a run: linearizability per key, each workload's own invariant, recovery, and the
//! numbers an operator looks at first (throughput, outcomes, the longest time nothing succeeded).
//!
//! Exit status ([`Summary::exit_code`]): [`EXIT_INVALID`] if the checker found a violation or any
//! invariant failed; else [`EXIT_UNKNOWN`] if the checker ran out of budget or an invariant could not
//! be decided; else [`EXIT_VALID`]. An `Unknown` is never reported as valid.

use super::args::Target;
use super::history::NemesisEvent;
use super::nemesis::NemesisKind;
use super::workload::{StoreKind, WorkloadKind, FINAL_READER};
use super::{EXIT_INVALID, EXIT_UNKNOWN, EXIT_VALID};
use crate::check::{CheckResult, OpKind, Operation, Status};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Counts and availability of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Operations recorded (final reads included).
    pub ops: usize,
    /// Acknowledged.
    pub ok: usize,
    /// Definitely not applied.
    pub fail: usize,
    /// Unknown outcome.
    pub info: usize,
    /// Acknowledged operations that completed while a fault was active.
    pub ok_during_faults: usize,
    /// Acknowledged operations that completed after everything was healed.
    pub ok_after_heal: usize,
    /// Longest stretch of the workload with no operation acknowledged, in milliseconds.
    pub longest_outage_ms: u64,
    /// When that stretch began (ms on the run's clock).
    pub longest_outage_start_ms: u64,
    /// Acknowledged operations per second of workload.
    pub ok_per_sec: f64,
}

/// The fault windows `[start, stop]` in `events` (each start paired with the next stop of its kind).
pub fn fault_windows(events: &[NemesisEvent]) -> Vec<(u64, u64)> {
    let mut open: HashMap<&str, u64> = HashMap::new();
    let mut windows = Vec::new();
    for event in events {
        match event.phase {
            "start" => {
                open.insert(event.fault, event.time);
            }
            _ => {
                if let Some(start) = open.remove(event.fault) {
                    windows.push((start, event.time));
                }
            }
        }
    }
    windows
}

/// The statistics of `ops` for a workload that ran from `from` to `to` (ns), with faults in
/// `windows` and everything healed at `healed_at`.
pub fn stats(
    ops: &[Operation],
    windows: &[(u64, u64)],
    from: u64,
    to: u64,
    healed_at: u64,
) -> Stats {
    let mut stats = Stats {
        ops: ops.len(),
        ..Stats::default()
    };
    let mut acknowledged: Vec<u64> = Vec::new();
    for op in ops {
        match op.status {
            Status::Ok => stats.ok += 1,
            Status::Fail => stats.fail += 1,
            Status::Info => stats.info += 1,
        }
        let Some(done) = op.complete.filter(|_| op.status == Status::Ok) else {
            continue;
        };
        if windows.iter().any(|&(a, b)| (a..=b).contains(&done)) {
            stats.ok_during_faults += 1;
        }
        if done >= healed_at {
            stats.ok_after_heal += 1;
        }
        if op.client != FINAL_READER && (from..=to).contains(&done) {
            acknowledged.push(done);
        }
    }
    acknowledged.sort_unstable();
    let mut previous = from;
    let (mut gap, mut gap_start) = (0, from);
    for t in acknowledged.iter().copied().chain(std::iter::once(to)) {
        if t.saturating_sub(previous) > gap {
            gap = t - previous;
            gap_start = previous;
        }
        previous = previous.max(t);
    }
    stats.longest_outage_ms = gap / 1_000_000;
    stats.longest_outage_start_ms = gap_start / 1_000_000;
    let seconds = (to.saturating_sub(from)) as f64 / 1e9;
    if seconds > 0.0 {
        stats.ok_per_sec = (acknowledged.len() as f64 / seconds * 10.0).round() / 10.0;
    }
    stats
}

/// A property checked on the whole run besides linearizability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Invariant {
    /// Its name.
    pub name: &'static str,
    /// `Some(true)` held, `Some(false)` violated, `None` could not be decided.
    pub holds: Option<bool>,
    /// What was found.
    pub detail: String,
}

/// After everything was healed at `healed_at`, the cluster acknowledged at least one operation.
pub fn recovery_invariant(ops: &[Operation], healed_at: u64) -> Invariant {
    let after = ops
        .iter()
        .filter(|op| op.status == Status::Ok && op.complete.is_some_and(|t| t >= healed_at))
        .count();
    Invariant {
        name: "recovery",
        holds: Some(after > 0),
        detail: match after {
            0 => "no operation succeeded after every fault was healed".into(),
            n => format!("{n} operations succeeded after every fault was healed"),
        },
    }
}

/// The append workload's invariant, from the final read of every key written (`finals`; a key
/// missing there could not be read): every acknowledged append is in its key exactly once, an
/// indeterminate one at most once, a failed one never, and nothing else is there.
pub fn append_invariant(ops: &[Operation], finals: &BTreeMap<String, Option<String>>) -> Invariant {
    let name = "append: no acknowledged append lost, none doubled";
    // (key, token) -> status of the append that wrote it.
    let mut appended: HashMap<(&str, &str), Status> = HashMap::new();
    let mut keys: BTreeSet<&str> = BTreeSet::new();
    for op in ops.iter().filter(|op| op.op == OpKind::Append) {
        if let Some(value) = op.value.as_deref() {
            appended.insert((op.key.as_str(), value), op.status);
            keys.insert(op.key.as_str());
        }
    }
    let unread: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !finals.contains_key(*k))
        .collect();
    let mut problems: Vec<String> = Vec::new();
    let mut seen: HashMap<(&str, String), usize> = HashMap::new();
    for (key, value) in finals {
        for token in value.as_deref().unwrap_or("").split_inclusive(';') {
            *seen.entry((key.as_str(), token.to_string())).or_default() += 1;
        }
    }
    for ((key, token), count) in &seen {
        match appended.get(&(*key, token.as_str())) {
            None => problems.push(format!("{key}: {token:?} was never appended")),
            Some(Status::Fail) => {
                problems.push(format!("{key}: {token:?} was refused, yet it is there"))
            }
            Some(_) if *count > 1 => {
                problems.push(format!("{key}: {token:?} is there {count} times"))
            }
            Some(_) => {}
        }
    }
    let mut acknowledged = 0;
    for (&(key, token), status) in &appended {
        if *status == Status::Ok && finals.contains_key(key) {
            acknowledged += 1;
            if !seen.contains_key(&(key, token.to_string())) {
                problems.push(format!("{key}: acknowledged {token:?} is lost"));
            }
        }
    }
    problems.sort();
    let holds = match (problems.is_empty(), unread.is_empty()) {
        (false, _) => Some(false),
        (true, true) => Some(true),
        (true, false) => None,
    };
    let detail = if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(20).map(String::as_str).collect();
        format!("{} problem(s): {}", problems.len(), shown.join("; "))
    } else if !unread.is_empty() {
        format!(
            "{} key(s) could not be read at the end: {:?}",
            unread.len(),
            unread
        )
    } else {
        format!(
            "{acknowledged} acknowledged appends in {} keys, each exactly once",
            finals.len()
        )
    };
    Invariant {
        name,
        holds,
        detail,
    }
}

/// The history the checker is given for the append workload: each indeterminate append whose token
/// is absent from its key's final read becomes `fail`. Sound for this workload only: it never puts,
/// deletes or swaps, so a value only grows and the final read — made after every client stopped and
/// the cluster recovered — holds every append that ever took effect. Why: an `info` append that never
/// happened can be linearized anywhere after its invocation, and a few of them on one key make the
/// search explode (memory), although the final read already answers the question. Returns the
/// operations and how many were resolved; `history.jsonl` keeps what the clients saw.
pub fn resolve_info_appends(
    ops: &[Operation],
    finals: &BTreeMap<String, Option<String>>,
) -> (Vec<Operation>, usize) {
    let mut resolved = 0;
    let ops = ops
        .iter()
        .map(|op| {
            let absent = op.op == OpKind::Append
                && op.status == Status::Info
                && finals.get(&op.key).is_some_and(|value| {
                    let token = op.value.as_deref().unwrap_or("");
                    !value
                        .as_deref()
                        .unwrap_or("")
                        .split_inclusive(';')
                        .any(|t| t == token)
                });
            match (absent, op.complete) {
                (true, Some(complete)) => {
                    resolved += 1;
                    op.clone().fail_at(op.invoke, complete.max(op.invoke))
                }
                _ => op.clone(),
            }
        })
        .collect();
    (ops, resolved)
}

/// Everything a run found; printed and written to `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The run's tag (names its namespaces, links and rules).
    pub tag: String,
    /// The seed of the schedule and the clients.
    pub seed: u64,
    /// The target.
    pub target: Target,
    /// The workload.
    pub workload: WorkloadKind,
    /// The store the clients used.
    pub store: StoreKind,
    /// The nemeses.
    pub nemesis: Vec<NemesisKind>,
    /// Nodes in the cluster.
    pub nodes: u64,
    /// Whether the servers carried the self-test's deliberate bug (the verdict is then about the
    /// harness: caught or missed).
    pub self_test: bool,
    /// Clients.
    pub clients: usize,
    /// Requested ops/s.
    pub rate: u32,
    /// Length of the faulty phase in seconds.
    pub time_secs: f64,
    /// Fault windows played.
    pub faults: usize,
    /// Counts and availability.
    pub stats: Stats,
    /// Indeterminate appends the final read showed never happened, handed to the checker as `fail`
    /// ([`resolve_info_appends`]).
    pub info_appends_resolved: usize,
    /// `ok`, `violation` or `unknown`.
    pub linearizable: &'static str,
    /// The checker's one-line verdict (the full report is in check.txt).
    pub check: String,
    /// The other invariants.
    pub invariants: Vec<Invariant>,
    /// `valid`, `invalid` or `unknown`.
    pub verdict: &'static str,
    /// The exit status.
    pub exit_code: u8,
}

/// The linearizability part: its word and one line.
pub fn linearizability(result: &CheckResult) -> (&'static str, String) {
    match result {
        CheckResult::Ok => ("ok", "every key's history is linearizable".into()),
        CheckResult::Violation(v) => (
            "violation",
            format!(
                "key {:?} is not linearizable (op #{}, see check.txt)",
                v.key, v.failed_index
            ),
        ),
        CheckResult::Unknown { reason, undecided } => (
            "unknown",
            format!(
                "{reason} with {} key(s) undecided, e.g. {:?} (see check.txt)",
                undecided.len(),
                undecided.iter().take(5).collect::<Vec<_>>()
            ),
        ),
    }
}

/// The verdict word and exit status from the checker's word and the invariants.
pub fn decide(linearizable: &str, invariants: &[Invariant]) -> (&'static str, u8) {
    if linearizable == "violation" || invariants.iter().any(|i| i.holds == Some(false)) {
        ("invalid", EXIT_INVALID)
    } else if linearizable != "ok" || invariants.iter().any(|i| i.holds.is_none()) {
        ("unknown", EXIT_UNKNOWN)
    } else {
        ("valid", EXIT_VALID)
    }
}

/// The verdict of a self-test run (`--self-test`: the servers carry a deliberate safety bug): it
/// passes only if the checks found the bug out — a linearizability violation or a failed invariant
/// (with `append`, an acknowledged append missing from the final read) — since a harness that calls
/// such a run valid, or cannot decide, is not fit to judge the real one.
pub fn decide_self_test(linearizable: &str, invariants: &[Invariant]) -> (&'static str, u8) {
    let caught = linearizable == "violation" || invariants.iter().any(|i| i.holds == Some(false));
    match caught {
        true => (
            "self-test passed: the deliberate bug was caught",
            EXIT_VALID,
        ),
        false => (
            "self-test FAILED: the deliberate bug went unnoticed",
            EXIT_INVALID,
        ),
    }
}

impl Summary {
    /// The exit status the run ends with.
    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let s = &self.stats;
        let mut text = format!(
            "chaos run {} (seed {}): {:?} workload on the {:?} store, nemesis {:?}, {} nodes, {} clients, {:.0} s\n\
             operations: {} ({} ok, {} fail, {} info), {} ok/s\n\
             ok during faults: {}, ok after healing: {}, fault windows: {}\n\
             longest stretch without a successful operation: {} ms (from {} ms)\n\
             linearizability: {} — {}\n",
            self.tag,
            self.seed,
            self.workload,
            self.store,
            self.nemesis,
            self.nodes,
            self.clients,
            self.time_secs,
            s.ops,
            s.ok,
            s.fail,
            s.info,
            s.ok_per_sec,
            s.ok_during_faults,
            s.ok_after_heal,
            self.faults,
            s.longest_outage_ms,
            s.longest_outage_start_ms,
            self.linearizable,
            self.check,
        );
        if self.workload == WorkloadKind::Append {
            text.push_str(&format!(
                "info appends the final read showed never happened (checked as fail): {}\n",
                self.info_appends_resolved
            ));
        }
        for invariant in &self.invariants {
            let word = match invariant.holds {
                Some(true) => "holds",
                Some(false) => "VIOLATED",
                None => "undecided",
            };
            text.push_str(&format!(
                "{}: {word} — {}\n",
                invariant.name, invariant.detail
            ));
        }
        text.push_str(&format!(
            "verdict: {} (exit {})",
            self.verdict, self.exit_code
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(key: &str, token: &str, status: Status) -> Operation {
        let op = Operation::append(1, key, token);
        match status {
            Status::Ok => op.ok_at(1, 2),
            Status::Fail => op.fail_at(1, 2),
            Status::Info => op.info_at(1),
        }
    }

    #[test]
    fn the_append_invariant_finds_lost_doubled_and_phantom_appends() {
        let ops = vec![
            append("a0", "1.1;", Status::Ok),
            append("a0", "1.2;", Status::Info),
            append("a0", "1.3;", Status::Fail),
            append("a0", "1.4;", Status::Info),
        ];
        let finals = |v: &str| BTreeMap::from([("a0".to_string(), Some(v.to_string()))]);
        // The info append may or may not be there.
        assert_eq!(
            append_invariant(&ops, &finals("1.1;1.2;")).holds,
            Some(true)
        );
        assert_eq!(append_invariant(&ops, &finals("1.1;")).holds, Some(true));
        let lost = append_invariant(&ops, &finals("1.2;"));
        assert_eq!(lost.holds, Some(false));
        assert!(lost.detail.contains("lost"), "{}", lost.detail);
        let doubled = append_invariant(&ops, &finals("1.1;1.2;1.2;"));
        assert!(doubled.detail.contains("2 times"), "{}", doubled.detail);
        let failed = append_invariant(&ops, &finals("1.1;1.3;"));
        assert!(failed.detail.contains("refused"), "{}", failed.detail);
        let phantom = append_invariant(&ops, &finals("1.1;9.9;"));
        assert!(
            phantom.detail.contains("never appended"),
            "{}",
            phantom.detail
        );
        assert_eq!(append_invariant(&ops, &BTreeMap::new()).holds, None);
    }

    #[test]
    fn an_indeterminate_append_missing_from_the_final_read_never_happened() {
        let mut ops = vec![
            append("a0", "1.1;", Status::Info),
            append("a0", "1.2;", Status::Info),
            append("a1", "1.3;", Status::Info),
        ];
        for op in &mut ops {
            op.complete = Some(5);
        }
        let finals = BTreeMap::from([("a0".to_string(), Some("1.2;".to_string()))]);
        let (checked, resolved) = resolve_info_appends(&ops, &finals);
        assert_eq!(resolved, 1);
        let statuses: Vec<Status> = checked.iter().map(|op| op.status).collect();
        // 1.1 is not there: it never happened. 1.2 is: when is unknown. a1 was not read: unknown.
        assert_eq!(statuses, [Status::Fail, Status::Info, Status::Info]);
        assert!(checked.iter().all(|op| op.validate().is_ok()));
    }

    #[test]
    fn the_longest_outage_is_the_longest_gap_between_acknowledgements() {
        let ms = 1_000_000;
        let ops = vec![
            Operation::get(1, "r0", None).ok_at(0, 100 * ms),
            Operation::get(1, "r0", None).ok_at(0, 200 * ms),
            Operation::put(1, "r0", "1").info_at(250 * ms),
            Operation::get(1, "r0", None).ok_at(0, 900 * ms),
        ];
        let stats = stats(&ops, &[(150 * ms, 950 * ms)], 0, 1000 * ms, 800 * ms);
        assert_eq!((stats.ok, stats.info), (3, 1));
        assert_eq!(stats.longest_outage_ms, 700);
        assert_eq!(stats.longest_outage_start_ms, 200);
        assert_eq!((stats.ok_during_faults, stats.ok_after_heal), (2, 1));
    }

    #[test]
    fn unknown_never_passes_and_any_violation_fails() {
        let holds = |h| Invariant {
            name: "x",
            holds: h,
            detail: String::new(),
        };
        assert_eq!(decide("ok", &[holds(Some(true))]).1, EXIT_VALID);
        assert_eq!(decide("unknown", &[holds(Some(true))]).1, EXIT_UNKNOWN);
        assert_eq!(decide("ok", &[holds(None)]).1, EXIT_UNKNOWN);
        assert_eq!(decide("unknown", &[holds(Some(false))]).1, EXIT_INVALID);
        assert_eq!(decide("violation", &[]).1, EXIT_INVALID);
    }

    #[test]
    fn a_self_test_passes_only_when_the_bug_is_caught() {
        let lost = Invariant {
            name: "append",
            holds: Some(false),
            detail: String::new(),
        };
        assert_eq!(decide_self_test("violation", &[]).1, EXIT_VALID);
        assert_eq!(decide_self_test("ok", &[lost]).1, EXIT_VALID);
        assert_eq!(decide_self_test("ok", &[]).1, EXIT_INVALID);
        assert_eq!(decide_self_test("unknown", &[]).1, EXIT_INVALID);
    }
}
