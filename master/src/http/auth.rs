//! Who may use the monitor, and protection against cross-site requests.
//!
//! - Scripts send the master's token as `Authorization: Bearer <token>`.
//! - Browsers log in once on `/login` with the token and get a session cookie (`HttpOnly`,
//!   `SameSite=Strict`, random 256-bit id, kept in memory for [`SESSION_TTL`]; a master restart
//!   logs everyone out).
//! - Every request that changes state with a session cookie must carry the session's CSRF token
//!   (header `X-CSRF-Token` or form field `csrf`), and an `Origin` header, when present, must be
//!   this host. Bearer requests cannot be forged by another site, so they need neither.
//! - Only `/healthz`, the login page and the static assets (CSS, JS) are served without
//!   credentials. A wrong token is answered 401 and logged without the token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use tracing::warn;

use super::{AppError, AppState};

/// The session cookie's name.
pub const COOKIE: &str = "gridq_session";
/// How long a session lasts without being used.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the least recently used go first.
const MAX_SESSIONS: usize = 4096;
/// Largest form body read for the CSRF check.
const MAX_FORM: usize = 1 << 20;

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    last_used: Instant,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Creates a session; returns its id.
    pub fn create(&self) -> String {
        let id = random_hex();
        let session = Session {
            csrf: random_hex(),
            last_used: Instant::now(),
        };
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, s| s.last_used.elapsed() < SESSION_TTL);
            if map.len() >= MAX_SESSIONS
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
            map.insert(id.clone(), session);
        }
        id
    }

    /// The live session with this id, refreshed.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().ok()?;
        let s = map.get_mut(id)?;
        if s.last_used.elapsed() >= SESSION_TTL {
            map.remove(id);
            return None;
        }
        s.last_used = Instant::now();
        Some(s.clone())
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not something to serve pages through.
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal without an early exit, so timing does not tell how much of a token was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session id from the request's cookies.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// How a request proved who it is.
#[derive(Debug, Clone)]
pub enum Caller {
    Bearer,
    Session { id: String, csrf: String },
}

/// The `Set-Cookie` value for a new session.
pub fn session_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("gridq_session=; Path=/"))
}

/// The `Set-Cookie` value that ends a session.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("gridq_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn wants_html(request: &Request) -> bool {
    request.method() == Method::GET
        && !request.uri().path().starts_with("/api/")
        && request.uri().path() != "/metrics"
}

/// The gate in front of everything but `/healthz`, `/login` and `/static/`.
pub(crate) async fn require_auth(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let caller = if let Some(token) = bearer {
        if constant_time_eq(token.as_bytes(), state.handle.token.as_bytes()) {
            Some(Caller::Bearer)
        } else {
            warn!(path = %request.uri().path(), "request with a wrong token refused");
            return AppError(
                StatusCode::UNAUTHORIZED,
                "wrong token (Authorization: Bearer <token>)".into(),
            )
            .into_response();
        }
    } else {
        session_id(headers).and_then(|id| {
            state
                .sessions
                .get(&id)
                .map(|s| Caller::Session { id, csrf: s.csrf })
        })
    };
    let Some(caller) = caller else {
        if wants_html(&request) {
            let next_path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            return Redirect::to(&format!(
                "/login?next={}",
                super::pages::url_encode(&next_path)
            ))
            .into_response();
        }
        warn!(path = %request.uri().path(), "request without credentials refused");
        return AppError(
            StatusCode::UNAUTHORIZED,
            "missing token: send Authorization: Bearer <token>, or log in at /login".into(),
        )
        .into_response();
    };
    let mut request = request;
    if let Caller::Session { csrf, .. } = &caller
        && !matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        )
    {
        match check_csrf(request, csrf).await {
            Ok(r) => request = r,
            Err(refused) => return refused,
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Checks a session's state-changing request: same-origin, and the CSRF token in the header or
/// the form body (which is put back for the handler).
async fn check_csrf(request: Request, csrf: &str) -> Result<Request, Response> {
    let path = request.uri().path().to_owned();
    let refuse = |why: &str| {
        warn!(path = %path, reason = why, "cross-site request refused");
        AppError(StatusCode::FORBIDDEN, why.to_owned()).into_response()
    };
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        if origin_host != host {
            return Err(refuse(
                "cross-origin request refused (Origin does not match Host)",
            ));
        }
    }
    if let Some(given) = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()) {
        return if constant_time_eq(given.as_bytes(), csrf.as_bytes()) {
            Ok(request)
        } else {
            Err(refuse("wrong CSRF token; reload the page"))
        };
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(refuse(
            "missing CSRF token (X-CSRF-Token header or csrf form field)",
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM)
        .await
        .map_err(|_| AppError::bad("form body too large or unreadable").into_response())?;
    let given = form_urlencoded_get(&bytes, "csrf");
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), csrf.as_bytes())) {
        return Err(refuse("wrong or missing CSRF token; reload the page"));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The first value of `key` in a URL-encoded form.
pub fn form_urlencoded_get(body: &[u8], key: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::default();
        let id = s.create();
        assert_eq!(id.len(), 64);
        let got = s.get(&id).expect("live session");
        assert_eq!(got.csrf.len(), 64);
        assert_ne!(got.csrf, id);
        s.remove(&id);
        assert!(s.get(&id).is_none());
        assert!(s.get("nope").is_none());
    }

    #[test]
    fn cookie_is_http_only_and_strict() {
        let c = session_cookie("abc");
        let c = c.to_str().unwrap();
        assert!(c.starts_with("gridq_session=abc;"));
        assert!(c.contains("HttpOnly"));
        assert!(c.contains("SameSite=Strict"));
    }

    #[test]
    fn finds_the_session_among_other_cookies() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; gridq_session=xyz; b=2"),
        );
        assert_eq!(session_id(&h).as_deref(), Some("xyz"));
        assert_eq!(
            form_urlencoded_get(b"a=1&csrf=q%2Bw", "csrf").as_deref(),
            Some("q+w")
        );
    }
}
