//! The commands that talk to a master through its API: `submit`, `status`, `jobs`, `logs`,
//! `cancel`, `retry`, `results`. Human tables by default, `--json` for scripts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::Failure;
use super::context;

/// Where the master is.
#[derive(Debug, Clone, Args)]
pub(crate) struct MasterConn {
    /// The master's URL (default: the saved context of the last `gridq master` or `gridq run`).
    #[arg(long, env = "GRIDQ_MASTER", global = true)]
    pub(crate) master: Option<String>,
    /// The master's token (default: the saved context).
    #[arg(long, env = "GRIDQ_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// A deployed cluster's file: reach its master through an SSH tunnel (default: the
    /// saved context, then ./gridq-cluster.yaml).
    #[arg(
        long = "cluster",
        env = "GRIDQ_CLUSTER",
        global = true,
        value_name = "FILE"
    )]
    pub(crate) cluster: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

/// An API client.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The SSH tunnel to a deployed master, open while the client lives.
    _tunnel: Option<Arc<super::cluster::TunnelGuard>>,
}

impl Client {
    pub(crate) fn new(base: String, token: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::new(),
            _tunnel: None,
        }
    }

    fn from_conn(conn: &MasterConn) -> Result<Self, Failure> {
        if conn.master.is_none() {
            if let Some(file) = super::cluster::cluster_for(conn) {
                let (url, token, guard) = super::cluster::open_master(&file)?;
                let mut client = Self::new(url, conn.token.clone().unwrap_or(token));
                client._tunnel = Some(Arc::new(guard));
                return Ok(client);
            }
        }
        let saved = context::load();
        let base = conn
            .master
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.url.clone()).filter(|u| !u.is_empty()))
            .ok_or_else(|| Failure::Usage("no master: pass --master URL (or GRIDQ_MASTER), or --cluster FILE for a deployed cluster, or start one with `gridq master`".into()))?;
        let token = conn
            .token
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.token.clone()).filter(|t| !t.is_empty()))
            .ok_or_else(|| Failure::Usage("no token: pass --token (or GRIDQ_TOKEN); it is in the master's state directory".into()))?;
        Ok(Self::new(base, token))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the master at {}", self.base))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("the master refused the token: {message}");
        }
        Err(anyhow!(ApiError {
            status: status.as_u16(),
            message
        }))
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .send(self.http.get(format!("{}/api/v1{path}", self.base)))
            .await?;
        resp.json().await.context("the master's answer is not JSON")
    }

    pub(crate) async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .send(self.http.get(format!("{}/api/v1{path}", self.base)))
            .await?;
        resp.text().await.context("reading the master's answer")
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/api/v1{path}", self.base))
                    .json(body),
            )
            .await?;
        resp.json().await.context("the master's answer is not JSON")
    }
}

/// An error answer from the API.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Bad input the master refused (4xx) is a usage error (exit 2); the rest exit 1.
fn classify(e: anyhow::Error) -> Failure {
    match e.downcast_ref::<ApiError>() {
        Some(api) if (400..500).contains(&api.status) => Failure::Usage(api.message.clone()),
        _ => Failure::Other(e),
    }
}

fn enc(s: &str) -> String {
    gridq_common::rabbit_node::percent_encode(s)
}

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The sweep file.
    sweep: PathBuf,
    /// The command, for bare parameters files (or to override the file's).
    #[arg(long, short = 'c')]
    command: Option<String>,
    /// Run every job again, even those that succeeded before.
    #[arg(long)]
    rerun: bool,
    /// Follow the sweep until it is done, with a progress bar (on a terminal), and end with a
    /// summary line.
    #[arg(long)]
    watch: bool,
    /// The most jobs the sweep may expand to, in place of its `max_jobs` (default 100,000):
    /// the way to raise the limit of a bare parameters file. The master's own cap
    /// (`--max-jobs-per-sweep`) still applies.
    #[arg(long, value_name = "N", value_parser = super::expand::parse_max_jobs)]
    max_jobs: Option<std::num::NonZeroU64>,
    /// Start each job only on a worker whose project holds the code the project has now (its
    /// `.gridq/code.json`, as `gridq deploy` writes it): a job that no online worker can run
    /// fails with the reason. The project is the cluster's (through a cluster file or
    /// context), else the sweep file's directory. The sweep file's `same_code: true` does the
    /// same.
    #[arg(long)]
    same_code: bool,
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StateArg {
    Pending,
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
}

#[derive(Debug, Args)]
pub(crate) struct JobsArgs {
    /// Only this sweep's jobs.
    #[arg(long)]
    sweep: Option<String>,
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: u64,
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// The job id (or a unique prefix of at least 4 digits).
    job: String,
    /// The sweep, when the id is in several.
    #[arg(long)]
    sweep: Option<String>,
    /// Keep printing new lines until the job ends.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    /// A sweep name or a job id.
    target: String,
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// The sweep.
    sweep: String,
    /// Retry its failed and timed-out jobs (required: the only kind of retry there is).
    #[arg(long, required = true)]
    failed: bool,
    #[command(flatten)]
    conn: MasterConn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ResultsFormat {
    Csv,
    Jsonl,
}

#[derive(Debug, Args)]
pub(crate) struct ResultsArgs {
    /// The sweep.
    sweep: String,
    #[arg(long, value_enum, default_value_t = ResultsFormat::Csv)]
    format: ResultsFormat,
    #[command(flatten)]
    conn: MasterConn,
}

/// Runs a command's work; a Ctrl-C ends it with exit 130 and returns normally, so that what
/// the command holds (a tunnel's ssh master and its directory) is closed on the way out.
fn block_on<T>(f: impl std::future::Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    super::services::runtime()?.block_on(async {
        tokio::select! {
            outcome = f => outcome,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted");
                Err(Failure::Silent(130))
            }
        }
    })
}

/// A job's argv from the API, quoted for a shell.
fn argv_line(job: &Value) -> String {
    shell_words::join(
        job["argv"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str),
    )
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(crate) fn submit(args: &SubmitArgs) -> Result<(), Failure> {
    let yaml = gridq_master::sweep::read_sweep_file(&args.sweep)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    // The code version is computed (the project hashed) only for a sweep bound to it.
    let binds = args.same_code || yaml.lines().any(|l| l.starts_with("same_code:"));
    let code = binds.then(|| submission_code(args)).transpose()?;
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let mut body = serde_json::json!({
            "yaml": yaml,
            "source": args.sweep.display().to_string(),
            "command": args.command,
            "rerun": args.rerun,
        });
        if let Some(n) = args.max_jobs {
            body["max_jobs"] = serde_json::json!(n.get());
        }
        if let Some(code) = code {
            body["code"] = serde_json::json!(code);
            body["same_code"] = serde_json::json!(args.same_code);
        }
        let resp = client.post("/sweeps", &body).await.map_err(classify)?;
        for w in resp["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", w.as_str().unwrap_or_default());
        }
        let name = resp["sweep"].as_str().unwrap_or_default().to_owned();
        if args.conn.json {
            print_json(&resp);
        } else {
            let s = &resp["summary"];
            println!(
                "sweep {name}: {} jobs; {} new, {} to run again, {} already succeeded (skipped), {} still in flight",
                s["total"], s["added"], s["rerun"], s["skipped"], s["in_flight"]
            );
        }
        if args.watch {
            let end = watch(&client, &name, !args.conn.json)
                .await
                .map_err(Failure::Other)?;
            if !args.conn.json {
                // The bar draws on a terminal only: this line is the result anywhere.
                println!("{}", end.summary(&name));
            }
            if !end.all_succeeded() {
                return Err(Failure::Silent(1));
            }
        }
        Ok(())
    })
}

/// The project's code version now, as `gridq deploy` would sync it: the cluster's project
/// with its file's `sync.gitignore` when the client works through a cluster, else the sweep
/// file's directory.
fn submission_code(args: &SubmitArgs) -> Result<gridq_common::code::CodeVersion, Failure> {
    let cluster = if args.conn.master.is_none() {
        super::cluster::cluster_for(&args.conn)
    } else {
        None
    };
    let (project, gitignore) = match cluster {
        Some(file) => {
            let cluster = super::cluster::load_cluster(&file)?;
            (cluster.project, cluster.file.sync.gitignore)
        }
        None => (
            args.sweep
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf),
            true,
        ),
    };
    let options = crate::sync::SyncOptions {
        gitignore,
        ..crate::sync::SyncOptions::default()
    };
    crate::sync::code_version(&project, &options).map_err(|e| {
        Failure::Usage(format!(
            "same_code: cannot compute the code version of the project {}: {e}",
            project.display()
        ))
    })
}

/// How a watched sweep ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WatchEnd {
    pub(crate) total: u64,
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    pub(crate) timed_out: u64,
    pub(crate) canceled: u64,
}

impl WatchEnd {
    /// Whether every job succeeded.
    pub(crate) fn all_succeeded(&self) -> bool {
        self.succeeded == self.total
    }

    /// `sweep NAME done: S succeeded, F failed, T timed out, C canceled (N jobs)`.
    pub(crate) fn summary(&self, sweep: &str) -> String {
        format!(
            "sweep {sweep} done: {} succeeded, {} failed, {} timed out, {} canceled ({} job{})",
            self.succeeded,
            self.failed,
            self.timed_out,
            self.canceled,
            self.total,
            if self.total == 1 { "" } else { "s" }
        )
    }
}

/// Follows a sweep until every job is final, with a progress bar (on a terminal) and failures
/// printed as they happen (above the bar, or on stderr without one). Returns the final counts.
pub(crate) async fn watch(client: &Client, sweep: &str, human: bool) -> anyhow::Result<WatchEnd> {
    let bar = if human {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    // indicatif draws (and prints above the bar) only on a terminal.
    let drawn = human && !bar.is_hidden();
    bar.set_style(
        ProgressStyle::with_template("{bar:40.green/red} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut version = 0u64;
    let mut reported = std::collections::HashSet::new();
    let mut failures_listed = 0;
    loop {
        let asked = tokio::time::Instant::now();
        let v = client
            .get(&format!(
                "/sweeps/{}?after={version}&wait_ms=5000",
                enc(sweep)
            ))
            .await?;
        version = v["version"].as_u64().unwrap_or(version);
        let s = &v["sweep"];
        let total = s["total"].as_u64().unwrap_or(0);
        let counts = &s["counts"];
        let n = |k: &str| counts[k].as_u64().unwrap_or(0);
        let done = n("succeeded") + n("failed") + n("timed_out") + n("canceled");
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(format!(
            "succeeded {} failed {} timed out {} canceled {} running {} queued {}",
            n("succeeded"),
            n("failed"),
            n("timed_out"),
            n("canceled"),
            n("running"),
            n("queued") + n("pending") + n("retrying")
        ));
        // The failed jobs are listed again only when their number changed.
        if n("failed") + n("timed_out") != failures_listed {
            failures_listed = n("failed") + n("timed_out");
            for state in ["failed", "timed_out"] {
                let jobs = client
                    .get(&format!(
                        "/jobs?sweep={}&state={state}&limit=10000",
                        enc(sweep)
                    ))
                    .await?;
                for j in jobs["jobs"].as_array().into_iter().flatten() {
                    let id = j["id"].as_str().unwrap_or_default().to_owned();
                    if reported.insert(id.clone()) && human {
                        let line = format!(
                            "{state}: {id} {}: {}",
                            argv_line(j),
                            j["reason"].as_str().unwrap_or("")
                        );
                        if drawn {
                            bar.println(line);
                        } else {
                            eprintln!("{line}");
                        }
                    }
                }
            }
        }
        if v["done"].as_bool().unwrap_or(false) {
            bar.finish();
            return Ok(WatchEnd {
                total,
                succeeded: n("succeeded"),
                failed: n("failed"),
                timed_out: n("timed_out"),
                canceled: n("canceled"),
            });
        }
        // The long poll answers at every change, hundreds of times a second under load: ask
        // at most ten times a second, which a progress bar does not outpace, and leave the
        // master's CPU to the jobs.
        tokio::time::sleep_until(asked + WATCH_PACE).await;
    }
}

/// The shortest time between two progress requests of [`watch`].
const WATCH_PACE: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) fn status(args: &StatusArgs) -> Result<(), Failure> {
    if args.conn.master.is_none() {
        if let Some(file) = super::cluster::cluster_for(&args.conn) {
            return super::cluster::status(&file, args.conn.json);
        }
    }
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let sweeps = client.get("/sweeps").await.map_err(classify)?;
        let workers = client.get("/workers").await.map_err(classify)?;
        let overview = client.get("/overview").await.map_err(classify)?;
        if args.conn.json {
            print_json(&serde_json::json!({
                "sweeps": sweeps["sweeps"],
                "workers": workers["workers"],
                "broker": overview["broker"],
            }));
            return Ok(());
        }
        print_broker(&overview["broker"]);
        print_sweeps(&sweeps["sweeps"]);
        println!();
        print_workers(&workers["workers"]);
        Ok(())
    })
}

/// The broker line of `gridq status`: where, and whether its traffic is encrypted.
pub(crate) fn print_broker(link: &Value) {
    let url = link["url"].as_str().unwrap_or("?");
    match link["encryption"].as_str() {
        Some("tls") => println!("broker: {url} (encrypted: TLS)"),
        Some("loopback") => println!("broker: {url} (plain AMQP on the master's loopback)"),
        Some(_) => println!(
            "broker: {url}\nwarning: broker traffic is NOT encrypted (plain AMQP to another host); use amqps://"
        ),
        None => {}
    }
}

/// The sweeps table of `gridq status`: counts by state.
pub(crate) fn print_sweeps(sweeps: &Value) {
    println!(
        "{:<24} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8}",
        "SWEEP", "TOTAL", "SUCCEEDED", "FAILED", "RUNNING", "QUEUED", "CANCELED"
    );
    for s in sweeps.as_array().into_iter().flatten() {
        let c = &s["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8}",
            s["name"].as_str().unwrap_or(""),
            s["total"].as_u64().unwrap_or(0),
            n("succeeded"),
            n("failed") + n("timed_out"),
            n("running"),
            n("queued") + n("pending") + n("retrying"),
            n("canceled")
        );
    }
}

/// Whether a worker row of the API is live: online or draining (it sends heartbeats).
pub(crate) fn is_live(worker: &Value) -> bool {
    matches!(worker["state"].as_str(), Some("online" | "draining"))
}

/// The workers table of `gridq status`: the live workers, then how many lost and stopped
/// (replaced, shut down) ones are not listed. Their rows would show what they ran when they
/// went; the monitor keeps that history.
pub(crate) fn print_workers(workers: &Value) {
    println!(
        "{:<40} {:<20} {:<9} {:>5} {:>7}",
        "WORKER", "HOST", "STATE", "SLOTS", "RUNNING"
    );
    let all: Vec<&Value> = workers.as_array().into_iter().flatten().collect();
    let count = |state: &str| all.iter().filter(|w| w["state"] == state).count();
    let (lost, stopped) = (count("lost"), count("stopped"));
    for w in all.iter().filter(|w| is_live(w)) {
        println!(
            "{:<40} {:<20} {:<9} {:>5} {:>7}",
            w["id"].as_str().unwrap_or(""),
            w["host"].as_str().unwrap_or(""),
            w["state"].as_str().unwrap_or(""),
            w["info"]["slots"].as_u64().unwrap_or(0),
            w["info"]["running"].as_array().map_or(0, Vec::len)
        );
    }
    if lost + stopped > 0 {
        println!(
            "not listed: {lost} lost, {stopped} stopped workers (the monitor keeps their history)"
        );
    }
}

pub(crate) fn jobs(args: &JobsArgs) -> Result<(), Failure> {
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let mut q = format!("/jobs?limit={}", args.limit);
        if let Some(s) = &args.sweep {
            q.push_str(&format!("&sweep={}", enc(s)));
        }
        if let Some(st) = args.state {
            let v = st
                .to_possible_value()
                .map(|p| p.get_name().replace('-', "_"))
                .unwrap_or_default();
            q.push_str(&format!("&state={v}"));
        }
        let v = client.get(&q).await.map_err(classify)?;
        if args.conn.json {
            print_json(&v);
            return Ok(());
        }
        println!(
            "{:<32}  {:<10} {:>3}  {:<31}  ARGV",
            "ID", "STATE", "TRY", "CODE"
        );
        for j in v["jobs"].as_array().into_iter().flatten() {
            // The code version its latest attempt ran (`TREE@COMMIT+dirty`, as in the CSV).
            let code = serde_json::from_value::<gridq_common::code::CodeVersion>(j["code"].clone())
                .map(|c| gridq_master::store::code_label(&c))
                .unwrap_or_default();
            println!(
                "{:<32}  {:<10} {:>3}  {:<31}  {}",
                j["id"].as_str().unwrap_or(""),
                j["state"].as_str().unwrap_or(""),
                j["attempt"],
                code,
                argv_line(j)
            );
        }
        Ok(())
    })
}

pub(crate) fn logs(args: &LogsArgs) -> Result<(), Failure> {
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let mut printed = 0usize;
        loop {
            let mut q = format!("/jobs/{}/logs", enc(&args.job));
            if let Some(s) = &args.sweep {
                q.push_str(&format!("?sweep={}", enc(s)));
            }
            let v = client.get(&q).await.map_err(classify)?;
            let lines = v["lines"].as_array().cloned().unwrap_or_default();
            for l in lines.iter().skip(printed) {
                if args.conn.json {
                    println!("{l}");
                } else if l["stream"] == "stderr" {
                    eprintln!("{}", l["line"].as_str().unwrap_or(""));
                } else {
                    println!("{}", l["line"].as_str().unwrap_or(""));
                }
            }
            printed = printed.max(lines.len());
            let state = v["state"].as_str().unwrap_or("");
            let finished = matches!(state, "succeeded" | "failed" | "timed_out" | "canceled");
            if !args.follow || finished {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

pub(crate) fn cancel(args: &CancelArgs) -> Result<(), Failure> {
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let is_sweep = gridq_common::SweepId::new(&args.target).is_ok()
            && client
                .get(&format!("/sweeps/{}", enc(&args.target)))
                .await
                .is_ok();
        let v = if is_sweep {
            client
                .post(
                    &format!("/sweeps/{}/cancel", enc(&args.target)),
                    &Value::Null,
                )
                .await
        } else {
            client
                .post(&format!("/jobs/{}/cancel", enc(&args.target)), &Value::Null)
                .await
        }
        .map_err(classify)?;
        if args.conn.json {
            print_json(&v);
        } else if is_sweep {
            println!("sweep {}: {} jobs canceled", args.target, v["canceled"]);
        } else {
            println!("{}", v["message"].as_str().unwrap_or("canceled"));
        }
        Ok(())
    })
}

pub(crate) fn retry(args: &RetryArgs) -> Result<(), Failure> {
    let _ = args.failed;
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let v = client
            .post(&format!("/sweeps/{}/retry", enc(&args.sweep)), &Value::Null)
            .await
            .map_err(classify)?;
        if args.conn.json {
            print_json(&v);
        } else {
            println!(
                "sweep {}: {} failed jobs queued again",
                args.sweep, v["retried"]
            );
        }
        Ok(())
    })
}

pub(crate) fn results(args: &ResultsArgs) -> Result<(), Failure> {
    let client = Client::from_conn(&args.conn)?;
    block_on(async {
        let format = match args.format {
            ResultsFormat::Csv => "csv",
            ResultsFormat::Jsonl => "jsonl",
        };
        let text = client
            .get_text(&format!(
                "/sweeps/{}/results?format={format}",
                enc(&args.sweep)
            ))
            .await
            .map_err(classify)?;
        print!("{text}");
        Ok(())
    })
}
