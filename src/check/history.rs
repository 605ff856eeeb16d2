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
    /// The line is longer than [`MAX_LINE_BYTES`] (no operation the services accept is).
    #[error("line {line}: longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong {
        /// 1-based line number.
        line: usize,
    },
    /// The history needs more memory than the caller allows
    /// ([`History::from_jsonl_bounded`]).
    #[error("line {line}: the history so far needs more than {limit} bytes of memory")]
    TooLarge {
        /// 1-based line number where the limit was crossed.
        line: usize,
        /// The limit, in bytes.
        limit: usize,
    },
}

/// Longest line [`History::from_jsonl`] accepts: a key, a value, an expected value and an output
/// at their service limits, JSON-escaped, fit with room to spare. A longer line is not a record
/// any service produced, and reading it whole would let one bad file exhaust memory.
pub const MAX_LINE_BYTES: usize =
    8 * (crate::limits::MAX_KEY_BYTES + 3 * crate::limits::MAX_VALUE_BYTES);

/// Memory one parsed operation holds: the record plus its strings.
fn op_bytes(op: &Operation) -> usize {
    std::mem::size_of::<Operation>()
        + op.key.capacity()
        + [&op.value, &op.expected, &op.output]
            .iter()
            .map(|s| s.as_ref().map_or(0, String::capacity))
            .sum::<usize>()
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
    /// are skipped. Stops at the first bad line with an error naming it; a
    /// line over [`MAX_LINE_BYTES`] is refused without being read whole.
    pub fn from_jsonl<R: BufRead>(reader: R) -> Result<Self, HistoryError> {
        Self::from_jsonl_bounded(reader, usize::MAX)
    }

    /// Like [`History::from_jsonl`], refusing with [`HistoryError::TooLarge`]
    /// once the parsed operations would hold more than `max_bytes` (see
    /// [`History::approx_bytes`]), so a checker with a memory budget can say
    /// "too large" instead of being killed while reading.
    pub fn from_jsonl_bounded<R: BufRead>(
        mut reader: R,
        max_bytes: usize,
    ) -> Result<Self, HistoryError> {
        let mut ops = Vec::new();
        let mut held = 0usize;
        let mut buf: Vec<u8> = Vec::new();
        let mut line_no = 0;
        loop {
            line_no += 1;
            buf.clear();
            let limit = u64::try_from(MAX_LINE_BYTES + 1).unwrap_or(u64::MAX);
            let read = std::io::Read::take(&mut reader, limit)
                .read_until(b'\n', &mut buf)
                .map_err(|source| HistoryError::Read {
                    line: line_no,
                    source,
                })?;
            if read == 0 {
                break;
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(HistoryError::LineTooLong { line: line_no });
            }
            let text = std::str::from_utf8(&buf).map_err(|e| HistoryError::Read {
                line: line_no,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let op: Operation =
                serde_json::from_str(text).map_err(|source| HistoryError::Parse {
                    line: line_no,
                    source,
                })?;
            op.validate().map_err(|source| HistoryError::InvalidLine {
                line: line_no,
                source,
            })?;
            held = held.saturating_add(op_bytes(&op));
            if held > max_bytes {
                return Err(HistoryError::TooLarge {
                    line: line_no,
                    limit: max_bytes,
                });
            }
            ops.push(op);
        }
        Ok(History { ops })
    }

    /// Approximate memory the operations hold (records and strings), the
    /// quantity [`History::from_jsonl_bounded`] limits.
    pub fn approx_bytes(&self) -> usize {
        self.ops.iter().map(op_bytes).sum()
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
