//! The monitor over HTTP against a real master, workers and RabbitMQ: who may see and do what
//! (token, session cookie, CSRF), escaping, the jobs listing's sorting and filtering, the live
//! streams, Prometheus metrics and the Flower-like API.

mod support;

use std::time::Duration;

use gridq_master::store::JobState;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use support::{Cluster, wait_until};

const MINUTE: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn base(c: &Cluster) -> String {
    format!("http://{}", c.handle.addr)
}

fn bearer(c: &Cluster) -> String {
    format!("Bearer {}", c.handle.token)
}

/// Logs in through the form; returns the cookie header value and the page's CSRF token.
/// A page fetched with the session cookie; it must answer 200.
async fn page_text(http: &reqwest::Client, cookie: &str, path: String) -> String {
    let r = http
        .get(path)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

async fn login(c: &Cluster) -> (String, String) {
    let http = client();
    let r = http
        .post(format!("{}/login", base(c)))
        .form(&[("token", &*c.handle.token), ("next", "/sweeps")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/sweeps");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{}/sweeps", base(c)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf meta")
        .to_owned();
    assert_eq!(csrf.len(), 64);
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_but_healthz_needs_the_token_or_a_session() {
    let c = Cluster::new("mon-auth").await;
    let http = client();
    let b = base(&c);
    assert_eq!(
        http.get(format!("{b}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // Pages send browsers to the login page; the API and metrics answer 401.
    let r = http.get(format!("{b}/sweeps?x=1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/login?next=/sweeps%3Fx%3D1");
    for path in [
        "/api/v1/sweeps",
        "/metrics",
        "/api/v1/events",
        "/api/v1/workers",
    ] {
        let r = http.get(format!("{b}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let r = http
        .get(format!("{b}/api/v1/sweeps"))
        .header("authorization", "Bearer not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("wrong token"));
    // A wrong token on the login form: back to the form, no cookie.
    let r = http
        .post(format!("{b}/login"))
        .form(&[("token", "nope"), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/login?error=1")
    );
    // Logging in never redirects off-site.
    let r = http
        .post(format!("{b}/login"))
        .form(&[("token", &*c.handle.token), ("next", "//evil.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/");
    let (cookie, _) = login(&c).await;
    let r = http
        .get(format!("{b}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r.text().await.unwrap().contains("<h1>Overview</h1>"));
    // The session also opens the API; logging out ends it.
    let r = http
        .get(format!("{b}/api/v1/sweeps"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, csrf) = login(&c).await;
    let _ = csrf;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_from_a_session_need_the_csrf_token() {
    let c = Cluster::new("mon-csrf").await;
    c.submit("name: held\ncommand: sleep 30\nparameters:\n  x: [1, 2]\n")
        .await;
    let http = client();
    let b = base(&c);
    let (cookie, csrf) = login(&c).await;
    // No token, a wrong token, a foreign origin: refused, and nothing changes.
    let r = http
        .post(format!("{b}/sweeps/held/cancel"))
        .header("cookie", &cookie)
        .form(&[("x", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("{b}/sweeps/held/cancel"))
        .header("cookie", &cookie)
        .form(&[("csrf", "0".repeat(64))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("{b}/api/v1/sweeps/held/cancel"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(c.counts("held").get("canceled"), None);
    // The page's form (field) works and redirects back with a message.
    let r = http
        .post(format!("{b}/sweeps/held/cancel"))
        .header("cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()["location"],
        "/sweeps/held?msg=Canceled%202%20jobs."
    );
    assert_eq!(c.counts("held").get("canceled"), Some(&2));
    // Bearer calls cannot be forged by a browser: no CSRF token needed.
    let r = http
        .post(format!("{b}/api/v1/sweeps/held/retry"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    c.shutdown().await;
}

const HOSTILE: &str = "<script>alert(1)</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_and_output_are_escaped_everywhere() {
    let mut c = Cluster::new("mon-escape").await;
    c.spawn_worker(&["--slots", "1"]);
    let yaml = format!(
        "name: hostile\ncommand: python3 -c \"import sys; print(sys.argv[1]); print('<img src=x onerror=alert(2)>')\" {{w}}\nparameters:\n  w: ['{HOSTILE}', 'plain']\n"
    );
    c.submit(&yaml).await;
    let jobs = c.wait_done("hostile", MINUTE).await;
    assert!(
        jobs.iter().all(|j| j.state == JobState::Succeeded),
        "{jobs:?}"
    );
    let http = client();
    let b = base(&c);
    let (cookie, _) = login(&c).await;
    let get = |path: String| page_text(&http, &cookie, path);
    let hostile_job = jobs
        .iter()
        .find(|j| j.params["w"] == HOSTILE)
        .expect("hostile job");
    for page in [
        get(format!("{b}/sweeps/hostile")).await,
        get(format!(
            "{b}/sweeps/hostile?q=%3Cscript%3E&p.w=%3Cscript%3Ealert(1)%3C%2Fscript%3E"
        ))
        .await,
        get(format!("{b}/jobs/{}?sweep=hostile", hostile_job.id)).await,
    ] {
        assert!(!page.contains("<script>alert"), "raw script in {page}");
        assert!(!page.contains("<img src=x"), "raw img in {page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
    }
    // The filter by the hostile value finds exactly its job.
    let listed: serde_json::Value = http
        .get(format!("{b}/api/v1/jobs"))
        .query(&[("sweep", "hostile"), ("p.w", HOSTILE)])
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["jobs"][0]["id"], hostile_job.id.to_string());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_listing_sorts_filters_and_pages_on_the_server() {
    let mut c = Cluster::new("mon-list").await;
    c.spawn_worker(&["--slots", "2"]);
    c.write(
        "loss.py",
        "import json, os\n\
         a = float(os.environ['GRIDQ_PARAM_A'])\n\
         k = 2 if os.environ['GRIDQ_PARAM_B'] == 'y' else 1\n\
         json.dump({'loss': a * k}, open(os.environ['GRIDQ_RESULT'], 'w'))\n",
    );
    c.submit("name: grid\ncommand: python3 loss.py {args}\nparameters:\n  a: [3, 10, 1, 2]\n  b: [x, y]\n")
        .await;
    let jobs = c.wait_done("grid", MINUTE).await;
    assert_eq!(jobs.len(), 8);
    let http = client();
    let b = base(&c);
    let list = |query: Vec<(&'static str, String)>| {
        let http = http.clone();
        let auth = bearer(&c);
        let b = b.clone();
        async move {
            let r = http
                .get(format!("{b}/api/v1/jobs"))
                .query(&query)
                .header("authorization", auth)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let col = |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> serde_json::Value| {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(f)
            .collect::<Vec<_>>()
    };
    let sweep = || ("sweep", "grid".to_owned());
    // Numbers sort as numbers (10 after 3), descending here.
    let (s, v) = list(vec![
        sweep(),
        ("sort", "param:a".into()),
        ("desc", "1".into()),
    ])
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        col(&v, &|j| j["params"]["a"].clone()),
        [10, 10, 3, 3, 2, 2, 1, 1].map(serde_json::Value::from)
    );
    assert_eq!(v["total"], 8);
    // By metric, ascending: loss = a * (2 if b == y).
    let (_, v) = list(vec![sweep(), ("sort", "metric:loss".into())]).await;
    assert_eq!(
        col(&v, &|j| j["result"]["loss"].clone()),
        [1.0, 2.0, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0].map(serde_json::Value::from)
    );
    // Filter by a parameter's value (text and number forms) and by state, then page.
    let (_, v) = list(vec![sweep(), ("p.b", "y".into()), ("p.a", "10".into())]).await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["jobs"][0]["result"]["loss"], 20.0);
    let (_, v) = list(vec![
        sweep(),
        ("state", "succeeded".into()),
        ("limit", "3".into()),
        ("offset", "6".into()),
    ])
    .await;
    assert_eq!(v["total"], 8);
    assert_eq!(
        col(&v, &|j| j["index"].clone()),
        [6, 7].map(serde_json::Value::from)
    );
    // Text search: an id prefix finds that job.
    let prefix = jobs[5].id.to_string()[..10].to_owned();
    let (_, v) = list(vec![sweep(), ("q", prefix)]).await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["jobs"][0]["id"], jobs[5].id.to_string());
    // Bad input names what is wrong.
    let (s, v) = list(vec![sweep(), ("sort", "colour".into())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("`sort`: unknown sort key `colour`"),
        "{v}"
    );
    let (s, v) = list(vec![sweep(), ("p.nope", "1".into())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "`p.nope`: sweep `grid` has no parameter `nope`");
    let (s, v) = list(vec![sweep(), ("state", "done".into())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().starts_with("`state`:"), "{v}");
    let (s, _) = list(vec![sweep(), ("limit", "many".into())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Results export, streamed: a header and one row per job; JSON lines likewise.
    let csv = http
        .get(format!("{b}/api/v1/sweeps/grid/results?format=csv"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 9, "{csv}");
    assert_eq!(
        rows[0],
        "id,state,attempts,host,duration_s,exit_code,code,a,b,loss"
    );
    assert!(
        rows[1..].iter().all(|r| r.contains(",succeeded,1,")),
        "{csv}"
    );
    let jsonl = http
        .get(format!("{b}/api/v1/sweeps/grid/results?format=jsonl"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(jsonl.lines().count(), 8);
    // The page shows the same order, with one column per parameter and metric.
    let (cookie, _) = login(&c).await;
    let html = http
        .get(format!("{b}/sweeps/grid?sort=metric%3Aloss&desc=1"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first20 = html.find(">20<").expect("loss 20 shown");
    let first1 = html.rfind(">1<").expect("loss 1 shown");
    assert!(first20 < first1);
    assert!(html.contains("metric:loss"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_log_lines_stream_live() {
    let mut c = Cluster::new("mon-sse").await;
    c.spawn_worker(&["--slots", "1"]);
    let http = client();
    let b = base(&c);
    let mut events = http
        .get(format!("{b}/api/v1/events"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    c.write(
        "slow.py",
        "import time\nfor i in range(6):\n    print('line', i, flush=True)\n    time.sleep(0.3)\n",
    );
    c.submit("name: slow\ncommand: python3 slow.py\nparameters:\n  x: 1\n")
        .await;
    let mut seen = String::new();
    tokio::time::timeout(MINUTE, async {
        while !seen.contains("event: change") {
            let chunk = events.chunk().await.unwrap().expect("stream open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("a change event");
    // The log stream from the start: every line once, in order, then `end`.
    let job = c.jobs("slow")[0].id;
    let mut stream = http
        .get(format!("{b}/api/v1/jobs/{job}/logs/stream?sweep=slow"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(MINUTE, async {
        while !text.contains("event: end") {
            let chunk = stream.chunk().await.unwrap().expect("open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("log stream ended; saw {text}"));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| d.contains("\"line\""))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let printed: Vec<&str> = lines.iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(
        printed,
        ["line 0", "line 1", "line 2", "line 3", "line 4", "line 5"]
    );
    // Downloadable as text.
    let log = http
        .get(format!("{b}/api/v1/jobs/{job}/logs?format=text&sweep=slow"))
        .header("authorization", bearer(&c))
        .send()
        .await
        .unwrap();
    assert!(
        log.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert_eq!(
        log.text().await.unwrap(),
        "line 0\nline 1\nline 2\nline 3\nline 4\nline 5\n"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_retry_drain_and_the_flower_endpoints() {
    let mut c = Cluster::new("mon-metrics").await;
    c.spawn_worker(&["--slots", "2"]);
    let marker_dir = c.project.display().to_string();
    // Fails on its first attempt only (a marker file in the project directory).
    let yaml = "name: flaky\n\
        command: python3 -c \"import os,sys; p='m-'+os.environ['GRIDQ_JOB_ID']; e=os.path.exists(p); open(p,'w').close(); sys.exit(0 if e else 3)\"\n\
        parameters:\n  x: [1, 2, 3]\n";
    c.submit(yaml).await;
    let jobs = c.wait_done("flaky", MINUTE).await;
    assert!(
        jobs.iter().all(|j| j.state == JobState::Failed),
        "{jobs:?} in {marker_dir}"
    );
    let http = client();
    let b = base(&c);
    let auth = bearer(&c);
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
    let post = |path: String| {
        let http = http.clone();
        let headers = headers.clone();
        async move {
            let r = http.post(path).headers(headers).send().await.unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let id = jobs[0].id;
    let (s, v) = post(format!("{b}/api/v1/jobs/{id}/retry?sweep=flaky")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["retried"], true);
    let done = c.wait_state("flaky", id, JobState::Succeeded, MINUTE).await;
    assert_eq!(done.attempt, 2);
    let (_, v) = post(format!("{b}/api/v1/jobs/{id}/retry?sweep=flaky")).await;
    assert_eq!(v["retried"], false);
    assert!(
        v["message"].as_str().unwrap().contains("nothing changed"),
        "{v}"
    );
    let result: serde_json::Value = http
        .get(format!("{b}/api/v1/jobs/{id}/result?sweep=flaky"))
        .headers(headers.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["state"], "succeeded");
    assert_eq!(result["exit_code"], 0);
    // Prometheus: exact names and values.
    let metrics = http
        .get(format!("{b}/metrics"))
        .headers(headers.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "gridq_jobs{state=\"succeeded\"} 1",
        "gridq_jobs{state=\"failed\"} 2",
        "gridq_workers_online 1",
        "gridq_job_duration_seconds_count 4",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    assert!(metrics.contains("gridq_queue_messages{"), "{metrics}");
    // Queue lengths (Flower's /api/queues/length).
    let queues: serde_json::Value = http
        .get(format!("{b}/api/v1/queues"))
        .headers(headers.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"gridq.jobs.default"), "{queues}");
    // Drain (Flower's worker shutdown): the worker stops cleanly and says so.
    let worker = c.worker_id(0);
    let (s, _) = post(format!("{b}/api/v1/workers/{worker}/drain")).await;
    assert_eq!(s, StatusCode::OK);
    let status = c.workers[0].wait_exit(MINUTE).await;
    assert!(status.success(), "{status:?}");
    let reader = c.reader();
    wait_until("the worker shows as stopped", MINUTE, || {
        let w = reader.view().workers().map_err(|e| e.to_string())?;
        match w.iter().find(|w| w.id == worker) {
            Some(w) if w.state == "stopped" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (s, v) = post(format!("{b}/api/v1/workers/nobody-1-x/drain")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "no worker `nobody-1-x`");
    c.shutdown().await;
}

/// The page forms other tests do not click: retry a sweep's failed jobs, cancel one job,
/// drain a worker, log out. Each redirects back with what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_forms_retry_cancel_drain_and_log_out() {
    let mut c = Cluster::new("mon-forms").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit("name: bad\ncommand: python3 -c \"raise SystemExit(4)\"\nparameters:\n  x: [1, 2]\n")
        .await;
    let jobs = c.wait_done("bad", MINUTE).await;
    assert!(jobs.iter().all(|j| j.state == JobState::Failed), "{jobs:?}");
    let http = client();
    let b = base(&c);
    let (cookie, csrf) = login(&c).await;
    let post = |path: String| {
        let http = http.clone();
        let cookie = cookie.clone();
        let csrf = csrf.clone();
        async move {
            let r = http
                .post(path)
                .header("cookie", cookie)
                .form(&[("csrf", csrf)])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::SEE_OTHER);
            r.headers()["location"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(
        post(format!("{b}/sweeps/bad/retry")).await,
        "/sweeps/bad?msg=Retrying%202%20failed%20jobs."
    );
    wait_until("both jobs to run again and fail", MINUTE, || {
        let jobs = c.jobs("bad");
        if jobs
            .iter()
            .all(|j| j.attempt == 2 && j.state == JobState::Failed)
        {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                jobs.iter()
                    .map(|j| (j.attempt, j.state))
                    .collect::<Vec<_>>()
            ))
        }
    })
    .await;
    // Canceling a finished job changes nothing, and says so.
    let id = jobs[0].id;
    let to = post(format!("{b}/jobs/{id}/cancel?sweep=bad")).await;
    assert_eq!(
        to,
        format!(
            "/jobs/{id}?sweep=bad&msg=The%20job%20already%20finished%20%28failed%29%3B%20nothing%20changed."
        )
    );
    // A running job is canceled.
    c.submit(
        "name: long\ncommand: python3 -c \"import time; time.sleep(60)\"\nparameters:\n  x: 1\n",
    )
    .await;
    let long = c.jobs("long")[0].id;
    c.wait_state("long", long, JobState::Running, MINUTE).await;
    let to = post(format!("{b}/jobs/{long}/cancel?sweep=long")).await;
    assert_eq!(to, format!("/jobs/{long}?sweep=long&msg=Job%20canceled."));
    c.wait_state("long", long, JobState::Canceled, MINUTE).await;
    // Drain from the workers page: the worker exits cleanly.
    let worker = c.worker_id(0);
    let to = post(format!("{b}/workers/{worker}/drain")).await;
    assert_eq!(to, format!("/workers?msg=Asked%20{worker}%20to%20drain."));
    assert!(c.workers[0].wait_exit(MINUTE).await.success());
    // Logging out ends the session: the same cookie no longer opens a page.
    let r = http
        .post(format!("{b}/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = http
        .get(format!("{b}/sweeps"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    c.shutdown().await;
}

/// A job that writes into `$GRIDQ_OUTPUT` gets the list of its files recorded with its
/// attempt, with the project's code version (`.gridq/code.json`): the job's API answer, its
/// page, the sweep's jobs table, the results CSV and the outputs listing `gridq pull` reads
/// all show them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_outputs_and_code_version_are_recorded_and_shown() {
    let mut c = Cluster::new("mon-outputs").await;
    std::fs::create_dir_all(c.project.join(".gridq")).unwrap();
    c.write(
        ".gridq/code.json",
        r#"{"tree":"3f2a9c1e0b7d55aa00","commit":"a1b2c3d4e5f60718","dirty":true}"#,
    );
    c.write(
        "out.py",
        "import os\n\
         n = int(os.environ['GRIDQ_PARAM_N'])\n\
         d = os.environ['GRIDQ_OUTPUT']\n\
         assert os.path.isabs(d) and os.path.isdir(d)\n\
         if n > 0:\n    open(os.path.join(d, 'out.txt'), 'w').write('x' * n)\n\
         \x20   os.makedirs(os.path.join(d, 'sub'))\n\
         \x20   open(os.path.join(d, 'sub', 'big.bin'), 'wb').write(b'\\0' * 3000)\n",
    );
    c.spawn_worker(&["--slots", "2"]);
    c.submit("name: outs\ncommand: python3 out.py\nparameters:\n  n: [0, 5, 7]\n")
        .await;
    let jobs = c.wait_done("outs", MINUTE).await;
    assert!(
        jobs.iter().all(|j| j.state == JobState::Succeeded),
        "{jobs:?}\n{}",
        c.worker_logs()
    );
    let by_n = |n: i64| jobs.iter().find(|j| j.params["n"] == n).unwrap();
    let label = "3f2a9c1e0b7d@a1b2c3d4e5f6+dirty";
    // On disk where the job's environment said, and nothing for the job that wrote nothing.
    let out_dir =
        |j: &gridq_master::store::JobRow| c.project.join(".gridq/out/outs").join(j.id.to_string());
    assert_eq!(
        std::fs::read_to_string(out_dir(by_n(5)).join("out.txt")).unwrap(),
        "xxxxx"
    );
    assert!(!out_dir(by_n(0)).exists());

    let http = client();
    let b = base(&c);
    let api = |path: String| {
        let http = http.clone();
        let auth = bearer(&c);
        async move {
            let r = http
                .get(path)
                .header("authorization", auth)
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let (s, text) = api(format!("{b}/api/v1/jobs/{}?sweep=outs", by_n(7).id)).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let attempt = &v["attempts"][0];
    assert_eq!(
        attempt["code"],
        serde_json::json!({"tree": "3f2a9c1e0b7d55aa00", "commit": "a1b2c3d4e5f60718", "dirty": true})
    );
    assert_eq!(
        attempt["outputs"]["files"],
        serde_json::json!([{"name": "out.txt", "size": 7}, {"name": "sub/big.bin", "size": 3000}])
    );
    assert_eq!(attempt["outputs"]["truncated"], false);
    assert_eq!(
        attempt["outputs"]["dir"],
        out_dir(by_n(7)).to_str().unwrap()
    );
    let host = attempt["host"].as_str().unwrap().to_owned();
    assert!(!host.is_empty());
    assert_eq!(v["output_host"], host.as_str());
    assert_eq!(v["output_attempt"], 1);
    assert_eq!(v["job"]["code"]["tree"], "3f2a9c1e0b7d55aa00");

    // The job page: the files with their sizes, the host, the code version.
    let (cookie, _) = login(&c).await;
    let page = |path: String| page_text(&http, &cookie, path);
    let html = page(format!("{b}/jobs/{}?sweep=outs", by_n(7).id)).await;
    for expected in [
        "<h2>Outputs</h2>",
        &format!("On host <strong>{host}</strong> (attempt 1)"),
        "<code>out.txt</code>",
        "<td class=\"num\" title=\"7\">7 B</td>",
        "<code>sub/big.bin</code>",
        "<td class=\"num\" title=\"3000\">2.9 KiB</td>",
        "2 files, 2.9 KiB",
        &format!("<code>{label}</code>"),
    ] {
        assert!(html.contains(expected), "{expected:?} not in {html}");
    }
    let html = page(format!("{b}/jobs/{}?sweep=outs", by_n(0).id)).await;
    assert!(html.contains("The job left no files in"), "{html}");
    let html = page(format!("{b}/sweeps/outs")).await;
    assert_eq!(
        html.matches(&format!("<code>{label}</code>")).count(),
        3,
        "{html}"
    );

    // The results CSV's `code` column.
    let (_, csv) = api(format!("{b}/api/v1/sweeps/outs/results?format=csv")).await;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "id,state,attempts,host,duration_s,exit_code,code,n"
    );
    assert!(
        rows[1..]
            .iter()
            .all(|r| r.contains(&format!(",0,{label},"))),
        "{csv}"
    );

    // Where each job's outputs are, for `gridq pull`, page by page.
    let (s, text) = api(format!("{b}/api/v1/sweeps/outs/outputs?limit=2")).await;
    assert_eq!(s, StatusCode::OK);
    let first: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(first["jobs"].as_array().unwrap().len(), 2);
    let next = first["next"].as_str().expect("a next page").to_owned();
    let (_, text) = api(format!(
        "{b}/api/v1/sweeps/outs/outputs?limit=2&after={next}"
    ))
    .await;
    let second: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(second["next"], serde_json::Value::Null);
    let all: Vec<serde_json::Value> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["jobs"].as_array().unwrap())
        .cloned()
        .collect();
    assert_eq!(all.len(), 3);
    let of = |n: i64| {
        let id = by_n(n).id.to_string();
        all.iter().find(|j| j["id"] == id.as_str()).unwrap().clone()
    };
    assert_eq!(
        (
            of(7)["files"].clone(),
            of(7)["bytes"].clone(),
            of(7)["host"].clone()
        ),
        (
            serde_json::json!(2),
            serde_json::json!(3007),
            serde_json::json!(host)
        )
    );
    assert_eq!(
        (of(0)["files"].clone(), of(0)["bytes"].clone()),
        (serde_json::json!(0), serde_json::json!(0))
    );
    let (s, text) = api(format!("{b}/api/v1/sweeps/outs/outputs?state=failed")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["jobs"],
        serde_json::json!([])
    );
    for (query, error) in [
        ("state=done", "`state`: unknown state `done`"),
        (
            "after=xyz",
            "`after`: expected the `next` of the previous page, found `xyz`",
        ),
        (
            "nope=1",
            "unknown query parameter `nope` (known: state, after, limit)",
        ),
    ] {
        let (s, text) = api(format!("{b}/api/v1/sweeps/outs/outputs?{query}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"].as_str().unwrap().starts_with(error),
            "{query}: {v}"
        );
    }
    let (s, _) = api(format!("{b}/api/v1/sweeps/none/outputs")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    c.shutdown().await;
}
