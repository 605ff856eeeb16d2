//! Writing files so readers only ever see complete ones.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::Rng;

use crate::mr::MrError;

/// Writes `path` through `fill` into a hidden temporary file in the same directory, then renames it into
/// place. Rename within a directory is atomic, so a crash leaves either no file or the whole file, and a
/// duplicate task replacing an output with identical content is invisible to readers. The temporary name
/// starts with a dot so it never matches `mr-out*`. With `durable`, the data is fsynced before the rename
/// and the directory after it, so after a power loss the file is there whole or not at all.
pub fn write_atomic(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), MrError>,
) -> Result<(), MrError> {
    stage(path, durable, fill)?.commit()
}

/// A file written whole under a hidden temporary name beside `path`, not yet in place: the first half
/// of [`write_atomic`], for callers that must ask before they publish (a reducer asks the coordinator
/// whether its attempt may commit). Dropped without [`Staged::commit`], the temporary file is removed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    durable: bool,
    done: bool,
}

/// Writes `path`'s future content through `fill` into a temporary file (fsynced with `durable`).
pub fn stage(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), MrError>,
) -> Result<Staged, MrError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(MrError::io(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let staged = Staged {
        tmp: dir.join(format!(
            ".{name}.tmp-{}-{:08x}",
            std::process::id(),
            rand::rng().random::<u32>()
        )),
        path: path.to_path_buf(),
        durable,
        done: false,
    };
    let tmp = &staged.tmp;
    let file = File::create(tmp).map_err(MrError::io(tmp))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    fill(&mut writer)?;
    let file = writer
        .into_inner()
        .map_err(|err| MrError::io(tmp)(err.into_error()))?;
    if durable {
        file.sync_all().map_err(MrError::io(tmp))?;
    }
    Ok(staged)
}

impl Staged {
    /// Renames the file into place (and, durable, fsyncs the directory). Fails if the temporary file
    /// is gone, e.g. removed by a later job's `--overwrite`: nothing is then published.
    pub fn commit(self) -> Result<(), MrError> {
        let durable = self.durable;
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.rename_into_place()?;
        if durable {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// [`Staged::commit`] without the directory fsync.
    fn rename_into_place(mut self) -> Result<(), MrError> {
        self.done = true;
        let result = std::fs::rename(&self.tmp, &self.path).map_err(MrError::io(&self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes the hidden temporary files of `path` that other writers left beside it (`.<name>.tmp-*`):
/// once `path` is published they can only be garbage — an attempt killed mid-write (SIGKILL runs no
/// `Drop`) or one superseded (its rename then fails, and it publishes nothing). Returns how many went.
pub fn remove_stale_temps(path: &Path) -> usize {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .filter(|entry| std::fs::remove_file(entry.path()).is_ok())
        .count()
}

/// Make the entries of `dir` (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> Result<(), MrError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(MrError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mr-out-0");
        let failed = write_atomic(&path, false, |w| {
            w.write_all(b"partial").map_err(MrError::io("x"))?;
            Err(MrError::Other("boom".into()))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&path, true, |w| {
            w.write_all(b"done").map_err(MrError::io("x"))
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"done");
    }

    #[test]
    fn once_published_the_temporary_files_other_writers_left_of_it_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mr-out-1");
        let left = [".mr-out-1.tmp-11-0000abcd", ".mr-out-1.tmp-12-0000ef01"];
        let others = [
            ".mr-out-12.tmp-11-00000001",
            "mr-out-2",
            ".mr-out-2.tmp-3-00000002",
        ];
        for name in left.iter().chain(&others) {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        write_atomic(&path, false, |w| {
            w.write_all(b"done").map_err(MrError::io("x"))
        })
        .unwrap();
        assert_eq!(remove_stale_temps(&path), 2);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = others.iter().map(|n| n.to_string()).collect();
        expected.push("mr-out-1".into());
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_staged_file_is_published_only_by_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mr-out-1");
        let fill = |w: &mut dyn Write| w.write_all(b"x").map_err(MrError::io("x"));
        // Refused: dropped, nothing is left.
        drop(stage(&path, false, fill).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Its temporary file removed meanwhile (a later job's --overwrite): the commit fails and
        // publishes nothing.
        let staged = stage(&path, false, fill).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        assert!(staged.commit().is_err());
        assert!(!path.exists());
        stage(&path, true, fill).unwrap().commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
