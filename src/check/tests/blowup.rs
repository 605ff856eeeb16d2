//! Issue #13: histories recorded while the leader was paused (hundreds of indeterminate
//! mutations) made the checker run out of memory. These tests regenerate that shape
//! ([`paused_history`]) and demand that the checker stays within its time and memory budget and
//! never reports a wrong verdict.

use std::time::{Duration, Instant};

use super::super::gen::{paused_history, PauseConfig};
use super::super::{check_with, CheckOptions, CheckResult, History, KvModel, OpKind, Status};

const MIB: usize = 1 << 20;

/// Time allowed past the budget: one poll interval of the search plus joining the workers and
/// building the report.
const SLACK: Duration = Duration::from_secs(2);

fn options(budget: Duration, max_memory: usize) -> CheckOptions {
    CheckOptions {
        budget,
        threads: 2,
        max_memo_bytes: max_memory,
    }
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the check and asserts the budget and the verdict: `Ok`, or `Unknown` naming the
/// undecided keys — a history linearizable by construction must never be a violation.
fn assert_within_budget(h: &History, budget: Duration, max_memory: usize) -> CheckResult {
    let start = Instant::now();
    let result = check_with(h, &KvModel, &options(budget, max_memory));
    let took = start.elapsed();
    assert!(
        took < budget + SLACK,
        "took {took:?} with a {budget:?} budget"
    );
    match &result {
        CheckResult::Ok => {}
        CheckResult::Unknown { undecided, .. } => {
            assert!(
                !undecided.is_empty(),
                "unknown must name the keys: {result}"
            );
            let keys: Vec<&str> = h.ops().iter().map(|o| o.key.as_str()).collect();
            assert!(
                undecided.iter().all(|k| keys.contains(&k.as_str())),
                "{result}"
            );
        }
        CheckResult::Violation(v) => panic!("false violation: {v}"),
    }
    result
}

#[test]
fn paused_histories_are_decided_within_budget() {
    // The issue's shape: 5 keys, 10 clients, ~5,000 ops, hundreds of lost mutations.
    for (seed, info) in [(1, 300), (2, 500), (3, 800)] {
        let h = paused_history(&PauseConfig::new(5_000, info, seed));
        let lost = h
            .ops()
            .iter()
            .filter(|o| o.status == Status::Info && o.op != OpKind::Get)
            .count();
        assert_eq!(lost, info, "generator produced {lost} info mutations");
        let result = assert_within_budget(&h, Duration::from_secs(10), 256 * MIB);
        // Deciding is the point of the pruning: these shapes must not stay unknown.
        assert_eq!(result, CheckResult::Ok, "seed {seed}, {info} info ops");
    }
}

#[test]
fn huge_paused_history_stays_within_memory_and_time() {
    // Far more lost mutations than any budget can search through exhaustively: the answer may be
    // unknown, but the process must not grow past the limit.
    let h = paused_history(&PauseConfig::new(20_000, 3_000, 7));
    let before = peak_rss().unwrap_or(0);
    let limit = 64 * MIB;
    assert_within_budget(&h, Duration::from_secs(5), limit);
    let after = peak_rss().unwrap_or(0);
    // Other tests share this process, so the growth is an upper bound on ours; the history
    // itself and the test harness account for the slack.
    assert!(
        after.saturating_sub(before) < limit + 64 * MIB,
        "peak RSS grew by {} MiB with a {} MiB limit",
        after.saturating_sub(before) / MIB,
        limit / MIB
    );
}

#[test]
fn corrupted_paused_history_is_never_ok() {
    // A read that sees a value nobody wrote cannot be explained by any info op: the verdict must
    // be a violation on that key (or unknown), never Ok.
    let mut ops = paused_history(&PauseConfig::new(3_000, 300, 11)).into_ops();
    let target = ops
        .iter()
        .rposition(|o| o.op == OpKind::Get && o.status == Status::Ok)
        .expect("history has reads");
    ops[target].output = Some("never written;".into());
    let key = ops[target].key.clone();
    let h = History::new(ops).expect("still valid");
    match check_with(&h, &KvModel, &options(Duration::from_secs(10), 256 * MIB)) {
        CheckResult::Violation(v) => {
            assert_eq!(v.key, key);
            assert_eq!(v.failed_index, target, "{v}");
        }
        CheckResult::Unknown { undecided, .. } => assert!(undecided.contains(&key)),
        CheckResult::Ok => panic!("a read of a value never written was accepted"),
    }
}

/// The measurement histories of issue #13 survive the trip through JSON lines unchanged (what
/// `kvctl check` reads is what the generator made); with `$CHECK_GEN_DIR` set they are also written
/// there for measurements by hand (`CHECK_GEN_DIR=/tmp/h cargo test --lib write_issue13_histories`).
#[test]
fn write_issue13_histories() {
    let dir = std::env::var("CHECK_GEN_DIR").ok();
    let mut shapes: Vec<(usize, usize, u64)> = Vec::new();
    for ops in [1_000, 5_000, 20_000] {
        for info in [0, 50, 500] {
            shapes.push((ops, info, 13));
        }
    }
    // The shapes the tests above use.
    shapes.extend([
        (5_000, 300, 1),
        (5_000, 500, 2),
        (5_000, 800, 3),
        (20_000, 3_000, 7),
    ]);
    for (ops, info, seed) in shapes {
        let h = paused_history(&PauseConfig::new(ops, info, seed));
        let mut out = Vec::new();
        h.to_jsonl(&mut out).expect("encode");
        let back = History::from_jsonl(out.as_slice()).expect("decode");
        assert_eq!(back, h, "pause-{ops}-{info}-s{seed} changed on the way");
        if let Some(dir) = &dir {
            let name = format!("{dir}/pause-{ops}-{info}-s{seed}.jsonl");
            std::fs::write(name, out).expect("write");
        }
    }
}
