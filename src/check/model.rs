//! Sequential specifications the checker tests histories against.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

use super::op::{OpKind, Operation, Status};

/// An independent slice of a history that is checked on its own
/// (P-compositionality: a history is linearizable iff each partition is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Label reported with a violation (the key, for the KV model).
    pub key: String,
    /// Indices into the slice given to [`Model::partition`], in ascending order.
    pub indices: Vec<usize>,
}

/// A sequential specification: an initial state and a transition relation.
///
/// A trait so new data types (queues, locks, multi-key transactions) can be
/// checked with the same search. `State` must be `Hash + Eq` because the search
/// memoizes `(linearized set, state)` pairs; keep it small, it is cloned on
/// every successful step.
pub trait Model: Sync {
    /// The abstract state of one partition.
    type State: Clone + Eq + Hash + Debug + Send;

    /// State before any operation.
    fn init(&self) -> Self::State;

    /// Applies `op` to `state`: `Some(next)` if `op`, with its recorded output,
    /// is a legal transition from `state`, `None` otherwise.
    ///
    /// For an op with [`Status::Info`] the output is unknown and must not be
    /// checked; return the state the op produces *if it takes effect*. (The
    /// checker itself covers the "never took effect" case.)
    fn step(&self, state: &Self::State, op: &Operation) -> Option<Self::State>;

    /// Splits a history into independently checkable partitions; the default
    /// groups operations by key, which is sound whenever ops touch one key
    /// and keys do not interact (true for the KV model).
    fn partition(&self, ops: &[Operation]) -> Vec<Partition> {
        partition_by_key(ops)
    }
}

/// Groups op indices by key, partitions in order of each key's first
/// appearance (deterministic, so reports are stable run to run).
pub fn partition_by_key(ops: &[Operation]) -> Vec<Partition> {
    let mut slot: HashMap<&str, usize> = HashMap::new();
    let mut parts: Vec<Partition> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let idx = *slot.entry(op.key.as_str()).or_insert_with(|| {
            parts.push(Partition {
                key: op.key.clone(),
                indices: Vec::new(),
            });
            parts.len() - 1
        });
        if let Some(p) = parts.get_mut(idx) {
            p.indices.push(i);
        }
    }
    parts
}

/// Transition function shared by the KV and register models: a single value
/// (`None` = absent) with get/put/append/delete/cas.
fn register_step(state: &Option<String>, op: &Operation) -> Option<Option<String>> {
    let info = op.status == Status::Info;
    match op.op {
        OpKind::Get => (info || op.output == *state).then(|| state.clone()),
        OpKind::Put => Some(op.value.clone()),
        OpKind::Append => {
            let mut s = state.clone().unwrap_or_default();
            s.push_str(op.value.as_deref().unwrap_or(""));
            Some(Some(s))
        }
        OpKind::Delete => Some(None),
        OpKind::Cas => {
            let matches = *state == op.expected;
            match op.cas_outcome() {
                // Outcome unknown (info): it does whatever the state dictates.
                None => Some(if matches {
                    op.value.clone()
                } else {
                    state.clone()
                }),
                Some(true) => matches.then(|| op.value.clone()),
                Some(false) => (!matches).then(|| state.clone()),
            }
        }
    }
}

/// The key-value store model: each key is an independent register holding
/// `Option<String>` (initially absent).
///
/// * get: legal iff `output` equals the current value (`null` = absent);
/// * put: sets the value; append: concatenates (append to absent = value);
/// * delete: makes the key absent;
/// * cas(expected, new): outcome `ok: true` is legal iff value == expected and
///   sets it to `new` (`null` new = delete); `ok: false` is legal iff
///   value != expected and changes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvModel;

impl Model for KvModel {
    type State = Option<String>;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, state: &Self::State, op: &Operation) -> Option<Self::State> {
        register_step(state, op)
    }
}

/// A single CAS register (read = get, write = put, cas): the KV model with the
/// key ignored, so the whole history is one partition.
///
/// Useful for services that expose one cell (a lock, a config epoch) whose
/// recorded ops carry arbitrary or empty keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegisterModel;

impl Model for RegisterModel {
    type State = Option<String>;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, state: &Self::State, op: &Operation) -> Option<Self::State> {
        register_step(state, op)
    }

    fn partition(&self, ops: &[Operation]) -> Vec<Partition> {
        if ops.is_empty() {
            return Vec::new();
        }
        vec![Partition {
            key: String::from("register"),
            indices: (0..ops.len()).collect(),
        }]
    }
}
