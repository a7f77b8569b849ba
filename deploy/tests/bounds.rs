//! Bounds under hostile input and heavy load (issue 16): submissions stream in constant
//! memory and stop when their client goes away or the sweep is canceled, the master's own cap
//! holds whatever a sweep file says, idle connections cannot lock clients out of the monitor,
//! and the login redirect never leaves the site.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;
use support::{Cluster, vhost, wait_until};

const MINUTE: Duration = Duration::from_secs(60);

/// A sweep of `n` jobs, all of which would run `true`.
fn sweep(name: &str, n: u64) -> String {
    format!(
        "name: {name}\ncommand: [\"true\"]\nmax_jobs: {n}\nparameters:\n  i: {{range: [0, {n}]}}\n"
    )
}

fn base(c: &Cluster) -> String {
    format!("http://{}", c.handle.addr)
}

async fn post_sweep(c: &Cluster, yaml: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/api/v1/sweeps", base(c)))
        .bearer_auth(&*c.handle.token)
        .timeout(Duration::from_secs(600))
        .json(&json!({ "yaml": yaml }))
        .send()
        .await
        .expect("POST /api/v1/sweeps")
}

/// Jobs stored for a sweep so far (0 before it exists).
fn stored(c: &Cluster, sweep: &str) -> u64 {
    c.counts(sweep).values().sum()
}

/// Waits until a submission has stored some of its jobs.
async fn first_jobs_stored(c: &Cluster, sweep: &str) {
    wait_until("the first jobs stored", MINUTE, || {
        let n = stored(c, sweep);
        if n > 0 {
            Ok(())
        } else {
            Err(format!("{n} stored"))
        }
    })
    .await;
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A `gridq master` process, for its memory.
struct MasterProcess {
    child: std::process::Child,
    base: String,
    token: String,
}

impl MasterProcess {
    async fn start(url: &str, dir: &std::path::Path) -> Self {
        let ctx = dir.join("context.json");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_gridq"))
            .args(["master", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("state"))
            .env("GRIDQ_BROKER", url)
            .env("GRIDQ_CONTEXT", &ctx)
            .env_remove("GRIDQ_MASTER")
            .env_remove("GRIDQ_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("gridq master");
        let ctx: serde_json::Value = wait_until("the master's context file", MINUTE, || {
            std::fs::read_to_string(&ctx)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .ok_or_else(|| "no context yet".to_owned())
        })
        .await;
        Self {
            child,
            base: ctx["url"].as_str().expect("url").to_owned(),
            token: ctx["token"].as_str().expect("token").to_owned(),
        }
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 300,000 jobs go through the master in constant memory: the master's peak RSS (VmHWM)
/// grows by far less than the jobs would take held at once (the old submission held them all:
/// ~800 bytes a job, 240 MB here, plus their publications).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_submission_streams_in_flat_memory() {
    const N: u64 = 300_000;
    let url = vhost("bigsubmit").await;
    let dir = tempfile::tempdir().unwrap();
    let master = MasterProcess::start(&url, dir.path()).await;
    let pid = master.child.id();
    let http = reqwest::Client::new();
    // Warm: one small sweep, so that the connections and caches are there.
    let r = http
        .post(format!("{}/api/v1/sweeps", master.base))
        .bearer_auth(&master.token)
        .json(&json!({ "yaml": sweep("warm", 1000) }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let before = rss_kb(pid, "VmRSS:");
    let r = http
        .post(format!("{}/api/v1/sweeps", master.base))
        .bearer_auth(&master.token)
        .timeout(Duration::from_secs(600))
        .json(&json!({ "yaml": sweep("big", N) }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(status.is_success(), "{body}");
    assert_eq!(body["summary"]["total"], N);
    assert_eq!(body["summary"]["added"], N);
    let peak = rss_kb(pid, "VmHWM:");
    let after = rss_kb(pid, "VmRSS:");
    eprintln!(
        "master RSS: before {} MB, peak {} MB, after {} MB ({N} jobs)",
        before / 1024,
        peak / 1024,
        after / 1024
    );
    // The page caches (64 MiB for the writer) fill as the store grows; the jobs themselves
    // must not be held.
    assert!(
        peak < before + 130 * 1024,
        "the master grew from {before} kB to a peak of {peak} kB for {N} jobs"
    );
    drop(master);
    support::drop_vhost(&url).await;
}

/// A client that goes away stops its submission: the master stores no more of its jobs, and
/// cancels those it stored, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_stops_when_its_client_goes_away() {
    let c = Cluster::new("subgone").await;
    let body = serde_json::to_vec(&json!({ "yaml": sweep("gone", 5_000_000) })).unwrap();
    let addr = c.handle.addr;
    let token = c.handle.token.to_string();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /api/v1/sweeps HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    first_jobs_stored(&c, "gone").await;
    drop(stream);
    // Once the master has seen the disconnect, every stored job is canceled with the reason.
    let n = wait_until("the sweep canceled", MINUTE, || {
        let counts = c.counts("gone");
        let total: u64 = counts.values().sum();
        match counts.get("canceled") {
            Some(&k) if k == total => Ok(total),
            _ => Err(format!("{counts:?}")),
        }
    })
    .await;
    assert!(n < 5_000_000, "the whole sweep was stored: {n}");
    let jobs = c.jobs("gone");
    assert!(
        jobs.iter()
            .all(|j| j.reason.as_deref() == Some("submission interrupted: the client went away")),
        "{:?}",
        jobs.first().map(|j| &j.reason)
    );
    // Commands reach the core in order: once a later submission is answered, nothing more
    // of the first can come.
    let r = post_sweep(&c, &sweep("later", 3)).await;
    assert!(r.status().is_success());
    assert_eq!(stored(&c, "gone"), n);
    c.shutdown().await;
}

/// Canceling a sweep while it is submitted stops the submission, which answers 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_sweep_stops_its_submission() {
    let c = Cluster::new("subcancel").await;
    let submit = {
        let base = base(&c);
        let token = c.handle.token.to_string();
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{base}/api/v1/sweeps"))
                .bearer_auth(token)
                .timeout(Duration::from_secs(600))
                .json(&json!({ "yaml": sweep("halt", 5_000_000) }))
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    first_jobs_stored(&c, "halt").await;
    // A second submission of the same sweep meanwhile is refused.
    let r = post_sweep(&c, &sweep("halt", 10)).await;
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "sweep `halt` is being submitted right now; wait for that submission to end"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/sweeps/halt/cancel", base(&c)))
        .bearer_auth(&*c.handle.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (status, text) = tokio::time::timeout(MINUTE, submit)
        .await
        .expect("the submission ends")
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{text}");
    assert!(
        text.contains("sweep `halt` was canceled while it was being submitted"),
        "{text}"
    );
    let n = stored(&c, "halt");
    assert!(n < 5_000_000);
    let r = post_sweep(&c, &sweep("after", 3)).await;
    assert!(r.status().is_success());
    assert_eq!(stored(&c, "halt"), n, "jobs were stored after the cancel");
    assert_eq!(c.counts("halt").get("canceled"), Some(&n));
    c.shutdown().await;
}

/// The master's cap holds whatever `max_jobs` a sweep file sets, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_masters_cap_holds_whatever_the_sweep_file_says() {
    let url = vhost("subcap").await;
    let c = Cluster::with_url("subcap", url, |m| m.max_jobs_per_sweep = 1000).await;
    let r = post_sweep(&c, &sweep("huge", 1001)).await;
    assert_eq!(r.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "sweep.yaml: this sweep would produce 1001 jobs, more than this master accepts in one sweep (1000, set by `gridq master --max-jobs-per-sweep`); narrow the parameters or split the sweep"
    );
    assert_eq!(stored(&c, "huge"), 0);
    let r = post_sweep(&c, &sweep("fits", 1000)).await;
    assert!(r.status().is_success());
    assert_eq!(stored(&c, "fits"), 1000);
    c.shutdown().await;
}

/// Connections that send part of a request's headers and nothing more are closed after the
/// header timeout, and while they are open, more of them than the connection limit, the
/// health check and the API still answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_dropped_and_the_api_still_answers() {
    use gridq_master::http::conn::{HEADER_TIMEOUT, MAX_CONNECTIONS};
    let c = Cluster::new("idleconns").await;
    let addr = c.handle.addr;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 200 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /api/v1/sweeps HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        idle.push(s);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = http.get(format!("{}/healthz", base(&c))).send().await;
    assert_eq!(health.expect("/healthz answers").status(), 200);
    let api = http
        .get(format!("{}/api/v1/sweeps", base(&c)))
        .bearer_auth(&*c.handle.token)
        .send()
        .await;
    assert_eq!(api.expect("the API answers").status(), 200);
    // Each idle connection is closed by the master: at the limit, or after the timeout.
    let started = std::time::Instant::now();
    for s in &mut idle {
        s.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "an idle connection stayed open {:?}: {e}",
                    started.elapsed()
                ),
            }
        }
    }
    c.shutdown().await;
}

/// After logging in, `next` only ever leads to a path of this site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_redirect_stays_on_the_site() {
    let c = Cluster::new("redirect").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // As a form field is sent: `%09` is a tab once decoded, which browsers drop from a URL.
    for (next, to) in [
        ("/%09/evil.example", "/"),
        ("/%0a/x", "/"),
        ("%2F%2Fevil.example", "/"),
        ("/%5Cevil.example", "/"),
        ("/sweeps/a%3Fstate%3Dfailed", "/sweeps/a?state=failed"),
    ] {
        let r = http
            .post(format!("{}/login", base(&c)))
            .header("origin", base(&c))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={}&next={next}", c.handle.token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::SEE_OTHER, "next={next}");
        assert_eq!(r.headers()["location"], to, "next={next}");
    }
    c.shutdown().await;
}
