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
        "id,state,attempts,host,duration_s,exit_code,code,word,n,lines,sleep,result.lines,params"
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
    // Exit code 5 and parameter `code` 5 (a `param.code` column: `code` is the code version).
    assert!(
        csv.starts_with("id,state,attempts,host,duration_s,exit_code,code,param.code\n"),
        "{csv}"
    );
    assert!(
        csv.lines().any(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1], f[2], f[5], f[7]) == ("failed", "1", "5", "5")
        }),
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
        csv.starts_with("id,state,attempts,host,duration_s,exit_code,code,x\n"),
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

/// Everything stored of a master's state directory, as text (the store and its WAL).
fn state_bytes(state: &std::path::Path) -> String {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(state).unwrap().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("gridq.db") {
            all.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_sees_or_leaks_the_broker_password_or_the_token() {
    let mut c = Cluster::new("secrets").await;
    c.spawn_worker(&[]);
    let password = support::broker().password.clone();
    let token = c.handle.token.to_string();
    let state = c.config.state_dir.clone();
    // The job dumps its environment, then prints secrets it finds elsewhere: the broker URL
    // in a project file, the master's token file, the worker's own environment.
    c.write("leak.txt", &c.url);
    c.write(
        "leak.sh",
        &format!(
            "echo '--- env'; env; echo '--- end env'\n\
             echo \"file: $(cat leak.txt)\"\n\
             echo \"token: $(cat {token_file})\"\n\
             tr '\\0' '\\n' < /proc/$PPID/environ || echo 'worker environ: unreadable'\n\
             printf '{{\"found\": \"%s\", \"token\": \"%s\"}}' \"$(cat leak.txt)\" \"$(cat {token_file})\" > \"$GRIDQ_RESULT\"\n\
             exit 3\n",
            token_file = state.join("token").display()
        ),
    );
    c.submit("name: leak\ncommand: [sh, leak.sh]\nparameters:\n  x: [1]\n")
        .await;
    let jobs = c.wait_done("leak", MINUTE).await;
    let id = jobs[0].id.to_string();

    let master = format!("http://{}", c.handle.addr);
    let env = [
        ("GRIDQ_MASTER", master.as_str()),
        ("GRIDQ_TOKEN", token.as_str()),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let out = gridq(&["logs", &id], &env, c.dir.path()).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = text(&out.stdout);
    // The environment was dumped, without the worker's settings.
    let dumped = log
        .split("--- env\n")
        .nth(1)
        .and_then(|rest| rest.split("--- end env").next())
        .unwrap_or_else(|| panic!("no environment in the log:\n{log}"));
    assert!(dumped.contains("GRIDQ_JOB_ID="), "{dumped}");
    assert!(dumped.contains("PATH="), "{dumped}");
    assert!(!dumped.contains("GRIDQ_BROKER"), "{dumped}");
    // What it found elsewhere is masked.
    let user = &support::broker().user;
    assert!(log.contains(&format!("file: amqp://{user}:***@")), "{log}");
    assert!(log.contains("token: ***\n"), "{log}");
    // The job was reported as it ended (exit 3), so the masking did not hide a failure.
    let out = gridq(&["jobs", "--sweep", "leak", "--json"], &env, c.dir.path()).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"][0]["exit_code"], 3, "{v}");
    let result = gridq(
        &["results", "leak", "--format", "jsonl"],
        &env,
        c.dir.path(),
    )
    .await;
    let result = text(&result.stdout);
    assert!(result.contains(&format!("amqp://{user}:***@")), "{result}");

    // Nowhere: the CLI's output, the job's result, the store, the monitor's job page, the
    // worker's log.
    let page = reqwest::Client::new()
        .get(format!("{master}/jobs/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(page.status().is_success());
    let page = page.text().await.unwrap();
    let stored = state_bytes(&state);
    let worker_log = c.workers[0].log_text();
    for (what, text) in [
        ("gridq logs", &log),
        ("gridq results", &result),
        ("the store", &stored),
        ("the job page", &page),
        ("the worker's log", &worker_log),
    ] {
        assert!(
            !text.contains(&password),
            "the broker password is in {what}"
        );
        assert!(!text.contains(&token), "the token is in {what}");
    }
    c.shutdown().await;
}

/// The vhost a `gridq run --local` said it uses (`broker: amqp://...`).
fn local_broker_line(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("broker: "))
        .unwrap_or_else(|| panic!("no broker line in:\n{stderr}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_runs_on_one_broker_each_run_only_their_own_jobs() {
    let b = support::broker();
    // The same sweep (so the same job ids) in two projects whose code differs.
    let projects: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, p) in projects.iter().enumerate() {
        std::fs::write(p.path().join("marker"), format!("project-{i}")).unwrap();
        std::fs::write(
            p.path().join("job.sh"),
            "printf '{\"project\": \"%s\", \"cwd\": \"%s\"}' \"$(cat marker)\" \"$PWD\" > \"$GRIDQ_RESULT\"\nsleep 0.05\n",
        )
        .unwrap();
        std::fs::write(
            p.path().join("sweep.yaml"),
            "name: iso\ncommand: [sh, job.sh]\nparameters:\n  i: !!python/tuple [0, 12]\n",
        )
        .unwrap();
    }
    let run = |p: &tempfile::TempDir| {
        let cwd = p.path().to_path_buf();
        async move {
            gridq(
                &["run", "sweep.yaml", "--local", "--workers", "2"],
                &[
                    ("GRIDQ_BROKER", b.url.as_str()),
                    ("GRIDQ_MANAGEMENT_URL", b.management.as_str()),
                    ("GRIDQ_CONTEXT", "/dev/null"),
                    ("GRIDQ_STATE_DIR", "st"),
                ],
                &cwd,
            )
            .await
        }
    };
    let (a, c) = tokio::join!(run(&projects[0]), run(&projects[1]));
    let mut vhosts = Vec::new();
    for (i, out) in [a, c].iter().enumerate() {
        let stderr = text(&out.stderr);
        let broker = local_broker_line(&stderr);
        assert!(broker.contains("/gridq-local-"), "{broker}");
        assert!(!broker.contains(&b.password), "{broker}");
        vhosts.push(broker);
        assert!(out.status.success(), "run {i}:\n{stderr}");
        let cwd = std::fs::canonicalize(projects[i].path()).unwrap();
        let csv = std::fs::read_to_string(projects[i].path().join("st/results/iso.csv")).unwrap();
        let mut rows = csv::Reader::from_reader(csv.as_bytes());
        let header = rows.headers().unwrap().clone();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let (state, project, dir) = (col("state"), col("project"), col("cwd"));
        let records: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
        assert_eq!(records.len(), 12, "{csv}");
        for r in &records {
            assert_eq!(
                (&r[state], &r[project], &r[dir]),
                (
                    "succeeded",
                    format!("project-{i}").as_str(),
                    cwd.to_str().unwrap()
                ),
                "run {i}: {csv}"
            );
        }
    }
    assert_ne!(vhosts[0], vhosts[1]);
    for v in &vhosts {
        support::drop_vhost(v).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_master_on_a_vhost_refuses_to_start_and_names_the_first() {
    let mut c = Cluster::new("twomasters").await;
    let other = tempfile::tempdir().unwrap();
    let vhost = c.url.rsplit('/').next().unwrap().to_owned();
    let args = [
        "master",
        "--state-dir",
        other.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let env = [
        ("GRIDQ_BROKER", c.url.as_str()),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let out = gridq(&args, &env, other.path()).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("another gridq master runs on vhost `{vhost}`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("state directory {}", c.config.state_dir.display())),
        "{stderr}"
    );
    assert!(!stderr.contains(&support::broker().password), "{stderr}");
    // Once the first has stopped, a master starts there again.
    c.stop_master().await;
    c.start_master().await;
    c.spawn_worker(&[]);
    c.submit("name: after\ncommand: [true]\nparameters:\n  x: [1, 2]\n")
        .await;
    let jobs = c.wait_done("after", MINUTE).await;
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_tls_checks_the_broker_certificate_and_runs_a_sweep() {
    use gridq_common::amqp;
    let b = support::broker();
    let plain_vhost = support::vhost("tls").await;
    let vhost = amqp::vhost(&plain_vhost);
    let tls_url = amqp::with_vhost(&b.tls, &vhost);
    let connect = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(20), amqp::connect(&url, "gridq-test"))
            .await
            .expect("connection attempt ends in time")
    };
    // The TLS port speaks no plain AMQP.
    let tls_port = tls_url
        .split(':')
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let plain_to_tls_port = format!(
        "amqp://{}:{}@127.0.0.1:{tls_port}/{vhost}",
        b.user, b.password
    );
    assert!(connect(plain_to_tls_port).await.is_err());
    // TLS with the broker's CA: connected.
    let ok = connect(tls_url.clone())
        .await
        .expect("TLS with the broker's CA");
    let _ = ok.close(200, "done".into()).await;
    // TLS checked against another CA: refused, before any credentials are sent.
    let other = tempfile::tempdir().unwrap();
    let (files, _) = gridq_deploy::pki::ensure(
        other.path(),
        "other",
        &["127.0.0.1".to_owned()],
        Duration::ZERO,
    )
    .unwrap();
    let wrong_ca = amqp::with_query_param(
        &tls_url,
        amqp::CA_FILE_PARAM,
        files.ca_cert.to_str().unwrap(),
    );
    let Err(err) = connect(wrong_ca).await else {
        panic!("a broker certificate from another CA was accepted");
    };
    assert!(
        format!("{err}").to_lowercase().contains("certificate"),
        "{err}"
    );
    // A whole sweep over TLS: the master and a worker process.
    let mut c = Cluster::with_url("tls", tls_url, |_| {}).await;
    c.spawn_worker(&[]);
    c.submit("name: overtls\ncommand: [true]\nparameters:\n  x: [1, 2, 3, 4]\n")
        .await;
    let jobs = c.wait_done("overtls", MINUTE).await;
    assert_eq!(jobs.len(), 4);
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_worker_runs_jobs_as_the_job_user_who_cannot_read_its_secrets() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = Cluster::new("jobuser").await;
    // The job user (nobody) must reach the project; the worker's own files stay root's.
    for dir in [c.dir.path(), c.project.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let secret = c.write("credentials", "s3cr3t-of-the-worker");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    c.write(
        "who.sh",
        "echo \"uid=$(id -u) gid=$(id -g)\"\n\
         cat credentials 2>/dev/null || echo 'credentials: unreadable'\n\
         if cat /proc/$PPID/environ >/dev/null 2>&1; then echo 'worker environ: readable'; else echo 'worker environ: unreadable'; fi\n\
         touch \"$HOME/written\" && echo 'home: writable'\n\
         printf '{\"uid\": %s}' \"$(id -u)\" > \"$GRIDQ_RESULT\"\n",
    );
    c.spawn_worker(&["--job-user", "65534:65534"]);
    c.submit("name: jobuser\ncommand: [sh, who.sh]\nparameters:\n  x: [1]\n")
        .await;
    let jobs = c.wait_done("jobuser", MINUTE).await;
    assert_eq!(jobs[0].state, JobState::Succeeded, "{}", c.worker_logs());
    assert_eq!(
        jobs[0].result.as_ref().and_then(|r| r.get("uid")),
        Some(&serde_json::json!(65534))
    );
    let master = format!("http://{}", c.handle.addr);
    let token = c.handle.token.to_string();
    let env = [
        ("GRIDQ_MASTER", master.as_str()),
        ("GRIDQ_TOKEN", token.as_str()),
        ("GRIDQ_CONTEXT", "/dev/null"),
    ];
    let id = jobs[0].id.to_string();
    let out = gridq(&["logs", &id], &env, c.dir.path()).await;
    assert_eq!(
        text(&out.stdout),
        "uid=65534 gid=65534\ncredentials: unreadable\nworker environ: unreadable\nhome: writable\n"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_whose_user_cannot_make_its_vhost_says_how_and_changes_nothing() {
    let b = support::broker();
    let granted = support::vhost("novhost").await;
    // A user with AMQP rights on one vhost and no management tag: it may not create vhosts.
    let user_url = support::role_user(&granted, "novh", |_| {
        gridq_common::topology::master_permissions()
    })
    .await;
    let shared = gridq_common::amqp::with_vhost(&user_url, "/");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: novh\ncommand: [true]\nparameters:\n  x: [1]\n",
    )
    .unwrap();
    let out = gridq(
        &["run", "s.yaml", "--local", "--workers", "1"],
        &[
            ("GRIDQ_BROKER", shared.as_str()),
            ("GRIDQ_MANAGEMENT_URL", b.management.as_str()),
            ("GRIDQ_CONTEXT", "/dev/null"),
            ("GRIDQ_STATE_DIR", "st"),
        ],
        dir.path(),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let user = gridq_common::amqp::user(&user_url);
    assert!(
        stderr.contains("this run needs a vhost of its own, `gridq-local-"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rabbitmqctl add_vhost gridq-local-"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rabbitmqctl set_permissions -p gridq-local-"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(" {user} '.*' '.*' '.*'")),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&b.password) && !stderr.contains("pw-novh"),
        "{stderr}"
    );
    assert!(!dir.path().join("st/results").exists(), "no run happened");
    support::drop_user(&user_url).await;
    support::drop_vhost(&granted).await;
}

/// The permission bits of a path (not following a link).
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_and_the_store_are_private_to_the_master() {
    use std::os::unix::fs::PermissionsExt as _;
    // A fresh state directory.
    let c = Cluster::new("statedir").await;
    c.submit("name: private\ncommand: [echo, '{x}']\nparameters:\n  x: [1]\n")
        .await;
    let state = c.config.state_dir.clone();
    assert_eq!(mode_of(&state), 0o700, "{}", state.display());
    let mut store_files = Vec::new();
    for entry in std::fs::read_dir(&state).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("gridq.db") {
            assert_eq!(mode_of(&entry.path()), 0o600, "{name}");
            store_files.push(name);
        }
    }
    assert!(
        store_files.contains(&"gridq.db".to_owned()),
        "{store_files:?}"
    );
    assert_eq!(mode_of(&state.join("token")), 0o600);
    c.shutdown().await;

    // One an earlier version left open to everyone: tightened, its store kept.
    let url = vhost("statedir-old").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = gridq_master::service::MasterConfig::new(state.clone(), url.clone());
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (_, task) = gridq_master::service::start(config.clone(), async move {
        let _ = stopped.await;
    })
    .await
    .expect("the master starts");
    let _ = stop.send(());
    task.await.unwrap();
    for name in ["gridq.db", "gridq.db-wal", "gridq.db-shm"] {
        let path = state.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (handle, task) = gridq_master::service::start(config, async move {
        let _ = stopped.await;
    })
    .await
    .expect("the master starts again");
    assert_eq!(mode_of(&state), 0o700);
    for name in ["gridq.db", "gridq.db-wal", "gridq.db-shm"] {
        let path = state.join(name);
        if path.exists() {
            assert_eq!(mode_of(&path), 0o600, "{name}");
        }
    }
    assert!(handle.db_path.exists());
    let _ = stop.send(());
    task.await.unwrap();
    support::drop_vhost(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_scratch_dir_another_user_could_plant_links_in() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, "root's data\n").unwrap();
    // Another user's directory, with a link where a job's result would go.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::os::unix::fs::symlink(&target, scratch.join("job-1.json")).unwrap();
    std::os::unix::fs::chown(&scratch, Some(65534), Some(65534)).expect("chown (run as root)");
    let out = gridq(
        &[
            "worker",
            "--scratch-dir",
            scratch.to_str().unwrap(),
            "--project",
            dir.path().to_str().unwrap(),
        ],
        // Refused before it connects: no broker needed.
        &[("GRIDQ_BROKER", "amqp://127.0.0.1:1/%2f")],
        dir.path(),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "scratch directory {}: owned by uid 65534, not by this worker (uid {})",
            scratch.display(),
            nix::unistd::geteuid()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's data\n");
}

/// Every process whose parent is `ppid`, with its command line.
fn children(ppid: i32) -> Vec<(i32, Vec<String>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if parent == Some(ppid) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            found.push((pid, args));
        }
    }
    found
}

/// The children of `ppid` whose command line has the argument `arg`.
fn children_with_arg(ppid: i32, arg: &str) -> Vec<i32> {
    children(ppid)
        .into_iter()
        .filter(|(_, args)| args.iter().any(|a| a == arg))
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits until none of `pids` is alive.
async fn wait_all_dead(what: &str, pids: &[i32], limit: Duration) {
    support::wait_until(what, limit, || {
        let alive: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| support::alive(*p))
            .collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still alive: {alive:?}"))
        }
    })
    .await;
}

/// The pids the jobs `pid-1` ... `pid-n` wrote into `dir`, once all are written and alive.
fn job_pids(dir: &std::path::Path, n: usize) -> Result<Vec<i32>, String> {
    let pids: Vec<i32> = (1..=n)
        .filter_map(|x| std::fs::read_to_string(dir.join(format!("pid-{x}"))).ok())
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| support::alive(*p))
        .collect();
    if pids.len() == n {
        Ok(pids)
    } else {
        Err(format!("running jobs {pids:?}"))
    }
}

/// `gridq run SWEEP --local` in `dir`, in the background, with its output in `dir/run.log`.
fn spawn_run(dir: &std::path::Path, workers: &str, env: &[(&str, &str)]) -> std::process::Child {
    let log = std::fs::File::create(dir.join("run.log")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gridq"));
    cmd.args([
        "run",
        "s.yaml",
        "--local",
        "--workers",
        workers,
        "--state-dir",
        "st",
    ])
    .current_dir(dir)
    .env("GRIDQ_CONTEXT", "/dev/null")
    .env_remove("GRIDQ_BROKER")
    .env_remove("GRIDQ_MANAGEMENT_URL")
    .env_remove("GRIDQ_MASTER")
    .env_remove("GRIDQ_TOKEN")
    .stdin(std::process::Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("gridq run starts")
}

/// SIGKILLs what a test started, should it fail before those processes are gone.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if support::alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A sweep of `n` jobs that each write their pid, then sleep far longer than any test.
fn write_sleepy_sweep(dir: &std::path::Path, name: &str, n: usize) {
    let xs: Vec<String> = (1..=n).map(|x| x.to_string()).collect();
    std::fs::write(
        dir.join("s.yaml"),
        format!(
            "name: {name}\ncommand: [sh, -c, 'echo $$ > pid-{{x}}; exec sleep 600']\nparameters:\n  x: [{}]\n",
            xs.join(", ")
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_local_run_takes_its_workers_and_their_jobs_down() {
    let url = vhost("orphans").await;
    let dir = tempfile::tempdir().unwrap();
    write_sleepy_sweep(dir.path(), "orphans", 2);
    let mut run = spawn_run(dir.path(), "2", &[("GRIDQ_BROKER", &url)]);
    let run_pid = i32::try_from(run.id()).unwrap();
    let mut guard = KillOnDrop(vec![run_pid]);
    let log_text = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    let workers = support::wait_until("two local workers", MINUTE, || {
        let w = children_with_arg(run_pid, "worker");
        if w.len() == 2 {
            Ok(w)
        } else {
            Err(format!("workers {w:?}; log:\n{}", log_text()))
        }
    })
    .await;
    guard.0.extend(&workers);
    let jobs = support::wait_until("both jobs running", MINUTE, || {
        job_pids(dir.path(), 2).map_err(|e| format!("{e}; log:\n{}", log_text()))
    })
    .await;
    guard.0.extend(&jobs);

    run.kill().expect("SIGKILL the run");
    run.wait().expect("reap the run");
    let everything: Vec<i32> = workers.iter().chain(&jobs).copied().collect();
    wait_all_dead(
        "the workers and their jobs to die with the run",
        &everything,
        Duration::from_secs(10),
    )
    .await;
    drop(guard);
    support::drop_vhost(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_local_run_stops_its_private_broker_node() {
    if tokio::net::TcpStream::connect("127.0.0.1:5672")
        .await
        .is_ok()
    {
        eprintln!(
            "skipped: a broker answers on 127.0.0.1:5672, so `gridq run --local` would use it instead of a private node"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_sleepy_sweep(dir.path(), "privnode", 1);
    let mut run = spawn_run(dir.path(), "1", &[]);
    let run_pid = i32::try_from(run.id()).unwrap();
    let mut guard = KillOnDrop(vec![run_pid]);
    let log_text = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    // The node starts first; once the job runs, everything is up.
    let jobs = support::wait_until("the job running on a private node", 3 * MINUTE, || {
        job_pids(dir.path(), 1).map_err(|e| format!("{e}; log:\n{}", log_text()))
    })
    .await;
    guard.0.extend(&jobs);
    assert!(
        log_text().contains("starting a private RabbitMQ node"),
        "{}",
        log_text()
    );
    let wrapper: Vec<i32> = children(run_pid)
        .into_iter()
        .filter(|(_, args)| args.iter().any(|a| a.ends_with("rabbitmq-server")))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(wrapper.len(), 1, "{:?}", children(run_pid));
    // The wrapper script runs the Erlang VM as its child.
    let node: Vec<i32> = wrapper
        .iter()
        .copied()
        .chain(children(wrapper[0]).into_iter().map(|(pid, _)| pid))
        .collect();
    assert!(node.len() >= 2, "no VM under the wrapper {wrapper:?}");
    guard.0.extend(&node);

    run.kill().expect("SIGKILL the run");
    run.wait().expect("reap the run");
    // A clean stop of the node takes a few seconds.
    wait_all_dead(
        "the private node and the job to stop with the run",
        &node.iter().chain(&jobs).copied().collect::<Vec<_>>(),
        MINUTE,
    )
    .await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_scratch_dir_is_private_random_and_removed() {
    let url = vhost("scratchdefault").await;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // The job reports the directory its result goes to, then writes a result there.
    std::fs::write(
        dir.path().join("s.yaml"),
        r#"name: scratch
command: [sh, -c, 'd=$(dirname "$GRIDQ_RESULT"); stat -c "%a %u %n" "$d" > seen; printf "\173\"x\": %s\175" {x} > "$GRIDQ_RESULT"']
parameters:
  x: [7]
"#,
    )
    .unwrap();
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
        &[
            ("GRIDQ_BROKER", url.as_str()),
            ("GRIDQ_CONTEXT", "/dev/null"),
            ("TMPDIR", tmp.to_str().unwrap()),
        ],
        dir.path(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = std::fs::read_to_string(dir.path().join("seen")).unwrap();
    let fields: Vec<&str> = seen.split_whitespace().collect();
    let me = nix::unistd::geteuid().as_raw().to_string();
    assert_eq!(&fields[..2], ["700", me.as_str()], "{seen}");
    let scratch = std::path::Path::new(fields[2]);
    assert_eq!(scratch.parent(), Some(tmp.as_path()), "{seen}");
    let name = scratch.file_name().unwrap().to_string_lossy().into_owned();
    let suffix = name.strip_prefix("gridq-worker-").expect("the prefix");
    assert!(
        suffix.len() == 10
            && suffix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "a random name, not the worker's pid: {name}"
    );
    let csv = std::fs::read_to_string(dir.path().join("st/results/scratch.csv")).unwrap();
    assert!(
        csv.lines().nth(1).is_some_and(|l| l.contains(",7,7")),
        "{csv}"
    );
    // Removed when the worker stopped.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind in $TMPDIR: {left:?}");
    support::drop_vhost(&url).await;
}
