//! The verdict of a run: linearizability per key, each workload's own invariant, recovery, and the
//! numbers an operator looks at first (throughput, outcomes, the longest time nothing succeeded,
//! overall and after each kind of fault: [`fault_outages`]).
//!
//! Exit status ([`Summary::exit_code`]): [`EXIT_INVALID`] if the checker found a violation or any
//! invariant failed; else [`EXIT_UNKNOWN`] if the checker ran out of budget or an invariant could not
//! be decided; else [`EXIT_VALID`]. An `Unknown` is never reported as valid.

use super::args::Target;
use super::bank;
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
    /// The longest outage after each kind of fault ([`fault_outages`]), by kind.
    pub outage_by_fault: Vec<FaultOutage>,
}

/// Availability after one kind of fault (`kill-leader`, `restart-all`, ...): the figure issue #13's
/// failover targets are stated in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultOutage {
    /// The kind ([`NemesisEvent::kind`]).
    pub kind: String,
    /// Faults of this kind played.
    pub faults: usize,
    /// The longest stretch without an acknowledged operation after one of them, in milliseconds.
    pub longest_outage_ms: u64,
    /// When that stretch began (ms on the run's clock).
    pub longest_outage_start_ms: u64,
    /// What the stretch is measured from: `fault start`, or `last node restarted` for `restart-all`
    /// (before that every node is down by design; what counts is how fast the cluster comes back).
    pub measured_from: &'static str,
    /// Issue #13's target for this kind, if it sets one (ms): 2,000 after a leader SIGKILL or pause,
    /// 5,000 after the last node of a whole-cluster restart comes back.
    pub target_ms: Option<u64>,
    /// Whether every fault of this kind met the target (`None`: no target).
    pub within_target: Option<bool>,
}

/// Issue #13's availability target for a fault kind, in ms.
pub fn outage_target_ms(kind: &str) -> Option<u64> {
    match kind {
        "kill-leader" | "pause-leader" => Some(2_000),
        "restart-all" => Some(5_000),
        _ => None,
    }
}

/// The longest outage after each kind of fault in `events`, for a workload whose acknowledged
/// operations are `ops` and which was stopped at `to` (ns).
///
/// For one fault, playing from `a` to `b`: the longest gap between consecutive acknowledgements
/// (final reads left out) counted from `a` up to the first acknowledgement after `b` (or `to`, if
/// none came) — so an outage that outlasts the window is measured whole, and one that a window
/// merely contains is not blamed on the fault before it. `a` is the fault's start; for `restart-all`
/// both `a` and `b` are the moment its last node was restarted (its `stop` event), so the figure is
/// the time until the cluster served again. Kinds are listed in name order.
pub fn fault_outages(ops: &[Operation], events: &[NemesisEvent], to: u64) -> Vec<FaultOutage> {
    let mut acknowledged: Vec<u64> = ops
        .iter()
        .filter(|op| op.status == Status::Ok && op.client != FINAL_READER)
        .filter_map(|op| op.complete)
        .collect();
    acknowledged.sort_unstable();
    // kind -> (faults, longest gap, when it began)
    let mut by_kind: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    let mut open: HashMap<&str, &NemesisEvent> = HashMap::new();
    let mut played: Vec<(&str, u64, u64)> = Vec::new();
    for event in events {
        match (event.phase, event.fault) {
            ("start", fault) => {
                open.insert(fault, event);
            }
            (_, "heal-all") => {
                played.extend(open.drain().map(|(_, s)| (s.kind, s.time, event.time)));
            }
            (_, fault) => {
                if let Some(start) = open.remove(fault) {
                    played.push((start.kind, start.time, event.time));
                }
            }
        }
    }
    played.extend(open.into_values().map(|s| (s.kind, s.time, to.max(s.time))));
    // Hash order must not decide which of two equal outages is shown.
    played.sort_unstable();
    for (kind, start, stop) in played {
        let (a, b) = match kind {
            "restart-all" => (stop, stop),
            _ => (start, stop),
        };
        let (gap, gap_start) = longest_gap(&acknowledged, a, b, to);
        let entry = by_kind.entry(kind).or_insert((0, 0, a));
        entry.0 += 1;
        if gap > entry.1 {
            (entry.1, entry.2) = (gap, gap_start);
        }
    }
    by_kind
        .into_iter()
        .map(|(kind, (faults, gap, start))| {
            let target_ms = outage_target_ms(kind);
            let longest_outage_ms = gap / 1_000_000;
            FaultOutage {
                kind: kind.to_string(),
                faults,
                longest_outage_ms,
                longest_outage_start_ms: start / 1_000_000,
                measured_from: match kind {
                    "restart-all" => "last node restarted",
                    _ => "fault start",
                },
                target_ms,
                within_target: target_ms.map(|t| longest_outage_ms <= t),
            }
        })
        .collect()
}

/// The longest gap (and where it began) in `a`, the sorted acknowledgements in `(a, b]`, and the
/// first one after `b` (`to` if none).
fn longest_gap(acknowledged: &[u64], a: u64, b: u64, to: u64) -> (u64, u64) {
    let first = acknowledged.partition_point(|&t| t <= a);
    let within = acknowledged[first..]
        .iter()
        .copied()
        .take_while(|&t| t <= b);
    let after = acknowledged[first..]
        .iter()
        .copied()
        .find(|&t| t > b)
        .unwrap_or(to.max(b));
    let (mut previous, mut gap, mut gap_start) = (a, 0, a);
    for t in within.chain(std::iter::once(after)) {
        if t.saturating_sub(previous) > gap {
            (gap, gap_start) = (t - previous, previous);
        }
        previous = previous.max(t);
    }
    (gap, gap_start)
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

/// The longest log line a node may write. Operators read logs in terminals and ship them to
/// collectors that cut or drop long lines; a node's line once grew with every election (its span
/// appended `term` and `role`), to 534 characters after 30 terms and kilobytes after hundreds.
pub const MAX_LOG_LINE: usize = 512;

/// Every line of the nodes' logs in `dir` (`*.log`, what the local target writes) is at most
/// [`MAX_LOG_LINE`] bytes long. `None` when there are no logs to read (the compose target's are
/// Docker's): nothing is claimed then.
pub fn log_line_invariant(dir: &std::path::Path) -> Option<Invariant> {
    use std::io::BufRead as _;
    let mut longest: Option<(usize, String)> = None;
    let mut lines = 0u64;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        for (n, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let Ok(line) = line else { break };
            lines += 1;
            if longest.as_ref().is_none_or(|(len, _)| line.len() > *len) {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                longest = Some((line.len(), format!("{name}:{}", n + 1)));
            }
        }
    }
    let (len, at) = longest?;
    Some(Invariant {
        name: "logs: no line longer than 512 bytes",
        holds: Some(len <= MAX_LOG_LINE),
        detail: format!("{lines} lines; the longest is {len} bytes ({at})"),
    })
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

/// The bank workload's invariant ([`bank::audit`]): every ledger an acknowledged read returned — by a
/// client, or by the final read of each ledger (`finals`; a key missing there could not be read) —
/// has the opening total and no negative balance, and no ledger once opened is gone at the end.
/// Reads of a ledger nobody has opened yet (absent) are fine. Each problem names the key, the read
/// (client and time, or "final read") and the totals.
pub fn bank_invariant(ops: &[Operation], finals: &BTreeMap<String, Option<String>>) -> Invariant {
    let name = "bank: every read shows the opening total, no balance negative";
    let mut problems: Vec<String> = Vec::new();
    let mut opened: BTreeSet<&str> = BTreeSet::new();
    let mut reads = 0usize;
    for op in ops.iter().filter(|op| op.status == Status::Ok) {
        match op.op {
            OpKind::Cas if op.cas_outcome() == Some(true) => {
                opened.insert(op.key.as_str());
            }
            OpKind::Get if op.client != FINAL_READER => {
                let Some(text) = op.output.as_deref() else {
                    continue;
                };
                opened.insert(op.key.as_str());
                reads += 1;
                if let Err(why) = bank::audit(text) {
                    problems.push(format!(
                        "{}: get by client {} at {:.3} s read {text:?}: {why}",
                        op.key,
                        op.client,
                        op.complete.unwrap_or(op.invoke) as f64 / 1e9
                    ));
                }
            }
            _ => {}
        }
    }
    // Every final read is audited, also of a ledger only an indeterminate cas may have opened.
    for (key, value) in finals {
        match value.as_deref() {
            Some(text) => {
                if let Err(why) = bank::audit(text) {
                    problems.push(format!("{key}: final read {text:?}: {why}"));
                }
            }
            None if opened.contains(key.as_str()) => problems.push(format!(
                "{key}: final read found no ledger, though it was opened (total 0, expected {})",
                bank::TOTAL
            )),
            None => {}
        }
    }
    let unread: Vec<&str> = opened
        .iter()
        .copied()
        .filter(|key| !finals.contains_key(*key))
        .collect();
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
            "{} ledger(s) could not be read at the end: {unread:?}",
            unread.len()
        )
    } else {
        format!(
            "{reads} reads of {} ledger(s) and the final read of each: every one totals {}, \
             none negative",
            opened.len(),
            bank::TOTAL
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
        if !s.outage_by_fault.is_empty() {
            text.push_str(
                "longest stretch without a successful operation by fault kind (from the fault's \
                 start; restart-all: from the last node's restart):\n",
            );
            for o in &s.outage_by_fault {
                let target = match (o.target_ms, o.within_target) {
                    (Some(t), Some(true)) => format!(" (target <= {t} ms: met)"),
                    (Some(t), _) => format!(" (target <= {t} ms: MISSED)"),
                    (None, _) => String::new(),
                };
                text.push_str(&format!(
                    "  {}: {} ms (from {} ms), {} fault(s){target}\n",
                    o.kind, o.longest_outage_ms, o.longest_outage_start_ms, o.faults
                ));
            }
        }
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

    #[test]
    fn a_log_line_over_the_limit_is_found_and_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(log_line_invariant(&dir.path().join("missing")).is_none());
        std::fs::write(dir.path().join("node-1.log"), "short\nshort too\n").expect("write");
        let fine = log_line_invariant(dir.path()).expect("logs read");
        assert_eq!(fine.holds, Some(true), "{}", fine.detail);
        let long = format!("ok\n{}\nok\n", "x".repeat(MAX_LOG_LINE + 1));
        std::fs::write(dir.path().join("node-2.log"), long).expect("write");
        let broken = log_line_invariant(dir.path()).expect("logs read");
        assert_eq!(broken.holds, Some(false));
        assert!(
            broken.detail.contains("513 bytes (node-2.log:2)"),
            "{}",
            broken.detail
        );
    }
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

    fn read(client: u64, key: &str, ledger: Option<&str>, at_ms: u64) -> Operation {
        let ms = 1_000_000;
        Operation::get(client, key, ledger).ok_at(at_ms * ms, (at_ms + 1) * ms)
    }

    #[test]
    fn the_bank_invariant_catches_a_read_with_a_wrong_total() {
        let opening = bank::opening();
        let moved = "60,140,100,100,100";
        let clean = vec![
            read(1, "b0", None, 1),
            Operation::cas(2, "b0", None, Some(opening.as_str()), true).ok_at(1, 2),
            Operation::cas(3, "b0", None, Some(opening.as_str()), false).ok_at(1, 3),
            read(1, "b0", Some(opening.as_str()), 4),
            Operation::cas(2, "b0", Some(opening.as_str()), Some(moved), true).ok_at(5, 6),
            read(3, "b0", Some(moved), 7),
            // An indeterminate read and a refused one say nothing about the ledger.
            Operation::get(4, "b0", None).info_at(8),
            read(1, "b1", None, 9),
        ];
        let finals = |v: Option<&str>| BTreeMap::from([("b0".to_string(), v.map(String::from))]);
        let ok = bank_invariant(&clean, &finals(Some(moved)));
        assert_eq!(ok.holds, Some(true), "{}", ok.detail);
        assert!(ok.detail.contains("totals 500"), "{}", ok.detail);

        // A read that lost 10: the key, the reader and the totals are named.
        let mut short = clean.clone();
        short.push(read(5, "b0", Some("60,130,100,100,100"), 10));
        let bad = bank_invariant(&short, &finals(Some(moved)));
        assert_eq!(bad.holds, Some(false));
        assert!(
            bad.detail.contains("b0: get by client 5")
                && bad.detail.contains("total 490, expected 500"),
            "{}",
            bad.detail
        );
        // An overdrawn account, the right total.
        let mut overdrawn = clean.clone();
        overdrawn.push(read(5, "b0", Some("-10,210,100,100,100"), 10));
        let bad = bank_invariant(&overdrawn, &finals(Some(moved)));
        assert!(bad.detail.contains("account 0 holds -10"), "{}", bad.detail);
        // The final read is audited too, and an opened ledger may not vanish.
        let bad = bank_invariant(&clean, &finals(Some("100,100,100,100,101")));
        assert_eq!(bad.holds, Some(false), "{}", bad.detail);
        assert!(
            bad.detail.contains("b0: final read") && bad.detail.contains("total 501"),
            "{}",
            bad.detail
        );
        assert_eq!(bank_invariant(&clean, &finals(None)).holds, Some(false));
        // A ledger that could not be read at the end leaves the invariant undecided.
        assert_eq!(bank_invariant(&clean, &BTreeMap::new()).holds, None);
    }

    fn event(
        time_ms: u64,
        phase: &'static str,
        fault: &'static str,
        kind: &'static str,
    ) -> NemesisEvent {
        NemesisEvent {
            time: time_ms * 1_000_000,
            phase,
            fault,
            kind,
            nodes: vec![1],
            detail: String::new(),
        }
    }

    #[test]
    fn outages_are_measured_per_fault_kind_from_the_fault_or_from_the_last_restart() {
        let ms = 1_000_000;
        // One acknowledgement every 100 ms, except in the holes the faults made.
        let holes = [
            (1_050, 2_500),
            (5_050, 5_600),
            (9_000, 13_200),
            (16_050, 16_900),
        ];
        let mut ops: Vec<Operation> = (0..200u64)
            .map(|i| i * 100)
            .filter(|t| !holes.iter().any(|&(a, b)| (a..b).contains(t)))
            .map(|t| read(1, "r0", None, t))
            .collect();
        // The final reads never count.
        ops.push(read(FINAL_READER, "r0", None, 9_500));
        let events = vec![
            // A leader kill at 1.0 s: nothing from 1.0 s (the last ack, at 1.001) to 2.501.
            event(1_000, "start", "kill", "kill-leader"),
            event(3_000, "stop", "kill", "kill-leader"),
            // Another at 5.0 s: a shorter hole.
            event(5_000, "start", "kill", "kill-leader"),
            event(7_000, "stop", "kill", "kill-leader"),
            // Every node down from 8.0 s to 12.0 s; the first ack after the restart at 13.201.
            event(8_000, "start", "restart-all", "restart-all"),
            event(12_000, "stop", "restart-all", "restart-all"),
            // A paused follower; the outage it overlaps begins in its window.
            event(16_000, "start", "pause", "pause-one"),
            event(16_500, "stop", "pause", "pause-one"),
            event(19_000, "stop", "heal-all", "heal-all"),
        ];
        let outages = fault_outages(&ops, &events, 20_000 * ms);
        let kinds: Vec<&str> = outages.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["kill-leader", "pause-one", "restart-all"]);
        let kill = &outages[0];
        assert_eq!((kill.faults, kill.longest_outage_ms), (2, 1_500));
        assert_eq!(kill.longest_outage_start_ms, 1_001);
        assert_eq!(
            (kill.target_ms, kill.within_target),
            (Some(2_000), Some(true))
        );
        // Measured from the stop event (the last restart), not from the kill.
        let restart = &outages[2];
        assert_eq!(restart.longest_outage_ms, 1_201);
        assert_eq!(restart.longest_outage_start_ms, 12_000);
        assert_eq!(restart.measured_from, "last node restarted");
        assert_eq!(restart.within_target, Some(true));
        // The pause's stretch runs past its window to the first acknowledgement after it.
        let pause = &outages[1];
        assert_eq!(pause.longest_outage_ms, 900);
        assert_eq!((pause.target_ms, pause.within_target), (None, None));
        // A kill whose outage outlasts the target (the last ack before the hole at 8.901 s, the
        // next at 13.201 s) is reported as missed.
        let events = [
            event(8_000, "start", "kill", "kill-leader"),
            event(9_000, "stop", "kill", "kill-leader"),
        ];
        let missed = fault_outages(&ops, &events, 20_000 * ms);
        assert_eq!(missed[0].longest_outage_ms, 4_300);
        assert_eq!(missed[0].within_target, Some(false));
    }
}
