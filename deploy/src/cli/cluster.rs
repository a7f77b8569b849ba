//! `gridq deploy`, `update`, `clean`, `monitor`, and `status` of a deployed cluster: flags
//! (mlframework's `-a -i -r -d -m -w -f`) and the cluster file turned into a
//! [`Cluster`], then the library in [`crate::cluster`], with per-host progress lines on
//! stderr and a summary (or `--json`) on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::Failure;
use super::client::MasterConn;
use super::context;
use super::services::runtime;
use crate::cluster::config::{
    CLUSTER_FILE, Cluster, ClusterFile, Gpus, HostRef, ImagesSection, MasterSection, SshSection,
    WorkerSection,
};
use crate::cluster::{self as lib, DeployOptions, Fleet, MasterApi, Progress};
use crate::ssh::SshOptions;
use crate::sync::{SyncMethod, SyncOptions};

/// Which cluster file: `--config FILE`, else `PROJECT/gridq-cluster.yaml`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClusterSel {
    /// The cluster file (default: gridq-cluster.yaml in the project directory).
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The project directory (mlframework's -d).
    #[arg(short = 'd', long = "project", value_name = "DIR", default_value = ".")]
    project: PathBuf,
    /// How long connecting to a host may take.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Machine-readable JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl ClusterSel {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| self.project.join(CLUSTER_FILE))
    }

    /// Loads and checks the cluster file; a missing or bad one is a usage error.
    fn load(&self) -> Result<(PathBuf, Cluster), Failure> {
        let path = self.path();
        if !path.exists() {
            return Err(Failure::Usage(format!(
                "no cluster file at {}: deploy first (gridq deploy -a HOSTS -m N -w N,...), or pass --config FILE",
                path.display()
            )));
        }
        load_cluster(&path).map(|c| (path, c))
    }

    fn ssh(&self) -> SshOptions {
        SshOptions {
            connect_timeout: self.connect_timeout,
            ..SshOptions::default()
        }
    }
}

fn load_cluster(path: &Path) -> Result<Cluster, Failure> {
    let file = ClusterFile::load(path).map_err(|e| Failure::Usage(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    file.resolve(base, &path.display().to_string())
        .map_err(|e| Failure::Usage(e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SyncArg {
    /// rsync where both ends have it, else a tar stream.
    Auto,
    /// rsync over the SSH connection.
    Rsync,
    /// A tar stream over the SSH connection.
    Tar,
}

#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    /// The hosts, comma-separated: `[user@]host[:port],...`, numbered from 1.
    #[arg(short = 'a', long = "hosts", env = "GRIDQ_HOSTS", value_name = "HOSTS")]
    hosts: Option<String>,
    #[command(flatten)]
    login: super::probe::LoginArgs,
    /// Where the project goes on the hosts, relative to the remote home (default gridq/NAME).
    #[arg(short = 'r', long, value_name = "PATH")]
    remote_path: Option<String>,
    /// Where the broker, master and monitor run: `local` or a host number.
    #[arg(short = 'm', long, value_name = "local|N", value_parser = HostRef::parse)]
    master: Option<HostRef>,
    /// Where workers run: `local` and host numbers, comma-separated.
    #[arg(short = 'w', long, value_name = "local,N1,N2,...", value_delimiter = ',', value_parser = HostRef::parse)]
    workers: Option<Vec<HostRef>>,
    /// Reuse the saved configuration (the project's gridq-cluster.yaml).
    #[arg(short = 'f')]
    reuse: bool,
    /// New passwords for every broker user and a new broker certificate, applied without
    /// losing a job: the running broker takes the passwords, the workers restart one at a time
    /// (handing their running jobs back), then the master and the broker.
    #[arg(long)]
    rotate_secrets: bool,
    #[command(flatten)]
    sel: ClusterSel,
    /// The cluster's name (labels, container names); default: the project directory's name.
    #[arg(long)]
    name: Option<String>,
    /// Jobs at once per worker (default: the host's CPUs, or one per GPU).
    #[arg(long)]
    slots: Option<usize>,
    /// GPUs for the workers: auto (detected), none, all, or indexes like 0,1.
    #[arg(long, value_parser = Gpus::parse)]
    gpus: Option<Gpus>,
    /// One worker container per GPU instead of one per host.
    #[arg(long)]
    per_gpu: bool,
    /// Queues the workers take jobs from (comma-separated).
    #[arg(long = "queue", value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// The address workers reach the master host's broker at (needed with `-m local` and
    /// remote workers).
    #[arg(long)]
    master_address: Option<String>,
    /// The AMQP port on the master host.
    #[arg(long)]
    broker_port: Option<u16>,
    /// RabbitMQ's management port on the master host's loopback.
    #[arg(long)]
    management_port: Option<u16>,
    /// The monitor's port on the master host's loopback.
    #[arg(long)]
    monitor_port: Option<u16>,
    /// A worker silent this long is lost and its jobs run again.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// The gridq image (master).
    #[arg(long, env = "GRIDQ_IMAGE")]
    gridq_image: Option<String>,
    /// The worker image.
    #[arg(long, env = "GRIDQ_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// The RabbitMQ image (default rabbitmq:3-management; scripts/build-images.sh builds
    /// gridq-rabbitmq:local without a registry).
    #[arg(long, env = "GRIDQ_RABBITMQ_IMAGE")]
    broker_image: Option<String>,
    /// Pull missing images from a registry instead of sending them from this machine.
    #[arg(long)]
    pull: bool,
    /// How the project is copied.
    #[arg(long, value_enum, default_value_t = SyncArg::Auto)]
    sync: SyncArg,
    /// How long workers may take to come online after the deploy.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
}

/// The cluster-file name for a directory: lowercase, other characters as `-`.
fn name_from(dir: &Path) -> String {
    let base = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "gridq".into());
    let mut name: String = base
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'g');
        name.truncate(40);
    }
    name
}

impl DeployArgs {
    /// The cluster file this run deploys: loaded (`-f`, `--config`) with the flags given on
    /// top, or made from the flags.
    fn cluster_file(&self) -> Result<(PathBuf, ClusterFile), Failure> {
        let usage = |m: &str| Failure::Usage(m.to_owned());
        let (path, mut file) = if self.reuse || self.sel.config.is_some() {
            let path = self.sel.path();
            if !path.exists() {
                return Err(Failure::Usage(format!(
                    "{}: no saved configuration at {}; run deploy once with -a HOSTS -m N -w N,... (it saves one), or write one",
                    if self.reuse { "-f" } else { "--config" },
                    path.display()
                )));
            }
            let file = ClusterFile::load(&path).map_err(|e| Failure::Usage(e.to_string()))?;
            (path, file)
        } else {
            let master = self
                .master
                .ok_or_else(|| usage("-m/--master: where the broker and master run (local or a host number) is required (or -f to reuse the saved configuration)"))?;
            let workers = self
                .workers
                .clone()
                .ok_or_else(|| usage("-w/--workers: the worker hosts (local,N1,N2,...) are required (or -f to reuse the saved configuration)"))?;
            let name = match &self.name {
                Some(n) => n.clone(),
                None => name_from(&self.sel.project),
            };
            let file = ClusterFile {
                remote_path: format!("gridq/{name}"),
                name,
                project: PathBuf::from("."),
                hosts: Vec::new(),
                ssh: SshSection::default(),
                master: MasterSection::on(master),
                workers: workers.into_iter().map(WorkerSection::on).collect(),
                images: ImagesSection::default(),
            };
            (self.sel.project.join(CLUSTER_FILE), file)
        };
        if let Some(h) = &self.hosts {
            file.hosts = h.split(',').map(|s| s.trim().to_owned()).collect();
        }
        if let Some(m) = self.master {
            file.master.host = m;
        }
        if let Some(w) = &self.workers {
            if self.reuse || self.sel.config.is_some() {
                file.workers = w.iter().map(|h| WorkerSection::on(*h)).collect();
            }
        }
        if let Some(r) = &self.remote_path {
            file.remote_path = match r.as_str() {
                "" | "~" => ".".to_owned(),
                p => p.strip_prefix("~/").unwrap_or(p).to_owned(),
            };
        }
        if let Some(n) = &self.name {
            file.name.clone_from(n);
        }
        for w in &mut file.workers {
            if let Some(s) = self.slots {
                w.slots = Some(s);
            }
            if let Some(g) = &self.gpus {
                w.gpus = g.clone();
            }
            if self.per_gpu {
                w.per_gpu = true;
            }
            if let Some(q) = &self.queues {
                w.queues.clone_from(q);
            }
        }
        let m = &mut file.master;
        if let Some(a) = &self.master_address {
            m.address = Some(a.clone());
        }
        if let Some(p) = self.broker_port {
            m.broker_port = p;
        }
        if let Some(p) = self.management_port {
            m.management_port = p;
        }
        if let Some(p) = self.monitor_port {
            m.monitor_port = p;
        }
        if let Some(t) = self.heartbeat_timeout {
            m.heartbeat_timeout = t;
        }
        let abs = |p: &PathBuf| -> PathBuf {
            if p.as_os_str() == "none" {
                return p.clone();
            }
            std::path::absolute(p).unwrap_or_else(|_| p.clone())
        };
        if let Some(k) = &self.login.identity {
            file.ssh.identity = Some(abs(k));
        }
        if let Some(k) = &self.login.known_hosts {
            file.ssh.known_hosts = Some(abs(k));
        }
        if let Some(c) = &self.login.ssh_config {
            file.ssh.config = Some(abs(c));
        }
        if self.login.accept_new_host_keys {
            file.ssh.accept_new_host_keys = true;
        }
        if let Some(i) = &self.gridq_image {
            file.images.gridq.clone_from(i);
        }
        if let Some(i) = &self.worker_image {
            file.images.worker.clone_from(i);
        }
        if let Some(i) = &self.broker_image {
            file.images.broker.clone_from(i);
        }
        if self.pull {
            file.images.pull = true;
        }
        Ok((path, file))
    }
}

/// Prints `[place] message` lines on stderr.
fn printer() -> Progress {
    Arc::new(|place: &str, message: &str| eprintln!("[{place}] {message}"))
}

fn check_files(cluster: &Cluster) -> Result<(), Failure> {
    for (what, p) in [
        ("ssh.identity (-i)", &cluster.identity),
        ("ssh.known_hosts (--known-hosts)", &cluster.known_hosts),
    ] {
        if let Some(p) = p {
            if let Err(e) = std::fs::metadata(p) {
                return Err(Failure::Usage(format!("{what}: {}: {e}", p.display())));
            }
        }
    }
    if !cluster.project.is_dir() {
        return Err(Failure::Usage(format!(
            "project: {} is not a directory",
            cluster.project.display()
        )));
    }
    Ok(())
}

pub(crate) fn deploy(args: &DeployArgs) -> Result<(), Failure> {
    let (path, file) = args.cluster_file()?;
    let origin = if args.reuse || args.sel.config.is_some() {
        path.display().to_string()
    } else {
        "command line".to_owned()
    };
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let cluster = file
        .resolve(&base, &origin)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    check_files(&cluster)?;
    // Every run saves its configuration, so that `-f` repeats (or repairs) it.
    file.save(&path).map_err(|e| Failure::Other(e.into()))?;
    let abs_path = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    eprintln!(
        "deploying cluster {} ({} host{}); configuration saved to {}",
        cluster.name(),
        cluster.hosts.len(),
        if cluster.hosts.len() == 1 { "" } else { "s" },
        path.display()
    );
    let options = DeployOptions {
        health_timeout: args.health_timeout,
        sync: SyncOptions {
            method: match args.sync {
                SyncArg::Auto => SyncMethod::Auto,
                SyncArg::Rsync => SyncMethod::Rsync,
                SyncArg::Tar => SyncMethod::Tar,
            },
            ..SyncOptions::default()
        },
        drain: false,
    };
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let report = runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &progress).await?;
        if args.rotate_secrets {
            let rolled = lib::rotate_secrets(&fleet, &options, &progress).await;
            match rolled {
                Ok(r) if r.errors.is_empty() => println!(
                    "secrets rotated: {} worker container{} restarted",
                    r.restarted.len(),
                    if r.restarted.len() == 1 { "" } else { "s" }
                ),
                Ok(r) => {
                    fleet.close().await;
                    anyhow::bail!(
                        "rotating the secrets: {}; re-run `gridq deploy -f --rotate-secrets`",
                        r.errors.join("; ")
                    );
                }
                Err(e) => {
                    fleet.close().await;
                    return Err(e);
                }
            }
        }
        let report = lib::deploy(&fleet, &options, &progress).await;
        fleet.close().await;
        report
    })?;
    context::save_cluster(&abs_path).context("saving the CLI context")?;
    let m = &cluster.file.master;
    let master_place = lib::worker_host_name(&cluster, m.host);
    if args.sel.json {
        let doc = serde_json::json!({
            "cluster": cluster.name(),
            "cluster_file": abs_path,
            "report": report,
            "monitor": {
                "host": master_place,
                "url_on_master_host": format!("http://127.0.0.1:{}/", m.monitor_port),
            },
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        let failed: Vec<_> = report.places.iter().filter(|p| !p.ok).collect();
        println!(
            "cluster {}: {} place{} deployed, {} failed, {} container{} changed",
            cluster.name(),
            report.places.len() - failed.len(),
            if report.places.len() - failed.len() == 1 {
                ""
            } else {
                "s"
            },
            failed.len(),
            report.changed,
            if report.changed == 1 { "" } else { "s" }
        );
        for p in &failed {
            println!("  FAILED {}", p.error.as_deref().unwrap_or(&p.place));
        }
        let online: usize = report.workers_online.values().sum();
        println!("workers online: {online}");
        println!(
            "monitor: http://127.0.0.1:{}/ on {} (its loopback only)",
            m.monitor_port, master_place
        );
        println!(
            "  reach it with: gridq monitor --config {}",
            abs_path.display()
        );
        if report.token.is_some() {
            // Never on stdout by default: terminals are logged and shared.
            println!(
                "  token: kept in the master's state on {master_place}; `gridq monitor --show-token` prints it"
            );
        }
        println!("submit a sweep with: gridq submit SWEEP.yaml --watch");
    }
    if report.ok() {
        Ok(())
    } else {
        if !report.healthy {
            eprintln!(
                "error: the health check failed: not every worker came online within {}; re-run `gridq deploy -f` to repair",
                humantime::format_duration(args.health_timeout)
            );
        } else {
            eprintln!("error: some hosts failed (above); re-run `gridq deploy -f` to repair them");
        }
        Err(Failure::Silent(1))
    }
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    #[command(flatten)]
    sel: ClusterSel,
    /// How long each restarted worker may take to come online.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Let running jobs finish before each worker restarts (it takes no new job meanwhile),
    /// instead of handing them back to run again elsewhere.
    #[arg(long)]
    drain: bool,
}

pub(crate) fn update(args: &UpdateArgs) -> Result<(), Failure> {
    let (_, cluster) = args.sel.load()?;
    check_files(&cluster)?;
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let options = DeployOptions {
        health_timeout: args.health_timeout,
        sync: SyncOptions::default(),
        drain: args.drain,
    };
    let report = runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &progress).await?;
        let report = lib::update(&fleet, &options, &progress).await;
        fleet.close().await;
        report
    })?;
    if args.sel.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "updated cluster {}: {} worker container{} restarted",
            cluster.name(),
            report.restarted.len(),
            if report.restarted.len() == 1 { "" } else { "s" }
        );
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Silent(1))
    }
}

#[derive(Debug, Args)]
pub(crate) struct CleanArgs {
    #[command(flatten)]
    sel: ClusterSel,
    /// Also remove the broker's and master's volumes (queues, history) and the synced
    /// project on the hosts.
    #[arg(long)]
    purge: bool,
}

pub(crate) fn clean(args: &CleanArgs) -> Result<(), Failure> {
    let (_, cluster) = args.sel.load()?;
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let reports = runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &progress).await?;
        let reports = lib::clean(&fleet, args.purge, &progress).await;
        fleet.close().await;
        anyhow::Ok(reports)
    })?;
    if args.sel.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
    } else {
        let removed: usize = reports.iter().map(|r| r.removed.len()).sum();
        let volumes: usize = reports.iter().map(|r| r.volumes.len()).sum();
        print!(
            "cluster {}: {removed} container{} removed",
            cluster.name(),
            if removed == 1 { "" } else { "s" }
        );
        if args.purge {
            print!(
                ", {volumes} volume{} removed",
                if volumes == 1 { "" } else { "s" }
            );
        }
        println!();
    }
    // An unreachable host does not fail the clean of the others (it may be gone for good);
    // it is reported so that its containers are not forgotten.
    for r in &reports {
        if let Some(e) = &r.error {
            eprintln!("warning: not cleaned: {e}");
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct MonitorArgs {
    #[command(flatten)]
    sel: ClusterSel,
    /// The local port (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Open the URL in a browser (xdg-open).
    #[arg(long)]
    open: bool,
    /// Print the monitor's token too (to paste it into the login page).
    #[arg(long)]
    show_token: bool,
}

pub(crate) fn monitor(args: &MonitorArgs) -> Result<(), Failure> {
    let (_, cluster) = args.sel.load()?;
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = lib::quiet();
    let local = args
        .port
        .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)));
    runtime()?.block_on(async {
        let mut stop = super::services::stop_signals()?;
        let only = cluster_master_only(&cluster);
        let fleet = Fleet::connect(&only, &ssh, &progress).await?;
        let place = cluster.file.master.host;
        let api = MasterApi::open(&fleet, Instant::now() + Duration::from_secs(30), local).await?;
        let (url, token) = (&api.url, &api.token);
        if args.sel.json {
            let mut doc = serde_json::json!({"url": format!("{url}/")});
            if args.show_token {
                doc["token"] = serde_json::json!(token);
            }
            println!("{doc}");
        } else {
            println!("monitor: {url}/");
            if args.show_token {
                println!("token: {token}");
            } else {
                println!("token: not shown (--show-token prints it)");
            }
            println!(
                "(an SSH tunnel to 127.0.0.1:{} on {}; Ctrl-C closes it)",
                cluster.file.master.monitor_port,
                fleet.label(place)
            );
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if args.open {
            let _ = std::process::Command::new("xdg-open")
                .arg(format!("{url}/login"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
        }
        let _ = stop.wait_for(|n| *n >= 1).await;
        fleet.close().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The same cluster with only its master place (for commands that need only the master).
fn cluster_master_only(cluster: &Cluster) -> Cluster {
    let mut only = cluster.clone();
    let m = cluster.file.master.host;
    only.file.workers.retain(|w| w.host == m);
    if only.file.workers.is_empty() {
        only.file.workers.push(WorkerSection::on(m));
    }
    only
}

/// Which cluster a client command talks to, if any: `--cluster`, else the saved context's
/// (when the last context saved was a deploy), else ./gridq-cluster.yaml when no other
/// context is saved.
pub(crate) fn cluster_for(conn: &MasterConn) -> Option<PathBuf> {
    if let Some(c) = &conn.cluster {
        return Some(c.clone());
    }
    match context::load() {
        Some(saved) => saved.cluster.filter(|c| c.exists()),
        None => {
            let here = PathBuf::from(CLUSTER_FILE);
            here.exists().then_some(here)
        }
    }
}

/// Keeps a tunnel to a deployed master open (on its own thread) while it lives.
#[derive(Debug)]
pub(crate) struct TunnelGuard {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Opens a tunnel to a deployed cluster's master; returns its URL, the token and the guard.
pub(crate) fn open_master(file: &Path) -> Result<(String, String, TunnelGuard), Failure> {
    let cluster = load_cluster(file)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, String), String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("gridq-tunnel".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let ssh = lib::ssh_options(&cluster, &SshOptions::default());
                let only = cluster_master_only(&cluster);
                let fleet = match Fleet::connect(&only, &ssh, &lib::quiet()).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                match MasterApi::open(&fleet, Instant::now() + Duration::from_secs(10), None).await
                {
                    Ok(api) => {
                        let _ = ready_tx.send(Ok((api.url.clone(), api.token.clone())));
                        let _ = stop_rx.await;
                        drop(api);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!(
                            "cluster {} ({}): cannot reach its master: {e:#}",
                            cluster.name(),
                            file_display(&cluster)
                        )));
                    }
                }
                fleet.close().await;
            });
        })
        .map_err(|e| Failure::Other(e.into()))?;
    match ready_rx.recv() {
        Ok(Ok((url, token))) => Ok((
            url,
            token,
            TunnelGuard {
                stop: Some(stop_tx),
            },
        )),
        Ok(Err(e)) => Err(Failure::Other(anyhow::anyhow!(e))),
        Err(_) => Err(Failure::Other(anyhow::anyhow!("the tunnel thread ended"))),
    }
}

fn file_display(cluster: &Cluster) -> String {
    cluster.project.join(CLUSTER_FILE).display().to_string()
}

/// `gridq status` for a deployed cluster.
pub(crate) fn status(file: &Path, json: bool) -> Result<(), Failure> {
    let cluster = load_cluster(file)?;
    let ssh = lib::ssh_options(&cluster, &SshOptions::default());
    let st = runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &lib::quiet()).await?;
        let st = lib::status(&fleet).await;
        fleet.close().await;
        anyhow::Ok(st)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
        return Ok(());
    }
    println!("cluster {}", st.cluster);
    println!();
    println!(
        "{:<36} {:<21} {:<32} {:<8} STATUS",
        "HOST", "ROLES", "CONTAINER", "STATE"
    );
    for p in &st.places {
        let roles = p.roles.join(",");
        if let Some(e) = &p.error {
            println!("{:<36} {:<21} unreachable: {e}", p.place, roles);
            continue;
        }
        if p.containers.is_empty() {
            println!("{:<36} {:<21} {:<32} {:<8}", p.place, roles, "(none)", "-");
        }
        for c in &p.containers {
            println!(
                "{:<36} {:<21} {:<32} {:<8} {}",
                p.place, roles, c.name, c.state, c.status
            );
        }
    }
    println!();
    match (&st.master, &st.master_error) {
        (Some(m), _) => {
            let online = m["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| matches!(w["state"].as_str(), Some("online" | "draining")))
                .count();
            println!(
                "master: {online} worker{} online",
                if online == 1 { "" } else { "s" }
            );
            super::client::print_workers(&m["workers"]);
            if let Some(queues) = m["queues"]["queues"].as_array() {
                println!();
                println!("{:<40} {:>8} {:>8}", "QUEUE", "READY", "UNACKED");
                for q in queues {
                    println!(
                        "{:<40} {:>8} {:>8}",
                        q["name"].as_str().unwrap_or(""),
                        q["ready"].as_u64().unwrap_or(0),
                        q["unacked"].as_u64().unwrap_or(0)
                    );
                }
            }
            println!();
            super::client::print_broker(&m["broker"]);
            super::client::print_sweeps(&m["sweeps"]);
        }
        (None, Some(e)) => println!("master: not reachable: {e}"),
        (None, None) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_directories() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("My Project!");
        std::fs::create_dir(&p).unwrap();
        assert_eq!(name_from(&p), "my-project-");
        let p = dir.path().join("_x");
        std::fs::create_dir(&p).unwrap();
        assert_eq!(name_from(&p), "g_x");
    }
}
