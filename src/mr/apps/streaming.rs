//! Hadoop-Streaming-style apps: any executables as mapper and reducer.
//!
//! The mapper gets one input file on stdin (its path in `MR_INPUT_FILE`) and prints `key<TAB>value` lines
//! (a line without a tab is a key with an empty value). The reducer gets every `key<TAB>value` line of one
//! partition on stdin, sorted by key, and whatever it prints becomes that partition's `mr-out-<reduce>`.
//! Both run through `sh -c`, so pipelines work.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};

use crate::mr::app::{App, AppError, Args, Emit, Groups};

/// The mapper and reducer commands of a streaming job.
pub struct Streaming {
    mapper: String,
    reducer: String,
}

impl Streaming {
    /// Reads the `mapper=CMD` and `reducer=CMD` job arguments.
    pub fn new(args: &mut Args<'_>) -> Result<Self, AppError> {
        Ok(Self {
            mapper: args.require("mapper")?,
            reducer: args.require("reducer")?,
        })
    }
}

/// Runs `command`, writes its stdin through `feed`, and copies its stdout to `out`; fails if it exits
/// non-zero.
///
/// Its stdout goes to an unnamed temporary file rather than a pipe: we feed stdin from this thread, and a
/// command that prints before it has read all its input (most do) would otherwise fill the pipe and wait
/// for us while we wait for it. Memory stays at one write's worth either way.
fn run(
    command: &str,
    env: &[(&str, &str)],
    feed: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    out: &mut dyn Write,
) -> Result<(), AppError> {
    let mut captured = tempfile::tempfile()?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::from(captured.try_clone()?))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|err| AppError::Failed(format!("cannot start `{command}`: {err}")))?;
    let fed = match child.stdin.take() {
        Some(stdin) => {
            let mut stdin = std::io::BufWriter::with_capacity(1 << 16, stdin);
            feed(&mut stdin).and_then(|()| stdin.flush())
        }
        None => Ok(()),
    };
    let status = child.wait()?;
    match fed {
        // A command may legitimately stop reading early (e.g. `head`); a broken pipe is not our error.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => return Err(err.into()),
        _ => {}
    }
    if !status.success() {
        return Err(AppError::Failed(format!(
            "`{command}` exited with {status}"
        )));
    }
    captured.seek(SeekFrom::Start(0))?;
    std::io::copy(&mut captured, out)?;
    Ok(())
}

impl App for Streaming {
    /// Like Hadoop Streaming: a mapper process per split, fed the split whole.
    fn splittable(&self) -> bool {
        true
    }

    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        let mut output = Vec::new();
        run(
            &self.mapper,
            &[("MR_INPUT_FILE", filename)],
            |stdin| stdin.write_all(contents.as_bytes()),
            &mut output,
        )?;
        let mut text = String::new();
        output.as_slice().read_to_string(&mut text).map_err(|_| {
            AppError::Failed(format!("mapper `{}` printed invalid UTF-8", self.mapper))
        })?;
        for line in text.lines() {
            let (key, value) = line.split_once('\t').unwrap_or((line, ""));
            emit(key, value);
        }
        Ok(())
    }

    fn reduce(&self, key: &str, _values: &[String]) -> Result<String, AppError> {
        Err(AppError::Failed(format!(
            "streaming reducers see whole partitions, not single keys (key `{key}`)"
        )))
    }

    /// The partition streams into the reducer's stdin as the merge produces it.
    fn reduce_partition(
        &self,
        groups: &mut dyn Groups,
        out: &mut dyn Write,
    ) -> Result<(), AppError> {
        let feed = |stdin: &mut dyn Write| {
            // Record by record, never a key's values at once: a reducer's one hot key stays on disk.
            while let Some((key, value)) = groups.next_record() {
                writeln!(stdin, "{key}\t{value}")?;
            }
            Ok(())
        };
        run(&self.reducer, &[], feed, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::app::MemoryGroups;

    #[test]
    fn mapper_lines_become_pairs_and_reducer_output_is_copied() {
        let app = Streaming {
            mapper: "tr ' ' '\\n' | sed 's/$/\t1/'".into(),
            reducer: "cut -f1 | uniq -c | awk '{print $2, $1}'".into(),
        };
        let mut pairs = Vec::new();
        app.map("f", "b a b", &mut |k: &str, v: &str| {
            pairs.push((k.to_string(), v.to_string()))
        })
        .unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0], ("b".to_string(), "1".to_string()));
        let ones = vec!["1".to_string()];
        let twos = vec!["1".to_string(), "1".to_string()];
        let mut groups = MemoryGroups::new(vec![("a", ones.as_slice()), ("b", twos.as_slice())]);
        let mut out = Vec::new();
        app.reduce_partition(&mut groups, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "a 1\nb 2\n");
    }

    /// One key with a million values: the reducer must get them one record at a time. A merge asked
    /// for the whole group would hold the partition in memory, so this one refuses to hand groups out.
    #[test]
    fn a_hot_key_streams_to_the_reducer_record_by_record() {
        struct OneHotKey {
            left: u32,
        }
        impl Groups for OneHotKey {
            fn next_group(&mut self) -> Option<(&str, &[String])> {
                panic!("the streaming reducer asked for a whole key's values at once");
            }
            fn next_record(&mut self) -> Option<(&str, &str)> {
                self.left = self.left.checked_sub(1)?;
                Some(("hot", "1"))
            }
        }
        let app = Streaming {
            mapper: "cat".into(),
            reducer: "wc -l".into(),
        };
        let mut out = Vec::new();
        app.reduce_partition(&mut OneHotKey { left: 1_000_000 }, &mut out)
            .unwrap();
        assert_eq!(String::from_utf8(out).unwrap().trim(), "1000000");
    }

    #[test]
    fn failing_commands_fail_the_task() {
        let app = Streaming {
            mapper: "exit 3".into(),
            reducer: "cat".into(),
        };
        assert!(app.map("f", "x", &mut |_: &str, _: &str| {}).is_err());
    }
}
