//! Pipeline benchmarks on this machine: a private RabbitMQ node, `gridq master` and two
//! `gridq worker` processes, all release builds. Run with `scripts/bench.sh` (which builds the
//! binary first) or `cargo bench -p gridq-deploy --bench pipeline`.
//!
//! - submit rate: jobs confirmed on the broker per second, 20,000-job sweep, no workers;
//! - drain: the 20,000 queued jobs of the submit run, from starting the workers to all results
//!   stored;
//! - end to end: `true` jobs per second, a second 20,000-job sweep submitted with the workers
//!   running, from the POST to all results stored, and the CPU time the broker, the master,
//!   the workers and the jobs' own processes spent per job;
//! - latency: one job's submit-to-stored time, median and p99 over 200 jobs in sequence;
//! - memory: idle worker RSS, and master RSS after 100,000 stored jobs (skipped when
//!   `GRIDQ_BENCH_SKIP_MASTER_RSS` is set).
//!
//! With `GRIDQ_BENCH_TLS` set it measures instead what TLS costs: one broker listening plain and
//! with TLS, a master and two workers on a vhost over plain AMQP and another set over `amqps://`,
//! and pairs of runs on each in turn (ABBA order): end-to-end jobs/s of a 5,000-job sweep and the
//! median latency of 50 one-job sweeps.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn gridq() -> PathBuf {
    let exe = std::env::current_exe().expect("bench exe");
    // target/release/deps/pipeline-xxxx -> target/release/gridq
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("gridq")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The sum of some `/proc/PID/stat` time fields (counted from 1, as in proc(5)), in seconds.
fn stat_seconds(pid: u32, fields: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .iter()
        .filter_map(|i| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_s(pid: u32) -> f64 {
    stat_seconds(pid, &[14, 15])
}

/// CPU time of a process's children that it has waited for (its jobs), in seconds.
fn children_cpu_s(pid: u32) -> f64 {
    stat_seconds(pid, &[16, 17])
}

/// The broker's Erlang VM: the `beam.smp` descending from the `gridq broker` process.
fn beam_pid(broker: u32) -> Option<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if !comm.starts_with("beam") {
            return None;
        }
        let mut p = pid;
        for _ in 0..8 {
            p = parent_of(p)?;
            if p == broker {
                return Some(pid);
            }
        }
        None
    })
}

fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            if !t.is_empty() {
                return t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Api {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
    fn submit(&self, yaml: &str) -> Value {
        self.http
            .post(format!("{}/api/v1/sweeps", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(1800))
            .json(&json!({ "yaml": yaml }))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("submit: {e}"))
    }
    /// Long-polls until the predicate holds on the sweep's counts, asking at most once per
    /// `pace` (zero: again as soon as anything changed).
    fn wait(&self, sweep: &str, pace: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut version = 0;
        loop {
            let asked = Instant::now();
            let v = self.get(&format!("/sweeps/{sweep}?after={version}&wait_ms=2000"));
            version = v["version"].as_u64().unwrap_or(version);
            if pred(&v["sweep"]["counts"]) {
                return v;
            }
            if let Some(rest) = pace.checked_sub(asked.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// How often the throughput runs look at a sweep's progress: a progress display's rate. Answered
/// at every change, the long poll would ask ~300 times a second under load, and the bench's own
/// requests would take CPU from what it measures.
const PROGRESS_PACE: Duration = Duration::from_millis(50);

fn count(counts: &Value, state: &str) -> u64 {
    counts[state].as_u64().unwrap_or(0)
}

/// A private broker node under `dir/broker` (`gridq broker` with `extra` flags), and its env
/// file once it is up.
fn start_broker(exe: &Path, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let env_file = dir.join("broker.env");
    let node = Proc(
        Command::new(exe)
            .arg("broker")
            .args(extra)
            .arg("--dir")
            .arg(dir.join("broker"))
            .arg("--env-file")
            .arg(&env_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gridq broker"),
    );
    let env = wait_file(&env_file);
    (node, env)
}

/// A master and two workers on one broker URL.
struct Stack {
    api: Api,
    _master: Proc,
    _workers: [Proc; 2],
}

/// `gridq master` on `broker` with its state in `dir/state-NAME`, and its API once it listens.
fn start_master(exe: &Path, dir: &Path, name: &str, broker: &str) -> (Proc, Api) {
    let ctx = dir.join(format!("context-{name}.json"));
    let master = Proc(
        Command::new(exe)
            .args(["master", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join(format!("state-{name}")))
            .env("GRIDQ_BROKER", broker)
            .env("GRIDQ_CONTEXT", &ctx)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gridq master"),
    );
    let ctx: Value = serde_json::from_str(&wait_file(&ctx)).expect("context");
    let api = Api {
        base: ctx["url"].as_str().expect("url").to_owned(),
        token: ctx["token"].as_str().expect("token").to_owned(),
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("http"),
    };
    (master, api)
}

fn stack(exe: &Path, dir: &Path, name: &str, broker: &str) -> Stack {
    let (master, api) = start_master(exe, dir, name, broker);
    let project = dir.join("project");
    std::fs::create_dir_all(&project).expect("project");
    let worker = |n: usize| {
        Proc(
            Command::new(exe)
                .args(["worker", "--slots", "2", "--heartbeat", "1s", "--id"])
                .arg(format!("bench-{name}-{n}"))
                .arg("--project")
                .arg(&project)
                .env("GRIDQ_BROKER", broker)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("gridq worker"),
        )
    };
    Stack {
        api,
        _master: master,
        _workers: [worker(1), worker(2)],
    }
}

/// End-to-end jobs/s of an `n`-job sweep, and the median latency of `k` one-job sweeps.
fn e2e_and_latency(api: &Api, tag: &str, n: u64, k: usize) -> (f64, f64) {
    let t = Instant::now();
    api.submit(&format!(
        "name: e2e-{tag}\ncommand: [\"true\"]\nparameters:\n  i: {{range: [0, {n}]}}\n"
    ));
    api.wait(&format!("e2e-{tag}"), PROGRESS_PACE, |c| {
        count(c, "succeeded") == n
    });
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let samples = latencies(api, &format!("lat-{tag}-"), k);
    (rate, samples[k / 2])
}

/// Submit-to-stored times in ms of `k` one-job sweeps named `prefix0`, `prefix1`, ... run one
/// after another, sorted.
fn latencies(api: &Api, prefix: &str, k: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(k);
    for i in 0..k {
        let name = format!("{prefix}{i}");
        let t = Instant::now();
        api.submit(&format!(
            "name: {name}\ncommand: [\"true\"]\nparameters:\n  i: {i}\n"
        ));
        api.wait(&name, Duration::ZERO, |c| count(c, "succeeded") == 1);
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples
}

/// Plain AMQP against TLS, interleaved on one broker (see the module's documentation).
fn tls_pairs(exe: &Path, dir: &Path) {
    let (_broker, env) = start_broker(exe, dir, &["--management", "--tls"]);
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing"))
            .to_owned()
    };
    let http = reqwest::blocking::Client::new();
    let mut urls = Vec::new();
    for (mode, base) in [
        ("plain", get("GRIDQ_BROKER")),
        ("tls", get("GRIDQ_BROKER_TLS")),
    ] {
        let vhost = format!("bench-{mode}");
        for (path, body) in [
            (format!("/api/vhosts/{vhost}"), json!({})),
            (
                format!("/api/permissions/{vhost}/{}", get("GRIDQ_BROKER_USER")),
                json!({"configure": ".*", "write": ".*", "read": ".*"}),
            ),
        ] {
            http.put(format!("{}{path}", get("GRIDQ_BROKER_MANAGEMENT")))
                .basic_auth(get("GRIDQ_BROKER_USER"), Some(get("GRIDQ_BROKER_PASSWORD")))
                .json(&body)
                .send()
                .and_then(|r| r.error_for_status())
                .expect("management API");
        }
        urls.push((mode, gridq_common::amqp::with_vhost(&base, &vhost)));
    }
    let stacks: Vec<(&str, Stack)> = urls
        .iter()
        .map(|(mode, url)| (*mode, stack(exe, dir, mode, url)))
        .collect();
    for (mode, s) in &stacks {
        e2e_and_latency(&s.api, &format!("warm-{mode}"), 2_000, 10);
    }
    println!("pair  mode   end to end (jobs/s)  median latency (ms)");
    for round in 0..3 {
        // ABBA: neither mode always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for i in order {
            let (mode, s) = &stacks[i];
            let (rate, median) = e2e_and_latency(&s.api, &format!("{round}-{mode}"), 5_000, 50);
            println!("{round:>4}  {mode:<5}  {rate:>19.0}  {median:>19.2}");
        }
    }
}

/// One sweep of `n` jobs submitted to a master with no workers: the master's RSS before,
/// during (the peak, sampled every 20 ms) and after, and the submit rate (to the POST's
/// answer: every job stored and handed to the publisher; and to every job confirmed).
fn big_submit(exe: &Path, dir: &Path, n: u64) {
    let (_broker, env) = start_broker(exe, dir, &[]);
    let broker = env
        .lines()
        .find_map(|l| l.strip_prefix("GRIDQ_BROKER="))
        .expect("broker url")
        .to_owned();
    let (master, api) = start_master(exe, dir, "big", &broker);
    std::thread::sleep(Duration::from_secs(2));
    let pid = master.0.id();
    let before = rss_mb(pid);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0.0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mb(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let t = Instant::now();
    api.submit(&format!(
        "name: big\ncommand: [\"true\"]\nmax_jobs: {n}\nparameters:\n  i: {{range: [0, {n}]}}\n"
    ));
    let stored = t.elapsed();
    api.wait("big", Duration::from_millis(500), |c| {
        count(c, "queued") == n
    });
    let confirmed = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let after = rss_mb(pid);
    std::thread::sleep(Duration::from_secs(5));
    let later = rss_mb(pid);
    println!(
        "submit of {n} jobs: stored and handed to the publisher in {:.1} s ({:.0} jobs/s), all confirmed on the broker in {:.1} s ({:.0} jobs/s)",
        stored.as_secs_f64(),
        n as f64 / stored.as_secs_f64(),
        confirmed.as_secs_f64(),
        n as f64 / confirmed.as_secs_f64()
    );
    println!(
        "master RSS: before {before:.1} MB, peak during {peak:.1} MB, after {after:.1} MB, 5 s later {later:.1} MB"
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = gridq();
    assert!(
        exe.exists(),
        "build the binary first: cargo build --release -p gridq-deploy"
    );
    if std::env::var_os("GRIDQ_BENCH_TLS").is_some() {
        tls_pairs(&exe, dir.path());
        return;
    }
    if let Some(n) = std::env::var("GRIDQ_BENCH_BIG_SUBMIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        big_submit(&exe, dir.path(), n);
        return;
    }

    // Broker.
    let (broker_node, env) = start_broker(&exe, dir.path(), &[]);
    let broker = env
        .lines()
        .find_map(|l| l.strip_prefix("GRIDQ_BROKER="))
        .expect("broker url")
        .to_owned();

    // Master.
    let (master, api) = start_master(&exe, dir.path(), "main", &broker);

    // 1. Submit rate: 20,000 jobs, no workers: from the POST to every job confirmed (queued).
    let t = Instant::now();
    api.submit("name: submit\ncommand: [\"true\"]\nparameters:\n  i: {range: [0, 20000]}\n");
    api.wait("submit", Duration::ZERO, |c| count(c, "queued") == 20_000);
    let submit_rate = 20_000.0 / t.elapsed().as_secs_f64();
    println!("submit rate: {submit_rate:.0} jobs/s confirmed on the broker (20,000-job sweep)");

    // Workers: they drain the 20,000 queued jobs first.
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).expect("project");
    let spawn_worker = |n: usize| {
        Proc(
            Command::new(&exe)
                .args(["worker", "--slots", "2", "--heartbeat", "1s", "--id"])
                .arg(format!("bench-{n}"))
                .arg("--project")
                .arg(&project)
                .env("GRIDQ_BROKER", &broker)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("gridq worker"),
        )
    };
    let t = Instant::now();
    let workers = [spawn_worker(1), spawn_worker(2)];
    api.wait("submit", PROGRESS_PACE, |c| count(c, "succeeded") == 20_000);
    let drain = 20_000.0 / t.elapsed().as_secs_f64();
    println!("drain: {drain:.0} `true` jobs/s (20,000 queued jobs, 2 workers x 2 slots)");

    let beam = beam_pid(broker_node.0.id());
    let cpu_before = (
        beam.map_or(0.0, cpu_s),
        cpu_s(master.0.id()),
        workers.iter().map(|w| cpu_s(w.0.id())).sum::<f64>(),
        workers
            .iter()
            .map(|w| children_cpu_s(w.0.id()))
            .sum::<f64>(),
    );
    let t = Instant::now();
    api.submit("name: e2e\ncommand: [\"true\"]\nparameters:\n  i: {range: [0, 20000]}\n");
    api.wait("e2e", PROGRESS_PACE, |c| count(c, "succeeded") == 20_000);
    let e2e = 20_000.0 / t.elapsed().as_secs_f64();
    println!(
        "end to end: {e2e:.0} `true` jobs/s (20,000-job sweep, submit to all stored, 2 workers x 2 slots)"
    );
    // CPU per job of each process during that run, and of the jobs' own processes.
    let per_job = |s: f64| s * 1000.0 / 20_000.0;
    println!(
        "cpu per job: broker {:.2} ms, master {:.2} ms, workers {:.2} ms, the jobs themselves {:.2} ms",
        per_job(beam.map_or(0.0, cpu_s) - cpu_before.0),
        per_job(cpu_s(master.0.id()) - cpu_before.1),
        per_job(workers.iter().map(|w| cpu_s(w.0.id())).sum::<f64>() - cpu_before.2),
        per_job(
            workers
                .iter()
                .map(|w| children_cpu_s(w.0.id()))
                .sum::<f64>()
                - cpu_before.3
        ),
    );

    // 2. Latency: one job at a time, submit to stored.
    let samples = latencies(&api, "lat", 200);
    println!(
        "latency: median {:.1} ms, p99 {:.1} ms (200 one-job sweeps in sequence, submit to stored)",
        samples[100], samples[197]
    );

    // 3. Memory: idle workers; master after 100,000 stored jobs.
    std::thread::sleep(Duration::from_secs(2));
    let worker_rss: Vec<String> = workers
        .iter()
        .map(|w| format!("{:.1} MB", rss_mb(w.0.id())))
        .collect();
    println!("idle worker RSS: {}", worker_rss.join(", "));
    if std::env::var_os("GRIDQ_BENCH_SKIP_MASTER_RSS").is_some() {
        // The 60,000-job master memory run takes minutes; skipped when only the rest matters.
        drop(workers);
        return;
    }
    for k in 0..3 {
        api.submit(&format!(
            "name: mem{k}\ncommand: [\"true\"]\nmax_jobs: 20000\nparameters:\n  i: {{range: [0, 20000]}}\n"
        ));
    }
    for k in 0..3 {
        api.wait(&format!("mem{k}"), PROGRESS_PACE, |c| {
            count(c, "succeeded") == 20_000
        });
    }
    let stored: u64 = api.get("/sweeps")["sweeps"]
        .as_array()
        .map_or(0, |s| s.iter().filter_map(|s| s["total"].as_u64()).sum());
    println!(
        "master RSS after {stored} stored jobs: {:.1} MB",
        rss_mb(master.0.id())
    );
    drop(workers);
}
