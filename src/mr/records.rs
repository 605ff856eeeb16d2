//! The on-disk and on-the-wire format of intermediate key/value pairs.
//!
//! Keys and values may contain tabs and newlines (streaming apps, grep lines), so records are
//! length-prefixed rather than line-oriented: `u32 LE key length, key, u32 LE value length, value`.
//!
//! A map output file is *sealed* ([`seal`]): the records, then a 16-byte trailer (`MRSEALv1`, the records'
//! length as u32 LE and their CRC-32). Without it an empty or cut-short file — a crash or power loss
//! between the write and the disk, a full disk — decodes as zero records or fewer records, and a reduce
//! would silently count less; with it such a file is refused ([`open_sealed`]) and its map runs again.

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

/// The records of a sealed map output, or `Corrupt` naming `what` if it is empty, cut short, extended
/// or altered.
pub fn open_sealed<'a>(data: &'a [u8], what: &str) -> Result<&'a [u8], MrError> {
    let corrupt = |why: &str| MrError::Corrupt(format!("{what}: {why}"));
    if data.len() < SEAL_BYTES {
        return Err(corrupt(&format!(
            "{} bytes, shorter than its trailer (an empty or truncated map output)",
            data.len()
        )));
    }
    let (records, trailer) = data.split_at(data.len() - SEAL_BYTES);
    if &trailer[..8] != SEAL_MAGIC {
        return Err(corrupt("no trailer (a truncated map output)"));
    }
    let len = u32::from_le_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]) as usize;
    let crc = u32::from_le_bytes([trailer[12], trailer[13], trailer[14], trailer[15]]);
    if len != records.len() {
        return Err(corrupt(&format!(
            "{} bytes of records, the trailer says {len}",
            records.len()
        )));
    }
    if crc != crc32fast::hash(records) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(records)
}

/// Appends one record to `buf`.
pub fn encode(buf: &mut Vec<u8>, key: &str, value: &str) {
    for field in [key, value] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&field.as_bytes()[..len as usize]);
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
    fn truncated_input_is_an_error() {
        let mut buf = Vec::new();
        encode(&mut buf, "key", "value");
        buf.pop();
        assert!(decode_into(&buf, "test", &mut Vec::new()).is_err());
    }
}
