//! The JSON API under `/api/v1`.
//!
//! Flower's API, point by point: `GET /workers` (Flower `/api/workers`), `POST
//! /workers/{id}/drain` (`/api/worker/shutdown`), `GET /jobs` with filters (`/api/tasks`), `GET
//! /jobs/{id}` (`/api/task/info`), `GET /jobs/{id}/result` (`/api/task/result`), `POST
//! /jobs/{id}/cancel` (`/api/task/revoke` with `terminate`: queued jobs never start, running ones
//! are killed), `GET /queues` (`/api/queues/length`), `POST /sweeps` (`/api/task/async-apply`).
//! Beyond it: sweeps, retry, results as CSV or JSONL, where each job's outputs are
//! (`/sweeps/{name}/outputs`, for `gridq pull`), and live streams (`/events`,
//! `/jobs/{id}/logs/stream`).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gridq_common::JobId;
use serde::{Deserialize, Serialize};

use super::{ApiResult, AppError, AppState, read, sweep_id};
use crate::service;
use crate::store::{AttemptRow, JobQuery, JobRow, JobState, SortKey, SubmitSummary, code_label};
use crate::submit::{self, SubmitError};
use crate::sweep::{self, LoadOptions};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/sweeps",
            get(list_sweeps)
                .post(submit)
                .layer(axum::extract::DefaultBodyLimit::max(SUBMIT_BODY_LIMIT)),
        )
        .route("/sweeps/{name}", get(get_sweep))
        .route("/sweeps/{name}/cancel", post(cancel_sweep))
        .route("/sweeps/{name}/retry", post(retry_sweep))
        .route("/sweeps/{name}/results", get(results))
        .route("/sweeps/{name}/outputs", get(outputs))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/logs", get(job_logs))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/result", get(job_result))
        .route("/jobs/{id}/logs/stream", get(log_stream))
        .route("/workers", get(workers))
        .route("/workers/{id}/drain", post(drain_worker))
        .route("/queues", get(queues))
        .route("/overview", get(overview))
        .route("/events", get(events))
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
    /// The most jobs the sweep may expand to, in place of its file's `max_jobs` (at least 1;
    /// the master's `max_jobs_per_sweep` still caps it): `gridq submit --max-jobs`.
    #[serde(default)]
    pub max_jobs: Option<u64>,
    /// The project's code version at submission (`gridq submit` computes it as a sync would).
    #[serde(default)]
    pub code: Option<gridq_common::code::CodeVersion>,
    /// Start jobs only on workers whose project holds `code` (`gridq submit --same-code`;
    /// the sweep file's `same_code: true` does the same). Needs `code`.
    #[serde(default)]
    pub same_code: bool,
}

/// The answer to a submission.
#[derive(Debug, Deserialize, Serialize)]
pub struct SubmitResponse {
    pub sweep: String,
    pub summary: SubmitSummary,
    pub warnings: Vec<String>,
}

/// A submission's body: a sweep file of the largest size, escaped as JSON (at most twice as
/// long), and the other fields.
const SUBMIT_BODY_LIMIT: usize = 2 * sweep::MAX_SWEEP_BYTES + 64 * 1024;

/// Sweep files parsed at once; further submissions wait their turn (parsing takes memory in
/// proportion to the file, and CPU).
static PARSING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn submit(
    State(state): State<AppState>,
    Json(req): Json<SubmitRequest>,
) -> ApiResult<Json<SubmitResponse>> {
    let parsing = PARSING.acquire().await.map_err(AppError::internal)?;
    let source = req.source.clone().unwrap_or_else(|| "sweep.yaml".into());
    let default_name = std::path::Path::new(&source)
        .file_stem()
        .map_or_else(|| "sweep".to_owned(), |s| s.to_string_lossy().into_owned());
    let options = LoadOptions {
        command: req.command.clone(),
    };
    let max_jobs = match req.max_jobs {
        None => None,
        Some(n) => Some(std::num::NonZeroU64::new(n).ok_or_else(|| {
            AppError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "max_jobs: must be at least 1".to_owned(),
            )
        })?),
    };
    let yaml = req.yaml;
    let (code, same_code) = (req.code, req.same_code);
    let (sweep, yaml, warnings) = tokio::task::spawn_blocking(move || {
        let mut loaded = sweep::load_str(&yaml, &source, &default_name, &options)?;
        if let Some(n) = max_jobs {
            loaded.sweep.set_max_jobs(n);
        }
        loaded.sweep.set_code(code);
        if same_code {
            loaded.sweep.set_same_code();
        }
        let warnings = loaded
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        Ok::<_, sweep::SweepError>((loaded.sweep, yaml, warnings))
    })
    .await
    .map_err(AppError::internal)?
    .map_err(|e| AppError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    drop(parsing);
    let name = sweep.name().to_owned();
    // If the client goes away, this future is dropped and the submission stops there (see
    // `submit::submit_sweep`).
    let summary = submit::submit_sweep(&state.handle, sweep, yaml, req.rerun)
        .await
        .map_err(|e| match e {
            SubmitError::Invalid(e) => AppError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            SubmitError::Refused(e) => AppError(StatusCode::CONFLICT, e.to_string()),
            SubmitError::Stopping => AppError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })?;
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

/// `GET /jobs`: `sweep`, `state` (repeatable), `p.<param>=<value>`, `q` (text), `sort`
/// (`index`, `state`, `finished`, `duration`, `param:<name>`, `metric:<name>`), `desc`,
/// `limit` (at most 10,000), `offset`. Filters other than `state` and sorting need `sweep`.
async fn list_jobs(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Json<serde_json::Value>> {
    let get = |k: &str| params.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
    let number = |k: &str, default: u64| -> ApiResult<u64> {
        get(k).map_or(Ok(default), |v| {
            v.parse::<u64>()
                .map_err(|_| AppError::bad(format!("`{k}`: expected a whole number, found `{v}`")))
        })
    };
    let limit = number("limit", 100)?.min(10_000);
    let offset = number("offset", 0)?;
    let mut states = Vec::new();
    let mut filters = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "state" => states.push(
                v.parse::<JobState>()
                    .map_err(|e| AppError::bad(format!("`state`: {e}")))?,
            ),
            "sweep" | "q" | "sort" | "desc" | "limit" | "offset" => {}
            other => match other.strip_prefix("p.") {
                Some(name) if !name.is_empty() => filters.push((name.to_owned(), v.clone())),
                _ => {
                    return Err(AppError::bad(format!(
                        "unknown query parameter `{other}` (known: sweep, state, p.<param>, q, sort, desc, limit, offset)"
                    )));
                }
            },
        }
    }
    let sort = SortKey::parse(get("sort").unwrap_or("index"))
        .map_err(|e| AppError::bad(format!("`sort`: {e}")))?;
    let descending = matches!(get("desc"), Some("1" | "true"));
    let text = get("q").filter(|t| !t.is_empty()).map(str::to_owned);
    let Some(sweep) = get("sweep").map(sweep_id).transpose()? else {
        if !filters.is_empty() || text.is_some() || sort != SortKey::Index || states.len() > 1 {
            return Err(AppError::bad(
                "`sweep` is required to sort, search or filter by parameter",
            ));
        }
        let st = states.first().copied();
        let jobs = read(&state, move |r| r.view().jobs(None, st, limit, offset)).await?;
        return Ok(Json(serde_json::json!({ "jobs": jobs })));
    };
    if let Some(record) = read(&state, {
        let sweep = sweep.clone();
        move |r| r.view().sweep_record(&sweep)
    })
    .await?
    {
        if let Some((bad, _)) = filters
            .iter()
            .find(|(p, _)| !record.param_names.contains(p))
        {
            return Err(AppError::bad(format!(
                "`p.{bad}`: sweep `{sweep}` has no parameter `{bad}`"
            )));
        }
    } else {
        return Err(AppError::not_found(format!("no sweep named `{sweep}`")));
    }
    let query = JobQuery {
        sweep,
        states,
        params: filters,
        text,
        sort,
        descending,
        limit,
        offset,
    };
    let (jobs, count) = read(&state, move |r| r.view().query_jobs(&query)).await?;
    Ok(Json(
        serde_json::json!({ "jobs": jobs, "total": count.count, "total_is_lower_bound": count.at_least }),
    ))
}

#[derive(Debug, Deserialize)]
struct OneJob {
    sweep: Option<String>,
    attempt: Option<u32>,
    /// `text` for the log as plain text (a download).
    format: Option<String>,
    after_attempt: Option<u32>,
    after_seq: Option<u64>,
}

/// Finds one job by id or unique id prefix (at least 4 hex digits), optionally in a sweep.
pub(crate) async fn find_job(state: &AppState, id: &str, sweep: Option<&str>) -> ApiResult<JobRow> {
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
    Query(q): Query<OneJob>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let (s, j) = (job.sweep.clone(), job.id);
    let (attempts, duplicates) = read(&state, move |r| {
        Ok((r.view().attempts(&s, &j)?, r.view().duplicates(&s, &j)?))
    })
    .await?;
    let holder = AttemptRow::output_holder(&attempts);
    Ok(Json(serde_json::json!({
        "job": job,
        "attempts": attempts,
        "duplicate_results": duplicates,
        "output_host": holder.and_then(|a| a.host.clone()),
        "output_attempt": holder.map(|a| a.attempt),
    })))
}

async fn job_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OneJob>,
) -> ApiResult<Response> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let (s, j, attempt) = (job.sweep.clone(), job.id, q.attempt);
    let lines = read(&state, move |r| r.view().logs(&s, &j, attempt, 1_000_000)).await?;
    match q.format.as_deref() {
        None | Some("json") => {}
        Some("text") => {
            let mut out = String::new();
            for (_, _, l) in &lines {
                out.push_str(&l.line);
                out.push('\n');
            }
            return Ok((
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{}.log\"", job.id),
                    ),
                ],
                out,
            )
                .into_response());
        }
        Some(other) => {
            return Err(AppError::bad(format!(
                "`format`: expected json or text, found `{other}`"
            )));
        }
    }
    let lines: Vec<serde_json::Value> = lines
        .into_iter()
        .map(|(attempt, seq, l)| serde_json::json!({ "attempt": attempt, "seq": seq, "stream": l.stream, "line": l.line, "ts_ms": l.ts_ms }))
        .collect();
    Ok(Json(
        serde_json::json!({ "sweep": job.sweep, "job": job.id, "state": job.state, "lines": lines }),
    )
    .into_response())
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OneJob>,
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

/// Jobs read per step of an export.
const EXPORT_BATCH: u64 = 5_000;

/// `GET /sweeps/{name}/results?format=csv|jsonl`: one row per job, streamed in batches from
/// its own read connection, so a million-job export neither holds the API's reader nor the
/// whole sweep in memory.
async fn results(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Response> {
    let id = sweep_id(&name)?;
    let format = q.format.unwrap_or_else(|| "jsonl".into());
    let csv = match format.as_str() {
        "csv" => true,
        "jsonl" => false,
        other => {
            return Err(AppError::bad(format!(
                "`format`: expected csv or jsonl, found `{other}`"
            )));
        }
    };
    let id2 = id.clone();
    let record = read(&state, move |r| r.view().sweep_record(&id2)).await?;
    let record = record.ok_or_else(|| AppError::not_found(format!("no sweep named `{name}`")))?;
    let db = state.handle.db_path.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let send = |chunk: Result<Vec<u8>, std::io::Error>| tx.blocking_send(chunk).is_ok();
        let run = || -> Result<(), String> {
            let reader = crate::store::Store::reader(&db).map_err(|e| e.to_string())?;
            let view = reader.view();
            let keys = if csv {
                view.result_keys(&id).map_err(|e| e.to_string())?
            } else {
                Vec::new()
            };
            let mut export = ResultsExport::new(csv, &record.param_names, keys);
            let mut after = None;
            loop {
                let jobs = view
                    .jobs_after(&id, after, EXPORT_BATCH)
                    .map_err(|e| e.to_string())?;
                let Some(last) = jobs.last() else { break };
                after = Some((last.index, last.id));
                let chunk = export.rows(&jobs).map_err(|e| e.to_string())?;
                if !send(Ok(chunk)) {
                    return Ok(());
                }
                if (jobs.len() as u64) < EXPORT_BATCH {
                    break;
                }
            }
            if export.header_pending() {
                let chunk = export.rows(&[]).map_err(|e| e.to_string())?;
                send(Ok(chunk));
            }
            Ok(())
        };
        if let Err(e) = run() {
            tracing::error!(cause = %e, "results export failed");
            send(Err(std::io::Error::other(e)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Writes results as CSV (one row per job: id, state, attempts, host, duration, exit code,
/// code version, each parameter, each result key; a parameter named like one of the fixed
/// columns gets a `param.` prefix, and result keys that collide with those a `result.`
/// prefix) or JSON lines, batch by batch.
#[derive(Debug)]
pub struct ResultsExport {
    csv: bool,
    params: Vec<String>,
    keys: Vec<String>,
    header_pending: bool,
}

/// The CSV's first columns. `code` is the job's code version in its compact form (see
/// [`code_label`]: `TREE12[@COMMIT12[+dirty]]`), empty when its worker reported none.
const FIXED: [&str; 7] = [
    "id",
    "state",
    "attempts",
    "host",
    "duration_s",
    "exit_code",
    "code",
];

impl ResultsExport {
    /// An export with these parameter columns and result keys (CSV only).
    pub fn new(csv: bool, params: &[String], keys: Vec<String>) -> Self {
        Self {
            csv,
            params: params.to_vec(),
            keys,
            header_pending: csv,
        }
    }

    fn header_pending(&self) -> bool {
        self.header_pending
    }

    /// The bytes for a batch of jobs (the CSV header comes with the first batch).
    ///
    /// # Errors
    /// The CSV or JSON writer's.
    pub fn rows(&mut self, jobs: &[JobRow]) -> Result<Vec<u8>, String> {
        if !self.csv {
            let mut out = Vec::new();
            for j in jobs {
                serde_json::to_writer(&mut out, j).map_err(|e| e.to_string())?;
                out.push(b'\n');
            }
            return Ok(out);
        }
        let mut w = csv::Writer::from_writer(Vec::new());
        let err = |e: csv::Error| e.to_string();
        if self.header_pending {
            self.header_pending = false;
            let mut header: Vec<String> = FIXED.map(String::from).to_vec();
            // A parameter named like a fixed column (`code`, `host`...) gets a `param.` prefix.
            header.extend(self.params.iter().map(|p| {
                if FIXED.contains(&p.as_str()) {
                    format!("param.{p}")
                } else {
                    p.clone()
                }
            }));
            header.extend(self.keys.iter().map(|k| {
                if self.params.contains(k) || FIXED.contains(&k.as_str()) {
                    format!("result.{k}")
                } else {
                    k.clone()
                }
            }));
            w.write_record(&header).map_err(err)?;
        }
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
                j.code.as_ref().map(code_label).unwrap_or_default(),
            ];
            for p in &self.params {
                row.push(j.params.get(p).map(plain).unwrap_or_default());
            }
            for k in &self.keys {
                row.push(
                    j.result
                        .as_ref()
                        .and_then(|r| r.get(k))
                        .map(plain)
                        .unwrap_or_default(),
                );
            }
            w.write_record(&row).map_err(err)?;
        }
        w.into_inner().map_err(|e| e.to_string())
    }
}

/// The whole CSV of some jobs at once (for tests and small exports).
///
/// # Errors
/// The CSV writer's.
pub fn results_csv(param_names: &[String], jobs: &[JobRow]) -> Result<String, String> {
    let keys: BTreeSet<String> = jobs
        .iter()
        .filter_map(|j| j.result.as_ref())
        .flat_map(|r| r.keys().cloned())
        .collect();
    let mut export = ResultsExport::new(true, param_names, keys.into_iter().collect());
    let bytes = export.rows(jobs)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `GET /sweeps/{name}/outputs[?state=S&after=CURSOR&limit=N]`: where each job's outputs
/// are, in expansion order, a page at a time (at most 5,000 jobs, 1,000 by default): the
/// attempt that holds them (the one that succeeded, else the latest that ran) with its host,
/// and the size of what it listed (`files` is null when no list came: the attempt has not
/// ended, or its worker was lost or is older). `state` may repeat. `next` is the cursor of
/// the following page, null after the last. What `gridq pull` asks.
async fn outputs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut states = Vec::new();
    let mut after = None;
    let mut limit = 1_000u64;
    for (k, v) in &params {
        match k.as_str() {
            "state" => states.push(
                v.parse::<JobState>()
                    .map_err(|e| AppError::bad(format!("`state`: {e}")))?,
            ),
            "after" => {
                let parsed = v
                    .split_once(':')
                    .and_then(|(i, j)| Some((i.parse::<u64>().ok()?, j.parse::<JobId>().ok()?)));
                after = Some(parsed.ok_or_else(|| {
                    AppError::bad(format!(
                        "`after`: expected the `next` of the previous page, found `{v}`"
                    ))
                })?);
            }
            "limit" => {
                limit = v.parse::<u64>().map_err(|_| {
                    AppError::bad(format!("`limit`: expected a whole number, found `{v}`"))
                })?;
            }
            other => {
                return Err(AppError::bad(format!(
                    "unknown query parameter `{other}` (known: state, after, limit)"
                )));
            }
        }
    }
    let limit = limit.clamp(1, 5_000);
    let id = sweep_id(&name)?;
    let id2 = id.clone();
    let found = read(&state, move |r| {
        let v = r.view();
        if v.sweep_record(&id2)?.is_none() {
            return Ok(None);
        }
        v.job_outputs_after(&id2, &states, after, limit).map(Some)
    })
    .await?;
    let (jobs, next) =
        found.ok_or_else(|| AppError::not_found(format!("no sweep named `{name}`")))?;
    let jobs: Vec<serde_json::Value> = jobs
        .into_iter()
        .map(|j| {
            let listing = j.outputs.as_ref();
            serde_json::json!({
                "id": j.id,
                "index": j.index,
                "state": j.state,
                "attempt": j.attempt,
                "host": j.host,
                "worker": j.worker,
                "dir": listing.map(|o| o.dir.clone()),
                "files": listing.map(|o| o.files.len()),
                "bytes": listing.map(gridq_common::wire::OutputListing::bytes),
                "truncated": listing.is_some_and(|o| o.truncated),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "sweep": id,
        "jobs": jobs,
        "next": next.map(|(i, j)| format!("{i}:{j}")),
    })))
}

async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OneJob>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let retried = state
        .handle
        .retry_job(job.sweep.clone(), job.id)
        .await
        .map_err(AppError::internal)?;
    let message = if retried {
        format!("attempt {} queued", job.attempt + 1)
    } else {
        format!(
            "job {} is {}; only failed, timed-out or canceled jobs are retried; nothing changed",
            job.id, job.state
        )
    };
    Ok(Json(
        serde_json::json!({ "retried": retried, "message": message }),
    ))
}

async fn job_result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OneJob>,
) -> ApiResult<Json<serde_json::Value>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    Ok(Json(serde_json::json!({
        "sweep": job.sweep, "job": job.id, "state": job.state, "attempt": job.attempt,
        "exit_code": job.exit_code, "signal": job.signal, "result": job.result,
    })))
}

async fn drain_worker(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let worker = gridq_common::WorkerId::new(&id)
        .map_err(|e| AppError::bad(format!("worker `{id}`: {e}")))?;
    let known = read(&state, {
        let id = id.clone();
        move |r| Ok(r.view().workers()?.into_iter().any(|w| w.id == id))
    })
    .await?;
    if !known {
        return Err(AppError::not_found(format!("no worker `{id}`")));
    }
    state
        .handle
        .drain_worker(worker)
        .await
        .map_err(AppError::internal)?;
    Ok(Json(serde_json::json!({ "draining": id })))
}

async fn queues(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let names = read(&state, |r| r.view().sweep_queues()).await?;
    let stats = state.monitor.broker_stats(&names).await;
    Ok(Json(
        serde_json::to_value(stats).map_err(AppError::internal)?,
    ))
}

async fn overview(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let (totals, workers, failures) = read(&state, |r| {
        let v = r.view();
        Ok((v.state_totals()?, v.workers()?, v.recent_failures(10)?))
    })
    .await?;
    let now = super::pages::now_ms();
    let online = workers.iter().filter(|w| w.is_online()).count();
    let lost = workers.iter().filter(|w| w.state == "lost").count();
    Ok(Json(serde_json::json!({
        "jobs": totals.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "workers_online": online,
        "workers_lost": lost,
        "throughput": state.monitor.activity.throughput(now)
            .into_iter().map(|(t, n)| serde_json::json!({"t_ms": t, "finished": n})).collect::<Vec<_>>(),
        "recent_failures": failures,
        "broker": state.monitor.broker_link(),
    })))
}

/// `GET /events`: a `change` event (data: the change counter) whenever the store changed, at
/// most every 250 ms; comments keep the connection alive.
async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = state.handle.changes.clone();
    let stream = futures_util::stream::unfold(changes, |mut changes| async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        changes.changed().await.ok()?;
        let v = *changes.borrow_and_update();
        Some((
            Ok(Event::default().event("change").data(v.to_string())),
            changes,
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /jobs/{id}/logs/stream`: the job's output lines as `line` events (JSON: attempt, seq,
/// stream, line, ts_ms), from the `after_attempt`/`after_seq` cursor on; an `end` event once
/// the job is in a final state and every line was sent.
async fn log_stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OneJob>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let job = find_job(&state, &id, q.sweep.as_deref()).await?;
    let cursor = (q.after_attempt.unwrap_or(0), q.after_seq.unwrap_or(0));
    let attempt = q.attempt;
    struct Tail {
        state: AppState,
        sweep: gridq_common::SweepId,
        job: JobId,
        attempt: Option<u32>,
        cursor: (u32, u64),
        buffered: std::collections::VecDeque<Event>,
        ended: bool,
        changes: tokio::sync::watch::Receiver<u64>,
    }
    let tail = Tail {
        changes: state.handle.changes.clone(),
        state,
        sweep: job.sweep,
        job: job.id,
        attempt,
        cursor,
        buffered: std::collections::VecDeque::new(),
        ended: false,
    };
    let stream = futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(e) = t.buffered.pop_front() {
                return Some((Ok(e), t));
            }
            if t.ended {
                return None;
            }
            let (s, j, a, c) = (t.sweep.clone(), t.job, t.attempt, t.cursor);
            let read_once = read(&t.state, move |r| {
                let v = r.view();
                let lines = v.logs_after(&s, &j, a, c, 500)?;
                let final_state = v.job(&s, &j)?.is_none_or(|row| row.state.is_final());
                Ok((lines, final_state))
            })
            .await;
            let Ok((lines, final_state)) = read_once else {
                return None;
            };
            let got = lines.len();
            for (attempt, seq, l) in lines {
                t.cursor = (attempt, seq);
                let data = serde_json::json!({ "attempt": attempt, "seq": seq, "stream": l.stream, "line": l.line, "ts_ms": l.ts_ms });
                t.buffered
                    .push_back(Event::default().event("line").data(data.to_string()));
            }
            if got == 0 {
                if final_state {
                    t.ended = true;
                    t.buffered
                        .push_back(Event::default().event("end").data("{}"));
                    continue;
                }
                // Wait for the store to change (or re-check each second).
                let _ = tokio::time::timeout(Duration::from_secs(1), t.changes.changed()).await;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridq_common::code::CodeVersion;

    fn row(params: serde_json::Value, code: Option<CodeVersion>) -> JobRow {
        JobRow {
            sweep: gridq_common::SweepId::new("s").unwrap(),
            id: JobId::from_bytes([0xab; 16]),
            index: 0,
            state: JobState::Succeeded,
            attempt: 1,
            argv: vec!["true".into()],
            params: params.as_object().unwrap().clone(),
            worker: Some("w".into()),
            host: Some("h".into()),
            started_ms: Some(1000),
            finished_ms: Some(3500),
            exit_code: Some(0),
            signal: None,
            reason: None,
            result: serde_json::json!({"code": 7, "loss": 0.5})
                .as_object()
                .cloned(),
            code,
        }
    }

    /// The `code` column holds the compact code version; a parameter and a result key of the
    /// same name get their prefixes, so no two columns share a name.
    #[test]
    fn the_csv_has_a_code_column_and_no_two_columns_of_one_name() {
        let code = CodeVersion {
            tree: "3f2a9c1e0b7d55aa".into(),
            commit: Some("a1b2c3d4e5f60718".into()),
            dirty: Some(true),
        };
        let csv = results_csv(
            &["code".into(), "lr".into()],
            &[
                row(serde_json::json!({"code": 5, "lr": 0.1}), Some(code)),
                row(serde_json::json!({"code": 6, "lr": 0.2}), None),
            ],
        )
        .unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "id,state,attempts,host,duration_s,exit_code,code,param.code,lr,result.code,loss",
                &format!(
                    "{},succeeded,1,h,2.500,0,3f2a9c1e0b7d@a1b2c3d4e5f6+dirty,5,0.1,7,0.5",
                    "ab".repeat(16)
                ),
                &format!("{},succeeded,1,h,2.500,0,,6,0.2,7,0.5", "ab".repeat(16)),
            ]
        );
    }
}
