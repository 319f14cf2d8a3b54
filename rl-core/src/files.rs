//! Durable files: every file or folder this project writes for a user to keep (configs, reports,
//! scores, checkpoints, exports) goes through here. It is written under a hidden temporary name
//! in the same folder (`.NAME.tmp-XXXXXX`, by `tempfile`), fsynced, renamed into place, and the
//! folder fsynced: a crash leaves either the whole thing or a temporary that
//! [`remove_partials`] cleans and nothing reads. Also the sha256 of a file.
//!
//! It must never leave a half-written file under its final name, nor overwrite a folder.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file-system failure, naming the path, what was being done and, for the failures a user
/// fixes (full disk, read-only or forbidden folder), how.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}{}", path.display(), fix_for(source.kind(), parent_of(path)))]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError + use<> {
    let path = path.to_path_buf();
    move |source| FileError {
        action,
        path,
        source,
    }
}

/// What to do about a storage failure of `kind` in `folder` (with a leading `; `), for the kinds
/// a user can fix; empty otherwise. The run's database says the same (`rl-store`).
pub fn fix_for(kind: std::io::ErrorKind, folder: &Path) -> String {
    use std::io::ErrorKind as K;
    let folder = folder.display();
    match kind {
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => format!(
            "; the disk of {folder} is full: free space there (nothing half-written was kept), then resume"
        ),
        K::ReadOnlyFilesystem => {
            format!("; {folder} is on a read-only file system: make it writable, then resume")
        }
        K::PermissionDenied => {
            format!("; this user may not write in {folder}: fix its permissions, then resume")
        }
        _ => String::new(),
    }
}

/// The folder `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The hidden temporary name prefix of `path` (`.NAME.tmp-`).
fn temp_prefix(path: &Path) -> Result<String, FileError> {
    let name = path.file_name().ok_or_else(|| FileError {
        action: "naming a temporary beside",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file or folder name",
        ),
    })?;
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
}

/// fsyncs a file or folder.
fn fsync(path: &Path) -> Result<(), FileError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(err("fsync", path))
}

/// Writes `path` with `bytes`, atomically and durably.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_file_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(err("writing", tmp))
    })
}

/// Writes `path` through `fill`, which writes the temporary file whose path it is given (a writer,
/// or a library that wants a path, such as a PNG encoder); then fsync, rename, fsync the folder.
/// On an error from `fill` the temporary is removed and `path` is untouched.
pub fn write_file_with<T, E: From<FileError>>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let dir = parent_of(path);
    // Keeps the extension: some writers pick the format from it.
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path)?)
        .suffix(&suffix)
        .tempfile_in(dir)
        .map_err(err("creating a temporary file in", dir))?;
    let value = fill(tmp.path())?;
    // By path: `fill` may have written the file through its own handle.
    fsync(tmp.path())?;
    tmp.persist(path).map_err(|e| FileError {
        action: "renaming a temporary file to",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    fsync(dir)?;
    Ok(value)
}

/// Writes `path` through a buffered writer (`fill` writes the contents).
pub fn write_stream<T, E: From<FileError> + From<std::io::Error>>(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<T, E>,
) -> Result<T, E> {
    write_file_with(path, |tmp| {
        let file = File::create(tmp).map_err(err("creating", tmp))?;
        let mut w = std::io::BufWriter::new(file);
        let value = fill(&mut w)?;
        w.flush().map_err(err("writing", tmp))?;
        Ok(value)
    })
}

/// Writes the folder `dir` through `fill`, which fills the temporary folder whose path it is
/// given; every file in it is fsynced, then the folder is renamed into place and its parent
/// fsynced. A non-empty `dir` is never replaced (an empty one is).
pub fn write_dir<T, E: From<FileError>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let nonempty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if nonempty {
        return Err(FileError {
            action: "refusing to write",
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it already exists and is not empty; remove it or pick another",
            ),
        }
        .into());
    }
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(err("creating", parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(dir)?)
        .tempdir_in(parent)
        .map_err(err("creating a temporary folder in", parent))?;
    let value = fill(tmp.path())?;
    let entries = std::fs::read_dir(tmp.path()).map_err(err("listing", tmp.path()))?;
    for entry in entries {
        let entry = entry.map_err(err("listing", tmp.path()))?;
        if entry.path().is_file() {
            fsync(&entry.path())?;
        }
    }
    fsync(tmp.path())?;
    if dir.exists() {
        // Empty (checked above): replaced by the finished folder.
        std::fs::remove_dir(dir).map_err(err("removing the empty folder", dir))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dir).map_err(|source| {
        let _ = std::fs::remove_dir_all(&tmp);
        FileError {
            action: "renaming a temporary folder to",
            path: dir.to_path_buf(),
            source,
        }
    })?;
    fsync(parent)?;
    Ok(value)
}

/// Removes the temporaries (`.NAME.tmp-XXXXXX`, files or folders) a crash left in `parent`;
/// returns how many. A missing `parent` has none.
pub fn remove_partials(parent: &Path) -> Result<usize, FileError> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(err("removing the partial folder", &path))?;
        } else {
            std::fs::remove_file(&path).map_err(err("removing the partial file", &path))?;
        }
        removed += 1;
    }
    Ok(removed)
}

/// Hex sha256 of a file.
pub fn sha256(path: &Path) -> Result<String, FileError> {
    use sha2::Digest;
    let mut f = File::open(path).map_err(err("opening", path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Hex sha256 of bytes in memory (the same digest as [`sha256`] of a file holding them).
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole_and_failures_leave_nothing() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.json");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let e: Result<(), FileError> = write_file_with(&p, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(FileError {
                action: "test",
                path: tmp.to_path_buf(),
                source: std::io::Error::other("boom"),
            })
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "the temporary was removed");
    }

    #[test]
    fn folders_are_never_overwritten_and_partials_are_cleaned() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("iter_0");
        let n: Result<usize, FileError> = write_dir(&d, |tmp| {
            std::fs::write(tmp.join("x"), b"1").unwrap();
            Ok(1)
        });
        assert_eq!(n.unwrap(), 1);
        assert_eq!(std::fs::read(d.join("x")).unwrap(), b"1");
        let again: Result<(), FileError> = write_dir(&d, |_| Ok(()));
        let e = again.unwrap_err().to_string();
        assert!(e.contains("iter_0") && e.contains("not empty"), "{e}");
        // A crash mid-write leaves a temporary; remove_partials cleans it, not the finished one.
        let partial = tempfile::Builder::new()
            .prefix(&temp_prefix(&t.path().join("iter_1")).unwrap())
            .tempdir_in(t.path())
            .unwrap()
            .keep();
        std::fs::write(partial.join("y"), b"2").unwrap();
        assert_eq!(remove_partials(t.path()).unwrap(), 1);
        assert!(!partial.exists() && d.join("x").exists());
        assert_eq!(
            sha256(&d.join("x")).unwrap(),
            "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
        );
    }
}
