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
    let found = file.len() as u64;
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let after_magic = MAGIC.len() + 4;
    let header_len = file
        .get(MAGIC.len()..after_magic)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BackupError::Truncated {
            expected: after_magic as u64,
            found,
        })?;
    if header_len > MAX_HEADER_BYTES {
        return Err(BackupError::Header(format!(
            "{header_len} bytes of header (at most {MAX_HEADER_BYTES})"
        )));
    }
    let header_end = after_magic + header_len as usize;
    let json = file
        .get(after_magic..header_end)
        .ok_or(BackupError::Truncated {
            expected: header_end as u64,
            found,
        })?;
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
    let expected = (header_end as u64)
        .checked_add(header.snapshot_bytes)
        .and_then(|n| n.checked_add(4))
        .ok_or_else(|| BackupError::Header("snapshot length overflows".into()))?;
    if found < expected {
        return Err(BackupError::Truncated { expected, found });
    }
    if found > expected {
        return Err(BackupError::TrailingBytes {
            extra: found - expected,
        });
    }
    let body_end = file.len() - 4;
    let stored = u32::from_le_bytes([
        file[body_end],
        file[body_end + 1],
        file[body_end + 2],
        file[body_end + 3],
    ]);
    let computed = crc32fast::hash(&file[..body_end]);
    if stored != computed {
        return Err(BackupError::Checksum { stored, computed });
    }
    Ok((header, header_end..body_end))
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
}
