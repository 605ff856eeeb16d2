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
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Everything the coordinator checks before accepting a job.
    pub fn validate(&self) -> Result<(), MrError> {
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

    /// Number of map tasks: one per input file.
    pub fn n_map(&self) -> u32 {
        u32::try_from(self.inputs.len()).unwrap_or(u32::MAX)
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
        Ok(JobSpec {
            inputs,
            output_dir,
            ..spec
        })
    }
}

/// `mr-<map>-<reduce>.job<job>`: 6.824's intermediate file name, with the job's id, so a straggler of
/// an earlier job (paused past its timeout, then resumed) renaming its output into a directory a later
/// job uses cannot put its records into that job's reduces.
pub fn intermediate_name(job: u64, map: u32, reduce: u32) -> String {
    format!("mr-{map}-{reduce}.job{job}")
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
    }
}
