//! Deterministic simulated linearizable KV store producing large concurrent
//! histories, plus the performance test built on it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{check, CheckResult, History, KvModel, OpKind, Operation, Status};

/// Shape of a simulated history.
pub(super) struct SimConfig {
    pub clients: u64,
    pub ops: usize,
    pub keys: usize,
    pub seed: u64,
    /// Probability that a mutation ends indeterminate (effect applied or not).
    pub info_prob: f64,
    /// Probability that a mutation is reported as failed (effect not applied).
    pub fail_prob: f64,
}

/// Generates a history that is linearizable by construction: every op gets a
/// linearization point strictly inside its interval, ops are applied to a
/// sequential KV in that order, and outputs are whatever that produced.
/// Clients issue ops back to back with random latencies, so intervals of
/// different clients overlap heavily.
pub(super) fn simulate(cfg: &SimConfig) -> History {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut clock: Vec<u64> = vec![0; usize::try_from(cfg.clients).unwrap_or(1).max(1)];
    let mut ops: Vec<Operation> = Vec::with_capacity(cfg.ops);
    let mut lin_points: Vec<(u64, usize)> = Vec::with_capacity(cfg.ops);
    // Whether a non-ok op's effect is applied at its linearization point.
    let mut applies: Vec<bool> = Vec::with_capacity(cfg.ops);
    let mut written: Vec<Vec<String>> = vec![Vec::new(); cfg.keys];

    for i in 0..cfg.ops {
        // The client that is furthest behind goes next, keeping them in step.
        let (c, _) = clock
            .iter()
            .enumerate()
            .min_by_key(|&(_, t)| *t)
            .unwrap_or((0, &0));
        let invoke = clock[c] + rng.random_range(0..20);
        let lin = invoke + rng.random_range(1..300);
        let complete = lin + rng.random_range(1..300);
        clock[c] = complete;

        let mut op = super::super::gen::random_op(&mut rng, c as u64, c, i, &mut written);
        op = op.ok_at(invoke, complete);
        let mut apply = true;
        if op.op != OpKind::Get {
            if rng.random_bool(cfg.info_prob) {
                op = op.info_at(invoke);
                apply = rng.random_bool(0.5);
            } else if rng.random_bool(cfg.fail_prob) {
                op = op.fail_at(invoke, complete);
                apply = false;
            }
        }
        lin_points.push((lin, i));
        applies.push(apply);
        ops.push(op);
    }

    lin_points.sort_unstable();
    let mut store: HashMap<String, String> = HashMap::new();
    for (_, i) in lin_points {
        if !applies[i] {
            continue;
        }
        let op = &mut ops[i];
        let cur = store.get(&op.key).cloned();
        match op.op {
            OpKind::Get => op.output = cur,
            OpKind::Put => {
                store.insert(op.key.clone(), op.value.clone().unwrap_or_default());
            }
            OpKind::Append => {
                let mut s = cur.unwrap_or_default();
                s.push_str(op.value.as_deref().unwrap_or(""));
                store.insert(op.key.clone(), s);
            }
            OpKind::Delete => {
                store.remove(&op.key);
            }
            OpKind::Cas => {
                let swapped = cur == op.expected;
                if op.status == Status::Ok {
                    op.cas_ok = Some(swapped);
                }
                if swapped {
                    match op.value.clone() {
                        Some(v) => store.insert(op.key.clone(), v),
                        None => store.remove(&op.key),
                    };
                }
            }
        }
    }
    History::new(ops).expect("simulated ops are valid")
}

fn big_history() -> History {
    simulate(&SimConfig {
        clients: 10,
        ops: 10_000,
        keys: 10,
        seed: 0x6824,
        info_prob: 0.01,
        fail_prob: 0.02,
    })
}

#[test]
fn ten_thousand_ops_ten_clients_is_ok_and_fast() {
    let h = big_history();
    assert_eq!(h.len(), 10_000);
    let start = Instant::now();
    let result = check(&h, &KvModel, Duration::from_secs(60));
    let elapsed = start.elapsed();
    println!("checked 10,000 ops / 10 clients / 10 keys in {elapsed:?}");
    assert_eq!(result, CheckResult::Ok, "{result}");
    assert!(
        elapsed < Duration::from_secs(10),
        "too slow: {elapsed:?} (the target is well under 10 s in release)"
    );
}

#[test]
fn single_hot_key_history_is_ok() {
    let h = simulate(&SimConfig {
        clients: 10,
        ops: 3_000,
        keys: 1,
        seed: 99,
        info_prob: 0.05,
        fail_prob: 0.02,
    });
    let start = Instant::now();
    let result = check(&h, &KvModel, Duration::from_secs(60));
    println!("checked 3,000 ops on one key in {:?}", start.elapsed());
    assert_eq!(result, CheckResult::Ok, "{result}");
}

#[test]
fn many_seeds_small_histories_are_ok() {
    for seed in 0..40 {
        let h = simulate(&SimConfig {
            clients: 4,
            ops: 200,
            keys: 2,
            seed,
            info_prob: 0.1,
            fail_prob: 0.1,
        });
        let r = check(&h, &KvModel, Duration::from_secs(30));
        assert_eq!(r, CheckResult::Ok, "seed {seed}: {r}");
    }
}

#[test]
fn corrupted_read_in_big_history_is_found() {
    let mut ops = big_history().into_ops();
    let target = ops
        .iter()
        .rposition(|o| o.op == OpKind::Get && o.status == Status::Ok && o.invoke > 1_000)
        .expect("history has reads");
    ops[target].output = Some("never written".into());
    let key = ops[target].key.clone();
    let h = History::new(ops).expect("still valid");
    match check(&h, &KvModel, Duration::from_secs(60)) {
        CheckResult::Violation(v) => {
            assert_eq!(v.key, key);
            assert_eq!(v.failed_index, target, "{v}");
        }
        other => panic!("expected violation, got {other}"),
    }
}

#[test]
fn duplicated_effect_in_big_history_is_found() {
    // Make a read observe an append twice: the second copy never happened.
    let mut ops = big_history().into_ops();
    let target = ops
        .iter()
        .position(|o| {
            o.op == OpKind::Get
                && o.status == Status::Ok
                && o.output.as_deref().is_some_and(|s| s.ends_with(';'))
                && o.invoke > 1_000
        })
        .expect("history has non-empty reads");
    let out = ops[target].output.clone().unwrap_or_default();
    let last = out
        .trim_end_matches(';')
        .rsplit(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    ops[target].output = Some(format!("{out}{last};"));
    let h = History::new(ops).expect("still valid");
    assert!(check(&h, &KvModel, Duration::from_secs(60)).is_violation());
}
