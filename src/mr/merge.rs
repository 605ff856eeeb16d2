//! The reduce side of the shuffle: merging sorted map outputs into key groups as streams.
//!
//! Every map output partition is sorted by key when it is written ([`records::sorted`]), so a reducer
//! needs no sort of its own: it merges its partition's map outputs, one record from each at a time, and
//! hands the app one key's values at a time. Memory is one record per merged stream plus one key's values,
//! not the partition. A reducer with more map outputs than [`MergeOptions::fan_in`] merges them in passes
//! (Hadoop's `io.sort.factor`), spilling each pass to a hidden file, so open files stay bounded too.
//!
//! Values of one key come out in run order (map task order), then in the order their map emitted them,
//! so even an order-sensitive app reduces the same way on every re-execution.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use crate::mr::app::Groups;
use crate::mr::records::{self, RecordReader};
use crate::mr::MrError;

/// Read buffer per merged stream: big enough for sequential disk reads, small enough for `fan_in` of them.
const READ_BUFFER: usize = 64 << 10;

/// Sorted records to merge: a map output in memory, a range of a file, or a merge pass's spill.
pub struct Run {
    source: Source,
    what: String,
}

enum Source {
    Memory(Vec<u8>),
    /// The first `len` bytes of `path`; a spill owns its file and removes it when dropped.
    File {
        path: PathBuf,
        len: u64,
        spill: Option<tempfile::TempPath>,
    },
}

impl Run {
    /// Sorted records held in memory (the sequential runner's map outputs); `what` names them in errors.
    pub fn memory(records: Vec<u8>, what: impl Into<String>) -> Self {
        Run {
            source: Source::Memory(records),
            what: what.into(),
        }
    }

    /// The sorted records in the first `len` bytes of `path` (a sealed map output without its trailer,
    /// see [`records::check_sealed_file`]). The file is opened only when the merge reaches it.
    pub fn file(path: PathBuf, len: u64, what: impl Into<String>) -> Self {
        Run {
            source: Source::File {
                path,
                len,
                spill: None,
            },
            what: what.into(),
        }
    }

    fn is_file(&self) -> bool {
        matches!(self.source, Source::File { .. })
    }

    /// A reader of the run's records, and the spill file to keep until the reader is done.
    fn open(self) -> Result<(Reader, Option<tempfile::TempPath>), MrError> {
        let (reader, keep): (Box<dyn BufRead + Send>, _) = match self.source {
            Source::Memory(records) => (Box::new(Cursor::new(records)), None),
            Source::File { path, len, spill } => {
                let file = crate::mr::fsutil::open_exact(&path).map_err(MrError::io(&path))?;
                let exact = Exact(file.take(len));
                (
                    Box::new(BufReader::with_capacity(READ_BUFFER, exact)),
                    spill,
                )
            }
        };
        Ok((RecordReader::new(reader, self.what), keep))
    }
}

/// Exactly the bytes a [`Take`](std::io::Take) allows: a file that ends before them (cut short or
/// replaced since its seal was checked) is an error, never a clean end that would drop records.
struct Exact(std::io::Take<File>);

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        if n == 0 && !buf.is_empty() && self.0.limit() > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("ends {} bytes early", self.0.limit()),
            ));
        }
        Ok(n)
    }
}

/// Records read from one run.
type Reader = RecordReader<Box<dyn BufRead + Send>>;

/// One record: its key and its value, as bytes.
type Record = (Vec<u8>, Vec<u8>);

/// How a merge may use disk.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Most streams merged at once; more runs than this are merged in passes.
    pub fan_in: usize,
    /// Where passes spill; `None` merges every run at once (runs in memory hold no files open).
    pub spill_dir: Option<PathBuf>,
}

impl MergeOptions {
    /// One pass over every run: for runs that are all in memory.
    pub fn in_memory() -> Self {
        MergeOptions {
            fan_in: usize::MAX,
            spill_dir: None,
        }
    }

    /// Passes of at most 64 files, spilling into `dir` (Hadoop's default factor is 10 or 100).
    pub fn spilling_to(dir: &Path) -> Self {
        MergeOptions {
            fan_in: 64,
            spill_dir: Some(dir.to_path_buf()),
        }
    }
}

/// The smallest unread record of one stream; ordered so that `BinaryHeap`, a max-heap, yields the
/// smallest key first and, among equal keys, the earliest stream.
struct Head {
    key: Vec<u8>,
    value: Vec<u8>,
    stream: usize,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        (&other.key, other.stream).cmp(&(&self.key, self.stream))
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

/// Records of several sorted streams in one sorted order.
struct Streams {
    readers: Vec<Reader>,
    heap: BinaryHeap<Head>,
    /// Spill files in use, removed when the merge is dropped.
    _spills: Vec<tempfile::TempPath>,
}

impl Streams {
    fn open(runs: Vec<Run>) -> Result<Self, MrError> {
        let mut streams = Streams {
            readers: Vec::with_capacity(runs.len()),
            heap: BinaryHeap::with_capacity(runs.len()),
            _spills: Vec::new(),
        };
        for run in runs {
            let (reader, spill) = run.open()?;
            streams._spills.extend(spill);
            streams.readers.push(reader);
            streams.refill(streams.readers.len() - 1, None)?;
        }
        Ok(streams)
    }

    /// Reads `stream`'s next record into the heap; `after` is the key it last yielded.
    fn refill(&mut self, stream: usize, after: Option<&[u8]>) -> Result<(), MrError> {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        let reader = &mut self.readers[stream];
        if reader.next_into(&mut key, &mut value)? {
            // Out of order, a stream would split a key's group silently: refuse it instead.
            if after.is_some_and(|after| key.as_slice() < after) {
                return Err(MrError::Corrupt(format!(
                    "{}: records are not sorted by key",
                    reader.what()
                )));
            }
            self.heap.push(Head { key, value, stream });
        }
        Ok(())
    }

    /// The smallest remaining record.
    fn pop(&mut self) -> Result<Option<Record>, MrError> {
        let Some(Head { key, value, stream }) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(stream, Some(&key))?;
        Ok(Some((key, value)))
    }

    fn next_key_is(&self, key: &[u8]) -> bool {
        self.heap.peek().is_some_and(|head| head.key == key)
    }
}

/// Merges `runs` down to at most `options.fan_in` by passes that spill to `options.spill_dir`; each
/// pass merges neighbouring runs, so run order (and with it value order) is kept.
fn narrow(mut runs: Vec<Run>, options: &MergeOptions) -> Result<Vec<Run>, MrError> {
    let Some(dir) = &options.spill_dir else {
        return Ok(runs);
    };
    let fan_in = options.fan_in.max(2);
    let files = |runs: &[Run]| runs.iter().filter(|run| run.is_file()).count();
    // Only files count: runs in memory hold no descriptor and no read buffer.
    while files(&runs) > fan_in {
        let mut merged = Vec::new();
        let (mut group, mut group_files) = (Vec::new(), 0);
        for run in runs {
            group_files += usize::from(run.is_file());
            group.push(run);
            if group_files == fan_in {
                merged.push(spill(std::mem::take(&mut group), dir)?);
                group_files = 0;
            }
        }
        if group_files > 1 {
            merged.push(spill(group, dir)?);
        } else {
            merged.extend(group);
        }
        runs = merged;
    }
    Ok(runs)
}

/// Merges `runs` into one hidden file in `dir` (removed when the returned run is dropped).
fn spill(runs: Vec<Run>, dir: &Path) -> Result<Run, MrError> {
    let what = format!(
        "a merge of {} .. {}",
        runs.first().map_or("", |r| r.what.as_str()),
        runs.last().map_or("", |r| r.what.as_str())
    );
    let file = tempfile::Builder::new()
        .prefix(".mr-merge-")
        .tempfile_in(dir)
        .map_err(MrError::io(dir))?;
    let path = file.path().to_path_buf();
    let mut streams = Streams::open(runs)?;
    let mut out = BufWriter::with_capacity(1 << 20, file.as_file());
    let mut record = Vec::new();
    let mut len = 0u64;
    while let Some((key, value)) = streams.pop()? {
        record.clear();
        records::encode_bytes(&mut record, &key, &value);
        out.write_all(&record).map_err(MrError::io(&path))?;
        len += record.len() as u64;
    }
    out.flush().map_err(MrError::io(&path))?;
    drop(out);
    drop(streams);
    let spill = file.into_temp_path();
    Ok(Run {
        source: Source::File {
            path: spill.to_path_buf(),
            len,
            spill: Some(spill),
        },
        what,
    })
}

/// A partition's key groups, read from its runs as the app asks for them (see [`Groups`]).
pub struct KeyGroups {
    streams: Streams,
    key: String,
    values: Vec<String>,
    error: Option<MrError>,
}

impl KeyGroups {
    /// Groups of the merged `runs`, after as many spilling passes as `options` needs.
    pub fn open(runs: Vec<Run>, options: &MergeOptions) -> Result<Self, MrError> {
        Ok(KeyGroups {
            streams: Streams::open(narrow(runs, options)?)?,
            key: String::new(),
            values: Vec::new(),
            error: None,
        })
    }

    /// Why the groups ended early, if they did: an unreadable or damaged run. The app saw only a
    /// prefix of the partition, so its output must be discarded.
    pub fn take_error(&mut self) -> Option<MrError> {
        self.error.take()
    }

    fn advance(&mut self) -> Result<bool, MrError> {
        let Some((key, value)) = self.streams.pop()? else {
            return Ok(false);
        };
        self.values.clear();
        self.values.push(text(value, "value")?);
        while self.streams.next_key_is(&key) {
            if let Some((_, value)) = self.streams.pop()? {
                self.values.push(text(value, "value")?);
            }
        }
        self.key = text(key, "key")?;
        Ok(true)
    }

    /// Reads one record into `key` and `values[0]`.
    fn advance_one(&mut self) -> Result<bool, MrError> {
        let Some((key, value)) = self.streams.pop()? else {
            return Ok(false);
        };
        self.key = text(key, "key")?;
        self.values.clear();
        self.values.push(text(value, "value")?);
        Ok(true)
    }

    /// Turns a step's outcome into what [`Groups`] hands out, remembering an error for
    /// [`KeyGroups::take_error`].
    fn outcome(&mut self, step: Result<bool, MrError>) -> bool {
        match step {
            Ok(more) => more,
            Err(err) => {
                self.error = Some(err);
                false
            }
        }
    }
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String, MrError> {
    String::from_utf8(bytes)
        .map_err(|_| MrError::Corrupt(format!("a {what} that is not UTF-8 in a map output")))
}

impl Groups for KeyGroups {
    fn next_group(&mut self) -> Option<(&str, &[String])> {
        if self.error.is_some() {
            return None;
        }
        let step = self.advance();
        self.outcome(step)
            .then_some((self.key.as_str(), self.values.as_slice()))
    }

    fn next_record(&mut self) -> Option<(&str, &str)> {
        if self.error.is_some() {
            return None;
        }
        let step = self.advance_one();
        self.outcome(step)
            .then(|| (self.key.as_str(), self.values[0].as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(pairs: &[(&str, &str)], what: &str) -> Run {
        let mut data = Vec::new();
        for (key, value) in pairs {
            records::encode(&mut data, key, value);
        }
        Run::memory(records::sorted(data, what).unwrap(), what)
    }

    fn collect(mut groups: KeyGroups) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        while let Some((key, values)) = groups.next_group() {
            out.push((key.to_string(), values.to_vec()));
        }
        assert!(groups.take_error().is_none());
        out
    }

    #[test]
    fn groups_come_in_key_order_with_values_in_run_order() {
        let runs = || {
            vec![
                run_of(&[("b", "0b"), ("a", "0a")], "m0"),
                run_of(&[("c", "1c"), ("a", "1a"), ("a", "1a'")], "m1"),
                run_of(&[], "m2"),
                run_of(&[("b", "3b")], "m3"),
            ]
        };
        let groups = collect(KeyGroups::open(runs(), &MergeOptions::in_memory()).unwrap());
        let want = vec![
            (
                "a".to_string(),
                vec!["0a".to_string(), "1a".into(), "1a'".into()],
            ),
            ("b".to_string(), vec!["0b".to_string(), "3b".into()]),
            ("c".to_string(), vec!["1c".to_string()]),
        ];
        assert_eq!(groups, want);

        // Record by record: the same pairs in the same order, the groups flattened.
        let mut records = KeyGroups::open(runs(), &MergeOptions::in_memory()).unwrap();
        let mut got = Vec::new();
        while let Some((key, value)) = records.next_record() {
            got.push((key.to_string(), value.to_string()));
        }
        assert!(records.take_error().is_none());
        let flat: Vec<(String, String)> = want
            .into_iter()
            .flat_map(|(key, values)| values.into_iter().map(move |v| (key.clone(), v)))
            .collect();
        assert_eq!(got, flat);
    }

    /// Many more files than the fan-in, with runs in memory between them: passes spill to disk, the
    /// result is the one-pass result (values still in run order), and no spill file is left behind.
    #[test]
    fn merging_in_passes_equals_merging_at_once_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = tempfile::tempdir().unwrap();
        let runs = |n: usize| -> Vec<Run> {
            (0..n)
                .map(|m| {
                    let pairs: Vec<(String, String)> = (0..20)
                        .map(|i| (format!("k{}", (i * 7 + m) % 13), format!("m{m}v{i}")))
                        .collect();
                    let refs: Vec<(&str, &str)> = pairs
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let run = run_of(&refs, &format!("m{m}"));
                    // Every fifth run stays in memory; the rest are files.
                    match run.source {
                        Source::Memory(data) if m % 5 != 0 => {
                            let path = inputs.path().join(format!("m{m}"));
                            std::fs::write(&path, &data).unwrap();
                            Run::file(path, data.len() as u64, format!("m{m}"))
                        }
                        _ => run,
                    }
                })
                .collect()
        };
        let at_once = collect(KeyGroups::open(runs(50), &MergeOptions::in_memory()).unwrap());
        let options = MergeOptions {
            fan_in: 3,
            spill_dir: Some(dir.path().to_path_buf()),
        };
        let groups = KeyGroups::open(runs(50), &options).unwrap();
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() > 0,
            "no pass spilled"
        );
        assert_eq!(collect(groups), at_once);
        assert_eq!(at_once.iter().map(|(_, v)| v.len()).sum::<usize>(), 50 * 20);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A file shorter than its run's length (replaced or cut after its seal was checked) ends the
    /// groups with an error rather than quietly dropping its last records.
    #[test]
    fn a_file_run_shorter_than_its_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mr-0-0");
        let mut data = Vec::new();
        records::encode(&mut data, "a", "1");
        std::fs::write(&path, &data).unwrap();
        let run = Run::file(path, data.len() as u64 * 2, "mr-0-0");
        let mut groups = KeyGroups::open(vec![run], &MergeOptions::in_memory()).unwrap();
        while groups.next_group().is_some() {}
        let err = groups.take_error().unwrap().to_string();
        assert!(err.contains("mr-0-0") && err.contains("early"), "{err}");
    }

    #[test]
    fn an_unsorted_run_is_refused_not_split_into_groups() {
        let mut data = Vec::new();
        records::encode(&mut data, "b", "1");
        records::encode(&mut data, "a", "2");
        let mut groups = KeyGroups::open(
            vec![Run::memory(data, "mr-1-0")],
            &MergeOptions::in_memory(),
        )
        .unwrap();
        while groups.next_group().is_some() {}
        let err = groups.take_error().unwrap().to_string();
        assert!(
            err.contains("mr-1-0") && err.contains("not sorted"),
            "{err}"
        );
    }

    #[test]
    fn a_run_cut_short_ends_the_groups_with_an_error() {
        let mut data = Vec::new();
        records::encode(&mut data, "a", "1");
        records::encode(&mut data, "b", "2");
        data.pop();
        let mut groups = KeyGroups::open(
            vec![Run::memory(data, "mr-3-0")],
            &MergeOptions::in_memory(),
        )
        .unwrap();
        // The merge reads a record ahead, so the damage may show before "a" is handed out.
        let mut seen = Vec::new();
        while let Some((key, _)) = groups.next_group() {
            seen.push(key.to_string());
        }
        assert!(seen.len() <= 1, "{seen:?}");
        let err = groups.take_error().unwrap().to_string();
        assert!(err.contains("mr-3-0"), "{err}");
    }
}
