//! `gridq run SWEEP --local`: the master and N workers on this machine, against a local
//! RabbitMQ (started privately when none answers), then `results.csv`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use gridq_common::amqp;
use gridq_common::rabbit_node::{NodeOptions, RabbitNode};
use gridq_master::service::{self, MasterConfig};
use gridq_master::submit;
use gridq_master::sweep::{self, LoadOptions};
use tokio::process::{Child, Command};

use super::Failure;
use super::client::{self, Client};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The sweep file.
    sweep: PathBuf,
    /// Run everything on this machine (the only mode for now; deployed clusters use `submit`).
    #[arg(long, required = true)]
    local: bool,
    /// Worker processes to start (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// The command, for bare parameters files.
    #[arg(long, short = 'c')]
    command: Option<String>,
    /// The broker; default: amqp://127.0.0.1:5672 if it answers (and a vhost of this run's own
    /// can be made there), else a private node. A URL whose vhost is `/` gets a vhost of this
    /// state directory's own (created through the management API); any other vhost is used as
    /// given.
    #[arg(long, env = "GRIDQ_BROKER", hide_env_values = true)]
    broker: Option<String>,
    /// RabbitMQ's management API, to create this run's vhost on a shared broker (default: the
    /// broker's host, port 15672).
    #[arg(long, env = "GRIDQ_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// The CA certificates (PEM) an amqps:// broker's certificate must chain to.
    #[arg(long, env = "GRIDQ_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Where the store, token, private broker and results live.
    #[arg(long, env = "GRIDQ_STATE_DIR", default_value = ".gridq")]
    state_dir: PathBuf,
    /// Run every job again, even those that succeeded in an earlier run.
    #[arg(long)]
    rerun: bool,
    /// The most jobs the sweep may expand to, in place of its `max_jobs` (default 100,000):
    /// the way to raise the limit of a bare parameters file.
    #[arg(long, value_name = "N", value_parser = super::expand::parse_max_jobs)]
    max_jobs: Option<std::num::NonZeroU64>,
    /// Bind the sweep to the project's code as it is now, as `gridq submit --same-code` does
    /// (local workers run this very directory, so their code always matches).
    #[arg(long)]
    same_code: bool,
}

pub(crate) fn run(args: &RunArgs) -> Result<(), Failure> {
    super::services::protect_secrets();
    let _ = args.local;
    // Validate the sweep before starting anything: bad input exits 2 and changes nothing.
    let yaml = gridq_master::sweep::read_sweep_file(&args.sweep)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let source = args.sweep.display().to_string();
    let stem = args
        .sweep
        .file_stem()
        .map_or_else(|| "sweep".to_owned(), |s| s.to_string_lossy().into_owned());
    let options = LoadOptions {
        command: args.command.clone(),
    };
    let mut loaded = sweep::load_str(&yaml, &source, &stem, &options)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(n) = args.max_jobs {
        loaded.sweep.set_max_jobs(n);
    }
    if args.same_code {
        loaded.sweep.set_same_code();
    }
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let mut sweep = loaded.sweep;
    let project = args
        .sweep
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let project = std::fs::canonicalize(project)
        .map_err(|e| Failure::Other(anyhow::anyhow!("{}: {e}", project.display())))?;
    if args.workers == Some(0) {
        return Err(Failure::Usage("--workers: must be at least 1".into()));
    }
    let n_workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let state_dir = absolute(&args.state_dir).map_err(Failure::Other)?;
    // Every attempt records the code it ran: here the project as it is now, hashed with the
    // rules a deploy's sync uses (what git ignores left out).
    // The sweep records it too (and `--same-code` binds it to it); it is written once the
    // sweep is found valid.
    let code = crate::sync::code_version(&project, &crate::sync::SyncOptions::default());
    sweep.set_code(code.as_ref().ok().cloned());
    submit::plan_record(&sweep, String::new())
        .and_then(|_| submit::check_count(&sweep, service::DEFAULT_MAX_JOBS_PER_SWEEP))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if let Err(e) = code.and_then(|code| crate::sync::write_code_version(&project, &code)) {
        eprintln!("warning: the project's code version is not recorded: {e}");
    }

    let given = match &args.broker {
        Some(url) => {
            let url = super::services::with_ca_file(url.clone(), args.ca_file.as_deref())?;
            super::services::warn_if_plain(&url);
            Some(url)
        }
        None => None,
    };
    let rt = super::services::runtime()?;
    let outcome = rt.block_on(async {
        let mut stop = super::services::stop_signals()?;
        let mut node = None;
        let management = args.management_url.as_deref();
        let shared = match &given {
            Some(url) => Some(own_vhost(url, &state_dir, management).await?),
            None if probe(amqp::DEFAULT_BROKER).await => {
                match own_vhost(amqp::DEFAULT_BROKER, &state_dir, management).await {
                    Ok(url) => Some(url),
                    Err(e) => {
                        eprintln!("note: {e:#}\nstarting a private broker node instead");
                        None
                    }
                }
            }
            None => None,
        };
        let broker = match shared {
            Some(url) => url,
            None => {
                let n = start_private_broker(&state_dir).await?;
                let url = n.amqp_url("/");
                node = Some(n);
                url
            }
        };
        let result = session(
            &state_dir, &broker, management, &project, n_workers, sweep, yaml, args.rerun,
            &mut stop,
        )
        .await;
        if let Some(mut n) = node {
            let _ = n.stop().await;
        }
        result
    });
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(Failure::Silent(1)),
        Err(e) => Err(Failure::Other(e)),
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    gridq_master::state_dir::prepare(p).with_context(|| format!("creating {}", p.display()))?;
    std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
}

/// Whether a broker answers at `url` (an AMQP handshake, within 2 s).
async fn probe(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), amqp::connect(url, "gridq-probe")).await,
        Ok(Ok(_))
    )
}

/// The vhost of a run with this state directory on a shared broker: one per state directory
/// and host, so two projects (or two clones of one) never see each other's queues, and a run
/// resumed from the same directory finds its own.
fn local_vhost(state_dir: &Path) -> String {
    let host = nix::unistd::gethostname().unwrap_or_default();
    let mut hasher = blake3::Hasher::new();
    hasher.update(host.as_encoded_bytes());
    hasher.update(b"\0");
    hasher.update(state_dir.as_os_str().as_encoded_bytes());
    let hash = hasher.finalize().to_hex();
    format!("gridq-local-{}", &hash[..16])
}

/// The URL this run uses on the broker at `url`: as given when it names a vhost other than
/// `/`, else on a vhost of this state directory's own, created when missing.
async fn own_vhost(
    url: &str,
    state_dir: &Path,
    management: Option<&str>,
) -> anyhow::Result<String> {
    if amqp::vhost(url) != "/" {
        return Ok(url.to_owned());
    }
    let vhost = local_vhost(state_dir);
    let api = gridq_common::management::Management::for_broker(url, management);
    let created = async {
        if !api.vhost_exists(&vhost).await? {
            let description = format!("gridq run --local, state directory {}", state_dir.display());
            api.add_vhost(&vhost, &description).await?;
            api.set_permissions(&vhost, api.user(), ".*", ".*", ".*")
                .await?;
        }
        Ok::<_, gridq_common::management::ManagementError>(())
    };
    let own = amqp::with_vhost(url, &vhost);
    if let Err(e) = created.await {
        // Made by hand as the message below says, by a user who may: it answers over AMQP.
        if probe(&own).await {
            return Ok(own);
        }
        bail!(
            "the broker at {} is shared (its URL names vhost `/`), and this run needs a vhost of its own, `{vhost}`, which gridq cannot create: {e}.\n\
             Create it once on the broker host:\n  \
             rabbitmqctl add_vhost {vhost}\n  \
             rabbitmqctl set_permissions -p {vhost} {} '.*' '.*' '.*'\n\
             or name a vhost of this project's in the URL (amqp://user:pass@host:5672/VHOST), or give --management-url",
            amqp::redact(url),
            api.user()
        );
    }
    Ok(own)
}

async fn start_private_broker(state_dir: &Path) -> anyhow::Result<RabbitNode> {
    if let Err(e) = gridq_common::rabbit_node::locate_server() {
        bail!("no broker answers at {} and {e}", amqp::DEFAULT_BROKER);
    }
    eprintln!(
        "no broker at {}; starting a private RabbitMQ node under {}",
        amqp::DEFAULT_BROKER,
        state_dir.join("broker").display()
    );
    // Started from the main thread (this runs in `block_on`), which lives as long as the
    // process: the node's parent-death signal is tied to the thread that started it.
    let options = NodeOptions {
        stop_with_parent: true,
        ..NodeOptions::new(state_dir.join("broker"))
    };
    RabbitNode::start(options)
        .await
        .context("starting the private RabbitMQ node")
}

#[allow(clippy::too_many_arguments)]
async fn session(
    state_dir: &Path,
    broker: &str,
    management: Option<&str>,
    project: &Path,
    n_workers: usize,
    sweep: gridq_master::sweep::Sweep,
    yaml: String,
    rerun: bool,
    stop: &mut tokio::sync::watch::Receiver<u32>,
) -> anyhow::Result<bool> {
    eprintln!("broker: {}", amqp::redact(broker));
    let (master_stop_tx, master_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = MasterConfig::new(state_dir.to_path_buf(), broker.to_owned());
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.heartbeat_timeout = Duration::from_secs(10);
    config.management_url = management.map(str::to_owned);
    let (handle, master_task) = service::start(config, async move {
        let _ = master_stop_rx.await;
    })
    .await?;
    let url = format!("http://{}", handle.addr);
    super::context::save(&url, &handle.token).context("saving the CLI context")?;
    let logs = state_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // Every worker reads the other end as its standard input: whatever ends this process,
    // SIGKILL included, closes `_lifeline` and the workers stop (`--exit-with-parent-fd 0`).
    let (lifeline_read, _lifeline) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("creating the workers' lifeline pipe")?;
    let mut workers = Vec::new();
    for i in 0..n_workers {
        workers.push(spawn_worker(broker, project, &logs, i, &lifeline_read)?);
    }
    drop(lifeline_read);
    let name = sweep.name().to_owned();
    let summary = submit::submit_sweep(&handle, sweep, yaml, rerun).await?;
    eprintln!(
        "sweep {name}: {} jobs ({} new, {} to run again, {} already succeeded); {n_workers} local workers; monitor at {url}/ (token in {})",
        summary.total,
        summary.added,
        summary.rerun,
        summary.skipped,
        state_dir.join("token").display()
    );
    let client = Client::new(url, handle.token.to_string());
    let all_ok = tokio::select! {
        r = client::watch(&client, &name, true) => r?.all_succeeded(),
        _ = stop.wait_for(|n| *n >= 1) => {
            eprintln!("interrupted: canceling sweep {name}");
            let _ = handle.cancel_sweep(gridq_common::SweepId::new(&name).map_err(anyhow::Error::msg)?).await;
            false
        }
    };
    // Results, then teardown.
    let csv = client
        .get_text(&format!(
            "/sweeps/{}/results?format=csv",
            gridq_common::rabbit_node::percent_encode(&name)
        ))
        .await?;
    let results_dir = state_dir.join("results");
    std::fs::create_dir_all(&results_dir)?;
    let path = results_dir.join(format!("{name}.csv"));
    std::fs::write(&path, &csv).with_context(|| format!("writing {}", path.display()))?;
    print_table(&csv);
    eprintln!("results: {}", path.display());
    stop_workers(workers).await;
    let _ = master_stop_tx.send(());
    let _ = master_task.await;
    Ok(all_ok)
}

fn spawn_worker(
    broker: &str,
    project: &Path,
    logs: &Path,
    i: usize,
    lifeline: &std::os::fd::OwnedFd,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the gridq binary")?;
    let log = std::fs::File::create(logs.join(format!("worker-{i}.log")))?;
    let child = Command::new(exe)
        .arg("worker")
        .arg("--slots")
        .arg("1")
        .arg("--heartbeat")
        .arg("1s")
        .arg("--project")
        .arg(project)
        .arg("--exit-with-parent-fd")
        .arg("0")
        // The URL carries the password: pass it in the environment, not on the command line.
        .env("GRIDQ_BROKER", broker)
        .stdin(Stdio::from(lifeline.try_clone()?))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")?;
    Ok(child)
}

async fn stop_workers(mut workers: Vec<Child>) {
    for w in &workers {
        if let Some(pid) = w.id() {
            let _ = nix_kill(pid);
        }
    }
    for w in &mut workers {
        if tokio::time::timeout(Duration::from_secs(15), w.wait())
            .await
            .is_err()
        {
            let _ = w.kill().await;
        }
    }
}

/// SIGTERM: the worker finishes its job (none runs once the sweep is done) and exits.
fn nix_kill(pid: u32) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::EINVAL)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
}

/// Prints the results CSV as an aligned table (first 50 rows).
fn print_table(csv_text: &str) {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(csv_text.as_bytes());
    let rows: Vec<Vec<String>> = reader
        .records()
        .filter_map(Result::ok)
        .map(|r| r.iter().map(|f| f.to_owned()).collect())
        .collect();
    if rows.is_empty() {
        return;
    }
    let shown: Vec<Vec<String>> = rows
        .iter()
        .take(51)
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, f)| {
                    if i == 0 && f.len() > 12 {
                        f[..12].to_owned()
                    } else {
                        f.clone()
                    }
                })
                .collect()
        })
        .collect();
    let cols = shown.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            shown
                .iter()
                .filter_map(|r| r.get(c))
                .map(|f| f.chars().count())
                .max()
                .unwrap_or(0)
                .min(24)
        })
        .collect();
    for row in &shown {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(f, w)| {
                let f: String = f.chars().take(*w).collect();
                format!("{f:<w$}")
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    if rows.len() > 51 {
        println!("... {} more rows in the CSV", rows.len() - 51);
    }
}
