//! `kvctl check`: judge a JSON-lines history with the linearizability checker, and say why.

use super::{EXIT_NO, EXIT_OK, EXIT_UNKNOWN};
use crate::check::{check, CheckResult, History, HistoryError, KvModel};
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Why the history could not be checked at all.
#[derive(Debug, Error)]
pub enum CheckFileError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid history.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Which line is wrong and why.
        source: HistoryError,
    },
}

/// Check the history in `path` within `budget`; returns the report to print and the exit code
/// ([`EXIT_OK`], [`EXIT_NO`] with the offending sub-history, or [`EXIT_UNKNOWN`]).
pub fn check_file(path: &Path, budget: Duration) -> Result<(String, u8), CheckFileError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| CheckFileError::Open {
        path: shown.clone(),
        source,
    })?;
    let history =
        History::from_jsonl(BufReader::new(file)).map_err(|source| CheckFileError::Parse {
            path: shown,
            source,
        })?;
    let result = check(&history, &KvModel, budget);
    let code = match &result {
        CheckResult::Ok => EXIT_OK,
        CheckResult::Violation(_) => EXIT_NO,
        CheckResult::Unknown { .. } => EXIT_UNKNOWN,
    };
    let report = match result {
        CheckResult::Ok => format!("ok: {} operations, linearizable", history.len()),
        other => other.to_string(),
    };
    Ok((report, code))
}
