//! The `gridq` command line: clap definitions and dispatch.
//!
//! Exit codes: 0 on success, 2 for bad input (a bad sweep file, bad flags, a request the master
//! refused as invalid), 1 for anything else (including a sweep with failed jobs).

mod broker;
mod client;
mod cluster;
mod context;
mod exec;
mod expand;
mod init;
mod local;
mod probe;
mod pull;
mod services;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// gridq: parameter sweeps over a RabbitMQ task queue, on the machines you already have.
#[derive(Debug, Parser)]
#[command(name = "gridq", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Expand a sweep file into its jobs, without running anything.
    Expand(expand::ExpandArgs),
    /// Run a sweep on this machine: a master, local workers and a local broker.
    Run(local::RunArgs),
    /// The master service: store, broker session, API.
    Master(services::MasterArgs),
    /// The worker service: runs jobs from the broker.
    Worker(services::WorkerArgs),
    /// A private RabbitMQ node in the foreground (local use, tests).
    Broker(broker::BrokerArgs),
    /// Submit a sweep to a master.
    Submit(client::SubmitArgs),
    /// Sweeps with their progress, and workers.
    Status(client::StatusArgs),
    /// List jobs.
    Jobs(client::JobsArgs),
    /// Print a job's output.
    Logs(client::LogsArgs),
    /// Cancel a sweep or a job.
    Cancel(client::CancelArgs),
    /// Run a sweep's failed jobs again.
    Retry(client::RetryArgs),
    /// A sweep's results as CSV or JSON lines.
    Results(client::ResultsArgs),
    /// Bring a sweep's job outputs (GRIDQ_OUTPUT) to this machine, with its results.csv.
    Pull(pull::PullArgs),
    /// What each host offers: CPUs, memory, disk, GPUs, Docker (over SSH, in parallel).
    Probe(probe::ProbeArgs),
    /// Run a command once on every host, in parallel (over SSH).
    Exec(exec::ExecArgs),
    /// Start the broker, master and workers on your hosts over SSH and Docker (idempotent).
    Deploy(Box<cluster::DeployArgs>),
    /// Re-sync the project and restart the workers one at a time; no job is lost.
    Update(cluster::UpdateArgs),
    /// Remove every container of the cluster on every host (--purge: volumes and files too).
    Clean(cluster::CleanArgs),
    /// Open an SSH tunnel to the cluster's monitor and print its local URL and token.
    Monitor(cluster::MonitorArgs),
    /// A container's init: runs a program, reaps orphans, passes signals on.
    #[command(hide = true)]
    Init(init::InitArgs),
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad input: exit 2.
    Usage(String),
    /// Anything else: exit 1.
    Other(anyhow::Error),
    /// Already reported: exit with this code.
    Silent(u8),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// Parses the command line, runs the subcommand and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // init stays single-threaded and logs nothing of its own but warnings.
    init_tracing();
    let outcome = match &cli.command {
        Command::Expand(args) => expand::run(args),
        Command::Run(args) => local::run(args),
        Command::Master(args) => services::master(args),
        Command::Worker(args) => services::worker(args),
        Command::Broker(args) => broker::run(args),
        Command::Submit(args) => client::submit(args),
        Command::Status(args) => client::status(args),
        Command::Jobs(args) => client::jobs(args),
        Command::Logs(args) => client::logs(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Retry(args) => client::retry(args),
        Command::Results(args) => client::results(args),
        Command::Pull(args) => pull::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Exec(args) => exec::run(args),
        Command::Deploy(args) => cluster::deploy(args),
        Command::Update(args) => cluster::update(args),
        Command::Clean(args) => cluster::clean(args),
        Command::Monitor(args) => cluster::monitor(args),
        Command::Init(args) => init::run(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Silent(code)) => ExitCode::from(code),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=off"));
    // Colours only on a terminal: a service's log goes to a file or `docker logs`, where
    // escape codes only get in the way of reading and searching it.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}
