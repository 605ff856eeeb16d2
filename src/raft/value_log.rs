//! Large log entries, kept beside sled in append-only files (`raft-values/<id>.vlog`), with only a
//! small pointer in sled — the key-value separation of WiscKey and TiKV's Titan.
//!
//! Why: sled writes any page over a quarter of its 512 KiB segment as a file of its own (a "blob"),
//! and a leaf holds up to 16 entries, so a log of 1 MiB entries turned every leaf rewrite into a new
//! multi-MiB blob file and the unlink of the old one. That tripled the bytes written per replica, and
//! on a file system mounted with online `discard` each unlink issued a discard the next fsync of every
//! process on the disk waited behind: with a GiB of log, small puts stalled for over a second. Here a
//! large entry is written once, sequentially, and its file is removed only when a snapshot covers
//! everything in it — a little at a time ([`trickle_remove`]), so no single discard is large.
//!
//! Durability: [`ValueLog::sync`] fsyncs the files written to before sled's batch that points at them
//! is flushed, so a pointer sled has made durable always finds its bytes. A crash in between leaves
//! bytes nothing points at; files no live entry points at are removed at the next open. Each pointer
//! carries the entry's length and CRC-32, checked on every read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Entries whose encoding is larger than this go to the value log. Two reasons, measured with 16
/// clients putting values over 20,000 keys for 10 minutes: sled makes a page over 128 KiB (a quarter
/// segment) a blob file of its own, and a leaf holds up to 16 entries, so large entries made blobs;
/// and even small ones are rewritten by sled many times (leaf consolidations, then the segment
/// cleaner once the reaper deletes them): 1 KiB values kept in sled cost 28.6 bytes written per byte
/// put on each replica, in the value log 6.7. Smaller entries stay in sled, where a persist is one
/// fsync instead of two (the value file's, then sled's).
pub const VALUE_LOG_MIN_BYTES: usize = 512;

/// A file takes appends until it is this large; then the next persist starts a new one. Small enough
/// that a snapshot frees disk space soon, large enough that files stay few.
const FILE_BYTES: u64 = 64 << 20;

/// The first bytes of a pointer stored as a sled value. No protobuf message starts with 0xFF (field
/// 31, wire type 7 does not exist), so a pointer is never mistaken for an inline entry, including
/// entries that earlier versions stored.
const POINTER_MAGIC: [u8; 4] = [0xFF, b'V', b'L', 1];

const POINTER_BYTES: usize = Pointer::BYTES;

/// Where an entry's bytes are: file, offset, length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// The file's id (its name).
    pub file: u64,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// CRC-32 of the bytes.
    pub crc: u32,
}

impl Pointer {
    /// Encoded size: what an entry in the value log costs sled.
    pub const BYTES: usize = 4 + 8 + 8 + 4 + 4;

    /// The sled value that stands for the entry.
    pub fn encode(&self) -> [u8; POINTER_BYTES] {
        let mut out = [0u8; POINTER_BYTES];
        out[0..4].copy_from_slice(&POINTER_MAGIC);
        out[4..12].copy_from_slice(&self.file.to_be_bytes());
        out[12..20].copy_from_slice(&self.offset.to_be_bytes());
        out[20..24].copy_from_slice(&self.len.to_be_bytes());
        out[24..28].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    /// The pointer a sled value holds, or `None` for an entry stored inline.
    pub fn decode(value: &[u8]) -> Option<Pointer> {
        if value.len() != POINTER_BYTES || value[0..4] != POINTER_MAGIC {
            return None;
        }
        let word = |range: std::ops::Range<usize>| {
            value[range]
                .iter()
                .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte))
        };
        Some(Pointer {
            file: word(4..12),
            offset: word(12..20),
            len: word(20..24) as u32,
            crc: word(24..28) as u32,
        })
    }
}

/// The file being appended to.
struct Active {
    id: u64,
    file: File,
    len: u64,
    /// Written since the last [`ValueLog::sync`].
    dirty: bool,
}

/// The value files of one data directory.
pub struct ValueLog {
    dir: PathBuf,
    active: Option<Active>,
    /// Every file that may hold a live entry, with the highest log index ever written to it: once a
    /// snapshot covers that index, nothing in the file is needed.
    files: BTreeMap<u64, u64>,
    next_id: u64,
}

fn file_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.vlog"))
}

impl ValueLog {
    /// The value log in `dir` (made if missing). Files found there are not yet known to hold anything:
    /// the caller reports each live pointer ([`ValueLog::note_live`]) and then removes the rest
    /// ([`ValueLog::unreferenced`]).
    pub fn open(dir: PathBuf) -> std::io::Result<ValueLog> {
        std::fs::create_dir_all(&dir)?;
        let mut next_id = 1;
        for file in std::fs::read_dir(&dir)?.flatten() {
            let name = file.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".vlog"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id {
                next_id = next_id.max(id + 1);
            }
        }
        Ok(ValueLog {
            dir,
            active: None,
            files: BTreeMap::new(),
            next_id,
        })
    }

    /// A live entry at `index` is in `pointer`'s file.
    pub fn note_live(&mut self, pointer: &Pointer, index: u64) {
        let highest = self.files.entry(pointer.file).or_insert(index);
        *highest = (*highest).max(index);
    }

    /// Files in the directory that hold no live entry (left by a crash or a covered log), to remove.
    pub fn unreferenced(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut stale = Vec::new();
        for file in std::fs::read_dir(&self.dir)?.flatten() {
            let path = file.path();
            let live = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".vlog"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| self.files.contains_key(&id));
            if !live {
                stale.push(path);
            }
        }
        Ok(stale)
    }

    /// Append the bytes of the entry at `index`; durable only after [`ValueLog::sync`].
    pub fn append(&mut self, index: u64, bytes: &[u8]) -> std::io::Result<Pointer> {
        let active = match self.active.take() {
            Some(active) if active.len < FILE_BYTES || active.dirty => active,
            _ => self.start_file()?,
        };
        let active = self.active.insert(active);
        active.file.write_all(bytes)?;
        let pointer = Pointer {
            file: active.id,
            offset: active.len,
            len: u32::try_from(bytes.len()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a log entry of {} bytes", bytes.len()),
                )
            })?,
            crc: crc32fast::hash(bytes),
        };
        active.len += bytes.len() as u64;
        active.dirty = true;
        let highest = self.files.entry(active.id).or_insert(index);
        *highest = (*highest).max(index);
        Ok(pointer)
    }

    /// A new file (and its directory entry) made durable before anything points into it.
    fn start_file(&mut self) -> std::io::Result<Active> {
        let id = self.next_id;
        self.next_id += 1;
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(file_path(&self.dir, id))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Active {
            id,
            file,
            len: 0,
            dirty: false,
        })
    }

    /// Make every append so far durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if let Some(active) = self.active.as_mut().filter(|a| a.dirty) {
            active.file.sync_data()?;
            active.dirty = false;
        }
        Ok(())
    }

    /// The bytes `pointer` points at, checked against its length and checksum.
    pub fn read(&self, pointer: &Pointer) -> std::io::Result<Vec<u8>> {
        let file = File::open(file_path(&self.dir, pointer.file))?;
        let mut bytes = vec![0u8; pointer.len as usize];
        file.read_exact_at(&mut bytes, pointer.offset)?;
        if crc32fast::hash(&bytes) != pointer.crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "checksum mismatch in value file {} at offset {}",
                    pointer.file, pointer.offset
                ),
            ));
        }
        Ok(bytes)
    }

    /// Files every entry of which a snapshot up to `index` covers (never the one being appended to):
    /// forgotten here, to be removed once that snapshot is durable.
    pub fn covered_through(&mut self, index: u64) -> Vec<PathBuf> {
        let active = self.active.as_ref().map(|a| a.id);
        let covered: Vec<u64> = self
            .files
            .iter()
            .filter(|&(&id, &highest)| highest <= index && Some(id) != active)
            .map(|(&id, _)| id)
            .collect();
        covered
            .into_iter()
            .map(|id| {
                self.files.remove(&id);
                file_path(&self.dir, id)
            })
            .collect()
    }
}

/// Bytes a file shrinks by per step in [`trickle_remove`], and the pause after each step.
const TRICKLE_STEP_BYTES: u64 = 8 << 20;
const TRICKLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Remove a large file a few MiB at a time. Unlinking a GiB at once frees all its blocks in one go,
/// and with online `discard` that is one huge discard every fsync on the disk then waits behind;
/// shrinking it in steps spreads the discards out (at most ~400 MiB/s).
pub fn trickle_remove(path: &Path) -> std::io::Result<()> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut len = file.metadata()?.len();
    while len > TRICKLE_STEP_BYTES {
        len -= TRICKLE_STEP_BYTES;
        file.set_len(len)?;
        std::thread::sleep(TRICKLE_PAUSE);
    }
    drop(file);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_inline_entries_are_not_pointers() {
        let pointer = Pointer {
            file: 7,
            offset: 1 << 40,
            len: 3 << 20,
            crc: 0xDEAD_BEEF,
        };
        assert_eq!(Pointer::decode(&pointer.encode()), Some(pointer));
        // What sled held before this module: protobuf entries, which never start with 0xFF.
        assert_eq!(Pointer::decode(&[0x08, 0x01, 0x10, 0x02]), None);
        let mut almost = pointer.encode();
        almost[3] = 2;
        assert_eq!(Pointer::decode(&almost), None);
    }

    #[test]
    fn appended_entries_read_back_and_a_corrupted_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = ValueLog::open(dir.path().join("v")).expect("open");
        let a = log.append(1, &[1u8; 5000]).expect("append");
        let b = log.append(2, &[2u8; 7000]).expect("append");
        log.sync().expect("sync");
        assert_eq!(log.read(&a).expect("read"), vec![1u8; 5000]);
        assert_eq!(log.read(&b).expect("read"), vec![2u8; 7000]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(file_path(&dir.path().join("v"), b.file))
            .expect("file");
        file.write_all_at(&[9], b.offset + 10).expect("corrupt");
        let error = log.read(&b).expect_err("corrupt entry read");
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    #[test]
    fn a_file_is_covered_only_when_its_highest_entry_is_and_it_takes_no_more_appends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = ValueLog::open(dir.path().join("v")).expect("open");
        let first = log.append(10, &[0u8; 100]).expect("append");
        log.sync().expect("sync");
        // Being appended to: never covered.
        assert!(log.covered_through(100).is_empty());
        // Full: the next persist's append starts a new file.
        log.active.as_mut().expect("active").len = FILE_BYTES;
        let second = log.append(11, &[0u8; 100]).expect("append");
        assert_ne!(first.file, second.file);
        assert!(log.covered_through(9).is_empty());
        assert_eq!(
            log.covered_through(10),
            vec![file_path(&dir.path().join("v"), first.file)]
        );
        // Reopened: only files with live entries are kept.
        drop(log);
        let mut reopened = ValueLog::open(dir.path().join("v")).expect("reopen");
        reopened.note_live(&second, 11);
        let stale = reopened.unreferenced().expect("list");
        assert_eq!(stale, vec![file_path(&dir.path().join("v"), first.file)]);
        let third = reopened.append(12, &[0u8; 10]).expect("append");
        assert!(third.file > second.file, "a reopened log starts a new file");
    }

    #[test]
    fn trickle_remove_deletes_large_and_missing_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("big");
        let file = File::create(&path).expect("create");
        file.set_len(20 << 20).expect("grow");
        drop(file);
        trickle_remove(&path).expect("remove");
        assert!(!path.exists());
        trickle_remove(&path).expect("a missing file is already removed");
    }
}
