//! Seeded generators of KV histories shaped like what a real cluster records under faults: the
//! checker's tests, the measurements in issue #13 and the chaos harness use them to reproduce a
//! history's *shape* when the recorded file itself is gone.
//!
//! Compiled only for tests and with the `sim` feature (benches, integration tests), never into the
//! daemons.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{History, OpKind, Operation, Status};

/// Shape of a history recorded while the leader was paused and resumed (issue #13): the kind that
/// made the checker run out of memory.
#[derive(Debug, Clone, PartialEq)]
pub struct PauseConfig {
    /// Operations in total (`get`s included).
    pub ops: usize,
    /// Concurrent clients (each runs one operation at a time).
    pub clients: u64,
    /// Distinct keys.
    pub keys: usize,
    /// How many indeterminate (`info`) *mutations* to produce (`info` gets come on top and are
    /// dropped by the checker anyway). Pauses are added until this many were recorded.
    pub info_mutations: usize,
    /// Chance that a mutation whose answer was lost took effect anyway (it was in the paused
    /// leader's log and committed after the resume).
    pub info_applied: f64,
    /// The seed: one seed, one history.
    pub seed: u64,
}

impl PauseConfig {
    /// A 10-client, 5-key history of `ops` operations with `info_mutations` lost answers, half of
    /// which took effect.
    pub fn new(ops: usize, info_mutations: usize, seed: u64) -> Self {
        PauseConfig {
            ops,
            clients: 10,
            keys: 5,
            info_mutations,
            info_applied: 0.5,
            seed,
        }
    }
}

/// How long a client waits for an answer before it records `info` and moves on (time units are
/// abstract "microseconds"; ordinary operations take 2–600).
const CLIENT_TIMEOUT: u64 = 1_000;
/// How many lost mutations one pause produces before the leader resumes.
const INFO_PER_PAUSE: usize = 60;

/// Generates a history that is linearizable by construction, in the shape of issue #13: clients
/// run operations back to back against a correct register per key (each op gets a linearization
/// point inside its interval and outputs are computed in that order); at evenly spaced moments the
/// leader "pauses" — every operation invoked during a pause gets no answer: the client records it
/// as `info` after [`CLIENT_TIMEOUT`] and continues under a **new client id** (Jepsen's new
/// process), and each lost mutation takes effect with probability [`PauseConfig::info_applied`] at
/// a moment shortly *after* the resume (it was in the paused leader's log), or never. Values are
/// unique per operation (`c<client>.<index>;`), so appends are visible in later reads.
pub fn paused_history(cfg: &PauseConfig) -> History {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let clients = usize::try_from(cfg.clients).unwrap_or(1).max(1);
    let keys = cfg.keys.max(1);
    // Per client: its clock and its current process id.
    let mut clock: Vec<u64> = vec![0; clients];
    let mut process: Vec<u64> = (0..cfg.clients.max(1)).collect();
    let mut next_process = cfg.clients.max(1);
    let mut ops: Vec<Operation> = Vec::with_capacity(cfg.ops);
    // (linearization point, op index, whether it takes effect)
    let mut points: Vec<(u64, usize, bool)> = Vec::with_capacity(cfg.ops);
    let mut written: Vec<Vec<String>> = vec![Vec::new(); keys];

    let pauses = cfg.info_mutations.div_ceil(INFO_PER_PAUSE);
    let pause_starts: Vec<usize> = (1..=pauses).map(|k| k * cfg.ops / (pauses + 1)).collect();
    let mut next_pause = 0;
    // Some((start time, lost mutations so far)) while the leader is paused.
    let mut paused: Option<(u64, usize)> = None;
    let mut info_total = 0;

    for i in 0..cfg.ops {
        let c = (0..clients).min_by_key(|&c| clock[c]).unwrap_or(0);
        let invoke = clock[c] + rng.random_range(0..20);
        if paused.is_none() && pause_starts.get(next_pause) == Some(&i) {
            next_pause += 1;
            paused = Some((invoke, 0));
        }
        let mut op = random_op(&mut rng, process[c], c, i, &mut written);
        match paused {
            Some((start, lost)) if info_total < cfg.info_mutations => {
                // No answer: the client gives up and continues as a new process.
                clock[c] = invoke + CLIENT_TIMEOUT;
                process[c] = next_process;
                next_process += 1;
                let mutation = op.op != OpKind::Get;
                let applies = mutation && rng.random_bool(cfg.info_applied);
                let lost = lost + usize::from(mutation);
                info_total += usize::from(mutation);
                // The leader resumes once this pause lost its share; what it had logged commits
                // just after that.
                let resume = (lost >= INFO_PER_PAUSE || info_total >= cfg.info_mutations)
                    .then(|| invoke.max(start) + CLIENT_TIMEOUT);
                let lin = resume.unwrap_or(invoke + CLIENT_TIMEOUT) + rng.random_range(1..300);
                paused = if resume.is_some() {
                    None
                } else {
                    Some((start, lost))
                };
                points.push((lin, i, applies));
                ops.push(op.info_at(invoke));
            }
            _ => {
                paused = None;
                let lin = invoke + rng.random_range(1..300);
                let complete = lin + rng.random_range(1..300);
                clock[c] = complete;
                op = op.ok_at(invoke, complete);
                points.push((lin, i, true));
                ops.push(op);
            }
        }
    }

    points.sort_unstable();
    let mut store: HashMap<String, String> = HashMap::new();
    for (_, i, applies) in points {
        let Some(op) = ops.get_mut(i) else { continue };
        if !applies {
            continue;
        }
        let current = store.get(&op.key).cloned();
        let info = op.status == Status::Info;
        match op.op {
            OpKind::Get => {
                if !info {
                    op.output = current;
                }
            }
            OpKind::Put => {
                store.insert(op.key.clone(), op.value.clone().unwrap_or_default());
            }
            OpKind::Append => {
                let mut s = current.unwrap_or_default();
                s.push_str(op.value.as_deref().unwrap_or(""));
                store.insert(op.key.clone(), s);
            }
            OpKind::Delete => {
                store.remove(&op.key);
            }
            OpKind::Cas => {
                let swapped = current == op.expected;
                if !info {
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
    // Every op was built valid (outputs only filled in); an empty history is the fallback that
    // can never be reached.
    History::new(ops).unwrap_or_default()
}

/// A random KV operation of `client` (the `i`-th of client index `c`, whose values are unique): 40%
/// get, 20% put, 20% append, 5% delete, 15% cas expecting one of the key's last few written values
/// (or absence). `written` holds those values per key and is updated.
pub(crate) fn random_op(
    rng: &mut ChaCha8Rng,
    client: u64,
    c: usize,
    i: usize,
    written: &mut [Vec<String>],
) -> Operation {
    let k = rng.random_range(0..written.len());
    let key = format!("k{k}");
    let value = format!("c{c}.{i};");
    let op = match rng.random_range(0..100) {
        0..40 => Operation::get(client, key, None),
        40..60 => Operation::put(client, key, value.clone()),
        60..80 => Operation::append(client, key, value.clone()),
        80..85 => Operation::delete(client, key),
        _ => {
            let recent = &written[k];
            let expected = if recent.is_empty() || rng.random_bool(0.2) {
                None
            } else {
                recent.get(rng.random_range(0..recent.len())).cloned()
            };
            Operation::cas(client, key, expected.as_deref(), Some(&value), false)
        }
    };
    if matches!(op.op, OpKind::Put | OpKind::Cas) {
        written[k].push(value);
        if written[k].len() > 4 {
            written[k].remove(0);
        }
    }
    op
}
