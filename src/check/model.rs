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

    /// Heap bytes `state` owns beyond `size_of::<State>()`, so the checker's
    /// memory budget counts interned states fully (default: none).
    fn state_heap_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        0
    }

    /// An optional, *sound* pruning rule for indeterminate ops, built once
    /// per partition from its checked `ops`: the returned predicate is asked
    /// about the state an `info` op would leave behind, and `false` means
    /// "linearizing this op here can never be necessary", so the search does
    /// not try it (it may still be tried elsewhere, or stay pending = never
    /// happened).
    ///
    /// Why: a paused leader leaves hundreds of `info` writes, each
    /// linearizable anywhere after its invocation; without a model-specific
    /// rule the search tries each of them at every dead end. Return `false`
    /// only with a proof that any completion using the op at that point has a
    /// completion without it (see [`KvModel`]'s); the default prunes nothing.
    #[allow(clippy::type_complexity)]
    fn info_relevance<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(&Self::State) -> bool + 'a>> {
        let _ = ops;
        None
    }

    /// An optional state abstraction, built once per partition from its
    /// checked `ops`: maps a state to the representative of its class, where
    /// two states are in one class only if **every** sequence of these ops
    /// is legal from one exactly when it is legal from the other, ending in
    /// states of one class again (a bisimulation). The search memoizes
    /// representatives, so equivalent configurations are explored once.
    ///
    /// Why: histories with many writes nobody reads (lost with a paused
    /// leader) otherwise produce a distinct state for every order those
    /// writes can land in. The default abstracts nothing.
    #[allow(clippy::type_complexity)]
    fn canonicalizer<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(Self::State) -> Self::State + 'a>> {
        let _ = ops;
        None
    }

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

/// The relevance rule of the register/KV models: the states an `info` write
/// may usefully produce.
///
/// **Rule.** In a partition with no `ok` cas that failed (`ok: false`), an
/// `info` op whose resulting state is `Some(x)` need not be linearized at that
/// point unless some *observation* — the output of an `ok` get, or the
/// `expected` value of a cas (`ok` or `info`) — is `Some(y)` with `y`
/// starting with `x`.
///
/// **Proof.** Take a completion (a legal sequence of the remaining ops,
/// respecting real time) that starts by applying such an op `p`, leaving
/// `Some(x)`. Follow it up to the next op that overwrites the value
/// unconditionally (a put or delete, `ok` or `info`), or to its end. Every
/// state in between starts with `x`: appends only extend it, and nothing
/// else can change it — an `ok` cas-true, an `ok` get or a matching `info`
/// cas would each need the state to equal an observation, and no observation
/// starts with `x`. So the ops in between are appends (legal in any state),
/// `info` cas that did nothing, and no `ok` get, cas-true or (by the
/// partition's condition) cas-false. Remove `p` and those do-nothing `info`
/// cas: the appends stay legal, the overwrite resets the state, and every
/// later state is unchanged. Real-time order holds (a subsequence of a legal
/// order, minus ops that never return). That is a completion without `p`.
/// A failed cas would break the argument — it observes "the value is not
/// `e`", which removing `p` can falsify — hence the partition's condition.
/// `None` (absent) states are never pruned: appends turn `None` into any
/// value.
///
/// Applied to puts, this drops every `info` put whose value no read or cas
/// ever sees (issue #13's item 2); applied to appends, it stops the search
/// from building append orders no read observed.
#[allow(clippy::type_complexity)]
fn register_relevance<'a>(
    ops: &[&'a Operation],
) -> Option<Box<dyn Fn(&Option<String>) -> bool + 'a>> {
    if ops
        .iter()
        .any(|op| op.status == Status::Ok && op.cas_outcome() == Some(false))
    {
        return None;
    }
    let observed = Observed::new(ops);
    Some(Box::new(move |state: &Option<String>| match state {
        None => true,
        Some(x) => observed.sees_prefix(x),
    }))
}

/// The values a partition's ops can observe: outputs of `ok` gets and the
/// `expected` values of every cas, sorted so "does any start with `x`" is a
/// binary search.
struct Observed<'a> {
    values: Vec<&'a str>,
}

impl<'a> Observed<'a> {
    fn new(ops: &[&'a Operation]) -> Self {
        let mut values: Vec<&'a str> = Vec::new();
        for op in ops {
            match (op.op, op.status) {
                (OpKind::Get, Status::Ok) => values.extend(op.output.as_deref()),
                (OpKind::Cas, Status::Ok | Status::Info) => values.extend(op.expected.as_deref()),
                _ => {}
            }
        }
        values.sort_unstable();
        values.dedup();
        Observed { values }
    }

    /// Whether some observed value starts with `x`.
    fn sees_prefix(&self, x: &str) -> bool {
        // Strings starting with `x` sort right at or after `x`.
        let at = self.values.partition_point(|y| *y < x);
        self.values.get(at).is_some_and(|y| y.starts_with(x))
    }
}

/// The state abstraction of the register/KV models: every *blind* value is
/// replaced by one representative.
///
/// A value `Some(x)` is blind when no observed value (an `ok` get's output,
/// any cas's `expected`) starts with `x`. **All blind values behave alike**
/// towards this partition's ops, so the search may treat them as one state
/// (a bisimulation, hence sound for both "ok" and "violation"):
/// * an `ok` get needs the value to equal its output, an observed value or
///   absent — never a blind value (a blind `x` is not even equal to an
///   observed value, since that would start with `x`);
/// * an `ok` cas that swapped needs the value to equal `expected`: never;
/// * an `ok` cas that did not swap needs it to differ from `expected`:
///   always, leaving it unchanged (blind);
/// * an `info` cas never matches, so it leaves the value (blind);
/// * put and delete set a value regardless of the old one;
/// * an append keeps a blind value blind: if some observed value started
///   with `x + u`, it would start with `x`.
///
/// Why it matters: a lost write whose value nobody read (issue #13's paused
/// leader) or any append after it otherwise creates a new state — and a new
/// branch of the search — for every order in which such writes can land.
#[allow(clippy::type_complexity)]
fn register_canonical<'a>(
    ops: &[&'a Operation],
) -> Option<Box<dyn Fn(Option<String>) -> Option<String> + 'a>> {
    let observed = Observed::new(ops);
    // A representative that is itself blind (so it stays in its class).
    let mut blind = String::from("\u{1}unobserved");
    while observed.sees_prefix(&blind) {
        blind.push('#');
    }
    Some(Box::new(move |state: Option<String>| match state {
        Some(x) if !observed.sees_prefix(&x) => Some(blind.clone()),
        other => other,
    }))
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

    fn state_heap_bytes(&self, state: &Self::State) -> usize {
        state.as_ref().map_or(0, String::capacity)
    }

    /// See [`register_relevance`] for the rule and its proof.
    fn info_relevance<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(&Self::State) -> bool + 'a>> {
        register_relevance(ops)
    }

    /// See [`register_canonical`] for the abstraction and why it is sound.
    fn canonicalizer<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(Self::State) -> Self::State + 'a>> {
        register_canonical(ops)
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

    fn state_heap_bytes(&self, state: &Self::State) -> usize {
        state.as_ref().map_or(0, String::capacity)
    }

    /// See [`register_relevance`] for the rule and its proof.
    fn info_relevance<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(&Self::State) -> bool + 'a>> {
        register_relevance(ops)
    }

    /// See [`register_canonical`] for the abstraction and why it is sound.
    fn canonicalizer<'a>(
        &'a self,
        ops: &[&'a Operation],
    ) -> Option<Box<dyn Fn(Self::State) -> Self::State + 'a>> {
        register_canonical(ops)
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
