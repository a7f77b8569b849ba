//! The master's HTTP JSON API under `/api/v1`, behind a bearer token.
//!
//! Reads go to the store through a read-only SQLite connection (WAL lets them run beside the
//! core's writes); changes go to the core as commands. Bad input gets a 4xx with a message that
//! names what is wrong; internal errors a plain 500 while the detail goes to the log. A wrong
//! token gets 401 and is logged without the token.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gridq_common::{JobId, SweepId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::service::{self, Handle};
use crate::store::{JobRow, JobState, Reader, Store, SubmitSummary};
use crate::sweep::{self, LoadOptions};

#[derive(Clone)]
struct AppState {
    handle: Handle,
    reader: Arc<Mutex<Reader>>,
}

/// An API error: status and message.
#[derive(Debug)]
pub struct AppError(StatusCode, String);

impl AppError {
    fn bad(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, message.into())
    }
    fn internal(detail: impl std::fmt::Display) -> Self {
        error!(cause = %detail, "internal error in the API");
        Self(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the master's log".into(),
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, AppError>;

/// Serves the API until `stop` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    handle: Handle,
    db: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let reader = match Store::reader(&db) {
        Ok(r) => r,
        Err(e) => {
            error!(cause = %e, "cannot open the store for reading; the API is down");
            return;
        }
    };
    let state = AppState {
        handle,
        reader: Arc::new(Mutex::new(reader)),
    };
    let app = router(state);
    let shutdown = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        error!(cause = %e, "the API server stopped");
    }
}

fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/sweeps", get(list_sweeps).post(submit))
        .route("/sweeps/{name}", get(get_sweep))
        .route("/sweeps/{name}/cancel", post(cancel_sweep))
        .route("/sweeps/{name}/retry", post(retry_sweep))
        .route("/sweeps/{name}/results", get(results))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/logs", get(job_logs))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/workers", get(workers))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/v1", api)
        .with_state(state)
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), state.handle.token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            warn!(path = %request.uri().path(), "request with a missing or wrong token refused");
            AppError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token (Authorization: Bearer <token>)".into(),
            )
            .into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Reader) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> ApiResult<T> {
    let reader = state.reader.clone();
    tokio::task::spawn_blocking(move || {
        let guard = reader
            .lock()
            .map_err(|_| AppError::internal("reader lock poisoned"))?;
        f(&guard).map_err(AppError::internal)
    })
    .await
    .map_err(AppError::internal)?
}

fn sweep_id(name: &str) -> ApiResult<SweepId> {
    SweepId::new(name).map_err(|e| AppError::bad(e.to_string()))
}

/// A sweep submission.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The sweep file's text.
    pub yaml: String,
    /// The file name, for messages and the default sweep name.
    #[serde(default)]
    pub source: Option<String>,
    /// The command, for bare parameters files (or to override the file's).
    #[serde(default)]
    pub command: Option<String>,
    /// Run every job again, even those that succeeded.
    #[serde(default)]
    pub rerun: bool,
}

/// The answer to a submission.
#[derive(Debug, Deserialize, Serialize)]
pub struct SubmitResponse {
    pub sweep: String,
    pub summary: SubmitSummary,
    pub warnings: Vec<String>,
}

async fn submit(
    State(state): State<AppState>,
    Json(req): Json<SubmitRequest>,
) -> ApiResult<Json<SubmitResponse>> {
    let source = req.source.clone().unwrap_or_else(|| "sweep.yaml".into());
    let default_name = std::path::Path::new(&source)
        .file_stem()
        .map_or_else(|| "sweep".to_owned(), |s| s.to_string_lossy().into_owned());
    let options = LoadOptions {
        command: req.command.clone(),
    };
    let yaml = req.yaml;
    let (record, jobs, warnings) = tokio::task::spawn_blocking(move || {
        let loaded = sweep::load_str(&yaml, &source, &default_name, &options)?;
        let (record, jobs) = service::plan_submission(&loaded.sweep, &yaml)?;
        Ok::<_, sweep::SweepError>((
            record,
            jobs,
            loaded
                .warnings
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        ))
    })
    .await
    .map_err(AppError::internal)?
    .map_err(|e| AppError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let name = record.name.to_string();
    let summary = state
        .handle
        .submit(record, jobs, req.rerun)
        .await
        .map_err(AppError::internal)?;
    Ok(Json(SubmitResponse {
        sweep: name,
        summary,
        warnings,
    }))
}

async fn list_sweeps(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let sweeps = read(&state, |r| r.view().sweeps()).await?;
    Ok(Json(serde_json::json!({ "sweeps": sweeps })))
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// Long-poll: answer once the master's change counter is above this (or after `wait_ms`).
    after: Option<u64>,
    wait_ms: Option<u64>,
}

async fn get_sweep(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = sweep_id(&name)?;
    if let Some(after) = q.after {
        let mut changes = state.handle.changes.clone();
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(10_000).min(60_000));
        let _ = tokio::time::timeout(wait, changes.wait_for(|v| *v > after)).await;
    }
    let version = *state.handle.changes.borrow();
    let found = read(&state, move |r| r.view().sweep(&id)).await?;
    let sweep = found.ok_or_else(|| AppError::not_found(format!("no sweep named `{name}`")))?;
    let done = service::sweep_done(&sweep.counts);
    Ok(Json(
        serde_json::json!({ "version": version, "done": done, "sweep": sweep }),
    ))
}

async fn cancel_sweep(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = sweep_id(&name)?;
    let n = state
        .handle
        .cancel_sweep(id)
        .await
        .map_err(AppError::not_found)?;
    Ok(Json(serde_json::json!({ "canceled": n })))
}

async fn retry_sweep(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = sweep_id(&name)?;
    let n = state
        .handle
        .retry_failed(id)
        .await
        .map_err(AppError::internal)?;
    Ok(Json(serde_json::json!({ "retried": n })))
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    sweep: Option<String>,
    state: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

async fn list_jobs(
    State(state): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let sweep = q.sweep.as_deref().map(sweep_id).transpose()?;
    let st = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<JobState>()
                .map_err(|e| AppError::bad(format!("`state`: {e}")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let offset = q.offset.unwrap_or(0);
    let jobs = read(&state, move |r| {
        r.view().jobs(sweep.as_ref(), st, limit, offset)
    })
    .await?;
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

#[derive(Debug, Deserialize)]
struct JobQuery {
    sweep: Option<String>,
    attempt: Option<u32>,
}

/// Finds one job by id or unique id prefix (at least 4 hex digits), optionally in a sweep.
async fn find_job(state: &AppState, id: &str, sweep: Option<&str>) -> ApiResult<JobRow> {
    let prefix = id.to_ascii_lowercase();
    if prefix.len() < 4
        || prefix.len() > JobId::HEX_LEN
        || !prefix.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(AppError::bad(format!(
            "`{id}` is not a job id: expected 4 to 32 hexadecimal digits"
        )));
    }
    let sweep = sweep.map(sweep_id).transpose()?;
    let matches = read(state, move |r| r.view().find_jobs(&prefix, 50)).await?;
    let matches: Vec<JobRow> = matches
        .into_iter()
        .filter(|j| sweep.as_ref().is_none_or(|s| &j.sweep == s))
        .collect();
    match matches.len() {
        0 => Err(AppError::not_found(format!("no job `{id}`"))),
        1 => Ok(matches
            .into_iter()
            .next()
            .ok_or_else(|| AppError::not_found("gone"))?),
        _ => {
            let shown: Vec<String> = matches
                .iter()
                .take(5)
                .map(|j| format!("{}/{}", j.sweep, j.id))
                .collect();
            Err(AppError(
                StatusCode::CONFLICT,
                format!(
                    "`{id}` matches several jobs ({}); give more digits or the sweep",
                    shown.join(", ")
                ),
            ))
        }
    }
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let (s, j) = (job.sweep.clone(), job.id);
    let (attempts, duplicates) = read(&state, move |r| {
        Ok((r.view().attempts(&s, &j)?, r.view().duplicates(&s, &j)?))
    })
    .await?;
    Ok(Json(
        serde_json::json!({ "job": job, "attempts": attempts, "duplicate_results": duplicates }),
    ))
}

async fn job_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let (s, j, attempt) = (job.sweep.clone(), job.id, q.attempt);
    let lines = read(&state, move |r| r.view().logs(&s, &j, attempt, 1_000_000)).await?;
    let lines: Vec<serde_json::Value> = lines
        .into_iter()
        .map(|(attempt, seq, l)| serde_json::json!({ "attempt": attempt, "seq": seq, "stream": l.stream, "line": l.line, "ts_ms": l.ts_ms }))
        .collect();
    Ok(Json(
        serde_json::json!({ "sweep": job.sweep, "job": job.id, "state": job.state, "lines": lines }),
    ))
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let changed = state
        .handle
        .cancel_job(job.sweep.clone(), job.id)
        .await
        .map_err(AppError::internal)?;
    let message = if changed {
        "canceled".to_owned()
    } else {
        format!(
            "job {} already finished ({}); nothing changed",
            job.id, job.state
        )
    };
    Ok(Json(
        serde_json::json!({ "canceled": changed, "message": message }),
    ))
}

async fn workers(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let workers = read(&state, |r| r.view().workers()).await?;
    Ok(Json(serde_json::json!({ "workers": workers })))
}

#[derive(Debug, Deserialize)]
struct ResultsQuery {
    format: Option<String>,
}

async fn results(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Response> {
    let id = sweep_id(&name)?;
    let format = q.format.unwrap_or_else(|| "jsonl".into());
    if format != "csv" && format != "jsonl" {
        return Err(AppError::bad(format!(
            "`format`: expected csv or jsonl, found `{format}`"
        )));
    }
    let id2 = id.clone();
    let (record, jobs) = read(&state, move |r| {
        Ok((
            r.view().sweep_record(&id2)?,
            r.view().jobs(Some(&id2), None, u64::MAX >> 1, 0)?,
        ))
    })
    .await?;
    let record = record.ok_or_else(|| AppError::not_found(format!("no sweep named `{name}`")))?;
    let body = if format == "csv" {
        results_csv(&record.param_names, &jobs).map_err(AppError::internal)?
    } else {
        let mut out = String::new();
        for j in &jobs {
            out.push_str(&serde_json::to_string(j).map_err(AppError::internal)?);
            out.push('\n');
        }
        out
    };
    let content_type = if format == "csv" {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// One CSV row per job: id, state, attempts, host, duration, exit code, each parameter, each
/// result key.
///
/// # Errors
/// The CSV writer's.
pub fn results_csv(param_names: &[String], jobs: &[JobRow]) -> Result<String, csv::Error> {
    let keys: BTreeSet<String> = jobs
        .iter()
        .filter_map(|j| j.result.as_ref())
        .flat_map(|r| r.keys().cloned())
        .collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    const FIXED: [&str; 6] = ["id", "state", "attempts", "host", "duration_s", "exit_code"];
    let mut header: Vec<String> = FIXED.map(String::from).to_vec();
    header.extend(param_names.iter().cloned());
    header.extend(keys.iter().map(|k| {
        if param_names.contains(k) || FIXED.contains(&k.as_str()) {
            format!("result.{k}")
        } else {
            k.clone()
        }
    }));
    w.write_record(&header)?;
    for j in jobs {
        let duration = match (j.started_ms, j.finished_ms) {
            (Some(s), Some(f)) if f >= s => format!("{:.3}", (f - s) as f64 / 1000.0),
            _ => String::new(),
        };
        let mut row = vec![
            j.id.to_string(),
            j.state.to_string(),
            j.attempt.to_string(),
            j.host.clone().unwrap_or_default(),
            duration,
            j.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        ];
        for p in param_names {
            row.push(j.params.get(p).map(plain).unwrap_or_default());
        }
        for k in &keys {
            row.push(
                j.result
                    .as_ref()
                    .and_then(|r| r.get(k))
                    .map(plain)
                    .unwrap_or_default(),
            );
        }
        w.write_record(&row)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| csv::Error::from(std::io::Error::other(e.to_string())))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}
