//! Running one map or one reduce task in memory; the worker and the sequential runner share this code, so
//! the reference output the tests compare against goes through exactly the same app calls.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::mr::app::{App, Counts};
use crate::mr::merge::{KeyGroups, MergeOptions, Run};
use crate::mr::split::SplitReader;
use crate::mr::{partition, records, MrError};

/// Above this many buffered values per key, a combining map folds them right away, bounding memory by
/// the number of distinct keys rather than the input size.
const COMBINE_EVERY: usize = 64;

/// Text of a chunk of input; invalid UTF-8 is replaced rather than failing the whole job. The strict
/// check first: it is several times faster than the lossy one on valid text, which input nearly
/// always is.
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Runs `app`'s map over the lines of `input` that start in `[offset, offset + length)` (see
/// [`SplitReader`]) and returns one encoded [`records`] buffer per reduce partition, sorted by key (so
/// reducers merge rather than sort; see [`crate::mr::merge`]).
///
/// The input is read a chunk at a time, so memory is bounded by the chunk, the map's output and, for
/// combining apps, the number of distinct keys, never by the input's size.
pub fn run_map(
    app: &dyn App,
    input: &Path,
    offset: u64,
    length: u64,
    n_reduce: u32,
) -> Result<Vec<Vec<u8>>, MrError> {
    let mut reader = SplitReader::open(input, offset, length)?;
    if !app.map_in_chunks() && !app.counts() {
        reader = reader.whole();
    }
    let mut chunk = Vec::new();
    let filename = input.to_string_lossy();
    let mut partitions = vec![Vec::new(); n_reduce.max(1) as usize];
    if app.counts() {
        let mut counts = Counts::default();
        while reader.next_chunk(&mut chunk)? {
            app.map_counts(&filename, &text(&chunk), &mut counts)?;
        }
        for (key, count) in counts.into_pairs() {
            let bucket = partition::bucket(&key, n_reduce) as usize;
            records::encode(&mut partitions[bucket], &key, &count.to_string());
        }
    } else if app.has_combiner() {
        let mut groups: HashMap<String, Vec<String>, foldhash::fast::FixedState> =
            HashMap::default();
        let mut failure = None;
        while reader.next_chunk(&mut chunk)? {
            app.map(&filename, &text(&chunk), &mut |key: &str, value: &str| {
                let values = match groups.get_mut(key) {
                    Some(values) => values,
                    None => groups.entry(key.to_string()).or_default(),
                };
                values.push(value.to_string());
                if values.len() >= COMBINE_EVERY && failure.is_none() {
                    match app.combine(key, values) {
                        Ok(combined) => *values = vec![combined],
                        Err(err) => failure = Some(err),
                    }
                }
            })?;
            if let Some(err) = failure.take() {
                return Err(err.into());
            }
        }
        for (key, values) in groups {
            let value = if values.len() == 1 {
                values.into_iter().next().unwrap_or_default()
            } else {
                app.combine(&key, &values)?
            };
            let bucket = partition::bucket(&key, n_reduce) as usize;
            records::encode(&mut partitions[bucket], &key, &value);
        }
    } else {
        while reader.next_chunk(&mut chunk)? {
            app.map(&filename, &text(&chunk), &mut |key: &str, value: &str| {
                let bucket = partition::bucket(key, n_reduce) as usize;
                records::encode(&mut partitions[bucket], key, value);
            })?;
        }
    }
    let what = filename.as_ref();
    partitions
        .into_iter()
        .map(|partition| records::sorted(partition, what))
        .collect()
}

/// Merges a partition's sorted `runs` (map outputs in map task order) and writes `app`'s output for
/// its key groups to `out`, streaming: memory holds one record per run and one key's values.
///
/// Values of a key keep map task order, which keeps even order-sensitive apps deterministic across
/// re-executions. If a run cannot be read, that is the error, even if the app failed on the groups it
/// saw first.
pub fn run_reduce(
    app: &dyn App,
    runs: Vec<Run>,
    options: &MergeOptions,
    out: &mut dyn Write,
) -> Result<(), MrError> {
    let mut groups = KeyGroups::open(runs, options)?;
    let reduced = app.reduce_partition(&mut groups, out);
    if let Some(err) = groups.take_error() {
        return Err(err);
    }
    Ok(reduced?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::app;

    /// Emits `1` per character and sums: exercises folding values mid-map.
    struct Chars;

    impl App for Chars {
        fn map(
            &self,
            _f: &str,
            contents: &str,
            emit: &mut app::Emit<'_>,
        ) -> Result<(), app::AppError> {
            for c in contents.chars() {
                emit(&c.to_string(), "1");
            }
            Ok(())
        }

        fn reduce(&self, _key: &str, values: &[String]) -> Result<String, app::AppError> {
            let total: u64 = values.iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
            Ok(total.to_string())
        }

        fn has_combiner(&self) -> bool {
            true
        }
    }

    #[test]
    fn combiner_folds_values_during_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "ab".repeat(1000)).unwrap();
        let partitions = run_map(&Chars, &input, 0, u64::MAX, 1).unwrap();
        let mut pairs = Vec::new();
        records::decode_into(&partitions[0], "test", &mut pairs).unwrap();
        // One pre-summed pair per key instead of a thousand.
        assert_eq!(pairs.len(), 2);
        let mut out = Vec::new();
        let runs = partitions.into_iter().map(|p| Run::memory(p, "map 0"));
        run_reduce(&Chars, runs.collect(), &MergeOptions::in_memory(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "a 1000\nb 1000\n");
    }

    /// Issue #17 review: inputs past one chunk. grep's line numbers run on from the file's start (it
    /// gets its file whole), and indexer names a document once however many chunks it was read in.
    #[test]
    fn apps_see_a_file_bigger_than_a_chunk_as_they_expect() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("big.txt");
        let line = "filler words here\n";
        let lines = crate::mr::split::CHUNK / line.len() + 10;
        let mut text = line.repeat(lines);
        text.push_str("needle\n");
        std::fs::write(&input, &text).unwrap();
        let run = |name: &str, args: &[String]| {
            let app = app::build(name, args).unwrap();
            let runs = run_map(app.as_ref(), &input, 0, u64::MAX, 1).unwrap();
            let runs = runs.into_iter().map(|p| Run::memory(p, "map 0")).collect();
            let mut out = Vec::new();
            run_reduce(app.as_ref(), runs, &MergeOptions::in_memory(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let found = run("grep", &["pattern=needle".into()]);
        assert!(
            found.ends_with(&format!(":{:010} needle\n", lines + 1)),
            "{found}"
        );
        let index = run("indexer", &[]);
        let name = input.to_string_lossy();
        assert!(index.contains(&format!("filler 1 {name}\n")), "{index}");
    }

    #[test]
    fn combining_map_and_reduce_count_words() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        let text = "the cat and the hat ".repeat(100);
        std::fs::write(&input, text).unwrap();
        let wc = app::build("wc", &[]).unwrap();
        let partitions = run_map(wc.as_ref(), &input, 0, u64::MAX, 3).unwrap();
        let mut pairs = Vec::new();
        for (i, data) in partitions.iter().enumerate() {
            let before = pairs.len();
            records::decode_into(data, "test", &mut pairs).unwrap();
            for (key, _) in &pairs[before..] {
                assert_eq!(partition::bucket(key, 3) as usize, i);
            }
            // Sorted, so a reducer can merge it.
            assert!(pairs[before..].windows(2).all(|w| w[0].0 <= w[1].0));
        }
        let mut out = Vec::new();
        let runs = partitions.into_iter().map(|p| Run::memory(p, "map 0"));
        run_reduce(
            wc.as_ref(),
            runs.collect(),
            &MergeOptions::in_memory(),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "and 100\ncat 100\nhat 100\nthe 200\n"
        );
    }
}
