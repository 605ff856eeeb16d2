//! Unit tests for the checker; `sim` generates large linearizable histories.

mod blowup;
mod brute;
mod history_tests;
mod kv_tests;
mod sim;

use std::time::Duration;

use super::{History, Operation};

/// Generous budget for small hand-written histories.
const BUDGET: Duration = Duration::from_secs(10);

/// Builds a validated history (panics in tests only).
fn hist(ops: Vec<Operation>) -> History {
    History::new(ops).expect("test history must be valid")
}
