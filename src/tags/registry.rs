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
            if name.starts_with('.') || !path.is_dir() {
                continue;
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

    /// Watches the tags directory and rescans shortly after anything in it changes.
    /// The returned watcher must be kept alive.
    pub fn watch(self: &Arc<Self>) -> Result<notify::RecommendedWatcher> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok() {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
        let reg = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tag-watcher".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Debounce: a bundle is several files; let the burst of events settle.
                    std::thread::sleep(Duration::from_millis(150));
                    while rx.try_recv().is_ok() {}
                    match reg.upgrade() {
                        Some(r) => {
                            r.rescan();
                        }
                        None => break,
                    }
                }
            })?;
        Ok(watcher)
    }
}
