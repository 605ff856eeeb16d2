//! The on-disk and on-the-wire format of intermediate key/value pairs.
//!
//! Keys and values may contain tabs and newlines (streaming apps, grep lines), so records are
//! length-prefixed rather than line-oriented: `u32 LE key length, key, u32 LE value length, value`.
//!
//! A map output file is *sealed* ([`seal`]): the records, then a 16-byte trailer (`MRSEALv1`, the records'
//! length as u32 LE and their CRC-32). Without it an empty or cut-short file — a crash or power loss
//! between the write and the disk, a full disk — decodes as zero records or fewer records, and a reduce
//! would silently count less; with it such a file is refused ([`open_sealed`]) and its map runs again.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::Path;

use crate::mr::MrError;

/// The trailer's magic.
const SEAL_MAGIC: &[u8; 8] = b"MRSEALv1";
/// Bytes of the trailer.
pub const SEAL_BYTES: usize = 16;

/// The trailer that seals `records` as a complete map output.
pub fn seal(records: &[u8]) -> [u8; SEAL_BYTES] {
    let mut trailer = [0u8; SEAL_BYTES];
    trailer[..8].copy_from_slice(SEAL_MAGIC);
    let len = u32::try_from(records.len()).unwrap_or(u32::MAX);
    trailer[8..12].copy_from_slice(&len.to_le_bytes());
    trailer[12..].copy_from_slice(&crc32fast::hash(records).to_le_bytes());
    trailer
}

/// The records' checksum a sealed output of `total` bytes ending in `trailer` must have, or `Corrupt`
/// naming `what` if the length alone already shows it empty, cut short or extended.
fn check_trailer(total: u64, trailer: &[u8], what: &str) -> Result<u32, MrError> {
    let corrupt = |why: &str| MrError::Corrupt(format!("{what}: {why}"));
    if total < SEAL_BYTES as u64 {
        return Err(corrupt(&format!(
            "{total} bytes, shorter than its trailer (an empty or truncated map output)"
        )));
    }
    if &trailer[..8] != SEAL_MAGIC {
        return Err(corrupt("no trailer (a truncated map output)"));
    }
    let len = u32::from_le_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]) as u64;
    let records = total - SEAL_BYTES as u64;
    if len != records {
        return Err(corrupt(&format!(
            "{records} bytes of records, the trailer says {len}"
        )));
    }
    Ok(u32::from_le_bytes([
        trailer[12],
        trailer[13],
        trailer[14],
        trailer[15],
    ]))
}

/// The records of a sealed map output, or `Corrupt` naming `what` if it is empty, cut short, extended
/// or altered.
pub fn open_sealed<'a>(data: &'a [u8], what: &str) -> Result<&'a [u8], MrError> {
    let split = data.len().saturating_sub(SEAL_BYTES);
    let (records, trailer) = data.split_at(split);
    let crc = check_trailer(data.len() as u64, trailer, what)?;
    if crc != crc32fast::hash(records) {
        return Err(MrError::Corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(records)
}

/// Checks the sealed map output at `path` without holding it in memory and returns the length of its
/// records (the bytes before the trailer). `Corrupt` as [`open_sealed`]; a missing file is an `Io` error
/// of kind `NotFound`.
pub fn check_sealed_file(path: &Path, what: &str) -> Result<u64, MrError> {
    let mut file = crate::mr::fsutil::open_exact(path).map_err(MrError::io(path))?;
    let total = file.metadata().map_err(MrError::io(path))?.len();
    let mut trailer = [0u8; SEAL_BYTES];
    if total >= SEAL_BYTES as u64 {
        file.seek(SeekFrom::Start(total - SEAL_BYTES as u64))
            .and_then(|_| file.read_exact(&mut trailer))
            .and_then(|_| file.rewind())
            .map_err(MrError::io(path))?;
    }
    let crc = check_trailer(total, &trailer, what)?;
    let records = total - SEAL_BYTES as u64;
    let mut hasher = crc32fast::Hasher::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file.take(records));
    loop {
        let buf = reader.fill_buf().map_err(MrError::io(path))?;
        if buf.is_empty() {
            break;
        }
        hasher.update(buf);
        let n = buf.len();
        reader.consume(n);
    }
    if reader.into_inner().limit() != 0 {
        return Err(MrError::Corrupt(format!("{what}: shrank while being read")));
    }
    if hasher.finalize() != crc {
        return Err(MrError::Corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(records)
}

/// The same records as `data` (well-formed, as [`encode`] writes them), ordered by key; records with
/// equal keys keep their order. A map output is sorted so its reducer can merge outputs as streams
/// instead of holding a whole partition to sort it. Already sorted, `data` itself comes back; else the
/// extra memory is one copy plus 12 bytes a record. A partition over 4 GiB is refused (its seal could
/// not describe it).
pub fn sorted(data: Vec<u8>, what: &str) -> Result<Vec<u8>, MrError> {
    let corrupt = || MrError::Corrupt(what.to_string());
    if u32::try_from(data.len()).is_err() {
        return Err(MrError::Other(format!(
            "{what}: a map output partition of {} bytes, over 4 GiB; use more reduces or a smaller \
             --split-size",
            data.len()
        )));
    }
    // (start of the record, length of its key, end of the record) for each record; the key starts
    // 4 bytes in.
    let mut spans: Vec<(u32, u32, u32)> = Vec::new();
    let field = |at: usize| -> Result<usize, MrError> {
        let len = data.get(at..at + 4).ok_or_else(corrupt)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if data.len() - (at + 4) < len {
            return Err(corrupt());
        }
        Ok(len)
    };
    let mut at = 0;
    while at < data.len() {
        let key_len = field(at)?;
        let value_at = at + 4 + key_len;
        let end = value_at + 4 + field(value_at)?;
        spans.push((at as u32, key_len as u32, end as u32));
        at = end;
    }
    let key = |&(start, len, _): &(u32, u32, u32)| {
        &data[start as usize + 4..start as usize + 4 + len as usize]
    };
    if spans.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        return Ok(data);
    }
    spans.sort_by(|a, b| key(a).cmp(key(b)));
    let mut out = Vec::with_capacity(data.len());
    for (start, _, end) in spans {
        out.extend_from_slice(&data[start as usize..end as usize]);
    }
    Ok(out)
}

/// Reads records one at a time from a stream of them (a map output's records, a merge's spill), so a
/// reducer holds one record per stream rather than whole partitions.
pub struct RecordReader<R> {
    source: R,
    what: String,
}

impl<R: BufRead> RecordReader<R> {
    /// Records from `source`; `what` names it in errors.
    pub fn new(source: R, what: String) -> Self {
        Self { source, what }
    }

    /// Reads the next record into `key` and `value` (replacing their contents); `false` at the end of
    /// the stream. A stream that ends inside a record is `Corrupt`.
    pub fn next_into(&mut self, key: &mut Vec<u8>, value: &mut Vec<u8>) -> Result<bool, MrError> {
        if self
            .source
            .fill_buf()
            .map_err(|err| MrError::Other(format!("{}: {err}", self.what)))?
            .is_empty()
        {
            return Ok(false);
        }
        self.field(key)?;
        self.field(value)?;
        Ok(true)
    }

    fn field(&mut self, into: &mut Vec<u8>) -> Result<(), MrError> {
        let cut = |err: std::io::Error| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                MrError::Corrupt(format!("{}: ends inside a record", self.what))
            }
            _ => MrError::Other(format!("{}: {err}", self.what)),
        };
        let mut len = [0u8; 4];
        self.source.read_exact(&mut len).map_err(cut)?;
        let len = u32::from_le_bytes(len) as u64;
        into.clear();
        // Grown as bytes arrive, so a damaged length cannot make us allocate gigabytes up front.
        let read = (&mut self.source)
            .take(len)
            .read_to_end(into)
            .map_err(cut)?;
        if read as u64 != len {
            return Err(cut(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    /// What this reader reads, for errors.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// Appends one record to `buf`.
pub fn encode(buf: &mut Vec<u8>, key: &str, value: &str) {
    encode_bytes(buf, key.as_bytes(), value.as_bytes());
}

/// Appends one record of raw bytes to `buf` (a merge copying records it has not decoded as text).
pub fn encode_bytes(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    for field in [key, value] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&field[..len as usize]);
    }
}

/// Decodes every record of `data` into `out`; `what` names the source in the error if it is corrupt.
pub fn decode_into(
    data: &[u8],
    what: &str,
    out: &mut Vec<(String, String)>,
) -> Result<(), MrError> {
    let corrupt = || MrError::Corrupt(what.to_string());
    let mut rest = data;
    let field = |rest: &mut &[u8]| -> Result<String, MrError> {
        if rest.len() < 4 {
            return Err(corrupt());
        }
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if tail.len() < len {
            return Err(corrupt());
        }
        let (bytes, tail) = tail.split_at(len);
        *rest = tail;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt())
    };
    while !rest.is_empty() {
        let key = field(&mut rest)?;
        let value = field(&mut rest)?;
        out.push((key, value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_strings() {
        let mut buf = Vec::new();
        encode(&mut buf, "a\tb", "line\nbreak");
        encode(&mut buf, "", "");
        let mut out = Vec::new();
        decode_into(&buf, "test", &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                ("a\tb".into(), "line\nbreak".into()),
                (String::new(), String::new())
            ]
        );
    }

    #[test]
    fn a_sealed_output_opens_whole_and_never_cut_short_or_altered() {
        let mut file = Vec::new();
        encode(&mut file, "word", "1");
        encode(&mut file, "other", "1");
        let trailer = seal(&file);
        file.extend_from_slice(&trailer);
        let mut out = Vec::new();
        decode_into(open_sealed(&file, "mr-0-0").unwrap(), "mr-0-0", &mut out).unwrap();
        assert_eq!(out.len(), 2);
        // An empty file is not zero records; no cut and no flipped bit passes.
        let empty = open_sealed(&[], "mr-0-0").unwrap_err().to_string();
        assert!(
            empty.contains("mr-0-0") && empty.contains("empty or truncated"),
            "{empty}"
        );
        for len in 0..file.len() {
            assert!(
                open_sealed(&file[..len], "x").is_err(),
                "cut at {len} accepted"
            );
        }
        for byte in 0..file.len() {
            let mut bad = file.clone();
            bad[byte] ^= 0x02;
            assert!(
                open_sealed(&bad, "x").is_err(),
                "flip in byte {byte} accepted"
            );
        }
        // A sealed empty partition (a map that produced nothing for this reduce) is fine.
        let nothing = seal(&[]);
        assert_eq!(open_sealed(&nothing, "x").unwrap(), b"");
    }

    #[test]
    fn sorting_orders_by_key_and_keeps_equal_keys_in_emitted_order() {
        let mut buf = Vec::new();
        for (key, value) in [("b", "1"), ("a", "2"), ("b", "3"), ("", "4"), ("a", "5")] {
            encode(&mut buf, key, value);
        }
        let mut out = Vec::new();
        decode_into(&sorted(buf, "t").unwrap(), "t", &mut out).unwrap();
        let got: Vec<(&str, &str)> = out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            vec![("", "4"), ("a", "2"), ("a", "5"), ("b", "1"), ("b", "3")]
        );
        let mut cut = Vec::new();
        encode(&mut cut, "key", "value");
        cut.pop();
        assert!(sorted(cut, "t").is_err());
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut buf = Vec::new();
        encode(&mut buf, "key", "value");
        buf.pop();
        assert!(decode_into(&buf, "test", &mut Vec::new()).is_err());
    }
}
