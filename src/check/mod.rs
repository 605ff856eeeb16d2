//! Linearizability checking of recorded client histories (Porcupine-style).
//!
//! Why: the ds824 services (KV, sharded KV) promise linearizability; the only
//! convincing end-to-end test is to record what clients saw and prove it is
//! consistent with *some* sequential execution that respects real time.
//!
//! How:
//! * a [`History`] is a list of [`Operation`]s, read from / written to JSON
//!   lines ([`History::from_jsonl`], [`History::to_jsonl`]) so external tools
//!   can produce them;
//! * a [`Model`] gives the sequential specification and how to split a
//!   history into independent partitions (per key for [`KvModel`]);
//! * [`check`] runs the WGL search (Wing & Gong backtracking, Lowe's
//!   memoization on `(linearized set, model state)`, compactly encoded) on every
//!   partition in parallel under a wall-clock budget ([`check_with`] adds
//!   thread and memory limits) and answers
//!   [`CheckResult::Ok`], [`CheckResult::Violation`] (with the longest
//!   linearizable prefix, the op that could not be linearized and the
//!   sub-history around it) or [`CheckResult::Unknown`] — never `Ok` unless
//!   every partition was fully decided.
//!
//! Operation statuses follow Jepsen: `ok` happened within its interval, `fail`
//! never happened (dropped), `info` may have happened at any time after
//! invocation or never (its completion is +infinity, its output unknown; an
//! `info` get is dropped since reads have no effect).
//!
//! Timestamps: an op returning at `t` and another invoked at the same `t` are
//! treated as concurrent (the safe choice for coarse clocks; see
//! `events.rs`). The CAS outcome is carried in the `ok` JSON field (see
//! [`Operation`]).
//!
//! Files: `op.rs` (the record), `history.rs` (validation and JSON lines),
//! `model.rs` (the [`Model`] trait, [`KvModel`], [`RegisterModel`]),
//! `events.rs` (sorted call/return list with lift/unlift), `bitset.rs` and
//! `memo.rs` (the memo cache), `search.rs` (WGL on one partition),
//! `checker.rs` (partitioning, parallel workers, budget, verdict).

mod bitset;
mod budget;
mod checker;
mod events;
#[cfg(any(test, feature = "sim"))]
pub mod gen;
mod history;
mod memo;
mod model;
mod op;
mod search;

#[cfg(test)]
mod tests;

pub use checker::{
    check, check_report, check_with, CheckOptions, CheckReport, CheckResult, PartitionReport,
    UnknownReason, Violation,
};
pub use history::{History, HistoryError, MAX_LINE_BYTES};
pub use model::{partition_by_key, KvModel, Model, Partition, RegisterModel};
pub use op::{OpError, OpKind, Operation, Status};
