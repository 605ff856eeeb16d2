use std::time::{Duration, Instant};

use super::super::{
    check, check_with, CheckOptions, CheckResult, KvModel, OpKind, Operation, RegisterModel,
    UnknownReason,
};
use super::{hist, BUDGET};

fn kv(ops: Vec<Operation>) -> CheckResult {
    check(&hist(ops), &KvModel, BUDGET)
}

fn violation(result: CheckResult) -> Box<super::super::Violation> {
    match result {
        CheckResult::Violation(v) => v,
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn empty_history_is_ok() {
    assert_eq!(kv(vec![]), CheckResult::Ok);
}

#[test]
fn sequential_history_is_ok() {
    let r = kv(vec![
        Operation::get(1, "x", None).ok_at(0, 1),
        Operation::put(1, "x", "a").ok_at(2, 3),
        Operation::append(2, "x", "b").ok_at(4, 5),
        Operation::get(3, "x", Some("ab")).ok_at(6, 7),
        Operation::cas(1, "x", Some("ab"), Some("c"), true).ok_at(8, 9),
        Operation::cas(2, "x", Some("ab"), Some("d"), false).ok_at(10, 11),
        Operation::get(3, "x", Some("c")).ok_at(12, 13),
        Operation::delete(1, "x").ok_at(14, 15),
        Operation::get(2, "x", None).ok_at(16, 17),
        Operation::append(2, "x", "z").ok_at(18, 19),
        Operation::get(2, "x", Some("z")).ok_at(20, 21),
        Operation::cas(3, "y", None, Some("new"), true).ok_at(22, 23),
        Operation::get(3, "y", Some("new")).ok_at(24, 25),
    ]);
    assert_eq!(r, CheckResult::Ok, "{r}");
}

#[test]
fn stale_read_is_a_violation() {
    let v = violation(kv(vec![
        Operation::put(1, "x", "1").ok_at(0, 10),
        Operation::put(1, "x", "2").ok_at(20, 30),
        Operation::get(2, "x", Some("1")).ok_at(40, 50),
    ]));
    assert_eq!(v.key, "x");
    assert_eq!(v.failed_index, 2);
    assert_eq!(v.failed_op.op, OpKind::Get);
    assert_eq!(v.linearized_prefix.len(), 2, "{v}");
    assert_eq!(v.sub_history.len(), 3);
}

#[test]
fn lost_write_is_a_violation() {
    // Two acknowledged concurrent appends; a later read shows only one.
    let v = violation(kv(vec![
        Operation::append(1, "x", "a").ok_at(0, 10),
        Operation::append(2, "x", "b").ok_at(0, 10),
        Operation::get(3, "x", Some("a")).ok_at(20, 30),
    ]));
    assert_eq!(v.failed_index, 2);
    // An acknowledged put that a later read does not see.
    let v = violation(kv(vec![
        Operation::put(1, "y", "v").ok_at(0, 10),
        Operation::get(2, "y", None).ok_at(20, 30),
    ]));
    assert_eq!(v.key, "y");
    assert_eq!(v.failed_index, 1);
}

#[test]
fn duplicated_append_is_a_violation() {
    let v = violation(kv(vec![
        Operation::append(1, "x", "a").ok_at(0, 10),
        Operation::get(2, "x", Some("aa")).ok_at(20, 30),
    ]));
    assert_eq!(v.failed_index, 1);
    // Even an indeterminate append takes effect at most once.
    violation(kv(vec![
        Operation::append(1, "x", "a").info_at(0),
        Operation::get(2, "x", Some("aa")).ok_at(20, 30),
    ]));
}

#[test]
fn concurrent_ops_linearizable_in_one_order_only() {
    // put(1) spans put(2); reads force put(2) first, then put(1).
    let ops = vec![
        Operation::put(1, "x", "1").ok_at(0, 100),
        Operation::put(2, "x", "2").ok_at(10, 20),
        Operation::get(3, "x", Some("2")).ok_at(30, 40),
        Operation::get(3, "x", Some("1")).ok_at(150, 160),
    ];
    assert_eq!(kv(ops.clone()), CheckResult::Ok);
    // Swapping the observations is impossible: reading "1" at [30, 40] puts
    // put(1) after put(2) (which ended at 20), so "2" can never come back.
    let mut bad = ops;
    bad[2].output = Some("1".into());
    bad[3].output = Some("2".into());
    violation(kv(bad));
}

#[test]
fn read_must_see_one_of_concurrent_writes() {
    let ops = |seen: Option<&str>| {
        vec![
            Operation::put(1, "x", "a").ok_at(0, 50),
            Operation::put(2, "x", "b").ok_at(10, 60),
            Operation::get(3, "x", seen).ok_at(20, 30),
        ]
    };
    assert!(kv(ops(Some("a"))).is_ok());
    assert!(kv(ops(Some("b"))).is_ok());
    assert!(kv(ops(None)).is_ok());
    assert!(kv(ops(Some("c"))).is_violation());
}

#[test]
fn equal_timestamps_are_treated_as_concurrent() {
    // Return at 10 and invoke at 10: calls sort before returns, so the get may
    // be linearized before the put (documented permissive choice).
    assert!(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::get(2, "x", None).ok_at(10, 20),
    ])
    .is_ok());
    // One nanosecond later it is a real-time order.
    assert!(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::get(2, "x", None).ok_at(11, 20),
    ])
    .is_violation());
}

#[test]
fn info_mutations_may_or_may_not_happen() {
    let base = |first: Option<&str>, second: Option<&str>| {
        vec![
            Operation::put(1, "x", "a").info_at(0),
            Operation::get(2, "x", first).ok_at(100, 110),
            Operation::get(2, "x", second).ok_at(200, 210),
        ]
    };
    assert!(kv(base(None, None)).is_ok(), "never happened");
    assert!(kv(base(Some("a"), Some("a"))).is_ok(), "happened early");
    assert!(kv(base(None, Some("a"))).is_ok(), "happened late");
    // Once observed it cannot be undone.
    let v = violation(kv(base(Some("a"), None)));
    assert_eq!(v.failed_index, 2);
}

#[test]
fn info_get_is_ignored_and_fail_ops_never_happen() {
    assert!(kv(vec![
        Operation::get(1, "x", Some("junk")).info_at(0),
        Operation::get(2, "x", None).ok_at(5, 6),
    ])
    .is_ok());
    assert!(kv(vec![
        Operation::put(1, "x", "a").fail_at(0, 10),
        Operation::get(2, "x", None).ok_at(20, 30),
    ])
    .is_ok());
    violation(kv(vec![
        Operation::put(1, "x", "a").fail_at(0, 10),
        Operation::get(2, "x", Some("a")).ok_at(20, 30),
    ]));
}

#[test]
fn info_cas_applies_only_when_it_matches() {
    assert!(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::cas(2, "x", Some("a"), Some("b"), true).info_at(20),
        Operation::get(3, "x", Some("b")).ok_at(30, 40),
    ])
    .is_ok());
    violation(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::cas(2, "x", Some("zzz"), Some("b"), true).info_at(20),
        Operation::get(3, "x", Some("b")).ok_at(30, 40),
    ]));
}

#[test]
fn cas_outcomes_are_checked() {
    // A successful CAS whose expectation did not hold.
    violation(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::cas(2, "x", Some("b"), Some("c"), true).ok_at(20, 30),
    ]));
    // A mismatching CAS whose expectation did hold.
    violation(kv(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::cas(2, "x", Some("a"), Some("c"), false).ok_at(20, 30),
    ]));
    // Expected null = absent; new null = delete on match.
    assert!(kv(vec![
        Operation::cas(1, "x", None, Some("a"), true).ok_at(0, 10),
        Operation::cas(2, "x", None, Some("b"), false).ok_at(20, 30),
        Operation::cas(3, "x", Some("a"), None, true).ok_at(40, 50),
        Operation::get(3, "x", None).ok_at(60, 70),
    ])
    .is_ok());
    // Two concurrent CASes from the same expected value cannot both win.
    violation(kv(vec![
        Operation::put(1, "x", "0").ok_at(0, 5),
        Operation::cas(2, "x", Some("0"), Some("a"), true).ok_at(10, 20),
        Operation::cas(3, "x", Some("0"), Some("b"), true).ok_at(10, 20),
    ]));
}

#[test]
fn keys_are_independent_but_each_is_checked() {
    let r = kv(vec![
        Operation::put(1, "a", "1").ok_at(0, 10),
        Operation::put(1, "b", "1").ok_at(0, 10),
        Operation::get(2, "a", Some("1")).ok_at(20, 30),
        Operation::get(2, "b", None).ok_at(20, 30),
    ]);
    let v = violation(r);
    assert_eq!(v.key, "b");
    assert_eq!(v.failed_index, 3);
}

#[test]
fn register_model_ignores_keys() {
    let ops = vec![
        Operation::put(1, "a", "1").ok_at(0, 10),
        Operation::get(2, "b", Some("1")).ok_at(20, 30),
    ];
    assert!(check(&hist(ops.clone()), &RegisterModel, BUDGET).is_ok());
    assert!(check(&hist(ops), &KvModel, BUDGET).is_violation());
}

#[test]
fn sub_history_holds_ops_up_to_the_failing_completion() {
    let v = violation(kv(vec![
        Operation::put(1, "x", "1").ok_at(0, 10),
        Operation::put(2, "x", "2").ok_at(20, 30),
        Operation::get(3, "x", Some("1")).ok_at(35, 50),
        Operation::put(4, "x", "3").ok_at(45, 60),
        Operation::get(5, "x", Some("3")).ok_at(100, 110),
        Operation::get(1, "y", None).ok_at(0, 1),
    ]));
    assert_eq!(v.failed_index, 2);
    let invokes: Vec<u64> = v.sub_history.iter().map(|o| o.invoke).collect();
    assert_eq!(invokes, vec![0, 20, 35, 45]);
    assert!(v.to_string().contains("cannot linearize op #2"));
}

/// `n` fully concurrent puts followed by a read of a value none wrote: the
/// search must try every subset, which is exponential in `n`.
fn pathological(n: u64) -> Vec<Operation> {
    let mut ops: Vec<Operation> = (0..n)
        .map(|i| Operation::put(i, "x", format!("v{i}")).ok_at(0, 1000))
        .collect();
    ops.push(Operation::get(n, "x", Some("nope")).ok_at(2000, 2100));
    ops
}

#[test]
fn budget_exhaustion_is_unknown_not_ok() {
    let h = hist(pathological(30));
    let budget = Duration::from_millis(300);
    let start = Instant::now();
    let r = check(&h, &KvModel, budget);
    let took = start.elapsed();
    assert_eq!(
        r,
        CheckResult::Unknown {
            reason: UnknownReason::Timeout,
            undecided: vec!["x".into()]
        }
    );
    assert!(took < budget + Duration::from_secs(1), "took {took:?}");
}

#[test]
fn zero_budget_is_unknown() {
    let h = hist(vec![
        Operation::put(1, "x", "1").ok_at(0, 10),
        Operation::get(1, "x", Some("1")).ok_at(20, 30),
    ]);
    assert!(matches!(
        check(&h, &KvModel, Duration::ZERO),
        CheckResult::Unknown { .. }
    ));
}

#[test]
fn small_pathological_case_is_decided() {
    let v = violation(check(&hist(pathological(8)), &KvModel, BUDGET));
    assert_eq!(v.failed_index, 8);
    assert_eq!(v.linearized_prefix.len(), 8);
}

#[test]
fn memory_limit_is_unknown_not_ok() {
    let options = CheckOptions {
        budget: BUDGET,
        threads: 1,
        max_memo_bytes: 1 << 20,
    };
    let r = check_with(&hist(pathological(30)), &KvModel, &options);
    assert!(
        matches!(
            r,
            CheckResult::Unknown {
                reason: UnknownReason::MemoryLimit,
                ..
            }
        ),
        "{r}"
    );
}

#[test]
fn violation_wins_over_undecided_partitions() {
    let mut ops = pathological(30);
    ops.push(Operation::put(1, "y", "1").ok_at(0, 10));
    ops.push(Operation::get(2, "y", Some("2")).ok_at(20, 30));
    // One thread, so the small violating partition must not be starved by
    // the hopeless one.
    let options = CheckOptions {
        budget: Duration::from_millis(500),
        threads: 1,
        ..CheckOptions::default()
    };
    assert_eq!(
        violation(check_with(&hist(ops), &KvModel, &options)).key,
        "y"
    );
}

/// A model whose step panics, to check a crashing model is not reported Ok.
struct PanickyModel;

impl super::super::Model for PanickyModel {
    type State = u8;

    fn init(&self) -> u8 {
        0
    }

    fn step(&self, _: &u8, _: &Operation) -> Option<u8> {
        panic!("model bug")
    }
}

#[test]
fn panicking_model_is_unknown_not_ok() {
    let h = hist(vec![Operation::put(1, "x", "1").ok_at(0, 10)]);
    let options = CheckOptions {
        threads: 1,
        ..CheckOptions::default()
    };
    assert!(matches!(
        check_with(&h, &PanickyModel, &options),
        CheckResult::Unknown {
            reason: UnknownReason::Internal,
            ..
        }
    ));
}
