//! tagllm's own bundle: `manifest.json` + `tag.safetensors`, loaded with every check and
//! published atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::super::files::{
    ensure_not_symlink, open_lock, publish, read_settled, sha256_file, temp_beside, write_atomic,
    LOCK_FILE,
};
use super::super::template::{is_valid_tag_name, Template};
use super::{all_finite, BaseModelIdentity, Head, HeadSpec, TagBundle, TagKind, TagManifest};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TENSORS_FILE: &str = "tag.safetensors";

impl TagBundle {
    pub(super) fn load_bundle(
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
                    manifest.head_hidden,
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
        ensure!(
            head.is_some() || manifest.head_hidden == 0,
            "head_hidden is set but the tag has no head"
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
        hidden_units: usize,
        hidden_size: usize,
    ) -> Result<Head> {
        let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| anyhow!("tag.safetensors has no `{name}`"))?;
            ensure!(
                t.dims() == dims,
                "{name} has shape {:?}, expected {dims:?}",
                t.dims()
            );
            let t = t.to_dtype(DType::F32)?;
            ensure!(all_finite(&t)?, "{name} contains NaN or infinity");
            Ok(t)
        };
        let input = positions * hidden_size;
        let hidden = match hidden_units {
            0 => None,
            h => Some((
                take("head.hidden.weight", &[h, input])?,
                take("head.hidden.bias", &[h])?,
            )),
        };
        let d = if hidden_units > 0 {
            hidden_units
        } else {
            input
        };
        let k = match spec {
            HeadSpec::Regression {
                target_std, range, ..
            } => {
                ensure!(
                    target_std.is_finite() && *target_std > 0.0,
                    "regression target_std must be positive"
                );
                if let Some([lo, hi]) = range {
                    ensure!(
                        lo.is_finite() && hi.is_finite() && lo < hi,
                        "a regression range must be two finite numbers, the first below the second"
                    );
                }
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
        let weight = take("head.weight", &[k, d])?;
        let bias = take("head.bias", &[k])?;
        Ok(Head {
            spec: spec.clone(),
            positions,
            hidden,
            weight,
            bias,
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
            if let Some((w, b)) = &h.hidden {
                tensors.insert("head.hidden.weight".into(), w.clone());
                tensors.insert("head.hidden.bias".into(), b.clone());
            }
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
}
