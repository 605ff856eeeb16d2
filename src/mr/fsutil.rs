//! Writing files so readers only ever see complete ones, and opening job files exactly where the
//! coordinator checked them.
//!
//! Job paths reach workers resolved (`..` and symbolic links gone) and checked against the
//! coordinator's `--data-root` directories ([`crate::mr::roots`]). Whoever can write under a root could
//! still swap a checked file or directory for a symbolic link between that check and a worker's open,
//! and have the worker read (an input pointing at its own TLS key) or write (an output directory
//! pointing at `/etc/cron.d`) outside every root. So workers open job files with `openat2`'s
//! `RESOLVE_NO_SYMLINKS` ([`open_exact`]), and write outputs relative to a directory opened the same way
//! ([`stage`]): a link swapped in is refused, never followed.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use rand::Rng;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, CWD};

use crate::mr::MrError;

/// How job files are resolved: no symbolic link anywhere in the path (not even in a directory
/// above), and no `/proc` magic link.
const EXACT: ResolveFlags = ResolveFlags::NO_SYMLINKS.union(ResolveFlags::NO_MAGICLINKS);

/// Opens `path` for reading only if no component of it is a symbolic link: the file the coordinator
/// checked, not whatever a link swapped in since points at. A missing file stays an error of kind
/// `NotFound` (reducers take that for a lost map output).
pub fn open_exact(path: &Path) -> std::io::Result<File> {
    open_exact_with(path, OFlags::RDONLY).map(File::from)
}

/// `openat2(path, flags | O_CLOEXEC, RESOLVE_NO_SYMLINKS)`, its refusals explained.
fn open_exact_with(path: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
    open_exact_at(CWD, path.as_os_str(), flags)
}

/// [`open_exact_with`] relative to the directory `at`.
fn open_exact_at(at: impl AsFd, path: &OsStr, flags: OFlags) -> std::io::Result<OwnedFd> {
    rustix::fs::openat2(at, path, flags | OFlags::CLOEXEC, Mode::empty(), EXACT).map_err(|errno| {
        match errno {
            rustix::io::Errno::LOOP => std::io::Error::other(
                "a component of this path is a symbolic link: job files are opened only where the \
                 coordinator resolved and checked them, so a link put there since is refused",
            ),
            rustix::io::Errno::NOSYS => std::io::Error::other(
                "this kernel has no openat2 (Linux 5.6 or later is needed to open job files safely)",
            ),
            // Not a file's permissions (those give EACCES): a sandbox refusing the call itself.
            rustix::io::Errno::PERM => std::io::Error::other(
                "openat2 is not permitted here: a container's seccomp profile may block it (Docker \
                 allows it from 20.10 on); workers need it to open job files safely",
            ),
            other => other.into(),
        }
    })
}

/// Writes `path` through `fill` into a hidden temporary file in the same directory, then renames it into
/// place. Rename within a directory is atomic, so a crash leaves either no file or the whole file, and a
/// duplicate task replacing an output with identical content is invisible to readers. The temporary name
/// starts with a dot so it never matches `mr-out*`. With `durable`, the data is fsynced before the rename
/// and the directory after it, so after a power loss the file is there whole or not at all.
///
/// For local tools (`mrd sequential`, corpus generation): the directory is resolved first, so a path
/// through a symbolic link the user chose works. Workers writing job outputs use [`stage`].
pub fn write_atomic(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), MrError>,
) -> Result<(), MrError> {
    let dir = parent(path);
    std::fs::create_dir_all(dir).map_err(MrError::io(dir))?;
    let resolved = std::fs::canonicalize(dir).map_err(MrError::io(dir))?;
    stage(&resolved.join(file_name(path)), durable, fill)?
        .commit()
        .map(drop)
}

/// A file written whole under a hidden temporary name beside `path`, not yet in place: the first half
/// of [`write_atomic`], for callers that must ask before they publish (a reducer asks the coordinator
/// whether its attempt may commit). Dropped without [`Staged::commit`], the temporary file is removed.
///
/// Every step after the directory is opened (create, rename, remove, fsync) is relative to that open
/// directory, so a directory swapped for a link afterwards changes nothing.
#[derive(Debug)]
pub struct Staged {
    /// The directory, opened without following links.
    dir: OwnedFd,
    /// The temporary name in it.
    tmp: OsString,
    /// The final name in it.
    name: OsString,
    /// The final path, for messages.
    path: PathBuf,
    durable: bool,
    done: bool,
}

/// Writes `path`'s future content through `fill` into a temporary file (fsynced with `durable`). The
/// directory is created if missing, and refused if any component of its path is a symbolic link
/// ([`open_exact`]).
pub fn stage(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), MrError>,
) -> Result<Staged, MrError> {
    let dir_path = parent(path);
    let dir = create_dir_exact(dir_path).map_err(MrError::io(dir_path))?;
    let name = file_name(path);
    let mut tmp = OsString::from(".");
    tmp.push(&name);
    tmp.push(format!(
        ".tmp-{}-{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    ));
    let tmp_path = dir_path.join(&tmp);
    // O_EXCL: a link planted under the temporary name is not followed either.
    let file = rustix::fs::openat(
        &dir,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )
    .map(File::from)
    .map_err(|errno| MrError::io(&tmp_path)(errno.into()))?;
    let staged = Staged {
        dir,
        tmp,
        name,
        path: path.to_path_buf(),
        durable,
        done: false,
    };
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    fill(&mut writer)?;
    let file = writer
        .into_inner()
        .map_err(|err| MrError::io(&tmp_path)(err.into_error()))?;
    if durable {
        file.sync_all().map_err(MrError::io(&tmp_path))?;
    }
    Ok(staged)
}

/// Opens directory `dir`, first creating it and any missing parents, without following a symbolic
/// link at any step: each missing directory is made relative to its parent's descriptor, and each
/// step is opened beneath the last with `RESOLVE_NO_SYMLINKS`. (`create_dir_all` then
/// [`open_exact`] would create directories wherever a link swapped into the path points.)
fn create_dir_exact(dir: &Path) -> std::io::Result<OwnedFd> {
    const DIRECTORY: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY);
    match open_exact_with(dir, DIRECTORY) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        opened => return opened,
    }
    let start = if dir.is_absolute() { "/" } else { "." };
    let mut at = open_exact_with(Path::new(start), DIRECTORY)?;
    for component in dir.components() {
        let name = match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(name) => name,
        };
        match rustix::fs::mkdirat(&at, name, Mode::from_raw_mode(0o777)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(errno) => return Err(errno.into()),
        }
        at = open_exact_at(&at, name, DIRECTORY)?;
    }
    Ok(at)
}

/// A job directory opened as [`open_exact`] opens files, for removing files from it: what it names
/// stays the directory that was checked even if its path is swapped for a link afterwards.
pub struct ExactDir(OwnedFd);

impl ExactDir {
    /// Opens directory `path`, refusing it if any component is a symbolic link.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        open_exact_with(path, OFlags::RDONLY | OFlags::DIRECTORY).map(ExactDir)
    }

    /// The names this directory holds (not `.` and `..`), each with whether it is a regular file
    /// (a link is not followed to say).
    pub fn entries(&self) -> std::io::Result<Vec<(OsString, bool)>> {
        use rustix::fs::FileType;
        let mut entries = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.0)? {
            let entry = entry?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let kind = match entry.file_type() {
                // Some file systems do not say in the listing.
                FileType::Unknown => FileType::from_raw_mode(
                    rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
                ),
                kind => kind,
            };
            entries.push((
                OsStr::from_bytes(name.to_bytes()).to_owned(),
                kind == FileType::RegularFile,
            ));
        }
        Ok(entries)
    }

    /// Removes the file `name` (one component) from this directory.
    pub fn remove_file(&self, name: &OsStr) -> std::io::Result<()> {
        rustix::fs::unlinkat(&self.0, name, AtFlags::empty()).map_err(Into::into)
    }
}

/// The directory `path` is in.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `path`'s last component (`out` for a path without one).
fn file_name(path: &Path) -> OsString {
    path.file_name()
        .map_or_else(|| OsString::from("out"), OsString::from)
}

impl Staged {
    /// Renames the file into place (and, durable, fsyncs the directory). Fails if the temporary file
    /// is gone, e.g. removed by a later job's `--overwrite`: nothing is then published.
    pub fn commit(mut self) -> Result<Published, MrError> {
        // Before the rename, so that an error still means nothing was published (dropped, the
        // temporary file goes).
        let dir = self
            .dir
            .try_clone()
            .map_err(MrError::io(parent(&self.path)))?;
        self.done = true;
        let renamed = rustix::fs::renameat(&self.dir, &self.tmp, &self.dir, &self.name);
        if let Err(errno) = renamed {
            let _ = rustix::fs::unlinkat(&self.dir, &self.tmp, AtFlags::empty());
            return Err(MrError::io(&self.path)(errno.into()));
        }
        if self.durable {
            // Makes the rename durable.
            rustix::fs::fsync(&self.dir)
                .map_err(|errno| MrError::io(parent(&self.path))(errno.into()))?;
        }
        Ok(Published {
            dir,
            name: std::mem::take(&mut self.name),
        })
    }
}

/// A file [`Staged::commit`] put in place, with the directory it was written in: what its stale
/// temporary files are removed from.
pub struct Published {
    dir: OwnedFd,
    name: OsString,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(&self.dir, &self.tmp, AtFlags::empty());
        }
    }
}

impl Published {
    /// Removes the hidden temporary files other writers left beside this file (`.<name>.tmp-*`):
    /// once it is published they can only be garbage — an attempt killed mid-write (SIGKILL runs no
    /// `Drop`) or one superseded (its rename then fails, and it publishes nothing). Read and removed
    /// through the directory the file was written in, so a link swapped in for the directory's path
    /// since leads nowhere else. Returns how many went.
    pub fn remove_stale_temps(&self) -> usize {
        let mut prefix = b".".to_vec();
        prefix.extend_from_slice(self.name.as_bytes());
        prefix.extend_from_slice(b".tmp-");
        let Ok(entries) = rustix::fs::Dir::read_from(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|entry| entry.file_name().to_bytes().starts_with(&prefix))
            .filter(|entry| {
                rustix::fs::unlinkat(&self.dir, entry.file_name(), AtFlags::empty()).is_ok()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whoever can write under a data root can swap a checked input, or the output directory, for a
    /// link after the coordinator's check: the worker must refuse the link, not read or write where it
    /// points.
    #[test]
    fn job_files_behind_a_symbolic_link_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        let (data, secret) = (root.join("data"), root.join("secret"));
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(secret.join("key"), b"private").unwrap();
        std::fs::write(data.join("input"), b"words").unwrap();
        std::os::unix::fs::symlink(secret.join("key"), data.join("swapped")).unwrap();
        std::os::unix::fs::symlink(&secret, data.join("out")).unwrap();

        let mut read = String::new();
        std::io::Read::read_to_string(&mut open_exact(&data.join("input")).unwrap(), &mut read)
            .unwrap();
        assert_eq!(read, "words");
        for linked in [data.join("swapped"), data.join("out").join("key")] {
            let err = open_exact(&linked).unwrap_err();
            assert!(
                err.to_string().contains("symbolic link"),
                "{linked:?}: {err}"
            );
        }
        let missing = open_exact(&data.join("absent")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);

        // An output directory swapped for a link: nothing is written where it points.
        let fill = |w: &mut dyn Write| w.write_all(b"x").map_err(MrError::io("x"));
        let refused = stage(&data.join("out").join("mr-out-0"), true, fill).unwrap_err();
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        // Nor are missing directories made where it points; made where nothing links away.
        let deeper = data.join("out").join("new").join("mr-out-0");
        let refused = stage(&deeper, true, fill).unwrap_err();
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        assert_eq!(std::fs::read_dir(&secret).unwrap().count(), 1);
        let made = data.join("a").join("b").join("mr-out-0");
        stage(&made, false, fill).unwrap().commit().unwrap();
        assert_eq!(std::fs::read(&made).unwrap(), b"x");
        // Removal through a directory opened the same way.
        let out = ExactDir::open(&data.join("out")).err().expect("a link");
        assert!(out.to_string().contains("symbolic link"), "{out}");
        let a = ExactDir::open(&data.join("a").join("b")).unwrap();
        a.remove_file(OsStr::new("mr-out-0")).unwrap();
        assert!(!made.exists());
        // Local tools resolve the directory they were given first, links included.
        write_atomic(&data.join("out").join("mr-out-0"), false, fill).unwrap();
        assert_eq!(std::fs::read(secret.join("mr-out-0")).unwrap(), b"x");
    }

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
        let published = stage(&path, false, |w| {
            w.write_all(b"done").map_err(MrError::io("x"))
        })
        .unwrap()
        .commit()
        .unwrap();
        assert_eq!(published.remove_stale_temps(), 2);
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

    /// The directory swapped for a link after the publish: the files removed are still the ones
    /// beside the published file, not those where the link points.
    #[test]
    fn stale_temporary_files_are_removed_beside_the_published_file_only() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let (moved, secret) = (root.path().join("moved"), root.path().join("secret"));
        let stale = ".mr-out-0.tmp-1-00000001";
        for dir in [&out, &secret] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join(stale), b"x").unwrap();
        }
        let fill = |w: &mut dyn Write| w.write_all(b"x").map_err(MrError::io("x"));
        let published = stage(&out.join("mr-out-0"), false, fill)
            .unwrap()
            .commit()
            .unwrap();
        std::fs::rename(&out, &moved).unwrap();
        std::os::unix::fs::symlink(&secret, &out).unwrap();
        assert_eq!(published.remove_stale_temps(), 1);
        assert!(secret.join(stale).exists());
        let left: Vec<_> = std::fs::read_dir(&moved)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["mr-out-0"]);
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
