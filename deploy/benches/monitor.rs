//! Monitor benchmark at a million stored jobs: p50/p99 latency of the sweep list, a jobs page
//! (sorted and filtered), and a job detail page, and the master's RSS while serving them.
//!
//! It builds the store through the master's own store code (submit, claim, finish: 98% of the
//! jobs succeed with a `loss` metric, every 50th fails; each has two output lines), then starts the release `gridq master`
//! binary on that state directory and times requests with a logged-in session, as a browser
//! sends them. Run with `scripts/bench-monitor.sh` (which builds the binary first).
//! `GRIDQ_BENCH_JOBS` changes the size (default 1,000,000).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gridq_common::wire::{AttemptRef, Finished, LogLine, Outcome, Stream};
use gridq_common::{SweepId, WorkerId};
use gridq_master::store::Store;
use gridq_master::submit;
use gridq_master::sweep::{LoadOptions, load_str};

fn gridq() -> PathBuf {
    let exe = std::env::current_exe().expect("bench exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("gridq")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
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

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A sweep of `n` jobs (a 100 × 100 × n/10,000 grid), all succeeded.
fn build(dir: &Path, n: u64) -> (String, String) {
    let c = (n / 10_000).max(1);
    let yaml = format!(
        "name: big\ncommand: python3 train.py {{args}}\nmax_jobs: 2000000\nparameters:\n  a: !!python/tuple [0, 100]\n  b: !!python/tuple [0, 100]\n  c: !!python/tuple [0, {c}]\n"
    );
    let loaded = load_str(&yaml, "big.yaml", "big", &LoadOptions::default()).expect("sweep");
    let sweep = &loaded.sweep;
    let record = submit::plan_record(sweep, yaml.clone()).expect("plan");
    let names = record.param_names.clone();
    let mut ids = Vec::new();
    let mut store = Store::open(&dir.join("gridq.db")).expect("store");
    let t = Instant::now();
    // One transaction, chunk by chunk: the bench's store is built, not submitted.
    store
        .transaction(|tx| {
            tx.put_sweep(&record, now_ms())?;
            let mut jobs = sweep.expand().expect("expand").peekable();
            while jobs.peek().is_some() {
                let chunk: Vec<_> = jobs
                    .by_ref()
                    .take(submit::CHUNK)
                    .map(|j| submit::new_job(&names, &j, sweep))
                    .collect();
                ids.extend(chunk.iter().map(|j| j.id));
                tx.add_jobs(&record, chunk, false, now_ms())?;
            }
            Ok(())
        })
        .expect("submit");
    eprintln!("  submitted {} jobs in {:.1?}", ids.len(), t.elapsed());
    let worker = WorkerId::new("bench-1-x").unwrap();
    let sweep = SweepId::new("big").unwrap();
    let t = Instant::now();
    for (k, chunk) in ids.chunks(20_000).enumerate() {
        store
            .transaction(|tx| {
                let pubs: Vec<_> = chunk
                    .iter()
                    .map(|id| gridq_master::store::Publish {
                        sweep: sweep.clone(),
                        job: *id,
                        attempt: 1,
                        queue: "default".into(),
                    })
                    .collect();
                let now = now_ms();
                tx.confirmed(&pubs, now)?;
                for (i, id) in chunk.iter().enumerate() {
                    let a = AttemptRef {
                        sweep: sweep.clone(),
                        job: *id,
                        attempt: 1,
                    };
                    tx.claim(&a, &worker, "bench", now)?;
                    tx.output(
                        &a,
                        0,
                        &[
                            LogLine {
                                stream: Stream::Stdout,
                                line: format!("epoch 1 loss {i}"),
                                ts_ms: now,
                            },
                            LogLine {
                                stream: Stream::Stdout,
                                line: "done".into(),
                                ts_ms: now,
                            },
                        ],
                    )?;
                    let mut result = serde_json::Map::new();
                    #[allow(clippy::cast_precision_loss)]
                    let loss = ((k * 20_000 + i) % 9973) as f64 / 9973.0;
                    result.insert("loss".into(), serde_json::json!(loss));
                    let failed = (k * 20_000 + i) % 50 == 49;
                    tx.finish(
                        &Finished {
                            worker: worker.clone(),
                            host: "bench".into(),
                            attempt: a,
                            outcome: if failed {
                                Outcome::Failed
                            } else {
                                Outcome::Succeeded
                            },
                            exit_code: Some(i32::from(failed)),
                            signal: None,
                            started_ms: now - 1500 - (i as u64 % 1000),
                            finished_ms: now,
                            result: (!failed).then_some(result),
                            reason: None,
                            gpus: vec![],
                            lines: 2,
                            code: None,
                            outputs: None,
                        },
                        1000,
                        now,
                    )?;
                }
                Ok(())
            })
            .expect("finish");
    }
    eprintln!("  finished them in {:.1?}", t.elapsed());
    (ids[ids.len() / 2].to_string(), "big".into())
}

/// Fails loudly when a listing the pages below use would scan a table or sort the sweep's
/// jobs: its timings would then measure the plan, not the monitor (7.5 s a page at a million
/// jobs once, when a tie-break was not in the index).
fn check_plans(db: &std::path::Path, sweep: &str) {
    use gridq_master::store::{JobQuery, JobState, SortKey};
    let reader = Store::reader(db).expect("reader");
    let q =
        |states: Vec<JobState>, params: Vec<(&str, &str)>, sort: SortKey, descending| JobQuery {
            sweep: SweepId::new(sweep).unwrap(),
            states,
            params: params
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            text: None,
            sort,
            descending,
            limit: 50,
            offset: 0,
        };
    let listings = [
        q(vec![], vec![], SortKey::Index, false),
        q(
            vec![JobState::Succeeded],
            vec![("b", "42")],
            SortKey::Metric("loss".into()),
            true,
        ),
        q(vec![], vec![], SortKey::Param("c".into()), true),
        q(vec![JobState::Succeeded], vec![], SortKey::Duration, false),
        q(vec![JobState::Failed], vec![], SortKey::Finished, true),
        q(vec![JobState::Failed], vec![], SortKey::Duration, false),
        q(vec![], vec![], SortKey::State, false),
    ];
    for listing in &listings {
        let plan = reader.view().explain_jobs(listing).expect("plan");
        // A parameter filter starts from its matches and sorts them (bounded by the matches).
        let bad = plan.iter().any(|l| {
            (l.starts_with("SCAN ") && l != "SCAN p")
                || (l.contains("TEMP B-TREE") && listing.params.is_empty())
        });
        assert!(
            !bad,
            "a listing scans or sorts the sweep: {listing:?}\n{}",
            plan.join("\n")
        );
    }
    eprintln!(
        "  query plans: {} listings read their page off an index",
        listings.len()
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let n: u64 = std::env::var("GRIDQ_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // GRIDQ_BENCH_DIR keeps the built store there and reuses it on the next run.
    let state =
        std::env::var_os("GRIDQ_BENCH_DIR").map_or_else(|| dir.path().join("state"), PathBuf::from);
    std::fs::create_dir_all(&state).unwrap();
    let marker = state.join("bench-job");
    let (job, sweep) = if let Ok(job) = std::fs::read_to_string(&marker) {
        eprintln!("reusing the store in {}", state.display());
        (job, "big".to_owned())
    } else {
        eprintln!("building a store of {n} jobs");
        let built = build(&state, n);
        std::fs::write(&marker, &built.0).unwrap();
        built
    };
    check_plans(&state.join("gridq.db"), &sweep);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(gridq())
        .args(["master", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(&state)
        // No broker: the pages read the store; the broker session retries in the background.
        .args(["--broker", "amqp://bench:bench@127.0.0.1:1/%2f"])
        .env("GRIDQ_CONTEXT", dir.path().join("ctx.json"))
        .env("RUST_LOG", "warn,lapin=off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gridq master");
    let master = Proc(child);
    let token_path = state.join("token");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while http.get(format!("{base}/healthz")).send().is_err() {
        assert!(Instant::now() < deadline, "the master did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = std::fs::read_to_string(token_path).unwrap();
    let login = http
        .post(format!("{base}/login"))
        .form(&[("token", token.trim())])
        .send()
        .unwrap();
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let pages = [
        ("sweep list (/sweeps)", "/sweeps".to_owned()),
        ("jobs page, default order", format!("/sweeps/{sweep}")),
        (
            "jobs page, filtered by state and a parameter, sorted by a metric",
            format!("/sweeps/{sweep}?state=succeeded&p.b=42&sort=metric%3Aloss&desc=1"),
        ),
        (
            "jobs page, sorted by a parameter, page 20",
            format!("/sweeps/{sweep}?sort=param%3Ac&desc=1&page=20"),
        ),
        (
            "jobs API, filtered by state, sorted by duration",
            format!("/api/v1/jobs?sweep={sweep}&state=succeeded&sort=duration&limit=50"),
        ),
        (
            "jobs page, failed jobs, sorted by finish time",
            format!("/sweeps/{sweep}?state=failed&sort=finished&desc=1"),
        ),
        ("job detail", format!("/jobs/{job}?sweep={sweep}")),
        (
            "plots tab (2,000 points of 980,000, 20,000 durations; 20 rounds)",
            format!("/sweeps/{sweep}?tab=plots&metric=loss"),
        ),
        (
            "jobs page, text search (matches in the command lines)",
            format!("/sweeps/{sweep}?q=--c%3D7"),
        ),
    ];
    println!("monitor at {n} stored jobs ({} rounds per page):", 200);
    for (what, path) in &pages {
        let mut times = Vec::new();
        // The plots page is slow at this size (see docs/benchmarks.md): fewer rounds.
        let (warm, rounds) = if what.starts_with("plots") {
            (3, 23)
        } else {
            (20, 220)
        };
        for round in 0..rounds {
            let t = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .send()
                .unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            let body = r.bytes().unwrap();
            assert!(!body.is_empty());
            if round >= warm {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "  {what:<66} p50 {:>6.2} ms  p99 {:>6.2} ms",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
    println!(
        "  master RSS after serving: {:.1} MB",
        rss_mb(master.0.id())
    );
}
