use super::*;
use crate::tags::files::LOCK_FILE;
use crate::tags::files::SETTLE;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The base model every test bundle here is made for (`domain_tag`'s hash and size).
pub(crate) fn base() -> BaseModelIdentity {
    BaseModelIdentity {
        fingerprint: "f".repeat(64),
        hidden_size: 4,
    }
}

pub(crate) fn domain_tag(name: &str, version: u64, fill: f32) -> TagBundle {
    TagBundle {
        manifest: TagManifest {
            name: name.into(),
            kind: TagKind::Domain,
            version,
            num_vectors: 2,
            hidden_size: 4,
            base_model: "f".repeat(64),
            head_positions: 1,
            head_hidden: 0,
            head: None,
            template: None,
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
        },
        vectors: Tensor::full(fill, (2, 4), &Device::Cpu).unwrap(),
        head: None,
        source: "bundle",
    }
}

/// A function tag whose head reads `positions` rows, its weight `[1, width]`.
fn wide_head_tag(positions: usize, width: usize) -> TagBundle {
    let spec = HeadSpec::Regression {
        target_mean: 0.0,
        target_std: 1.0,
        range: None,
    };
    let mut b = domain_tag("Wide", 1, 0.5);
    b.manifest.kind = TagKind::Function;
    b.manifest.head = Some(spec.clone());
    b.manifest.head_positions = positions;
    b.head = Some(Head {
        spec,
        positions,
        hidden: None,
        weight: Tensor::ones((1, width), DType::F32, &Device::Cpu).unwrap(),
        bias: Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    });
    b
}

#[test]
fn a_head_over_several_positions_round_trips_and_bad_shapes_are_refused() {
    let base = base();
    let load = |b: TagBundle| {
        let dir = tempfile::tempdir().unwrap();
        b.save(dir.path()).unwrap();
        TagBundle::load(&dir.path().join("Wide"), &base, &Device::Cpu)
    };
    let served = load(wide_head_tag(2, 8)).unwrap();
    assert_eq!(served.manifest.head_positions, 2);
    assert_eq!(served.head.as_ref().unwrap().positions, 2);
    let e = format!("{:#}", load(wide_head_tag(2, 4)).unwrap_err());
    assert!(
        e.contains("head.weight has shape [1, 4], expected [1, 8]"),
        "{e}"
    );
    // The tag has 2 rows: a head cannot read 3.
    let e = format!("{:#}", load(wide_head_tag(3, 12)).unwrap_err());
    assert!(e.contains("head_positions is 3"), "{e}");
    // The default (1) is not written, so older readers see the manifest they know.
    let dir = tempfile::tempdir().unwrap();
    wide_head_tag(1, 4).save(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("Wide").join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("head_positions"), "{text}");
}

#[test]
fn concurrent_publications_of_one_tag_become_consecutive_versions() {
    let dir = tempfile::tempdir().unwrap();
    // Eight jobs that all trained version 1 of <Dom> finish at once.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let root = dir.path().to_path_buf();
            std::thread::spawn(move || domain_tag("Dom", 1, i as f32).save(&root).unwrap())
        })
        .collect();
    let mut versions: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    versions.sort();
    assert_eq!(
        versions,
        (1..=8).collect::<Vec<_>>(),
        "each result gets its own version"
    );
    let base = base();
    let served = TagBundle::load(&dir.path().join("Dom"), &base, &Device::Cpu).unwrap();
    assert_eq!(served.version(), 8);
    #[cfg(unix)]
    for file in [TENSORS_FILE, MANIFEST_FILE] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("Dom").join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o044,
            0o044,
            "{file} must be readable by all: {mode:o}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("Dom"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn tensors_rewritten_in_place_without_a_checksum_are_never_served_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = base();
    // A bundle whose manifest carries no checksum (as a PEFT adapter never does).
    domain_tag("Dom", 1, 1.0).save(dir.path()).unwrap();
    let tag_dir = dir.path().join("Dom");
    let manifest_path = tag_dir.join(MANIFEST_FILE);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    m["tensors_sha256"] = serde_json::Value::Null;
    std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let tensors = tag_dir.join(TENSORS_FILE);
    let ones = std::fs::read(&tensors).unwrap();
    let twos = {
        let other = dir.path().join("other");
        domain_tag("Dom", 1, 2.0).save(&other).unwrap();
        std::fs::read(other.join("Dom").join(TENSORS_FILE)).unwrap()
    };
    assert_eq!(ones.len(), twos.len());
    // A writer that keeps rewriting the file in place, half of it at a time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path, ones, twos) = (stop.clone(), tensors.clone(), ones.clone(), twos.clone());
        std::thread::spawn(move || {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let half = ones.len() / 2;
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let src = if i % 2 == 0 { &twos } else { &ones };
                let at = if i % 4 < 2 { 0 } else { half };
                f.seek(std::io::SeekFrom::Start(at as u64)).unwrap();
                f.write_all(&src[at..at + half]).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let err = TagBundle::load(&tag_dir, &base, &Device::Cpu).unwrap_err();
    assert!(
        format!("{err:#}").contains("still being written"),
        "{err:#}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // Once the writer is done, the file's final content is served, checksum recorded.
    std::fs::write(&tensors, &twos).unwrap();
    let served = TagBundle::load(&tag_dir, &base, &Device::Cpu).unwrap();
    let v: Vec<f32> = served.vectors.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| *x == 2.0), "{v:?}");
    assert_eq!(
        served.manifest.tensors_sha256,
        Some(hex::encode(Sha256::digest(&twos)))
    );
}

#[test]
fn a_name_that_is_a_path_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tags");
    for name in ["..", ".", "a/b"] {
        assert!(domain_tag(name, 1, 0.0).save(&root).is_err(), "{name}");
    }
    assert!(!dir.path().join(MANIFEST_FILE).exists());
}

/// Found by an outside probe: a link in the tags directory let a training job write
/// into the directory it pointed to, and a linked tensors file was served.
#[cfg(unix)]
#[test]
fn nothing_is_read_or_written_through_a_symbolic_link() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tags");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    symlink(&outside, root.join("WriteT")).unwrap();
    let err = domain_tag("WriteT", 1, 0.0).save(&root).unwrap_err();
    assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A `.lock` planted as a link inside a real bundle: its target is not truncated.
    let victim = outside.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::fs::create_dir_all(root.join("Lock")).unwrap();
    symlink(&victim, root.join("Lock").join(LOCK_FILE)).unwrap();
    assert!(domain_tag("Lock", 1, 0.0).save(&root).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");

    // A bundle whose tensors (or whose directory) link outside is refused on load.
    let base = base();
    domain_tag("Evil", 1, 0.0).save(&outside).unwrap();
    std::fs::create_dir_all(root.join("Evil")).unwrap();
    std::fs::copy(
        outside.join("Evil").join(MANIFEST_FILE),
        root.join("Evil").join(MANIFEST_FILE),
    )
    .unwrap();
    symlink(
        outside.join("Evil").join(TENSORS_FILE),
        root.join("Evil").join(TENSORS_FILE),
    )
    .unwrap();
    std::thread::sleep(SETTLE);
    let err = TagBundle::load(&root.join("Evil"), &base, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
    symlink(outside.join("Evil"), root.join("Linked")).unwrap();
    assert!(TagBundle::load(&outside.join("Evil"), &base, &Device::Cpu).is_ok());
    let err = TagBundle::load(&root.join("Linked"), &base, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
}

#[test]
fn a_regression_range_is_optional_in_the_manifest_and_clamps_answers() {
    let spec = |range| HeadSpec::Regression {
        target_mean: 0.5,
        target_std: 0.25,
        range,
    };
    // Without a range a manifest reads and writes as before the field existed.
    let old = r#"{"type":"regression","target_mean":0.5,"target_std":0.25}"#;
    assert_eq!(serde_json::from_str::<HeadSpec>(old).unwrap(), spec(None));
    assert_eq!(serde_json::to_string(&spec(None)).unwrap(), old);
    let bounded = spec(Some([0.0, 1.0]));
    let text = serde_json::to_string(&bounded).unwrap();
    assert_eq!(serde_json::from_str::<HeadSpec>(&text).unwrap(), bounded);
    assert_eq!(regression_value(4.0, 0.5, 0.25, Some([0.0, 1.0])), 1.0);
    assert_eq!(regression_value(-4.0, 0.5, 0.25, Some([0.0, 1.0])), 0.0);
    assert_eq!(regression_value(1.0, 0.5, 0.25, Some([0.0, 1.0])), 0.75);
    assert_eq!(regression_value(4.0, 0.5, 0.25, None), 1.5);
}

#[test]
fn a_bundle_with_an_inverted_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut tag = wide_head_tag(1, 4);
    tag.head.as_mut().unwrap().spec = HeadSpec::Regression {
        target_mean: 0.0,
        target_std: 1.0,
        range: Some([1.0, 0.0]),
    };
    tag.manifest.head = Some(tag.head.as_ref().unwrap().spec.clone());
    tag.save(dir.path()).unwrap();
    let err = TagBundle::load(&dir.path().join(tag.name()), &base(), &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("range"), "{err:#}");
}
