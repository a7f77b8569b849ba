//! The monitor's pages: server-rendered HTML (maud escapes every value it prints), a little
//! embedded CSS and JS, live updates over SSE.
//!
//! Live updates: each page marks the regions that change with `data-live` and an `id`. The
//! script listens to `/api/v1/events`; on a change it fetches the same URL again and swaps
//! those regions, at most once a second, so filters and scroll positions stay. A job's log
//! tail has its own stream. Actions are plain forms (POST, CSRF field) that redirect back.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use gridq_common::{JobId, SweepId, WorkerId};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use tracing::{info, warn};

use super::activity::Activity;
use super::auth::{self, Caller};
use super::metrics::{self, Snapshot};
use super::{ApiResult, AppError, AppState, plots, read, sweep_id};
// `q`: a query value or path segment, percent-encoded (slashes too).
use gridq_common::rabbit_node::percent_encode as q;

use crate::broker_stats::{self, BrokerStats, ManagementApi};
use crate::store::{
    AttemptRow, JobQuery, JobRow, JobState, SortKey, SweepSummary, WorkerRow, code_label,
};

/// Jobs per page in the sweep's jobs table.
pub const PAGE_SIZE: u64 = 50;
/// Points drawn in a plot at most.
const PLOT_POINTS: u64 = 2000;
/// Broker statistics are read at most this often.
const BROKER_STATS_TTL: Duration = Duration::from_secs(2);

const CSS: &str = include_str!("assets/monitor.css");
const JS: &str = include_str!("assets/monitor.js");

/// What the monitor needs beside the store: activity from the core, and the broker.
#[derive(Debug)]
pub struct Monitor {
    pub activity: std::sync::Arc<Activity>,
    amqp_url: String,
    management: Option<ManagementApi>,
    client: reqwest::Client,
    connection: tokio::sync::Mutex<Option<lapin::Connection>>,
    cache: Mutex<Option<(Instant, BrokerStats)>>,
}

impl Monitor {
    /// How the master reaches its broker, for the API and the broker page: the URL without its
    /// password, and whether the traffic is encrypted (`tls`), stays on this host (`loopback`,
    /// plain AMQP) or crosses a network in the clear (`none`).
    pub fn broker_link(&self) -> serde_json::Value {
        let url = &self.amqp_url;
        let host = gridq_common::amqp::host(url);
        let loopback = host == "localhost"
            || host == "[::1]"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        let encryption = if gridq_common::amqp::is_tls(url) {
            "tls"
        } else if loopback {
            "loopback"
        } else {
            "none"
        };
        serde_json::json!({
            "url": gridq_common::amqp::redact(url),
            "encryption": encryption,
        })
    }

    /// `management_url`: the RabbitMQ management API's base URL; `None` derives it from the
    /// AMQP URL's host on port 15672.
    pub fn new(
        activity: std::sync::Arc<Activity>,
        amqp_url: &str,
        management_url: Option<&str>,
    ) -> Self {
        let management = match management_url {
            Some(url) => ManagementApi::new(url, amqp_url),
            None => ManagementApi::from_amqp_url(amqp_url, broker_stats::DEFAULT_MANAGEMENT_PORT),
        }
        .map_err(|e| warn!(cause = %e, "no management API for queue statistics"))
        .ok();
        Self {
            activity,
            amqp_url: amqp_url.to_owned(),
            management,
            client: reqwest::Client::builder()
                .timeout(broker_stats::MANAGEMENT_TIMEOUT)
                .build()
                .unwrap_or_default(),
            connection: tokio::sync::Mutex::new(None),
            cache: Mutex::new(None),
        }
    }

    /// Queue statistics, cached for [`BROKER_STATS_TTL`].
    pub async fn broker_stats(&self, known_queues: &[String]) -> BrokerStats {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, stats)) = cache.as_ref()
            && at.elapsed() < BROKER_STATS_TTL
        {
            return stats.clone();
        }
        let mut conn = self.connection.lock().await;
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            *conn = gridq_common::amqp::connect(&self.amqp_url, "gridq-monitor")
                .await
                .map_err(|e| warn!(cause = %e, "monitor cannot reach the broker"))
                .ok();
        }
        let stats = match conn.as_ref() {
            Some(c) => {
                broker_stats::collect(self.management.as_ref(), &self.client, c, known_queues).await
            }
            None => BrokerStats {
                source: broker_stats::StatsSource::Amqp,
                queues: Vec::new(),
                note: Some("the broker is unreachable".into()),
            },
        };
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Some((Instant::now(), stats.clone()));
        }
        stats
    }
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(overview))
        .route("/sweeps", get(sweeps))
        .route("/sweeps/{name}", get(sweep_page))
        .route("/sweeps/{name}/cancel", post(cancel_sweep))
        .route("/sweeps/{name}/retry", post(retry_sweep))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/workers", get(workers_page))
        .route("/workers/{id}/drain", post(drain_worker))
        .route("/broker", get(broker_page))
}

// ---------------------------------------------------------------- helpers

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn when(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn span(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 1 {
        return format!("{:.2}s", ms as f64 / 1000.0);
    }
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn ago(ms: u64) -> String {
    let now = now_ms();
    if ms == 0 {
        return "never".into();
    }
    format!("{} ago", span(now.saturating_sub(ms)))
}

/// Percent-encodes a local path with its query for a `next=` parameter, keeping its slashes
/// readable.
pub fn url_encode(s: &str) -> String {
    q(s).replace("%2F", "/")
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{}", (f * 1e6).round() / 1e6),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

const STATES: [&str; 8] = [
    "pending",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "timed_out",
    "canceled",
];

fn csrf_of(caller: Option<&Caller>) -> String {
    match caller {
        Some(Caller::Session { csrf, .. }) => csrf.clone(),
        _ => String::new(),
    }
}

/// The page frame: navigation, live regions' script, the flash message.
fn layout(title: &str, active: &str, csrf: &str, flash: Option<&str>, body: Markup) -> Markup {
    let nav = [
        ("/", "Overview"),
        ("/sweeps", "Sweeps"),
        ("/workers", "Workers"),
        ("/broker", "Broker"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(csrf);
                title { (title) " · gridq" }
                link rel="stylesheet" href="/static/monitor.css";
                script src="/static/monitor.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "gridq" }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) class=[(active == label).then_some("active")] { (label) }
                        }
                    }
                    span #live.live title="live updates" { "●" }
                    form.logout method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    @if let Some(f) = flash {
                        p.flash role="status" { (f) }
                    }
                    (body)
                }
            }
        }
    }
}

fn state_badge(state: &str) -> Markup {
    html! { span class={"badge s-" (state)} { (state) } }
}

/// A bar split by state, drawn as SVG (the content security policy allows no inline styles).
fn progress(counts: &BTreeMap<String, u64>, total: u64) -> Markup {
    let done: u64 = ["succeeded", "failed", "timed_out", "canceled"]
        .iter()
        .map(|s| counts.get(*s).copied().unwrap_or(0))
        .sum();
    #[allow(clippy::cast_precision_loss)]
    let pct = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 * 100.0 / total as f64
        }
    };
    let mut x = 0.0;
    let segments: Vec<(&str, u64, f64, f64)> = STATES
        .iter()
        .filter_map(|s| counts.get(*s).filter(|n| **n > 0).map(|n| (*s, *n)))
        .map(|(s, n)| {
            let w = pct(n);
            let seg = (s, n, x, w);
            x += w;
            seg
        })
        .collect();
    html! {
        svg.progress xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 10" preserveAspectRatio="none"
            role="progressbar" aria-valuemin="0" aria-valuemax="100"
            aria-valuenow=(format!("{:.0}", pct(done))) data-done=(done) data-total=(total) {
            rect.track x="0" y="0" width="100" height="10" {}
            @for (s, n, x, w) in &segments {
                rect class={"seg s-" (s)} x=(format!("{x:.3}")) y="0" width=(format!("{w:.3}")) height="10" {
                    title { (s) ": " (n) }
                }
            }
        }
        span.pct { (format!("{:.0}%", pct(done))) " (" (done) "/" (total) ")" }
    }
}

fn eta(s: &SweepSummary, now: u64) -> String {
    let done = s.done();
    if done >= s.total {
        return "done".into();
    }
    let elapsed = now.saturating_sub(s.created_ms);
    if done == 0 || elapsed == 0 {
        return "—".into();
    }
    let rate = done as f64 / elapsed as f64;
    let left = (s.total - done) as f64 / rate;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    span(left as u64)
}

fn flash_of(params: &[(String, String)]) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == "msg")
        .map(|(_, v)| v.chars().take(300).collect())
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

// ---------------------------------------------------------------- login

#[derive(Debug, Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

/// Only local paths are followed after logging in (never another site): a path that starts
/// with one `/`, made of visible ASCII only. Browsers drop tabs and line breaks from a URL and
/// read `\\` as `/`, so `/<TAB>/evil.example` would lead to `//evil.example`, another host.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.to_owned()
        }
        _ => "/".into(),
    }
}

pub(crate) async fn login_page(Query(lq): Query<LoginQuery>) -> Markup {
    let next = safe_next(lq.next.as_deref());
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Log in · gridq" }
                link rel="stylesheet" href="/static/monitor.css";
            }
            body.login {
                form.login method="post" action="/login" {
                    h1 { "gridq" }
                    p { "Paste the master's token (" code { "STATE_DIR/token" } ")." }
                    @if lq.error.is_some() {
                        p.error role="alert" { "Wrong token." }
                    }
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="current-password" autofocus required;
                    button type="submit" { "Log in" }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    next: Option<String>,
}

pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // A login form posted from another site is refused (it would log the victim in as us).
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin_host != host {
            warn!(%origin, %host, "cross-origin login refused");
            return AppError(
                StatusCode::FORBIDDEN,
                format!("cross-origin login refused (Origin {origin}, Host {host})"),
            )
            .into_response();
        }
    }
    let next = safe_next(form.next.as_deref());
    if !auth::constant_time_eq(form.token.trim().as_bytes(), state.handle.token.as_bytes()) {
        warn!("login with a wrong token refused");
        let mut r = Redirect::to(&format!("/login?error=1&next={}", q(&next))).into_response();
        *r.status_mut() = StatusCode::SEE_OTHER;
        return r;
    }
    let id = state.sessions.create();
    info!("monitor login");
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, auth::session_cookie(&id));
    r
}

pub(crate) async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = auth::session_id(&headers) {
        state.sessions.remove(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, auth::clear_cookie());
    r
}

pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    let (body, ty) = match file.as_str() {
        "monitor.css" => (CSS, "text/css; charset=utf-8"),
        "monitor.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(ty)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------- overview

pub(crate) async fn overview(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Markup> {
    let (totals, workers, failures, queues) = read(&state, |r| {
        let v = r.view();
        Ok((
            v.state_totals()?,
            v.workers()?,
            v.recent_failures(10)?,
            v.sweep_queues()?,
        ))
    })
    .await?;
    let stats = state.monitor.broker_stats(&queues).await;
    let now = now_ms();
    let throughput = state.monitor.activity.throughput(now);
    let online = workers.iter().filter(|w| w.is_online()).count();
    let lost = workers.iter().filter(|w| w.state == "lost").count();
    let csrf = csrf_of(caller.as_deref());
    let body = html! {
        h1 { "Overview" }
        section #counts.cards data-live {
            @for s in STATES {
                @let n = totals.iter().find(|(x, _)| x == s).map_or(0, |(_, n)| *n);
                div class={"card s-" (s)} { span.n { (n) } span.l { (s) } }
            }
            div.card { span.n { (online) } span.l { "workers online" } }
            div.card.s-failed { span.n { (lost) } span.l { "workers lost" } }
        }
        section #throughput data-live {
            h2 { "Throughput" }
            p.muted { "jobs finished per 10 s, last hour" }
            (PreEscaped(throughput_svg(&throughput)))
        }
        section #queues data-live {
            h2 { "Queues" }
            (queue_table(&stats))
        }
        section #failures data-live {
            h2 { "Recent failures" }
            @if failures.is_empty() {
                p.muted { "None." }
            } @else {
                table {
                    thead { tr { th { "job" } th { "sweep" } th { "state" } th { "exit" } th { "reason" } th { "finished" } } }
                    tbody {
                        @for j in &failures {
                            tr {
                                td { a href=(job_href(j)) { code { (short(&j.id)) } } }
                                td { a href={"/sweeps/" (q(j.sweep.as_str()))} { (j.sweep.as_str()) } }
                                td { (state_badge(j.state.as_str())) }
                                td { (exit_text(j)) }
                                td.reason { (j.reason.clone().unwrap_or_default()) }
                                td { (j.finished_ms.map(ago).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(
        "Overview",
        "Overview",
        &csrf,
        flash_of(&params).as_deref(),
        body,
    ))
}

fn throughput_svg(points: &[(u64, u64)]) -> String {
    let w = 1440.0;
    let h = 160.0;
    let max = points.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1) as f64;
    let bw = w / points.len().max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="spark" viewBox="0 0 {w} {}" width="100%" role="img" aria-label="jobs finished per 10 seconds"><title>jobs finished per 10 s (max {max})</title>"#,
        h + 20.0
    );
    for (i, (at, n)) in points.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let bh = (*n as f64 / max) * h;
        out.push_str(&format!(
            r#"<rect class="bar" x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}"><title>{}: {n}</title></rect>"#,
            i as f64 * bw,
            h - bh,
            (bw - 0.5).max(0.5),
            bh,
            when(*at)
        ));
    }
    out.push_str(&format!(
        r#"<line class="axis" x1="0" y1="{h}" x2="{w}" y2="{h}"/><text class="tick" x="0" y="{}">-60 min</text><text class="tick" x="{w}" y="{}" text-anchor="end">now · peak {max} per 10 s</text></svg>"#,
        h + 16.0,
        h + 16.0
    ));
    out
}

fn queue_table(stats: &BrokerStats) -> Markup {
    html! {
        @if let Some(note) = &stats.note {
            p.muted { (note) }
        }
        table {
            thead { tr { th { "queue" } th.num { "ready" } th.num { "unacked" } th.num { "consumers" } } }
            tbody {
                @for qs in &stats.queues {
                    tr {
                        td { code { (qs.name) } }
                        td.num { (qs.ready) }
                        td.num { (qs.unacked.map_or_else(|| "—".to_owned(), |u| u.to_string())) }
                        td.num { (qs.consumers) }
                    }
                }
            }
        }
        p.muted { (format!("Counts are messages: a job queue's message carries one job, or up to {} while every worker runs short jobs.", crate::service::JOBS_PER_MESSAGE)) }
        p.muted { "source: " (match stats.source { broker_stats::StatsSource::Management => "management API", broker_stats::StatsSource::Amqp => "AMQP passive declares" }) }
    }
}

fn short(id: &JobId) -> String {
    id.to_string()[..12].to_owned()
}

fn job_href(j: &JobRow) -> String {
    format!("/jobs/{}?sweep={}", j.id, q(j.sweep.as_str()))
}

fn exit_text(j: &JobRow) -> String {
    match (j.exit_code, j.signal) {
        (_, Some(s)) => format!("signal {s}"),
        (Some(c), None) => c.to_string(),
        _ => String::new(),
    }
}

/// Where a job's outputs are and what they are: the host of the attempt that holds them and
/// the files it listed.
fn outputs_section(job: &JobRow, attempts: &[AttemptRow]) -> Markup {
    let pull = format!("gridq pull {} {}", job.sweep, short(&job.id));
    html! {
        h2 { "Outputs" }
        @match AttemptRow::output_holder(attempts) {
            None => p.muted { "No attempt has run yet." },
            Some(a) => {
                p #output-host {
                    "On host " strong { (a.host.clone().unwrap_or_default()) }
                    " (attempt " (a.attempt) ")"
                    @if let Some(o) = &a.outputs { ", in " code { (o.dir) } }
                }
                @match &a.outputs {
                    None => p.muted { "No list of files: the attempt has not ended, its worker was lost before it could say, or the directory could not be made (the worker's log says why)." },
                    Some(o) if o.files.is_empty() => p.muted { "The job left no files in " code { "$GRIDQ_OUTPUT" } "." },
                    Some(o) => {
                        table.outputs {
                            thead { tr { th { "file" } th.num { "size" } } }
                            tbody {
                                @for f in &o.files {
                                    tr { td { code { (f.name) } } td.num title=(f.size) { (gridq_common::human::bytes(f.size)) } }
                                }
                            }
                        }
                        p.muted {
                            (o.files.len()) " file" @if o.files.len() != 1 { "s" } ", " (gridq_common::human::bytes(o.bytes()))
                            @if o.truncated { " (the list stops there: the job left more)" }
                            " · fetch them with " code { (pull) }
                        }
                    }
                }
            }
        }
    }
}

fn duration_of(j: &JobRow) -> String {
    match (j.started_ms, j.finished_ms) {
        (Some(s), Some(f)) if f >= s => span(f - s),
        (Some(s), None) if j.state == JobState::Running => {
            format!("{}…", span(now_ms().saturating_sub(s)))
        }
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- sweeps

pub(crate) async fn sweeps(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Markup> {
    let list = read(&state, |r| r.view().sweeps()).await?;
    let now = now_ms();
    let csrf = csrf_of(caller.as_deref());
    let body = html! {
        h1 { "Sweeps" }
        section #sweeps data-live {
            @if list.is_empty() {
                p.muted { "No sweep yet. Submit one with " code { "gridq submit SWEEP.yaml" } "." }
            } @else {
                table.sweeps {
                    thead { tr { th { "sweep" } th { "progress" } th { "started" } th { "elapsed" } th { "ETA" } } }
                    tbody {
                        @for s in &list {
                            tr {
                                td { a href={"/sweeps/" (q(s.name.as_str()))} { (s.name.as_str()) } @if s.canceled { " " (state_badge("canceled")) } }
                                td.wide { (progress(&s.counts, s.total)) }
                                td { (when(s.created_ms)) }
                                td { (span(if s.done() >= s.total { s.last_finished_ms.unwrap_or(s.updated_ms).max(s.created_ms) } else { now }.saturating_sub(s.created_ms))) }
                                td { (eta(s, now)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(
        "Sweeps",
        "Sweeps",
        &csrf,
        flash_of(&params).as_deref(),
        body,
    ))
}

/// The sweep page's query: filters, sort, page, tab, metric.
#[derive(Debug, Clone)]
struct SweepView {
    states: Vec<JobState>,
    params: Vec<(String, String)>,
    text: Option<String>,
    sort: SortKey,
    descending: bool,
    page: u64,
    plots: bool,
    metric: Option<String>,
}

impl SweepView {
    fn parse(params: &[(String, String)], names: &[String]) -> ApiResult<Self> {
        let mut states = Vec::new();
        let mut filters = Vec::new();
        for (k, v) in params {
            if k == "state" && !v.is_empty() {
                states.push(
                    v.parse::<JobState>()
                        .map_err(|e| AppError::bad(format!("`state`: {e}")))?,
                );
            } else if let Some(name) = k.strip_prefix("p.") {
                if !names.iter().any(|n| n == name) {
                    return Err(AppError::bad(format!(
                        "`{k}`: the sweep has no parameter `{name}`"
                    )));
                }
                if !v.is_empty() {
                    filters.push((name.to_owned(), v.clone()));
                }
            }
        }
        let sort = SortKey::parse(param(params, "sort").unwrap_or("index"))
            .map_err(|e| AppError::bad(format!("`sort`: {e}")))?;
        let page = match param(params, "page") {
            None => 1,
            Some(p) => p
                .parse::<u64>()
                .ok()
                .filter(|p| (1..=1_000_000).contains(p))
                .ok_or_else(|| {
                    AppError::bad(format!("`page`: expected a number from 1, found `{p}`"))
                })?,
        };
        Ok(Self {
            states,
            params: filters,
            text: param(params, "q").map(str::to_owned),
            sort,
            descending: param(params, "desc").is_some_and(|d| d == "1" || d == "true"),
            page,
            plots: param(params, "tab") == Some("plots"),
            metric: param(params, "metric").map(str::to_owned),
        })
    }

    /// This view's URL with some fields changed.
    fn href(&self, sweep: &str, page: u64, sort: Option<(&SortKey, bool)>) -> String {
        let mut parts: Vec<String> = Vec::new();
        for s in &self.states {
            parts.push(format!("state={}", s.as_str()));
        }
        for (k, v) in &self.params {
            parts.push(format!("p.{}={}", q(k), q(v)));
        }
        if let Some(t) = &self.text {
            parts.push(format!("q={}", q(t)));
        }
        let (key, desc) = sort.map_or((&self.sort, self.descending), |(k, d)| (k, d));
        if *key != SortKey::Index {
            parts.push(format!("sort={}", q(&key.as_param())));
        }
        if desc {
            parts.push("desc=1".into());
        }
        if page > 1 {
            parts.push(format!("page={page}"));
        }
        format!("/sweeps/{}?{}", q(sweep), parts.join("&"))
    }
}

pub(crate) async fn sweep_page(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Markup> {
    let id = sweep_id(&name)?;
    let id2 = id.clone();
    let (summary, record, metrics) = read(&state, move |r| {
        let v = r.view();
        Ok((v.sweep(&id2)?, v.sweep_record(&id2)?, v.metric_names(&id2)?))
    })
    .await?;
    let (Some(summary), Some(record)) = (summary, record) else {
        return Err(AppError::not_found(format!("no sweep named `{name}`")));
    };
    let view = SweepView::parse(&params, &record.param_names)?;
    let csrf = csrf_of(caller.as_deref());
    let now = now_ms();
    let tabs = html! {
        nav.tabs {
            a href={"/sweeps/" (q(&name))} class=[(!view.plots).then_some("active")] { "Jobs" }
            a href={"/sweeps/" (q(&name)) "?tab=plots"} class=[view.plots.then_some("active")] { "Plots" }
        }
    };
    let head = html! {
        h1 { "Sweep " code { (name) } }
        section #summary.summary data-live {
            (progress(&summary.counts, summary.total))
            p.muted {
                "started " (when(summary.created_ms)) " · ETA " (eta(&summary, now))
                " · queue " code { (record.queue) }
                @if record.retries > 0 { " · retries " (record.retries) }
                @if let Some(t) = record.timeout_ms { " · timeout " (span(t)) }
                @if let Some(c) = &summary.code {
                    " · code " code title=(c.tree) { (c.short()) }
                    @if summary.same_code { " (same code: runs only on workers with it)" }
                }
            }
        }
        div.actions {
            form method="post" action={"/sweeps/" (q(&name)) "/cancel"} {
                input type="hidden" name="csrf" value=(csrf);
                button.danger type="submit" { "Cancel sweep" }
            }
            form method="post" action={"/sweeps/" (q(&name)) "/retry"} {
                input type="hidden" name="csrf" value=(csrf);
                button type="submit" { "Retry failed jobs" }
            }
            a.button href={"/api/v1/sweeps/" (q(&name)) "/results?format=csv"} download={(name) ".csv"} { "Results CSV" }
            a.button href={"/api/v1/sweeps/" (q(&name)) "/results?format=jsonl"} download={(name) ".jsonl"} { "Results JSONL" }
        }
        (tabs)
    };
    let body = if view.plots {
        plots_section(
            &state,
            &id,
            &record.param_names,
            &metrics,
            view.metric.as_deref(),
        )
        .await?
    } else {
        jobs_section(&state, &id, &name, &record.param_names, &metrics, &view).await?
    };
    Ok(layout(
        &name,
        "Sweeps",
        &csrf,
        flash_of(&params).as_deref(),
        html! { (head) (body) },
    ))
}

async fn jobs_section(
    state: &AppState,
    id: &SweepId,
    name: &str,
    param_names: &[String],
    metrics: &[String],
    view: &SweepView,
) -> ApiResult<Markup> {
    let query = JobQuery {
        sweep: id.clone(),
        states: view.states.clone(),
        params: view.params.clone(),
        text: view.text.clone(),
        sort: view.sort.clone(),
        descending: view.descending,
        limit: PAGE_SIZE,
        offset: (view.page - 1) * PAGE_SIZE,
    };
    let (jobs, count) = read(state, move |r| r.view().query_jobs(&query)).await?;
    // A result key that repeats a parameter (projects often echo their arguments) is not a
    // metric column of its own.
    let shown_metrics: Vec<&String> = metrics
        .iter()
        .filter(|m| !param_names.contains(m))
        .take(8)
        .collect();
    let pages = count.count.div_ceil(PAGE_SIZE).max(1);
    let sort_link = |key: SortKey, label: &str| -> Markup {
        let active = view.sort == key;
        let desc = active && !view.descending;
        let arrow = if active {
            if view.descending { " ▼" } else { " ▲" }
        } else {
            ""
        };
        html! { a.sort href=(view.href(name, 1, Some((&key, desc)))) { (label) (arrow) } }
    };
    Ok(html! {
        form.filters method="get" action={"/sweeps/" (q(name))} {
            label { "state "
                select name="state" {
                    option value="" { "any" }
                    @for s in STATES {
                        option value=(s) selected[view.states.iter().any(|x| x.as_str() == s)] { (s) }
                    }
                }
            }
            @for p in param_names {
                label { (p) " "
                    input type="text" name={"p." (p)} size="8"
                        value=(view.params.iter().find(|(k, _)| k == p).map(|(_, v)| v.as_str()).unwrap_or(""));
                }
            }
            label { "search "
                input type="search" name="q" value=(view.text.clone().unwrap_or_default()) placeholder="id or command text";
            }
            @if view.sort != SortKey::Index { input type="hidden" name="sort" value=(view.sort.as_param()); }
            @if view.descending { input type="hidden" name="desc" value="1"; }
            button type="submit" { "Filter" }
            a href={"/sweeps/" (q(name))} { "clear" }
        }
        section #jobs data-live {
            p.muted {
                (if count.at_least { format!("{}+", count.count) } else { count.count.to_string() }) " jobs"
                @if let SortKey::Metric(m) = &view.sort { " with metric " code { (m) } }
                " · page " (view.page) " of " (if count.at_least { format!("{pages}+") } else { pages.to_string() })
            }
            div.scroll {
                table.jobs {
                    thead { tr {
                        th { (sort_link(SortKey::Index, "#")) }
                        th { "job" }
                        th { (sort_link(SortKey::State, "state")) }
                        th.num { "attempt" }
                        @for p in param_names { th { (sort_link(SortKey::Param(p.clone()), p)) } }
                        @for m in &shown_metrics { th.metric { (sort_link(SortKey::Metric((*m).clone()), m)) } }
                        th { (sort_link(SortKey::Duration, "duration")) }
                        th { "host" }
                        th { "code" }
                        th { "exit" }
                        th { (sort_link(SortKey::Finished, "finished")) }
                    } }
                    tbody {
                        @for j in &jobs {
                            tr {
                                td.num { (j.index) }
                                td { a href=(job_href(j)) { code { (short(&j.id)) } } }
                                td { (state_badge(j.state.as_str())) }
                                td.num { (j.attempt) }
                                @for p in param_names { td { (j.params.get(p).map(plain).unwrap_or_default()) } }
                                @for m in &shown_metrics { td.num { (j.result.as_ref().and_then(|r| r.get(*m)).map(plain).unwrap_or_default()) } }
                                td { (duration_of(j)) }
                                td { (j.host.clone().unwrap_or_default()) }
                                td { code { (j.code.as_ref().map(code_label).unwrap_or_default()) } }
                                td { (exit_text(j)) }
                                td { (j.finished_ms.map(when).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
            nav.pager {
                @if view.page > 1 {
                    a href=(view.href(name, 1, None)) { "« first" }
                    a href=(view.href(name, view.page - 1, None)) { "‹ prev" }
                }
                @if view.page < pages || count.at_least && jobs.len() as u64 == PAGE_SIZE {
                    a href=(view.href(name, view.page + 1, None)) { "next ›" }
                }
            }
        }
    })
}

async fn plots_section(
    state: &AppState,
    id: &SweepId,
    param_names: &[String],
    metrics: &[String],
    chosen: Option<&str>,
) -> ApiResult<Markup> {
    let metric = chosen
        .filter(|m| metrics.iter().any(|x| x == m))
        .or_else(|| {
            metrics
                .iter()
                .find(|m| !param_names.contains(m))
                .or_else(|| metrics.first())
                .map(String::as_str)
        })
        .map(str::to_owned);
    let (id2, m2) = (id.clone(), metric.clone());
    let (rows, durations) = read(state, move |r| {
        let v = r.view();
        let rows = match &m2 {
            Some(m) => v.plot_rows(&id2, m, PLOT_POINTS)?,
            None => Vec::new(),
        };
        Ok((rows, v.durations(&id2, 20_000)?))
    })
    .await?;
    let name = id.as_str();
    Ok(html! {
        @if let Some(metric) = &metric {
            form.filters method="get" action={"/sweeps/" (q(name))} {
                input type="hidden" name="tab" value="plots";
                label { "metric "
                    select name="metric" {
                        @for m in metrics { option value=(m) selected[m == metric] { (m) } }
                    }
                }
                button type="submit" { "Show" }
            }
            section #plots.plots data-live {
                @for p in param_names {
                    @let points: Vec<(serde_json::Value, f64)> = rows.iter().map(|(ps, v)| (ps.get(p).cloned().unwrap_or(serde_json::Value::Null), *v)).collect();
                    // A parameter with one value says nothing against the metric.
                    @if points.iter().any(|(x, _)| *x != points[0].0) {
                        figure.plot {
                            figcaption { (metric) " against " (p) }
                            (PreEscaped(plots::scatter(p, metric, &points)))
                        }
                    }
                }
                figure.plot {
                    figcaption { "job durations" }
                    (PreEscaped(plots::durations(&durations)))
                }
                figure.plot.wide {
                    figcaption { "parameters against " (metric) }
                    (PreEscaped(plots::parallel_coordinates(param_names, metric, &rows.iter().map(|(ps, v)| (param_names.iter().map(|p| ps.get(p).cloned().unwrap_or(serde_json::Value::Null)).collect(), *v)).collect::<Vec<_>>())))
                }
            }
        } @else {
            p.muted { "No numeric results yet: a job's metrics come from the JSON object it writes to " code { "$GRIDQ_RESULT" } "." }
            section #plots.plots data-live {
                figure.plot {
                    figcaption { "job durations" }
                    (PreEscaped(plots::durations(&durations)))
                }
            }
        }
    })
}

fn back(to: &str, msg: &str) -> Response {
    Redirect::to(&format!(
        "{to}{}msg={}",
        if to.contains('?') { "&" } else { "?" },
        q(msg)
    ))
    .into_response()
}

pub(crate) async fn cancel_sweep(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let id = sweep_id(&name)?;
    let n = state
        .handle
        .cancel_sweep(id)
        .await
        .map_err(AppError::not_found)?;
    Ok(back(
        &format!("/sweeps/{}", q(&name)),
        &format!("Canceled {n} jobs."),
    ))
}

pub(crate) async fn retry_sweep(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let id = sweep_id(&name)?;
    let n = state
        .handle
        .retry_failed(id)
        .await
        .map_err(AppError::internal)?;
    Ok(back(
        &format!("/sweeps/{}", q(&name)),
        &format!("Retrying {n} failed jobs."),
    ))
}

// ---------------------------------------------------------------- job

#[derive(Debug, Deserialize)]
pub(crate) struct JobPageQuery {
    sweep: Option<String>,
    msg: Option<String>,
}

pub(crate) async fn job_page(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    Query(jq): Query<JobPageQuery>,
) -> ApiResult<Markup> {
    let job = super::api::find_job(&state, &id, jq.sweep.as_deref()).await?;
    let (s, j) = (job.sweep.clone(), job.id);
    let (attempts, duplicates, tail) = read(&state, move |r| {
        let v = r.view();
        Ok((
            v.attempts(&s, &j)?,
            v.duplicates(&s, &j)?,
            v.logs(&s, &j, None, 2_000)?,
        ))
    })
    .await?;
    let csrf = csrf_of(caller.as_deref());
    let sweep = job.sweep.as_str();
    let self_href = job_href(&job);
    let last = tail.last().map_or((0, 0), |(a, s, _)| (*a, *s));
    let body = html! {
        h1 { "Job " code { (job.id.to_string()) } }
        p { "sweep " a href={"/sweeps/" (q(sweep))} { (sweep) } " · index " (job.index) }
        section #jobstate data-live {
            p { (state_badge(job.state.as_str())) " attempt " (job.attempt)
                @if let Some(r) = &job.reason { " · " span.reason { (r) } } }
        }
        div.actions {
            form method="post" action={"/jobs/" (job.id.to_string()) "/cancel?sweep=" (q(sweep))} {
                input type="hidden" name="csrf" value=(csrf);
                button.danger type="submit" { "Cancel job" }
            }
            form method="post" action={"/jobs/" (job.id.to_string()) "/retry?sweep=" (q(sweep))} {
                input type="hidden" name="csrf" value=(csrf);
                button type="submit" { "Retry job" }
            }
            a.button href={"/api/v1/jobs/" (job.id.to_string()) "/logs?format=text&sweep=" (q(sweep))} download={(job.id.to_string()) ".log"} { "Download log" }
        }
        h2 { "Command" }
        pre.argv { @for (i, a) in job.argv.iter().enumerate() { @if i > 0 { " " } span.arg { (a) } } }
        h2 { "Parameters" }
        table.kv { tbody { @for (k, v) in &job.params { tr { th { (k) } td { code { (v.to_string()) } } } } } }
        section #attempts data-live {
            h2 { "Attempts" }
            table {
                thead { tr { th.num { "#" } th { "state" } th { "worker" } th { "host" } th { "GPU" } th { "start" } th { "end" } th { "exit" } th { "reason" } th { "code" } } }
                tbody {
                    @for a in &attempts {
                        tr {
                            td.num { (a.attempt) }
                            td { (state_badge(&a.state)) }
                            td { code { (a.worker.clone().unwrap_or_default()) } }
                            td { (a.host.clone().unwrap_or_default()) }
                            td { (a.gpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")) }
                            td { (a.started_ms.map(when).unwrap_or_default()) }
                            td { (a.finished_ms.map(when).unwrap_or_default()) }
                            td { (match (a.exit_code, a.signal) { (_, Some(s)) => format!("signal {s}"), (Some(c), None) => c.to_string(), _ => String::new() }) }
                            td.reason { (a.reason.clone().unwrap_or_default()) }
                            td { code { (a.code.as_ref().map(code_label).unwrap_or_default()) } }
                        }
                    }
                }
            }
            @if duplicates > 0 { p.muted { (duplicates) " late duplicate result(s) stored apart." } }
            (outputs_section(&job, &attempts))
            h2 { "Result" }
            @match &job.result {
                Some(r) => pre.result { (serde_json::to_string_pretty(r).unwrap_or_default()) },
                None if job.state.is_final() => p.muted { "No result: the job wrote none to " code { "$GRIDQ_RESULT" } "." },
                None => p.muted { "No result yet." },
            }
        }
        h2 { "Log" }
        pre #log.log data-stream={"/api/v1/jobs/" (job.id.to_string()) "/logs/stream?sweep=" (q(sweep))}
            data-after-attempt=(last.0) data-after-seq=(last.1) {
            @for (i, (attempt, _, l)) in tail.iter().enumerate() {
                @if i == 0 || tail[i - 1].0 != *attempt {
                    span.attempt data-attempt=(attempt) { "── attempt " (attempt) " ──\n" }
                }
                span class={"line " @if l.stream == gridq_common::wire::Stream::Stderr { "err" } } data-attempt=(attempt) { (l.line) "\n" }
            }
        }
        @if tail.len() >= 2_000 { p.muted { "Showing the first 2,000 lines as the page loaded; download the full log above." } }
        p.muted { a href=(self_href) { "permalink" } }
    };
    Ok(layout(
        &format!("Job {}", short(&job.id)),
        "Sweeps",
        &csrf,
        jq.msg.as_deref(),
        body,
    ))
}

pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(jq): Query<JobPageQuery>,
) -> ApiResult<Response> {
    let job = super::api::find_job(&state, &id, jq.sweep.as_deref()).await?;
    let changed = state
        .handle
        .cancel_job(job.sweep.clone(), job.id)
        .await
        .map_err(AppError::internal)?;
    let msg = if changed {
        "Job canceled.".to_owned()
    } else {
        format!("The job already finished ({}); nothing changed.", job.state)
    };
    Ok(back(&job_href(&job), &msg))
}

pub(crate) async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(jq): Query<JobPageQuery>,
) -> ApiResult<Response> {
    let job = super::api::find_job(&state, &id, jq.sweep.as_deref()).await?;
    let retried = state
        .handle
        .retry_job(job.sweep.clone(), job.id)
        .await
        .map_err(AppError::internal)?;
    let msg = if retried {
        format!("Retrying: attempt {} is queued.", job.attempt + 1)
    } else {
        format!(
            "Only failed, timed-out or canceled jobs are retried; this one is {}.",
            job.state
        )
    };
    Ok(back(&job_href(&job), &msg))
}

// ---------------------------------------------------------------- workers

fn gpu_cells(info: &serde_json::Value) -> Markup {
    let gpus = info
        .get("gpus")
        .and_then(|g| g.as_array())
        .cloned()
        .unwrap_or_default();
    html! {
        @for g in &gpus {
            @let util = g.get("utilization").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            @let used = g.get("memory_used_mb").and_then(serde_json::Value::as_u64).unwrap_or(0);
            @let total = g.get("memory_total_mb").and_then(serde_json::Value::as_u64).unwrap_or(0);
            div.gpu title=(g.get("name").and_then(|n| n.as_str()).unwrap_or("")) {
                "GPU " (g.get("index").and_then(serde_json::Value::as_u64).unwrap_or(0)) ": "
                (format!("{:.0}%", util * 100.0)) " · " (used) "/" (total) " MB"
                meter min="0" max="1" value=(format!("{util:.3}")) {}
            }
        }
    }
}

pub(crate) async fn workers_page(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Markup> {
    let workers = read(&state, |r| r.view().workers()).await?;
    let csrf = csrf_of(caller.as_deref());
    let row = |w: &WorkerRow| {
        let i = &w.info;
        let running = w.running_jobs();
        html! {
            tr {
                td { code { (w.id) } }
                td { (w.host) }
                td { (state_badge(&w.state)) @if let Some(r) = &w.reason { br; span.reason { (r) } } }
                td.num { (i.get("slots").and_then(serde_json::Value::as_u64).map(|s| s.to_string()).unwrap_or_default()) }
                td.num { (running) }
                td.num { (w.processed) }
                td.num { (w.failed) }
                td.num { (i.get("load1").and_then(serde_json::Value::as_f64).map(|l| format!("{l:.2}")).unwrap_or_default()) }
                td { (i.get("mem_used_mb").and_then(serde_json::Value::as_u64).map(|u| format!("{u}/{} MB", i.get("mem_total_mb").and_then(serde_json::Value::as_u64).unwrap_or(0))).unwrap_or_default()) }
                td { (gpu_cells(i)) }
                td { (ago(w.last_seen_ms)) }
                td {
                    @if w.state == "online" {
                        form method="post" action={"/workers/" (q(&w.id)) "/drain"} {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" title="finish running jobs, take no new ones, exit" { "Drain" }
                        }
                    }
                }
            }
        }
    };
    let (live, gone): (Vec<&WorkerRow>, Vec<&WorkerRow>) =
        workers.iter().partition(|w| w.is_online());
    let head = html! { thead { tr { th { "worker" } th { "host" } th { "state" } th.num { "slots" } th.num { "running" } th.num { "processed" } th.num { "failed" } th.num { "load" } th { "memory" } th { "GPUs" } th { "last heartbeat" } th {} } } };
    let body = html! {
        h1 { "Workers" }
        section #workers data-live {
            h2 { "Online" }
            @if live.is_empty() { p.muted { "No worker online. Start one with " code { "gridq worker --broker URL" } "." } }
            @else { table { (head) tbody { @for w in &live { (row(w)) } } } }
            h2 { "Lost and stopped" }
            @if gone.is_empty() { p.muted { "None." } }
            @else { table { (head) tbody { @for w in &gone { (row(w)) } } } }
        }
    };
    Ok(layout(
        "Workers",
        "Workers",
        &csrf,
        flash_of(&params).as_deref(),
        body,
    ))
}

pub(crate) async fn drain_worker(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let worker = WorkerId::new(&id).map_err(|e| AppError::bad(format!("worker `{id}`: {e}")))?;
    state
        .handle
        .drain_worker(worker)
        .await
        .map_err(AppError::internal)?;
    Ok(back("/workers", &format!("Asked {id} to drain.")))
}

// ---------------------------------------------------------------- broker

pub(crate) async fn broker_page(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Markup> {
    let (queues, dead) = read(&state, |r| {
        Ok((r.view().sweep_queues()?, r.view().dead_letters(20)?))
    })
    .await?;
    let stats = state.monitor.broker_stats(&queues).await;
    let csrf = csrf_of(caller.as_deref());
    let link = state.monitor.broker_link();
    let body = html! {
        h1 { "Broker" }
        p #brokerlink {
            code { (link["url"].as_str().unwrap_or("")) } " "
            @match link["encryption"].as_str() {
                Some("tls") => { span.ok { "encrypted (TLS)" } }
                Some("loopback") => { span.muted { "plain AMQP on this host's loopback" } }
                _ => { strong.warn { "NOT ENCRYPTED: plain AMQP to another host; use amqps://" } }
            }
        }
        section #brokerq data-live { (queue_table(&stats)) }
        h2 { "Dead-lettered messages" }
        section #dead data-live {
            @if dead.is_empty() { p.muted { "None." } }
            @else {
                table {
                    thead { tr { th { "received" } th { "queue" } th { "kind" } th { "reason" } th { "body" } } }
                    tbody {
                        @for d in &dead {
                            tr {
                                td { (when(d.received_ms)) }
                                td { code { (d.queue) } }
                                td { (d.kind.clone().unwrap_or_default()) }
                                td.reason { (d.reason) }
                                td { code.body { (d.body.chars().take(200).collect::<String>()) } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(
        "Broker",
        "Broker",
        &csrf,
        flash_of(&params).as_deref(),
        body,
    ))
}

// ---------------------------------------------------------------- metrics

pub(crate) async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let (totals, workers, queues) = read(&state, |r| {
        let v = r.view();
        Ok((v.state_totals()?, v.workers()?, v.sweep_queues()?))
    })
    .await?;
    let stats = state.monitor.broker_stats(&queues).await;
    let online: Vec<&WorkerRow> = workers.iter().filter(|w| w.is_online()).collect();
    let mut jobs_by_state: Vec<(String, u64)> = STATES
        .iter()
        .map(|s| {
            (
                (*s).to_owned(),
                totals.iter().find(|(x, _)| x == s).map_or(0, |(_, n)| *n),
            )
        })
        .collect();
    jobs_by_state.sort();
    let snapshot = Snapshot {
        jobs_by_state,
        workers_online: online.len() as u64,
        running_by_worker: online
            .iter()
            .map(|w| (w.id.clone(), w.running_jobs() as u64))
            .collect(),
        queues: stats.queues,
        gpu_utilization: online
            .iter()
            .flat_map(|w| {
                w.info
                    .get("gpus")
                    .and_then(|g| g.as_array())
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|g| {
                        (
                            w.id.clone(),
                            u32::try_from(
                                g.get("index")
                                    .and_then(serde_json::Value::as_u64)
                                    .unwrap_or(0),
                            )
                            .unwrap_or(0),
                            g.get("utilization")
                                .and_then(serde_json::Value::as_f64)
                                .unwrap_or(0.0),
                        )
                    })
            })
            .collect(),
    };
    let body = state.monitor.activity.metrics.render(&snapshot);
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        for (next, to) in [
            (Some("/sweeps/a?x=1"), "/sweeps/a?x=1"),
            (Some("/%09/evil.example"), "/%09/evil.example"),
            (Some("/\t/evil.example"), "/"),
            (Some("/\n/x"), "/"),
            (Some("/ /x"), "/"),
            (Some("//evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("https://evil.example/"), "/"),
            (Some("/caf\u{e9}"), "/"),
            (Some(""), "/"),
            (None, "/"),
        ] {
            assert_eq!(safe_next(next), to, "next = {next:?}");
        }
    }
}
