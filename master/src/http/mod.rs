//! The master's HTTP side: the JSON API under `/api/v1`, the web monitor's pages, the
//! Prometheus metrics and the live event streams.
//!
//! Reads go to the store through a read-only SQLite connection (WAL lets them run beside the
//! core's writes); changes go to the core as commands. Bad input gets a 4xx with a message that
//! names what is wrong; internal errors a plain 500 while the detail goes to the log. Who may
//! call what is decided in [`auth`].
//!
//! # Layout
//! - [`api`]: the JSON API (also what Flower's API offered, point by point).
//! - [`pages`]: the server-rendered monitor pages, updated live over SSE.
//! - [`plots`]: SVG plots for the sweep page.
//! - [`metrics`]: the Prometheus exposition.
//! - [`auth`]: tokens, sessions, CSRF.
//! - [`conn`]: connections: header timeout, connection limit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gridq_common::SweepId;
use tokio::sync::{Semaphore, watch};
use tracing::error;

pub mod activity;
pub mod api;
pub mod auth;
pub mod conn;
pub mod metrics;
pub mod pages;
pub mod plots;

pub use api::results_csv;

use crate::service::Handle;
use crate::store::{Reader, Store};

#[derive(Clone)]
pub(crate) struct AppState {
    handle: Handle,
    readers: Arc<ReaderPool>,
    sessions: Arc<auth::Sessions>,
    monitor: Arc<pages::Monitor>,
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

/// Serves the API and the monitor until `stop` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    handle: Handle,
    db: PathBuf,
    monitor: pages::Monitor,
    stop: watch::Receiver<bool>,
) {
    let reader = match Store::reader(&db) {
        Ok(r) => r,
        Err(e) => {
            error!(cause = %e, "cannot open the store for reading; the API is down");
            return;
        }
    };
    let mut readers = vec![reader];
    for _ in 1..READERS {
        match Store::reader(&db) {
            Ok(r) => readers.push(r),
            Err(e) => {
                error!(cause = %e, "cannot open another reader on the store");
                break;
            }
        }
    }
    let state = AppState {
        handle,
        readers: Arc::new(ReaderPool {
            free: Arc::new(Semaphore::new(readers.len())),
            readers: Mutex::new(readers),
        }),
        sessions: Arc::new(auth::Sessions::default()),
        monitor: Arc::new(monitor),
    };
    conn::serve(listener, router(state), stop).await;
}

/// Readers on the store, so that one slow request does not hold up every other page.
const READERS: usize = 4;
/// The longest a request's query may run; past it, it is stopped and answered 503.
pub const QUERY_TIME_LIMIT: Duration = Duration::from_secs(1);
/// The longest a request waits for a free reader before it is answered 503.
const READER_WAIT: Duration = Duration::from_secs(2);

/// A few read-only connections, each lent to one request at a time.
pub(crate) struct ReaderPool {
    free: Arc<Semaphore>,
    readers: Mutex<Vec<Reader>>,
}

/// A reader taken from the pool, given back (with its permit) when dropped, also when the
/// query panics.
struct Lent {
    pool: Arc<ReaderPool>,
    reader: Option<Reader>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Lent {
    fn take(pool: &Arc<ReaderPool>, permit: tokio::sync::OwnedSemaphorePermit) -> Option<Self> {
        let reader = pool.readers.lock().ok()?.pop()?;
        Some(Self {
            pool: pool.clone(),
            reader: Some(reader),
            _permit: permit,
        })
    }

    fn reader(&self) -> &Reader {
        // Present until dropped.
        self.reader.as_ref().expect("a lent reader")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let (Some(reader), Ok(mut readers)) = (self.reader.take(), self.pool.readers.lock()) {
            readers.push(reader);
        }
    }
}

fn router(state: AppState) -> Router {
    let protected = Router::new()
        .nest("/api/v1", api::routes())
        .merge(pages::routes())
        .route("/metrics", get(pages::metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_auth,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/static/{file}", get(pages::asset))
        .merge(protected)
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers on every answer: no framing, no sniffing, no referrers to other sites, and a content security
/// policy that only allows this origin's own scripts and styles.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // `same-origin`, not `no-referrer`: with the latter, browsers send `Origin: null` on form
    // posts, which the CSRF check (rightly) refuses.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Runs `f` on a free reader, for at most [`QUERY_TIME_LIMIT`].
pub(crate) async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Reader) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> ApiResult<T> {
    let pool = state.readers.clone();
    let busy = || {
        AppError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store is busy with other requests; try again".into(),
        )
    };
    let permit = tokio::time::timeout(READER_WAIT, pool.free.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(AppError::internal)?;
    // The reader goes back to the pool when the blocking task ends, whether this request is
    // still waiting for it or not (a client that went away drops only the waiting).
    let out = tokio::task::spawn_blocking(move || {
        let lent = Lent::take(&pool, permit).ok_or_else(busy)?;
        Ok::<_, AppError>(lent.reader().within(QUERY_TIME_LIMIT, f))
    })
    .await
    .map_err(AppError::internal)??;
    out.map_err(|e| match e {
        crate::store::StoreError::TooSlow(limit) => AppError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the query ran longer than {} ms and was stopped; narrow it (a sweep, a state, fewer rows) and try again",
                limit.as_millis()
            ),
        ),
        e => AppError::internal(e),
    })
}

pub(crate) fn sweep_id(name: &str) -> ApiResult<SweepId> {
    SweepId::new(name).map_err(|e| AppError::bad(e.to_string()))
}
