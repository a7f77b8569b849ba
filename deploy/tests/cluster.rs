//! End to end: `gridq deploy`, `submit`, `status`, `monitor`, `update` and `clean` against
//! three real sshd hosts (127.0.0.2-4, each its own user and home) sharing this machine's
//! Docker engine, with the images built offline by scripts/build-images.sh.
//!
//! One cluster goes through its whole life in [`cluster_lifecycle`] (deploy, the echo sweep,
//! a re-deploy that restarts nothing, status, the monitor tunnel, a worker container removed
//! mid-sweep, an update mid-sweep, clean twice, purge); [`deploy_errors`] checks that each
//! bad setup is refused before anything starts, with its message. Every cluster has its own
//! name (labels, container names) and ports, and is removed at the end, even on failure.

mod hosts;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn gridq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridq"))
}

/// The images and the static binary to deploy: scripts/test.sh names them in
/// GRIDQ_TEST_IMAGES_ENV. The workers run in `gridq-python`, a Debian image with python3 and
/// no gridq (the stand-in for a team's own image), with the static binary mounted.
fn images() -> Vec<(String, String)> {
    hosts::deploy_image_flags()
}

fn free_port() -> u16 {
    hosts::free_port()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A test cluster: its project copy, name, ports, and the flags that reach the test hosts.
struct TestCluster {
    name: String,
    dir: tempfile::TempDir,
    context: PathBuf,
    ports: [u16; 3],
}

impl TestCluster {
    fn new(tag: &str) -> Self {
        let name = format!("t{tag}-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("project");
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../projects/echo"),
            &project,
        );
        // A longer sweep for the mid-sweep tests: 24 jobs of about 1.5 s.
        std::fs::write(
            project.join("long.yaml"),
            "name: long\ncommand: python3 echo.py {args}\nparameters:\n  word: [a, b, c, d, e, f]\n  n: [1, 2, 3, 4]\n  lines: 3\n  sleep: 0.5\n",
        )
        .unwrap();
        let context = dir.path().join("context.json");
        Self {
            name,
            dir,
            context,
            ports: [free_port(), free_port(), free_port()],
        }
    }

    fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    fn file(&self) -> PathBuf {
        self.project().join("gridq-cluster.yaml")
    }

    fn cmd(&self) -> Command {
        let mut c = gridq();
        c.env("GRIDQ_CONTEXT", &self.context)
            .env_remove("GRIDQ_MASTER")
            .env_remove("GRIDQ_TOKEN")
            .env_remove("GRIDQ_CLUSTER")
            .env_remove("GRIDQ_IMAGE")
            .env_remove("GRIDQ_BINARY")
            .env_remove("GRIDQ_WORKER_IMAGE")
            .env_remove("GRIDQ_RABBITMQ_IMAGE")
            .env("RUST_LOG", "warn");
        c
    }

    /// `gridq deploy` with the test hosts, this cluster's name and ports, and `extra`.
    fn deploy_args(&self, hosts_list: &str, master: &str, workers: &str) -> Vec<String> {
        let h = hosts::hosts();
        let key = &h.docker[0].key;
        let known = &h.docker[0].known_hosts;
        let mut args: Vec<String> = vec![
            "deploy".into(),
            "-a".into(),
            hosts_list.into(),
            "-i".into(),
            key.display().to_string(),
            "--known-hosts".into(),
            known.display().to_string(),
            "--ssh-config".into(),
            "none".into(),
            "-d".into(),
            self.project().display().to_string(),
            "-m".into(),
            master.into(),
            "-w".into(),
            workers.into(),
            "--slots".into(),
            "2".into(),
            "--name".into(),
            self.name.clone(),
            "--broker-port".into(),
            self.ports[0].to_string(),
            "--management-port".into(),
            self.ports[1].to_string(),
            "--monitor-port".into(),
            self.ports[2].to_string(),
            "--heartbeat-timeout".into(),
            "5s".into(),
            "--health-timeout".into(),
            "120s".into(),
        ];
        for (flag, image) in images() {
            args.push(flag);
            args.push(image);
        }
        args
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .current_dir(self.project())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a deploy that must be refused with exit 1 and leave no container; its stderr.
    fn refused(&self, args: &[String]) -> String {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(self.containers().is_empty(), "{:?}", self.containers());
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gridq {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    /// `(name, role, host label)` of every container carrying this cluster's label.
    fn containers(&self) -> BTreeSet<(String, String, String)> {
        let out = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                &format!("label=gridq.cluster={}", self.name),
                "--format",
                "{{.Names}}\t{{.Label \"gridq.role\"}}\t{{.Label \"gridq.host\"}}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((
                    f.next()?.to_owned(),
                    f.next()?.to_owned(),
                    f.next()?.to_owned(),
                ))
            })
            .collect()
    }

    fn volumes(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("label=gridq.cluster={}", self.name),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Container name → (ID, StartedAt).
    fn starts(&self) -> BTreeMap<String, String> {
        self.containers()
            .into_iter()
            .map(|(name, _, _)| {
                let out = Command::new("docker")
                    .args(["inspect", "--format", "{{.Id}} {{.State.StartedAt}}", &name])
                    .output()
                    .unwrap();
                (name, String::from_utf8_lossy(&out.stdout).trim().to_owned())
            })
            .collect()
    }

    /// The sweep's row in `gridq status --json`.
    fn sweep(&self, name: &str) -> Value {
        let st = self.json(&["status", "--json"]);
        st["master"]["sweeps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until `cond` holds on the sweep's row.
    fn wait_sweep(&self, name: &str, what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let row = self.sweep(name);
            if cond(&row) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sweep {name}: {what} not reached within {limit:?}; last seen: {row}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The results of a sweep, one JSON object per job.
    fn results(&self, sweep: &str) -> Vec<Value> {
        self.ok(&["results", sweep, "--format", "jsonl"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Whatever the test did, nothing of this cluster stays behind.
        hosts::remove_cluster(&self.name);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Checks a finished sweep: every job exactly once, succeeded; returns the attempt counts.
fn check_complete(results: &[Value], expected_jobs: usize) -> BTreeMap<String, u64> {
    let ids: BTreeSet<&str> = results.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        results.len(),
        expected_jobs,
        "one row per job: {results:#?}"
    );
    assert_eq!(ids.len(), expected_jobs, "no job twice");
    for r in results {
        assert_eq!(r["state"], "succeeded", "{r}");
    }
    results
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// What a deployed cluster keeps secret and how its broker is reached: no password in any
/// container's `docker inspect`, the broker port speaks TLS only, with the cluster's CA, and a
/// worker's broker user may not declare a job queue.
fn check_security(c: &TestCluster, master_addr: &str) {
    use gridq_common::{amqp, topology};
    let gridq_dir = c.project().join(".gridq");
    let secrets: Value = serde_json::from_str(
        &std::fs::read_to_string(gridq_dir.join(format!("cluster-{}.secrets.json", c.name)))
            .unwrap(),
    )
    .unwrap();
    let passwords = secrets["passwords"].as_object().expect("role passwords");
    let users: Vec<&str> = passwords.keys().map(String::as_str).collect();
    assert_eq!(
        users,
        [
            "gridq-master",
            "gridq-monitor",
            "gridq-worker-1",
            "gridq-worker-2",
            "gridq-worker-3"
        ]
    );
    for (name, _, _) in c.containers() {
        let out = Command::new("docker")
            .args(["inspect", &name])
            .output()
            .unwrap();
        let inspect = String::from_utf8_lossy(&out.stdout);
        assert!(inspect.contains(&name), "{inspect}");
        for (user, pw) in passwords {
            assert!(
                !inspect.contains(pw.as_str().unwrap()),
                "{user}'s password is in `docker inspect {name}`"
            );
        }
        assert!(!inspect.contains("GRIDQ_BROKER="), "{inspect}");
    }
    let ca = gridq_dir.join(format!("cluster-{}.tls/ca.pem", c.name));
    let key = gridq_dir.join(format!("cluster-{}.tls/ca.key", c.name));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions())
            & 0o777,
        0o600
    );
    let pw = passwords["gridq-worker-1"].as_str().unwrap();
    let port = c.ports[0];
    let tls = format!(
        "amqps://gridq-worker-1:{pw}@{master_addr}:{port}/{}?cacertfile={}",
        c.name,
        amqp::percent_encode(&ca.to_string_lossy())
    );
    let plain = format!("amqp://gridq-worker-1:{pw}@{master_addr}:{port}/{}", c.name);
    let other = tempfile::tempdir().unwrap();
    let (files, _) = gridq_deploy::pki::ensure(
        other.path(),
        "other",
        &[master_addr.to_owned()],
        Duration::ZERO,
    )
    .unwrap();
    let wrong_ca =
        amqp::with_query_param(&tls, amqp::CA_FILE_PARAM, &files.ca_cert.to_string_lossy());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let connect = |url: String| async move {
            tokio::time::timeout(Duration::from_secs(30), amqp::connect(&url, "gridq-test"))
                .await
                .expect("a connection attempt ends in time")
        };
        let conn = connect(tls).await.expect("TLS with the cluster's CA");
        assert!(connect(plain).await.is_err(), "plain AMQP is refused");
        let Err(wrong) = connect(wrong_ca).await else {
            panic!("a certificate from another CA was accepted");
        };
        assert!(
            wrong.to_string().to_lowercase().contains("certificate"),
            "{wrong}"
        );
        let ch = conn.create_channel().await.unwrap();
        let declared = ch
            .queue_declare(
                "gridq.jobs.evil".into(),
                lapin::options::QueueDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await;
        assert!(
            matches!(&declared, Err(e) if topology::is_soft_error(e, 403)),
            "a worker user may not declare a job queue: {declared:?}"
        );
        let _ = conn.close(200, "done".into()).await;
    });
}

#[test]
fn cluster_lifecycle() {
    let h = hosts::hosts();
    let list = h
        .docker
        .iter()
        .map(hosts::TestHost::target)
        .collect::<Vec<_>>()
        .join(",");
    let c = TestCluster::new("life");

    // 1. deploy, then the echo sweep, and its results.
    let args = c.deploy_args(&list, "1", "1,2,3");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.ok(&args);
    assert!(out.contains("workers online: 3"), "{out}");
    assert!(out.contains("5 containers changed"), "{out}");
    assert!(
        c.file().exists(),
        "the configuration is saved in the project"
    );
    let labels: Vec<String> = h.docker.iter().map(hosts::TestHost::target).collect();
    let want: BTreeSet<(String, String, String)> = [
        (format!("gridq-{}-broker", c.name), "broker", &labels[0]),
        (format!("gridq-{}-master", c.name), "master", &labels[0]),
        (format!("gridq-{}-worker-1", c.name), "worker", &labels[0]),
        (format!("gridq-{}-worker-2", c.name), "worker", &labels[1]),
        (format!("gridq-{}-worker-3", c.name), "worker", &labels[2]),
    ]
    .into_iter()
    .map(|(n, r, h)| (n, r.to_owned(), h.clone()))
    .collect();
    assert_eq!(c.containers(), want);
    // The project reached every host, without what .gridq holds (the secrets).
    for host in &h.docker {
        let out = host.run(
            ["find", &format!("gridq/{}", c.name), "-type", "f"],
            b"",
            Duration::from_secs(30),
        );
        let files: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.rsplit('/').next().unwrap_or(l).to_owned())
            .collect();
        assert!(
            files.contains("echo.py") && files.contains("long.yaml"),
            "{files:?}"
        );
        assert!(!files.iter().any(|f| f.contains("secrets")), "{files:?}");
        // gridq itself: one static binary under the remote path, named by its content.
        let bin = host.run(
            ["ls", &format!("gridq/{}/.gridq/bin", c.name)],
            b"",
            Duration::from_secs(30),
        );
        let bin = String::from_utf8_lossy(&bin.stdout).into_owned();
        assert_eq!(bin.lines().count(), 1, "{bin}");
        assert!(bin.starts_with("gridq-") && bin.trim().len() == 22, "{bin}");
    }
    // The workers run in the project's image, unchanged, with gridq mounted read-only as
    // their init; the master in the runtime image deploy made.
    let image_info = |image: &str, format: &str| {
        let out = Command::new("docker")
            .args(["image", "inspect", "--format", format, image])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let user_image = image_info(&images()[0].1, "{{.Id}}");
    for n in 1..=3 {
        let name = format!("gridq-{}-worker-{n}", c.name);
        let (image, entrypoint, mounts) = inspect_run(&name);
        assert_eq!(image, user_image, "{name}");
        assert_eq!(entrypoint, "[/gridq/gridq init -- /gridq/gridq]", "{name}");
        assert!(mounts.contains("/gridq/gridq:false"), "{name}: {mounts}");
    }
    let (image, _, _) = inspect_run(&format!("gridq-{}-master", c.name));
    let tags = image_info(&image, "{{join .RepoTags \",\"}}");
    assert!(tags.starts_with("gridq-runtime:"), "{tags}");
    // What a first deploy sent to each host: the image once, the binary once.
    let sent = sent_per_place(&out);
    assert_eq!(sent.len(), 3, "{out}");
    for (place, (images, binary)) in &sent {
        assert!(*binary > 0, "{place}: {out}");
        let _ = images;
    }

    check_security(&c, &h.docker[0].addr);

    let out = c.ok(&["submit", "sweep.yaml", "--watch"]);
    assert!(out.contains("6 new"), "{out}");
    let results = c.results("echo");
    check_complete(&results, 6);
    let got: BTreeSet<(String, i64)> = results
        .iter()
        .map(|r| {
            let p = &r["result"]["params"];
            (
                p["word"].as_str().unwrap_or("").to_owned(),
                p["n"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let expected: BTreeSet<(String, i64)> = ["alpha", "beta", "gamma"]
        .iter()
        .flat_map(|w| [1, 2].map(|n| ((*w).to_owned(), n)))
        .collect();
    assert_eq!(got, expected, "each job's own parameters came back");

    // 2. deploy again with the saved configuration: nothing restarted, nothing sent.
    let before = c.starts();
    let out = c.ok(&["deploy", "-f", "-d", c.project().to_str().unwrap()]);
    assert!(out.contains("0 containers changed"), "{out}");
    assert_eq!(
        c.starts(),
        before,
        "no container was recreated or restarted"
    );
    let sent = sent_per_place(&out);
    assert_eq!(sent.len(), 3, "{out}");
    assert!(sent.values().all(|s| *s == (0, 0)), "{out}");

    // 2b. a gridq upgrade (another binary): the binary goes once to every host, no image
    // does, and every gridq container runs the new one.
    let new_binary = c.dir.path().join("gridq-upgraded");
    let mut bytes = std::fs::read(&images()[2].1).unwrap();
    bytes.extend_from_slice(b"\0upgrade"); // trailing bytes: the same program, another hash
    std::fs::write(&new_binary, &bytes).unwrap();
    std::fs::set_permissions(
        &new_binary,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = c.ok(&[
        "deploy",
        "-f",
        "-d",
        c.project().to_str().unwrap(),
        "--gridq-binary",
        new_binary.to_str().unwrap(),
    ]);
    assert!(out.contains("workers online: 3"), "{out}");
    let sent = sent_per_place(&out);
    assert_eq!(sent.len(), 3, "{out}");
    for (place, (images, binary)) in &sent {
        assert_eq!(*images, 0, "{place}: no image is sent again: {out}");
        assert!(*binary > 0, "{place}: {out}");
    }
    assert!(
        out.contains("4 containers changed"),
        "master and workers: {out}"
    );

    // 3. status: every host, its containers, the master's view.
    let st = c.json(&["status", "--json"]);
    let places = st["places"].as_array().unwrap();
    assert_eq!(places.len(), 3, "{st}");
    for (p, n) in places.iter().zip([3, 1, 1]) {
        assert_eq!(p["reachable"], true, "{p}");
        let containers = p["containers"].as_array().unwrap();
        assert_eq!(containers.len(), n, "{p}");
        assert!(containers.iter().all(|c| c["state"] == "running"), "{p}");
    }
    let online = st["master"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "online")
        .count();
    assert_eq!(online, 3, "{st}");
    // Queue depths come from the management API, read by the monitoring-only user.
    assert_eq!(st["master"]["queues"]["source"], "management", "{st}");
    assert_eq!(st["master"]["broker"]["encryption"], "tls", "{st}");
    let echo = c.sweep("echo");
    assert_eq!(echo["counts"]["succeeded"], 6, "{echo}");

    // The monitor, through its tunnel, with the token.
    let mut monitor = c
        .cmd()
        .args(["monitor", "--json", "--show-token"])
        .current_dir(c.project())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(monitor.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let m: Value = serde_json::from_str(&line).expect("monitor --json line");
    let url = m["url"].as_str().unwrap();
    let token = m["token"].as_str().unwrap();
    let health = Command::new("curl")
        .args(["-fsS", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{url}api/v1/workers"))
        .output()
        .unwrap();
    assert!(health.status.success(), "{}", text(&health));
    let workers: Value = serde_json::from_slice(&health.stdout).unwrap();
    // The three workers the upgrade replaced are listed too, as lost: three online.
    let online = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "online")
        .count();
    assert_eq!(online, 3, "{workers}");
    let refused = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{url}api/v1/workers"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "401");
    let _ = nix_kill(&monitor);
    let _ = monitor.wait();

    // 4. a worker host's container removed mid-sweep: every job completes exactly once.
    c.ok(&["submit", "long.yaml"]);
    // Until host 2's worker runs jobs, as its heartbeats say.
    let h2 = &h.docker[1].addr;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.json(&["status", "--json"]);
        let busy = st["master"]["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| {
                w["host"] == h2.as_str()
                    && w["state"] == "online"
                    && w["info"]["running"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
            });
        if busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host 2's worker never ran a job: {}",
            st["master"]["workers"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let victim = format!("gridq-{}-worker-2", c.name);
    let rm = Command::new("docker")
        .args(["rm", "-f", &victim])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", text(&rm));
    c.wait_sweep("long", "24 succeeded", Duration::from_secs(180), |s| {
        s["counts"]["succeeded"] == 24
    });
    let attempts = check_complete(&c.results("long"), 24);
    assert!(
        attempts.values().any(|a| *a >= 2),
        "the jobs that were running on the removed worker ran again: {attempts:?}"
    );
    // A re-deploy repairs exactly what is missing.
    let before = c.starts();
    let out = c.ok(&["deploy", "-f", "-d", c.project().to_str().unwrap()]);
    assert!(out.contains("1 container changed"), "{out}");
    let after = c.starts();
    assert_eq!(after.len(), 5);
    for (name, started) in &before {
        assert_eq!(after.get(name), Some(started), "{name} was left alone");
    }

    // 5. update mid-sweep: running jobs finish first (no job runs twice), and the output
    // says which worker waits on which jobs.
    std::fs::write(
        c.project().join("long2.yaml"),
        std::fs::read_to_string(c.project().join("long.yaml"))
            .unwrap()
            .replace("name: long", "name: long2"),
    )
    .unwrap();
    c.ok(&["submit", "long2.yaml"]);
    c.wait_sweep("long2", "jobs running", Duration::from_secs(60), |s| {
        s["counts"]["running"].as_u64().unwrap_or(0) >= 2
    });
    let before = c.starts();
    let upd = c.run(&["update"]);
    assert!(upd.status.success(), "{}", text(&upd));
    let out = String::from_utf8_lossy(&upd.stdout);
    assert!(out.contains("3 worker containers restarted"), "{out}");
    let err = String::from_utf8_lossy(&upd.stderr);
    assert!(
        err.contains("draining: running jobs finish first: ") && err.contains(" waits on long2/"),
        "{err}"
    );
    let after = c.starts();
    for n in 1..=3 {
        let name = format!("gridq-{}-worker-{n}", c.name);
        assert_ne!(after.get(&name), before.get(&name), "{name} was restarted");
    }
    for role in ["broker", "master"] {
        let name = format!("gridq-{}-{role}", c.name);
        assert_eq!(after.get(&name), before.get(&name), "{name} was left alone");
    }
    c.wait_sweep("long2", "24 succeeded", Duration::from_secs(180), |s| {
        s["counts"]["succeeded"] == 24
    });
    let attempts = check_complete(&c.results("long2"), 24);
    assert!(
        attempts.values().all(|a| *a == 1),
        "drained workers let their jobs finish: {attempts:?}"
    );

    // ... and `update --now`: one worker at a time, running jobs handed back, none lost.
    std::fs::write(
        c.project().join("long3.yaml"),
        std::fs::read_to_string(c.project().join("long.yaml"))
            .unwrap()
            .replace("name: long", "name: long3"),
    )
    .unwrap();
    c.ok(&["submit", "long3.yaml"]);
    c.wait_sweep("long3", "jobs running", Duration::from_secs(60), |s| {
        s["counts"]["running"].as_u64().unwrap_or(0) >= 2
    });
    let out = c.ok(&["update", "--now"]);
    assert!(out.contains("3 worker containers restarted"), "{out}");
    c.wait_sweep("long3", "24 succeeded", Duration::from_secs(180), |s| {
        s["counts"]["succeeded"] == 24
    });
    check_complete(&c.results("long3"), 24);

    // 5b. rotate every secret mid-sweep: new passwords and broker certificate, every
    // container restarted, no job lost, and the old passwords no longer open the broker.
    let secrets_path = c
        .project()
        .join(format!(".gridq/cluster-{}.secrets.json", c.name));
    let read_secrets = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(&secrets_path).unwrap()).unwrap()
    };
    let old = read_secrets();
    let cert = c
        .project()
        .join(format!(".gridq/cluster-{}.tls/server.pem", c.name));
    let old_cert = std::fs::read_to_string(&cert).unwrap();
    std::fs::write(
        c.project().join("long4.yaml"),
        std::fs::read_to_string(c.project().join("long.yaml"))
            .unwrap()
            .replace("name: long", "name: long4"),
    )
    .unwrap();
    c.ok(&["submit", "long4.yaml"]);
    c.wait_sweep("long4", "jobs running", Duration::from_secs(60), |s| {
        s["counts"]["running"].as_u64().unwrap_or(0) >= 2
    });
    let before = c.starts();
    let out = c.ok(&[
        "deploy",
        "-f",
        "-d",
        c.project().to_str().unwrap(),
        "--rotate-secrets",
    ]);
    assert!(
        out.contains("secrets rotated: 3 worker containers restarted"),
        "{out}"
    );
    let after = c.starts();
    for name in before.keys() {
        assert_ne!(after.get(name), before.get(name), "{name} was restarted");
    }
    let new = read_secrets();
    for (user, pw) in old["passwords"].as_object().unwrap() {
        assert_ne!(&new["passwords"][user], pw, "{user}'s password changed");
    }
    assert_ne!(std::fs::read_to_string(&cert).unwrap(), old_cert);
    c.wait_sweep("long4", "24 succeeded", Duration::from_secs(180), |s| {
        s["counts"]["succeeded"] == 24
    });
    check_complete(&c.results("long4"), 24);
    let ca = c
        .project()
        .join(format!(".gridq/cluster-{}.tls/ca.pem", c.name));
    let url = |pw: &Value| {
        format!(
            "amqps://gridq-worker-1:{}@{}:{}/{}?cacertfile={}",
            pw.as_str().unwrap(),
            h.docker[0].addr,
            c.ports[0],
            c.name,
            gridq_common::amqp::percent_encode(&ca.to_string_lossy())
        )
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let connect = |u: String| async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                gridq_common::amqp::connect(&u, "gridq-test"),
            )
            .await
            .expect("a connection attempt ends in time")
        };
        // The broker was replaced last: it may still be starting.
        let deadline = Instant::now() + Duration::from_secs(120);
        let conn = loop {
            match connect(url(&new["passwords"]["gridq-worker-1"])).await {
                Ok(conn) => break conn,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "the new password never opened the broker: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let Err(refused) = connect(url(&old["passwords"]["gridq-worker-1"])).await else {
            panic!("the old password still opens the broker");
        };
        assert!(
            gridq_common::topology::is_soft_error(&refused, 403),
            "the old password is refused at login (ACCESS_REFUSED): {refused}"
        );
        let _ = conn.close(200, "done".into()).await;
    });

    // 6. clean: nothing labelled with the cluster is left; clean again is fine; purge.
    let out = c.ok(&["clean"]);
    assert!(out.contains("5 containers removed"), "{out}");
    assert!(c.containers().is_empty(), "{:?}", c.containers());
    assert_eq!(c.volumes().len(), 2, "volumes are kept without --purge");
    let out = c.ok(&["clean"]);
    assert!(out.contains("0 containers removed"), "{out}");
    // `--yes`: without a terminal, a purge that is not told so refuses (it would ask).
    let out = c.ok(&["clean", "--purge", "--yes"]);
    assert!(out.contains("2 volumes removed"), "{out}");
    assert!(c.volumes().is_empty());
    for host in &h.docker {
        let out = host.run(
            ["test", "-e", &format!("gridq/{}", c.name)],
            b"",
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(1), "the synced project is gone");
    }
}

/// `(image, entrypoint, mounts as "target:rw")` of a container.
fn inspect_run(name: &str) -> (String, String, String) {
    let out = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.Config.Image}}\t{{.Config.Entrypoint}}\t{{range .Mounts}}{{.Destination}}:{{.RW}} {{end}}",
            name,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut f = line.split('\t');
    let mut next = || f.next().unwrap_or("").to_owned();
    (next(), next(), next())
}

/// `place → (image bytes, binary bytes)` from deploy's "  PLACE: sent ... (images N, gridq
/// binary M)" lines, as exact byte counts when zero, any positive number otherwise.
fn sent_per_place(out: &str) -> BTreeMap<String, (u64, u64)> {
    let amount = |s: &str| -> u64 {
        let s = s.trim();
        if s == "0 B" { 0 } else { 1 }
    };
    out.lines()
        .filter_map(|l| {
            let (place, rest) = l.trim().split_once(": sent ")?;
            let (_, detail) = rest.split_once(" (images ")?;
            let (images, binary) = detail.trim_end_matches(')').split_once(", gridq binary ")?;
            Some((place.to_owned(), (amount(images), amount(binary))))
        })
        .collect()
}

fn nix_kill(child: &std::process::Child) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    Ok(())
}

#[test]
fn deploy_errors() {
    let h = hosts::hosts();
    let h1 = &h.docker[0];

    // An unreachable host (nothing listens on 127.0.0.9).
    let c = TestCluster::new("err1");
    let bad = format!("{}@127.0.0.9:{}", h1.user, h1.port);
    let args = c.deploy_args(&format!("{},{bad}", h1.target()), "1", "1,2");
    let err = c.refused(&args);
    assert!(
        err.contains("deploy checks failed; nothing was started"),
        "{err}"
    );
    assert!(
        err.contains(&format!("host 2 {bad}: unreachable (")),
        "the message names the host: {err}"
    );
    assert!(
        err.contains("check the address and port, and that sshd is running there"),
        "{err}"
    );

    // A host whose user may not use Docker.
    let args = c.deploy_args(
        &format!("{},{}", h1.target(), h.nodocker.target()),
        "1",
        "1,2",
    );
    let err = c.refused(&args);
    let user = &h.nodocker.user;
    assert!(
        err.contains(&format!(
            "host 2 {}: permission denied on the Docker socket",
            h.nodocker.target()
        )) && err.contains(&format!(
            "add {user} to the docker group: `sudo usermod -aG docker {user}`"
        )),
        "{err}"
    );

    // A taken port on the master host.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut args = c.deploy_args(&h1.target(), "1", "1");
    let i = args.iter().position(|a| a == "--broker-port").unwrap();
    args[i + 1] = port.to_string();
    let err = c.refused(&args);
    assert!(
        err.contains(&format!(
            "host 1 {}: port {port} is taken (master.broker_port (AMQP)): another program listens on it; stop it or pick another port in the cluster file",
            h1.target()
        )),
        "{err}"
    );
    drop(taken);

    // GPUs wanted where Docker has no NVIDIA runtime.
    let mut args = c.deploy_args(&h1.target(), "1", "1");
    args.extend(["--gpus".to_owned(), "all".to_owned()]);
    let err = c.refused(&args);
    assert!(
        err.contains(&format!(
            "host 1 {}: workers[1].gpus: Docker has no NVIDIA runtime: install the NVIDIA Container Toolkit and run `nvidia-ctk runtime configure --runtime=docker`",
            h1.target()
        )),
        "{err}"
    );

    // A key the hosts do not accept.
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("other");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let mut args = c.deploy_args(&h1.target(), "1", "1");
    let i = args.iter().position(|a| a == "-i").unwrap();
    args[i + 1] = key.display().to_string();
    let err = c.refused(&args);
    assert!(
        err.contains(&format!("host 1 {}: authentication failed", h1.target()))
            && err.contains(&format!(
                "{} is not accepted for {}",
                key.display(),
                h1.user
            )),
        "{err}"
    );

    // A failure after the checks is reported per host; the rest is deployed, and a re-run
    // repairs only what failed.
    let two = format!("{},{}", h1.target(), h.docker[1].target());
    let mut args = c.deploy_args(&two, "1", "1,2");
    let i = args.iter().position(|a| a == "--worker-image").unwrap();
    let good_worker =
        std::mem::replace(&mut args[i + 1], format!("gridq-no-such-image:{}", c.name));
    let bad_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.run(&bad_args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 places deployed, 2 failed"),
        "{}",
        text(&out)
    );
    for host in [h1, &h.docker[1]] {
        assert!(
            stdout.contains(&format!(
                "FAILED host {} {}:",
                if host.name == "h1" { 1 } else { 2 },
                host.target()
            )) && stdout.contains(&format!(
                "there is no image gridq-no-such-image:{} to copy",
                c.name
            )),
            "{}",
            text(&out)
        );
    }
    let roles: BTreeSet<String> = c.containers().into_iter().map(|(_, r, _)| r).collect();
    assert_eq!(
        roles,
        BTreeSet::from(["broker".to_owned(), "master".to_owned()]),
        "the broker and master were deployed before the worker image failed"
    );
    let before = c.starts();
    args[i + 1] = good_worker;
    let args2: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.ok(&args2);
    assert!(
        out.contains("2 containers changed") && out.contains("workers online: 2"),
        "{out}"
    );
    let after = c.starts();
    for (name, started) in &before {
        assert_eq!(after.get(name), Some(started), "{name} was left alone");
    }
    assert!(c.ok(&["clean"]).contains("4 containers removed"));

    // clean with an unreachable host: reported, and the reachable hosts are still cleaned.
    let args = c.deploy_args(&h1.target(), "1", "1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok(&args);
    assert_eq!(c.containers().len(), 3);
    let saved = std::fs::read_to_string(c.file()).unwrap();
    let with_bad = saved.replacen(
        &format!("- {}\n", h1.target()),
        &format!("- {}\n- {bad}\n", h1.target()),
        1,
    );
    assert_ne!(with_bad, saved);
    let with_bad = with_bad.replacen("workers:\n", "workers:\n- host: 2\n", 1);
    std::fs::write(c.file(), with_bad).unwrap();
    let out = c.run(&["clean"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "warning: not cleaned: host 2 {bad}: unreachable ("
        )),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 containers removed"),
        "{}",
        text(&out)
    );
    assert!(c.containers().is_empty());

    // Bad flags and a bad cluster file: exit 2, nothing touched.
    let out = c.run(&["deploy", "-a", &h1.target(), "-m", "3", "-w", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: command line: master.host: host 3 does not exist: 1 host is listed"
    );
    std::fs::write(c.file(), "name: x\nremote_path: p\nhosts: []\nmaster: {host: local}\nworkers: [{host: local, slot: 2}]\n").unwrap();
    let out = c.run(&["deploy", "-f", "-d", c.project().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gridq-cluster.yaml: workers[0]: unknown field `slot`")
            || err.contains("unknown field `slot`"),
        "{err}"
    );
    assert!(err.contains("line 5"), "{err}");
}
