//! Running a whole job in one process: the reference output the tests compare distributed runs against,
//! and the single-machine baseline of the benchmark.

use std::path::{Path, PathBuf};

use crate::mr::job::{JobSpec, ShuffleMode};
use crate::mr::merge::{MergeOptions, Run};
use crate::mr::{app, exec, fsutil, MrError};

/// Runs `app` over `inputs` and writes every key's output to `<output_dir>/mr-out-0`, whose path it
/// returns. Inputs are resolved to absolute paths exactly as `mrd submit` does, so apps that print
/// file names (indexer) produce identical output.
pub fn run(
    app_name: &str,
    args: &[String],
    inputs: &[PathBuf],
    output_dir: &Path,
) -> Result<PathBuf, MrError> {
    let spec = JobSpec::prepare(
        app_name,
        args,
        inputs,
        1,
        output_dir,
        ShuffleMode::SharedDir,
    )?;
    let app = app::build(&spec.app, &spec.args)?;
    let mut runs = Vec::new();
    for input in &spec.inputs {
        for partition in exec::run_map(app.as_ref(), input, 0, u64::MAX, 1)? {
            runs.push(Run::memory(partition, input.to_string_lossy()));
        }
    }
    let output = spec.output_path(0);
    let options = MergeOptions::in_memory();
    fsutil::write_atomic(&output, true, |w| {
        exec::run_reduce(app.as_ref(), runs, &options, w)
    })?;
    Ok(output)
}
