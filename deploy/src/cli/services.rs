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

/// The broker URL: `--broker`, `GRIDQ_BROKER`, or the local default.
#[derive(Debug, Clone, Args)]
pub(crate) struct BrokerArgs {
    /// The RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2f (never logged with its password).
    #[arg(long, env = "GRIDQ_BROKER", default_value = gridq_common::amqp::DEFAULT_BROKER, hide_env_values = true)]
    pub(crate) broker: String,
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
    /// A fixed worker id (default: host-pid-random).
    #[arg(long)]
    id: Option<String>,
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
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}

pub(crate) fn master(args: &MasterArgs) -> Result<(), Failure> {
    if gridq_common::amqp::uses_guest(&args.broker.broker) && !is_loopback_url(&args.broker.broker)
    {
        return Err(Failure::Usage(
            "--broker: the `guest` user only works over loopback; give the broker a user of its own".into(),
        ));
    }
    let rt = runtime()?;
    rt.block_on(async {
        let mut stop = stop_signals()?;
        let mut config = MasterConfig::new(args.state_dir.clone(), args.broker.broker.clone());
        config.listen = args.listen;
        config.heartbeat_timeout = args.heartbeat_timeout;
        config.max_lost = args.max_lost;
        config.delivery_limit = args.delivery_limit;
        config.management_url.clone_from(&args.management_url);
        config.retention = args.retention;
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

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") || host.starts_with("127.")
}

pub(crate) fn worker(args: &WorkerArgs) -> Result<(), Failure> {
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
    let scratch = std::env::temp_dir().join(format!("gridq-worker-{}", std::process::id()));
    let mut config = WorkerConfig::new(args.broker.broker.clone(), project, scratch.clone());
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
    // A worker waits on the broker and on its jobs' pipes: one thread is plenty, and it keeps
    // an idle worker small.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Other)?;
    let result = rt.block_on(async {
        let stop = stop_signals()?;
        agent::run(config, stop)
            .await
            .context("worker setup failed")
    });
    let _ = std::fs::remove_dir_all(&scratch);
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
