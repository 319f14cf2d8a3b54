//! Adapter hot-swap: `POST /v1/adapters` loads a PEFT folder from inside `--checkpoints-dir`
//! (between batches: no response mixes two adapters), `PUT /v1/adapters/{name}` receives one as
//! bytes with its sha256 (for a server that shares no file system with the sender), keeps it in
//! `--checkpoints-dir/{name}` and loads it, `DELETE /v1/adapters` goes back to the base model.

use std::path::Path;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::Json;
use rl_core::wire::{AdapterRequest, AdapterResponse, AdapterUpload, ErrorBody};
use rl_http::server::{ApiError, ApiJson};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{job_error, off_runtime, Router, Shared};
use crate::batcher::Named;

/// The adapter routes; uploads may be up to `max_upload` bytes.
pub fn router(max_upload: usize) -> Router {
    OpenApiRouter::new()
        .routes(routes!(load_adapter, unload_adapter))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(upload_adapter))
                .layer(DefaultBodyLimit::max(max_upload)),
        )
}

/// The folder adapters load from and are kept in; 403 when the server was started without one.
fn checkpoints_dir(state: &super::AppState) -> Result<&Path, ApiError> {
    state.checkpoints_dir.as_deref().ok_or_else(|| {
        ApiError::forbidden("adapter loading is off: start the server with --checkpoints-dir DIR")
    })
}

/// `POST /v1/adapters`: load a PEFT adapter from inside the checkpoints directory.
#[utoipa::path(post, path = "/v1/adapters", tag = "adapters",
    summary = "Load a PEFT LoRA adapter from inside the checkpoints directory",
    request_body = AdapterRequest,
    responses((status = 200, description = "The adapter now served", body = AdapterResponse),
        (status = 403, description = "Loading is off, or the path is outside --checkpoints-dir", body = ErrorBody),
        (status = 404, description = "No such folder, or a file of the adapter is missing", body = ErrorBody)))]
pub async fn load_adapter(
    State(state): Shared,
    ApiJson(req): ApiJson<AdapterRequest>,
) -> Result<Json<AdapterResponse>, ApiError> {
    let root = checkpoints_dir(&state)?;
    if req.path.is_empty() {
        return Err(ApiError::unprocessable(
            "`path` is empty; send an adapter folder inside --checkpoints-dir",
        ));
    }
    let given = Path::new(&req.path);
    let candidate = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let canon = candidate.canonicalize().map_err(|_| {
        ApiError::not_found(format!(
            "adapter folder `{}` does not exist",
            candidate.display()
        ))
    })?;
    if !canon.starts_with(root) {
        return Err(ApiError::forbidden(format!(
            "`path` {} is outside the checkpoints directory {}; adapters load only from inside it",
            canon.display(),
            root.display()
        )));
    }
    if !canon.is_dir() {
        return Err(ApiError::unprocessable(format!(
            "`path` {} is not a folder; send a PEFT adapter folder ({} + {})",
            canon.display(),
            model::lora::CONFIG_FILE,
            model::lora::WEIGHTS_FILE
        )));
    }
    // The id answered for it: the caller's, else the path as the caller sent it (never the
    // server's resolved path).
    let id = req.id.unwrap_or(req.path);
    if id.is_empty() {
        return Err(ApiError::unprocessable(
            "`id` is empty; send a name or leave it out",
        ));
    }
    let named = Named {
        dir: canon,
        id: id.clone(),
    };
    let swap_ms = state
        .batcher
        .set_adapter(Some(named))
        .await
        .map_err(job_error)?;
    Ok(Json(AdapterResponse {
        adapter: Some(id),
        swap_ms,
    }))
}

/// `DELETE /v1/adapters`: back to the base model.
#[utoipa::path(delete, path = "/v1/adapters", tag = "adapters",
    summary = "Unload the adapter (serve the base model)",
    responses((status = 200, description = "The base model is served", body = AdapterResponse)))]
pub async fn unload_adapter(State(state): Shared) -> Result<Json<AdapterResponse>, ApiError> {
    let swap_ms = state.batcher.set_adapter(None).await.map_err(job_error)?;
    Ok(Json(AdapterResponse {
        adapter: None,
        swap_ms,
    }))
}

/// Longest adapter name.
const MAX_NAME: usize = 128;

/// `PUT /v1/adapters/{name}`: receive an adapter's bytes, keep it, serve it.
#[utoipa::path(put, path = "/v1/adapters/{name}", tag = "adapters",
    summary = "Receive a PEFT LoRA adapter as bytes (checked by sha256), keep it in the checkpoints directory and serve it",
    params(("name" = String, Path, description = "The folder it is kept in, inside --checkpoints-dir: 1 to 128 of A-Z a-z 0-9 . _ -, not starting with a dot")),
    request_body = AdapterUpload,
    responses((status = 200, description = "The adapter now served", body = AdapterResponse),
        (status = 403, description = "Adapter loading is off (no --checkpoints-dir)", body = ErrorBody),
        (status = 409, description = "Another adapter is kept under this name", body = ErrorBody)))]
pub async fn upload_adapter(
    State(state): Shared,
    UrlPath(name): UrlPath<String>,
    ApiJson(req): ApiJson<AdapterUpload>,
) -> Result<Json<AdapterResponse>, ApiError> {
    let root = checkpoints_dir(&state)?.to_path_buf();
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME || name.starts_with('.') || !name.chars().all(valid)
    {
        return Err(ApiError::unprocessable(format!(
            "the adapter name `{name}` is not 1 to {MAX_NAME} of A-Z a-z 0-9 . _ - (not starting with a dot)"
        )));
    }
    // Decoding, hashing and writing megabytes: off the async workers.
    let dir = root.join(&name);
    let (dir, fresh) = off_runtime(&state, move |_| keep(&dir, &req)).await?;
    let named = Named {
        dir: dir.clone(),
        id: name.clone(),
    };
    let swap_ms = match state.batcher.set_adapter(Some(named)).await {
        Ok(ms) => ms,
        Err(e) => {
            // An upload the engine cannot load is not kept: the name stays free for a good one.
            if fresh {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(job_error(e));
        }
    };
    Ok(Json(AdapterResponse {
        adapter: Some(name),
        swap_ms,
    }))
}

/// Checks an upload and writes it to `dir` whole (a hidden temporary, renamed), unless `dir`
/// already holds the same weights; returns `dir` and whether it was written now.
fn keep(dir: &Path, req: &AdapterUpload) -> Result<(std::path::PathBuf, bool), ApiError> {
    use base64::Engine as _;
    let weights = base64::engine::general_purpose::STANDARD
        .decode(&req.weights_base64)
        .map_err(|e| ApiError::unprocessable(format!("`weights_base64` is not base64: {e}")))?;
    let sha256 = rl_core::files::sha256_bytes(&weights);
    if !sha256.eq_ignore_ascii_case(&req.sha256) {
        return Err(ApiError::unprocessable(format!(
            "`sha256` is {} but the weights sent hash to {sha256}; nothing was kept",
            req.sha256
        )));
    }
    if !req.config.is_object() {
        return Err(ApiError::unprocessable(
            "`config` must be the adapter_config.json object",
        ));
    }
    // Kept already (a retry, or the same upload racing this one): the same weights are fine.
    let already = || match rl_core::files::sha256(&dir.join(model::lora::WEIGHTS_FILE)) {
        Ok(on_disk) if on_disk == sha256 => Ok((dir.to_path_buf(), false)),
        _ => Err(ApiError::conflict(format!(
            "another adapter is kept as {}; send it under another name",
            dir.display()
        ))),
    };
    if dir.exists() {
        return already();
    }
    let config = serde_json::to_vec_pretty(&req.config)
        .map_err(|e| ApiError::internal(format!("writing the adapter config: {e}")))?;
    rl_core::files::write_dir(dir, |tmp| -> Result<(), rl_core::files::FileError> {
        let write = |file: &str, bytes: &[u8]| {
            let path = tmp.join(file);
            std::fs::write(&path, bytes).map_err(|source| rl_core::files::FileError {
                action: "writing",
                path,
                source,
            })
        };
        write(model::lora::CONFIG_FILE, &config)?;
        write(model::lora::WEIGHTS_FILE, &weights)
    })
    .map_or_else(
        // Another upload of the name won the race: compare with what it kept.
        |e| match dir.join(model::lora::WEIGHTS_FILE).exists() {
            true => already(),
            false => Err(ApiError::internal(format!("keeping the adapter: {e}"))),
        },
        |()| Ok((dir.to_path_buf(), true)),
    )
}
