//! Tag bundles on disk: `tags/NAME/manifest.json` + `tags/NAME/tag.safetensors`, or a PEFT
//! prompt-tuning adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::files::{
    ensure_not_symlink, open_lock, publish, read_settled, sha256_file, temp_beside, write_atomic,
    LOCK_FILE,
};
use super::template::{is_valid_tag_name, Template};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TENSORS_FILE: &str = "tag.safetensors";
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagKind {
    Domain,
    Function,
}

/// What a function tag's head predicts, and how to read its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HeadSpec {
    /// `d -> 1` on standardised targets; predictions are mapped back to original units.
    Regression { target_mean: f64, target_std: f64 },
    /// `d -> k`, one logit per label.
    Classification { labels: Vec<String> },
}

impl HeadSpec {
    /// `regression` or `classification`, as `/tags` and the errors name it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Regression { .. } => "regression",
            Self::Classification { .. } => "classification",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagManifest {
    pub name: String,
    pub kind: TagKind,
    pub version: u64,
    pub num_vectors: usize,
    pub hidden_size: usize,
    /// Fingerprint of the base model's weights the tag was trained on.
    pub base_model: String,
    #[serde(default)]
    pub head: Option<HeadSpec>,
    /// How many of the tag's last positions the head reads, concatenated in order
    /// (`head.weight` is `[k, head_positions * d]`); 1, the default, reads the last only.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub head_positions: usize,
    /// For function tags: the default template, e.g. `... <SMILES> {smiles} ... <QED>`.
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub domain_tags: Vec<String>,
    /// sha256 of `tag.safetensors`, so a manifest never pairs with other tensors.
    #[serde(default)]
    pub tensors_sha256: Option<String>,
    #[serde(default)]
    pub provenance: serde_json::Value,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// A head's parameters: `weight` `[k, positions * d]`, `bias` `[k]`.
#[derive(Debug, Clone)]
pub struct Head {
    pub spec: HeadSpec,
    /// How many of its tag's last positions it reads, concatenated.
    pub positions: usize,
    pub weight: Tensor,
    pub bias: Tensor,
}

#[derive(Debug, Clone)]
pub struct TagBundle {
    pub manifest: TagManifest,
    /// `[p, d]`
    pub vectors: Tensor,
    pub head: Option<Head>,
    /// `peft` or `bundle`.
    pub source: &'static str,
}

/// What a bundle must agree with to be served with this base model.
#[derive(Debug, Clone)]
pub struct BaseModelIdentity {
    pub fingerprint: String,
    pub hidden_size: usize,
}

impl BaseModelIdentity {
    pub fn of(model: &crate::model::BaseModel) -> Self {
        Self {
            fingerprint: model.fingerprint.clone(),
            hidden_size: model.config().hidden_size,
        }
    }
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

impl TagBundle {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    pub fn num_vectors(&self) -> usize {
        self.manifest.num_vectors
    }

    /// Loads and validates the bundle in `dir` (a tagllm bundle or a PEFT adapter).
    pub fn load(dir: &Path, base: &BaseModelIdentity, device: &Device) -> Result<Self> {
        ensure_not_symlink(dir)?;
        let dir_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("bad bundle directory name"))?;
        if dir.join(MANIFEST_FILE).exists() {
            Self::load_bundle(dir, dir_name, base, device)
        } else if dir.join(PEFT_CONFIG_FILE).exists() {
            Self::load_peft(dir, dir_name, base, device)
        } else {
            bail!("neither {MANIFEST_FILE} nor {PEFT_CONFIG_FILE} found")
        }
    }

    fn load_bundle(
        dir: &Path,
        dir_name: &str,
        base: &BaseModelIdentity,
        device: &Device,
    ) -> Result<Self> {
        let raw = read_settled(&dir.join(MANIFEST_FILE)).context("reading manifest.json")?;
        let mut manifest: TagManifest =
            serde_json::from_slice(&raw).context("manifest.json is not a valid manifest")?;
        ensure!(
            manifest.name == dir_name,
            "manifest names the tag `{}` but its directory is `{dir_name}`",
            manifest.name
        );
        ensure!(
            is_valid_tag_name(&manifest.name),
            "`{}` is not a valid tag name",
            manifest.name
        );
        ensure!(
            manifest.base_model == base.fingerprint,
            "trained for other base weights (fingerprint {}, the served model is {})",
            manifest.base_model,
            base.fingerprint
        );
        ensure!(
            manifest.hidden_size == base.hidden_size,
            "hidden size {} does not match the model's {}",
            manifest.hidden_size,
            base.hidden_size
        );
        let bytes = read_settled(&dir.join(TENSORS_FILE)).context("reading tag.safetensors")?;
        let got = hex::encode(Sha256::digest(&bytes));
        match &manifest.tensors_sha256 {
            Some(want) => ensure!(
                &got == want,
                "tag.safetensors does not match the manifest's sha256 (being rewritten?)"
            ),
            // Recorded at load: what `/tags` shows is then the checksum of what is served.
            None => manifest.tensors_sha256 = Some(got),
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| anyhow!("reading tag.safetensors (truncated or corrupt?): {e}"))?;
        let vectors = tensors
            .remove("vectors")
            .ok_or_else(|| anyhow!("tag.safetensors has no `vectors`"))?;
        ensure!(
            vectors.dims() == [manifest.num_vectors, manifest.hidden_size],
            "vectors have shape {:?}, the manifest says [{}, {}]",
            vectors.dims(),
            manifest.num_vectors,
            manifest.hidden_size
        );
        ensure!(manifest.num_vectors > 0, "a tag needs at least one vector");
        let vectors = vectors.to_dtype(DType::F32)?;
        ensure!(all_finite(&vectors)?, "vectors contain NaN or infinity");
        let head = match &manifest.head {
            None => None,
            Some(spec) => {
                let positions = manifest.head_positions;
                ensure!(
                    (1..=manifest.num_vectors).contains(&positions),
                    "head_positions is {positions}; it must be in 1..=num_vectors ({})",
                    manifest.num_vectors
                );
                Some(Self::load_head(
                    spec,
                    &mut tensors,
                    positions,
                    manifest.hidden_size,
                )?)
            }
        };
        if let Some(t) = &manifest.template {
            let tpl = Template::parse(t);
            ensure!(
                tpl.tags().contains(&manifest.name.as_str()),
                "the template never uses the tag itself"
            );
        }
        ensure!(
            manifest.kind == TagKind::Function || head.is_none(),
            "a domain tag cannot own a head"
        );
        Ok(Self {
            manifest,
            vectors,
            head,
            source: "bundle",
        })
    }

    fn load_head(
        spec: &HeadSpec,
        tensors: &mut HashMap<String, Tensor>,
        positions: usize,
        hidden_size: usize,
    ) -> Result<Head> {
        let d = positions * hidden_size;
        let k = match spec {
            HeadSpec::Regression { target_std, .. } => {
                ensure!(
                    target_std.is_finite() && *target_std > 0.0,
                    "regression target_std must be positive"
                );
                1
            }
            HeadSpec::Classification { labels } => {
                ensure!(
                    labels.len() >= 2,
                    "a classification head needs at least two labels"
                );
                labels.len()
            }
        };
        let weight = tensors
            .remove("head.weight")
            .ok_or_else(|| anyhow!("tag.safetensors has no `head.weight`"))?;
        let bias = tensors
            .remove("head.bias")
            .ok_or_else(|| anyhow!("tag.safetensors has no `head.bias`"))?;
        ensure!(
            weight.dims() == [k, d],
            "head.weight has shape {:?}, expected [{k}, {d}]",
            weight.dims()
        );
        ensure!(
            bias.dims() == [k],
            "head.bias has shape {:?}, expected [{k}]",
            bias.dims()
        );
        let (weight, bias) = (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
        ensure!(
            all_finite(&weight)? && all_finite(&bias)?,
            "head contains NaN or infinity"
        );
        Ok(Head {
            spec: spec.clone(),
            positions,
            weight,
            bias,
        })
    }

    /// A PEFT prompt-tuning adapter: a soft prompt served as a function tag without head,
    /// named after its directory, whose default template puts it before the input.
    fn load_peft(
        dir: &Path,
        dir_name: &str,
        base: &BaseModelIdentity,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            is_valid_tag_name(dir_name),
            "`{dir_name}` is not a valid tag name"
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&read_settled(&dir.join(PEFT_CONFIG_FILE))?)
                .context("adapter_config.json is not valid JSON")?;
        let peft_type = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        ensure!(
            peft_type == "PROMPT_TUNING",
            "PEFT type `{peft_type}` is not supported (only PROMPT_TUNING)"
        );
        let bytes = read_settled(&dir.join(PEFT_WEIGHTS_FILE))
            .context("reading adapter_model.safetensors")?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            anyhow!("reading adapter_model.safetensors (missing, truncated or corrupt?): {e}")
        })?;
        let vectors = tensors
            .remove("prompt_embeddings")
            .ok_or_else(|| anyhow!("adapter_model.safetensors has no `prompt_embeddings`"))?
            .to_dtype(DType::F32)?;
        let (p, d) = vectors
            .dims2()
            .context("prompt_embeddings must be a matrix")?;
        ensure!(p > 0, "prompt_embeddings is empty");
        ensure!(
            d == base.hidden_size,
            "prompt_embeddings width {d} does not match the model's {}",
            base.hidden_size
        );
        if let Some(n) = cfg.get("num_virtual_tokens").and_then(|v| v.as_u64()) {
            ensure!(
                n as usize == p,
                "num_virtual_tokens {n} but prompt_embeddings has {p} rows"
            );
        }
        ensure!(
            all_finite(&vectors)?,
            "prompt_embeddings contain NaN or infinity"
        );
        let manifest = TagManifest {
            name: dir_name.to_string(),
            kind: TagKind::Function,
            version: 1,
            num_vectors: p,
            hidden_size: d,
            base_model: base.fingerprint.clone(),
            head_positions: 1,
            head: None,
            template: Some(format!("<{dir_name}>{{input}}")),
            domain_tags: Vec::new(),
            tensors_sha256: Some(hex::encode(Sha256::digest(&bytes))),
            provenance: serde_json::json!({"source": "peft", "adapter_config": cfg}),
            metrics: serde_json::Value::Null,
        };
        Ok(Self {
            manifest,
            vectors,
            head: None,
            source: "peft",
        })
    }

    /// Writes the bundle to `tags_dir/NAME` so that a reader never sees a half-written tag:
    /// each file goes through a uniquely named temp file + rename, tensors first, and the
    /// manifest carries the tensors' sha256 (a new manifest with old tensors is refused,
    /// not served). Writers of one tag take turns (a lock file in its directory), and one
    /// that finds its version already published (two jobs trained the same tag at once)
    /// publishes the next version instead of overwriting: no result is silently lost.
    /// Returns the version written.
    pub fn save(&self, tags_dir: &Path) -> Result<u64> {
        ensure!(
            is_valid_tag_name(self.name()),
            "`{}` is not a valid tag name",
            self.name()
        );
        let dir = tags_dir.join(self.name());
        // Checked before and after: `create_dir_all` is content with a link to a directory.
        ensure_not_symlink(&dir)?;
        std::fs::create_dir_all(&dir)?;
        ensure_not_symlink(&dir)?;
        let lock = open_lock(&dir.join(LOCK_FILE))?;
        lock.lock()
            .with_context(|| format!("locking {}", dir.display()))?;
        let mut manifest = self.manifest.clone();
        if let Ok(raw) = std::fs::read(dir.join(MANIFEST_FILE)) {
            if let Ok(published) = serde_json::from_slice::<TagManifest>(&raw) {
                manifest.version = manifest.version.max(published.version + 1);
            }
        }
        let mut tensors = HashMap::from([("vectors".to_string(), self.vectors.clone())]);
        if let Some(h) = &self.head {
            tensors.insert("head.weight".into(), h.weight.clone());
            tensors.insert("head.bias".into(), h.bias.clone());
        }
        let tmp = temp_beside(&dir.join(TENSORS_FILE));
        candle_core::safetensors::save(&tensors, &tmp)?;
        manifest.tensors_sha256 = Some(sha256_file(&tmp)?);
        publish(&tmp, &dir.join(TENSORS_FILE))?;
        write_atomic(
            &dir.join(MANIFEST_FILE),
            &serde_json::to_vec_pretty(&manifest)?,
        )?;
        Ok(manifest.version)
    }

    /// Writes the tag's vectors as a PEFT prompt-tuning adapter directory.
    pub fn export_peft(&self, out: &Path, base_model_name: &str) -> Result<()> {
        std::fs::create_dir_all(out)?;
        let cfg = serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.num_vectors(),
            "token_dim": self.manifest.hidden_size,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": base_model_name,
            "inference_mode": true,
        });
        let tmp = temp_beside(&out.join(PEFT_WEIGHTS_FILE));
        candle_core::safetensors::save(
            &HashMap::from([("prompt_embeddings".to_string(), self.vectors.clone())]),
            &tmp,
        )?;
        publish(&tmp, &out.join(PEFT_WEIGHTS_FILE))?;
        write_atomic(
            &out.join(PEFT_CONFIG_FILE),
            &serde_json::to_vec_pretty(&cfg)?,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tags::files::SETTLE;
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
        };
        let mut b = domain_tag("Wide", 1, 0.5);
        b.manifest.kind = TagKind::Function;
        b.manifest.head = Some(spec.clone());
        b.manifest.head_positions = positions;
        b.head = Some(Head {
            spec,
            positions,
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
            let (stop, path, ones, twos) =
                (stop.clone(), tensors.clone(), ones.clone(), twos.clone());
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
}
