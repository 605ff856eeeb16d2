//! Applying journaled persists to sled off the Raft thread.
//!
//! Once a persist's record is in the journal ([`super::journal`]) it is durable; sled is only where
//! the next start reads the log from (the running node serves its log from memory). So the Raft thread
//! hands each batch to this writer and returns: a sled batch costs 30–40 µs of CPU here, and its dirty
//! pages slowed the journal's next `fdatasync` (persist p50 181 µs with the apply inline, 111 µs
//! without). The writer applies batches in the order given; [`SledWriter::drain`] waits until every
//! batch handed over is applied (before sled is flushed, read, or a snapshot replaces the log).

use super::journal::JournalBatch;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Batches handed over and not yet applied, at most: beyond it `submit` waits, so a stalled sled
/// slows the Raft thread instead of filling memory.
const QUEUE_BATCHES: usize = 1024;

/// The key of the hard state in the meta tree.
pub(super) const HARD_STATE: &[u8] = b"hard_state";

/// Apply one persist's changes to sled (unflushed): the log write — the suffix from `truncate_from`
/// removed, the entries stored — then the hard state.
pub(super) fn apply(
    log: &sled::Tree,
    meta: &sled::Tree,
    batch: &JournalBatch,
) -> Result<(), sled::Error> {
    if let Some(from) = batch.truncate_from {
        // One key at a time, not a sled batch: a batch seals sled's write buffer to be atomic on
        // recovery (a write and a `sync_file_range` each), and the journal record is already the
        // atomic unit — a crash part way through is repaired by replaying it.
        for key in log.range(from.to_be_bytes()..).keys() {
            log.remove(key?)?;
        }
        for (index, value) in &batch.entries {
            log.insert(index.to_be_bytes(), value.as_slice())?;
        }
    }
    if let Some(hard_state) = &batch.hard_state {
        meta.insert(HARD_STATE, hard_state)?;
    }
    Ok(())
}

enum Work {
    Apply(JournalBatch),
    /// Answer once everything before it is applied: the writer's failure, if it has failed.
    Drain(SyncSender<Option<String>>),
}

/// The writer thread and the way to it.
pub(super) struct SledWriter {
    work: Option<SyncSender<Work>>,
    /// The writer's failure, once it has failed: every later call reports it.
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl SledWriter {
    /// Start the writer for these trees.
    pub(super) fn start(log: sled::Tree, meta: sled::Tree) -> std::io::Result<SledWriter> {
        let (work, queue) = sync_channel::<Work>(QUEUE_BATCHES);
        let failed = Arc::new(Mutex::new(None::<String>));
        let seen = failed.clone();
        let thread = std::thread::Builder::new()
            .name("raft-sled-writer".into())
            .spawn(move || {
                let mut failure: Option<String> = None;
                for item in queue {
                    match item {
                        Work::Apply(batch) => {
                            if failure.is_none() {
                                if let Err(e) = apply(&log, &meta, &batch) {
                                    failure = Some(e.to_string());
                                    if let Ok(mut shared) = seen.lock() {
                                        *shared = failure.clone();
                                    }
                                }
                            }
                        }
                        // A failure stays: the batches skipped after it are only in the journal,
                        // which must therefore never start over.
                        Work::Drain(reply) => {
                            let _ = reply.send(failure.clone());
                        }
                    }
                }
            })?;
        Ok(SledWriter {
            work: Some(work),
            failed,
            thread: Some(thread),
        })
    }

    /// Hand `batch` over (applied in the order given).
    pub(super) fn submit(&self, batch: JournalBatch) -> Result<(), String> {
        if let Some(failure) = self.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(failure);
        }
        self.send(Work::Apply(batch))
    }

    /// Wait until every batch handed over is in sled; the writer's first failure, if it has failed
    /// (for good: sled no longer holds what the journal does).
    pub(super) fn drain(&self) -> Result<(), String> {
        let (reply, answer) = sync_channel(1);
        self.send(Work::Drain(reply))?;
        match answer.recv() {
            Ok(None) => Ok(()),
            Ok(Some(error)) => Err(error),
            Err(_) => Err("the sled writer stopped".into()),
        }
    }

    fn send(&self, work: Work) -> Result<(), String> {
        self.work
            .as_ref()
            .and_then(|w| w.send(work).ok())
            .ok_or_else(|| "the sled writer stopped".to_string())
    }
}

impl Drop for SledWriter {
    /// Finish what was handed over before sled goes (what is lost anyway is in the journal).
    fn drop(&mut self) {
        self.work.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
