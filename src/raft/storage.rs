//! Durable Raft state: the [`Storage`] trait the node driver persists through, and its sled implementation.
//!
//! # Layout in sled
//!
//! One sled database per node data directory, with three trees:
//! - `raft_meta`: `identity` (cluster name and node id, JSON), `hard_state` (term, vote, commit) and
//!   `snapshot` (index, term, length and the generation its data is stored under);
//! - `raft_log`: one entry per key, the key the big-endian index so that sled's order is log order;
//! - `raft_snapshot`: snapshot data in 1 MiB chunks keyed by (generation, chunk number) — the format of
//!   earlier versions, still read; new snapshots are files (below).
//!
//! Snapshot data lives in `raft-snapshots/<generation>.snap` beside the database, written and fsynced
//! on its own: flushing hundreds of MiB through sled would hold up every small log flush behind it (sled
//! flushes the whole database at once), stalling the Raft loop that waits for them. For the same reason
//! a log entry over [`VALUE_LOG_MIN_BYTES`] is stored in `raft-values/` ([`super::value_log`]) and sled
//! holds a pointer to it.
//!
//! Large files (old snapshots, value files a snapshot covers) are removed by a background thread a few
//! MiB at a time, and only after the snapshot that makes them garbage is flushed.
//!
//! # Crash consistency
//!
//! [`Storage::persist`] writes in the order of the driver contract and is durable before returning: the
//! log write and hard state go to the journal (`raft-journal`, [`super::journal`]) in one synced record,
//! then to sled unflushed (by a background writer, [`super::sled_writer`]); opening the directory
//! replays the journal into sled, so each persist is atomic. A persist that carries a snapshot switches
//! to it in sled, drains the writer without the entries it covers, flushes sled and starts the journal
//! over; a crash before that flush replays the whole journal over the old snapshot or the new one
//! (sled may have flushed the switch on its own), and either way the log above the snapshot in force
//! comes back whole, the covered entries replayed being garbage. A new snapshot's data goes under a fresh generation before the metadata
//! points at it, so a crash leaves either the old snapshot or the new one, never a mix; leftovers of other
//! generations and entries the snapshot covers are cleaned up when the directory is next opened.

use super::journal::{Journal, JournalBatch};
use super::membership::Membership;
use super::sled_writer::{Drained, SledWriter, HARD_STATE, WRITE_BEHIND_JOURNAL_BYTES};
use super::types::{HardState, NodeId, PersistedState, Snapshot, SnapshotMeta};
use super::value_log::{trickle_remove, Pointer, ValueLog, VALUE_LOG_MIN_BYTES};
use super::wire::{entry_from_proto, entry_to_proto};
use super::Ready;
use crate::proto::raft as pb;
use bytes::BytesMut;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;
use tracing::warn;

/// Where a node keeps what it must not forget.
pub trait Storage: Send + 'static {
    /// Everything persisted, for [`crate::raft::RaftCore::restore`].
    fn load(&self) -> Result<PersistedState, StorageError>;
    /// Persist the snapshot, log write and hard state of `ready`, durably, before returning.
    fn persist(&mut self, ready: &Ready) -> Result<(), StorageError>;
    /// Whether persisting `ready` is certainly short: a small write and a flush, never a longer step
    /// (a snapshot, a checkpoint). Only such a persist may hold up the runtime's only thread (see
    /// `flush_place` in `node.rs`); a storage that cannot tell says no.
    fn persist_is_short(&self, _ready: &Ready) -> bool {
        false
    }
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

/// [`SnapshotStager`] of [`SledStorage`]: a snapshot file of a generation of its own.
struct SledStager {
    dir: PathBuf,
    generation: u64,
}

impl SnapshotStager for SledStager {
    fn stage(self: Box<Self>, snapshot: &Snapshot) -> Result<StagedSnapshot, StorageError> {
        write_snapshot_file(&self.dir, self.generation, &snapshot.data, true).map_err(|e| {
            StorageError::Io {
                dir: self.dir.clone(),
                source: sled::Error::Io(e),
            }
        })?;
        Ok(StagedSnapshot {
            meta: snapshot.meta,
            len: snapshot.data.len() as u64,
            generation: self.generation,
        })
    }
}

/// The background deleters: one thread for covered log keys, one for garbage files, so a slow file
/// removal never holds up key deletion or the other way round.
struct Reaper {
    /// Covered log keys, each with the bytes its sled value holds.
    keys: std::sync::mpsc::Sender<Vec<(u64, u64)>>,
    /// Files nothing durable refers to any more.
    files: std::sync::mpsc::Sender<Vec<PathBuf>>,
}

/// Start the reaper threads. Covered log entries are deleted in batches of at most [`REAP_BATCH_KEYS`]
/// keys and [`REAP_BATCH_BYTES`] bytes with a pause between, so no single sled flush of the Raft loop
/// has to carry the deletion of hundreds of MiB, yet a log of small entries is deleted far faster than
/// any client can write it; garbage files are removed a few MiB at a time ([`trickle_remove`]). Both
/// end when their storage is dropped (after finishing what they were given).
fn spawn_reaper(log: sled::Tree) -> Reaper {
    let (keys, key_work) = std::sync::mpsc::channel::<Vec<(u64, u64)>>();
    let (files, file_work) = std::sync::mpsc::channel::<Vec<PathBuf>>();
    let started = std::thread::Builder::new()
        .name("raft-log-reaper".into())
        .spawn(move || reap_keys(&log, &key_work))
        .and_then(|_| {
            std::thread::Builder::new()
                .name("raft-file-reaper".into())
                .spawn(move || reap_files(&file_work))
        });
    if let Err(e) = started {
        warn!(error = %e, "cannot start the log reaper; garbage waits for the next open");
    }
    Reaper { keys, files }
}

/// Most keys, and most bytes of sled values, one reaper batch deletes; and the pause after each.
const REAP_BATCH_KEYS: usize = 1024;
const REAP_BATCH_BYTES: u64 = 8 << 20;
const REAP_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

fn reap_keys(log: &sled::Tree, work: &std::sync::mpsc::Receiver<Vec<(u64, u64)>>) {
    for covered in work {
        let mut rest = covered.as_slice();
        while !rest.is_empty() {
            let mut bytes = 0;
            let take = rest
                .iter()
                .take(REAP_BATCH_KEYS)
                .take_while(|&&(_, size)| {
                    bytes += size;
                    bytes <= REAP_BATCH_BYTES
                })
                .count()
                .max(1);
            let (now, later) = rest.split_at(take.min(rest.len()));
            let mut batch = sled::Batch::default();
            for (index, _) in now {
                batch.remove(&index.to_be_bytes());
            }
            if let Err(e) = log.apply_batch(batch) {
                warn!(error = %e, "cannot delete covered log entries; the next open will");
                break;
            }
            rest = later;
            std::thread::sleep(REAP_PAUSE);
        }
    }
}

fn reap_files(work: &std::sync::mpsc::Receiver<Vec<PathBuf>>) {
    for paths in work {
        for path in paths {
            if let Err(e) = trickle_remove(&path) {
                warn!(file = %path.display(), error = %e, "cannot remove; the next open will");
            }
        }
    }
}

/// The bytes sled holds for a stored entry of `bytes`: a pointer's for one in the value log. What
/// the reaper paces its deletions by.
fn in_sled_bytes(bytes: u64) -> u64 {
    if bytes > VALUE_LOG_MIN_BYTES as u64 {
        Pointer::BYTES as u64
    } else {
        bytes
    }
}

/// Where snapshot files live in a data directory.
fn snapshot_dir(dir: &Path) -> PathBuf {
    dir.join("raft-snapshots")
}

fn snapshot_file(dir: &Path, generation: u64) -> PathBuf {
    snapshot_dir(dir).join(format!("{generation:020}.snap"))
}

/// Bytes of a snapshot file written between two syncs. Hundreds of MiB of dirty pages flushed at once
/// would make every log fsync on the same disk wait behind them (a client's write would stall for the
/// whole snapshot); synced piece by piece, a log fsync waits for one piece at most.
const SNAPSHOT_SYNC_BYTES: usize = 4 << 20;

/// The pace a staged snapshot is written at, at most (bytes per second): a background write, it leaves
/// the disk and the CPU to the log and the clients (TiKV rate-limits snapshot I/O for the same reason).
const SNAPSHOT_WRITE_BYTES_PER_SEC: u64 = 128 << 20;

/// Bytes of the CRC-32 after a snapshot file's data.
const SNAPSHOT_CRC_BYTES: u64 = 4;

/// Write `data`, then its CRC-32, and fsync the file of `generation` (and its directory entry).
/// Nothing refers to it until the metadata switches to that generation, so a crash midway leaves
/// only an unreferenced file. `paced`: in the background, at most [`SNAPSHOT_WRITE_BYTES_PER_SEC`].
fn write_snapshot_file(
    dir: &Path,
    generation: u64,
    data: &[u8],
    paced: bool,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let folder = snapshot_dir(dir);
    std::fs::create_dir_all(&folder)?;
    let mut file = std::fs::File::create(snapshot_file(dir, generation))?;
    let started = std::time::Instant::now();
    let mut written = 0u64;
    let mut crc = crc32fast::Hasher::new();
    for piece in data.chunks(SNAPSHOT_SYNC_BYTES) {
        crc.update(piece);
        file.write_all(piece)?;
        file.sync_data()?;
        written += piece.len() as u64;
        if paced {
            let due = std::time::Duration::from_secs_f64(
                written as f64 / SNAPSHOT_WRITE_BYTES_PER_SEC as f64,
            );
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    file.write_all(&crc.finalize().to_be_bytes())?;
    file.sync_all()?;
    std::fs::File::open(&folder)?.sync_all()
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
    /// A restore was asked for into a directory that already holds other state.
    #[error(
        "raft data dir {dir} already holds {detail}; a restore starts only an empty directory \
         (start without --restore to keep that state, or give an empty directory)"
    )]
    Occupied {
        /// The data directory.
        dir: PathBuf,
        /// What it holds.
        detail: String,
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
const SNAPSHOT: &[u8] = b"snapshot";
/// Which backup a directory was seeded from ([`SledStorage::seed`]).
const RESTORED_FROM: &[u8] = b"restored_from";
/// The restore tag a node that joined a restored group took from it ([`SledStorage::adopt_restore_tag`]).
const RESTORE_TAG: &[u8] = b"restore_tag";

/// The tag of a restore from the backup `origin`: its CRC-32 in hex.
pub fn restore_tag_of(origin: &str) -> String {
    format!("{:08x}", crc32fast::hash(origin.as_bytes()))
}

/// Whether `tag` is one [`restore_tag_of`] makes.
pub fn is_restore_tag(tag: &str) -> bool {
    tag.len() == 8 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What [`SledStorage::seed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seeded {
    /// The empty directory now starts from the backup.
    Restored,
    /// The directory was seeded from this very backup before (a daemon restarted with the same
    /// `--restore`): nothing was changed, it starts from what it holds now.
    AlreadyRestored,
}
/// Chunk size of the snapshot format earlier versions wrote into the `raft_snapshot` tree.
#[cfg(test)]
const CHUNK: usize = 1 << 20;

/// Snapshot metadata as stored: which generation of chunks holds the data, and the group's
/// configuration at its index.
#[derive(Clone, Debug, Default)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    len: u64,
    generation: u64,
    /// Absent from records written before membership changes (32 bytes long).
    membership: Option<Membership>,
}

impl StoredSnapshot {
    /// Four big-endian words, then the configuration as a protobuf `Membership`, if any.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&self.meta.index.to_be_bytes());
        out.extend_from_slice(&self.meta.term.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.generation.to_be_bytes());
        if let Some(membership) = &self.membership {
            out.extend_from_slice(&membership.encode());
        }
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
            membership: match bytes.get(32..) {
                Some(rest) if !rest.is_empty() => Some(Membership::decode(rest).ok()?),
                _ => None,
            },
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

#[cfg(test)]
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
    /// Encoded size of every stored entry by index: log truncation and compaction remove keys and
    /// account bytes without reading the (possibly large) values back from disk.
    entry_sizes: BTreeMap<u64, u64>,
    /// Deletes log entries a snapshot covers and garbage files, in the background.
    reaper: Reaper,
    /// Large entries' bytes.
    values: ValueLog,
    /// Files that become garbage once the next flush makes the snapshot replacing them durable.
    doomed: Vec<PathBuf>,
    /// The generation the next snapshot's chunks get (stored or staged).
    next_generation: u64,
    /// Bytes staged for the snapshot the next `persist` should switch to.
    staged: Option<StagedSnapshot>,
    /// What sled holds (or is about to) but may not have flushed yet.
    journal: Journal,
    /// Applies journaled persists to sled off the Raft thread.
    writer: SledWriter,
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
        let (snapshot_index, next_generation) = (snapshot.meta.index, snapshot.generation + 1);
        let (mut journal, replay) = Journal::open(&dir.join("raft-journal"))
            .map_err(|e| corrupt(format!("journal raft-journal: {e}")))?;
        super::sled_writer::replay(&log, &meta, replay).map_err(io)?;
        db.flush().map_err(io)?;
        journal.start_over().map_err(|e| io(sled::Error::Io(e)))?;
        let reaper = spawn_reaper(log.clone());
        let writer =
            SledWriter::start(log.clone(), meta.clone()).map_err(|e| io(sled::Error::Io(e)))?;
        let values = ValueLog::open(dir.join("raft-values")).map_err(|e| io(sled::Error::Io(e)))?;
        let mut storage = SledStorage {
            dir,
            db,
            meta,
            log,
            snapshot_data,
            snapshot,
            log_bytes: 0,
            entry_sizes: BTreeMap::new(),
            reaper,
            values,
            doomed: Vec::new(),
            next_generation,
            staged: None,
            journal,
            writer,
        };
        for item in storage.log.iter() {
            let (key, value) = item.map_err(|source| storage.io(source))?;
            let index = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| storage.corrupt(format!("log key of {} bytes", key.len())))?;
            let bytes = match Pointer::decode(&value) {
                Some(pointer) => {
                    if index > snapshot_index {
                        storage.values.note_live(&pointer, index);
                    }
                    u64::from(pointer.len)
                }
                None => value.len() as u64,
            };
            storage.entry_sizes.insert(index, bytes);
        }
        storage.log_bytes = storage.entry_sizes.values().sum();
        storage.clean_up()?;
        Ok(storage)
    }

    /// Seed an empty data directory of `identity` with `snapshot` (from a backup named `origin`), as
    /// the state every member of a new cluster starts from: the snapshot, and a hard state at its term
    /// whose commit index is the snapshot's. The record of `origin` is written only after those are
    /// flushed, so a daemon restarted with the same `--restore` starts normally, a seeding cut short
    /// by a crash is refused on the next start (never taken for a finished one), and a directory
    /// holding anything else is refused ([`StorageError::Occupied`]), never overwritten.
    pub fn seed(
        dir: impl AsRef<Path>,
        identity: &Identity,
        snapshot: Snapshot,
        origin: &str,
    ) -> Result<Seeded, StorageError> {
        let mut storage = SledStorage::open(dir, identity)?;
        let restored = storage.meta.get(RESTORED_FROM).map_err(|s| storage.io(s))?;
        if restored.as_deref() == Some(origin.as_bytes()) {
            return Ok(Seeded::AlreadyRestored);
        }
        let hard_state = storage.meta.get(HARD_STATE).map_err(|s| storage.io(s))?;
        let detail = match (&restored, &hard_state) {
            (Some(other), _) => Some(format!(
                "the state restored from another backup ({})",
                String::from_utf8_lossy(other)
            )),
            (None, Some(_)) => Some(
                "the raft state of a running or stopped node (if a restore into it was \
                 interrupted, empty it and start again)"
                    .into(),
            ),
            (None, None) if storage.snapshot.meta.index > 0 || !storage.log.is_empty() => Some(
                "raft log entries or a snapshot (if a restore into it was interrupted, empty it \
                 and start again)"
                    .into(),
            ),
            (None, None) => None,
        };
        if let Some(detail) = detail {
            return Err(StorageError::Occupied {
                dir: storage.dir.clone(),
                detail,
            });
        }
        let ready = Ready {
            hard_state: Some(HardState {
                term: snapshot.meta.term,
                vote: None,
                commit: snapshot.meta.index,
            }),
            snapshot: Some(snapshot),
            ..Ready::default()
        };
        storage.persist(&ready)?;
        // Last, in a flush of its own: sled may write any insert to disk at any moment, so a record
        // inserted earlier could be on disk before the snapshot it names.
        storage
            .meta
            .insert(RESTORED_FROM, origin.as_bytes())
            .map_err(|s| storage.io(s))?;
        storage.db.flush().map_err(|s| storage.io(s))?;
        Ok(Seeded::Restored)
    }

    /// Whether this directory holds no Raft state at all (no hard state, entry or snapshot): a node
    /// started on it has never been part of a group, or lost everything it had.
    pub fn is_fresh(&self) -> Result<bool, StorageError> {
        self.writer.drain(0).map_err(|e| self.writer_failed(e))?;
        let hard_state = self.meta.get(HARD_STATE).map_err(|s| self.io(s))?;
        Ok(hard_state.is_none() && self.log.is_empty() && self.snapshot.meta.index == 0)
    }

    /// The backup this directory was seeded from ([`SledStorage::seed`]), if any.
    pub fn restored_from(&self) -> Result<Option<String>, StorageError> {
        let record = self.meta.get(RESTORED_FROM).map_err(|s| self.io(s))?;
        Ok(record.map(|r| String::from_utf8_lossy(&r).into_owned()))
    }

    /// The tag of the backup this node's group was restored from, carried in the cluster id on the
    /// wire: from the backup this directory was seeded from, or taken from the group it joined.
    pub fn restore_tag(&self) -> Result<Option<String>, StorageError> {
        if let Some(origin) = self.restored_from()? {
            return Ok(Some(restore_tag_of(&origin)));
        }
        let tag = self.meta.get(RESTORE_TAG).map_err(|s| self.io(s))?;
        Ok(tag.map(|t| String::from_utf8_lossy(&t).into_owned()))
    }

    /// Keeps `tag` (see [`SledStorage::restore_tag`]) for a node joining a group, or forgets any
    /// (`None`: the group it joins was not restored), flushed: its restarts must carry it before they
    /// hear from the group again. The caller checks it with [`is_restore_tag`] (it comes from the
    /// network and goes into every message).
    pub fn set_restore_tag(&mut self, tag: Option<&str>) -> Result<(), StorageError> {
        match tag {
            Some(tag) => self.meta.insert(RESTORE_TAG, tag.as_bytes()).map(|_| ()),
            None => self.meta.remove(RESTORE_TAG).map(|_| ()),
        }
        .map_err(|s| self.io(s))?;
        self.db.flush().map_err(|s| self.io(s))?;
        Ok(())
    }

    /// Number of log entries on disk that no snapshot covers (compaction must keep this bounded;
    /// covered ones are deleted in the background and at the next open).
    pub fn stored_entry_count(&self) -> usize {
        self.entry_sizes.len()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes sled uses on disk for the whole database.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(|source| self.io(source))
    }

    /// Hand garbage files to the reaper (removed at the next open if it is gone).
    fn reap_files(&self, files: Vec<PathBuf>) {
        if !files.is_empty() && self.reaper.files.send(files).is_err() {
            warn!(dir = %self.dir.display(), "log reaper gone; garbage files wait for the next open");
        }
    }

    /// Make sled hold everything journaled, durably, except the entries through `covered` (a
    /// snapshot whose switch is in sled replaces them; 0 for none), and start the journal over.
    fn checkpoint(&mut self, covered: u64) -> Result<Drained, StorageError> {
        let drained = self
            .writer
            .drain(covered)
            .map_err(|e| self.writer_failed(e))?;
        self.db.flush().map_err(|s| self.io(s))?;
        self.journal
            .start_over()
            .map_err(|e| self.io(sled::Error::Io(e)))?;
        Ok(drained)
    }

    fn writer_failed(&self, error: String) -> StorageError {
        self.io(sled::Error::Io(std::io::Error::other(format!(
            "applying journaled writes to sled: {error}"
        ))))
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
            self.remove_log_through(covered)?;
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
        let current = snapshot_file(&self.dir, generation);
        let mut garbage = Vec::new();
        if let Ok(files) = std::fs::read_dir(snapshot_dir(&self.dir)) {
            garbage.extend(
                files
                    .flatten()
                    .map(|file| file.path())
                    .filter(|path| *path != current),
            );
        }
        garbage.extend(
            self.values
                .unreferenced()
                .map_err(|e| self.io(sled::Error::Io(e)))?,
        );
        self.db.flush().map_err(|source| self.io(source))?;
        for path in garbage {
            trickle_remove(&path).map_err(|e| self.io(sled::Error::Io(e)))?;
        }
        Ok(())
    }

    /// Remove the stored entries up to and including `index` (at once: at open).
    fn remove_log_through(&mut self, index: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for i in self.forget_log_through(index).into_keys() {
            batch.remove(&i.to_be_bytes());
        }
        self.log
            .apply_batch(batch)
            .map_err(|source| self.io(source))
    }

    /// Stop counting the entries up to and including `index` (a snapshot covers them) and return them
    /// with their sizes. Only a split: a snapshot's persist needs the few the reaper must delete
    /// (see [`in_sled_bytes`]), not a list of the tens of thousands it covers.
    fn forget_log_through(&mut self, index: u64) -> BTreeMap<u64, u64> {
        let kept = self.entry_sizes.split_off(&index.saturating_add(1));
        let removed = std::mem::replace(&mut self.entry_sizes, kept);
        let bytes: u64 = removed.values().sum();
        self.log_bytes = self.log_bytes.saturating_sub(bytes);
        removed
    }

    /// Store `snapshot` and switch to it (in sled, unflushed); returns the stored entries it covers,
    /// for the reaper once the writer has drained.
    fn write_snapshot(&mut self, snapshot: &Snapshot) -> Result<BTreeMap<u64, u64>, StorageError> {
        let staged = self.staged.take();
        let generation = match staged {
            Some(s) if s.meta == snapshot.meta && s.len == snapshot.data.len() as u64 => {
                s.generation
            }
            _ => {
                if let Some(stale) = staged {
                    self.remove_generation(stale.generation, false)?;
                }
                let generation = self.next_generation;
                self.next_generation += 1;
                write_snapshot_file(&self.dir, generation, &snapshot.data, false)
                    .map_err(|e| self.io(sled::Error::Io(e)))?;
                generation
            }
        };
        let stored = StoredSnapshot {
            meta: snapshot.meta,
            len: snapshot.data.len() as u64,
            generation,
            membership: snapshot.membership.clone(),
        };
        // The switch to the new generation is a single-key write: atomic.
        self.meta
            .insert(SNAPSHOT, stored.encode())
            .map_err(|source| self.io(source))?;
        let old = self.snapshot.generation;
        self.snapshot = stored;
        // The old snapshot is still the durable one until this persist's flush.
        self.remove_generation(old, true)?;
        let covered_files = self.values.covered_through(snapshot.meta.index);
        self.doomed.extend(covered_files);
        Ok(self.forget_log_through(snapshot.meta.index))
    }

    /// Remove the snapshot of `generation`: its file in the background (after the next flush when
    /// `after_flush`, because until then it may still be the durable snapshot), its chunks of an
    /// earlier version's format at once.
    fn remove_generation(
        &mut self,
        generation: u64,
        after_flush: bool,
    ) -> Result<(), StorageError> {
        let file = snapshot_file(&self.dir, generation);
        if after_flush {
            self.doomed.push(file);
        } else {
            self.reap_files(vec![file]);
        }
        // Chunks of a snapshot written by an earlier version.
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
        let stored = &self.snapshot;
        if stored.meta.index == 0 {
            return Ok(None);
        }
        let index = stored.meta.index;
        let mut data = BytesMut::new();
        match std::fs::read(snapshot_file(&self.dir, stored.generation)) {
            Ok(mut bytes) => {
                // The data, then its CRC-32 (files of earlier versions have none): a flipped bit
                // must stop the node, not become a value its peers do not hold.
                if bytes.len() as u64 == stored.len.saturating_add(SNAPSHOT_CRC_BYTES) {
                    let split = bytes.len() - SNAPSHOT_CRC_BYTES as usize;
                    let expected = bytes[split..]
                        .try_into()
                        .map(u32::from_be_bytes)
                        .unwrap_or_default();
                    bytes.truncate(split);
                    if crc32fast::hash(&bytes) != expected {
                        return Err(self.corrupt(format!(
                            "snapshot at index {index}: checksum mismatch in {}",
                            snapshot_file(&self.dir, stored.generation).display()
                        )));
                    }
                }
                if bytes.len() as u64 != stored.len {
                    return Err(self.corrupt(format!(
                        "snapshot at index {index} should have {} bytes, found {}",
                        stored.len,
                        bytes.len()
                    )));
                }
                return Ok(Some(Snapshot {
                    meta: stored.meta,
                    data: bytes::Bytes::from(bytes),
                    membership: stored.membership.clone(),
                }));
            }
            // Written by an earlier version: chunks in the tree.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for item in self
                    .snapshot_data
                    .scan_prefix(stored.generation.to_be_bytes())
                {
                    let (_, chunk) = item.map_err(|source| self.io(source))?;
                    data.extend_from_slice(&chunk);
                }
            }
            Err(e) => return Err(self.io(sled::Error::Io(e))),
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
            membership: stored.membership.clone(),
        }))
    }
}

/// A clean stop leaves sled holding everything and the journal empty (what an older version, which
/// knows no journal, would need to find).
impl Drop for SledStorage {
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint(0) {
            warn!(dir = %self.dir.display(), error = %e, "the journal is replayed at the next open");
        }
    }
}

/// The most bytes of entries [`SledStorage::persist_is_short`] calls short: a 64-client batch of
/// 100-byte values is about 10 KiB.
const SHORT_PERSIST_BYTES: u64 = 256 << 10;

/// More than a journal record adds to its entries' data: its header and fixed fields (a hard state
/// among them), and per entry its key, encoding and lengths.
const RECORD_OVERHEAD: u64 = 64;

/// At least the bytes `persist` appends to the journal for `ready` (entries in the value log take
/// less: a pointer instead of the data).
fn journal_bytes_at_most(ready: &Ready) -> u64 {
    let entries = ready.log_write.as_ref().map_or(0, |write| {
        write
            .entries
            .iter()
            .map(|entry| entry.data.len() as u64 + RECORD_OVERHEAD)
            .sum()
    });
    RECORD_OVERHEAD + entries
}

impl Storage for SledStorage {
    fn load(&self) -> Result<PersistedState, StorageError> {
        self.writer.drain(0).map_err(|e| self.writer_failed(e))?;
        let hard_state = match self.meta.get(HARD_STATE).map_err(|s| self.io(s))? {
            Some(bytes) => {
                decode_hard_state(&bytes).ok_or_else(|| self.corrupt("unreadable hard state"))?
            }
            None => HardState::default(),
        };
        let snapshot = self.read_snapshot()?;
        let mut entries = Vec::new();
        let first = self.snapshot.meta.index + 1;
        for (expected, item) in (first..).zip(self.log.range(first.to_be_bytes()..)) {
            let (key, value) = item.map_err(|s| self.io(s))?;
            let value = match Pointer::decode(&value) {
                Some(pointer) => self.values.read(&pointer).map_err(|e| {
                    self.corrupt(format!("log entry {expected} in the value log: {e}"))
                })?,
                None => value.to_vec(),
            };
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

    /// Short while the write is small and the journal stays under half full with it: one journal
    /// record and one `fdatasync` (two with values in the value log), and the writer only keeps the
    /// batch. From half the journal on the writer applies the batches it kept, and handing it one may
    /// wait for its queue; when the journal is full, or with a snapshot, sled is flushed and the
    /// journal starts over (a checkpoint, which may take hundreds of milliseconds).
    fn persist_is_short(&self, ready: &Ready) -> bool {
        let bytes = journal_bytes_at_most(ready);
        ready.snapshot.is_none()
            && bytes <= SHORT_PERSIST_BYTES
            && self.journal.used() + bytes < WRITE_BEHIND_JOURNAL_BYTES
    }

    fn persist(&mut self, ready: &Ready) -> Result<(), StorageError> {
        if !ready.must_persist() {
            return Ok(());
        }
        // With a snapshot: the switch goes into sled first, then the writer drains without the
        // entries the snapshot covers (most were never written to sled: see `sled_writer`), then
        // sled is flushed and the journal starts over. A crash before that flush replays the whole
        // journal, over the old snapshot or the new one (sled may have flushed the switch on its
        // own): either way the log above the snapshot in force comes back whole, and entries the new
        // one covers are garbage that `load` skips and the next open removes.
        let covered = match &ready.snapshot {
            Some(snapshot) => {
                // A failed writer first: the switch must not change what is stored, in sled or in
                // memory, when this persist fails anyway.
                self.writer.check().map_err(|e| self.writer_failed(e))?;
                Some((snapshot.meta.index, self.write_snapshot(snapshot)?))
            }
            None => None,
        };
        let mut batch = JournalBatch {
            hard_state: ready.hard_state.as_ref().map(encode_hard_state),
            ..JournalBatch::default()
        };
        if let Some(write) = &ready.log_write {
            batch.truncate_from = Some(write.from);
            for (_, &bytes) in self.entry_sizes.range(write.from..) {
                self.log_bytes = self.log_bytes.saturating_sub(bytes);
            }
            self.entry_sizes.split_off(&write.from);
            for entry in &write.entries {
                let value = entry_to_proto(entry).encode_to_vec();
                self.log_bytes += value.len() as u64;
                self.entry_sizes.insert(entry.index, value.len() as u64);
                if value.len() > VALUE_LOG_MIN_BYTES {
                    let pointer = self
                        .values
                        .append(entry.index, &value)
                        .map_err(|e| self.io(sled::Error::Io(e)))?;
                    batch.entries.push((entry.index, pointer.encode().to_vec()));
                } else {
                    batch.entries.push((entry.index, value));
                }
            }
            // The bytes before the pointers: the journal record and sled's own flusher may make a
            // pointer durable any moment.
            self.values
                .sync()
                .map_err(|e| self.io(sled::Error::Io(e)))?;
        }
        if ready.commit_only {
            // Only a commit index, which need not survive a crash: written, not made durable; the
            // next flush (or sled's own) takes it along.
            return self
                .writer
                .submit(batch, self.journal.used())
                .map_err(|e| self.writer_failed(e));
        }
        let journaled = ready.snapshot.is_none()
            && self
                .journal
                .append(&batch)
                .map_err(|e| self.io(sled::Error::Io(e)))?;
        self.writer
            .submit(batch, self.journal.used())
            .map_err(|e| self.writer_failed(e))?;
        if journaled {
            return Ok(());
        }
        // A snapshot (whose switch must be durable before its old files go) or a batch the journal
        // has no room for: flush sled, which then holds everything the journal did.
        let (covered_through, covered) = covered.unwrap_or_default();
        let drained = self.checkpoint(covered_through)?;
        // The covered entries are deleted in the background: deleting hundreds of MiB of values
        // inside this persist kept the Raft loop waiting for it. Until then they are only garbage
        // (`load` reads from the snapshot on, and the next open removes what is left). Only those
        // below where the writer's kept batches began can be in sled at all.
        let covered: Vec<(u64, u64)> = covered
            .range(..drained.keep_from)
            .map(|(&index, &bytes)| (index, in_sled_bytes(bytes)))
            .collect();
        if !covered.is_empty() && self.reaper.keys.send(covered).is_err() {
            warn!(dir = %self.dir.display(), "log reaper gone; covered entries wait for the next open");
        }
        let doomed = std::mem::take(&mut self.doomed);
        self.reap_files(doomed);
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
            generation,
        }))
    }

    fn offer_staged(&mut self, staged: StagedSnapshot) -> Result<(), StorageError> {
        if let Some(older) = self.staged.replace(staged) {
            self.remove_generation(older.generation, false)?;
        }
        Ok(())
    }

    fn discard_staged(&mut self, staged: StagedSnapshot) -> Result<(), StorageError> {
        self.remove_generation(staged.generation, false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::journal::JOURNAL_BYTES;
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

    /// A ready that only installs a snapshot.
    fn snapshot_at(index: Index, term: u64, data: Bytes) -> Ready {
        Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta { index, term },
                data,
                membership: None,
            }),
            ..Default::default()
        }
    }

    /// An entry large enough to go to the value log.
    fn large(index: Index, term: u64) -> Entry {
        Entry {
            data: Bytes::from(vec![(index + term) as u8; 100_000]),
            ..entry(index, term)
        }
    }

    fn value_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = walk(&dir.join("raft-values"));
        files.sort();
        files
    }

    /// A log write of `count` entries of `bytes` each from `from`.
    fn write_of(from: Index, count: u64, bytes: usize) -> Ready {
        let entries = (from..from + count)
            .map(|index| Entry {
                data: Bytes::from(vec![7u8; bytes]),
                ..entry(index, 1)
            })
            .collect();
        write(from, entries)
    }

    #[test]
    fn a_persist_is_short_only_while_small_and_the_journal_stays_under_half_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        assert!(s.persist_is_short(&write(1, vec![entry(1, 1)])));
        assert!(s.persist_is_short(&Ready {
            hard_state: Some(HardState {
                term: 2,
                vote: Some(1),
                commit: 0,
            }),
            ..Ready::default()
        }));
        // A snapshot is a checkpoint.
        let with_snapshot = Ready {
            snapshot: Some(Snapshot::default()),
            ..write(1, vec![entry(1, 1)])
        };
        assert!(!s.persist_is_short(&with_snapshot));
        // A large write takes long to write and sync.
        assert!(!s.persist_is_short(&write_of(1, 1200, 200)));
        // Fill the journal with writes that are short, up to the last one that keeps it under half.
        let mut next = 1;
        for _ in 0..JOURNAL_BYTES / (900 * 200) {
            if !s.persist_is_short(&write_of(next, 900, 200)) {
                break;
            }
            s.persist(&write_of(next, 900, 200)).expect("persist");
            next += 900;
        }
        let used = s.journal.used();
        assert!(
            used < WRITE_BEHIND_JOURNAL_BYTES
                && used + journal_bytes_at_most(&write_of(next, 900, 200))
                    >= WRITE_BEHIND_JOURNAL_BYTES,
            "{used} bytes of journal used"
        );
        // This one would take it to half, where the writer starts applying what it kept (its queue may
        // hold a persist up); past half, and when it is full (a checkpoint), nothing is short.
        s.persist(&write_of(next, 900, 200)).expect("persist");
        next += 900;
        assert!(s.journal.used() >= WRITE_BEHIND_JOURNAL_BYTES);
        assert!(!s.persist_is_short(&write(next, vec![entry(next, 1)])));
    }

    #[test]
    fn the_journal_bound_of_a_persist_covers_what_it_appends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let hard_state = Some(HardState {
            term: u64::MAX,
            vote: Some(u64::MAX),
            commit: u64::MAX,
        });
        let readies = [
            Ready {
                hard_state,
                ..write(1, vec![entry(1, 1)])
            },
            Ready {
                hard_state,
                ..Ready::default()
            },
            write_of(2, 500, 0),
            write_of(502, 100, 200),
            // Kept in the value log: the journal gets a pointer.
            write_of(602, 3, 100_000),
        ];
        for ready in readies {
            let before = s.journal.used();
            s.persist(&ready).expect("persist");
            let appended = s.journal.used() - before;
            assert!(
                appended <= journal_bytes_at_most(&ready),
                "{appended} bytes appended, bound {}",
                journal_bytes_at_most(&ready)
            );
        }
    }

    #[test]
    fn large_entries_live_in_value_files_until_a_snapshot_covers_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let mut mixed: Vec<Entry> = (1..=6).map(|i| large(i, 1)).collect();
        mixed[2] = entry(3, 1);
        s.persist(&write(1, mixed)).expect("persist");
        // A new leader's entries replace the suffix from 5.
        let replaced = vec![large(5, 2), large(6, 2), entry(7, 2)];
        s.persist(&write(5, replaced)).expect("persist");
        assert!(
            s.raft_state_size() > 5 * 100_000,
            "large entries count in full"
        );
        drop(s);
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        let expected: Vec<Entry> = vec![
            large(1, 1),
            large(2, 1),
            entry(3, 1),
            large(4, 1),
            large(5, 2),
            large(6, 2),
            entry(7, 2),
        ];
        assert_eq!(state.entries, expected);
        let before = value_files(dir.path());
        assert_eq!(before.len(), 1, "{before:?}");
        // Bytes written but never pointed at (a crash before sled's batch) are garbage.
        s.values.append(8, &[1u8; 10_000]).expect("append");
        s.values.sync().expect("sync");
        // A snapshot covering everything: the file goes once the snapshot is durable.
        s.persist(&snapshot_at(7, 2, Bytes::from_static(b"state")))
            .expect("persist");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while value_files(dir.path()).iter().any(|f| before.contains(f)) {
            assert!(
                std::time::Instant::now() < deadline,
                "covered value file not removed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        assert!(s.load().expect("load").entries.is_empty());
        assert!(
            value_files(dir.path()).is_empty(),
            "unreferenced value files removed at open"
        );
    }

    /// The reaper deletes covered small entries far faster than clients write them (it used to take 8
    /// keys every 50 ms: a cluster taking 2,000 puts a second fell behind for good, and its data
    /// directory grew to 5 GB in 11 minutes with 20 MiB of state), and old snapshot files go at once,
    /// not after the keys.
    #[test]
    fn covered_entries_and_old_snapshots_are_reaped_promptly() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        const ENTRIES: u64 = 40_000;
        for start in (1..=ENTRIES).step_by(1000) {
            s.persist(&write(
                start,
                (start..start + 1000).map(|i| entry(i, 1)).collect(),
            ))
            .expect("persist");
        }
        let data = Bytes::from(vec![1u8; 1000]);
        s.persist(&snapshot_at(ENTRIES / 2, 1, data.clone()))
            .expect("persist");
        s.persist(&snapshot_at(ENTRIES, 1, data)).expect("persist");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let files = |dir: &Path| std::fs::read_dir(snapshot_dir(dir)).map_or(0, |d| d.count());
        while !s.log.is_empty() || files(dir.path()) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} covered entries and {} snapshot files left after 20 s",
                s.log.len(),
                files(dir.path())
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A snapshot covering entries sled holds (from before the last checkpoint) and entries only kept
    /// since: the reaper is handed the first and deletes them; the second never reached sled.
    #[test]
    fn a_snapshot_reaps_the_covered_entries_in_sled_and_never_writes_the_kept_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let keys = |s: &SledStorage| -> Vec<u64> {
            s.log
                .iter()
                .keys()
                .map(|k| u64::from_be_bytes(k.expect("key").as_ref().try_into().expect("8 bytes")))
                .collect()
        };
        s.persist(&write(1, (1..=1000).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        let data = Bytes::from(vec![1u8; 100]);
        s.persist(&snapshot_at(100, 1, data.clone()))
            .expect("persist");
        assert_eq!(keys(&s), (101..=1000).collect::<Vec<_>>());
        s.persist(&write(1001, (1001..=2000).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        s.persist(&snapshot_at(1500, 1, data)).expect("persist");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while keys(&s) != (1501..=2000).collect::<Vec<_>>() {
            assert!(
                std::time::Instant::now() < deadline,
                "left after 20 s: {} keys from {:?}",
                keys(&s).len(),
                keys(&s).first()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_damaged_value_file_is_reported_as_corruption_with_the_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(1, vec![large(1, 1), large(2, 1)]))
            .expect("persist");
        drop(s);
        for file in value_files(dir.path()) {
            let len = std::fs::metadata(&file).expect("stat").len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .expect("open")
                .set_len(len - 10)
                .expect("truncate");
        }
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let error = s.load().expect_err("a torn value file");
        let message = error.to_string();
        assert!(
            message.contains("corrupt") && message.contains("log entry 2"),
            "{message}"
        );
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

    /// Copy every file of `from` into `to`.
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for item in std::fs::read_dir(from).expect("read dir").flatten() {
            let target = to.join(item.file_name());
            if item.path().is_dir() {
                copy_tree(&item.path(), &target);
            } else {
                std::fs::copy(item.path(), target).expect("copy");
            }
        }
    }

    #[test]
    fn a_crash_right_after_persists_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let crashed = tempfile::tempdir().expect("temp dir");
        {
            let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
            s.persist(&write(1, (1..=20).map(|i| entry(i, 1)).collect()))
                .expect("persist");
        }
        // A crash image: the sled files as a clean stop left them (nothing later flushed) ...
        copy_tree(dir.path(), crashed.path());
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(21, (21..=40).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        s.persist(&write(41, vec![large(41, 1)])).expect("persist");
        // A new leader's suffix replaces the old one's from index 30.
        s.persist(&Ready {
            hard_state: Some(HardState {
                term: 2,
                vote: Some(3),
                commit: 29,
            }),
            ..write(30, (30..=35).map(|i| entry(i, 2)).collect())
        })
        .expect("persist");
        // ... and the journal and value files as these persists left them (written synchronously).
        for durable in ["raft-journal", "raft-values"] {
            let (from, to) = (dir.path().join(durable), crashed.path().join(durable));
            if from.is_dir() {
                copy_tree(&from, &to);
            } else {
                std::fs::copy(&from, &to).expect("copy");
            }
        }
        drop(s);
        let s = SledStorage::open(crashed.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(state.hard_state.term, 2);
        assert_eq!(state.hard_state.vote, Some(3));
        let terms: Vec<(Index, u64)> = state.entries.iter().map(|e| (e.index, e.term)).collect();
        let expected: Vec<(Index, u64)> = (1..=29)
            .map(|i| (i, 1))
            .chain((30..=35).map(|i| (i, 2)))
            .collect();
        assert_eq!(terms, expected);
        // Opened again (the journal started over), the same state.
        drop(s);
        let s = SledStorage::open(crashed.path(), &identity(1)).expect("reopen");
        assert_eq!(s.load().expect("load").entries.len(), 35);
    }

    /// The window the write-behind opens: the switch to a snapshot is in sled and sled flushed it on
    /// its own, but the writer has not drained (the entries are only in the journal) and the journal
    /// has not started over. The log above the snapshot must come back whole from the journal.
    #[test]
    fn a_crash_after_sled_flushed_a_snapshot_switch_but_before_the_drain_loses_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let crashed = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(1, (1..=40).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        let data = Bytes::from(vec![5u8; 1000]);
        let ready = snapshot_at(30, 1, data.clone());
        let snapshot = ready.snapshot.as_ref().expect("a snapshot");
        s.write_snapshot(snapshot).expect("switch");
        s.db.flush().expect("flush");
        copy_tree(dir.path(), crashed.path());
        drop(s);
        let s = SledStorage::open(crashed.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(
            state.snapshot.map(|s| (s.meta.index, s.data)),
            Some((30, data))
        );
        let indexes: Vec<Index> = state.entries.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (31..=40).collect::<Vec<_>>());
        assert_eq!(
            s.log.len(),
            10,
            "replayed covered entries are removed at open"
        );
    }

    /// A snapshot's persist drains the writer without the entries it covers: they never reach sled,
    /// so the reaper is handed none of them either.
    #[test]
    fn entries_a_snapshot_covers_soon_enough_are_never_written_to_sled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let mut writes = s.log.watch_prefix(vec![]);
        for i in 1..=40 {
            s.persist(&write(i, vec![entry(i, 1)])).expect("persist");
        }
        s.persist(&snapshot_at(30, 1, Bytes::from(vec![5u8; 10])))
            .expect("persist");
        assert_eq!(
            crate::raft::sled_writer::tests::inserted(&mut writes),
            (31..=40).collect::<Vec<_>>()
        );
        assert_eq!(s.log.len(), 10);
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let indexes: Vec<Index> = s
            .load()
            .expect("load")
            .entries
            .iter()
            .map(|e| e.index)
            .collect();
        assert_eq!(indexes, (31..=40).collect::<Vec<_>>());
    }

    #[test]
    fn snapshots_replace_the_covered_log_on_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        s.persist(&write(1, (1..=10).map(|i| entry(i, 1)).collect()))
            .expect("persist");
        let data = Bytes::from(vec![9u8; 3 * CHUNK + 17]);
        s.persist(&snapshot_at(7, 1, data.clone()))
            .expect("persist");
        assert_eq!(s.stored_entry_count(), 3);
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        assert_eq!(s.log.len(), 3, "covered entries are gone from disk");
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
            membership: None,
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
        let files = |dir: &Path| std::fs::read_dir(snapshot_dir(dir)).map_or(0, |d| d.count());
        assert_eq!(files(dir.path()), 1);
        s.persist(&Ready {
            snapshot: Some(first.clone()),
            ..Default::default()
        })
        .expect("persist");
        assert_eq!(files(dir.path()), 1, "the staged file is the snapshot");
        assert_eq!(s.stored_entry_count(), 6);
        // A second snapshot staged but never adopted (the process died first).
        let stager = s.snapshot_stager().expect("sled stages");
        stager
            .stage(&Snapshot {
                meta: SnapshotMeta { index: 8, term: 1 },
                data: Bytes::from(vec![8u8; CHUNK + 1]),
                membership: None,
            })
            .expect("stage");
        drop(s);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(
            state.snapshot.map(|s| (s.meta, s.data)),
            Some((first.meta, first.data))
        );
        assert_eq!(files(dir.path()), 1, "the orphaned file is gone");
    }

    /// The journal and the value log are checksummed; so is the snapshot file: a flipped bit in it
    /// stops the node at open, instead of becoming a value its peers do not hold (and that, as
    /// leader, it would send them). A file of an earlier version, without the checksum, still loads.
    #[test]
    fn a_flipped_bit_in_the_snapshot_file_is_refused_at_load() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let data = Bytes::from(vec![3u8; 10_000]);
        s.persist(&snapshot_at(9, 2, data.clone()))
            .expect("persist");
        drop(s);
        let files = walk(&snapshot_dir(dir.path()));
        assert_eq!(files.len(), 1, "{files:?}");
        let pristine = std::fs::read(&files[0]).expect("read");
        assert_eq!(pristine.len(), data.len() + SNAPSHOT_CRC_BYTES as usize);

        let mut flipped = pristine.clone();
        flipped[5_000] ^= 0x10;
        std::fs::write(&files[0], &flipped).expect("write");
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let err = s
            .load()
            .expect_err("a flipped bit must not load")
            .to_string();
        assert!(err.contains("checksum"), "{err}");
        drop(s);

        // Without the checksum (an earlier version's file): loads as before.
        std::fs::write(&files[0], &pristine[..data.len()]).expect("write");
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let loaded = s.load().expect("load").snapshot.expect("snapshot");
        assert_eq!(loaded.data, data);
        drop(s);
        // Cut short: refused.
        std::fs::write(&files[0], &pristine[..100]).expect("write");
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        assert!(s.load().is_err());
    }

    #[test]
    fn a_snapshot_stored_in_chunks_by_an_earlier_version_still_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        let data = vec![7u8; 2 * CHUNK + 3];
        for (n, chunk) in data.chunks(CHUNK).enumerate() {
            s.snapshot_data
                .insert(chunk_key(1, n as u64), chunk)
                .expect("chunk");
        }
        let stored = StoredSnapshot {
            meta: SnapshotMeta { index: 5, term: 2 },
            len: data.len() as u64,
            generation: 1,
            membership: None,
        };
        s.meta.insert(SNAPSHOT, stored.encode()).expect("meta");
        s.db.flush().expect("flush");
        drop(s);
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let loaded = s.load().expect("load").snapshot.expect("snapshot");
        assert_eq!((loaded.meta, loaded.data.len()), (stored.meta, data.len()));
        // The next snapshot is a file, and the old chunks go.
        s.persist(&snapshot_at(9, 2, Bytes::from_static(b"newer")))
            .expect("persist");
        assert!(s.snapshot_data.is_empty());
    }

    /// A node joining a restored group keeps the group's tag across restarts; one that then joins a
    /// group never restored forgets it; a directory seeded from a backup goes by that backup.
    #[test]
    fn a_joined_nodes_restore_tag_is_kept_forgotten_and_outranked_by_its_own_backup() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("open");
        assert_eq!(s.restore_tag().expect("tag"), None);
        s.set_restore_tag(Some("0badc0de")).expect("set");
        drop(s);
        let mut s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        assert_eq!(s.restore_tag().expect("tag").as_deref(), Some("0badc0de"));
        s.set_restore_tag(None).expect("forget");
        assert_eq!(s.restore_tag().expect("tag"), None);
        s.set_restore_tag(Some("0badc0de")).expect("set");
        drop(s);
        let snapshot = Snapshot {
            meta: SnapshotMeta { index: 40, term: 7 },
            data: Bytes::from_static(b"the state"),
            membership: None,
        };
        SledStorage::seed(dir.path(), &identity(1), snapshot, "crc=1 index=40").expect("seed");
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let ours = restore_tag_of("crc=1 index=40");
        assert_eq!(s.restore_tag().expect("tag"), Some(ours.clone()));
        assert!(is_restore_tag(&ours) && !is_restore_tag("0BADC0DE") && !is_restore_tag("x"));
    }

    #[test]
    fn a_seeded_directory_starts_from_the_backup_and_is_never_seeded_over() {
        let snapshot = || Snapshot {
            meta: SnapshotMeta { index: 40, term: 7 },
            data: Bytes::from_static(b"the state"),
            membership: None,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let seeded = SledStorage::seed(dir.path(), &identity(1), snapshot(), "crc=1 index=40");
        assert_eq!(seeded.expect("seed"), Seeded::Restored);
        let s = SledStorage::open(dir.path(), &identity(1)).expect("reopen");
        let state = s.load().expect("load");
        assert_eq!(state.snapshot, Some(snapshot()));
        assert_eq!((state.hard_state.term, state.hard_state.commit), (7, 40));
        assert!(state.entries.is_empty());
        drop(s);
        // The same backup again (a daemon restarted with the same --restore): left alone.
        let again = SledStorage::seed(dir.path(), &identity(1), snapshot(), "crc=1 index=40");
        assert_eq!(again.expect("seed again"), Seeded::AlreadyRestored);
        // Another backup, or a node's own state: refused, naming the directory.
        let other = SledStorage::seed(dir.path(), &identity(1), snapshot(), "crc=2 index=40");
        let message = other.expect_err("must refuse").to_string();
        assert!(message.contains("another backup"), "{message}");
        let used = tempfile::tempdir().expect("temp dir");
        let mut s = SledStorage::open(used.path(), &identity(1)).expect("open");
        s.persist(&Ready {
            hard_state: Some(HardState {
                term: 2,
                vote: Some(1),
                commit: 0,
            }),
            ..Ready::default()
        })
        .expect("persist");
        drop(s);
        let refused = SledStorage::seed(used.path(), &identity(1), snapshot(), "crc=1 index=40")
            .expect_err("must refuse")
            .to_string();
        assert!(
            refused.contains(&used.path().display().to_string()),
            "{refused}"
        );
        assert!(refused.contains("running or stopped node"), "{refused}");
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
