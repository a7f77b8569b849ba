//! Fixtures for the browser tests: a `chromedriver` child process driving headless Chromium
//! through `fantoccini`, and the helpers the tests share (logging in, screenshots, waiting on
//! what the page shows).
//!
//! Each [`Browser`] owns its chromedriver, in a process group of its own: dropping it (also when
//! a test panics) ends chromedriver and every Chromium process it started. At most
//! [`MAX_BROWSERS`] run at once in a test process, so parallel tests do not starve the jobs they
//! watch of CPU.
//!
//! fantoccini is built without its TLS features (chromedriver listens on plain HTTP on
//! localhost), so the client is built from `hyper-util`'s plain [`HttpConnector`].

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::cookies::Cookie;
use fantoccini::error::CmdError;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Browsers running at once in one test process.
pub const MAX_BROWSERS: usize = 2;
/// The browser window's size, fixed so screenshots compare.
pub const WINDOW: (u32, u32) = (1400, 1000);
/// Full-page screenshots are cut at this height (CSS pixels).
const MAX_SHOT_HEIGHT: f64 = 4000.0;
/// How long chromedriver may take to answer its `/status`.
const DRIVER_START: Duration = Duration::from_secs(30);

static SLOTS: Semaphore = Semaphore::const_new(MAX_BROWSERS);

/// Where screenshots go: `<target dir>/screenshots`.
pub fn screenshot_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map_or(tmp.clone(), PathBuf::from)
        .join("screenshots")
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A `chromedriver` process in its own process group; the group is ended on drop.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    async fn start(dir: &TempDir) -> Driver {
        use std::os::unix::process::CommandExt;
        let exe = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let log = dir.path().join("chromedriver.log");
        let file = std::fs::File::create(&log).expect("chromedriver log");
        let port = free_port();
        let child = Command::new(&exe)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{exe}` (install the chromium-driver package): {e}")
            });
        let mut driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        driver.wait_ready().await;
        driver
    }

    /// Polls `/status` until chromedriver says it is ready. (fantoccini only asks a driver for
    /// its status within a session, which is what this waits to be able to open.)
    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + DRIVER_START;
        loop {
            let seen = match http.get(format!("{}/status", self.url)).send().await {
                Ok(r) => match r.json::<Value>().await {
                    Ok(v) if v["value"]["ready"] == true => return,
                    Ok(v) => v.to_string(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromedriver exited ({status}) before it was ready; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready after {DRIVER_START:?}; last seen: {seen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Driver({})", self.url)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        // Chromium's processes stay in chromedriver's group; end them all, politely first.
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A WebDriver command failed; what fantoccini reported.
#[derive(Debug)]
pub struct WdError(pub CmdError);

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // chromedriver appends the browser's version and more on further lines.
        let text = self.0.to_string();
        f.write_str(text.lines().next().unwrap_or_default())
    }
}

impl std::error::Error for WdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<WdError> for String {
    fn from(e: WdError) -> String {
        e.to_string()
    }
}

/// `url::ParseError`, named through `reqwest`'s re-export of `Url` (this crate does not
/// depend on `url` itself).
type UrlParseError = <reqwest::Url as std::str::FromStr>::Err;

/// A Chrome DevTools command, sent through chromedriver's `goog/cdp/execute` endpoint (which
/// fantoccini has no method for).
#[derive(Debug)]
struct Cdp {
    cmd: &'static str,
    params: Value,
}

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, UrlParseError> {
        let session = session_id.expect("a DevTools command within a session");
        base_url.join(&format!("session/{session}/goog/cdp/execute"))
    }

    fn method_and_body(&self, _: &reqwest::Url) -> (reqwest::Method, Option<String>) {
        let body = json!({ "cmd": self.cmd, "params": self.params });
        (reqwest::Method::POST, Some(body.to_string()))
    }
}

/// One headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    client: Client,
    driver: Driver,
    _profile: TempDir,
    _slot: SemaphorePermit<'static>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile, set up as a user's
    /// browser is (the back/forward cache on); waits for a free slot first (at most
    /// [`MAX_BROWSERS`] at once).
    pub async fn start() -> Browser {
        Browser::start_with(&[]).await
    }

    /// [`Browser::start`] with more Chromium switches.
    pub async fn start_with(extra_args: &[&str]) -> Browser {
        let slot = SLOTS.acquire().await.expect("the browser slots stay open");
        let profile = tempfile::Builder::new()
            .prefix("gridq-chromium-")
            .tempdir()
            .expect("profile dir");
        let driver = Driver::start(&profile).await;
        let binary = std::env::var("CHROME_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ]
        .into_iter()
        .chain(extra_args.iter().copied())
        .map(str::to_owned)
        .collect();
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ));
        args.push(format!("--window-size={},{}", WINDOW.0, WINDOW.1));
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": binary, "args": args }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start Chromium ({binary}): {e}\nchromedriver's log:\n{}",
                    std::fs::read_to_string(&driver.log).unwrap_or_default()
                )
            });
        Browser {
            client,
            driver,
            _profile: profile,
            _slot: slot,
        }
    }

    /// The fantoccini client, for what the helpers here do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(self) {
        let _ = self.client.close().await;
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {}", WdError(e)));
    }

    /// The page's URL.
    pub async fn current_url(&self) -> String {
        self.client
            .current_url()
            .await
            .unwrap_or_else(|e| panic!("the current URL: {}", WdError(e)))
            .into()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    ///
    /// # Errors
    /// The script's exception, or WebDriver's.
    pub async fn try_js(&self, script: &str, args: Vec<Value>) -> Result<Value, WdError> {
        self.client.execute(script, args).await.map_err(WdError)
    }

    /// [`Browser::try_js`] that panics on failure.
    pub async fn js(&self, script: &str) -> Value {
        self.try_js(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script `{script}`: {e}"))
    }

    /// The elements matching a CSS selector, in document order.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("finding `{css}`: {}", WdError(e)))
            .into_iter()
            .map(|inner| Element {
                inner,
                css: css.to_owned(),
            })
            .collect()
    }

    /// The one element matching a CSS selector; panics when there is none or more than one.
    pub async fn find(&self, css: &str) -> Element {
        let mut all = self.find_all(css).await;
        assert_eq!(
            all.len(),
            1,
            "expected exactly one `{css}` on {}",
            self.current_url().await
        );
        all.remove(0)
    }

    /// A PNG of the whole page (beyond the window, up to [`MAX_SHOT_HEIGHT`] pixels): the
    /// viewport is stretched over the page through Chromium's DevTools protocol for the
    /// WebDriver screenshot, which shows only the viewport, then put back.
    pub async fn png(&self) -> Vec<u8> {
        let metrics = self.cdp("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(f64::from(WINDOW.0));
        let height = size["height"]
            .as_f64()
            .unwrap_or(f64::from(WINDOW.1))
            .min(MAX_SHOT_HEIGHT);
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({
                "width": width.ceil(),
                "height": height.ceil(),
                "deviceScaleFactor": 1,
                "mobile": false,
            }),
        )
        .await;
        let shot = self.client.screenshot().await;
        self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
            .await;
        shot.unwrap_or_else(|e| panic!("screenshot: {}", WdError(e)))
    }

    async fn cdp(&self, cmd: &'static str, params: Value) -> Value {
        self.client
            .issue_cmd(Cdp { cmd, params })
            .await
            .unwrap_or_else(|e| panic!("DevTools {cmd}: {}", WdError(e)))
    }
}

/// An element of the page, found by a CSS selector (kept for the messages).
#[derive(Debug)]
pub struct Element {
    inner: fantoccini::elements::Element,
    css: String,
}

impl Element {
    /// Clicks it as a user would (scrolled into view, at its centre).
    pub async fn click(&self) {
        self.inner
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking `{}`: {}", self.css, WdError(e)));
    }

    /// Types `text` into it.
    pub async fn type_text(&self, text: &str) {
        self.inner
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into `{}`: {}", self.css, WdError(e)));
    }

    /// Its rendered text.
    pub async fn text(&self) -> String {
        self.inner
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of `{}`: {}", self.css, WdError(e)))
    }

    /// An attribute's value.
    pub async fn attr(&self, name: &str) -> Option<String> {
        self.inner
            .attr(name)
            .await
            .unwrap_or_else(|e| panic!("attribute {name} of `{}`: {}", self.css, WdError(e)))
    }
}

/// Logs in through the form on `/login` and waits to land on the overview.
pub async fn login(b: &Browser, base: &str, token: &str) {
    b.goto(&format!("{base}/login")).await;
    b.find("input#token").await.type_text(token).await;
    b.find("form.login button[type=submit]").await.click().await;
    wait_for_url(b, &format!("{base}/")).await;
}

/// Starts a session over plain HTTP (the token posted to `/login`, as the form would) and hands
/// its cookie to the browser, then opens the overview: for tests that are about something else
/// than the login form.
pub async fn session_login(b: &Browser, base: &str, token: &str) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
        .post(format!("{base}/login"))
        .form(&[("token", token), ("next", "/")])
        .send()
        .await
        .expect("POST /login");
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no session cookie from /login ({})", r.status()));
    // The cookie as the server set it (`Path`, `HttpOnly`, `SameSite`).
    let mut cookie =
        Cookie::parse(set.to_owned()).unwrap_or_else(|e| panic!("odd cookie {set}: {e}"));
    // fantoccini sends a missing domain as `null`, which chromedriver refuses: name the host.
    let host = reqwest::Url::parse(base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no host in {base}"));
    cookie.set_domain(host);
    // A cookie is set for the page's own site, so open one of its pages first.
    b.goto(&format!("{base}/login")).await;
    b.client
        .add_cookie(cookie)
        .await
        .unwrap_or_else(|e| panic!("setting the session cookie: {}", WdError(e)));
    b.goto(&format!("{base}/")).await;
    let url = b.current_url().await;
    assert_eq!(
        url,
        format!("{base}/"),
        "the session cookie did not open the overview"
    );
}

/// Saves a screenshot of the whole page as `<target>/screenshots/<name>.png`; returns its path.
pub async fn screenshot(b: &Browser, name: &str) -> PathBuf {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let path = dir.join(format!("{name}.png"));
    let png = b.png().await;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    std::fs::write(&path, png).expect("write screenshot");
    path
}

/// Polls `check` until it returns `Ok`, or panics after `limit` with what it saw last (and a
/// screenshot of the page as it was, named after `what`).
pub async fn wait_for<T>(
    b: &Browser,
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut(&Browser) -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match check(b).await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            let name: String = what
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let shot = screenshot(b, &format!("timeout-{name}")).await;
            panic!(
                "timed out after {limit:?} waiting for {what}; last seen: {seen}\n(page {}, screenshot {})",
                b.current_url().await,
                shot.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to a minute) until the browser shows `url`: after a click that navigates.
pub async fn wait_for_url(b: &Browser, url: &str) {
    wait_for(b, url, Duration::from_secs(60), async |b| {
        let now = b.current_url().await;
        if now == url { Ok(()) } else { Err(now) }
    })
    .await;
}

/// Marks the page's `window` with a random value; [`still_marked`] tells whether the same
/// document is still loaded (a reload or navigation would have dropped it).
pub async fn mark(b: &Browser) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let marker = format!("gridq-{}-{nanos}", std::process::id());
    b.try_js(
        "window.__gridqMarker = arguments[0]; return true;",
        vec![json!(marker)],
    )
    .await
    .expect("setting the marker");
    marker
}

/// Whether the page still carries `marker` and was loaded once (no reload since [`mark`]).
pub async fn still_marked(b: &Browser, marker: &str) -> Result<(), String> {
    let v = b
        .try_js(
            "return [window.__gridqMarker || null, performance.getEntriesByType('navigation').map(n => n.type)];",
            Vec::new(),
        )
        .await?;
    if v[0] == marker {
        Ok(())
    } else {
        Err(format!(
            "the page was reloaded or left: marker {}, navigation {}",
            v[0], v[1]
        ))
    }
}
