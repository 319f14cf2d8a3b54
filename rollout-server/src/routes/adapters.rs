//! Adapter hot-swap: `POST /v1/adapters` loads a PEFT folder from inside `--checkpoints-dir`
//! (between batches: no response mixes two adapters), `DELETE /v1/adapters` goes back to the
//! base model.

use std::path::Path;

use axum::extract::State;
use axum::Json;
use rl_core::wire::{AdapterRequest, AdapterResponse, ErrorBody};
use rl_http::server::{ApiError, ApiJson};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{job_error, Router, Shared};

pub fn router() -> Router {
    OpenApiRouter::new().routes(routes!(load_adapter, unload_adapter))
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
    let Some(root) = &state.checkpoints_dir else {
        return Err(ApiError::forbidden(
            "adapter loading is off: start the server with --checkpoints-dir DIR",
        ));
    };
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
    let swap_ms = state
        .batcher
        .set_adapter(Some(canon.clone()))
        .await
        .map_err(job_error)?;
    Ok(Json(AdapterResponse {
        adapter: Some(canon.display().to_string()),
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
