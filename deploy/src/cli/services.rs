//! `gridq master` and `gridq worker`: the services, as the one binary runs them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use gridq_common::WorkerId;
use gridq_master::service::{self, MasterConfig};
use gridq_worker::agent::{self, OnStop, WorkerConfig};
use tokio::sync::watch;

use super::Failure;
use super::context;

/// The broker URL: `--broker-file`, `--broker`, `GRIDQ_BROKER`, or the local default.
#[derive(Debug, Clone, Args)]
pub(crate) struct BrokerArgs {
    /// The RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2f (never logged with its password).
    #[arg(long, env = "GRIDQ_BROKER", default_value = gridq_common::amqp::DEFAULT_BROKER, hide_env_values = true)]
    pub(crate) broker: String,
    /// Read the broker URL from this file (its first line) instead: it then appears in no
    /// environment, process list or `docker inspect`. The file must not be readable by other
    /// users.
    #[arg(long, env = "GRIDQ_BROKER_FILE", conflicts_with = "broker")]
    pub(crate) broker_file: Option<PathBuf>,
    /// The CA certificates (PEM) an amqps:// broker's certificate must chain to: a cluster's
    /// private CA. Without it, public CAs are trusted. The same as `?cacertfile=` in the URL.
    #[arg(long, env = "GRIDQ_CA_FILE")]
    pub(crate) ca_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// The broker URL, read from `--broker-file` when given, with `--ca-file` in it; warns
    /// when the credentials would cross a network in the clear.
    pub(crate) fn url(&self) -> Result<String, Failure> {
        Ok(self.settings()?.url)
    }

    /// The URL and what else the broker file says.
    pub(crate) fn settings(&self) -> Result<BrokerFile, Failure> {
        let mut settings = match &self.broker_file {
            Some(path) => read_broker_file(path).map_err(Failure::Usage)?,
            None => BrokerFile {
                url: self.broker.clone(),
                management_url: None,
            },
        };
        settings.url = with_ca_file(settings.url, self.ca_file.as_deref())?;
        warn_if_plain(&settings.url);
        Ok(settings)
    }
}

/// A broker credentials file: the URL on its first line, then optional `key=value` lines.
#[derive(Debug)]
pub(crate) struct BrokerFile {
    pub(crate) url: String,
    /// `management_url=`: the management API with credentials of its own (a user tagged
    /// `monitoring`), for the master's queue statistics.
    pub(crate) management_url: Option<String>,
}

/// The URL with `--ca-file` (made absolute) as its `cacertfile`.
pub(crate) fn with_ca_file(url: String, ca: Option<&std::path::Path>) -> Result<String, Failure> {
    let Some(ca) = ca else {
        return Ok(url);
    };
    if !gridq_common::amqp::is_tls(&url) {
        return Err(Failure::Usage(
            "--ca-file: the broker URL is not amqps://; TLS needs an amqps:// URL".into(),
        ));
    }
    let ca = std::fs::canonicalize(ca)
        .map_err(|e| Failure::Usage(format!("--ca-file {}: {e}", ca.display())))?;
    Ok(gridq_common::amqp::with_query_param(
        &url,
        gridq_common::amqp::CA_FILE_PARAM,
        &ca.to_string_lossy(),
    ))
}

/// Warns about a plain `amqp://` URL to another host: its password and every message would
/// cross the network unencrypted.
pub(crate) fn warn_if_plain(url: &str) {
    if !gridq_common::amqp::is_tls(url) && !is_loopback_url(url) {
        let shown = gridq_common::amqp::redact(url);
        tracing::warn!(broker = %shown, "broker traffic is not encrypted");
        eprintln!(
            "warning: {shown} is plain AMQP to another host: the password and every message cross the network unencrypted; use amqps:// (with --ca-file for a private CA)"
        );
    }
}

/// A credentials file that only its owner (or root) can read: the URL on its first line, then
/// `key=value` lines.
fn read_broker_file(path: &std::path::Path) -> Result<BrokerFile, String> {
    use std::os::unix::fs::MetadataExt as _;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("--broker-file {shown}: {e}"))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "--broker-file {shown}: readable by other users (mode {:o}); make it private with chmod 600",
            meta.mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("--broker-file {shown}: {e}"))?;
    let mut lines = text.lines();
    let url = lines.next().unwrap_or("").trim();
    if url.is_empty() {
        return Err(format!(
            "--broker-file {shown}: empty; its first line must be the broker URL"
        ));
    }
    let mut file = BrokerFile {
        url: url.to_owned(),
        management_url: None,
    };
    for (n, line) in lines.enumerate() {
        match line.trim().split_once('=') {
            Some(("management_url", v)) => file.management_url = Some(v.to_owned()),
            None if line.trim().is_empty() => {}
            _ => {
                return Err(format!(
                    "--broker-file {shown}:{}: expected management_url=URL",
                    n + 2
                ));
            }
        }
    }
    Ok(file)
}

/// Keeps other processes of the same user (a job, above all) out of this one's memory and
/// `/proc/PID/environ`, where the broker's credentials are: the process is made non-dumpable,
/// so only root may read them. Jobs are dumpable again once they exec.
pub(crate) fn protect_secrets() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(cause = %e, "cannot make the process non-dumpable; its environment stays readable by the same user");
    }
}

#[derive(Debug, Args)]
pub(crate) struct MasterArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Where the store and the token live.
    #[arg(long, env = "GRIDQ_STATE_DIR", default_value = ".gridq")]
    state_dir: PathBuf,
    /// Where the API listens; keep it on loopback unless a tunnel or proxy fronts it.
    #[arg(long, env = "GRIDQ_LISTEN", default_value = "127.0.0.1:8642")]
    listen: SocketAddr,
    /// A worker silent this long is lost and its jobs run again.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Lost workers after which a job fails instead of running again.
    #[arg(long, default_value_t = 3)]
    max_lost: u32,
    /// Deliveries of a job message before the broker dead-letters it.
    #[arg(long, default_value_t = gridq_common::topology::DEFAULT_DELIVERY_LIMIT)]
    delivery_limit: u32,
    /// RabbitMQ's management API for the monitor's queue statistics (default: the broker's host
    /// on port 15672; without it the monitor reads queue depths over AMQP).
    #[arg(long, env = "GRIDQ_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// Delete finished sweeps (jobs, results, logs) untouched for this long, e.g. 30d. Default:
    /// keep everything.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// The most jobs one sweep may have; no sweep file's `max_jobs` goes past it.
    #[arg(long, default_value_t = gridq_master::service::DEFAULT_MAX_JOBS_PER_SWEEP,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_jobs_per_sweep: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnStopArg {
    /// Running jobs finish, then the worker exits.
    Finish,
    /// Running jobs are killed and handed back to run elsewhere.
    Requeue,
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Jobs run at once (default: the number of CPUs).
    #[arg(long)]
    slots: Option<usize>,
    /// GPUs to use, e.g. 0,1: one slot per GPU, each job pinned by CUDA_VISIBLE_DEVICES.
    #[arg(long, value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
    /// Queues to take jobs from (repeat or comma-separate).
    #[arg(long = "queue", value_delimiter = ',', default_value = "default")]
    queues: Vec<String>,
    /// The project directory jobs run in.
    #[arg(long, default_value = ".")]
    project: PathBuf,
    /// What running jobs do on SIGTERM: finish, or be handed back. A second signal exits now.
    #[arg(long, value_enum, default_value_t = OnStopArg::Finish)]
    on_stop: OnStopArg,
    /// Time between heartbeats.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// SIGTERM → SIGKILL grace for timeouts and cancels.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// A fixed worker id (default: host-pid-random). A worker whose broker user is not the
    /// master's gets its user and a dot in front.
    #[arg(long)]
    id: Option<String>,
    /// The master's broker user: job and control messages from any other user are refused
    /// (default: this worker's own user, when one user does everything).
    #[arg(long, env = "GRIDQ_MASTER_USER")]
    master_user: Option<String>,
    /// Run jobs as this user, UID:GID (a worker started as root, e.g. in a container, whose
    /// broker credentials file jobs must not read).
    #[arg(long, value_parser = parse_uid_gid)]
    job_user: Option<(u32, u32)>,
    /// Where jobs leave their result files (default: a new private directory under $TMPDIR,
    /// removed on exit). A given directory must be this user's and writable by no other user;
    /// it is created if missing and kept.
    #[arg(long, env = "GRIDQ_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,
    /// Exit, killing running jobs, once this inherited descriptor reads end of file: the read
    /// end of a pipe whose write end only the parent process holds, so that the worker never
    /// outlives it (`gridq run --local` passes its workers 0, their standard input).
    #[arg(long, value_name = "FD")]
    exit_with_parent_fd: Option<i32>,
}

fn parse_uid_gid(text: &str) -> Result<(u32, u32), String> {
    let (u, g) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: expected UID:GID, e.g. 1000:1000"))?;
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("`{text}`: expected UID:GID with numbers, e.g. 1000:1000"))
    };
    Ok((num(u)?, num(g)?))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Other)
}

/// Counts SIGINT/SIGTERM into a watch: 1 = stop gracefully, 2 = now.
pub(crate) fn stop_signals() -> anyhow::Result<watch::Receiver<u32>> {
    stop_signals_or_parent(None)
}

/// [`stop_signals`], and once `parent_gone` completes (the parent process died: see
/// [`gridq_worker::parent`]), stop now.
fn stop_signals_or_parent(
    mut parent_gone: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<watch::Receiver<u32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tx.send_modify(|n| *n += 1),
                _ = int.recv() => tx.send_modify(|n| *n += 1),
                _ = async { parent_gone.as_mut().expect("guarded").await }, if parent_gone.is_some() => {
                    parent_gone = None;
                    tracing::warn!("the parent process is gone: stopping now");
                    tx.send_modify(|n| *n = (*n).max(2));
                }
            }
        }
    });
    Ok(rx)
}

pub(crate) fn master(args: &MasterArgs) -> Result<(), Failure> {
    protect_secrets();
    let settings = args.broker.settings()?;
    let broker = settings.url;
    if gridq_common::amqp::uses_guest(&broker) && !is_loopback_url(&broker) {
        return Err(Failure::Usage(
            "--broker: the `guest` user only works over loopback; give the broker a user of its own".into(),
        ));
    }
    let rt = runtime()?;
    rt.block_on(async {
        let mut stop = stop_signals()?;
        let mut config = MasterConfig::new(args.state_dir.clone(), broker);
        config.listen = args.listen;
        config.heartbeat_timeout = args.heartbeat_timeout;
        config.max_lost = args.max_lost;
        config.delivery_limit = args.delivery_limit;
        config.management_url = args.management_url.clone().or(settings.management_url);
        config.retention = args.retention;
        config.max_jobs_per_sweep = args.max_jobs_per_sweep;
        let shutdown = async move {
            let _ = stop.wait_for(|n| *n >= 1).await.map(|_| ());
        };
        let (handle, task) = service::start(config, shutdown).await?;
        let url = format!("http://{}", handle.addr);
        context::save(&url, &handle.token).context("cannot save the CLI context")?;
        eprintln!(
            "gridq master listening on {url}: monitor at {url}/ (log in with the token in {})",
            args.state_dir.join("token").display()
        );
        task.await.context("the master task failed")?;
        Ok::<_, anyhow::Error>(())
    })
    .map_err(Failure::Other)
}

pub(crate) fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") || host.starts_with("127.")
}

pub(crate) fn worker(args: &WorkerArgs) -> Result<(), Failure> {
    protect_secrets();
    // Taken before anything else can open a descriptor of that number.
    let parent_gone = args
        .exit_with_parent_fd
        .map(gridq_worker::parent::watch)
        .transpose()
        .map_err(|e| Failure::Usage(format!("--exit-with-parent-fd: {e}")))?;
    let broker = args.broker.url()?;
    let id = args
        .id
        .as_deref()
        .map(WorkerId::new)
        .transpose()
        .map_err(|e| Failure::Usage(format!("--id: {e}")))?;
    if args.slots == Some(0) {
        return Err(Failure::Usage("--slots: must be at least 1".into()));
    }
    let project = std::fs::canonicalize(&args.project)
        .map_err(|e| Failure::Usage(format!("--project {}: {e}", args.project.display())))?;
    let mut config = WorkerConfig::new(broker, project);
    config.scratch_dir.clone_from(&args.scratch_dir);
    if let Some(s) = args.slots {
        config.slots = s;
    }
    config.gpus = args.gpus.clone();
    config.queues = args.queues.clone();
    config.heartbeat_interval = args.heartbeat;
    config.grace = args.grace;
    config.on_stop = match args.on_stop {
        OnStopArg::Finish => OnStop::Finish,
        OnStopArg::Requeue => OnStop::Requeue,
    };
    config.id = id;
    config.master_user.clone_from(&args.master_user);
    config.job_user = args.job_user;
    // A worker waits on the broker and on its jobs' pipes: one thread is plenty, and it keeps
    // an idle worker small.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Other)?;
    let result = rt.block_on(async {
        let stop = stop_signals_or_parent(parent_gone)?;
        agent::run(config, stop)
            .await
            .context("worker setup failed")
    });
    // Running jobs may still be winding down in the runtime; don't wait for them on exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    result.map_err(Failure::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("amqp://127.0.0.1:5672/%2f"));
        assert!(is_loopback_url("amqp://guest:guest@localhost/"));
        assert!(!is_loopback_url("amqp://guest:guest@10.1.2.3:5672/"));
    }
}
