//! Differential test: the WGL search against brute-force enumeration of
//! linearizations on thousands of small random (mostly non-linearizable)
//! histories.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{check, CheckResult, History, KvModel, Model, OpKind, Operation, Status};

/// Whether `ops` (one key, already filtered) has a linearization: tries every
/// order allowed by real time, with each info op either included or not.
fn brute_linearizable(ops: &[&Operation]) -> bool {
    fn go(ops: &[&Operation], used: &mut Vec<bool>, state: &Option<String>) -> bool {
        let pending: Vec<usize> = (0..ops.len()).filter(|&i| !used[i]).collect();
        if pending.iter().all(|&i| ops[i].status == Status::Info) {
            return true; // remaining info ops never happened
        }
        for &i in &pending {
            // i may go next unless some pending definite op returned before
            // i was invoked.
            let blocked = pending.iter().any(|&j| {
                ops[j]
                    .effective_complete()
                    .is_some_and(|c| c < ops[i].invoke)
            });
            if blocked {
                continue;
            }
            if let Some(next) = KvModel.step(state, ops[i]) {
                used[i] = true;
                let ok = go(ops, used, &next);
                used[i] = false;
                if ok {
                    return true;
                }
            }
        }
        false
    }
    go(ops, &mut vec![false; ops.len()], &None)
}

fn random_op(rng: &mut ChaCha8Rng, client: u64) -> Operation {
    const VALUES: [&str; 2] = ["a", "b"];
    const OUTPUTS: [Option<&str>; 5] = [None, Some("a"), Some("b"), Some("ab"), Some("ba")];
    let key = if rng.random_bool(0.8) { "x" } else { "y" };
    let value = VALUES[rng.random_range(0..VALUES.len())];
    let op = match rng.random_range(0..10) {
        0..4 => Operation::get(client, key, OUTPUTS[rng.random_range(0..OUTPUTS.len())]),
        4..6 => Operation::put(client, key, value),
        6..8 => Operation::append(client, key, value),
        8 => Operation::delete(client, key),
        _ => {
            let expected = OUTPUTS[rng.random_range(0..3)];
            let new = if rng.random_bool(0.2) {
                None
            } else {
                Some(value)
            };
            Operation::cas(client, key, expected, new, rng.random_bool(0.5))
        }
    };
    let invoke = rng.random_range(0..20);
    let complete = invoke + rng.random_range(0..8);
    match rng.random_range(0..10) {
        0 => op.info_at(invoke),
        1 => op.fail_at(invoke, complete),
        _ => op.ok_at(invoke, complete),
    }
}

#[test]
fn search_agrees_with_brute_force() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let (mut oks, mut violations) = (0, 0);
    for round in 0..4000 {
        let n = rng.random_range(1..8);
        let ops: Vec<Operation> = (0..n).map(|c| random_op(&mut rng, c)).collect();
        let history = History::new(ops.clone()).expect("valid");
        let expected = ["x", "y"].iter().all(|key| {
            let part: Vec<&Operation> = ops
                .iter()
                .filter(|o| o.key == *key)
                .filter(|o| {
                    o.status == Status::Ok || (o.status == Status::Info && o.op != OpKind::Get)
                })
                .collect();
            brute_linearizable(&part)
        });
        match check(&history, &KvModel, Duration::from_secs(10)) {
            CheckResult::Ok => {
                assert!(
                    expected,
                    "round {round}: checker said ok, brute force disagrees: {ops:#?}"
                );
                oks += 1;
            }
            CheckResult::Violation(v) => {
                assert!(!expected, "round {round}: checker found a violation, brute force found a linearization: {v}");
                // The reported prefix must itself be a legal sequential run.
                let mut state = KvModel.init();
                for op in &v.linearized_prefix {
                    state = KvModel
                        .step(&state, op)
                        .unwrap_or_else(|| panic!("round {round}: illegal prefix: {v}"));
                }
                assert!(
                    !v.linearized_prefix.contains(&v.failed_op),
                    "round {round}: {v}"
                );
                assert!(v.sub_history.contains(&v.failed_op), "round {round}: {v}");
                violations += 1;
            }
            other => panic!("round {round}: {other}"),
        }
    }
    println!("brute-force agreement: {oks} ok, {violations} violations");
    assert!(
        oks > 500 && violations > 500,
        "{oks} ok / {violations} violations: generator is unbalanced"
    );
}
