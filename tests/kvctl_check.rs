//! `kvctl check` as a process (issue #13): a history that used to get the checker killed for memory
//! must end with a verdict or "unknown" (exit 0 or 3) within `--budget-secs` and `--max-memory`,
//! naming the keys it could not decide; bad input is exit 2 with the line.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ds824::check::gen::{paused_history, PauseConfig};
use ds824::check::{History, Operation};

fn kvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(args)
        .output()
        .expect("run kvctl")
}

fn write(path: &Path, history: &History) {
    let mut out = Vec::new();
    history.to_jsonl(&mut out).expect("encode");
    std::fs::write(path, out).expect("write");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn paused_leader_history_is_decided_within_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("paused.jsonl");
    write(&path, &paused_history(&PauseConfig::new(5_000, 500, 4)));
    let start = Instant::now();
    let out = kvctl(&[
        "check",
        "--budget-secs",
        "10",
        "--max-memory",
        "256MiB",
        path.to_str().expect("path"),
    ]);
    let took = start.elapsed();
    // Killed by a signal would be `None`; an abort is 134.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{out:?}\n{}",
        text(&out.stdout)
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn hopeless_history_is_unknown_naming_the_key_and_why() {
    // 30 concurrent puts and a read of a value none wrote: every subset must be tried.
    let mut ops: Vec<Operation> = (0..30)
        .map(|i| Operation::put(i, "x", format!("v{i}")).ok_at(0, 1000))
        .collect();
    ops.push(Operation::get(30, "x", Some("nope")).ok_at(2000, 2100));
    ops.push(Operation::put(31, "y", "1").ok_at(0, 10));
    ops.push(Operation::get(32, "y", Some("1")).ok_at(20, 30));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("hopeless.jsonl");
    write(&path, &History::new(ops).expect("valid"));
    let start = Instant::now();
    let out = kvctl(&[
        "check",
        "--budget-secs",
        "30",
        "--max-memory",
        "16MiB",
        path.to_str().expect("path"),
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "memory, not time, must stop it"
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("undecided keys:"), "{stdout}");
    assert!(stdout.contains("\"x\": memory limit reached"), "{stdout}");
    assert!(!stdout.contains("\"y\":"), "y was decided: {stdout}");
}

#[test]
fn history_larger_than_the_memory_limit_is_unknown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("big.jsonl");
    write(&path, &paused_history(&PauseConfig::new(2_000, 0, 5)));
    let out = kvctl(&[
        "check",
        "--max-memory",
        "64KiB",
        path.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stdout).contains("history alone"), "{out:?}");
}

#[test]
fn malformed_history_and_bad_sizes_are_usage_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.jsonl");
    let good =
        r#"{"client":1,"op":"put","key":"x","value":"a","invoke":0,"complete":5,"status":"ok"}"#;
    std::fs::write(&path, format!("{good}\n{good}\n{{\"client\":1,\"op\":\n")).expect("write");
    let out = kvctl(&["check", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("line 3"), "{out:?}");

    let out = kvctl(&[
        "check",
        "--max-memory",
        "lots",
        path.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `kvctl check` of `ops` with stdout a pipe whose reader is gone before kvctl starts
/// (`kvctl check FILE | head -0`).
fn check_with_reader_gone(ops: Vec<Operation>) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    check_writing_to(ops, writer.into())
}

/// `kvctl check` of `ops` with its output going to `stdout`.
fn check_writing_to(ops: Vec<Operation>, stdout: std::process::Stdio) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("small.jsonl");
    write(&path, &History::new(ops).expect("valid"));
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["check", path.to_str().expect("path")])
        .stdout(stdout)
        .output()
        .expect("run kvctl")
}

/// A history that is linearizable (`bad` false) or not.
fn two_ops(bad: bool) -> Vec<Operation> {
    vec![
        Operation::put(0, "x", "1").ok_at(0, 10),
        Operation::get(1, "x", Some(if bad { "2" } else { "1" })).ok_at(20, 30),
    ]
}

#[test]
fn a_reader_that_went_away_ends_kvctl_quietly_with_its_own_answer() {
    // Not a panic's message and backtrace (exit 101): nothing on stderr, and the exit status the
    // command would have had, so a script still gets its answer.
    let linearizable = check_with_reader_gone(two_ops(false));
    assert_eq!(linearizable.status.code(), Some(0), "{linearizable:?}");
    assert!(linearizable.stderr.is_empty(), "{linearizable:?}");
    let violation = check_with_reader_gone(two_ops(true));
    assert_eq!(violation.status.code(), Some(1), "{violation:?}");
    assert!(violation.stderr.is_empty(), "{violation:?}");
}

#[test]
fn output_that_cannot_be_written_is_a_failure_named_on_stderr() {
    // `kvctl check FILE > /dev/full`: the answer is lost, so a success is not one.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = check_writing_to(two_ops(false), full.try_clone().expect("clone").into());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("kvctl: error: cannot write the output"),
        "{out:?}"
    );
    // A violation stays a violation: its exit status is the verdict, and why the report is missing
    // is said.
    let out = check_writing_to(two_ops(true), full.into());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("kvctl: error: cannot write the output"),
        "{out:?}"
    );
}
