//! The on-disk and on-the-wire format of intermediate key/value pairs.
//!
//! Keys and values may contain tabs and newlines (streaming apps, grep lines), so records are
//! length-prefixed rather than line-oriented: `u32 LE key length, key, u32 LE value length, value`.

use crate::mr::MrError;

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
    fn truncated_input_is_an_error() {
        let mut buf = Vec::new();
        encode(&mut buf, "key", "value");
        buf.pop();
        assert!(decode_into(&buf, "test", &mut Vec::new()).is_err());
    }
}
