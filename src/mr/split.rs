//! Reading one input split as a stream of line-aligned chunks, so a map task's memory is bounded by the
//! chunk size however large its input, and a file cut into splits by byte offsets is read with every
//! line exactly once.
//!
//! The rule, Hadoop's `LineRecordReader`'s: a split `[offset, offset + length)` owns the lines that
//! *start* inside it. A split that does not start the file skips through the first newline at or after
//! `offset - 1` (that line started earlier and belongs to the split before); every split reads on past its
//! end to finish its last line.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use crate::mr::MrError;

/// Bytes handed to one `App::map` call (more only if a single line is longer).
pub const CHUNK: usize = 8 << 20;

/// The lines of one split, a chunk at a time.
pub struct SplitReader {
    reader: BufReader<File>,
    path: std::path::PathBuf,
    /// Offset of the next unread byte.
    pos: u64,
    /// Lines starting at or after this belong to the next split.
    end: u64,
}

impl SplitReader {
    /// Opens `path` positioned at the first line that starts in `[offset, offset + length)`.
    pub fn open(path: &Path, offset: u64, length: u64) -> Result<SplitReader, MrError> {
        let file = File::open(path).map_err(MrError::io(path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut pos = offset;
        if offset > 0 {
            reader
                .seek(SeekFrom::Start(offset - 1))
                .map_err(MrError::io(path))?;
            let mut skipped = Vec::new();
            let n = reader
                .read_until(b'\n', &mut skipped)
                .map_err(MrError::io(path))?;
            pos = offset - 1 + n as u64;
        }
        Ok(SplitReader {
            reader,
            path: path.to_path_buf(),
            pos,
            end: offset.saturating_add(length),
        })
    }

    /// Replaces `buf` with the next whole lines, about [`CHUNK`] bytes of them; false once the split is
    /// exhausted. A chunk always ends at a line end (or the end of the file), so it is never cut inside
    /// a UTF-8 character.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<bool, MrError> {
        buf.clear();
        while buf.len() < CHUNK && self.pos < self.end {
            let n = self
                .reader
                .read_until(b'\n', buf)
                .map_err(MrError::io(&self.path))?;
            if n == 0 {
                self.end = self.pos;
                break;
            }
            self.pos += n as u64;
        }
        Ok(!buf.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path, offset: u64, length: u64) -> Vec<u8> {
        let mut reader = SplitReader::open(path, offset, length).unwrap();
        let (mut all, mut chunk) = (Vec::new(), Vec::new());
        while reader.next_chunk(&mut chunk).unwrap() {
            all.extend_from_slice(&chunk);
        }
        all
    }

    #[test]
    fn every_cut_reads_every_line_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        let text = b"alpha\nbe\n\ngamma delta\nx\nlast line without newline";
        std::fs::write(&path, text).unwrap();
        for size in 1..=text.len() as u64 + 1 {
            let mut joined = Vec::new();
            let mut offset = 0;
            while offset < text.len() as u64 {
                joined.extend(read_all(&path, offset, size));
                offset += size;
            }
            assert_eq!(joined, text, "split size {size}");
        }
    }
}
