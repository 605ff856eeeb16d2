//! What a job is, and the checks that refuse a bad one at submit time rather than after its tasks fail.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mr::app::AppPolicy;
use crate::mr::roots::DataRoots;
use crate::mr::{app, MrError};
use crate::proto::mr as pb;

/// Most reduce tasks a job may ask for; far beyond any useful value, it stops a typo creating millions of
/// tasks.
pub const MAX_REDUCES: u32 = 100_000;

/// Bytes of input per map task unless the job says otherwise (`mrd submit --split-size`), as HDFS's
/// block size: big enough that a task's start-up cost is noise, small enough that a 10 GiB file is
/// 160 tasks spread over every worker and a lost task costs little to re-run.
pub const DEFAULT_SPLIT_SIZE: u64 = 64 << 20;

/// Most map tasks (input splits) a job may have: every task is a record the coordinator keeps.
pub const MAX_MAPS: usize = 1_000_000;

/// Most map output partitions a job may make (map tasks × reduce tasks): each is a file on a
/// worker's disk (or in the shared directory) and a fetch, so the two caps alone (10^11 files) would
/// let one submit fill any disk's inodes. 10^7 is, say, 10,000 maps of 64 MiB (640 GiB) into 1,000
/// reduces.
pub const MAX_MAP_OUTPUTS: u64 = 10_000_000;

/// Bytes of a job's app arguments, all told. Arguments are a pattern or a few options; a job carrying
/// megabytes of them would be kept, with every finished job, in the coordinator's memory, in sled and
/// in status replies.
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

/// The part of one input file a map task reads: the lines that *start* in `[offset, offset + length)`,
/// so a line crossing a boundary is read whole by the task it starts in, and by no other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Index into [`JobSpec::inputs`].
    pub input: u32,
    /// Where the split starts.
    pub offset: u64,
    /// Bytes it covers; `u64::MAX` for "to the end" (records from before splits existed).
    pub length: u64,
}

/// How map outputs reach reducers (see `proto/mr.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ShuffleMode {
    /// Intermediate files in the job's output directory, which all workers share (6.824).
    #[default]
    SharedDir,
    /// Intermediate files stay with their mapper and are fetched over gRPC (the paper).
    Grpc,
}

/// A job as the coordinator stores it: paths are absolute so any worker can open them regardless of its
/// working directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A registered app name.
    pub app: String,
    /// The app's `key=value` arguments.
    pub args: Vec<String>,
    /// One map task each.
    pub inputs: Vec<PathBuf>,
    /// Number of reduce tasks and output files.
    pub n_reduce: u32,
    /// Receives `mr-out-*` (and the shared-directory intermediates).
    pub output_dir: PathBuf,
    /// How map outputs reach reducers.
    pub shuffle: ShuffleMode,
    /// Bytes of input per map task; 0 means [`DEFAULT_SPLIT_SIZE`].
    #[serde(default)]
    pub split_size: u64,
}

impl JobSpec {
    /// Builds a spec from user input: resolves every path against the current directory and checks the
    /// inputs exist, so the user hears about a typo immediately.
    pub fn prepare(
        app: &str,
        args: &[String],
        inputs: &[PathBuf],
        n_reduce: u32,
        output_dir: &Path,
        shuffle: ShuffleMode,
    ) -> Result<Self, MrError> {
        let inputs = inputs
            .iter()
            .map(|input| {
                std::fs::canonicalize(input).map_err(|err| {
                    MrError::InvalidJob(format!("input file {}: {err}", input.display()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output_dir = std::path::absolute(output_dir).map_err(MrError::io(output_dir))?;
        let spec = Self {
            app: app.to_string(),
            args: args.to_vec(),
            inputs,
            n_reduce,
            output_dir,
            shuffle,
            split_size: 0,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The same job cutting its inputs into map tasks of `split_size` bytes (0: the default).
    pub fn with_split_size(self, split_size: u64) -> Self {
        Self { split_size, ..self }
    }

    /// The split size in effect.
    pub fn effective_split_size(&self) -> u64 {
        if self.split_size == 0 {
            DEFAULT_SPLIT_SIZE
        } else {
            self.split_size
        }
    }

    /// Cuts every input into [`Split`]s of the split size, by the files' sizes now (the map tasks
    /// find the line boundaries), the last split of a file taking up to 10 % more; one split per file for apps that are not
    /// [splittable](crate::mr::app::App::splittable). Every file's last split reads to the end of the
    /// file, so lines appended after submission are still read, once. An empty file is one split, so
    /// every input is at least one map task. Refuses a job of more than [`MAX_MAPS`] tasks, or of
    /// more than [`MAX_MAP_OUTPUTS`] map output partitions.
    pub fn splits(&self) -> Result<Vec<Split>, MrError> {
        let app = app::build(&self.app, &self.args)
            .map_err(|err| MrError::InvalidJob(err.to_string()))?;
        let size = if app.splittable() {
            self.effective_split_size()
        } else {
            u64::MAX
        };
        let mut splits = Vec::with_capacity(self.inputs.len());
        for (input, path) in self.inputs.iter().enumerate() {
            let len = std::fs::metadata(path)
                .map_err(|err| {
                    MrError::InvalidJob(format!("input file {}: {err}", path.display()))
                })?
                .len();
            let input = u32::try_from(input)
                .map_err(|_| MrError::InvalidJob("too many input files".into()))?;
            // Hadoop's slop: a remainder of up to a tenth of a split joins the last split rather than
            // being a map task of its own (a 64 MiB + 6 byte file is one map, not two).
            let slop = size.saturating_add(size / 10);
            let pieces = if len <= slop {
                1
            } else {
                1 + (len - slop).div_ceil(size)
            };
            if splits.len() as u64 + pieces > MAX_MAPS as u64 {
                return Err(MrError::InvalidJob(format!(
                    "the inputs make more than {MAX_MAPS} map tasks at a split size of {size} bytes; \
                     use a larger --split-size"
                )));
            }
            for piece in 0..pieces {
                splits.push(Split {
                    input,
                    offset: piece * size,
                    length: if piece + 1 == pieces { u64::MAX } else { size },
                });
            }
        }
        let outputs = splits.len() as u64 * u64::from(self.n_reduce);
        if outputs > MAX_MAP_OUTPUTS {
            return Err(MrError::InvalidJob(format!(
                "{} map tasks (a split size of {size} bytes) into {} reduce tasks make {outputs} map \
                 output files, more than {MAX_MAP_OUTPUTS}; use a larger --split-size or fewer \
                 --reduces",
                splits.len(),
                self.n_reduce
            )));
        }
        Ok(splits)
    }

    /// The spec a task carries: everything but the inputs, which can be many (a map task carries its
    /// own split instead), so a task message stays small however big the job.
    pub fn without_inputs(&self) -> JobSpec {
        JobSpec {
            app: self.app.clone(),
            args: self.args.clone(),
            inputs: Vec::new(),
            n_reduce: self.n_reduce,
            output_dir: self.output_dir.clone(),
            shuffle: self.shuffle,
            split_size: self.split_size,
        }
    }

    /// Everything the coordinator checks before accepting a job.
    pub fn validate(&self) -> Result<(), MrError> {
        let args_bytes: usize = self.args.iter().map(String::len).sum();
        if args_bytes > MAX_ARGS_BYTES {
            return Err(MrError::InvalidJob(format!(
                "the app's arguments are {args_bytes} bytes; a job may carry at most \
                 {MAX_ARGS_BYTES} (pass large data as an input file)"
            )));
        }
        app::build(&self.app, &self.args).map_err(|err| MrError::InvalidJob(err.to_string()))?;
        if self.n_reduce == 0 || self.n_reduce > MAX_REDUCES {
            return Err(MrError::InvalidJob(format!(
                "the number of reduce tasks must be between 1 and {MAX_REDUCES}, not {}",
                self.n_reduce
            )));
        }
        if self.inputs.is_empty() {
            return Err(MrError::InvalidJob("no input files".into()));
        }
        if self.inputs.len() > MAX_MAPS {
            return Err(MrError::InvalidJob(format!(
                "{} input files; a job may have at most {MAX_MAPS}",
                self.inputs.len()
            )));
        }
        for input in &self.inputs {
            if !input.is_absolute() {
                return Err(MrError::InvalidJob(format!(
                    "input path {} is not absolute",
                    input.display()
                )));
            }
            match std::fs::metadata(input) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(MrError::InvalidJob(format!(
                        "input {} is not a regular file",
                        input.display()
                    )))
                }
                Err(err) => {
                    return Err(MrError::InvalidJob(format!(
                        "input file {}: {err}",
                        input.display()
                    )))
                }
            }
        }
        if !self.output_dir.is_absolute() {
            return Err(MrError::InvalidJob(format!(
                "output directory {} is not absolute",
                self.output_dir.display()
            )));
        }
        Ok(())
    }

    /// Where reduce task `reduce` writes its output.
    pub fn output_path(&self, reduce: u32) -> PathBuf {
        self.output_dir.join(format!("mr-out-{reduce}"))
    }
}

/// What a coordinator accepts from submitters beyond a well-formed job: which restricted apps
/// (`--allow-apps`) and which directories (`--data-root`). Jobs run with the workers' permissions, so
/// this is what keeps a submitter from running shell commands on them or reaching their files.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The restricted apps the operator allowed.
    pub apps: AppPolicy,
    /// Where inputs and outputs may lie.
    pub roots: DataRoots,
}

impl Admission {
    /// Checks `spec` against the policy and returns it with every path resolved (`..` and symbolic
    /// links), so workers open exactly what was checked. The output directory must be new or empty, or
    /// with `overwrite` hold only job outputs (removed once the job is accepted).
    pub fn admit(&self, spec: JobSpec, overwrite: bool) -> Result<JobSpec, MrError> {
        self.apps.check(&spec.app)?;
        let inputs = spec
            .inputs
            .iter()
            .map(|input| self.roots.input(input))
            .collect::<Result<Vec<_>, _>>()?;
        let output_dir = self.roots.output(&spec.output_dir, overwrite)?;
        // Only with --overwrite can an input lie there (the directory is otherwise new or empty), and
        // --overwrite empties it before the job runs: the job would delete its own input.
        if let Some(input) = inputs.iter().find(|input| input.starts_with(&output_dir)) {
            return Err(MrError::InvalidJob(format!(
                "input {} lies in the output directory {}, which --overwrite empties before the job \
                 runs; write the output elsewhere",
                input.display(),
                output_dir.display()
            )));
        }
        Ok(JobSpec {
            inputs,
            output_dir,
            ..spec
        })
    }
}

/// `mr-<map>-<reduce>.job<job>.<attempt>`: 6.824's intermediate file name with the job and the attempt
/// that wrote it. Reducers read only the attempt the coordinator accepted, so a straggler (paused past
/// its timeout, then resumed) renaming its output into place — in this job's directory or a later
/// job's — cannot put its records into any reduce, even from an app that is not deterministic.
pub fn intermediate_name(job: u64, map: u32, reduce: u32, attempt: u64) -> String {
    format!("mr-{map}-{reduce}.job{job}.{attempt}")
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(spec: &JobSpec) -> Self {
        pb::JobSpec {
            app: spec.app.clone(),
            args: spec.args.clone(),
            inputs: spec
                .inputs
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            n_reduce: spec.n_reduce,
            output_dir: spec.output_dir.to_string_lossy().into_owned(),
            shuffle: match spec.shuffle {
                ShuffleMode::SharedDir => pb::ShuffleMode::SharedDir,
                ShuffleMode::Grpc => pb::ShuffleMode::Grpc,
            } as i32,
            split_size: spec.split_size,
        }
    }
}

impl TryFrom<&pb::JobSpec> for JobSpec {
    type Error = MrError;

    fn try_from(spec: &pb::JobSpec) -> Result<Self, MrError> {
        let shuffle = match pb::ShuffleMode::try_from(spec.shuffle) {
            Ok(pb::ShuffleMode::SharedDir) => ShuffleMode::SharedDir,
            Ok(pb::ShuffleMode::Grpc) => ShuffleMode::Grpc,
            Err(_) => {
                return Err(MrError::InvalidJob(format!(
                    "unknown shuffle mode {}",
                    spec.shuffle
                )))
            }
        };
        Ok(JobSpec {
            app: spec.app.clone(),
            args: spec.args.clone(),
            inputs: spec.inputs.iter().map(PathBuf::from).collect(),
            n_reduce: spec.n_reduce,
            output_dir: PathBuf::from(&spec.output_dir),
            shuffle,
            split_size: spec.split_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_jobs_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "x").unwrap();
        let prepare = |app: &str, inputs: &[PathBuf], n: u32| {
            JobSpec::prepare(app, &[], inputs, n, dir.path(), ShuffleMode::SharedDir)
        };
        let err = prepare("wc", &[dir.path().join("missing")], 1).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let err = prepare("nope", std::slice::from_ref(&input), 1).unwrap_err();
        assert!(err.to_string().contains("unknown app"), "{err}");
        let err = prepare("wc", std::slice::from_ref(&input), 0).unwrap_err();
        assert!(err.to_string().contains("reduce tasks"), "{err}");
        let spec = prepare("wc", std::slice::from_ref(&input), 2).unwrap();
        let wire = pb::JobSpec::from(&spec);
        assert_eq!(JobSpec::try_from(&wire).unwrap(), spec);
        // Arguments are kept with the job for as long as it is: megabytes of them are refused.
        let args = |bytes: usize| vec![format!("pattern={}", "x".repeat(bytes - 8))];
        let with_args = |args: Vec<String>| JobSpec {
            app: "grep".into(),
            args,
            ..spec.clone()
        };
        assert!(with_args(args(MAX_ARGS_BYTES)).validate().is_ok());
        let err = with_args(args(MAX_ARGS_BYTES + 1)).validate().unwrap_err();
        assert!(err.to_string().contains("arguments"), "{err}");
    }

    /// `--overwrite` empties the output directory before the job runs: a job reading an earlier
    /// job's output from there would delete its own input.
    #[test]
    fn overwrite_refuses_a_job_whose_input_lies_in_its_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let out = root.join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("mr-out-0"), "a 1\n").unwrap();
        let admission = Admission {
            apps: AppPolicy::new(&[]).unwrap(),
            roots: DataRoots::new(std::slice::from_ref(&root)).unwrap(),
        };
        let spec = |output: &Path| {
            JobSpec::prepare(
                "wc",
                &[],
                &[out.join("mr-out-0")],
                1,
                output,
                ShuffleMode::SharedDir,
            )
            .unwrap()
        };
        let err = admission.admit(spec(&out), true).unwrap_err();
        assert!(
            err.to_string().contains("lies in the output directory"),
            "{err}"
        );
        assert!(out.join("mr-out-0").exists());
        assert!(admission.admit(spec(&root.join("next")), true).is_ok());
    }

    #[test]
    fn inputs_are_cut_into_splits_of_the_split_size_and_empty_files_are_one_task() {
        let dir = tempfile::tempdir().unwrap();
        let (big, empty) = (dir.path().join("big"), dir.path().join("empty"));
        std::fs::write(&big, vec![b'x'; 2500]).unwrap();
        std::fs::write(&empty, "").unwrap();
        let spec = JobSpec::prepare("wc", &[], &[big, empty], 1, dir.path(), ShuffleMode::Grpc)
            .unwrap()
            .with_split_size(1000);
        let splits = spec.splits().unwrap();
        let cut: Vec<(u32, u64, u64)> = splits
            .iter()
            .map(|s| (s.input, s.offset, s.length))
            .collect();
        let to_end = u64::MAX;
        assert_eq!(
            cut,
            vec![
                (0, 0, 1000),
                (0, 1000, 1000),
                (0, 2000, to_end),
                (1, 0, to_end)
            ]
        );
        // grep numbers lines from the file's start: one split per file.
        let grep = JobSpec {
            app: "grep".into(),
            args: vec!["pattern=x".into()],
            ..spec.clone()
        };
        assert_eq!(grep.splits().unwrap().len(), 2);
        // A remainder under a tenth of a split rides with the last split.
        std::fs::write(dir.path().join("big"), vec![b'x'; 2099]).unwrap();
        let cut: Vec<(u64, u64)> = spec.splits().unwrap()[..2]
            .iter()
            .map(|s| (s.offset, s.length))
            .collect();
        assert_eq!(cut, vec![(0, 1000), (1000, to_end)]);
        let err = spec.clone().with_split_size(1).splits();
        assert!(err.is_ok(), "2,100 tasks are allowed");
        // ... but not each into MAX_REDUCES partitions (2.1 × 10^8 files).
        let wide = JobSpec {
            n_reduce: MAX_REDUCES,
            ..spec.clone()
        };
        let err = wide.with_split_size(1).splits().unwrap_err().to_string();
        assert!(err.contains("map output files"), "{err}");
        assert!(spec.without_inputs().inputs.is_empty());
    }
}
