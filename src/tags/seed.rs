//! Seeding a tags directory (a deployment's shared volume) with the bundles an image ships.
//!
//! The rule: a bundle is copied only where no directory of that name exists yet, so a tag
//! that a user or a training job has put in the volume is never overwritten by a later
//! image. Each bundle is copied into a hidden temp directory (the registry skips dot
//! directories) and renamed into place, so a reader sees all of it or none of it, and
//! seeders racing on the same volume cannot interleave: the first rename wins and the
//! others find the name taken.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SeedReport {
    /// Bundles copied in by this call.
    pub seeded: Vec<String>,
    /// Bundles left as they were because a directory of that name was already there.
    pub kept: Vec<String>,
}

/// Copies every bundle directory of `from` into `into` where `into` has none of that name.
pub fn seed_tags(from: &Path, into: &Path) -> Result<SeedReport> {
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let mut names: Vec<String> = std::fs::read_dir(from)
        .with_context(|| format!("reading shipped tags in {}", from.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut report = SeedReport::default();
    for name in names {
        let dest = into.join(&name);
        if dest.exists() {
            report.kept.push(name);
            continue;
        }
        // Unique per seeder, so concurrent seeders never share a temp directory.
        let tmp = into.join(format!(".seed-{name}-{}", uuid::Uuid::new_v4().simple()));
        copy_bundle(&from.join(&name), &tmp)?;
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => report.seeded.push(name),
            // Another seeder renamed its copy in first (rename onto a non-empty directory
            // fails): theirs is the same bundle, keep it.
            Err(_) if dest.is_dir() => {
                std::fs::remove_dir_all(&tmp)?;
                report.kept.push(name);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e).with_context(|| format!("renaming into {}", dest.display()));
            }
        }
    }
    Ok(report)
}

/// Copies the plain files of a bundle directory (bundles are flat) and syncs them, so the
/// rename that publishes the copy never exposes unwritten data after a crash.
fn copy_bundle(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        // Plain files only, and no hidden ones (locks, temp files of a writer).
        if !entry.file_type()?.is_file() || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let to = dst.join(entry.file_name());
        std::fs::copy(entry.path(), &to)
            .with_context(|| format!("copying {}", entry.path().display()))?;
        std::fs::File::open(&to)?.sync_all()?;
    }
    std::fs::File::open(dst)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(root: &Path, name: &str, content: &str) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), content).unwrap();
        std::fs::write(dir.join("tag.safetensors"), content.repeat(100)).unwrap();
    }

    fn read(root: &Path, name: &str) -> String {
        std::fs::read_to_string(root.join(name).join("manifest.json")).unwrap()
    }

    #[test]
    fn seeds_missing_bundles_and_never_overwrites_present_ones() {
        let shipped = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        bundle(shipped.path(), "QED", "shipped-qed");
        bundle(shipped.path(), "SMILES", "shipped-smiles");
        std::fs::write(shipped.path().join("README.md"), "not a bundle").unwrap();
        // A tag a job published into the volume, and one the user retrained.
        bundle(volume.path(), "Mine", "job");
        bundle(volume.path(), "QED", "retrained-qed");

        let report = seed_tags(shipped.path(), volume.path()).unwrap();
        assert_eq!(report.seeded, vec!["SMILES"]);
        assert_eq!(report.kept, vec!["QED"]);
        assert_eq!(read(volume.path(), "QED"), "retrained-qed");
        assert_eq!(read(volume.path(), "SMILES"), "shipped-smiles");
        assert_eq!(read(volume.path(), "Mine"), "job");
        assert!(!volume.path().join("README.md").exists());

        // Idempotent: a second run (the next `up` or an image upgrade) changes nothing.
        let again = seed_tags(shipped.path(), volume.path()).unwrap();
        assert!(again.seeded.is_empty());
        assert_eq!(again.kept, vec!["QED", "SMILES"]);
        let hidden: Vec<_> = std::fs::read_dir(volume.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "temp directories left behind");
    }

    #[test]
    fn concurrent_seeders_leave_exactly_one_complete_copy() {
        let shipped = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        for i in 0..20 {
            bundle(shipped.path(), &format!("T{i}"), &format!("tag-{i}"));
        }
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (from, into) = (shipped.path().to_path_buf(), volume.path().to_path_buf());
                std::thread::spawn(move || seed_tags(&from, &into))
            })
            .collect();
        let mut seeded = 0;
        for h in handles {
            seeded += h.join().unwrap().unwrap().seeded.len();
        }
        assert_eq!(seeded, 20, "each bundle is seeded exactly once");
        for i in 0..20 {
            assert_eq!(read(volume.path(), &format!("T{i}")), format!("tag-{i}"));
        }
    }
}
