//! Applying journaled persists to sled off the Raft thread, and as late as the journal allows.
//!
//! Once a persist's record is in the journal ([`super::journal`]) it is durable; sled is only where
//! the next start reads the log from (the running node serves its log from memory). So the Raft thread
//! hands each batch to this writer and returns: a sled batch costs 30–40 µs of CPU here, and its dirty
//! pages slowed the journal's next `fdatasync` (persist p50 181 µs with the apply inline, 111 µs
//! without).
//!
//! **Write-behind.** While the journal is less than half full the batches are only kept (the journal
//! holds them durably), on the persisting thread: handing each over would wake the writer per persist
//! for nothing. Most entries of a busy log are covered by a snapshot before that: the
//! drain at the snapshot's switch then skips them, so they never cost a sled insert, nor the reaper's
//! delete after it (together a fifth of a 3-node cluster's CPU at 64 clients putting, measured: 15.4k
//! puts/s with every entry in sled, 19.8k without). Past half the journal the writer applies what it
//! kept, oldest first, so when the journal is full and must start over little is left to apply while the
//! Raft thread waits. Batches are applied in the order given; [`SledWriter::drain`] waits until every
//! batch handed over is applied (before sled is flushed, read, or a snapshot replaces the log). A
//! drain that finds nothing handed over since the last one applies the kept batches itself, on the
//! calling thread: waking the writer for them cost the Raft loop 10–30 ms under load.

use super::journal::{JournalBatch, JOURNAL_BYTES};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Batches handed over and not yet applied, at most: beyond it `submit` waits, so a stalled sled
/// slows the Raft thread instead of filling memory.
const QUEUE_BATCHES: usize = 1024;

/// The key of the hard state in the meta tree.
pub(super) const HARD_STATE: &[u8] = b"hard_state";

/// Apply journaled batches, oldest first, to sled (unflushed): what opening a directory does with
/// the journal it replays. The same mechanism as the writer's drain.
pub(super) fn replay(
    log: &sled::Tree,
    meta: &sled::Tree,
    batches: Vec<JournalBatch>,
) -> Result<(), sled::Error> {
    let mut behind = Behind {
        log: log.clone(),
        meta: meta.clone(),
        kept: VecDeque::new(),
        catching_up: false,
    };
    for batch in batches {
        keep(&mut behind.kept, batch);
    }
    behind.apply_kept(0).map(|_| ())
}

/// Where a drain leaves the stored log: below `keep_from` sled may still hold entries the drain's
/// snapshot covers, for the reaper to delete; from `keep_from` through the snapshot's index it holds
/// none (the kept batches' truncations removed what was there, and their covered entries were never
/// stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Drained {
    /// The lowest index a kept (until then unapplied) batch rewrote the log from; `u64::MAX` if none.
    pub keep_from: u64,
}

/// Bytes of journal past which the writer stops keeping batches back and applies them (half the
/// journal): when it fills, what is left to apply while the Raft thread waits is what came since.
pub(super) const WRITE_BEHIND_JOURNAL_BYTES: u64 = JOURNAL_BYTES / 2;

/// Entries applied at a time when catching up past half the journal: about 20 ms of sled work, so
/// batches handed over meanwhile wait that long at most and the queue never fills (a whole half of
/// the journal at once would be a second of work with the Raft thread blocked on the full queue).
const CATCH_UP_ENTRIES: usize = 4096;

enum Work {
    /// Batches, oldest first, and the journal's bytes in use with the last one's record in (or as it
    /// stands, for a batch not journaled).
    Apply(Vec<JournalBatch>, u64),
    /// Keep `batches` too, then apply everything kept, except the entries through `covered` (a
    /// snapshot replaces them), then answer: the writer's failure if it has failed, else where the
    /// kept batches began.
    Drain {
        covered: u64,
        batches: Vec<JournalBatch>,
        reply: SyncSender<Result<Drained, String>>,
    },
    /// Batches applied on the calling thread, to free here: tens of thousands of entries take
    /// milliseconds to free, which the Raft thread would otherwise wait for.
    Discard(VecDeque<JournalBatch>),
}

/// Keep `batch` after those in `kept`. A hard state alone (a commit index, a vote) replaces the last
/// kept one: a follower that only hears heartbeats keeps one batch, not one per heartbeat.
fn keep(kept: &mut VecDeque<JournalBatch>, batch: JournalBatch) {
    if batch.truncate_from.is_none() {
        match (kept.back_mut(), batch.hard_state) {
            (_, None) => return,
            (Some(last), Some(hard_state)) => {
                last.hard_state = Some(hard_state);
                return;
            }
            (None, Some(_)) => {}
        }
    }
    kept.push_back(batch);
}

/// The writer thread's state: the batches kept back, oldest first.
struct Behind {
    log: sled::Tree,
    meta: sled::Tree,
    kept: VecDeque<JournalBatch>,
    /// The journal is past half full (as of the last batch): apply what is kept, a chunk at a time.
    catching_up: bool,
}

impl Behind {
    fn take(&mut self, batches: Vec<JournalBatch>, journal_used: u64) -> Result<(), sled::Error> {
        for batch in batches {
            keep(&mut self.kept, batch);
        }
        self.catching_up = journal_used >= WRITE_BEHIND_JOURNAL_BYTES;
        if self.catching_up {
            self.catch_up()?;
        }
        Ok(())
    }

    /// Past half the journal, with batches kept: the next chunk is due.
    fn behind(&self) -> bool {
        self.catching_up && !self.kept.is_empty()
    }

    /// Apply the oldest kept batches, about [`CATCH_UP_ENTRIES`] entries' worth.
    fn catch_up(&mut self) -> Result<(), sled::Error> {
        let mut entries = 0;
        let batches = self
            .kept
            .iter()
            .take_while(|b| {
                let more = entries < CATCH_UP_ENTRIES;
                entries += b.entries.len().max(1);
                more
            })
            .count();
        self.apply_oldest(batches, 0).map(|_| ())
    }

    /// Apply every kept batch, except the entries through `covered`.
    fn apply_kept(&mut self, covered: u64) -> Result<Drained, sled::Error> {
        self.apply_oldest(self.kept.len(), covered)
    }

    /// Apply the oldest `count` kept batches as one (see [`apply_batches`]), then forget them.
    fn apply_oldest(&mut self, count: usize, covered: u64) -> Result<Drained, sled::Error> {
        let count = count.min(self.kept.len());
        let drained = apply_batches(&self.log, &self.meta, self.kept.range(..count), covered)?;
        self.kept.drain(..count);
        Ok(drained)
    }
}

/// Apply `batches` (oldest first) as one: the same keys end up set as applying them in turn, with
/// one range removal instead of one per batch (a snapshot's drain may find tens of thousands).
/// Entries through `covered` are left out.
fn apply_batches<'a>(
    log: &sled::Tree,
    meta: &sled::Tree,
    batches: impl Iterator<Item = &'a JournalBatch> + Clone,
    covered: u64,
) -> Result<Drained, sled::Error> {
    let keep_from = batches
        .clone()
        .filter_map(|b| b.truncate_from)
        .min()
        .unwrap_or(u64::MAX);
    let mut entries: BTreeMap<u64, &[u8]> = BTreeMap::new();
    let mut hard_state = None;
    for batch in batches {
        if let Some(from) = batch.truncate_from {
            entries.split_off(&from);
            for (index, value) in batch.entries.iter().filter(|(i, _)| *i > covered) {
                entries.insert(*index, value.as_slice());
            }
        }
        hard_state = batch.hard_state.or(hard_state);
    }
    // One key at a time, not a sled batch: a batch seals sled's write buffer to be atomic on
    // recovery (a write and a `sync_file_range` each), and the journal record is already the
    // atomic unit — a crash part way through is repaired by replaying it.
    if keep_from != u64::MAX {
        for key in log.range(keep_from.to_be_bytes()..).keys() {
            log.remove(key?)?;
        }
    }
    for (index, value) in entries {
        log.insert(index.to_be_bytes(), value)?;
    }
    if let Some(hard_state) = hard_state {
        meta.insert(HARD_STATE, &hard_state)?;
    }
    Ok(Drained { keep_from })
}

/// Make `error` the writer's failure for good, for every later call to report; returns its message.
/// Both the thread and a drain on the calling thread fail this way.
fn record_failure(failed: &Mutex<Option<String>>, error: sled::Error) -> String {
    let message = error.to_string();
    if let Ok(mut shared) = failed.lock() {
        *shared = Some(message.clone());
    }
    message
}

/// The writer thread and the way to it.
pub(super) struct SledWriter {
    /// Batches kept on the caller's side while the journal is under half full: handing each to the
    /// thread would wake it once per persist for nothing (it only keeps them too).
    local: Mutex<VecDeque<JournalBatch>>,
    /// Batches went to the thread since its last drain, so it may hold some. Until then every kept
    /// batch is in `local`, and a drain applies them on the calling thread (see [`SledWriter::drain`]).
    handed_over: AtomicBool,
    /// The trees, for a drain on the calling thread.
    log: sled::Tree,
    meta: sled::Tree,
    work: Option<SyncSender<Work>>,
    /// The writer's failure, once it has failed: every later call reports it.
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl SledWriter {
    /// Start the writer for these trees.
    pub(super) fn start(log: sled::Tree, meta: sled::Tree) -> std::io::Result<SledWriter> {
        let (trees_log, trees_meta) = (log.clone(), meta.clone());
        let (work, queue) = sync_channel::<Work>(QUEUE_BATCHES);
        let failed = Arc::new(Mutex::new(None::<String>));
        let seen = failed.clone();
        let thread = std::thread::Builder::new()
            .name("raft-sled-writer".into())
            .spawn(move || {
                let mut behind = Behind {
                    log,
                    meta,
                    kept: VecDeque::new(),
                    catching_up: false,
                };
                // A failure stays: the batches skipped after it are only in the journal, which must
                // therefore never start over.
                let mut failure: Option<String> = None;
                let fail = |e: sled::Error, failure: &mut Option<String>| {
                    *failure = Some(record_failure(&seen, e));
                };
                loop {
                    // Behind past half the journal: a chunk whenever nothing was handed over.
                    let item = if failure.is_none() && behind.behind() {
                        match queue.try_recv() {
                            Ok(item) => item,
                            Err(TryRecvError::Empty) => {
                                if let Err(e) = behind.catch_up() {
                                    fail(e, &mut failure);
                                }
                                continue;
                            }
                            Err(TryRecvError::Disconnected) => break,
                        }
                    } else {
                        match queue.recv() {
                            Ok(item) => item,
                            Err(_) => break,
                        }
                    };
                    match item {
                        Work::Apply(batches, journal_used) => {
                            if failure.is_none() {
                                if let Err(e) = behind.take(batches, journal_used) {
                                    fail(e, &mut failure);
                                }
                            }
                        }
                        Work::Discard(batches) => drop(batches),
                        Work::Drain {
                            covered,
                            batches,
                            reply,
                        } => {
                            for batch in batches {
                                keep(&mut behind.kept, batch);
                            }
                            let answer = match failure.clone() {
                                Some(failure) => Err(failure),
                                None => behind.apply_kept(covered).map_err(|e| {
                                    let message = e.to_string();
                                    fail(e, &mut failure);
                                    message
                                }),
                            };
                            let _ = reply.send(answer);
                        }
                    }
                }
                // The storage is gone: what was kept goes to sled (it is in the journal anyway).
                if failure.is_none() {
                    let _ = behind.apply_kept(0);
                }
            })?;
        Ok(SledWriter {
            local: Mutex::new(VecDeque::new()),
            handed_over: AtomicBool::new(false),
            log: trees_log,
            meta: trees_meta,
            work: Some(work),
            failed,
            thread: Some(thread),
        })
    }

    /// Hand `batch` over (applied in the order given, maybe only at the next drain); `journal_used` is
    /// the journal's bytes in use with its record in. `submit` and [`SledWriter::drain`] are called by
    /// one thread at a time (the storage's owner): a drain must see every batch submitted before it.
    pub(super) fn submit(&self, batch: JournalBatch, journal_used: u64) -> Result<(), String> {
        self.check()?;
        let mut local = self.local();
        keep(&mut local, batch);
        if journal_used < WRITE_BEHIND_JOURNAL_BYTES {
            return Ok(());
        }
        let batches = local.drain(..).collect();
        // Set while `local` is still held: from here the batches are the thread's to apply.
        self.handed_over.store(true, Ordering::SeqCst);
        drop(local);
        self.send(Work::Apply(batches, journal_used))
    }

    fn local(&self) -> std::sync::MutexGuard<'_, VecDeque<JournalBatch>> {
        self.local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The writer's failure, if it has failed (checked before changing anything it would have to
    /// follow, such as a snapshot's switch).
    pub(super) fn check(&self) -> Result<(), String> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Apply every batch submitted so far, except the entries through `covered`, and wait until they
    /// are in sled (unflushed); returns where the kept batches began, or the writer's first failure
    /// if it has failed (for good: sled no longer holds what the journal does).
    ///
    /// While nothing went to the thread since its last drain (the journal stayed under half full),
    /// every kept batch is here, and they are applied on the calling thread: under load, waking the
    /// writer and waiting while it is scheduled among busy threads stretched a snapshot's drain from
    /// about 3 ms of work to 10–30 ms, with the Raft loop stopped (measured at 64 clients).
    pub(super) fn drain(&self, covered: u64) -> Result<Drained, String> {
        self.check()?;
        if !self.handed_over.load(Ordering::SeqCst) {
            let mut local = self.local();
            return match apply_batches(&self.log, &self.meta, local.iter(), covered) {
                Ok(drained) => {
                    let applied = std::mem::take(&mut *local);
                    drop(local);
                    if !applied.is_empty() {
                        // A full queue or a stopped thread gives them back: freed here then.
                        let _ = self.try_send(Work::Discard(applied));
                    }
                    Ok(drained)
                }
                // As the thread's failures: the batches stay unapplied, so the journal must never
                // start over; every later call reports it.
                Err(e) => Err(record_failure(&self.failed, e)),
            };
        }
        let (reply, answer) = sync_channel(1);
        let batches = self.local().drain(..).collect();
        self.send(Work::Drain {
            covered,
            batches,
            reply,
        })?;
        let drained = match answer.recv() {
            Ok(result) => result,
            Err(_) => Err("the sled writer stopped".into()),
        }?;
        // The thread applied all it kept: it holds nothing until the next hand-over.
        self.handed_over.store(false, Ordering::SeqCst);
        Ok(drained)
    }

    /// Hand `work` over if the queue has room, else give it back.
    fn try_send(&self, work: Work) -> Result<(), Work> {
        match &self.work {
            Some(queue) => queue.try_send(work).map_err(|e| match e {
                std::sync::mpsc::TrySendError::Full(work)
                | std::sync::mpsc::TrySendError::Disconnected(work) => work,
            }),
            None => Err(work),
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
        let batches: Vec<JournalBatch> = self.local().drain(..).collect();
        // After a failure nothing more goes to sled (a drain on the calling thread may have failed
        // without the thread knowing): the next open replays the journal instead.
        if !batches.is_empty() && self.check().is_ok() {
            let _ = self.send(Work::Apply(batches, 0));
        }
        self.work.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    /// One batch applied on its own, key by key: the plain meaning of a batch, which applying kept
    /// batches as one must match.
    fn apply(log: &sled::Tree, meta: &sled::Tree, batch: &JournalBatch) -> Result<(), sled::Error> {
        if let Some(from) = batch.truncate_from {
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

    fn trees() -> (tempfile::TempDir, sled::Db, sled::Tree, sled::Tree) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("open sled");
        let log = db.open_tree("log").expect("tree");
        let meta = db.open_tree("meta").expect("tree");
        (dir, db, log, meta)
    }

    fn entries(from: u64, to: u64, tag: u8) -> JournalBatch {
        JournalBatch {
            truncate_from: Some(from),
            entries: (from..=to).map(|i| (i, vec![tag; 3])).collect(),
            hard_state: None,
        }
    }

    fn contents(log: &sled::Tree) -> Vec<(u64, Vec<u8>)> {
        log.iter()
            .map(|item| {
                let (key, value) = item.expect("read");
                let key = <[u8; 8]>::try_from(key.as_ref()).expect("8-byte key");
                (u64::from_be_bytes(key), value.to_vec())
            })
            .collect()
    }

    /// Every key written to `log` from the events `subscriber` saw so far.
    pub(in crate::raft) fn inserted(subscriber: &mut sled::Subscriber) -> Vec<u64> {
        let mut keys = Vec::new();
        while let Ok(event) = subscriber.next_timeout(Duration::from_millis(50)) {
            if let sled::Event::Insert { key, .. } = event {
                let key = <[u8; 8]>::try_from(key.as_ref()).expect("8-byte key");
                keys.push(u64::from_be_bytes(key));
            }
        }
        keys
    }

    #[test]
    fn entries_a_snapshot_covers_before_the_journal_is_half_full_never_reach_sled() {
        let (_dir, _db, log, meta) = trees();
        let mut writes = log.watch_prefix(vec![]);
        let writer = SledWriter::start(log.clone(), meta.clone()).expect("start");
        for i in 1..=100 {
            writer.submit(entries(i, i, 1), i * 64).expect("submit");
        }
        // Follower-style overwrite of a suffix, also kept back.
        writer
            .submit(entries(95, 100, 2), 101 * 64)
            .expect("submit");
        let drained = writer.drain(90).expect("drain");
        assert_eq!(drained.keep_from, 1);
        assert_eq!(inserted(&mut writes), (91..=100).collect::<Vec<_>>());
        let expected: Vec<(u64, Vec<u8>)> = (91..=94)
            .map(|i| (i, vec![1; 3]))
            .chain((95..=100).map(|i| (i, vec![2; 3])))
            .collect();
        assert_eq!(contents(&log), expected);
    }

    /// A snapshot's drain under load waited 10–30 ms for the writer thread to be scheduled; while
    /// nothing went to the thread since its last drain, the calling thread applies the kept batches
    /// itself, so the drain works even with the thread gone. Once batches went over, a drain waits
    /// for the thread (they must be applied first, in order).
    #[test]
    fn a_drain_with_nothing_handed_over_needs_no_writer_thread() {
        let (_dir, _db, log, meta) = trees();
        let mut writer = SledWriter::start(log.clone(), meta.clone()).expect("start");
        for i in 1..=10 {
            writer.submit(entries(i, i, 1), i * 64).expect("submit");
        }
        writer
            .submit(entries(11, 11, 1), WRITE_BEHIND_JOURNAL_BYTES)
            .expect("submit");
        writer.drain(0).expect("drain");
        assert_eq!(contents(&log).len(), 11);
        // The thread stops; the journal started over, and the next batches are only kept.
        writer.work.take();
        writer.thread.take().expect("thread").join().expect("join");
        for i in 12..=20 {
            writer.submit(entries(i, i, 2), i * 64).expect("submit");
        }
        writer.submit(entries(18, 20, 3), 21 * 64).expect("submit");
        assert_eq!(writer.drain(15).expect("drain").keep_from, 12);
        let expected: Vec<(u64, Vec<u8>)> = (1..=11)
            .map(|i| (i, vec![1; 3]))
            .chain((16..=17).map(|i| (i, vec![2; 3])))
            .chain((18..=20).map(|i| (i, vec![3; 3])))
            .collect();
        assert_eq!(contents(&log), expected);
        // Handed over again, a drain needs the thread: with it gone, that is an error, not a
        // drain that skipped what went over.
        writer
            .submit(entries(21, 21, 4), WRITE_BEHIND_JOURNAL_BYTES)
            .expect_err("the thread is gone");
        writer.drain(0).expect_err("the thread is gone");
    }

    /// Once the writer failed (here as a drain on the calling thread would record it), the batches
    /// still kept are not applied when it is dropped: sled stays as the failure left it, and the
    /// next open replays the journal.
    #[test]
    fn after_a_failure_dropping_the_writer_applies_nothing_more() {
        let (_dir, _db, log, meta) = trees();
        let writer = SledWriter::start(log.clone(), meta.clone()).expect("start");
        for i in 1..=5 {
            writer.submit(entries(i, i, 1), i * 64).expect("submit");
        }
        *writer.failed.lock().expect("lock") = Some("injected".into());
        writer.drain(0).expect_err("failed for good");
        drop(writer);
        assert_eq!(contents(&log), Vec::<(u64, Vec<u8>)>::new());
    }

    #[test]
    fn past_half_the_journal_batches_go_to_sled_without_waiting_for_a_drain() {
        let (_dir, _db, log, meta) = trees();
        let mut writes = log.watch_prefix(vec![]);
        let writer = SledWriter::start(log.clone(), meta.clone()).expect("start");
        // More kept than one catch-up chunk, so the rest goes in the background, chunk by chunk.
        let kept = 3 * CATCH_UP_ENTRIES as u64;
        for i in 1..=kept {
            writer.submit(entries(i, i, 1), 64).expect("submit");
        }
        writer
            .submit(entries(kept + 1, kept + 1, 1), WRITE_BEHIND_JOURNAL_BYTES)
            .expect("submit");
        // No drain and nothing more handed over: the writer applies everything it kept.
        let mut seen = 0;
        while seen <= kept {
            match writes.next_timeout(Duration::from_secs(30)) {
                Ok(sled::Event::Insert { .. }) => seen += 1,
                Ok(_) => {}
                Err(e) => panic!("the kept batches were not applied: {e:?} after {seen}"),
            }
        }
        assert_eq!(writer.drain(0).expect("drain").keep_from, u64::MAX);
        assert_eq!(contents(&log).len() as u64, kept + 1);
    }

    #[test]
    fn hard_states_alone_collapse_into_the_last_kept_batch() {
        let (_dir, _db, log, meta) = trees();
        let writer = SledWriter::start(log.clone(), meta.clone()).expect("start");
        writer.submit(entries(1, 1, 1), 64).expect("submit");
        for commit in 0..10u8 {
            let batch = JournalBatch {
                hard_state: Some([commit; 24]),
                ..JournalBatch::default()
            };
            writer.submit(batch, 64).expect("submit");
        }
        writer.drain(0).expect("drain");
        assert_eq!(
            meta.get(HARD_STATE).expect("read").as_deref(),
            Some(&[9u8; 24][..])
        );
        assert_eq!(contents(&log), vec![(1, vec![1; 3])]);
    }

    /// Kept batches applied as one (in prefixes, as catching up does, then the rest) leave sled
    /// exactly as applying them one by one does, with and without a snapshot (whose covered entries
    /// are dropped), over a log sled already holds.
    #[test]
    fn applying_kept_batches_as_one_matches_applying_them_in_turn() {
        for seed in 0..200u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (_d1, _db1, log_a, meta_a) = trees();
            let (_d2, _db2, log_b, meta_b) = trees();
            let stored = rng.random_range(0..20u64);
            for tree in [&log_a, &log_b] {
                for i in 1..=stored {
                    tree.insert(i.to_be_bytes(), &[0u8][..]).expect("insert");
                }
            }
            let mut behind = Behind {
                log: log_a.clone(),
                meta: meta_a.clone(),
                kept: VecDeque::new(),
                catching_up: false,
            };
            let mut last = 0u64;
            for n in 0..rng.random_range(1..30) {
                let batch = if rng.random_bool(0.2) {
                    JournalBatch {
                        hard_state: Some([n as u8; 24]),
                        ..JournalBatch::default()
                    }
                } else {
                    let from = rng.random_range(1..=last + 1);
                    let to = from + rng.random_range(0..5);
                    last = to;
                    entries(from, to, n as u8)
                };
                apply(&log_b, &meta_b, &batch).expect("apply");
                behind.take(vec![batch], 0).expect("keep");
                if rng.random_bool(0.2) {
                    // Catching up past half the journal applies a prefix of what is kept.
                    let prefix = rng.random_range(0..=behind.kept.len());
                    behind.apply_oldest(prefix, 0).expect("apply a prefix");
                }
            }
            let covered = if rng.random_bool(0.5) {
                rng.random_range(0..=last)
            } else {
                0
            };
            let drained = behind.apply_kept(covered).expect("apply kept");
            for key in log_b.range(..=covered.to_be_bytes()).keys() {
                log_b.remove(key.expect("key")).expect("remove");
            }
            let in_a: Vec<_> = contents(&log_a)
                .into_iter()
                .filter(|(i, _)| *i > covered)
                .collect();
            assert_eq!(in_a, contents(&log_b), "seed {seed}");
            assert!(
                contents(&log_a)
                    .iter()
                    .all(|(i, _)| *i > covered || *i < drained.keep_from),
                "seed {seed}: a covered entry at or above keep_from"
            );
            assert_eq!(
                meta_a.get(HARD_STATE).expect("read"),
                meta_b.get(HARD_STATE).expect("read"),
                "seed {seed}"
            );
        }
    }
}
