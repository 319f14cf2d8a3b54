//! Turning a `--model` argument into a local path. A local file or folder is the default and the
//! only thing the engine loads. A Hugging Face repo id (`org/name`, optionally `@revision`) that
//! is not a local path is downloaded into the hub cache first, but only in builds with the `hub`
//! feature: the default build never touches the network.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// True for `org/name` or `org/name@rev` specs (one slash, no leading `.` or `/`).
fn looks_like_repo_id(spec: &str) -> bool {
    let name = spec.split('@').next().unwrap_or(spec);
    !spec.starts_with(['.', '/', '~'])
        && name.matches('/').count() == 1
        && !name.ends_with(".gguf")
        && name.split('/').all(|part| !part.is_empty())
}

/// The local path of `spec`: the path itself when it exists; with the `hub` feature, the
/// downloaded snapshot of a repo id; otherwise an error saying how to get the files.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if looks_like_repo_id(spec) {
        return download(spec);
    }
    Err(Error::MissingFile {
        path: path.to_path_buf(),
        what: "model",
        hint: "pass a .gguf file or a Hugging Face folder (run scripts/fetch-assets for the default model)",
    })
}

#[cfg(not(feature = "hub"))]
fn download(spec: &str) -> Result<PathBuf> {
    Err(Error::InvalidRequest(format!(
        "model '{spec}': no such file or folder, and this build does not download models; \
         fix the path, or download the repository yourself and pass its folder, or rebuild \
         with `--features hub` to fetch `org/name` from the Hugging Face hub"
    )))
}

#[cfg(feature = "hub")]
fn download(spec: &str) -> Result<PathBuf> {
    use hf_hub::{api::sync::Api, Repo, RepoType};
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::InvalidRequest(format!(
            "downloading {what} of '{spec}' from the Hugging Face hub: {e}"
        ))
    };
    let api = Api::new().map_err(|e| fail("(client)", &e))?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision,
    ));
    let config = repo
        .get("config.json")
        .map_err(|e| fail("config.json", &e))?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if let Err(e) = repo.get(optional) {
            tracing::debug!("{spec}: no {optional} ({e})");
        }
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&index, "safetensors index", e))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard).map_err(|e| fail(shard, &e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| fail("model.safetensors", &e))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_resolve_to_themselves() {
        let dir = std::env::temp_dir();
        assert_eq!(resolve(dir.to_str().unwrap()).unwrap(), dir);
    }

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B-Instruct@main"));
        assert!(!looks_like_repo_id("assets/model.gguf"));
        assert!(!looks_like_repo_id("./org/name"));
        assert!(!looks_like_repo_id("a/b/c"));
    }

    #[cfg(not(feature = "hub"))]
    #[test]
    fn without_the_hub_feature_a_repo_id_says_how_to_proceed() {
        let e = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no such file or folder") && e.contains("--features hub"),
            "{e}"
        );
        let e = resolve("/no/such/model.gguf").unwrap_err().to_string();
        assert!(e.contains("not found") && e.contains("fetch-assets"), "{e}");
    }
}
