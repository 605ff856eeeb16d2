//! Durable Raft state: the [`Storage`] trait the node driver persists through, and its sled implementation.
//!
//! # Layout in sled
//!
//! One sled database per node data directory, with three trees:
//! - `raft_meta`: `identity` (cluster name and node id, JSON), `hard_state` (term, vote, commit) and
//!   `snapshot` (index, term, length and the generation its data is stored under);
//! - `raft_log`: one entry per key, the key the big-endian index so that sled's order is log order;
//! - `raft_snapshot`: snapshot data in 1 MiB chunks keyed by (generation, chunk number).
//!
//! # Crash consistency
//!
//! [`Storage::persist`] writes in the order of the driver contract and flushes before returning. Each log
//! write is one atomic sled batch. A new snapshot's data goes under a fresh generation before the metadata
//! points at it, so a crash leaves either the old snapshot or the new one, never a mix; leftovers of other
//! generations and entries the snapshot covers are cleaned up when the directory is next opened.

use super::types::{HardState, NodeId, PersistedState, Snapshot, SnapshotMeta};
use super::wire::{entry_from_proto, entry_to_proto};
use super::Ready;
use crate::proto::raft as pb;
use bytes::BytesMut;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Where a node keeps what it must not forget.
pub trait Storage: Send + 'static {
    /// Everything persisted, for [`crate::raft::RaftCore::restore`].
    fn load(&self) -> Result<PersistedState, StorageError>;
    /// Persist the snapshot, log write and hard state of `ready`, durably, before returning.
    fn persist(&mut self, ready: &Ready) -> Result<(), StorageError>;
    /// Bytes of Raft state (hard state and log entries), the quantity a service compares with its
    /// snapshot threshold.
    fn raft_state_size(&self) -> u64;
    /// Bytes of the stored snapshot.
    fn snapshot_size(&self) -> u64;

    /// A writer for the bytes of a snapshot about to be taken, to run on another thread so the driver's
    /// loop keeps ticking meanwhile; `None` if this storage cannot (then `persist` writes them).
    fn snapshot_stager(&mut self) -> Option<Box<dyn SnapshotStager>> {
        None
    }

    /// A staged snapshot: the next `persist` of this very snapshot switches to the staged bytes instead
    /// of writing them again.
    fn offer_staged(&mut self, _staged: StagedSnapshot) -> Result<(), StorageError> {
        Ok(())
    }

    /// Delete a staged snapshot that will not be persisted.
    fn discard_staged(&mut self, _staged: StagedSnapshot) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A snapshot's bytes, written and flushed ahead of the `persist` that makes them the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedSnapshot {
    meta: SnapshotMeta,
    len: u64,
    generation: u64,
}

/// Writes a snapshot's bytes off the driver's loop ([`Storage::snapshot_stager`]).
pub trait SnapshotStager: Send + 'static {
    /// Write and flush the bytes of `snapshot`. Nothing refers to them until
    /// [`Storage::offer_staged`] and a `persist` of the same snapshot: a crash before leaves only
    /// unreferenced chunks, removed at the next open.
    fn stage(self: Box<Self>, snapshot: &Snapshot) -> Result<StagedSnapshot, StorageError>;
}

/// [`SnapshotStager`] of [`SledStorage`]: the chunk tree and a generation of its own.
struct SledStager {
    dir: PathBuf,
    db: sled::Db,
    snapshot_data: sled::Tree,
    generation: u64,
}

impl SnapshotStager for SledStager {
    fn stage(self: Box<Self>, snapshot: &Snapshot) -> Result<StagedSnapshot, StorageError> {
        let io = |source| StorageError::Io {
            dir: self.dir.clone(),
            source,
        };
        write_chunks(&self.snapshot_data, self.generation, &snapshot.data).map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(StagedSnapshot {
            meta: snapshot.meta,
            len: snapshot.data.len() as u64,
            generation: self.generation,
        })
    }
}

/// Store `data` as the chunks of `generation`. Chunk by chunk rather than one batch: a batch would copy
/// the whole snapshot in memory first. Atomicity comes from the generation switch.
fn write_chunks(tree: &sled::Tree, generation: u64, data: &[u8]) -> Result<(), sled::Error> {
    for (n, chunk) in data.chunks(CHUNK).enumerate() {
        tree.insert(chunk_key(generation, n as u64), chunk)?;
    }
    Ok(())
}

/// A storage failure. Every variant names the data directory, so an operator knows where to look.
#[derive(Debug, Error)]
pub enum StorageError {
    /// sled could not open the directory (missing permissions, locked by another process, corrupt files).
    #[error("cannot open raft data dir {dir}: {source}")]
    Open {
        /// The data directory.
        dir: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// Reading or writing failed.
    #[error("raft data dir {dir}: I/O failure: {source}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// The directory was initialised for another node or cluster; starting with it would corrupt both.
    #[error("raft data dir {dir} belongs to {found}, not to {expected}")]
    WrongIdentity {
        /// The data directory.
        dir: PathBuf,
        /// Who the directory belongs to.
        found: String,
        /// Who tried to open it.
        expected: String,
    },
    /// The stored state cannot be decoded or is inconsistent.
    #[error("raft data dir {dir} is corrupt: {detail}")]
    Corrupt {
        /// The data directory.
        dir: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Which node of which cluster a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// A name shared by every member of one Raft group (e.g. "kv" or "shard-101").
    pub cluster: String,
    /// The node's id in that group.
    pub node: NodeId,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} of cluster {:?}", self.node, self.cluster)
    }
}

const IDENTITY: &[u8] = b"identity";
const HARD_STATE: &[u8] = b"hard_state";
const SNAPSHOT: &[u8] = b"snapshot";
const CHUNK: usize = 1 << 20;

/// Snapshot metadata as stored: which generation of chunks holds the data.
#[derive(Clone, Copy, Debug, Default)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    len: u64,
    generation: u64,
}

impl StoredSnapshot {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&self.meta.index.to_be_bytes());
        out[8..16].copy_from_slice(&self.meta.term.to_be_bytes());
        out[16..24].copy_from_slice(&self.len.to_be_bytes());
        out[24..32].copy_from_slice(&self.generation.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        Some(StoredSnapshot {
            meta: SnapshotMeta {
                index: word(0)?,
                term: word(1)?,
            },
            len: word(2)?,
            generation: word(3)?,
        })
    }
}

fn encode_hard_state(hs: &HardState) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[0..8].copy_from_slice(&hs.term.to_be_bytes());
    out[8..16].copy_from_slice(&hs.vote.unwrap_or(0).to_be_bytes());
    out[16..24].copy_from_slice(&hs.commit.to_be_bytes());
    out
}

fn decode_hard_state(bytes: &[u8]) -> Option<HardState> {
    if bytes.len() != 24 {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Some(HardState {
        term: word(0),
        vote: (word(1) != 0).then(|| word(1)),
        commit: word(2),
    })
}

fn chunk_key(generation: u64, chunk: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[0..8].copy_from_slice(&generation.to_be_bytes());
    key[8..16].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// Open the sled database, waiting briefly if its lock is held: a handle dropped a moment ago in this
/// process releases the lock only when sled's background flusher has stopped. A lock that stays held
/// (another live process) is still an error after the wait.
fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    open_db_within(dir, LOCK_WAIT)
}

/// How long [`open_db`] waits for a held lock. Generous: under a loaded test run the flusher of a
/// dropped handle has been seen to hold the lock for over a second.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn open_db_within(dir: &Path, wait: std::time::Duration) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e)) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Whether sled refused to open because another handle holds the directory's lock. sled reports this
/// as an `Other` error whose text names the lock (the `WouldBlock` of the underlying `flock` is only in
/// the message), so the text is what can be matched.
fn is_lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Raft state in a sled database. See the module documentation for the layout.
pub struct SledStorage {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    log: sled::Tree,
    snapshot_data: sled::Tree,
    snapshot: StoredSnapshot,
    log_bytes: u64,
    /// The generation the next snapshot's chunks get (stored or staged).
    next_generation: u64,
    /// Bytes staged for the snapshot the next `persist` should switch to.
    staged: Option<StagedSnapshot>,
}

impl SledStorage {
    /// Open (or initialise) the data directory of `identity`. A directory initialised for someone else,
    /// or holding data without an identity, is refused rather than reused.
    pub fn open(dir: impl AsRef<Path>, identity: &Identity) -> Result<Self, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        let db = open_db(&dir).map_err(|source| StorageError::Open {
            dir: dir.clone(),
            source,
        })?;
        let io = |source| StorageError::Io {
            dir: dir.clone(),
            source,
        };
        let corrupt = |detail: String| StorageError::Corrupt {
            dir: dir.clone(),
            detail,
        };
        let meta = db.open_tree("raft_meta").map_err(io)?;
        let log = db.open_tree("raft_log").map_err(io)?;
        let snapshot_data = db.open_tree("raft_snapshot").map_err(io)?;
        match meta.get(IDENTITY).map_err(io)? {
            Some(stored) => {
                let found: Identity = serde_json::from_slice(&stored)
                    .map_err(|e| corrupt(format!("unreadable identity record: {e}")))?;
                if &found != identity {
                    return Err(StorageError::WrongIdentity {
                        dir,
                        found: found.to_string(),
                        expected: identity.to_string(),
                    });
                }
            }
            None => {
                if !log.is_empty() || meta.get(HARD_STATE).map_err(io)?.is_some() {
                    return Err(corrupt("raft state without an identity record".into()));
                }
                let record = serde_json::to_vec(identity)
                    .map_err(|e| corrupt(format!("cannot encode identity: {e}")))?;
                meta.insert(IDENTITY, record).map_err(io)?;
                db.flush().map_err(io)?;
            }
        }
        let snapshot = match meta.get(SNAPSHOT).map_err(io)? {
            Some(bytes) => StoredSnapshot::decode(&bytes)
                .ok_or_else(|| corrupt("unreadable snapshot record".into()))?,
            None => StoredSnapshot::default(),
        };
        let mut storage = SledStorage {
            dir,
            db,
            meta,
            log,
            snapshot_data,
            snapshot,
            log_bytes: 0,
            next_generation: snapshot.generation + 1,
            staged: None,
        };
        storage.clean_up()?;
        storage.log_bytes = storage
            .log
            .iter()
            .values()
            .map(|v| v.map(|v| v.len() as u64))
            .sum::<Result<u64, _>>()
            .map_err(|source| storage.io(source))?;
        Ok(storage)
    }

    /// Number of log entries on disk (compaction must keep this bounded).
    pub fn stored_entry_count(&self) -> usize {
        self.log.len()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes sled uses on disk for the whole database.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(|source| self.io(source))
    }

    fn io(&self, source: sled::Error) -> StorageError {
        StorageError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            dir: self.dir.clone(),
            detail: detail.into(),
        }
    }

    /// Remove what an interrupted write may have left: entries the snapshot covers and chunks of other
    /// snapshot generations.
    fn clean_up(&mut self) -> Result<(), StorageError> {
        let covered = self.snapshot.meta.index;
        if covered > 0 {
            self.remove_log_range(..=covered.to_be_bytes())?;
        }
        let generation = self.snapshot.generation;
        let mut batch = sled::Batch::default();
        for key in self.snapshot_data.iter().keys() {
            let key = key.map_err(|source| self.io(source))?;
            if key.len() != 16 || key[0..8] != generation.to_be_bytes() {
                batch.remove(key);
            }
        }
        self.snapshot_data
            .apply_batch(batch)
            .map_err(|source| self.io(source))?;
        self.db.flush().map_err(|source| self.io(source))?;
        Ok(())
    }

    fn remove_log_range(
        &mut self,
        range: impl std::ops::RangeBounds<[u8; 8]>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        let mut freed = 0u64;
        for item in self.log.range(range) {
            let (key, value) = item.map_err(|source| self.io(source))?;
            freed += value.len() as u64;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|source| self.io(source))?;
        self.log_bytes = self.log_bytes.saturating_sub(freed);
        Ok(())
    }

    fn write_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let staged = self.staged.take();
        let generation = match staged {
            Some(s) if s.meta == snapshot.meta && s.len == snapshot.data.len() as u64 => {
                s.generation
            }
            _ => {
                if let Some(stale) = staged {
                    self.remove_generation(stale.generation)?;
                }
                let generation = self.next_generation;
                self.next_generation += 1;
                write_chunks(&self.snapshot_data, generation, &snapshot.data)
                    .map_err(|source| self.io(source))?;
                generation
            }
        };
        let stored = StoredSnapshot {
            meta: snapshot.meta,
            len: snapshot.data.len() as u64,
            generation,
        };
        // The switch to the new generation is a single-key write: atomic.
        self.meta
            .insert(SNAPSHOT, &stored.encode())
            .map_err(|source| self.io(source))?;
        let old = self.snapshot.generation;
        self.snapshot = stored;
        self.remove_generation(old)?;
        self.remove_log_range(..=snapshot.meta.index.to_be_bytes())
    }

    fn remove_generation(&self, generation: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self
            .snapshot_data
            .scan_prefix(generation.to_be_bytes())
            .keys()
        {
            batch.remove(key.map_err(|source| self.io(source))?);
        }
        self.snapshot_data
            .apply_batch(batch)
            .map_err(|source| self.io(source))
    }

    fn read_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        let stored = self.snapshot;
        if stored.meta.index == 0 {
            return Ok(None);
        }
        let mut data = BytesMut::with_capacity(stored.len as usize);
        for item in self
            .snapshot_data
            .scan_prefix(stored.generation.to_be_bytes())
        {
            let (_, chunk) = item.map_err(|source| self.io(source))?;
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 != stored.len {
            return Err(self.corrupt(format!(
                "snapshot at index {} should have {} bytes, found {}",
                stored.meta.index,
                stored.len,
                data.len()
            )));
        }
        Ok(Some(Snapshot {
            meta: stored.meta,
            data: data.freeze(),
        }))
    }
}

impl Storage for SledStorage {
    fn load(&self) -> Result<PersistedState, StorageError> {
        let hard_state = match self.meta.get(HARD_STATE).map_err(|s| self.io(s))? {
            Some(bytes) => {
                decode_hard_state(&bytes).ok_or_else(|| self.corrupt("unreadable hard state"))?
            }
            None => HardState::default(),
        };
        let snapshot = self.read_snapshot()?;
        let mut entries = Vec::new();
        for (expected, item) in (self.snapshot.meta.index + 1..).zip(self.log.iter()) {
            let (key, value) = item.map_err(|s| self.io(s))?;
            let entry = pb::Entry::decode(value.as_ref())
                .map_err(|e| self.corrupt(format!("unreadable log entry: {e}")))
                .and_then(|e| entry_from_proto(e).map_err(|e| self.corrupt(e.to_string())))?;
            if key.as_ref() != entry.index.to_be_bytes() || entry.index != expected {
                return Err(self.corrupt(format!(
                    "log has a gap or a misplaced entry: expected index {expected}, found {}",
                    entry.index
                )));
            }
            entries.push(entry);
        }
        Ok(PersistedState {
            hard_state,
            snapshot,
            entries,
        })
    }

    fn persist(&mut self, ready: &Ready) -> Result<(), StorageError> {
        if !ready.must_persist() {
            return Ok(());
        }
        if let Some(snapshot) = &ready.snapshot {
            self.write_snapshot(snapshot)?;
        }
        if let Some(write) = &ready.log_write {
            let mut batch = sled::Batch::default();
            let mut freed = 0u64;
            for item in self.log.range(write.from.to_be_bytes()..) {
                let (key, value) = item.map_err(|s| self.io(s))?;
                freed += value.len() as u64;
                batch.remove(key);
            }
            let mut added = 0u64;
            for entry in &write.entries {
                let value = entry_to_proto(entry).encode_to_vec();
                added += value.len() as u64;
                batch.insert(&entry.index.to_be_bytes(), value);
            }
            self.log.apply_batch(batch).map_err(|s| self.io(s))?;
            self.log_bytes = self.log_bytes.saturating_sub(freed) + added;
        }
        if let Some(hard_state) = &ready.hard_state {
            self.meta
                .insert(HARD_STATE, &encode_hard_state(hard_state))
                .map_err(|s| self.io(s))?;
        }
        self.db.flush().map_err(|s| self.io(s))?;
        Ok(())
    }

    fn raft_state_size(&self) -> u64 {
        self.log_bytes + 24
    }

    fn snapshot_size(&self) -> u64 {
        self.snapshot.len
    }

    fn snapshot_stager(&mut self) -> Option<Box<dyn SnapshotStager>> {
        let generation = self.next_generation;
        self.next_generation += 1;
        Some(Box::new(SledStager {
            dir: self.dir.clone(),
            db: self.db.clone(),
            snapshot_data: self.snapshot_data.clone(),
            generation,
        }))
    }

    fn offer_staged(&mut self, staged: StagedSnapshot) -> Result<(), StorageError> {
        if let Some(older) = self.staged.replace(staged) {
            self.remove_generation(older.generation)?;
        }
        Ok(())
    }

    fn discard_staged(&mut self, staged: StagedSnapshot) -> Result<(), StorageError> {
        self.remove_generation(staged.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryKind, Index, LogWrite};
    use bytes::Bytes;

    fn identity(node: NodeId) -> Identity {
        Identity {
            cluster: "test".into(),
            node,
        }
    }

    fn entry(index: Index, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![index as u8; 100]),
        }
    }

    fn write(from: Index, entries: Vec<Entry>) -> Ready {
        Ready {
            log_write: Some(LogWrite { from, entries }),
            ..Default::default()
        }
    }

    #[test]
    fn opening_waits_for_a_lock_being_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = SledStorage::open(dir.path(), &identity(1)).expect("open");
        // While the first handle lives, the directory is locked: a short wait ends in a clear error.
        let held = open_db_within(dir.path(), std::time::Duration::from_millis(50))
            .err()
            .map(|e| e.to_string());
        assert!(
            held.as_deref()
                .is_some_and(|e| e.contains("could not acquire lock")),
            "a held lock must be refused, got {held:?}"
        );
        // Released a little later (as sled's flusher does after a drop): the reopen waits for it.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let reopened = SledStorage::open(dir.path(), &identity(1));
        releaser.join().expect("releaser");
        assert!(reopened.is_ok(), "reopen failed: {:?}", reopened.err());
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
            s.persist(&write(1, (1..=5).map(|i| entry(i, 1)).collect()))
                .expect("persist");
            s.persist(&Ready {
                hard_state: Some(HardState {
                    term: 3,
                    vote: Some(2),
                    commit: 4,
                }),
                ..write(4, vec![entry(4, 3)])
            })
            .expect("persist");
        }
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(state.hard_state.vote, Some(2));
        assert_eq!(state.hard_state.term, 3);
        assert_eq!(state.entries.len(), 4);
        assert_eq!(state.entries[3].term, 3);
    }

    #[test]
    fn snapshots_replace_the_covered_log_on_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(1, (1..=10).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        let data = Bytes::from(vec![9u8; 3 * CHUNK + 17]);
        s.persist(&Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta { index: 7, term: 1 },
                data: data.clone(),
            }),
            ..Default::default()
        })
        .expect("persist");
        assert_eq!(s.stored_entry_count(), 3);
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(
            state.snapshot.map(|s| (s.meta.index, s.data)),
            Some((7, data))
        );
        assert_eq!(state.entries.first().map(|e| e.index), Some(8));
    }

    #[test]
    fn a_staged_snapshot_is_written_once_and_a_crash_before_it_is_adopted_leaves_the_old_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(1, (1..=10).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        let first = Snapshot {
            meta: SnapshotMeta { index: 4, term: 1 },
            data: Bytes::from(vec![4u8; 2 * CHUNK + 5]),
        };
        // Staged on another thread, as the driver does, then adopted by the persist of that snapshot.
        let stager = s.snapshot_stager().expect("sled stages");
        let staged = std::thread::spawn({
            let first = first.clone();
            move || stager.stage(&first)
        })
        .join()
        .expect("stager thread")
        .expect("stage");
        s.offer_staged(staged).expect("offer");
        let chunks_before = s.snapshot_data.len();
        s.persist(&Ready {
            snapshot: Some(first.clone()),
            ..Default::default()
        })
        .expect("persist");
        assert_eq!(
            s.snapshot_data.len(),
            chunks_before,
            "no chunk written twice"
        );
        assert_eq!(s.stored_entry_count(), 6);
        // A second snapshot staged but never adopted (the process died first).
        let stager = s.snapshot_stager().expect("sled stages");
        stager
            .stage(&Snapshot {
                meta: SnapshotMeta { index: 8, term: 1 },
                data: Bytes::from(vec![8u8; CHUNK + 1]),
            })
            .expect("stage");
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(
            state.snapshot.map(|s| (s.meta, s.data)),
            Some((first.meta, first.data))
        );
        assert_eq!(s.snapshot_data.len(), 3, "the orphaned chunks are gone");
    }

    #[test]
    fn a_directory_of_another_node_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(SledStorage::open(dir.path(), &identity(1)).expect("open"));
        let err = SledStorage::open(dir.path(), &identity(2))
            .err()
            .expect("must refuse");
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("node 1"), "{message}");
    }

    #[test]
    fn a_corrupt_directory_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(SledStorage::open(dir.path(), &identity(1)).expect("open"));
        // Scribble over every file sled wrote.
        for file in walk(dir.path()) {
            std::fs::write(&file, b"garbage garbage garbage").expect("overwrite");
        }
        let err = SledStorage::open(dir.path(), &identity(1))
            .err()
            .expect("must refuse");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for item in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = item.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
