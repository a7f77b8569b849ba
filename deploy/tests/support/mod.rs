//! Shared fixtures for the pipeline tests: a real RabbitMQ node, a vhost per test, an
//! in-process master and real worker processes (the `gridq` binary).
//!
//! The broker: `scripts/test.sh` starts one node for the whole run (`gridq broker`, with a
//! 5-second `consumer_timeout`, so every pipeline test also runs under a tight consumer timeout)
//! and names its settings in `GRIDQ_TEST_BROKER_ENV`. Without it (plain `cargo test`), the first
//! test starts a node itself, tied to this test process by a parent-death signal.
//!
//! To look into a failure: `GRIDQ_TEST_KEEP=1` keeps each cluster's directory (worker logs,
//! the store, the project) under `$TMPDIR`; `GRIDQ_TEST_WORKER_LOG` is the workers' `RUST_LOG`
//! (`info,lapin=off` by default); `GRIDQ_TEST_MASTER_LOG` logs the in-process master to
//! standard error with that filter.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gridq_common::{JobId, SweepId};
use gridq_master::service::{self, Handle, MasterConfig};
use gridq_master::store::{JobRow, JobState, Reader, Store};
use gridq_master::sweep::{LoadOptions, load_str};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Connection settings of the shared test broker.
#[derive(Debug, Clone)]
pub struct BrokerEnv {
    pub url: String,
    pub user: String,
    pub password: String,
    pub management: String,
    /// `amqps://` on the vhost `/`, with the broker CA's `cacertfile`.
    pub tls: String,
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn wait_for_file(path: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.contains("GRIDQ_BROKER_MANAGEMENT=") {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the test broker did not start within {limit:?} (no {})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shared broker, started on first use when `scripts/test.sh` did not start one.
pub fn broker() -> &'static BrokerEnv {
    static BROKER: OnceLock<BrokerEnv> = OnceLock::new();
    BROKER.get_or_init(|| {
        let text = match std::env::var("GRIDQ_TEST_BROKER_ENV") {
            Ok(path) => wait_for_file(Path::new(&path), Duration::from_secs(120)),
            Err(_) => start_own_broker(),
        };
        let env = parse_env(&text);
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing from the broker env file"))
        };
        let url = get("GRIDQ_BROKER");
        BrokerEnv {
            url: url
                .trim_end_matches("/%2F")
                .trim_end_matches("/%2f")
                .trim_end_matches('/')
                .to_owned(),
            user: get("GRIDQ_BROKER_USER"),
            password: get("GRIDQ_BROKER_PASSWORD"),
            management: get("GRIDQ_BROKER_MANAGEMENT"),
            tls: get("GRIDQ_BROKER_TLS"),
        }
    })
}

fn start_own_broker() -> String {
    let dir = std::env::temp_dir().join(format!("gridq-test-broker-{}", std::process::id()));
    let env_file = dir.join("env");
    let _ = std::fs::remove_file(&env_file);
    std::fs::create_dir_all(&dir).expect("broker dir");
    let (tx, rx) = std::sync::mpsc::channel();
    let dir2 = dir.clone();
    let env2 = env_file.clone();
    // The parent-death signal is tied to the spawning thread, so spawn from a thread that lives
    // as long as this process.
    std::thread::spawn(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gridq"));
        cmd.arg("broker")
            .arg("--dir")
            .arg(dir2.join("node"))
            .arg("--management")
            .arg("--tls")
            .arg("--consumer-timeout")
            .arg("5s")
            .arg("--env-file")
            .arg(&env2)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        set_parent_death_signal(&mut cmd);
        let child = cmd.spawn();
        let _ = tx.send(child.is_ok());
        let _child = child;
        loop {
            std::thread::park();
        }
    });
    assert!(rx.recv().unwrap_or(false), "cannot start `gridq broker`");
    wait_for_file(&env_file, Duration::from_secs(120))
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// Creates a fresh vhost for one test and returns its AMQP URL.
pub async fn vhost(name: &str) -> String {
    let b = broker();
    let client = reqwest::Client::new();
    let vh = format!("t-{name}-{}", std::process::id());
    let enc = gridq_common::rabbit_node::percent_encode(&vh);
    let _ = client
        .delete(format!("{}/api/vhosts/{enc}", b.management))
        .basic_auth(&b.user, Some(&b.password))
        .send()
        .await;
    let r = client
        .put(format!("{}/api/vhosts/{enc}", b.management))
        .basic_auth(&b.user, Some(&b.password))
        .send()
        .await
        .expect("management API");
    assert!(
        r.status().is_success(),
        "creating vhost {vh}: {}",
        r.status()
    );
    let r = client
        .put(format!("{}/api/permissions/{enc}/{}", b.management, b.user))
        .basic_auth(&b.user, Some(&b.password))
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .expect("management API");
    assert!(
        r.status().is_success(),
        "permissions on {vh}: {}",
        r.status()
    );
    format!("{}/{enc}", b.url)
}

/// A broker user of its own for one test, with `permissions` on the vhost of `vhost_url`;
/// returns its URL on that vhost. [`drop_user`] removes it.
pub async fn role_user(
    vhost_url: &str,
    name: &str,
    permissions: impl FnOnce(&str) -> gridq_common::topology::Permissions,
) -> String {
    let b = broker();
    let api = gridq_common::management::Management::new(&b.management, &b.user, &b.password);
    let user = format!("t-{name}-{}", std::process::id());
    let password = format!("pw-{name}-{}", std::process::id());
    api.put_user(&user, &password, "")
        .await
        .expect("creating a user");
    let vhost = gridq_common::amqp::vhost(vhost_url);
    api.grant(&vhost, &user, &permissions(&user))
        .await
        .expect("permissions");
    let rest = vhost_url.split_once('@').expect("a URL with credentials").1;
    format!("amqp://{user}:{password}@{rest}")
}

/// Deletes a user made by [`role_user`], given its URL.
pub async fn drop_user(url: &str) {
    let b = broker();
    let api = gridq_common::management::Management::new(&b.management, &b.user, &b.password);
    let _ = api.delete_user(&gridq_common::amqp::user(url)).await;
}

/// Deletes a test's vhost (and everything in it).
pub async fn drop_vhost(url: &str) {
    let b = broker();
    let url = url.split('?').next().unwrap_or(url);
    let Some(enc) = url.rsplit('/').next() else {
        return;
    };
    let _ = reqwest::Client::new()
        .delete(format!("{}/api/vhosts/{enc}", b.management))
        .basic_auth(&b.user, Some(&b.password))
        .send()
        .await;
}

/// A queue's statistics from the management API, in the vhost of the AMQP URL `url`.
pub async fn queue_stats(url: &str, queue: &str) -> serde_json::Value {
    let b = broker();
    let vhost = url.rsplit('/').next().expect("vhost");
    reqwest::Client::new()
        .get(format!("{}/api/queues/{vhost}/{queue}", b.management))
        .basic_auth(&b.user, Some(&b.password))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("management API")
        .json()
        .await
        .expect("queue stats")
}

/// Takes job messages off the default job queue (`basic.get`, not acked) until `n` jobs have
/// come: the connection and channel (in confirm mode) that hold them, the jobs in queue order,
/// and the last delivery tag.
pub async fn get_jobs(
    url: &str,
    n: usize,
) -> (
    lapin::Connection,
    lapin::Channel,
    Vec<gridq_common::wire::JobMessage>,
    u64,
) {
    use gridq_common::{topology, wire};
    use lapin::options::{BasicGetOptions, ConfirmSelectOptions};

    let conn = gridq_common::amqp::connect(url, "gridq-test-get-jobs")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    let mut jobs = Vec::new();
    let mut last_tag = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while jobs.len() < n {
        assert!(
            Instant::now() < deadline,
            "got only {} jobs of {n}",
            jobs.len()
        );
        match ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            Some(m) => {
                jobs.extend(
                    wire::decode_jobs(&m.delivery.properties, &m.delivery.data)
                        .expect("a job message"),
                );
                last_tag = m.delivery.delivery_tag;
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    (conn, ch, jobs, last_tag)
}

/// Polls `f` until it returns `Some`, or panics after `limit` with what it saw last.
pub async fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match f() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A worker process.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for the process to exit (deadline), returning its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {limit:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: its vhost, state directory, project directory, master and workers.
pub struct Cluster {
    pub name: String,
    pub url: String,
    pub dir: TempDir,
    pub project: PathBuf,
    pub handle: Handle,
    master_stop: Option<oneshot::Sender<()>>,
    master_task: Option<tokio::task::JoinHandle<()>>,
    pub config: MasterConfig,
    pub workers: Vec<Worker>,
    worker_seq: usize,
}

impl Cluster {
    /// A cluster on the shared broker, in a fresh vhost.
    pub async fn new(name: &str) -> Self {
        let url = vhost(name).await;
        Self::with_url(name, url, |_| {}).await
    }

    /// A cluster on a given broker URL, with the master config adjusted by `tune`.
    pub async fn with_url(name: &str, url: String, tune: impl FnOnce(&mut MasterConfig)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("gridq-{name}-"))
            .disable_cleanup(std::env::var_os("GRIDQ_TEST_KEEP").is_some())
            .tempdir()
            .expect("tempdir");
        let project = dir.path().join("project");
        std::fs::create_dir_all(&project).expect("project dir");
        let mut config = MasterConfig::new(dir.path().join("state"), url.clone());
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.heartbeat_timeout = Duration::from_secs(2);
        config.max_lost = 3;
        config.delivery_limit = 3;
        config.max_retry_backoff = Duration::from_millis(1500);
        tune(&mut config);
        if let Ok(filter) = std::env::var("GRIDQ_TEST_MASTER_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
        }
        let (handle, stop, task) = start_master(config.clone()).await;
        Self {
            name: name.to_owned(),
            url,
            dir,
            project,
            handle,
            master_stop: Some(stop),
            master_task: Some(task),
            config,
            workers: Vec::new(),
            worker_seq: 0,
        }
    }

    /// Stops the master (as a crash would leave it: nothing flushed beyond committed state).
    pub async fn stop_master(&mut self) {
        if let Some(stop) = self.master_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.master_task.take() {
            let _ = task.await;
        }
    }

    /// Starts the master again on the same state directory.
    pub async fn start_master(&mut self) {
        let (handle, stop, task) = start_master(self.config.clone()).await;
        self.handle = handle;
        self.master_stop = Some(stop);
        self.master_task = Some(task);
    }

    /// Starts a worker process with extra arguments.
    pub fn spawn_worker(&mut self, extra: &[&str]) -> usize {
        let url = self.url.clone();
        self.spawn_worker_on(&url, extra)
    }

    /// Starts a worker process that connects with `url` (another broker user, say).
    pub fn spawn_worker_on(&mut self, url: &str, extra: &[&str]) -> usize {
        let project = self.project.clone();
        self.spawn_worker_in(url, &project, extra)
    }

    /// Starts a worker process that connects with `url` and runs jobs in `project`.
    pub fn spawn_worker_in(
        &mut self,
        url: &str,
        project: &std::path::Path,
        extra: &[&str],
    ) -> usize {
        self.worker_seq += 1;
        let log = self
            .dir
            .path()
            .join(format!("worker-{}.log", self.worker_seq));
        let file = std::fs::File::create(&log).expect("worker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gridq"));
        cmd.arg("worker")
            .arg("--project")
            .arg(project)
            .arg("--heartbeat")
            .arg("250ms")
            .arg("--grace")
            .arg("1s")
            .arg("--id")
            .arg(format!("w{}-{}", self.worker_seq, self.name))
            .args(extra)
            .env("GRIDQ_BROKER", url)
            // Its private scratch directory goes into the cluster's, so that the scratch of a
            // worker a test SIGKILLs (which cannot remove it) goes with the cluster.
            .env("TMPDIR", self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("GRIDQ_TEST_WORKER_LOG").unwrap_or_else(|_| "info,lapin=off".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        let child = cmd.spawn().expect("spawn worker");
        self.workers.push(Worker { child, log });
        self.workers.len() - 1
    }

    /// Runs 16 instant jobs, so that the workers take jobs ahead afterwards (their last jobs
    /// were short).
    pub async fn warm_up_short_jobs(&self) {
        self.submit("name: warmup\ncommand: [true]\nparameters:\n  x: !!python/tuple [0, 16]\n")
            .await;
        self.wait_done("warmup", Duration::from_secs(60)).await;
    }

    pub fn worker_id(&self, n: usize) -> String {
        format!("w{}-{}", n + 1, self.name)
    }

    pub fn reader(&self) -> Reader {
        Store::reader(&self.handle.db_path).expect("reader")
    }

    /// Submits a sweep given as YAML text.
    /// Submits sweep `name`: one job that records each start (its attempt number appended to
    /// `starts`, its pid written to `pid-N`) and whose first attempt runs far longer than any
    /// test; later attempts end after 2 s. Returns the job's id.
    pub async fn submit_long_first_attempt(&self, name: &str) -> JobId {
        self.write(
            "slow.py",
            "import os, time\na = os.environ['GRIDQ_ATTEMPT']\nopen('pid-' + a, 'w').write(str(os.getpid()))\nopen('starts', 'a').write(a + '\\n')\ntime.sleep(300 if a == '1' else 2)\nprint('finished')\n",
        );
        self.submit(&format!(
            "name: {name}\ncommand: python3 slow.py\nparameters:\n  x: 1\n"
        ))
        .await;
        self.jobs(name)[0].id
    }

    pub async fn submit(&self, yaml: &str) -> gridq_master::store::SubmitSummary {
        self.submit_opts(yaml, false).await
    }

    pub async fn submit_opts(&self, yaml: &str, rerun: bool) -> gridq_master::store::SubmitSummary {
        self.submit_with_code(yaml, rerun, None, false).await
    }

    /// Submits a sweep with the code version at submission, bound to it with `same_code`
    /// (as `gridq submit --same-code` does).
    pub async fn submit_with_code(
        &self,
        yaml: &str,
        rerun: bool,
        code: Option<gridq_common::code::CodeVersion>,
        same_code: bool,
    ) -> gridq_master::store::SubmitSummary {
        let mut loaded =
            load_str(yaml, "sweep.yaml", "sweep", &LoadOptions::default()).expect("valid sweep");
        loaded.sweep.set_code(code);
        if same_code {
            loaded.sweep.set_same_code();
        }
        gridq_master::submit::submit_sweep(&self.handle, loaded.sweep, yaml.to_owned(), rerun)
            .await
            .expect("submit")
    }

    pub fn jobs(&self, sweep: &str) -> Vec<JobRow> {
        let id = SweepId::new(sweep).expect("sweep id");
        self.reader()
            .view()
            .jobs(Some(&id), None, 1_000_000, 0)
            .expect("jobs")
    }

    pub fn counts(&self, sweep: &str) -> std::collections::BTreeMap<String, u64> {
        let id = SweepId::new(sweep).expect("sweep id");
        self.reader().view().counts(&id).expect("counts")
    }

    /// Waits until exactly `n` jobs of the sweep are in `state`.
    pub async fn wait_count(&self, sweep: &str, state: &str, n: u64, limit: Duration) {
        wait_until(&format!("{n} jobs of {sweep} {state}"), limit, || {
            let counts = self.counts(sweep);
            if counts.get(state) == Some(&n) {
                Ok(())
            } else {
                Err(format!("{counts:?}"))
            }
        })
        .await;
    }

    /// Waits until every job of the sweep is final.
    pub async fn wait_done(&self, sweep: &str, limit: Duration) -> Vec<JobRow> {
        let reader = self.reader();
        let id = SweepId::new(sweep).expect("sweep id");
        wait_until(&format!("sweep {sweep} to finish"), limit, || {
            let counts = reader.view().counts(&id).map_err(|e| e.to_string())?;
            if !counts.is_empty() && service::sweep_done(&counts) {
                Ok(())
            } else {
                Err(format!("{counts:?}\n{}", self.worker_logs()))
            }
        })
        .await;
        self.jobs(sweep)
    }

    /// Waits until a job is in `state`.
    pub async fn wait_state(
        &self,
        sweep: &str,
        job: JobId,
        state: JobState,
        limit: Duration,
    ) -> JobRow {
        let reader = self.reader();
        let id = SweepId::new(sweep).expect("sweep id");
        wait_until(&format!("job {job} to be {state}"), limit, || {
            let row = reader
                .view()
                .job(&id, &job)
                .map_err(|e| e.to_string())?
                .ok_or("no such job")?;
            if row.state == state {
                Ok(row)
            } else {
                Err(format!("{:?} (reason {:?})", row.state, row.reason))
            }
        })
        .await
    }

    pub fn attempts(&self, sweep: &str, job: JobId) -> Vec<gridq_master::store::AttemptRow> {
        let id = SweepId::new(sweep).expect("sweep id");
        self.reader().view().attempts(&id, &job).expect("attempts")
    }

    /// A sample of the master's `/metrics`, read with its token: the value of the line that
    /// starts with `sample` and a space.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.handle.addr))
            .bearer_auth(&*self.handle.token)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("the master's /metrics")
            .text()
            .await
            .expect("the master's /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {sample} in /metrics:\n{text}"))
            .parse()
            .expect("a number")
    }

    pub fn worker_logs(&self) -> String {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let text = w.log_text();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- worker {} ---\n{}",
                    i + 1,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Writes a file into the project directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.project.join(name);
        std::fs::write(&path, text).expect("write project file");
        path
    }

    pub async fn shutdown(mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        self.stop_master().await;
        drop_vhost(&self.url).await;
    }
}

async fn start_master(
    config: MasterConfig,
) -> (Handle, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let (handle, task) = service::start(config, async move {
        let _ = rx.await;
    })
    .await
    .expect("master starts");
    (handle, tx, task)
}

/// Whether a process is alive (not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
