//! The tags directory's file primitives: reading a file once nobody is writing it,
//! writing one atomically (a temp file renamed into place), the writers' lock, and the
//! refusal of symbolic links. Bundles (`bundle/`) are read and written only through
//! these.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

pub(super) fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

/// A file counts as written once it has been left alone this long.
pub(super) const SETTLE: Duration = Duration::from_millis(200);
/// How long a load waits for a file that keeps changing before it refuses it.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// The bytes of a file that nobody is writing: its size and mtime are the same before and
/// after the read, and it was last modified at least [`SETTLE`] ago. A bundle rewritten in
/// place, with no checksum in its manifest to catch it, is then never read half-written;
/// the registry's watcher loads it again once the writer is done.
pub(super) fn read_settled(path: &Path) -> Result<Vec<u8>> {
    let stamp = |p: &Path| -> Result<(u64, SystemTime)> {
        // Not `metadata`: that follows a link, and a bundle's files must be its own.
        let m = std::fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?;
        ensure!(!m.file_type().is_symlink(), "{}", symlink_refusal(p));
        ensure!(m.is_file(), "{} is not a regular file", p.display());
        Ok((m.len(), m.modified()?))
    };
    let started = Instant::now();
    loop {
        let before = stamp(path)?;
        // An mtime in the future is a copy that kept its timestamps, not a writer.
        let age = SystemTime::now().duration_since(before.1).unwrap_or(SETTLE);
        if age >= SETTLE {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if stamp(path)? == before && bytes.len() as u64 == before.0 {
                return Ok(bytes);
            }
        }
        ensure!(
            started.elapsed() < SETTLE_LIMIT,
            "{} is still being written (changed within the last {} ms for {} s)",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            SETTLE.as_millis(),
            SETTLE_LIMIT.as_secs()
        );
        std::thread::sleep(SETTLE.saturating_sub(age).max(Duration::from_millis(10)));
    }
}

/// Serialises writers of one tag directory (`flock`; released when the file closes).
pub(super) const LOCK_FILE: &str = ".lock";

/// Opens (creating) a lock file, never through a symbolic link: a link planted at
/// `.lock` would otherwise have its target truncated.
pub(super) fn open_lock(path: &Path) -> Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    options
        .open(path)
        .with_context(|| format!("opening {} (a symbolic link is refused)", path.display()))
}

pub(super) fn symlink_refusal(path: &Path) -> String {
    format!(
        "{} is a symbolic link: a bundle is a real directory of real files under the tags directory",
        path.display()
    )
}

/// Bundles are read and written only as real directories and files, so that nothing in
/// the tags directory can point a read or a write outside it.
pub(super) fn ensure_not_symlink(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!("{}", symlink_refusal(path)),
        _ => Ok(()),
    }
}

/// A hidden temp name of its own per writer, so concurrent writers never share one.
pub(super) fn unique_temp_name(file: &str) -> String {
    format!(".{file}.{}.tmp", uuid::Uuid::new_v4().simple())
}

/// A temp file beside `path` for a writer to fill and then [`publish`] (safetensors
/// writes its own file).
pub(super) fn temp_beside(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(unique_temp_name(name))
}

/// Puts `bytes` at `path` atomically: a reader sees the old file or the new one.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    std::fs::write(&tmp, bytes)?;
    publish(&tmp, path)
}

/// Moves the written file `tmp` to `path` by rename, synced first.
pub(super) fn publish(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    // Readable by every user (a server may run under another uid than the trainer);
    // the safetensors writer creates its files 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
