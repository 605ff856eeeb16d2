//! Writing files so readers only ever see complete ones.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

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
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(MrError::io(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(MrError::io(&tmp))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        fill(&mut writer)?;
        let file = writer
            .into_inner()
            .map_err(|err| MrError::io(&tmp)(err.into_error()))?;
        if durable {
            file.sync_all().map_err(MrError::io(&tmp))?;
        }
        drop(file);
        std::fs::rename(&tmp, path).map_err(MrError::io(path))?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
}
