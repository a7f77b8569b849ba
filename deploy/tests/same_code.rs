//! Sweeps bound to the code they were submitted with (`same_code`, issue 17) against a real
//! RabbitMQ: two workers whose projects hold different code (`.gridq/code.json` written by
//! hand); a bound sweep runs only on the worker with its code, a sweep bound to code no worker
//! has fails with the reason and runs nowhere, an unbound sweep runs on both; a bound
//! submission without a code version is refused.

mod support;

use std::path::Path;
use std::time::Duration;

use gridq_common::code::CodeVersion;
use serde_json::json;
use support::{Cluster, wait_until};

const MINUTE: Duration = Duration::from_secs(60);

fn tree(c: char) -> String {
    c.to_string().repeat(64)
}

fn code(c: char) -> CodeVersion {
    CodeVersion {
        tree: tree(c),
        commit: None,
        dirty: None,
    }
}

/// Writes `.gridq/code.json` of a project directory.
fn write_code(project: &Path, c: char) {
    std::fs::create_dir_all(project.join(".gridq")).expect("mkdir .gridq");
    std::fs::write(
        project.join(".gridq/code.json"),
        serde_json::to_string(&code(c)).expect("json"),
    )
    .expect("write code.json");
}

/// A sweep of `n` jobs of half a second each.
fn sweep(name: &str, n: u32) -> String {
    format!(
        "name: {name}\ncommand: [sh, -c, 'sleep 0.5', job]\nparameters:\n  x: !!python/tuple [0, {n}]\n"
    )
}

/// A cluster with two one-slot workers: worker 0 in the cluster's project, which holds code
/// `a`, worker 1 in another project, which holds code `b`; both have told the master their
/// code.
async fn two_codes(name: &str) -> Cluster {
    let mut c = Cluster::new(name).await;
    write_code(&c.project, 'a');
    let other = c.dir.path().join("project-b");
    std::fs::create_dir_all(&other).expect("mkdir project-b");
    write_code(&other, 'b');
    let url = c.url.clone();
    let project = c.project.clone();
    c.spawn_worker_in(&url, &project, &["--slots", "1"]);
    c.spawn_worker_in(&url, &other, &["--slots", "1"]);
    wait_codes(&c, &[tree('a'), tree('b')]).await;
    c
}

/// Waits until worker `i`'s heartbeat names code tree `trees[i]`, for each.
async fn wait_codes(c: &Cluster, trees: &[String]) {
    wait_until("the workers' heartbeats with their code", MINUTE, || {
        let workers = c.reader().view().workers().map_err(|e| e.to_string())?;
        let has = |id: &str, t: &str| {
            workers
                .iter()
                .any(|w| w.id == id && w.info["code"].as_str() == Some(t))
        };
        if trees
            .iter()
            .enumerate()
            .all(|(i, t)| has(&c.worker_id(i), t))
        {
            Ok(())
        } else {
            Err(format!("{workers:?}"))
        }
    })
    .await;
}

/// The worker each job's attempts ran on, with the code tree each reported.
fn runs(c: &Cluster, sweep: &str) -> Vec<Vec<(Option<String>, Option<String>)>> {
    c.jobs(sweep)
        .iter()
        .map(|j| {
            c.attempts(sweep, j.id)
                .into_iter()
                .map(|a| (a.worker, a.code.map(|c| c.tree)))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_sweep_runs_each_job_once_on_the_worker_with_its_code() {
    let c = two_codes("samecode").await;
    c.submit_with_code(&sweep("bound", 8), false, Some(code('a')), true)
        .await;
    let jobs = c.wait_done("bound", MINUTE).await;
    assert_eq!(c.counts("bound").get("succeeded"), Some(&8), "{jobs:?}");
    let on_a = (Some(c.worker_id(0)), Some(tree('a')));
    for (job, runs) in jobs.iter().zip(runs(&c, "bound")) {
        assert_eq!(runs, std::slice::from_ref(&on_a), "job {}", job.id);
    }
    // Worker b was offered jobs and refused them with the reason.
    let log = c.workers[1].log_text();
    assert!(
        log.contains("code mismatch: this sweep runs only on the code it was submitted with (tree aaaaaaaaaaaa); this worker's project holds tree bbbbbbbbbbbb"),
        "{log}"
    );
    // The API shows the sweep's code and binding.
    let sweep: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/sweeps/bound", c.handle.addr))
        .bearer_auth(&*c.handle.token)
        .send()
        .await
        .expect("GET sweep")
        .json()
        .await
        .expect("json");
    assert_eq!(sweep["sweep"]["same_code"], json!(true), "{sweep}");
    assert_eq!(sweep["sweep"]["code"]["tree"], json!(tree('a')), "{sweep}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_bound_to_code_no_worker_has_fails_with_the_reason_and_runs_nowhere() {
    let c = two_codes("nocode").await;
    c.submit_with_code(&sweep("nowhere", 4), false, Some(code('c')), true)
        .await;
    let jobs = c.wait_done("nowhere", MINUTE).await;
    assert_eq!(c.counts("nowhere").get("failed"), Some(&4), "{jobs:?}");
    for job in &jobs {
        let reason = job.reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with(
                "code mismatch: no online worker runs the code this sweep was submitted with (tree cccccccccccc;"
            ) && reason.ends_with("then `gridq retry nowhere --failed`"),
            "{reason}"
        );
        assert_eq!(job.worker, None);
        assert!(
            c.attempts("nowhere", job.id).is_empty(),
            "job {} ran",
            job.id
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_sweep_runs_on_workers_with_any_code() {
    let c = two_codes("anycode").await;
    c.submit_with_code(&sweep("free", 8), false, Some(code('c')), false)
        .await;
    let jobs = c.wait_done("free", MINUTE).await;
    assert_eq!(c.counts("free").get("succeeded"), Some(&8), "{jobs:?}");
    let runs = runs(&c, "free");
    assert!(runs.iter().all(|r| r.len() == 1), "{runs:?}");
    for (w, t) in [(0, 'a'), (1, 'b')] {
        let on = (Some(c.worker_id(w)), Some(tree(t)));
        assert!(
            runs.iter().any(|r| r[0] == on),
            "none on worker {w}: {runs:?}"
        );
    }
    c.shutdown().await;
}

/// `same_code` without a code version is refused with the field named; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_submission_without_a_code_version_is_refused() {
    let c = Cluster::new("nocodever").await;
    let post = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(format!("http://{}/api/v1/sweeps", c.handle.addr))
            .bearer_auth(&*c.handle.token)
            .json(&body)
            .send()
    };
    let want = "sweep.yaml: same_code: the sweep is bound to the code it was submitted with, but the submission carries no `code` (submit it with `gridq submit`, which computes the project's code version)";
    for body in [
        json!({ "yaml": sweep("flag", 2), "same_code": true }),
        json!({ "yaml": format!("same_code: true\n{}", sweep("key", 2)) }),
    ] {
        let r = post(body).await.expect("POST /api/v1/sweeps");
        assert_eq!(r.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], want);
    }
    let r = post(json!({ "yaml": sweep("badtree", 2), "code": { "tree": "not hex" } }))
        .await
        .expect("POST /api/v1/sweeps");
    assert_eq!(r.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "sweep.yaml: code.tree: must be 1 to 128 hex digits (the tree hash `.gridq/code.json` holds)"
    );
    assert!(c.counts("flag").is_empty() && c.counts("key").is_empty());
    c.shutdown().await;
}

/// `gridq submit --same-code` computes the code version of the sweep file's directory (no
/// cluster: `--master` given) as a sync would, and binds the sweep to it: the worker whose
/// project holds it runs every job, the other none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gridq_submit_same_code_binds_the_sweep_to_the_projects_code_now() {
    let mut c = Cluster::new("submitcode").await;
    let file = c.write("cli.yaml", &sweep("cli", 4));
    let options = gridq_deploy::sync::SyncOptions::default();
    let now = gridq_deploy::sync::code_version(&c.project, &options).expect("code version");
    gridq_deploy::sync::write_code_version(&c.project, &now).expect("code.json");
    let other = c.dir.path().join("project-b");
    std::fs::create_dir_all(&other).expect("mkdir project-b");
    write_code(&other, 'b');
    let (url, project) = (c.url.clone(), c.project.clone());
    c.spawn_worker_in(&url, &project, &["--slots", "1"]);
    c.spawn_worker_in(&url, &other, &["--slots", "1"]);
    wait_codes(&c, &[now.tree.clone(), tree('b')]).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gridq"))
        .arg("submit")
        .arg(&file)
        .arg("--same-code")
        .arg("--master")
        .arg(format!("http://{}", c.handle.addr))
        .arg("--token")
        .arg(&*c.handle.token)
        .env("HOME", c.dir.path())
        .output()
        .await
        .expect("gridq submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = c.wait_done("cli", MINUTE).await;
    assert_eq!(c.counts("cli").get("succeeded"), Some(&4), "{jobs:?}");
    let on_ours = (Some(c.worker_id(0)), Some(now.tree.clone()));
    for runs in runs(&c, "cli") {
        assert_eq!(runs, std::slice::from_ref(&on_ours));
    }
    let summary = c
        .reader()
        .view()
        .sweep(&gridq_common::SweepId::new("cli").unwrap());
    let summary = summary.expect("sweep").expect("sweep");
    assert_eq!((summary.code, summary.same_code), (Some(now), true));
    c.shutdown().await;
}
