//! `gridq deploy`, `update`, `clean`, `monitor`, and `status` of a deployed cluster: flags
//! (mlframework's `-a -i -r -d -m -w -f`) and the cluster file turned into a
//! [`Cluster`], then the library in [`crate::cluster`], with per-host progress lines on
//! stderr and a summary (or `--json`) on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use gridq_common::human;

use super::Failure;
use super::client::MasterConn;
use super::context;
use super::services::runtime;
use crate::cluster::binary::Binary;
use crate::cluster::config::{
    CLUSTER_FILE, Cluster, ClusterFile, Gpus, HostRef, ImagesSection, MasterSection, SshSection,
    SyncSection, WorkerSection,
};
use crate::cluster::{self as lib, DeployOptions, Fleet, MasterApi, Progress};
use crate::ssh::SshOptions;
use crate::sync::{SyncMethod, SyncOptions};

/// Which cluster file: `--config FILE`, else `PROJECT/gridq-cluster.yaml`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClusterSel {
    /// The cluster file (default: gridq-cluster.yaml in the project directory).
    #[arg(long = "config", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The project directory (mlframework's -d).
    #[arg(short = 'd', long = "project", value_name = "DIR", default_value = ".")]
    pub(crate) project: PathBuf,
    /// How long connecting to a host may take.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,
    /// Machine-readable JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

impl ClusterSel {
    pub(crate) fn path(&self) -> PathBuf {
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

/// Loads and checks a cluster file; a bad one is a usage error naming it.
pub(crate) fn load_cluster(path: &Path) -> Result<Cluster, Failure> {
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
    /// The image the workers and their jobs run in: the project's own (e.g. its PyTorch and
    /// CUDA image), unchanged; gridq is mounted into it as one static binary. Hosts that have
    /// it use theirs; otherwise --pull pulls it, or it is sent once from this machine.
    #[arg(long, env = "GRIDQ_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// The static gridq binary to put on the hosts (default: this gridq, when it is
    /// statically linked; scripts/release.sh builds one).
    #[arg(long, env = "GRIDQ_BINARY")]
    gridq_binary: Option<PathBuf>,
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
    /// Send what `.gitignore` files (and `.git/info/exclude`, git's global excludes) leave
    /// out, too; `.gridqignore` files still apply. Saved in the cluster file (`sync:
    /// gitignore: false`), so that `update` sends the same selection.
    #[arg(long)]
    no_gitignore: bool,
    /// Remove from the hosts' project directory the files removed here (only there; never
    /// `.gridq/`, where job outputs are, nor files the ignore rules leave out).
    #[arg(long)]
    delete: bool,
    /// Replace running workers whose container changed (a new gridq binary, other slots or
    /// GPUs) at once, handing their running jobs back. By default their jobs finish first.
    #[arg(long)]
    now: bool,
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
                worker_image: None,
                gridq_binary: None,
                sync: SyncSection::default(),
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
        if let Some(i) = &self.worker_image {
            file.worker_image = Some(i.clone());
        }
        if let Some(b) = &self.gridq_binary {
            file.gridq_binary = Some(abs(b));
        }
        if self.no_gitignore {
            file.sync.gitignore = false;
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
    if cluster.file.worker_image.is_none() {
        return Err(Failure::Usage(
            "--worker-image IMAGE: the image the workers and their jobs run in is required (your project's own, e.g. its CUDA and Python image; gridq is mounted into it); `worker_image:` in the cluster file".into(),
        ));
    }
    let binary = Binary::locate(cluster.gridq_binary.as_deref())
        .map_err(|e| Failure::Usage(format!("{e:#}")))?;
    // The configuration is saved once the deploy checks passed, so that a deploy they refuse
    // (a host unreachable, a key refused) leaves the saved one as it was for `-f`, `status`
    // and `clean`. A first deploy saves it up front all the same, so that `clean` finds what
    // an interrupted one started; it is removed again when the checks refuse the deploy.
    let first = !path.exists();
    if first {
        file.save(&path).map_err(|e| Failure::Other(e.into()))?;
    }
    let abs_path = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    eprintln!(
        "deploying cluster {} ({} host{})",
        cluster.name(),
        cluster.hosts.len(),
        if cluster.hosts.len() == 1 { "" } else { "s" },
    );
    let options = DeployOptions {
        health_timeout: args.health_timeout,
        sync: SyncOptions {
            method: match args.sync {
                SyncArg::Auto => SyncMethod::Auto,
                SyncArg::Rsync => SyncMethod::Rsync,
                SyncArg::Tar => SyncMethod::Tar,
            },
            gitignore: cluster.file.sync.gitignore,
            delete: args.delete,
            ..SyncOptions::default()
        },
        now: args.now,
        binary: Some(Arc::new(binary)),
    };
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let outcome = runtime()?.block_on(async {
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
    });
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            if first {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e.into());
        }
    };
    // A failure after the checks is reported per place and repaired with `-f`: saved.
    file.save(&path).map_err(|e| Failure::Other(e.into()))?;
    eprintln!("configuration saved to {}", path.display());
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
        for p in report.places.iter().filter(|p| p.ok) {
            println!(
                "  {}: sent {} (images {}, gridq binary {})",
                p.place,
                human::bytes(p.sent.images + p.sent.binary),
                human::bytes(p.sent.images),
                human::bytes(p.sent.binary)
            );
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
    /// Restart each worker right away, handing its running jobs back (they run again
    /// elsewhere as new attempts), one worker at a time. By default running jobs finish
    /// first: a worker being replaced takes no new job, and restarts once its jobs ended.
    #[arg(long)]
    now: bool,
    /// The default (running jobs finish first); kept for scripts written for older versions.
    #[arg(long, hide = true, conflicts_with = "now")]
    drain: bool,
    /// The static gridq binary to put on the hosts (default: this gridq, when it is
    /// statically linked; the cluster file's `gridq_binary`).
    #[arg(long, env = "GRIDQ_BINARY")]
    gridq_binary: Option<PathBuf>,
    /// Send what `.gitignore` files (and `.git/info/exclude`, git's global excludes) leave
    /// out, too; `.gridqignore` files still apply.
    #[arg(long)]
    no_gitignore: bool,
    /// Remove from the hosts' project directory the files removed here (only there; never
    /// `.gridq/`, where job outputs are, nor files the ignore rules leave out).
    #[arg(long)]
    delete: bool,
}

pub(crate) fn update(args: &UpdateArgs) -> Result<(), Failure> {
    let (_, cluster) = args.sel.load()?;
    check_files(&cluster)?;
    let configured = args
        .gridq_binary
        .as_deref()
        .or(cluster.gridq_binary.as_deref());
    let binary = Binary::locate(configured).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let options = DeployOptions {
        health_timeout: args.health_timeout,
        sync: SyncOptions {
            gitignore: cluster.file.sync.gitignore && !args.no_gitignore,
            delete: args.delete,
            ..SyncOptions::default()
        },
        now: args.now,
        binary: Some(Arc::new(binary)),
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
        for (place, sent) in &report.sent {
            println!(
                "  {place}: sent {} (images {}, gridq binary {})",
                human::bytes(sent.images + sent.binary),
                human::bytes(sent.images),
                human::bytes(sent.binary)
            );
        }
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
    /// project on the hosts, job outputs (`.gridq/out`) included. It lists what it will
    /// delete and asks first.
    #[arg(long)]
    purge: bool,
    /// With --purge: delete without asking (needed where there is no terminal to ask on).
    #[arg(long, short = 'y')]
    yes: bool,
}

/// Prints what `clean --purge` would delete, per place, on standard error.
fn print_purge_plan(plans: &[lib::PurgePlan]) {
    eprintln!("gridq clean --purge deletes:");
    for p in plans {
        if let Some(e) = &p.error {
            eprintln!("  [{}] not reachable, nothing deleted there: {e}", p.place);
            continue;
        }
        let mut what = Vec::new();
        if !p.containers.is_empty() {
            what.push(format!("containers {}", p.containers.join(", ")));
        }
        if !p.volumes.is_empty() {
            what.push(format!("volumes {}", p.volumes.join(", ")));
        }
        if let Some(project) = &p.project {
            let outputs = match p.outputs {
                Some((0, _)) => "no job outputs".to_owned(),
                Some((files, bytes)) => format!(
                    "job outputs: {files} file{} ({bytes} bytes) in .gridq/out",
                    if files == 1 { "" } else { "s" }
                ),
                None => "job outputs in .gridq/out (not counted)".to_owned(),
            };
            what.push(format!("the synced project {project}, with its {outputs}"));
        }
        if what.is_empty() {
            what.push("nothing".to_owned());
        }
        eprintln!("  [{}] {}", p.place, what.join("; "));
    }
}

/// Asks on the terminal; true for `y` or `yes`.
fn confirm(question: &str) -> bool {
    use std::io::Write as _;
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

pub(crate) fn clean(args: &CleanArgs) -> Result<(), Failure> {
    use std::io::IsTerminal as _;
    let (_, cluster) = args.sel.load()?;
    let ssh = lib::ssh_options(&cluster, &args.sel.ssh());
    let progress = printer();
    let ask = args.purge && !args.yes;
    let terminal = std::io::stdin().is_terminal();
    let reports = runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &progress).await?;
        if ask {
            // What will go, before anything goes.
            print_purge_plan(&lib::purge_plan(&fleet).await);
            let go = terminal
                && tokio::task::spawn_blocking(|| confirm("Delete all of this?"))
                    .await
                    .unwrap_or(false);
            if !go {
                fleet.close().await;
                return Ok(None);
            }
        }
        let reports = lib::clean(&fleet, args.purge, &progress).await;
        fleet.close().await;
        anyhow::Ok(Some(reports))
    })?;
    let Some(reports) = reports else {
        if !terminal {
            return Err(Failure::Usage(
                "clean --purge: nothing was deleted; it asks before it deletes what is listed above (job outputs included), and there is no terminal to ask on: pass --yes to purge without asking".into(),
            ));
        }
        eprintln!("nothing was deleted");
        return Err(Failure::Silent(1));
    };
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
    if !args.purge {
        // What a plain clean leaves, and how to get it or remove it.
        let note = format!(
            "job outputs kept: on the worker hosts in {}/.gridq/out (with the synced project); `gridq pull SWEEP` fetches them, `gridq clean --purge` deletes them",
            cluster.file.remote_path
        );
        if args.sel.json {
            eprintln!("{note}");
        } else {
            println!("{note}");
        }
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
    /// Use the saved configuration (the project's gridq-cluster.yaml; the default without
    /// --config), as `gridq deploy -f` does.
    #[arg(short = 'f')]
    saved: bool,
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
    // `-f` names the default (the project's saved file), as deploy's does.
    let _ = args.saved;
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
        // The tunnel holds the master host's session: closed first, so that every ssh master
        // is asked to exit (and waited for) before gridq does.
        drop(api);
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

/// Keeps a tunnel to a deployed master open (on its own thread) while it lives. Dropping it
/// closes the tunnel and waits for the thread: the ssh master and its control directory are
/// gone before the command returns.
#[derive(Debug)]
pub(crate) struct TunnelGuard {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a tunnel to a deployed cluster's master; returns its URL, the token and the guard.
pub(crate) fn open_master(file: &Path) -> Result<(String, String, TunnelGuard), Failure> {
    let cluster = load_cluster(file)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, String), String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
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
                        // Until the guard goes (or its command ends without dropping it).
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
    let guard = TunnelGuard {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    match ready_rx.recv() {
        Ok(Ok((url, token))) => Ok((url, token, guard)),
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
            let workers = m["workers"].as_array().map_or(&[][..], Vec::as_slice);
            let online = workers.iter().filter(|w| super::client::is_live(w)).count();
            let lost = workers.iter().filter(|w| w["state"] == "lost").count();
            println!(
                "master: {online} worker{} online, {lost} lost",
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
