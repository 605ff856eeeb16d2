//! The run's timeline: one monotonic clock, the operations clients completed (`history.jsonl`, the
//! checker's format) and the nemesis's events (`nemesis.jsonl`), both stamped by the same clock so a
//! fault and the operations it affected line up.
//!
//! Lines are written as operations complete (a crashed harness still leaves the history up to that
//! point) and kept in memory for the verdict. The lock is a plain mutex held only to write one line,
//! never across an await.

use crate::check::{History, HistoryError, Operation};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why the timeline could not be written.
#[derive(Debug, Error)]
pub enum RecordError {
    /// A file could not be created or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An operation the checker would refuse (a bug in the harness).
    #[error("invalid operation recorded: {0}")]
    Invalid(#[from] HistoryError),
    /// An event could not be encoded.
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Nanoseconds since the run started, from a monotonic clock shared by clients and nemesis (the
/// checker compares invocation and completion times of different clients).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `offset` after the start (for sleeping until a scheduled time).
    pub fn at(&self, offset: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + offset)
    }
}

/// A nemesis event: a fault applied (`start`) or healed (`stop`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NemesisEvent {
    /// When, on the run's clock (ns).
    pub time: u64,
    /// `start` or `stop`.
    pub phase: &'static str,
    /// The family: `kill`, `pause`, `partition`, `loss`, `restart-all`, `reconfigure`, or
    /// `heal-all`. A `start` is paired with the next `stop` of its family.
    pub fault: &'static str,
    /// The finer kind availability is reported by (`kill-leader`, `pause-minority`,
    /// `partition-isolate-leader`, `restart-all`, ...): a SIGKILLed leader and a SIGKILLed follower
    /// cost clients very different outages, and issue #13's targets are set per kind.
    pub kind: &'static str,
    /// The nodes affected (ids, from 1).
    pub nodes: Vec<u64>,
    /// What exactly was done (which pairs were cut, which nodes killed and why).
    pub detail: String,
}

struct Sink {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl Sink {
    fn create(path: PathBuf) -> Result<Sink, RecordError> {
        let file = File::create(&path).map_err(|source| RecordError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Sink {
            path,
            writer: BufWriter::new(file),
        })
    }

    fn line(&mut self, value: &impl Serialize) -> Result<(), RecordError> {
        let text = serde_json::to_string(value)?;
        self.writer
            .write_all(text.as_bytes())
            .and_then(|()| self.writer.write_all(b"\n"))
            .map_err(|source| RecordError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn flush(&mut self) -> Result<(), RecordError> {
        self.writer.flush().map_err(|source| RecordError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

struct Inner {
    history: History,
    events: Vec<NemesisEvent>,
    ops_file: Sink,
    events_file: Sink,
}

/// Records operations and nemesis events; cheap to clone (one shared timeline).
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// Start `dir/history.jsonl` and `dir/nemesis.jsonl`.
    pub fn create(dir: &Path) -> Result<Recorder, RecordError> {
        Ok(Recorder {
            inner: Arc::new(Mutex::new(Inner {
                history: History::default(),
                events: Vec::new(),
                ops_file: Sink::create(dir.join("history.jsonl"))?,
                events_file: Sink::create(dir.join("nemesis.jsonl"))?,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking writer cannot leave a half-written Vec behind; keep recording.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record one completed operation.
    pub fn op(&self, op: Operation) -> Result<(), RecordError> {
        let mut inner = self.lock();
        inner.ops_file.line(&op)?;
        inner.history.push(op)?;
        Ok(())
    }

    /// Record one nemesis event.
    pub fn event(&self, event: NemesisEvent) -> Result<(), RecordError> {
        tracing::info!(
            phase = event.phase,
            fault = event.fault,
            nodes = ?event.nodes,
            "nemesis: {}",
            event.detail
        );
        let mut inner = self.lock();
        inner.events_file.line(&event)?;
        inner.events.push(event);
        Ok(())
    }

    /// Flush both files.
    pub fn flush(&self) -> Result<(), RecordError> {
        let mut inner = self.lock();
        inner.ops_file.flush()?;
        inner.events_file.flush()
    }

    /// A copy of the history so far.
    pub fn history(&self) -> History {
        self.lock().history.clone()
    }

    /// A copy of the nemesis events so far.
    pub fn events(&self) -> Vec<NemesisEvent> {
        self.lock().events.clone()
    }
}
