//! The first hour with gridq (issue 17): what a new user runs into, fixed and held.
//!
//! Against a master on this machine (the shared test broker, real worker processes):
//! `submit --watch` ends with its summary line when stdout is a pipe; `--max-jobs` raises a
//! sweep's job limit on submission (a bare parameters file has no other way), within the
//! master's cap; `status` lists the live workers and counts the lost and stopped ones.
//!
//! Against a deployed cluster on the sshd test hosts (see `cluster.rs` for the setup): a
//! client command leaves no ssh process and no control directory behind; the monitor's
//! tunnel answers after an idle minute and goes with `gridq monitor`'s Ctrl-C; a deploy
//! refused by its checks leaves the saved cluster file byte for byte; `exec`, `probe` and
//! `monitor` take the cluster file with `-f` and `--config`.

mod hosts;
mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::{Cluster, wait_until};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs the `gridq` binary against the master of `c` (stdout and stderr are pipes).
async fn gridq_at(c: &Cluster, args: &[&str], cwd: &Path) -> Output {
    let url = format!("http://{}", c.handle.addr);
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gridq"));
    cmd.args(args)
        .current_dir(cwd)
        .env("GRIDQ_MASTER", &url)
        .env("GRIDQ_TOKEN", c.handle.token.to_string())
        .env("GRIDQ_CONTEXT", "/dev/null")
        .env_remove("GRIDQ_CLUSTER");
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("gridq finished in time")
        .expect("gridq runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_ends_with_a_summary_line_on_a_pipe() {
    let mut c = Cluster::new("fhwatch").await;
    c.spawn_worker(&["--slots", "2"]);
    let dir = c.dir.path().to_path_buf();
    std::fs::write(
        dir.join("s.yaml"),
        "name: summed\ncommand: [sh, -c, 'test {x} != 3']\nparameters:\n  x: [1, 2, 3, 4]\n",
    )
    .unwrap();
    let out = gridq_at(&c, &["submit", "s.yaml", "--watch"], &dir).await;
    assert_eq!(out.status.code(), Some(1), "one job fails: {}", show(&out));
    assert_eq!(
        text(&out.stdout),
        "sweep summed: 4 jobs; 4 new, 0 to run again, 0 already succeeded (skipped), 0 still in flight\n\
         sweep summed done: 3 succeeded, 1 failed, 0 timed out, 0 canceled (4 jobs)\n",
        "{}",
        show(&out)
    );
    // Without a terminal the failure is still told, on stderr.
    assert!(
        text(&out.stderr).contains("failed: ") && text(&out.stderr).contains("'test 3 != 3'"),
        "{}",
        show(&out)
    );

    // Everything succeeds: exit 0, the same line.
    std::fs::write(
        dir.join("ok.yaml"),
        "name: allgood\ncommand: [true]\nparameters:\n  x: [1]\n",
    )
    .unwrap();
    let out = gridq_at(&c, &["submit", "ok.yaml", "--watch"], &dir).await;
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        text(&out.stdout).lines().last(),
        Some("sweep allgood done: 1 succeeded, 0 failed, 0 timed out, 0 canceled (1 job)"),
        "{}",
        show(&out)
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_max_jobs_raises_a_bare_files_limit_within_the_masters_cap() {
    // No worker: the jobs only need to be stored. The master accepts at most 150,000 a sweep.
    let c = Cluster::with_url("fhmaxjobs", support::vhost("fhmaxjobs").await, |config| {
        config.max_jobs_per_sweep = 150_000;
    })
    .await;
    let dir = c.dir.path().to_path_buf();
    // A bare mlframework parameters.yml of 100,001 jobs.
    std::fs::write(dir.join("params.yml"), "i: {range: [0, 100001]}\n").unwrap();
    let out = gridq_at(&c, &["submit", "params.yml", "-c", "prog"], &dir).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "error: params.yml:1:1: this sweep would produce 100001 jobs, more than the limit of 100000; pass `--max-jobs 100001` to allow it (a bare parameters file cannot set `max_jobs`: it would be a parameter), or narrow the parameters\n"
    );
    assert!(c.reader().view().sweeps().unwrap().is_empty());

    let out = gridq_at(
        &c,
        &["submit", "params.yml", "-c", "prog", "--max-jobs", "100001"],
        &dir,
    )
    .await;
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        text(&out.stdout),
        "sweep params: 100001 jobs; 100001 new, 0 to run again, 0 already succeeded (skipped), 0 still in flight\n"
    );
    assert_eq!(c.jobs("params").len(), 100_001);

    // The master's cap still holds, whatever --max-jobs says.
    std::fs::write(dir.join("more.yml"), "i: {range: [0, 150001]}\n").unwrap();
    let out = gridq_at(
        &c,
        &["submit", "more.yml", "-c", "prog", "--max-jobs", "1000000"],
        &dir,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "error: more.yml: this sweep would produce 150001 jobs, more than this master accepts in one sweep (150000, set by `gridq master --max-jobs-per-sweep`); narrow the parameters or split the sweep\n"
    );

    // Through the API: `max_jobs` in the body, checked.
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("http://{}/api/v1/sweeps", c.handle.addr))
            .bearer_auth(c.handle.token.to_string())
            .json(&body)
            .send()
    };
    let resp = post(serde_json::json!({"yaml": "i: [1, 2]\n", "source": "p.yml", "command": "prog", "max_jobs": 0}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "max_jobs: must be at least 1");
    let resp = post(serde_json::json!({"yaml": "i: [1, 2, 3]\n", "source": "p.yml", "command": "prog", "max_jobs": 2}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"],
        "p.yml:1:1: this sweep would produce 3 jobs, more than the limit of 2; pass `--max-jobs 3` to allow it (a bare parameters file cannot set `max_jobs`: it would be a parameter), or narrow the parameters"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_live_workers_and_counts_lost_and_stopped_ones() {
    let mut c = Cluster::new("fhstatus").await;
    for _ in 0..3 {
        c.spawn_worker(&["--slots", "1"]);
    }
    let reader = c.reader();
    wait_until("3 workers online", Duration::from_secs(60), || {
        let w = reader.view().workers().map_err(|e| e.to_string())?;
        let online = w.iter().filter(|w| w.is_online()).count();
        if online == 3 {
            Ok(())
        } else {
            Err(format!("{w:?}"))
        }
    })
    .await;
    // Worker 1 vanishes (lost after the heartbeat timeout), worker 2 shuts down (stopped).
    c.workers[0].signal(nix::sys::signal::Signal::SIGKILL);
    c.workers[1].signal(nix::sys::signal::Signal::SIGTERM);
    let (lost, stopped) = (c.worker_id(0), c.worker_id(1));
    wait_until("one lost, one stopped", Duration::from_secs(60), || {
        let w = reader.view().workers().map_err(|e| e.to_string())?;
        let state = |id: &str| w.iter().find(|w| w.id == id).map(|w| w.state.clone());
        if state(&lost).as_deref() == Some("lost") && state(&stopped).as_deref() == Some("stopped")
        {
            Ok(())
        } else {
            Err(format!("{w:?}"))
        }
    })
    .await;
    let dir = c.dir.path().to_path_buf();
    let json = gridq_at(&c, &["status", "--json"], &dir).await;
    let v: Value =
        serde_json::from_slice(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&json)));
    let live = c.worker_id(2);
    let host = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == live.as_str())
        .and_then(|w| w["host"].as_str())
        .expect("the live worker's host")
        .to_owned();
    let out = gridq_at(&c, &["status"], &dir).await;
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("WORKER"))
        .collect();
    assert_eq!(
        table,
        [
            format!(
                "{:<40} {:<20} {:<9} {:>5} {:>7}",
                "WORKER", "HOST", "STATE", "SLOTS", "RUNNING"
            ),
            format!("{live:<40} {host:<20} {:<9} {:>5} {:>7}", "online", 1, 0),
            "not listed: 1 lost, 1 stopped workers (the monitor keeps their history)".to_owned(),
        ],
        "{stdout}"
    );
    c.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// A deployed cluster: one test host with the broker, the master and a worker.

/// The deploy flags for the images and the gridq binary.
fn image_flags() -> Vec<String> {
    hosts::deploy_image_flags()
        .into_iter()
        .flat_map(|(flag, value)| [flag, value])
        .collect()
}

fn free_port() -> u16 {
    hosts::free_port()
}

/// A cluster deployed from a copy of projects/echo, with its own name, ports, CLI context and
/// `$TMPDIR` (where gridq's ssh control directories go, to be checked).
struct Deployed {
    name: String,
    dir: tempfile::TempDir,
    ports: [u16; 3],
}

impl Deployed {
    fn new(tag: &str) -> Self {
        let name = format!("f{tag}-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("project");
        std::fs::create_dir_all(&project).unwrap();
        for f in ["echo.py", "sweep.yaml"] {
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../projects/echo")
                    .join(f),
                project.join(f),
            )
            .unwrap();
        }
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Self {
            name,
            dir,
            ports: [free_port(), free_port(), free_port()],
        }
    }

    fn project(&self) -> std::path::PathBuf {
        self.dir.path().join("project")
    }

    fn file(&self) -> std::path::PathBuf {
        self.project().join("gridq-cluster.yaml")
    }

    /// The private `$TMPDIR` of every gridq run here.
    fn tmp(&self) -> std::path::PathBuf {
        self.dir.path().join("tmp")
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_gridq"));
        c.args(args)
            .current_dir(self.project())
            .env("GRIDQ_CONTEXT", self.dir.path().join("context.json"))
            .env("TMPDIR", self.tmp())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        for k in [
            "GRIDQ_MASTER",
            "GRIDQ_TOKEN",
            "GRIDQ_CLUSTER",
            "GRIDQ_HOSTS",
            "GRIDQ_IDENTITY",
            "GRIDQ_KNOWN_HOSTS",
            "GRIDQ_SSH_CONFIG",
            "GRIDQ_IMAGE",
            "GRIDQ_BINARY",
            "GRIDQ_WORKER_IMAGE",
            "GRIDQ_RABBITMQ_IMAGE",
        ] {
            c.env_remove(k);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        hosts::output_within(self.cmd(args), b"", Duration::from_secs(300))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "gridq {args:?}: {}", show(&out));
        text(&out.stdout)
    }

    /// `gridq deploy` of host 1 (broker, master, worker) with this cluster's name and ports.
    fn deploy_args(&self, host: &hosts::TestHost) -> Vec<String> {
        let mut args: Vec<String> = [
            "deploy",
            "-a",
            &host.target(),
            "-i",
            &host.key.display().to_string(),
            "--known-hosts",
            &host.known_hosts.display().to_string(),
            "--ssh-config",
            "none",
            "-d",
            &self.project().display().to_string(),
            "-m",
            "1",
            "-w",
            "1",
            "--slots",
            "2",
            "--name",
            &self.name,
            "--broker-port",
            &self.ports[0].to_string(),
            "--management-port",
            &self.ports[1].to_string(),
            "--monitor-port",
            &self.ports[2].to_string(),
            "--heartbeat-timeout",
            "5s",
        ]
        .map(String::from)
        .to_vec();
        args.extend(image_flags());
        args
    }

    /// Nothing of gridq's SSH left: no ssh process naming the private `$TMPDIR` (its control
    /// sockets are there), and nothing in that directory. Waits up to `limit` for it.
    fn assert_no_ssh_left(&self, after: &str, limit: Duration) {
        let needle = self.tmp().display().to_string();
        let deadline = std::time::Instant::now() + limit;
        loop {
            let procs = processes_mentioning(&needle);
            let files: Vec<_> = std::fs::read_dir(self.tmp())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            if procs.is_empty() && files.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "after {after}: ssh processes {procs:?}, left in TMPDIR {files:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        hosts::remove_cluster(&self.name);
    }
}

/// `(pid, parent pid, command line)` of this machine's processes whose command line mentions
/// `needle`.
fn processes_mentioning(needle: &str) -> Vec<(i32, i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if !line.contains(needle) {
            continue;
        }
        // `pid (comm) state ppid ...`: the parent is the second field after the `)`.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        found.push((pid, ppid, line));
    }
    found
}

/// GET `url` with the token, through curl; the body.
fn curl(url: &str, token: &str) -> Result<String, String> {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(show(&out))
    }
}

#[test]
fn a_deployed_cluster_in_its_first_hour() {
    let h = hosts::hosts();
    let h1 = &h.docker[0];
    let c = Deployed::new("first");
    let args = c.deploy_args(h1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.ok(&args);
    assert!(out.contains("workers online: 1"), "{out}");
    c.assert_no_ssh_left("deploy", Duration::from_secs(10));
    let saved = std::fs::read(c.file()).expect("the configuration is saved");

    // 1. A deploy that its checks refuse leaves the saved configuration as it was.
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("other");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", show(&made));
    let project = c.project().display().to_string();
    let bad_host = format!("{}@127.0.0.9:{}", h1.user, h1.port);
    for (what, extra) in [
        ("a key the host refuses", vec!["-i", key.to_str().unwrap()]),
        (
            "an unreachable host",
            vec!["-a", &bad_host, "-m", "1", "-w", "1"],
        ),
    ] {
        let mut args = vec!["deploy", "-f", "-d", &project];
        args.extend(extra);
        let out = c.run(&args);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", show(&out));
        assert!(
            text(&out.stderr).contains("deploy checks failed; nothing was started"),
            "{what}: {}",
            show(&out)
        );
        assert_eq!(
            std::fs::read(c.file()).unwrap(),
            saved,
            "{what}: the saved cluster file changed"
        );
    }
    c.assert_no_ssh_left("refused deploys", Duration::from_secs(10));

    // 2. A client command through the tunnel leaves no ssh process and no directory.
    let out = c.ok(&["status"]);
    assert!(out.contains("master: 1 worker online, 0 lost"), "{out}");
    c.assert_no_ssh_left("gridq status", Duration::ZERO);
    let out = c.ok(&["submit", "sweep.yaml", "--watch"]);
    assert!(
        out.ends_with("sweep echo done: 6 succeeded, 0 failed, 0 timed out, 0 canceled (6 jobs)\n"),
        "{out}"
    );
    c.assert_no_ssh_left("gridq submit --watch", Duration::ZERO);

    // 3. exec, probe and monitor take the cluster file: -f (the project's) or --config.
    let expected_exec = format!("[1 {}@{}] {}\n", h1.user, h1.addr, h1.user);
    let out = c.ok(&["exec", "--each-host", "-f", "--", "id", "-un"]);
    assert_eq!(out, expected_exec);
    let elsewhere = tempfile::tempdir().unwrap();
    let file = c.file().display().to_string();
    let mut exec = c.cmd(&["exec", "--each-host", "--config", &file, "--", "id", "-un"]);
    exec.current_dir(elsewhere.path());
    let out = hosts::output_within(exec, b"", Duration::from_secs(120));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), expected_exec);
    let probe: Value = serde_json::from_str(&c.ok(&["probe", "-f", "--json"])).unwrap();
    let hosts = probe["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{probe}");
    assert_eq!(hosts[0]["host"], h1.target(), "{probe}");
    assert_eq!(hosts[0]["ok"], true, "{probe}");
    assert_eq!(
        hosts[0]["remote_path"],
        format!("gridq/{}", c.name),
        "the cluster's remote path: {probe}"
    );
    let mut probe = c.cmd(&["probe", "--config", &file, "--json"]);
    probe.current_dir(elsewhere.path());
    let out = hosts::output_within(probe, b"", Duration::from_secs(120));
    assert!(out.status.success(), "{}", show(&out));
    // A flag beats the file: another key is refused.
    let out = c.run(&["probe", "-f", "-i", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        text(&out.stderr).contains(&format!(
            "{} is not accepted for {}",
            key.display(),
            h1.user
        )),
        "{}",
        show(&out)
    );
    // Neither hosts nor a cluster file.
    let out = c.run(&["exec", "--each-host", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "error: --hosts: give the hosts (-a [user@]host[:port],...), or a cluster file: -f for the project's gridq-cluster.yaml, or --config FILE\n"
    );
    let out = c.run(&["probe", "--config", "/nonexistent/c.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "error: --config: no cluster file at /nonexistent/c.yaml; deploy first (gridq deploy -a HOSTS -m N -w N,... saves one), or pass --config FILE\n"
    );
    c.assert_no_ssh_left("exec and probe", Duration::ZERO);

    // 4. A worker lost and replaced: status lists the live one and counts the lost one.
    let worker = format!("gridq-{}-worker-1", c.name);
    let rm = std::process::Command::new("docker")
        .args(["rm", "-f", &worker])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", show(&rm));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st: Value = serde_json::from_str(&c.ok(&["status", "--json"])).unwrap();
        let lost = st["master"]["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["state"] == "lost");
        if lost {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed worker was never marked lost: {st}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = c.ok(&["deploy", "-f", "-d", &project]);
    assert!(out.contains("workers online: 1"), "{out}");
    let out = c.ok(&["status"]);
    assert!(out.contains("master: 1 worker online, 1 lost"), "{out}");
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("WORKER"))
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(table.len(), 3, "{out}");
    assert!(table[1].contains(" online "), "{out}");
    assert_eq!(
        table[2], "not listed: 1 lost, 0 stopped workers (the monitor keeps their history)",
        "{out}"
    );

    // 5. The monitor's tunnel answers after more than a minute idle (no idle limit), its ssh
    // master is gridq's own child, and Ctrl-C takes both away.
    let mut monitor = c
        .cmd(&["monitor", "-f", "--json", "--show-token"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(monitor.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let m: Value = serde_json::from_str(&line).expect("monitor --json line");
    let (url, token) = (m["url"].as_str().unwrap(), m["token"].as_str().unwrap());
    let workers = format!("{url}api/v1/workers");
    curl(&workers, token).expect("the monitor answers through its tunnel");
    let masters = processes_mentioning(&c.tmp().display().to_string());
    assert_eq!(masters.len(), 1, "one ssh master: {masters:?}");
    let (_, ppid, cmdline) = &masters[0];
    assert_eq!(
        *ppid,
        i32::try_from(monitor.id()).unwrap(),
        "the ssh master is gridq's own child, not a daemon: {cmdline}"
    );
    assert!(cmdline.contains("ControlPersist=no"), "{cmdline}");
    std::thread::sleep(Duration::from_secs(65)); // past ssh's old idle limit of 60 s
    curl(&workers, token).expect("the tunnel still answers after 65 s idle");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(monitor.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = monitor.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = monitor.kill();
            panic!("gridq monitor did not exit within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    c.assert_no_ssh_left("gridq monitor and SIGINT", Duration::ZERO);
    assert!(curl(&workers, token).is_err(), "the tunnel is closed");

    assert!(c.ok(&["clean"]).contains("3 containers removed"));
    c.assert_no_ssh_left("gridq clean", Duration::ZERO);
}
