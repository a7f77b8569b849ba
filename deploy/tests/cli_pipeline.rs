//! The operator commands end to end: `gridq run --local`, and `submit`, `status`, `jobs`,
//! `logs`, `cancel`, `retry`, `results` against a master, through the real binary.

mod support;

use std::process::Output;
use std::time::Duration;

use gridq_master::store::JobState;
use support::{Cluster, vhost};

const MINUTE: Duration = Duration::from_secs(60);

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn gridq(args: &[&str], env: &[(&str, &str)], cwd: &std::path::Path) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gridq"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("GRIDQ_MASTER")
        .env_remove("GRIDQ_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("gridq finished in time")
        .expect("gridq runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_runs_the_echo_project_and_writes_results_csv() {
    let url = vhost("runlocal").await;
    let dir = tempfile::tempdir().unwrap();
    let sweep = repo_root().join("projects/echo/sweep.yaml");
    let state = dir.path().join("state");
    let ctx = dir.path().join("ctx.json");
    let out = gridq(
        &[
            "run",
            sweep.to_str().unwrap(),
            "--local",
            "--workers",
            "2",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[
            ("GRIDQ_BROKER", &url),
            ("GRIDQ_CONTEXT", ctx.to_str().unwrap()),
        ],
        dir.path(),
    )
    .await;
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let csv_path = state.join("results/echo.csv");
    assert!(
        text(&out.stderr).contains(&format!("results: {}", csv_path.display())),
        "{}",
        text(&out.stderr)
    );
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,state,attempts,host,duration_s,exit_code,word,n,lines,sleep,result.lines,params"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!((f[1], f[2], f[5]), ("succeeded", "1", "0"), "{row}");
    }
    // The printed table has the same 6 jobs.
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains("succeeded"))
            .count(),
        6
    );
    // Running again skips what succeeded.
    let again = gridq(
        &[
            "run",
            sweep.to_str().unwrap(),
            "--local",
            "--workers",
            "1",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[
            ("GRIDQ_BROKER", &url),
            ("GRIDQ_CONTEXT", ctx.to_str().unwrap()),
        ],
        dir.path(),
    )
    .await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("6 jobs (0 new, 0 to run again, 6 already succeeded)"),
        "{}",
        text(&again.stderr)
    );
    support::drop_vhost(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_exits_1_when_a_job_fails_and_2_on_a_bad_file() {
    let url = vhost("runfail").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: failing\ncommand: [sh, -c, 'exit {code}']\nparameters:\n  code: [0, 5]\n",
    )
    .unwrap();
    let env = [
        ("GRIDQ_BROKER", url.as_str()),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let out = gridq(
        &[
            "run",
            "s.yaml",
            "--local",
            "--workers",
            "1",
            "--state-dir",
            "st",
        ],
        &env,
        dir.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let csv = std::fs::read_to_string(dir.path().join("st/results/failing.csv")).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.contains(",failed,1,") && l.ends_with(",5,5")),
        "{csv}"
    );

    std::fs::write(
        dir.path().join("bad.yaml"),
        "command: run\nparameters:\n  lr: !!python/tuple [1, 5, 0]\n",
    )
    .unwrap();
    let out = gridq(
        &["run", "bad.yaml", "--local", "--state-dir", "st2"],
        &env,
        dir.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        "error: bad.yaml:3:29: parameter `lr`: `!!python/tuple`: step must not be 0\n"
    );
    assert!(
        !dir.path().join("st2").exists(),
        "a bad file must change nothing"
    );
    support::drop_vhost(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_talk_to_the_master() {
    let mut c = Cluster::new("clientcmds").await;
    c.spawn_worker(&["--slots", "2"]);
    let url = format!("http://{}", c.handle.addr);
    let token = c.handle.token.to_string();
    let env = [
        ("GRIDQ_MASTER", url.as_str()),
        ("GRIDQ_TOKEN", token.as_str()),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let dir = c.dir.path().to_path_buf();
    std::fs::write(dir.join("s.yaml"), "name: cli\ncommand: [sh, -c, 'echo out {x}; echo err {x} >&2; test {x} != 3']\nparameters:\n  x: [1, 2, 3]\n").unwrap();

    // submit --watch: progress to the end; exit 1 because one job fails.
    let out = gridq(&["submit", "s.yaml", "--watch"], &env, &dir).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sweep cli: 3 jobs; 3 new"),
        "{}",
        text(&out.stdout)
    );

    // status --json.
    let out = gridq(&["status", "--json"], &env, &dir).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sweeps"][0]["name"], "cli");
    assert_eq!(v["sweeps"][0]["counts"]["succeeded"], 2);
    assert_eq!(v["sweeps"][0]["counts"]["failed"], 1);
    assert_eq!(v["workers"][0]["id"], c.worker_id(0));

    // jobs --state failed.
    let out = gridq(
        &["jobs", "--sweep", "cli", "--state", "failed", "--json"],
        &env,
        &dir,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = v["jobs"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    let id = failed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(failed[0]["exit_code"], 1);

    // logs by id prefix: stdout and stderr lines, each to its stream.
    let out = gridq(&["logs", &id[..8]], &env, &dir).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out 3\n");
    assert_eq!(text(&out.stderr), "err 3\n");

    // results as CSV.
    let out = gridq(&["results", "cli"], &env, &dir).await;
    let csv = text(&out.stdout);
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(
        csv.starts_with("id,state,attempts,host,duration_s,exit_code,x\n"),
        "{csv}"
    );

    // retry --failed: the failed job runs again (attempt 2) and fails again.
    let out = gridq(&["retry", "cli", "--failed"], &env, &dir).await;
    assert_eq!(text(&out.stdout), "sweep cli: 1 failed jobs queued again\n");
    let job: gridq_common::JobId = id.parse().unwrap();
    let row = c.wait_state("cli", job, JobState::Failed, MINUTE).await;
    assert_eq!(row.attempt, 2);

    // cancel a finished job: nothing changes, and it says so.
    let out = gridq(&["cancel", &id], &env, &dir).await;
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        format!("job {id} already finished (failed); nothing changed\n")
    );

    // Errors: unknown sweep, bad token.
    let out = gridq(&["results", "nope"], &env, &dir).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), "error: no sweep named `nope`\n");
    let bad = [
        ("GRIDQ_MASTER", url.as_str()),
        ("GRIDQ_TOKEN", "wrong"),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let out = gridq(&["status"], &bad, &dir).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: the master refused the token"),
        "{}",
        text(&out.stderr)
    );
    c.shutdown().await;
}
