//! The backup file: one replicated service's snapshot (state and sessions) at a committed index, as
//! `kvctl snapshot save` writes it and `kvd --restore` reads it, in the spirit of `etcdctl snapshot
//! save` / `etcdutl snapshot restore`.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! "DS824BAK"  (8 bytes, the magic)
//! header length (u32) | header (JSON: BackupHeader)
//! snapshot (header.snapshot_bytes bytes: an rsm.Snapshot, exactly what Raft stores)
//! CRC-32 of everything above (u32)
//! ```
//!
//! Why a file of its own and not a copy of a data directory: a data directory belongs to one node of
//! one cluster (its identity is checked at open) and holds a log that only makes sense with its peers;
//! a backup is the service's state alone, which any number of fresh nodes can start from. The header
//! is JSON so that a person (or `kvctl snapshot status`) can read what a file is without this code,
//! and the checksum covers it too: a file that was cut short or changed is refused, never half-loaded.

use crate::raft::{Index, Term};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"DS824BAK";

/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;

/// Largest header accepted: a header is a few hundred bytes; anything larger is not ours.
const MAX_HEADER_BYTES: u32 = 64 << 10;

/// What a backup holds, readable without decoding the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// [`VERSION`] of the layout.
    pub version: u32,
    /// The cluster id of the source (`<cluster>/<group>`, e.g. `ds824/kv`), as its data directories and
    /// peer messages carry it.
    pub cluster_id: String,
    /// The service (`kv`, `ctrler`, `shard-<gid>`): a backup is restored only into the same service.
    pub service: String,
    /// The log index the snapshot covers: every write acknowledged before the save began is at or
    /// below it.
    pub index: Index,
    /// The leader's term when it confirmed `index` committed (the restored nodes start from it).
    pub term: Term,
    /// Length of the snapshot that follows the header.
    pub snapshot_bytes: u64,
    /// When the leader took it (ms since the Unix epoch), for people.
    pub created_unix_ms: u64,
    /// The node that took it.
    pub taken_by: u64,
}

/// A backup file that cannot be used; each says what is wrong with it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackupError {
    /// The magic is missing.
    #[error("not a ds824 backup file (it does not start with {MAGIC:?})")]
    NotABackup,
    /// Written by a layout this code does not know.
    #[error("backup layout version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// The header cannot be read.
    #[error("unreadable backup header: {0}")]
    Header(String),
    /// The file ends early.
    #[error("truncated backup file: {expected} bytes expected, {found} present")]
    Truncated {
        /// Bytes the header says the file has.
        expected: u64,
        /// Bytes it has.
        found: u64,
    },
    /// More bytes than the header accounts for.
    #[error("backup file has {extra} bytes after its checksum")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The snapshot is larger than the reader accepts.
    #[error(
        "the backup holds a {snapshot_bytes}-byte snapshot, over the limit of {limit} bytes \
         (--max-snapshot-bytes raises it)"
    )]
    TooLarge {
        /// What the header declares.
        snapshot_bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The file cannot be read (missing, no permission, not a regular file).
    #[error("cannot read it: {0}")]
    Unreadable(String),
    /// The bytes are not the ones that were written.
    #[error("backup file is corrupt: checksum {stored:08x} stored, {computed:08x} computed")]
    Checksum {
        /// The checksum in the file.
        stored: u32,
        /// The checksum of its contents.
        computed: u32,
    },
}

/// Encode a backup file of `snapshot` under `header` (whose `snapshot_bytes` is set here).
pub fn encode(mut header: BackupHeader, snapshot: &[u8]) -> Vec<u8> {
    header.version = VERSION;
    header.snapshot_bytes = snapshot.len() as u64;
    let json = serde_json::to_vec(&header).expect("a header of strings and numbers encodes");
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len() + snapshot.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(snapshot);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Read a backup file's header and check its whole length and checksum; returns the header and the
/// range of `file` holding the snapshot.
pub fn decode(file: &[u8]) -> Result<(BackupHeader, std::ops::Range<usize>), BackupError> {
    let mut checker = Checker::new(u64::MAX);
    checker.push(file)?;
    let (header, range) = checker.finish()?;
    // Within `file`, so within usize.
    Ok((header, range.start as usize..range.end as usize))
}

/// Checks a backup as its bytes arrive, holding only its header. Why not read it whole and
/// [`decode`]: a backup is as large as the service's state, and neither `kvctl snapshot save` (which
/// must refuse a stream that runs past its declared length, or declares more than the limit, before
/// it fills the disk) nor its check of the written file needs the state in memory.
pub struct Checker {
    /// Largest `snapshot_bytes` accepted.
    limit: u64,
    /// The bytes up to the end of the header, until it is read.
    prefix: Vec<u8>,
    /// The header, where it ends and the file's whole length, once read.
    layout: Option<(BackupHeader, u64, u64)>,
    /// Bytes pushed so far.
    seen: u64,
    /// CRC-32 of everything before the stored checksum.
    crc: crc32fast::Hasher,
    /// The stored checksum, as its bytes arrive.
    tail: Vec<u8>,
}

impl Checker {
    /// A checker refusing any backup whose snapshot is over `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Checker {
            limit,
            prefix: Vec::new(),
            layout: None,
            seen: 0,
            crc: crc32fast::Hasher::new(),
            tail: Vec::with_capacity(4),
        }
    }

    /// The header, once its bytes have been pushed.
    pub fn header(&self) -> Option<&BackupHeader> {
        self.layout.as_ref().map(|(header, _, _)| header)
    }

    /// The whole file's length, once the header declaring it has been pushed (its snapshot is
    /// within the limit by then): what a reader holding the file may reserve at once.
    pub fn file_len(&self) -> Option<u64> {
        self.layout.as_ref().map(|(_, _, total)| *total)
    }

    /// Take the next bytes of the file. Refuses as soon as they cannot be a backup: no magic, an
    /// unreadable or oversized header, a snapshot over the limit, bytes past the declared length.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), BackupError> {
        while !data.is_empty() {
            let Some((_, header_end, total)) = self.layout.as_ref() else {
                let wanted = self.prefix_wanted()?;
                let take = (wanted - self.prefix.len()).min(data.len());
                self.prefix.extend_from_slice(&data[..take]);
                self.crc.update(&data[..take]);
                self.seen += take as u64;
                data = &data[take..];
                self.read_prefix()?;
                continue;
            };
            let (header_end, total) = (*header_end, *total);
            debug_assert!(self.seen >= header_end);
            let body_end = total - 4;
            let (take, into_crc) = if self.seen < body_end {
                ((body_end - self.seen).min(data.len() as u64) as usize, true)
            } else if self.seen < total {
                ((total - self.seen).min(data.len() as u64) as usize, false)
            } else {
                return Err(BackupError::TrailingBytes {
                    extra: data.len() as u64,
                });
            };
            if into_crc {
                self.crc.update(&data[..take]);
            } else {
                self.tail.extend_from_slice(&data[..take]);
            }
            self.seen += take as u64;
            data = &data[take..];
        }
        Ok(())
    }

    /// How long the prefix must grow before the next thing in it can be read.
    fn prefix_wanted(&self) -> Result<usize, BackupError> {
        let after_magic = MAGIC.len() + 4;
        if self.prefix.len() < after_magic {
            return Ok(after_magic);
        }
        let header_len = u32::from_le_bytes([
            self.prefix[MAGIC.len()],
            self.prefix[MAGIC.len() + 1],
            self.prefix[MAGIC.len() + 2],
            self.prefix[MAGIC.len() + 3],
        ]);
        if header_len > MAX_HEADER_BYTES {
            return Err(BackupError::Header(format!(
                "{header_len} bytes of header (at most {MAX_HEADER_BYTES})"
            )));
        }
        Ok(after_magic + header_len as usize)
    }

    /// Check what the prefix holds so far; read the header once it is whole.
    fn read_prefix(&mut self) -> Result<(), BackupError> {
        let magic = &MAGIC[..self.prefix.len().min(MAGIC.len())];
        if !self.prefix.starts_with(magic) {
            return Err(BackupError::NotABackup);
        }
        if self.prefix.len() < MAGIC.len() + 4 {
            return Ok(());
        }
        let header_end = self.prefix_wanted()?;
        if self.prefix.len() < header_end {
            return Ok(());
        }
        let json = &self.prefix[MAGIC.len() + 4..header_end];
        // The version first, so a newer layout is named as such rather than as an unreadable header.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let version = serde_json::from_slice::<Versioned>(json)
            .map_err(|e| BackupError::Header(e.to_string()))?
            .version;
        if version != VERSION {
            return Err(BackupError::Version(version));
        }
        let header: BackupHeader =
            serde_json::from_slice(json).map_err(|e| BackupError::Header(e.to_string()))?;
        if header.snapshot_bytes > self.limit {
            return Err(BackupError::TooLarge {
                snapshot_bytes: header.snapshot_bytes,
                limit: self.limit,
            });
        }
        let total = (header_end as u64)
            .checked_add(header.snapshot_bytes)
            .and_then(|n| n.checked_add(4))
            .ok_or_else(|| BackupError::Header("snapshot length overflows".into()))?;
        self.layout = Some((header, header_end as u64, total));
        self.prefix = Vec::new();
        Ok(())
    }

    /// The file ended here: check its length and checksum; returns the header and the range of the
    /// file holding the snapshot.
    pub fn finish(self) -> Result<(BackupHeader, std::ops::Range<u64>), BackupError> {
        let found = self.seen;
        let Some((header, header_end, total)) = self.layout else {
            if self.prefix.len() < MAGIC.len() {
                return Err(BackupError::NotABackup);
            }
            return Err(BackupError::Truncated {
                expected: self.prefix_wanted()? as u64,
                found,
            });
        };
        if found < total {
            return Err(BackupError::Truncated {
                expected: total,
                found,
            });
        }
        let stored = u32::from_le_bytes([self.tail[0], self.tail[1], self.tail[2], self.tail[3]]);
        let computed = self.crc.finalize();
        if stored != computed {
            return Err(BackupError::Checksum { stored, computed });
        }
        Ok((header, header_end..total - 4))
    }
}

/// A backup file read whole and checked: what `kvd --restore` seeds from and `kvctl snapshot
/// status` counts. Memory is bounded by `limit` (plus the header), whatever the path names: a file
/// that is not a backup, or declares a snapshot over the limit, is refused within its first bytes.
pub struct BackupFile {
    /// Its header.
    pub header: BackupHeader,
    /// The snapshot it holds.
    pub snapshot: bytes::Bytes,
    /// The file's length.
    pub file_bytes: u64,
    /// Its stored (and checked) checksum.
    pub checksum: u32,
}

/// Read and check the backup at `path` (see [`BackupFile`]).
pub fn read_file(path: &std::path::Path, limit: u64) -> Result<BackupFile, BackupError> {
    let mut whole = Vec::new();
    let (header, range) = scan_file(path, limit, Some(&mut whole))?;
    let checksum = checksum(&whole);
    let file_bytes = whole.len() as u64;
    let snapshot = bytes::Bytes::from(whole).slice(range.start as usize..range.end as usize);
    Ok(BackupFile {
        header,
        snapshot,
        file_bytes,
        checksum,
    })
}

/// Check the backup at `path` without holding it: its header if it is whole and intact.
pub fn check_file(path: &std::path::Path, limit: u64) -> Result<BackupHeader, BackupError> {
    scan_file(path, limit, None).map(|(header, _)| header)
}

/// Push the file at `path` through a [`Checker`], keeping its bytes in `keep` if given.
fn scan_file(
    path: &std::path::Path,
    limit: u64,
    mut keep: Option<&mut Vec<u8>>,
) -> Result<(BackupHeader, std::ops::Range<u64>), BackupError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let unreadable = |e: std::io::Error| BackupError::Unreadable(e.to_string());
    // Non-blocking, so that a FIFO given for a file is refused below rather than waited on for a
    // writer; reads of a regular file are not affected.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(BackupError::Unreadable("not a regular file".into()));
    }
    let mut checker = Checker::new(limit);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unreadable(e)),
        };
        checker.push(&buffer[..n])?;
        if let Some(keep) = keep.as_deref_mut() {
            // Reserved once from the checked header: growing by doubling would briefly need
            // up to twice the snapshot's size while the last copy is made. No more than the file
            // holds (a cut or forged header claims what it likes), and a refusal is an error, not
            // an abort.
            if let Some(total) = checker.file_len() {
                let total = usize::try_from(total.min(metadata.len())).unwrap_or(usize::MAX);
                keep.try_reserve_exact(total.saturating_sub(keep.len()))
                    .map_err(|e| BackupError::Unreadable(format!("holding the file: {e}")))?;
            }
            keep.extend_from_slice(&buffer[..n]);
        }
    }
    checker.finish()
}

/// The checksum stored in a backup file that [`decode`] accepted: what names the backup a data
/// directory was restored from.
pub fn checksum(file: &[u8]) -> u32 {
    let tail = &file[file.len().saturating_sub(4)..];
    tail.try_into().map(u32::from_le_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BackupHeader {
        BackupHeader {
            version: 0,
            cluster_id: "ds824/kv".into(),
            service: "kv".into(),
            index: 42,
            term: 3,
            snapshot_bytes: 0,
            created_unix_ms: 1,
            taken_by: 2,
        }
    }

    #[test]
    fn a_backup_reads_back_as_written() {
        let file = encode(header(), b"state and sessions");
        let (read, range) = decode(&file).expect("valid");
        assert_eq!(read.index, 42);
        assert_eq!(read.snapshot_bytes, 18);
        assert_eq!(read.version, VERSION);
        assert_eq!(&file[range], b"state and sessions");
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_refused() {
        let file = encode(header(), &[7u8; 300]);
        for len in 0..file.len() {
            assert!(decode(&file[..len]).is_err(), "cut at {len} accepted");
        }
        for byte in 0..file.len() {
            let mut bad = file.clone();
            bad[byte] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip in byte {byte} accepted");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(BackupError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let file = encode(header(), &[1u8; 100]);
        assert_eq!(decode(b"hello world"), Err(BackupError::NotABackup));
        let cut = decode(&file[..file.len() - 10]).unwrap_err();
        assert!(
            cut.to_string().starts_with("truncated backup file"),
            "{cut}"
        );
        let mut bad = file.clone();
        let last_data = file.len() - 5;
        bad[last_data] ^= 1;
        let corrupt = decode(&bad).unwrap_err();
        assert!(corrupt.to_string().contains("corrupt"), "{corrupt}");
        let future = encode(header(), b"x");
        let text = String::from_utf8_lossy(&future).replace("\"version\":1", "\"version\":9");
        let version = decode(text.as_bytes()).unwrap_err();
        assert_eq!(version, BackupError::Version(9));
    }

    /// Fed in pieces of any size, the checker judges every cut, flipped bit and extension as
    /// [`decode`] judges the whole: what lets `kvctl snapshot save` check a stream chunk by chunk.
    #[test]
    fn a_checker_fed_in_pieces_judges_as_the_whole_is_judged() {
        let file = encode(header(), &[7u8; 300]);
        let mut cases = vec![file.clone()];
        cases.extend((0..file.len()).map(|len| file[..len].to_vec()));
        for byte in 0..file.len() {
            let mut bad = file.clone();
            bad[byte] ^= 0x10;
            cases.push(bad);
        }
        let mut longer = file.clone();
        longer.extend_from_slice(b"xyz");
        cases.push(longer);
        for case in &cases {
            let whole = decode(case).map(|(h, r)| (h, r.start as u64..r.end as u64));
            for piece in [1, 5, 13, 64, 4096] {
                let mut checker = Checker::new(u64::MAX);
                let pieces = case
                    .chunks(piece)
                    .try_for_each(|c| checker.push(c))
                    .and_then(|()| checker.finish());
                match (&pieces, &whole) {
                    (Ok(_), Ok(_)) => assert_eq!(pieces, whole),
                    (Err(a), Err(b)) => assert_eq!(
                        std::mem::discriminant(a),
                        std::mem::discriminant(b),
                        "pieces of {piece}: {a} / whole: {b}"
                    ),
                    _ => panic!("pieces of {piece}: {pieces:?}, whole: {whole:?}"),
                }
            }
        }
    }

    /// A server that declares more than the limit, or sends more than it declared, or sends no
    /// backup at all, is refused at the bytes that show it, not after the disk fills.
    #[test]
    fn a_stream_over_the_limit_or_past_its_length_is_refused_as_it_arrives() {
        let file = encode(header(), &[7u8; 300]);
        let header_end = file.len() - 304;
        assert_eq!(
            Checker::new(299).push(&file[..header_end]),
            Err(BackupError::TooLarge {
                snapshot_bytes: 300,
                limit: 299
            })
        );
        let mut checker = Checker::new(300);
        checker.push(&file).expect("exactly the limit");
        assert_eq!(checker.header().map(|h| h.snapshot_bytes), Some(300));
        assert_eq!(
            checker.push(b"more"),
            Err(BackupError::TrailingBytes { extra: 4 })
        );
        assert_eq!(
            Checker::new(u64::MAX).push(b"HTTP/1.1 200 OK"),
            Err(BackupError::NotABackup)
        );
        assert_eq!(Checker::new(u64::MAX).push(b"DS8"), Ok(()));
    }

    /// Files are read through the same checker: within the limit, refused over it, and a path to
    /// something endless (a device) is refused before a byte is read.
    #[test]
    fn files_are_read_and_checked_within_the_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kv.backup");
        std::fs::write(&path, encode(header(), &[9u8; 5000])).expect("write");
        let read = read_file(&path, 5000).expect("at the limit");
        assert_eq!(&read.snapshot[..], &[9u8; 5000][..]);
        let on_disk = std::fs::metadata(&path).expect("metadata").len();
        assert_eq!(read.file_bytes, on_disk);
        assert_eq!(check_file(&path, 5000).expect("intact").index, 42);
        assert!(matches!(
            read_file(&path, 4999),
            Err(BackupError::TooLarge { .. })
        ));
        let device = std::path::Path::new("/dev/zero");
        let refused = check_file(device, u64::MAX).expect_err("a device");
        assert_eq!(refused.to_string(), "cannot read it: not a regular file");
        // A FIFO is refused at once, not waited on for a writer.
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .expect("mkfifo");
        let refused = check_file(&fifo, u64::MAX).expect_err("a FIFO");
        assert_eq!(refused.to_string(), "cannot read it: not a regular file");
    }

    #[test]
    fn a_file_read_whole_is_held_in_one_allocation_of_its_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kv.backup");
        // Over three of the reader's 1 MiB buffers: grown by doubling it would end at 4 MiB.
        let snapshot = vec![7u8; 3 << 20];
        std::fs::write(&path, encode(header(), &snapshot)).expect("write");
        let mut kept = Vec::new();
        scan_file(&path, u64::MAX, Some(&mut kept)).expect("intact");
        assert_eq!(
            kept.len() as u64,
            std::fs::metadata(&path).expect("metadata").len()
        );
        assert_eq!(kept.capacity(), kept.len(), "reserved once from the header");
        // Cut short, the header still claims 3 MiB: no more than the file holds is reserved, and the
        // cut is reported (a forged header claiming terabytes would otherwise abort the process).
        let cut = std::fs::read(&path).expect("read");
        std::fs::write(&path, &cut[..1000]).expect("write");
        let mut kept = Vec::new();
        let refused = scan_file(&path, u64::MAX, Some(&mut kept)).expect_err("cut short");
        assert!(
            matches!(refused, BackupError::Truncated { .. }),
            "{refused}"
        );
        assert!(kept.capacity() <= 1000, "reserved {}", kept.capacity());
    }
}
