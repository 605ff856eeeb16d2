//! Workloads: what the clients do, and how each answer becomes a history record.
//!
//! Clients are in-process clerks (one session each; [`Clerk`]s of the replicated store or
//! [`ShardClerk`]s of the sharded one, `--store`), not a process per operation, so a run reaches
//! thousands of operations per second. Each client paces itself at `rate / clients` per second and
//! records every operation it completes:
//! * `ok`: the cluster answered (a get's value, a cas's outcome);
//! * `fail`: it definitely did not take effect — refused before or by the service for a reason no retry
//!   changes ([`ClerkError::Invalid`], [`ClerkError::Rejected`], ...);
//! * `info`: unknown — the clerk's deadline passed ([`ClerkError::Timeout`]), its session expired
//!   mid-retry ([`ClerkError::SessionExpired`]), or it failed for good after an attempt that may
//!   have applied it ([`ClerkError::InDoubt`]). A mutation may still be applied later, so, like a
//!   Jepsen process that crashed, the client then continues as a new process (a new clerk, a new
//!   session, a new `client` number in the history: `index + k * clients`).
//!
//! Keys are used for `--ops-per-key` operations each (`--keys` of them at a time) and then retired:
//! per-key histories stay short, which keeps the checker's search small even with many `info`
//! operations (an `info` mutation stays concurrent with everything after it).
//!
//! * [`WorkloadKind::Register`]: get (50%), put (25%), cas (25%) of values 0-4 on keys `rN`.
//! * [`WorkloadKind::Append`]: get (35%) and append (65%) of tokens unique in the run (`C.N;`) on keys
//!   `aN`; [`final_reads`] reads every key afterwards for the append invariant ([`super::verdict`]).
//! * [`WorkloadKind::Bank`]: ledgers of [`super::bank`] on keys `bN`: get (40%) and transfer (60%: a get,
//!   then a cas from the ledger read to one with an amount moved, or from absent to the opening ledger
//!   if nobody opened it yet — two operations in one step); [`final_reads`] reads every ledger
//!   afterwards for the bank invariant.

use super::bank;
use super::history::{Clock, RecordError, Recorder};
use crate::check::{OpKind, Operation};
use crate::kv::{CasOutcome, Clerk, ClerkConfig, ClerkError, KvOps};
use crate::kvctl::shard::AnyClerk;
use crate::shardkv::ShardClerk;
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// The `client` number of the final reads in the history.
pub const FINAL_READER: u64 = 1 << 40;

/// Why a client stopped before it was told to.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// A clerk could not be made (a bad address; a bug in the target).
    #[error("client: {0}")]
    Clerk(#[from] ClerkError),
    /// The history could not be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A final reader's task panicked.
    #[error("final reader failed: {0}")]
    Task(String),
}

/// A workload, as `--workload` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// get/put/cas on small values.
    Register,
    /// Unique appends and reads, then a final read of every key.
    Append,
    /// Transfers between the accounts of a few ledgers by cas, and reads; the total never changes.
    Bank,
}

/// The keys in use: every operation takes a key of the current generation; a generation ends after
/// `keys * ops_per_key` operations. Keys are named under the run's own namespace
/// (`chaos-1234.1796355664/r41`): a cluster that outlives a run (the compose target) still holds
/// the keys earlier runs wrote, and a run that reused their names would read values it never
/// wrote and call a correct store non-linearizable.
#[derive(Debug)]
pub struct KeySpace {
    started: AtomicU64,
    keys: u64,
    ops_per_key: u64,
    prefix: String,
}

impl KeySpace {
    /// Keys for `kind` under `namespace` (unique to the run), `keys` at a time, `ops_per_key`
    /// operations each.
    pub fn new(kind: WorkloadKind, namespace: &str, keys: u64, ops_per_key: u64) -> KeySpace {
        let letter = match kind {
            WorkloadKind::Register => "r",
            WorkloadKind::Append => "a",
            WorkloadKind::Bank => "b",
        };
        KeySpace {
            started: AtomicU64::new(0),
            keys: keys.max(1),
            ops_per_key: ops_per_key.max(1),
            prefix: format!("{namespace}/{letter}"),
        }
    }

    /// The key for the next operation.
    pub fn pick(&self, rng: &mut impl Rng) -> String {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let generation = n / (self.keys * self.ops_per_key);
        let key = generation * self.keys + rng.random_range(0..self.keys);
        format!("{}{key}", self.prefix)
    }
}

/// An operation about to be issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The request kind.
    pub op: OpKind,
    /// The key.
    pub key: String,
    /// Put/append value, or a cas's new value.
    pub value: Option<String>,
    /// A cas's expected value.
    pub expected: Option<String>,
}

impl Invocation {
    /// A read of `key`.
    pub fn get(key: impl Into<String>) -> Invocation {
        Invocation {
            op: OpKind::Get,
            key: key.into(),
            value: None,
            expected: None,
        }
    }
}

/// What a client does in one step (one tick of its pace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// One operation.
    Op(Invocation),
    /// A bank transfer on ledger `key`: read it, then swap in the ledger [`transfer_cas`] makes of
    /// what was read. Two operations, because the second depends on the first's answer.
    Transfer {
        /// The ledger.
        key: String,
    },
}

/// The next step of `kind` for client `client`'s `n`-th step.
pub fn generate(
    kind: WorkloadKind,
    keys: &KeySpace,
    rng: &mut impl Rng,
    client: usize,
    n: u64,
) -> Step {
    let key = keys.pick(rng);
    let roll = rng.random_range(0..100u32);
    let small = |rng: &mut dyn rand::RngCore| Some(rng.random_range(0..5u32).to_string());
    let (op, value, expected) = match kind {
        WorkloadKind::Register if roll < 50 => (OpKind::Get, None, None),
        WorkloadKind::Register if roll < 75 => (OpKind::Put, small(rng), None),
        WorkloadKind::Register => {
            let expected = small(rng);
            (OpKind::Cas, small(rng), expected)
        }
        WorkloadKind::Append if roll < 35 => (OpKind::Get, None, None),
        WorkloadKind::Append => (OpKind::Append, Some(format!("{client}.{n};")), None),
        WorkloadKind::Bank if roll < 40 => (OpKind::Get, None, None),
        WorkloadKind::Bank => return Step::Transfer { key },
    };
    Step::Op(Invocation {
        op,
        key,
        value,
        expected,
    })
}

/// The second half of a transfer on ledger `key` that read `read` (`None`: absent): open the ledger
/// (cas from absent to [`bank::opening`]) or move money ([`bank::transfer`], cas from what was read).
/// `None` when what was read is not a sound ledger: a transfer from it would only spread the damage,
/// and the read is already in the history for the invariant to report.
pub fn transfer_cas(key: &str, read: Option<&str>, rng: &mut impl Rng) -> Option<Invocation> {
    let next = match read {
        None => bank::opening(),
        Some(text) => {
            bank::audit(text).ok()?;
            bank::encode(&bank::transfer(&bank::parse(text).ok()?, rng)?)
        }
    };
    Some(Invocation {
        op: OpKind::Cas,
        key: key.to_string(),
        value: Some(next),
        expected: read.map(str::to_string),
    })
}

/// What came of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: a get's value, a cas's outcome.
    Ok {
        /// A get's value (`None`: absent).
        output: Option<String>,
        /// A cas's outcome.
        cas_ok: Option<bool>,
    },
    /// Definitely not applied, and why.
    Fail(String),
    /// Unknown, and why.
    Info(String),
}

/// How a clerk's error maps to the history: unknown only when the outcome is.
pub fn classify(error: &ClerkError) -> Outcome {
    match error {
        ClerkError::Timeout { .. }
        | ClerkError::SessionExpired
        | ClerkError::InDoubt(_)
        | ClerkError::Unreachable { .. } => Outcome::Info(error.to_string()),
        ClerkError::Invalid(_)
        | ClerkError::Address { .. }
        | ClerkError::NoServers
        | ClerkError::Rejected(_)
        | ClerkError::Denied(_)
        | ClerkError::Tls(_) => Outcome::Fail(error.to_string()),
    }
}

/// The store the clients use, as `--store` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The replicated KV store (`kvd kv`): clerks talk to the nodes.
    Replicated,
    /// The sharded KV store: clerks ask the controllers which group serves a key, then that group.
    Sharded,
}

/// Where the clients find the store.
#[derive(Clone, Debug)]
pub enum Store {
    /// A replicated KV cluster at these client addresses.
    Replicated(Vec<String>),
    /// A sharded cluster whose controllers are at these addresses.
    Sharded(Vec<String>),
}

impl Store {
    /// A new clerk (a new session) for this store.
    pub fn clerk(&self, config: &ClerkConfig) -> Result<AnyClerk, ClerkError> {
        Ok(match self {
            Store::Replicated(addresses) => {
                AnyClerk::Kv(Box::new(Clerk::new(addresses, config.clone())?))
            }
            Store::Sharded(ctrlers) => {
                AnyClerk::Sharded(Box::new(ShardClerk::new(ctrlers, config.clone())?))
            }
        })
    }
}

/// Issue `invocation` through `clerk`.
pub async fn execute(clerk: &mut AnyClerk, invocation: &Invocation) -> Outcome {
    let key = invocation.key.as_str();
    let value = invocation.value.as_deref().unwrap_or("");
    let done = |output: Option<String>, cas_ok: Option<bool>| Outcome::Ok { output, cas_ok };
    let result = match invocation.op {
        OpKind::Get => clerk.get(key).await.map(|v| done(v, None)),
        OpKind::Put => clerk.put(key, value).await.map(|()| done(None, None)),
        OpKind::Append => clerk.append(key, value).await.map(|()| done(None, None)),
        OpKind::Delete => clerk.delete(key).await.map(|_| done(None, None)),
        OpKind::Cas => clerk
            .cas(key, invocation.expected.as_deref(), value)
            .await
            .map(|outcome| done(None, Some(outcome == CasOutcome::Swapped))),
    };
    result.unwrap_or_else(|e| classify(&e))
}

/// The history record of `invocation` by `process`, invoked at `invoke` and answered at `complete`.
pub fn record(
    process: u64,
    invocation: &Invocation,
    invoke: u64,
    complete: u64,
    outcome: &Outcome,
) -> Operation {
    let mut op = Operation {
        client: process,
        op: invocation.op,
        key: invocation.key.clone(),
        value: invocation.value.clone(),
        expected: invocation.expected.clone(),
        cas_ok: None,
        output: None,
        invoke,
        complete: Some(complete),
        status: crate::check::Status::Ok,
    };
    match outcome {
        Outcome::Ok { output, cas_ok } => {
            op.output = output.clone();
            op.cas_ok = *cas_ok;
            op
        }
        Outcome::Fail(_) => op.fail_at(invoke, complete),
        Outcome::Info(_) => Operation {
            // Kept for the timeline; the checker treats an info op as never completing.
            complete: Some(complete),
            ..op.info_at(invoke)
        },
    }
}

/// What every client shares.
pub struct Clients {
    /// The workload.
    pub kind: WorkloadKind,
    /// Where the store is.
    pub store: Store,
    /// How clerks connect and how long they try.
    pub config: ClerkConfig,
    /// The run's clock.
    pub clock: Clock,
    /// Where operations go.
    pub recorder: Recorder,
    /// The keys.
    pub keys: KeySpace,
    /// Number of clients (process numbering: `index + k * clients`).
    pub clients: usize,
    /// Time between two operations of one client.
    pub interval: Duration,
    /// The run's seed (each client derives its own stream).
    pub seed: u64,
}

/// Client `index`'s loop: issue, record, repeat, until `stop` turns true.
pub async fn client(
    index: usize,
    shared: Arc<Clients>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WorkloadError> {
    let mut rng = ChaCha8Rng::seed_from_u64(shared.seed.wrapping_add(1 + index as u64));
    let mut process = index as u64;
    let mut clerk = shared.store.clerk(&shared.config)?;
    // Clients start spread over one interval, not in lockstep.
    let phase = shared.interval.mul_f64(rng.random_range(0.0..1.0));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, shared.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            break;
        }
        n += 1;
        match generate(shared.kind, &shared.keys, &mut rng, index, n) {
            Step::Op(invocation) => {
                issue(&shared, &mut clerk, &mut process, &invocation).await?;
            }
            Step::Transfer { key } => {
                let read = issue(&shared, &mut clerk, &mut process, &Invocation::get(&key)).await?;
                if let Outcome::Ok { output, .. } = read {
                    if let Some(cas) = transfer_cas(&key, output.as_deref(), &mut rng) {
                        issue(&shared, &mut clerk, &mut process, &cas).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Issue `invocation` as process `process` and record it; after an indeterminate outcome the client
/// goes on as a new process with a new clerk (a new session), as Jepsen's crashed processes do.
async fn issue(
    shared: &Clients,
    clerk: &mut AnyClerk,
    process: &mut u64,
    invocation: &Invocation,
) -> Result<Outcome, WorkloadError> {
    let invoke = shared.clock.now();
    let outcome = execute(clerk, invocation).await;
    let complete = shared.clock.now();
    shared
        .recorder
        .op(record(*process, invocation, invoke, complete, &outcome))?;
    if matches!(outcome, Outcome::Info(_)) {
        *process += shared.clients as u64;
        *clerk = shared.store.clerk(&shared.config)?;
    }
    Ok(outcome)
}

/// Read every key in `keys` once (retrying each until `within` has passed), record the reads, and
/// return the values read; a key that could not be read is missing from the answer. The keys are
/// split among `clients` readers, each with its own clerk (one request in flight per session).
pub async fn final_reads(
    shared: Arc<Clients>,
    keys: &BTreeSet<String>,
    within: Duration,
) -> Result<BTreeMap<String, Option<String>>, WorkloadError> {
    let deadline = tokio::time::Instant::now() + within;
    let readers = shared.clients.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for reader in 0..readers {
        let mine: Vec<String> = keys.iter().skip(reader).step_by(readers).cloned().collect();
        let shared = shared.clone();
        tasks.spawn(async move { read_keys(&shared, mine, deadline).await });
    }
    let mut values = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let read = joined.map_err(|e| WorkloadError::Task(e.to_string()))??;
        values.extend(read);
    }
    Ok(values)
}

async fn read_keys(
    shared: &Clients,
    keys: Vec<String>,
    deadline: tokio::time::Instant,
) -> Result<Vec<(String, Option<String>)>, WorkloadError> {
    let mut clerk = shared.store.clerk(&shared.config)?;
    let mut values = Vec::new();
    for key in keys {
        let invocation = Invocation::get(&key);
        while tokio::time::Instant::now() < deadline {
            let invoke = shared.clock.now();
            let outcome = execute(&mut clerk, &invocation).await;
            if let Outcome::Ok { output, .. } = &outcome {
                let complete = shared.clock.now();
                let op = record(FINAL_READER, &invocation, invoke, complete, &outcome);
                shared.recorder.op(op)?;
                values.push((key, output.clone()));
                break;
            }
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_retire_after_their_share_of_operations() {
        let keys = KeySpace::new(WorkloadKind::Register, "chaos-1.2", 2, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let picked: Vec<String> = (0..12).map(|_| keys.pick(&mut rng)).collect();
        let ours = |n: &[&str], k: &String| n.iter().any(|n| *k == format!("chaos-1.2/r{n}"));
        assert!(
            picked[..6].iter().all(|k| ours(&["0", "1"], k)),
            "{picked:?}"
        );
        assert!(
            picked[6..].iter().all(|k| ours(&["2", "3"], k)),
            "{picked:?}"
        );
    }

    #[test]
    fn only_an_unknown_outcome_is_info() {
        let timeout = ClerkError::Timeout {
            timeout: Duration::from_secs(1),
            last_error: "x".into(),
        };
        assert!(matches!(classify(&timeout), Outcome::Info(_)));
        assert!(matches!(
            classify(&ClerkError::SessionExpired),
            Outcome::Info(_)
        ));
        assert!(matches!(
            classify(&ClerkError::Rejected("too long".into())),
            Outcome::Fail(_)
        ));
        // A refusal after an attempt that may have applied the command: unknown.
        let refused_in_doubt = ClerkError::InDoubt(Box::new(ClerkError::Tls("x".into())));
        assert!(matches!(classify(&refused_in_doubt), Outcome::Info(_)));
        let append = Invocation {
            op: OpKind::Append,
            key: "a0".into(),
            value: Some("1.1;".into()),
            expected: None,
        };
        let info = record(3, &append, 10, 20, &Outcome::Info("t".into()));
        assert_eq!(info.status, crate::check::Status::Info);
        assert!(info.validate().is_ok());
        let fail = record(3, &append, 10, 20, &Outcome::Fail("no".into()));
        assert_eq!(fail.status, crate::check::Status::Fail);
    }

    #[test]
    fn a_transfer_opens_an_absent_ledger_then_moves_money_by_cas() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let opening = bank::opening();
        let open = transfer_cas("b0", None, &mut rng).expect("an absent ledger is opened");
        assert_eq!(open.op, OpKind::Cas);
        assert_eq!(open.expected, None, "opened by a cas from absent");
        assert_eq!(open.value.as_deref(), Some(opening.as_str()));
        let cas = transfer_cas("b0", Some(opening.as_str()), &mut rng).expect("a transfer");
        assert_eq!(cas.expected.as_deref(), Some(opening.as_str()));
        let next = cas.value.expect("the ledger after the transfer");
        assert_ne!(next, opening);
        assert_eq!(bank::audit(&next), Ok(()));
        // Nothing is built on a ledger that is not sound.
        assert_eq!(transfer_cas("b0", Some("garbage"), &mut rng), None);
        assert_eq!(
            transfer_cas("b0", Some("100,100,100,100,90"), &mut rng),
            None
        );
        let keys = KeySpace::new(WorkloadKind::Bank, "chaos-1.2", 5, 100);
        let steps: Vec<Step> = (0..100)
            .map(|n| generate(WorkloadKind::Bank, &keys, &mut rng, 0, n))
            .collect();
        let transfers = steps
            .iter()
            .filter(|s| matches!(s, Step::Transfer { key } if key.starts_with("chaos-1.2/b")))
            .count();
        let reads = steps
            .iter()
            .filter(|s| matches!(s, Step::Op(i) if i.op == OpKind::Get && i.key.starts_with("chaos-1.2/b")))
            .count();
        assert_eq!(transfers + reads, 100, "{steps:?}");
        assert!(
            transfers > 40 && reads > 20,
            "{transfers} transfers, {reads} reads"
        );
    }
}
