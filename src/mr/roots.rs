//! Where a job may read and write: the coordinator's `--data-root` directories.
//!
//! Workers read every input and write every output of a job with their own permissions, so a job that
//! names `/etc/shadow` as input or `/home/x/.ssh` as output directory would make them read or write files
//! no submitter should reach. The coordinator therefore admits a job only if every path, once `..` and
//! symbolic links are resolved, lies under one of its data roots, and only if the output directory is
//! new or empty (like Hadoop's `FileAlreadyExistsException`), so a job never overwrites another's results.
//!
//! The check runs at submit time; a job resumed after a coordinator restart is not checked again (its
//! output directory is legitimately non-empty by then). The admitted spec carries the resolved paths, so
//! workers open what was checked, not what the submitter wrote.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a root or a job path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RootsError {
    /// No `--data-root` was given.
    #[error("at least one --data-root is required: jobs may only read and write under those directories")]
    NoRoots,
    /// A `--data-root` cannot be resolved (it must exist).
    #[error("--data-root {path}: {detail}")]
    BadRoot {
        /// The root as given.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A job path cannot be resolved.
    #[error("{what} {path}: {detail}")]
    Unresolvable {
        /// "input file" or "output directory".
        what: &'static str,
        /// The path as submitted.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A job path resolves outside every root.
    #[error("{what} {path} is outside the coordinator's --data-root directories ({roots})")]
    Outside {
        /// "input file" or "output directory".
        what: &'static str,
        /// The path after resolving `..` and symbolic links.
        path: PathBuf,
        /// The roots, comma-separated.
        roots: String,
    },
    /// The output directory already holds files.
    #[error("output directory {0} already exists and is not empty: choose a new one or empty it")]
    OutputNotEmpty(PathBuf),
    /// The output path exists but is not a directory.
    #[error("output {0} exists and is not a directory")]
    OutputNotDirectory(PathBuf),
    /// `--overwrite` was asked for a directory holding something no job wrote.
    #[error(
        "output directory {dir} holds {name:?}, which no job wrote: --overwrite removes only job \
         outputs (mr-out-*, intermediates); move it away or choose another directory"
    )]
    NotAJobOutput {
        /// The output directory.
        dir: PathBuf,
        /// The first entry that is not a job's.
        name: String,
    },
}

/// Whether `name` is a file a job writes into its output directory: `mr-out-<n>`, an intermediate
/// `mr-<m>-<r>` (or `mr-<m>-<r>.job<j>`, or `mr-<m>-<r>.job<j>.<attempt>`), or the hidden temporary file
/// of one of them.
fn is_job_output(name: &str) -> bool {
    let numbers = |s: &str| {
        s.split('-')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Some(hidden) = name.strip_prefix(".mr-") {
        return hidden.contains(".tmp-");
    }
    let Some(rest) = name.strip_prefix("mr-") else {
        return false;
    };
    if let Some(n) = rest.strip_prefix("out-") {
        return numbers(n) && !n.contains('-');
    }
    let (pair, job) = match rest.split_once(".job") {
        Some((pair, job)) => (pair, Some(job)),
        None => (rest, None),
    };
    let job_and_attempt = |s: &str| match s.split_once('.') {
        Some((job, attempt)) => numbers(job) && numbers(attempt) && !attempt.contains('-'),
        None => numbers(s),
    };
    pair.split('-').count() == 2 && numbers(pair) && job.is_none_or(job_and_attempt)
}

/// Remove the job outputs of a directory [`DataRoots::output`] admitted with `overwrite`: what an
/// earlier job left (a stale `mr-out-7` of a run with more reduces would otherwise pass for part of
/// this one's output). Returns how many files went. The directory is opened once, refusing a symbolic
/// link anywhere in its path, and listed, checked and emptied through that one descriptor: a link
/// swapped in for it after [`DataRoots::output`]'s check cannot turn this into removing files
/// somewhere else.
pub fn clear_outputs(dir: &Path) -> Result<usize, RootsError> {
    const WHAT: &str = "output directory";
    let opened = match crate::mr::fsutil::ExactDir::open(dir) {
        Ok(opened) => opened,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(unresolvable(WHAT, dir, err)),
    };
    let entries = opened
        .entries()
        .map_err(|err| unresolvable(WHAT, dir, err))?;
    // Checked whole first: nothing goes unless everything may.
    for (name, file) in &entries {
        let name = name.to_string_lossy();
        if !(*file && is_job_output(&name)) {
            return Err(RootsError::NotAJobOutput {
                dir: dir.to_path_buf(),
                name: name.into_owned(),
            });
        }
    }
    let mut removed = 0;
    for (name, _) in &entries {
        match opened.remove_file(name) {
            Ok(()) => removed += 1,
            // Gone meanwhile (a straggler's temporary file removed by its own writer).
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(unresolvable(WHAT, dir, err)),
        }
    }
    Ok(removed)
}

/// [`clear_outputs`]'s check alone: every entry of `dir` is a job output.
fn check_only_outputs(dir: &Path) -> Result<(), RootsError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return check_empty(dir);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let file = entry.file_type().is_ok_and(|t| t.is_file());
        if !(file && is_job_output(&name)) {
            return Err(RootsError::NotAJobOutput {
                dir: dir.to_path_buf(),
                name,
            });
        }
    }
    Ok(())
}

/// The resolved `--data-root` directories.
#[derive(Clone, Debug)]
pub struct DataRoots {
    roots: Vec<PathBuf>,
}

impl DataRoots {
    /// Resolves every root (each must exist and be a directory).
    pub fn new(roots: &[PathBuf]) -> Result<DataRoots, RootsError> {
        if roots.is_empty() {
            return Err(RootsError::NoRoots);
        }
        let roots = roots
            .iter()
            .map(|root| resolve_root(root))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DataRoots { roots })
    }

    /// The resolved roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The resolved path of input file `path`, if it lies under a root.
    pub fn input(&self, path: &Path) -> Result<PathBuf, RootsError> {
        const WHAT: &str = "input file";
        if !path.is_absolute() {
            // Relative to what? Not to the coordinator's working directory.
            return Err(RootsError::Unresolvable {
                what: WHAT,
                path: path.to_path_buf(),
                detail: "not an absolute path".into(),
            });
        }
        let resolved = std::fs::canonicalize(path).map_err(|err| unresolvable(WHAT, path, err))?;
        self.inside(WHAT, resolved)
    }

    /// The resolved path of output directory `path`, if it lies under a root and is new or empty (with
    /// `overwrite`: holds nothing but job outputs, which the caller removes with [`clear_outputs`] once
    /// the job is accepted).
    ///
    /// A directory that does not exist yet is resolved through its nearest existing ancestor; the rest of
    /// the path must then be plain names (no `..`), since nothing on disk says where those would lead.
    pub fn output(&self, path: &Path, overwrite: bool) -> Result<PathBuf, RootsError> {
        const WHAT: &str = "output directory";
        let resolved = resolve_new_path(path).map_err(|detail| RootsError::Unresolvable {
            what: WHAT,
            path: path.to_path_buf(),
            detail,
        })?;
        let resolved = self.inside(WHAT, resolved)?;
        match overwrite {
            true => check_only_outputs(&resolved)?,
            false => check_empty(&resolved)?,
        }
        Ok(resolved)
    }

    fn inside(&self, what: &'static str, resolved: PathBuf) -> Result<PathBuf, RootsError> {
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            return Ok(resolved);
        }
        let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        Err(RootsError::Outside {
            what,
            path: resolved,
            roots: roots.join(", "),
        })
    }
}

fn resolve_root(root: &Path) -> Result<PathBuf, RootsError> {
    let bad = |detail: String| RootsError::BadRoot {
        path: root.to_path_buf(),
        detail,
    };
    let resolved = std::fs::canonicalize(root).map_err(|err| bad(err.to_string()))?;
    if !resolved.is_dir() {
        return Err(bad("not a directory".into()));
    }
    Ok(resolved)
}

fn unresolvable(what: &'static str, path: &Path, err: std::io::Error) -> RootsError {
    RootsError::Unresolvable {
        what,
        path: path.to_path_buf(),
        detail: err.to_string(),
    }
}

/// `path` with its longest existing prefix canonicalized and the remaining plain names appended.
fn resolve_new_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("not an absolute path".into());
    }
    let mut existing = path.to_path_buf();
    let mut tail = Vec::new();
    loop {
        match std::fs::symlink_metadata(&existing) {
            Ok(_) => break,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.to_string()),
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            // `..` as the last component, or the root itself missing.
            _ => return Err("a directory that does not exist yet must not contain `..`".into()),
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).map_err(|err| err.to_string())?;
    // `file_name` never yields `.` or `..`, so the tail is plain names.
    resolved.extend(tail.into_iter().rev());
    Ok(resolved)
}

fn check_empty(dir: &Path) -> Result<(), RootsError> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => Err(RootsError::OutputNotEmpty(dir.to_path_buf())),
        Ok(false) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if dir.exists() && !dir.is_dir() => {
            Err(RootsError::OutputNotDirectory(dir.to_path_buf()))
        }
        Err(err) => Err(RootsError::Unresolvable {
            what: "output directory",
            path: dir.to_path_buf(),
            detail: err.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        elsewhere: PathBuf,
        roots: DataRoots,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("root");
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(root.join("in/a.txt"), "a").unwrap();
        std::fs::write(elsewhere.join("secret.txt"), "s").unwrap();
        let roots = DataRoots::new(std::slice::from_ref(&root)).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            elsewhere,
            roots,
        }
    }

    #[test]
    fn inputs_under_a_root_are_admitted_resolved() {
        let f = fixture();
        let dotted = f.root.join("in/../in/a.txt");
        assert_eq!(f.roots.input(&dotted).unwrap(), f.root.join("in/a.txt"));
    }

    #[test]
    fn inputs_outside_every_root_are_refused() {
        let f = fixture();
        let escape = f.root.join("../elsewhere/secret.txt");
        let err = f.roots.input(&escape).unwrap_err();
        assert!(matches!(err, RootsError::Outside { .. }), "{err}");
        assert!(err.to_string().contains("--data-root"), "{err}");
        std::os::unix::fs::symlink(f.elsewhere.join("secret.txt"), f.root.join("link")).unwrap();
        let err = f.roots.input(&f.root.join("link")).unwrap_err();
        assert!(matches!(err, RootsError::Outside { .. }), "{err}");
        let err = f.roots.input(&f.root.join("missing")).unwrap_err();
        assert!(matches!(err, RootsError::Unresolvable { .. }), "{err}");
        let err = f.roots.input(Path::new("in/a.txt")).unwrap_err();
        assert!(matches!(err, RootsError::Unresolvable { .. }), "{err}");
    }

    #[test]
    fn a_root_named_like_a_prefix_is_not_inside() {
        let f = fixture();
        let sibling = f.root.with_file_name("root2");
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(sibling.join("x"), "x").unwrap();
        assert!(f.roots.input(&sibling.join("x")).is_err());
    }

    #[test]
    fn new_output_directories_resolve_through_their_existing_ancestor() {
        let f = fixture();
        let new = f.root.join("out/deeper");
        assert_eq!(f.roots.output(&new, false).unwrap(), new);
        let empty = f.root.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(f.roots.output(&empty, false).unwrap(), empty);
    }

    #[test]
    fn outputs_outside_the_roots_or_not_empty_are_refused() {
        let f = fixture();
        let err = f
            .roots
            .output(&f.root.join("../elsewhere/out"), false)
            .unwrap_err();
        assert!(matches!(err, RootsError::Outside { .. }), "{err}");
        let err = f
            .roots
            .output(&f.root.join("new/../../elsewhere"), false)
            .unwrap_err();
        assert!(matches!(err, RootsError::Unresolvable { .. }), "{err}");
        std::os::unix::fs::symlink(&f.elsewhere, f.root.join("out-link")).unwrap();
        let err = f
            .roots
            .output(&f.root.join("out-link/new"), false)
            .unwrap_err();
        assert!(matches!(err, RootsError::Outside { .. }), "{err}");
        let err = f.roots.output(&f.root.join("in"), false).unwrap_err();
        assert_eq!(err, RootsError::OutputNotEmpty(f.root.join("in")));
        let err = f.roots.output(&f.root.join("in/a.txt"), false).unwrap_err();
        assert_eq!(err, RootsError::OutputNotDirectory(f.root.join("in/a.txt")));
    }

    #[test]
    fn overwrite_clears_job_outputs_and_nothing_else() {
        let f = fixture();
        let out = f.root.join("old-job");
        std::fs::create_dir(&out).unwrap();
        for name in [
            "mr-out-0",
            "mr-out-7",
            "mr-3-1",
            "mr-3-1.job12",
            "mr-3-1.job12.1796405458577423",
            ".mr-out-2.tmp-1-abc",
        ] {
            std::fs::write(out.join(name), "x").unwrap();
        }
        assert!(matches!(
            f.roots.output(&out, false),
            Err(RootsError::OutputNotEmpty(_))
        ));
        assert_eq!(f.roots.output(&out, true).unwrap(), out);
        assert_eq!(clear_outputs(&out).unwrap(), 6);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        // Anything a job did not write stops it, before anything is removed.
        for name in ["mr-out-0", "notes.txt"] {
            std::fs::write(out.join(name), "x").unwrap();
        }
        let err = f.roots.output(&out, true).unwrap_err();
        assert!(err.to_string().contains("notes.txt"), "{err}");
        let err = clear_outputs(&out).unwrap_err();
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert!(out.join("mr-out-0").exists());
        // The directory swapped for a link to another after the check: nothing is removed there.
        let elsewhere = f.root.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("mr-out-0"), "keep").unwrap();
        let swapped = f.root.join("swapped");
        std::os::unix::fs::symlink(&elsewhere, &swapped).unwrap();
        let err = clear_outputs(&swapped).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(elsewhere.join("mr-out-0").exists());
        for name in [
            "mr-out-",
            "mr-out-1-2",
            "mr-1",
            "mr-a-b",
            "mr-1-2.jobx",
            "mr-1-2.job3.x",
            "mr-1-2.job3.4.5",
            ".mr-out-1",
        ] {
            assert!(!is_job_output(name), "{name}");
        }
    }

    #[test]
    fn roots_must_exist() {
        assert_eq!(DataRoots::new(&[]).unwrap_err(), RootsError::NoRoots);
        let err = DataRoots::new(&[PathBuf::from("/nonexistent/ds824")]).unwrap_err();
        assert!(matches!(err, RootsError::BadRoot { .. }), "{err}");
    }
}
