//! The monitor in a real browser (headless Chromium through chromedriver) against a real
//! master, workers and RabbitMQ: logging in, live progress and log lines arriving without a
//! reload, the cancel and retry buttons, and the plots. Every page visited is saved as a
//! screenshot under `target/screenshots/`.

mod browser;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use browser::{
    Browser, login, mark, screenshot, session_login, still_marked, wait_for, wait_for_url,
};
use gridq_master::store::JobState;
use serde_json::Value;
use support::Cluster;

const MINUTE: Duration = Duration::from_secs(60);

fn base(c: &Cluster) -> String {
    format!("http://{}", c.handle.addr)
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// How many elements match a CSS selector (read in one go, so a live swap cannot interleave).
async fn count(b: &Browser, css: &str) -> Result<u64, String> {
    let v = b
        .try_js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![Value::from(css)],
        )
        .await?;
    v.as_u64().ok_or_else(|| format!("not a count: {v}"))
}

/// The text of the first element matching a CSS selector, `None` when there is none.
async fn text_of(b: &Browser, css: &str) -> Result<Option<String>, String> {
    let v = b
        .try_js(
            "const e = document.querySelector(arguments[0]); return e && e.textContent;",
            vec![Value::from(css)],
        )
        .await?;
    Ok(v.as_str().map(|s| s.trim().to_owned()))
}

/// Waits until the page's live indicator is on: its event stream is open.
async fn wait_live(b: &Browser, what: &str, limit: Duration) {
    wait_for(b, what, limit, async |b| {
        let on = b
            .try_js(
                "return document.getElementById('live').classList.contains('on');",
                Vec::new(),
            )
            .await?;
        if on == true {
            Ok(())
        } else {
            Err(on.to_string())
        }
    })
    .await;
}

/// What a sweep page's progress bar says: `aria-valuenow`, `data-done`, `data-total`.
async fn progress(b: &Browser) -> Result<(String, String, String), String> {
    let v = b
        .try_js(
            "const p = document.querySelector('#summary .progress');
             return p && [p.getAttribute('aria-valuenow'), p.dataset.done, p.dataset.total];",
            Vec::new(),
        )
        .await?;
    let field = |i: usize| v[i].as_str().map(str::to_owned);
    match (field(0), field(1), field(2)) {
        (Some(now), Some(done), Some(total)) => Ok((now, done, total)),
        _ => Err(format!("no progress bar: {v}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn logging_in_lands_on_the_page_asked_for_and_a_wrong_token_is_refused() {
    let c = Cluster::new("br-login").await;
    let b = Browser::start().await;
    let base = base(&c);
    // Without a session a page sends the browser to the login form, which remembers the page.
    b.goto(&format!("{base}/workers")).await;
    assert_eq!(b.current_url().await, format!("{base}/login?next=/workers"));
    assert_eq!(count(&b, "[role=alert]").await.unwrap(), 0);
    screenshot(&b, "login").await;

    b.find("input#token").await.type_text("not-the-token").await;
    b.find("form.login button[type=submit]").await.click().await;
    let wrong = format!("{base}/login?error=1&next=%2Fworkers");
    wait_for_url(&b, &wrong).await;
    assert_eq!(
        b.find("p.error[role=alert]").await.text().await,
        "Wrong token."
    );
    assert_eq!(
        b.find("input[name=next]")
            .await
            .attr("value")
            .await
            .as_deref(),
        Some("/workers")
    );
    assert_eq!(b.js("return document.cookie;").await, "");
    screenshot(&b, "login-wrong-token").await;

    b.find("input#token").await.type_text(&c.handle.token).await;
    b.find("form.login button[type=submit]").await.click().await;
    let target = format!("{base}/workers");
    wait_for_url(&b, &target).await;
    assert_eq!(b.find("h1").await.text().await, "Workers");
    assert_eq!(b.find("header nav a.active").await.text().await, "Workers");
    assert_eq!(count(&b, "[role=alert]").await.unwrap(), 0);
    // The session cookie is HttpOnly: the page's scripts cannot read it, yet the live stream
    // (an EventSource on the API) opens with it.
    assert_eq!(b.js("return document.cookie;").await, "");
    wait_live(&b, "the live indicator on", MINUTE).await;
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeps_progress_bar_fills_live_without_a_reload() {
    let mut c = Cluster::new("br-progress").await;
    c.spawn_worker(&["--slots", "1"]);
    let b = Browser::start().await;
    let base = base(&c);
    session_login(&b, &base, &c.handle.token).await;
    c.submit("name: steady\ncommand: python3 -c \"import time; time.sleep(0.6)\"\nparameters:\n  x: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")
        .await;
    b.goto(&format!("{base}/sweeps/steady")).await;
    let marker = mark(&b).await;
    let first = progress(&b).await.unwrap();
    assert_eq!(first.2, "10");
    assert_ne!(
        first.1, "10",
        "the sweep was done before the page could watch it"
    );
    let mut seen = vec![first];
    wait_for(&b, "the progress bar at 100%", MINUTE, async |b| {
        let p = progress(b).await?;
        if seen.last() != Some(&p) {
            seen.push(p.clone());
        }
        if p.0 == "100" {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    still_marked(&b, &marker).await.unwrap();
    assert_eq!(
        seen.last().unwrap(),
        &("100".to_owned(), "10".to_owned(), "10".to_owned())
    );
    // It moved forward only, and through the same document: at least one update arrived live.
    let done: Vec<u64> = seen.iter().map(|p| p.1.parse().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(
        text_of(&b, "#summary .pct").await.unwrap().as_deref(),
        Some("100% (10/10)")
    );
    // The jobs table, another live region, caught up in the same way.
    wait_for(&b, "ten succeeded jobs in the table", MINUTE, async |b| {
        let n = count(b, "#jobs tbody .badge.s-succeeded").await?;
        if n == 10 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
    assert_eq!(count(&b, "#jobs tbody tr").await.unwrap(), 10);
    still_marked(&b, &marker).await.unwrap();
    assert_eq!(c.counts("steady"), counts(&[("succeeded", 10)]));
    screenshot(&b, "sweep-progress-done").await;
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_log_grows_live_without_a_reload() {
    const LINES: u64 = 30;
    let mut c = Cluster::new("br-log").await;
    c.spawn_worker(&["--slots", "1"]);
    c.write(
        "ticker.py",
        &format!(
            "import sys, time\nfor i in range({LINES}):\n    print('tick', i, flush=True)\n    if i == 10:\n        print('half way', file=sys.stderr, flush=True)\n    time.sleep(0.25)\n"
        ),
    );
    let b = Browser::start().await;
    let base = base(&c);
    session_login(&b, &base, &c.handle.token).await;
    c.submit("name: ticker\ncommand: python3 ticker.py\nparameters:\n  x: 1\n")
        .await;
    let job = c.jobs("ticker")[0].id;
    c.wait_state("ticker", job, JobState::Running, MINUTE).await;
    b.goto(&format!("{base}/jobs/{job}?sweep=ticker")).await;
    let marker = mark(&b).await;
    assert_eq!(
        text_of(&b, "#jobstate .badge").await.unwrap().as_deref(),
        Some("running")
    );
    let lines = "pre#log span.line:not(.err)";
    let first = count(&b, lines).await.unwrap();
    assert!(
        first < LINES / 2,
        "the page loaded too late to watch the log grow ({first} lines)"
    );
    let mut seen = vec![first];
    wait_for(&b, "every log line", MINUTE, async |b| {
        let n = count(b, lines).await?;
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        if n >= LINES {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    // Lines arrived one after another while the page stayed the same document.
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.len() >= 3, "no line arrived live: {seen:?}");
    still_marked(&b, &marker).await.unwrap();
    // Every line once, in order (the page's lines and the streamed ones do not overlap), and
    // stderr marked as such.
    let shown = b
        .js("return Array.from(document.querySelectorAll('pre#log span.line'), s => [s.className, s.textContent]);")
        .await;
    let mut expected: Vec<Value> = (0..LINES)
        .map(|i| serde_json::json!(["line", format!("tick {i}\n")]))
        .collect();
    expected.insert(11, serde_json::json!(["line err", "half way\n"]));
    assert_eq!(shown, Value::Array(expected));
    // The state above the log follows too.
    wait_for(
        &b,
        "the job shown as succeeded",
        MINUTE,
        async |b| match text_of(b, "#jobstate .badge").await? {
            Some(s) if s == "succeeded" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    still_marked(&b, &marker).await.unwrap();
    screenshot(&b, "job-log").await;
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn the_cancel_sweep_button_cancels_every_job() {
    let mut c = Cluster::new("br-cancel").await;
    c.spawn_worker(&["--slots", "1"]);
    let b = Browser::start().await;
    let base = base(&c);
    login(&b, &base, &c.handle.token).await;
    c.submit("name: held\ncommand: python3 -c \"import time; time.sleep(30)\"\nparameters:\n  x: [1, 2, 3]\n")
        .await;
    let running = c.jobs("held")[0].id;
    c.wait_state("held", running, JobState::Running, MINUTE)
        .await;
    b.goto(&format!("{base}/sweeps/held")).await;
    assert_eq!(count(&b, "#jobs tbody tr").await.unwrap(), 3);
    assert_eq!(count(&b, "#jobs tbody .badge.s-running").await.unwrap(), 1);
    screenshot(&b, "sweep-before-cancel").await;

    b.find("form[action='/sweeps/held/cancel'] button")
        .await
        .click()
        .await;
    let after = format!("{base}/sweeps/held?msg=Canceled%203%20jobs.");
    wait_for_url(&b, &after).await;
    assert_eq!(
        text_of(&b, "p.flash").await.unwrap().as_deref(),
        Some("Canceled 3 jobs.")
    );
    assert_eq!(count(&b, "#jobs tbody .badge.s-canceled").await.unwrap(), 3);
    assert_eq!(count(&b, "#jobs tbody .badge").await.unwrap(), 3);
    assert_eq!(
        progress(&b).await.unwrap(),
        ("100".to_owned(), "3".to_owned(), "3".to_owned())
    );
    assert_eq!(c.counts("held"), counts(&[("canceled", 3)]));
    screenshot(&b, "sweep-canceled").await;
    // The worker stopped the running `sleep 30` (its attempt ends long before 30 s).
    let reader = c.reader();
    let sweep = gridq_common::SweepId::new("held").unwrap();
    let attempt = support::wait_until("the running attempt to end", MINUTE, || {
        let a = reader
            .view()
            .attempts(&sweep, &running)
            .map_err(|e| e.to_string())?;
        match a.first() {
            Some(a) if a.finished_ms.is_some() => Ok(a.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(attempt.state, "canceled", "{attempt:?}");
    let took = attempt.finished_ms.unwrap() - attempt.started_ms.unwrap();
    assert!(took < 20_000, "{attempt:?}");
    assert_eq!(c.counts("held"), counts(&[("canceled", 3)]));
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn the_retry_job_button_runs_a_failed_job_again() {
    let mut c = Cluster::new("br-retry").await;
    c.spawn_worker(&["--slots", "1"]);
    // Fails on its first attempt only (a marker file in the project directory).
    c.submit(
        "name: flaky\n\
         command: python3 -c \"import os,sys; p='m-'+os.environ['GRIDQ_JOB_ID']; e=os.path.exists(p); open(p,'w').close(); print('second try' if e else 'first try'); sys.exit(0 if e else 3)\"\n\
         parameters:\n  x: 1\n",
    )
    .await;
    let jobs = c.wait_done("flaky", MINUTE).await;
    assert_eq!(jobs.len(), 1);
    let job = jobs[0].id;
    assert_eq!((jobs[0].state, jobs[0].attempt), (JobState::Failed, 1));
    let b = Browser::start().await;
    let base = base(&c);
    login(&b, &base, &c.handle.token).await;
    let page = format!("{base}/jobs/{job}?sweep=flaky");
    b.goto(&page).await;
    assert_eq!(
        text_of(&b, "#jobstate .badge").await.unwrap().as_deref(),
        Some("failed")
    );
    assert_eq!(count(&b, "#attempts tbody tr").await.unwrap(), 1);
    screenshot(&b, "job-failed").await;

    b.find("form[action$='/retry?sweep=flaky'] button")
        .await
        .click()
        .await;
    let after = format!("{page}&msg=Retrying%3A%20attempt%202%20is%20queued.");
    wait_for_url(&b, &after).await;
    assert_eq!(
        text_of(&b, "p.flash").await.unwrap().as_deref(),
        Some("Retrying: attempt 2 is queued.")
    );
    let marker = mark(&b).await;
    wait_for(
        &b,
        "the job shown as succeeded, attempt 2",
        MINUTE,
        async |b| {
            let state = text_of(b, "#jobstate").await?.unwrap_or_default();
            if state == "succeeded attempt 2" {
                Ok(())
            } else {
                Err(state)
            }
        },
    )
    .await;
    // Both attempts listed (live), and the second attempt's output streamed into the log.
    let attempts = wait_for(&b, "both attempts in the table", MINUTE, async |b| {
        let v = b
            .try_js(
                "return Array.from(document.querySelectorAll('#attempts tbody tr'),
                    r => [r.cells[0].textContent, r.cells[1].textContent.trim(), r.cells[7].textContent]);",
                Vec::new(),
            )
            .await?;
        if v.as_array().is_some_and(|a| a.len() == 2) { Ok(v) } else { Err(v.to_string()) }
    })
    .await;
    assert_eq!(
        attempts,
        serde_json::json!([["1", "failed", "3"], ["2", "succeeded", "0"]])
    );
    wait_for(&b, "the second attempt's output", MINUTE, async |b| {
        let v = b
            .try_js(
                "return Array.from(document.querySelectorAll('pre#log span.line'), s => s.dataset.attempt + ':' + s.textContent);",
                Vec::new(),
            )
            .await?;
        if v == serde_json::json!(["1:first try\n", "2:second try\n"]) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    still_marked(&b, &marker).await.unwrap();
    let row = c.jobs("flaky").remove(0);
    assert_eq!((row.state, row.attempt), (JobState::Succeeded, 2));
    assert_eq!(c.counts("flaky"), counts(&[("succeeded", 1)]));
    screenshot(&b, "job-retried").await;
    b.close().await;
    c.shutdown().await;
}

/// What the plots tab shows, measured in the page: per scatter plot its points (and how many
/// of them are drawn with a size inside the plot), the parallel-coordinates lines, the
/// histogram's bars and their counts.
const PLOTS_JS: &str = r"
const inside = (el, svg) => {
  const r = el.getBoundingClientRect(), s = svg.getBoundingClientRect();
  return (r.width > 0 || r.height > 0) && r.left >= s.left - 1 && r.right <= s.right + 1
    && r.top >= s.top - 1 && r.bottom <= s.bottom + 1;
};
const size = el => { const r = el.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
const plots = document.querySelector('#plots');
return {
  captions: Array.from(plots.querySelectorAll('figcaption'), f => f.textContent),
  scatter: Array.from(plots.querySelectorAll('svg.plot-scatter'), svg => ({
    size: size(svg),
    points: svg.querySelectorAll('circle.pt').length,
    visible: Array.from(svg.querySelectorAll('circle.pt')).filter(p => inside(p, svg)).length,
    titles: Array.from(svg.querySelectorAll('circle.pt > title'), t => t.textContent),
  })),
  parallel: Array.from(plots.querySelectorAll('svg.plot-parallel'), svg => ({
    size: size(svg),
    lines: svg.querySelectorAll('polyline.pc').length,
    visible: Array.from(svg.querySelectorAll('polyline.pc')).filter(p => inside(p, svg)).length,
    axes: svg.querySelectorAll('g.axis.y').length,
  })),
  durations: Array.from(plots.querySelectorAll('svg.plot-durations'), svg => ({
    size: size(svg),
    bars: Array.from(svg.querySelectorAll('rect.bar'), r => ({
      title: r.querySelector('title').textContent,
      visible: inside(r, svg),
    })),
  })),
};
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_train_sweeps_plots_draw_every_job() {
    // With the management API, so the queue tables (overview, broker page) are complete.
    let url = support::vhost("br-plots").await;
    let mut c = Cluster::with_url("br-plots", url, |config| {
        config.management_url = Some(support::broker().management.clone());
    })
    .await;
    let train = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../projects/train");
    for entry in std::fs::read_dir(&train).expect("projects/train") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), c.project.join(entry.file_name())).unwrap();
    }
    c.spawn_worker(&["--slots", "2"]);
    // The repository's sweep as it is: lr × epochs × batch_size (4 × 3 × 2), seed 0.
    let yaml = std::fs::read_to_string(train.join("sweep.yaml")).unwrap();
    let summary = c.submit(&yaml).await;
    let jobs = c.wait_done("train", MINUTE).await;
    assert_eq!(jobs.len(), 24, "{summary:?}");
    assert_eq!(c.counts("train"), counts(&[("succeeded", 24)]));
    let params = ["lr", "epochs", "batch_size", "seed"];
    // `seed` has one value: no scatter of its own (it says nothing against the metric).
    let varied = ["lr", "epochs", "batch_size"];

    let b = Browser::start().await;
    let base = base(&c);
    b.goto(&format!("{base}/login")).await;
    assert_eq!(count(&b, "form.login input#token").await.unwrap(), 1);
    screenshot(&b, "login").await;
    session_login(&b, &base, &c.handle.token).await;
    assert_eq!(
        text_of(&b, "h1").await.unwrap().as_deref(),
        Some("Overview")
    );
    assert_eq!(
        text_of(&b, "#counts .card.s-succeeded .n")
            .await
            .unwrap()
            .as_deref(),
        Some("24")
    );
    screenshot(&b, "overview").await;

    b.goto(&format!("{base}/sweeps")).await;
    assert_eq!(
        text_of(&b, "#sweeps .pct").await.unwrap().as_deref(),
        Some("100% (24/24)")
    );
    screenshot(&b, "sweeps").await;

    b.goto(&format!("{base}/sweeps/train")).await;
    assert_eq!(count(&b, "#jobs tbody tr").await.unwrap(), 24);
    assert_eq!(
        count(&b, "#jobs tbody .badge.s-succeeded").await.unwrap(),
        24
    );
    screenshot(&b, "sweep").await;

    // The plots tab, first with its default metric, then with val_loss chosen in the form.
    b.find("nav.tabs a[href='/sweeps/train?tab=plots']")
        .await
        .click()
        .await;
    let plots = format!("{base}/sweeps/train?tab=plots");
    wait_for_url(&b, &plots).await;
    b.find("form.filters select[name=metric] option[value=val_loss]")
        .await
        .click()
        .await;
    b.find("form.filters button[type=submit]")
        .await
        .click()
        .await;
    let chosen = format!("{base}/sweeps/train?tab=plots&metric=val_loss");
    wait_for_url(&b, &chosen).await;
    let shown = b.js(PLOTS_JS).await;
    let mut captions: Vec<String> = varied
        .iter()
        .map(|p| format!("val_loss against {p}"))
        .collect();
    captions.push("job durations".into());
    captions.push("parameters against val_loss".into());
    assert_eq!(shown["captions"], serde_json::json!(captions), "{shown}");
    // One scatter per parameter, one point per job, each drawn inside its plot.
    let scatter = shown["scatter"].as_array().unwrap();
    assert_eq!(scatter.len(), varied.len(), "{shown}");
    for (p, s) in varied.iter().zip(scatter) {
        assert_eq!(s["points"], 24, "{p}: {s}");
        assert_eq!(s["visible"], 24, "{p}: {s}");
        assert!(s["size"][0].as_u64().unwrap() > 200, "{p}: {s}");
        assert!(s["size"][1].as_u64().unwrap() > 100, "{p}: {s}");
        // Each job's own value is where its point is: as many points per value as jobs.
        let mut per_value: BTreeMap<String, u64> = BTreeMap::new();
        for t in s["titles"].as_array().unwrap() {
            let t = t.as_str().unwrap();
            let (value, metric) = t.split_once(", ").unwrap_or_else(|| panic!("{t}"));
            assert!(metric.starts_with("val_loss="), "{t}");
            *per_value.entry(value.to_owned()).or_default() += 1;
        }
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for j in &jobs {
            *expected.entry(format!("{p}={}", j.params[*p])).or_default() += 1;
        }
        assert_eq!(per_value, expected, "{p}");
    }
    let parallel = &shown["parallel"][0];
    assert_eq!(shown["parallel"].as_array().unwrap().len(), 1);
    assert_eq!(parallel["lines"], 24, "{parallel}");
    assert_eq!(parallel["visible"], 24, "{parallel}");
    assert_eq!(parallel["axes"], params.len() + 1, "{parallel}");
    // The histogram counts every job once.
    let durations = &shown["durations"][0];
    assert_eq!(shown["durations"].as_array().unwrap().len(), 1);
    let bars = durations["bars"].as_array().unwrap();
    assert!(!bars.is_empty(), "{durations}");
    let mut total = 0;
    for bar in bars {
        let title = bar["title"].as_str().unwrap();
        let n: u64 = title
            .rsplit_once(": ")
            .and_then(|(_, n)| n.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bar title {title}"));
        if n > 0 {
            assert_eq!(bar["visible"], true, "{bar}");
        }
        total += n;
    }
    assert_eq!(total, 24, "{durations}");
    screenshot(&b, "plots").await;

    // A job's page: its whole log, a line per epoch between the header and the metrics.
    let job = &jobs[0];
    b.goto(&format!("{base}/jobs/{}?sweep=train", job.id)).await;
    let log = b
        .js("return Array.from(document.querySelectorAll('pre#log span.line'), s => s.textContent);")
        .await;
    let log: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let epochs = job.params["epochs"].as_u64().unwrap();
    assert_eq!(log.len() as u64, epochs + 2, "{log:?}");
    assert!(
        log[0].starts_with(&format!("train: job {} attempt 1 ", job.id)),
        "{log:?}"
    );
    for e in 1..=epochs {
        assert!(
            log[e as usize].starts_with(&format!("epoch {e}/{epochs} loss=")),
            "{log:?}"
        );
    }
    assert!(log[log.len() - 1].starts_with("metrics: {"), "{log:?}");
    screenshot(&b, "job").await;

    b.goto(&format!("{base}/workers")).await;
    assert_eq!(count(&b, "#workers tbody tr").await.unwrap(), 1);
    assert_eq!(
        text_of(&b, "#workers tbody tr .badge")
            .await
            .unwrap()
            .as_deref(),
        Some("online")
    );
    screenshot(&b, "workers").await;

    b.goto(&format!("{base}/broker")).await;
    let queues = b
        .js("return Array.from(document.querySelectorAll('#brokerq tbody td:first-child'), td => td.textContent);")
        .await;
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q == "gridq.jobs.default"),
        "{queues}"
    );
    screenshot(&b, "broker").await;
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bars_show_each_state_in_proportion() {
    let mut c = Cluster::new("br-bars").await;
    c.spawn_worker(&["--slots", "2"]);
    c.submit(
        "name: mixed\n\
         command: python3 -c \"import sys; sys.exit(3 if sys.argv[1] == '4' else 0)\" {x}\n\
         parameters:\n  x: [1, 2, 3, 4]\n",
    )
    .await;
    c.wait_done("mixed", MINUTE).await;
    assert_eq!(
        c.counts("mixed"),
        counts(&[("failed", 1), ("succeeded", 3)])
    );
    let b = Browser::start().await;
    let base = base(&c);
    session_login(&b, &base, &c.handle.token).await;
    for (page, shot) in [("/sweeps", "bars-sweeps"), ("/sweeps/mixed", "bars-sweep")] {
        b.goto(&format!("{base}{page}")).await;
        let widths = b
            .js("const p = document.querySelector('.progress');
                 const w = e => e ? e.getBoundingClientRect().width : 0;
                 return [w(p), w(p.querySelector('.s-succeeded')), w(p.querySelector('.s-failed'))];")
            .await;
        screenshot(&b, shot).await;
        let w = |i: usize| widths[i].as_f64().unwrap();
        let (bar, ok, bad) = (w(0), w(1), w(2));
        assert!(bar > 100.0, "{page}: {widths}");
        assert!((ok / bar - 0.75).abs() < 0.02, "{page}: succeeded {widths}");
        assert!((bad / bar - 0.25).abs() < 0.02, "{page}: failed {widths}");
    }
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn the_sweeps_list_tells_how_long_a_finished_sweep_took() {
    let mut c = Cluster::new("br-elapsed").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit("name: timed\ncommand: python3 -c \"import time; time.sleep(1.2)\"\nparameters:\n  x: [1, 2]\n")
        .await;
    let jobs = c.wait_done("timed", MINUTE).await;
    assert_eq!(c.counts("timed"), counts(&[("succeeded", 2)]));
    let id = gridq_common::SweepId::new("timed").unwrap();
    let created = c.reader().view().sweep(&id).unwrap().unwrap().created_ms;
    let finished = jobs.iter().filter_map(|j| j.finished_ms).max().unwrap();
    // One slot, two jobs of 1.2 s each: at least 2.4 s from submission to the last result.
    let took = Duration::from_millis(finished - created);
    assert!(took >= Duration::from_millis(2400), "{took:?}");
    let b = Browser::start().await;
    let base = base(&c);
    session_login(&b, &base, &c.handle.token).await;
    b.goto(&format!("{base}/sweeps")).await;
    let elapsed = text_of(&b, "#sweeps tbody tr td:nth-child(4)")
        .await
        .unwrap()
        .unwrap_or_default();
    screenshot(&b, "sweeps-elapsed").await;
    let shown =
        humantime::parse_duration(&elapsed).unwrap_or_else(|e| panic!("elapsed `{elapsed}`: {e}"));
    let whole = Duration::from_secs(took.as_secs());
    assert!(
        shown + Duration::from_secs(1) >= whole && shown <= whole + Duration::from_secs(1),
        "elapsed shown {elapsed}, the sweep took {took:?}"
    );
    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn browsing_page_after_page_never_stalls() {
    let mut c = Cluster::new("br-bfcache").await;
    c.spawn_worker(&["--slots", "1"]);
    let b = Browser::start().await;
    let base = base(&c);
    session_login(&b, &base, &c.handle.token).await;
    // Chromium allows six connections per host over HTTP/1.1; every page holds one for its
    // live stream while it is shown. Two rounds through the four pages, as a user clicks around.
    let pages = ["/sweeps", "/workers", "/broker", "/"];
    for (round, page) in pages.iter().chain(&pages).enumerate() {
        let url = format!("{base}{page}");
        tokio::time::timeout(Duration::from_secs(10), b.goto(&url))
            .await
            .unwrap_or_else(|_| panic!("page {} ({url}) did not load within 10 s", round + 2));
        wait_live(
            &b,
            &format!("the live stream of {url}"),
            Duration::from_secs(10),
        )
        .await;
    }
    b.close().await;
    c.shutdown().await;
}
