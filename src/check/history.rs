//! A validated sequence of operations and its JSON-lines encoding.

use std::io::{BufRead, Write};

use thiserror::Error;

use super::op::{OpError, Operation};

/// Errors from building, reading or writing a [`History`].
///
/// Every input-related variant names the 1-based line (or index) so a person
/// can jump straight to the bad record in a large file.
#[derive(Debug, Error)]
pub enum HistoryError {
    /// The reader failed while reading the given line.
    #[error("line {line}: read error: {source}")]
    Read {
        /// 1-based line number.
        line: usize,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The line is not a JSON operation record.
    #[error("line {line}: malformed operation: {source}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What serde_json objected to.
        #[source]
        source: serde_json::Error,
    },
    /// The line parsed but describes an impossible or ambiguous operation.
    #[error("line {line}: invalid operation: {source}")]
    InvalidLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        #[source]
        source: OpError,
    },
    /// An operation passed to [`History::new`] / [`History::push`] is invalid.
    #[error("operation #{index}: invalid operation: {source}")]
    InvalidOp {
        /// 0-based index in the history.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: OpError,
    },
    /// Serializing an operation failed.
    #[error("cannot encode operation #{index}: {source}")]
    Encode {
        /// 0-based index in the history.
        index: usize,
        /// Underlying serde_json error.
        #[source]
        source: serde_json::Error,
    },
    /// Writing to the output failed.
    #[error("write error: {0}")]
    Write(#[source] std::io::Error),
}

/// A history: every recorded operation, in file order, each validated.
///
/// The constructor validates, so the checker can rely on well-formed records;
/// `fail` operations are kept (so a history round-trips unchanged) and only
/// dropped when checking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    /// Builds a history from operations, rejecting the first invalid one.
    pub fn new(ops: Vec<Operation>) -> Result<Self, HistoryError> {
        for (index, op) in ops.iter().enumerate() {
            op.validate()
                .map_err(|source| HistoryError::InvalidOp { index, source })?;
        }
        Ok(History { ops })
    }

    /// Appends one operation after validating it, for harnesses that record
    /// incrementally.
    pub fn push(&mut self, op: Operation) -> Result<(), HistoryError> {
        op.validate().map_err(|source| HistoryError::InvalidOp {
            index: self.ops.len(),
            source,
        })?;
        self.ops.push(op);
        Ok(())
    }

    /// The operations in recorded order.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// Consumes the history, returning its operations.
    pub fn into_ops(self) -> Vec<Operation> {
        self.ops
    }

    /// Number of operations (including `fail` ones).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when there are no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Reads a JSON-lines history: one operation object per line; blank lines
    /// are skipped. Stops at the first bad line with an error naming it.
    pub fn from_jsonl<R: BufRead>(reader: R) -> Result<Self, HistoryError> {
        let mut ops = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line_no = i + 1;
            let text = line.map_err(|source| HistoryError::Read {
                line: line_no,
                source,
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let op: Operation =
                serde_json::from_str(&text).map_err(|source| HistoryError::Parse {
                    line: line_no,
                    source,
                })?;
            op.validate().map_err(|source| HistoryError::InvalidLine {
                line: line_no,
                source,
            })?;
            ops.push(op);
        }
        Ok(History { ops })
    }

    /// Writes the history as JSON lines (one object per line, `\n`-terminated),
    /// the format [`History::from_jsonl`] reads.
    pub fn to_jsonl<W: Write>(&self, mut writer: W) -> Result<(), HistoryError> {
        for (index, op) in self.ops.iter().enumerate() {
            let line = serde_json::to_string(op)
                .map_err(|source| HistoryError::Encode { index, source })?;
            writer
                .write_all(line.as_bytes())
                .and_then(|()| writer.write_all(b"\n"))
                .map_err(HistoryError::Write)?;
        }
        writer.flush().map_err(HistoryError::Write)
    }
}

impl TryFrom<Vec<Operation>> for History {
    type Error = HistoryError;

    fn try_from(ops: Vec<Operation>) -> Result<Self, Self::Error> {
        History::new(ops)
    }
}
