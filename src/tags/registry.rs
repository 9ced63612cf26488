//! The in-memory set of served tags, rebuilt from `tags/` on start, on every change the
//! file watcher reports (debounced) and on demand. Each rescan publishes a new immutable
//! `TagSet`; a request holds the `Arc<TagSet>` it started with, so it keeps its versions.
//! A bundle that fails validation is reported and never replaces the last good version.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use candle_core::Device;
use notify::{RecursiveMode, Watcher};
use serde::Serialize;

use super::bundle::{BaseModelIdentity, TagBundle};

#[derive(Debug, Default)]
pub struct TagSet {
    pub tags: BTreeMap<String, Arc<TagBundle>>,
    /// Bundle directory -> why it is not (or no longer) served in its current form.
    pub errors: BTreeMap<String, String>,
}

impl TagSet {
    pub fn get(&self, name: &str) -> Option<&Arc<TagBundle>> {
        self.tags.get(name)
    }

    /// The same tags (shared), without the error list.
    pub fn clone_tags(&self) -> TagSet {
        TagSet {
            tags: self.tags.clone(),
            errors: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub failed: BTreeMap<String, String>,
}

/// What a directory looked like when last scanned: files with sizes and mtimes.
type Signature = Vec<(String, u64, Option<SystemTime>)>;

fn signature(dir: &Path) -> Signature {
    let mut sig: Signature = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    sig.sort();
    sig
}

pub struct Registry {
    dir: PathBuf,
    base: BaseModelIdentity,
    device: Device,
    current: RwLock<Arc<TagSet>>,
    /// Serialises rescans and remembers each directory's signature at its last scan.
    seen: Mutex<HashMap<String, Signature>>,
    last_scan: Mutex<std::time::Instant>,
}

impl Registry {
    pub fn open(dir: &Path, base: BaseModelIdentity, device: Device) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating tags dir {}", dir.display()))?;
        let reg = Arc::new(Self {
            dir: dir.to_path_buf(),
            base,
            device,
            current: RwLock::new(Arc::new(TagSet::default())),
            seen: Mutex::new(HashMap::new()),
            last_scan: Mutex::new(std::time::Instant::now()),
        });
        reg.rescan();
        Ok(reg)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self) -> Arc<TagSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies what changed on disk since the last scan.
    pub fn rescan(&self) -> ReloadReport {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        *self
            .last_scan
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
        let old = self.snapshot();
        let mut tags = old.tags.clone();
        let mut errors = old.errors.clone();
        let mut report = ReloadReport::default();
        let mut present = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                continue;
            }
            // `file_type` does not follow links. A link goes to the load like a directory
            // does, and the load refuses it first thing, so it is listed with its reason.
            match entry.file_type() {
                Ok(t) if t.is_dir() || t.is_symlink() => {}
                _ => continue,
            }
            present.push(name.clone());
            let sig = signature(&path);
            if seen.get(&name) == Some(&sig) {
                continue;
            }
            seen.insert(name.clone(), sig);
            match TagBundle::load(&path, &self.base, &self.device) {
                Ok(bundle) => {
                    errors.remove(&name);
                    let replaced = tags.insert(name.clone(), Arc::new(bundle)).is_some();
                    if replaced {
                        &mut report.replaced
                    } else {
                        &mut report.added
                    }
                    .push(name);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(tag = %name, error = %why, "tag bundle rejected; the last good version (if any) stays");
                    report.failed.insert(name.clone(), why.clone());
                    errors.insert(name, why);
                }
            }
        }
        for gone in tags
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect::<Vec<_>>()
        {
            tags.remove(&gone);
            report.removed.push(gone);
        }
        errors.retain(|k, _| present.contains(k));
        seen.retain(|k, _| present.contains(k));
        if !(report.added.is_empty() && report.replaced.is_empty() && report.removed.is_empty())
            || errors != old.errors
        {
            tracing::info!(added = ?report.added, replaced = ?report.replaced, removed = ?report.removed, "tags reloaded");
            *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(TagSet { tags, errors });
        }
        report
    }

    /// Watches the tags directory and rescans shortly after anything in it changes; and
    /// every [`RESCAN_EVERY`] anyway, for changes a watch misses (network filesystems,
    /// a full inotify queue). A directory removed and made again is a new inode that the
    /// old watch no longer sees: the watch is re-armed whenever the directory's identity
    /// changes. Watching stops when the returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<TagsWatch> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok() {
                    let _ = tx.send(());
                }
            })?;
        let guard = Arc::new(());
        let alive = Arc::downgrade(&guard);
        let mut armed = dir_identity(&self.dir);
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
        let reg = Arc::downgrade(self);
        let dir = self.dir.clone();
        std::thread::Builder::new()
            .name("tag-watcher".into())
            .spawn(move || loop {
                let changed = match rx.recv_timeout(REARM_CHECK_EVERY) {
                    Ok(()) => {
                        // Debounce: a bundle is several files; let the burst settle.
                        std::thread::sleep(Duration::from_millis(150));
                        while rx.try_recv().is_ok() {}
                        true
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                };
                // The guard or the registry is gone: stop watching.
                let Some(r) = reg.upgrade().filter(|_| alive.strong_count() > 0) else {
                    break;
                };
                let now = dir_identity(&dir);
                let rearm = now != armed;
                if rearm {
                    let _ = watcher.unwatch(&dir);
                    armed = match now {
                        Some(_) => match watcher.watch(&dir, RecursiveMode::Recursive) {
                            Ok(()) => {
                                tracing::info!(dir = %dir.display(), "tags directory is back; watching it again");
                                now
                            }
                            // Retried at the next check.
                            Err(_) => None,
                        },
                        None => None,
                    };
                }
                let due = r.last_scan().elapsed() >= RESCAN_EVERY;
                if changed || rearm || due {
                    r.rescan();
                }
            })?;
        Ok(TagsWatch { _alive: guard })
    }

    fn last_scan(&self) -> std::time::Instant {
        *self
            .last_scan
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often the watcher checks that its directory is still the one it watches.
const REARM_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the directory is rescanned even when no change was reported (a scan reads
/// only directory listings and file stamps unless something changed).
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Keeps a [`Registry::watch`] running; dropping it stops the watcher thread (within a
/// second).
pub struct TagsWatch {
    _alive: Arc<()>,
}

/// Which directory `dir` is now (device and inode), if it exists.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(dir).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        // No inode to tell a new directory from the old: re-arm on reappearance only.
        let _ = meta;
        Some((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::bundle::tests::{base, domain_tag};

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Found by an outside probe: after the tags directory was deleted and restored, the
    /// watcher never noticed a bundle again (its inotify watch was on the old inode).
    #[test]
    fn the_watcher_rearms_when_its_directory_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tags");
        let reg = Registry::open(&root, base(), Device::Cpu).unwrap();
        let _watch = reg.watch().unwrap();
        domain_tag("One", 1, 0.0).save(&root).unwrap();
        wait_for("One served", || reg.snapshot().get("One").is_some());
        std::fs::remove_dir_all(&root).unwrap();
        wait_for("One unserved", || reg.snapshot().tags.is_empty());
        std::fs::create_dir_all(&root).unwrap();
        // Give the watcher time to re-arm, then add a bundle to the new directory.
        std::thread::sleep(2 * REARM_CHECK_EVERY);
        // Each noticed as an event (the settle wait and debounce), well before the
        // periodic rescan would find it.
        for name in ["Two", "Three"] {
            let started = std::time::Instant::now();
            domain_tag(name, 1, 0.0).save(&root).unwrap();
            wait_for(name, || reg.snapshot().get(name).is_some());
            assert!(
                started.elapsed() < RESCAN_EVERY / 4,
                "{name}: {:?}",
                started.elapsed()
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_linked_bundle_directory_is_listed_as_refused_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tags");
        let outside = dir.path().join("outside");
        domain_tag("Evil", 1, 0.0).save(&outside).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(outside.join("Evil"), root.join("Evil")).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let reg = Registry::open(&root, base(), Device::Cpu).unwrap();
        let set = reg.snapshot();
        assert!(set.get("Evil").is_none());
        assert!(
            set.errors["Evil"].contains("symbolic link"),
            "{:?}",
            set.errors
        );
    }
}
