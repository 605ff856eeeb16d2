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
    /// Bytes per chunk (more only if one line is longer).
    chunk: usize,
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
        let file = crate::mr::fsutil::open_exact(path).map_err(MrError::io(path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let end = offset.saturating_add(length);
        let mut pos = offset;
        if offset > 0 {
            reader
                .seek(SeekFrom::Start(offset - 1))
                .map_err(MrError::io(path))?;
            pos = offset - 1;
            // Past the line that started before us, looking no further than our end: a line that
            // starts there is not ours either, and a file without newlines must not be read to its
            // end by every split.
            while pos < end {
                let buf = reader.fill_buf().map_err(MrError::io(path))?;
                if buf.is_empty() {
                    break;
                }
                let window = buf.len().min((end - pos) as usize);
                match memchr::memchr(b'\n', &buf[..window]) {
                    Some(at) => {
                        reader.consume(at + 1);
                        pos += at as u64 + 1;
                        break;
                    }
                    None => {
                        reader.consume(window);
                        pos += window as u64;
                    }
                }
            }
        }
        Ok(SplitReader {
            chunk: CHUNK,
            reader,
            path: path.to_path_buf(),
            pos,
            end,
        })
    }

    /// The same reader handing out its whole split as one chunk (for apps that want a split in one
    /// map call).
    pub fn whole(mut self) -> SplitReader {
        self.chunk = usize::MAX;
        self
    }

    /// Replaces `buf` with the next whole lines, about [`CHUNK`] bytes of them; false once the split is
    /// exhausted. A chunk always ends at a line end (or the end of the file), so it is never cut inside
    /// a UTF-8 character.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<bool, MrError> {
        buf.clear();
        while buf.len() < self.chunk && self.pos < self.end {
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

    #[test]
    fn a_split_inside_one_long_line_reads_no_further_than_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, vec![b'x'; 1 << 20]).unwrap();
        let mut reader = SplitReader::open(&path, 1000, 1000).unwrap();
        assert_eq!(reader.pos, 2000, "stopped at its end, not the file's");
        assert!(!reader.next_chunk(&mut Vec::new()).unwrap());
        assert_eq!(
            read_all(&path, 0, 1000).len(),
            1 << 20,
            "the first split owns the line"
        );
    }
}
