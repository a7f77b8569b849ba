//! A gridq cluster on the team's machines: `gridq deploy`, `status`, `update`, `clean` and
//! `monitor`, as a library.
//!
//! - [`config`]: the cluster file and its checks.
//! - [`plan`]: the containers of each place (broker, master, workers) and the broker secrets.
//! - [`containers`]: labelled containers made to match their spec, idempotently.
//! - this module: [`Fleet`] (SSH and Docker connections to every place, made in parallel) and
//!   the operations, each reporting per place through a [`Progress`] callback.
//!
//! A *place* is where a role runs: a host of the list (over SSH; Docker through
//! `docker system dial-stdio` on the same multiplexed connection) or this machine.

pub mod binary;
pub mod config;
pub mod containers;
pub mod plan;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use self::binary::Binary;
use self::config::{Cluster, Gpus, HostRef};
use self::containers::{ContainerSpec, Found, Outcome, Role};
use self::plan::{Keys, Secrets, WorkerFacts};
use crate::docker::{DockerHost, ImageOutcome};
use crate::ssh::{HostSession, Sessions, SshOptions};
use crate::sync::{SyncOptions, remote_abs_path, sync_project};

/// Receives progress lines: the place's label and what happened there.
pub type Progress = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A progress sink that drops everything.
pub fn quiet() -> Progress {
    Arc::new(|_, _| {})
}

/// A connected place.
#[derive(Debug)]
pub struct PlaceConn {
    /// Where.
    pub place: HostRef,
    /// `host N [user@]addr[:port]` or `local`.
    pub label: String,
    /// The SSH session (none for local).
    pub session: Option<Arc<HostSession>>,
    /// Its Docker engine.
    pub docker: DockerHost,
}

/// A place with its connection, or why it has none.
pub type PlaceEntry = (HostRef, Result<Arc<PlaceConn>, String>);

/// Connections to every place of a cluster, made in parallel. A place that cannot be reached
/// keeps its error; the others are unaffected.
#[derive(Debug)]
pub struct Fleet {
    /// The cluster.
    pub cluster: Cluster,
    /// Each place with its connection or the reason it has none, master first.
    pub places: Vec<PlaceEntry>,
    /// This machine's engine, where images come from (when it has one).
    pub local: Option<DockerHost>,
    sessions: Option<Sessions>,
}

/// The SSH options a cluster file asks for, on top of `base` (timeouts, parallelism).
pub fn ssh_options(cluster: &Cluster, base: &SshOptions) -> SshOptions {
    let mut o = base.clone();
    if cluster.identity.is_some() {
        o.identity.clone_from(&cluster.identity);
    }
    if cluster.known_hosts.is_some() {
        o.known_hosts.clone_from(&cluster.known_hosts);
    }
    if cluster.ssh_config.is_some() {
        o.config_file.clone_from(&cluster.ssh_config);
    }
    if cluster.file.ssh.accept_new_host_keys {
        o.host_keys = crate::ssh::HostKeyPolicy::AcceptNew;
    }
    o
}

impl Fleet {
    /// Logs in to every remote place and opens its Docker engine, in parallel.
    ///
    /// # Errors
    /// Only when the SSH control directory cannot be made; per-place failures are kept in
    /// [`Fleet::places`].
    pub async fn connect(
        cluster: &Cluster,
        ssh: &SshOptions,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let remote = cluster.remote_hosts();
        let sessions = if remote.is_empty() {
            None
        } else {
            Some(Sessions::connect(&remote, ssh).await?)
        };
        let local = crate::docker::local().await.ok();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, place) in cluster.places().into_iter().enumerate() {
            let label = cluster.place_label(place);
            let session = match (place, &sessions) {
                (HostRef::Local, _) => None,
                (HostRef::Index(n), Some(s)) => Some(
                    s.connections()
                        .iter()
                        .find(|(h, _)| h.index == n)
                        .map(|(_, c)| c.clone())
                        .unwrap_or_else(|| {
                            Err(crate::ssh::SshError::Other {
                                host: label.clone(),
                                detail: "not connected".into(),
                            })
                        }),
                ),
                (HostRef::Index(_), None) => None,
            };
            let progress = progress.clone();
            tasks.spawn(async move {
                let conn = match session {
                    None => crate::docker::local()
                        .await
                        .map(|docker| PlaceConn {
                            place,
                            label: "local".into(),
                            session: None,
                            docker,
                        })
                        .map_err(|e| e.to_string()),
                    Some(Err(e)) => Err(e.to_string()),
                    Some(Ok(session)) => {
                        let label = session.who();
                        match crate::docker::over_ssh(Arc::clone(&session)).await {
                            Ok(docker) => Ok(PlaceConn {
                                place,
                                label,
                                session: Some(session),
                                docker,
                            }),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                };
                match &conn {
                    Ok(c) => progress(&c.label, "connected (ssh, docker)"),
                    Err(e) => progress(&label, &format!("unreachable: {e}")),
                }
                (i, place, conn.map(Arc::new))
            });
        }
        let mut places: Vec<Option<PlaceEntry>> =
            (0..cluster.places().len()).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, place, conn) = joined?;
            places[i] = Some((place, conn));
        }
        Ok(Self {
            cluster: cluster.clone(),
            places: places.into_iter().flatten().collect(),
            local,
            sessions,
        })
    }

    /// The connection of a place, if it has one.
    pub fn conn(&self, place: HostRef) -> Option<&Arc<PlaceConn>> {
        self.places
            .iter()
            .find(|(p, _)| *p == place)
            .and_then(|(_, c)| c.as_ref().ok())
    }

    /// The error of a place, if it has no connection.
    pub fn error(&self, place: HostRef) -> Option<&str> {
        self.places
            .iter()
            .find(|(p, _)| *p == place)
            .and_then(|(_, c)| c.as_ref().err().map(String::as_str))
    }

    /// The label of a place.
    pub fn label(&self, place: HostRef) -> String {
        self.conn(place).map_or_else(
            || {
                self.cluster
                    .host(place)
                    .map_or_else(|| "local".into(), crate::ssh::who)
            },
            |c| c.label.clone(),
        )
    }

    /// Ends every SSH connection.
    pub async fn close(self) {
        drop(self.places);
        if let Some(s) = self.sessions {
            s.close().await;
        }
    }
}

/// How a deploy went at one place.
#[derive(Debug, Clone, Serialize)]
pub struct PlaceReport {
    /// `host N ...` or `local`.
    pub place: String,
    /// Whether everything there is in place.
    pub ok: bool,
    /// What was done, in order.
    pub steps: Vec<String>,
    /// What failed, naming the host.
    pub error: Option<String>,
    /// What was sent there, in bytes.
    pub sent: Sent,
}

/// Bytes sent to one place by a deploy or an update (the project's own sync aside).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sent {
    /// Images streamed from this machine (`docker save`/`load`), the master's runtime image
    /// included.
    pub images: u64,
    /// The static gridq binary.
    pub binary: u64,
}

impl Sent {
    fn add(&mut self, other: Sent) {
        self.images += other.images;
        self.binary += other.binary;
    }
}

/// The outcome of a deploy.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// Per place.
    pub places: Vec<PlaceReport>,
    /// Containers created, replaced or started (zero on a re-run with nothing changed).
    pub changed: usize,
    /// Workers the master sees online, per host.
    pub workers_online: BTreeMap<String, usize>,
    /// The monitor's token (read from the master's state volume).
    #[serde(skip)]
    pub token: Option<String>,
    /// Whether the health check passed.
    pub healthy: bool,
}

impl DeployReport {
    /// Whether every place is in place and the health check passed.
    pub fn ok(&self) -> bool {
        self.healthy && self.places.iter().all(|p| p.ok)
    }
}

/// Options of `deploy` and `update`.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// How long workers may take to come online.
    pub health_timeout: Duration,
    /// How the project is synced.
    pub sync: SyncOptions,
    /// `update` only: restart each worker at once, handing its running jobs back (they run
    /// again elsewhere), instead of letting them finish first.
    pub now: bool,
    /// The static gridq binary to place on the hosts.
    pub binary: Option<Arc<Binary>>,
}

impl DeployOptions {
    fn binary(&self) -> anyhow::Result<&Binary> {
        self.binary
            .as_deref()
            .context("no gridq binary was located for this deploy")
    }
}

/// Checks every place before anything starts: reachable, Docker usable, GPUs where wanted,
/// the master's ports free (or held by this cluster's own containers). Returns the GPUs to
/// use per worker place, or every failure, each naming its host.
///
/// # Errors
/// The list of failures.
pub async fn preflight(fleet: &Fleet) -> Result<HashMap<HostRef, Vec<u32>>, Vec<String>> {
    let cluster = &fleet.cluster;
    let mut failures = Vec::new();
    for (_, conn) in &fleet.places {
        if let Err(e) = conn {
            failures.push(e.clone());
        }
    }
    let mut gpus = HashMap::new();
    for (place, result) in worker_gpus(fleet).await {
        match result {
            Ok(g) => {
                gpus.insert(place, g);
            }
            Err(e) => failures.push(e),
        }
    }
    let m = &cluster.file.master;
    if let Some(conn) = fleet.conn(m.host) {
        let ours = containers::list(conn.docker.docker(), cluster.name(), None)
            .await
            .map(|found| {
                found
                    .into_iter()
                    .filter(|c| c.state == "running")
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let broker_ours = ours.contains(&plan::broker_name(cluster.name()));
        let master_ours = ours.contains(&plan::master_name(cluster.name()));
        match listening_ports(conn).await {
            Ok(listening) => {
                let ports = [
                    ("master.broker_port (AMQP)", m.broker_port, broker_ours),
                    (
                        "master.management_port (RabbitMQ management)",
                        m.management_port,
                        broker_ours,
                    ),
                    ("master.monitor_port (monitor)", m.monitor_port, master_ours),
                ];
                for (what, port, ours) in ports {
                    if !ours && listening.contains(&port) {
                        failures.push(format!(
                            "{}: port {port} is taken ({what}): another program listens on it; stop it or pick another port in the cluster file",
                            conn.label
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: cannot list listening ports: {e}", conn.label)),
        }
    }
    if failures.is_empty() {
        Ok(gpus)
    } else {
        failures.sort();
        failures.dedup();
        Err(failures)
    }
}

/// The GPUs each connected worker place gets, from its `gpus` setting and what the host has,
/// or why its setting cannot be met (naming the host).
async fn worker_gpus(fleet: &Fleet) -> HashMap<HostRef, Result<Vec<u32>, String>> {
    let cluster = &fleet.cluster;
    let mut gpus = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, w) in cluster.file.workers.iter().enumerate() {
        let Some(conn) = fleet.conn(w.host).cloned() else {
            continue;
        };
        let want = w.gpus.clone();
        tasks.spawn(async move {
            let found = detect_gpus(&conn).await;
            let field = format!("workers[{}].gpus", i + 1);
            let result = match (want, found) {
                (Gpus::None, _) => Ok(Vec::new()),
                (Gpus::Auto, Ok(g)) => Ok(g),
                (Gpus::Auto, Err(_)) => Ok(Vec::new()),
                (Gpus::All, Ok(g)) if !g.is_empty() => Ok(g),
                (Gpus::All, Ok(_)) => Err(format!(
                    "{}: {field} is `all` but nvidia-smi lists no GPU there",
                    conn.label
                )),
                (Gpus::List(l), Ok(g)) => match l.iter().find(|i| !g.contains(i)) {
                    None => Ok(l),
                    Some(missing) => Err(format!(
                        "{}: {field} asks for GPU {missing}, but the host has GPUs {g:?}",
                        conn.label
                    )),
                },
                (_, Err(e)) => Err(format!("{}: {field}: {e}", conn.label)),
            };
            (conn.place, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        // A check task cannot panic short of a bug; its place then keeps no entry and is
        // treated as unconnected.
        if let Ok((place, result)) = joined {
            gpus.insert(place, result);
        }
    }
    gpus
}

/// GPUs on a place: the NVIDIA runtime must be in `docker info`, and `nvidia-smi` lists them.
async fn detect_gpus(conn: &PlaceConn) -> Result<Vec<u32>, String> {
    let info = conn
        .docker
        .docker()
        .info()
        .await
        .map_err(|e| format!("docker info: {e}"))?;
    let has_runtime = info
        .runtimes
        .as_ref()
        .is_some_and(|r| r.keys().any(|k| k.contains("nvidia")));
    if !has_runtime {
        return Err("Docker has no NVIDIA runtime: install the NVIDIA Container Toolkit and run `nvidia-ctk runtime configure --runtime=docker`".into());
    }
    let argv = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"];
    let out = run_at(conn, &argv).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .collect())
}

/// Runs a fixed argv at a place and returns its standard output; a nonzero exit is an error.
async fn run_at(conn: &PlaceConn, argv: &[&str]) -> Result<String, String> {
    run_at_with_input(conn, argv, None).await
}

/// [`run_at`] with `input`, when given, on the program's standard input (a secret that must
/// not be on a command line).
async fn run_at_with_input(
    conn: &PlaceConn,
    argv: &[&str],
    input: Option<&[u8]>,
) -> Result<String, String> {
    match &conn.session {
        Some(session) => {
            let deadline = Some(Duration::from_secs(60));
            let out = match input {
                Some(bytes) => session.run_with_input(argv, bytes, deadline).await,
                None => session.run(argv, deadline).await,
            }
            .map_err(|e| e.to_string())?;
            if out.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "{} exited with {}: {}",
                    argv[0],
                    out.code,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
        None => {
            use tokio::io::AsyncWriteExt as _;
            let mut child = tokio::process::Command::new(argv[0])
                .args(&argv[1..])
                .stdin(if input.is_some() {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
                let _ = stdin.write_all(bytes).await;
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "{} failed: {}",
                    argv[0],
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }
}

/// TCP ports something listens on at a place (any address), from /proc/net/tcp{,6}.
async fn listening_ports(conn: &PlaceConn) -> Result<Vec<u16>, String> {
    let text = run_at(conn, &["cat", "/proc/net/tcp", "/proc/net/tcp6"]).await?;
    Ok(parse_listening(&text))
}

fn parse_listening(text: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None;
            }
            let port = local.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The broker credentials (the secrets file, else the running broker's definitions, else
/// new; a role user missing from them gets a password) and the cluster's TLS files (its CA,
/// made once and kept on this machine, and the broker's certificate, reissued when its
/// addresses change or it has less than 30 days left).
async fn keys(fleet: &Fleet) -> anyhow::Result<(Keys, String)> {
    let path = fleet.cluster.secrets_path();
    let (mut secrets, mut how) = match Secrets::load(&path).map_err(anyhow::Error::msg)? {
        Some(s) => (s, "kept"),
        None => (recovered_secrets(fleet).await, "recovered from the broker"),
    };
    if secrets.passwords.is_empty() && how != "kept" {
        how = "generated";
    }
    if secrets.ensure_users(&fleet.cluster) || how != "kept" {
        secrets.save(&path).map_err(anyhow::Error::msg)?;
    }
    let dir = path.with_file_name(format!("cluster-{}.tls", fleet.cluster.name()));
    let month = std::time::Duration::from_secs(30 * 24 * 3600);
    let addresses = plan::broker_addresses(&fleet.cluster);
    let (files, issued) = crate::pki::ensure(&dir, fleet.cluster.name(), &addresses, month)?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = plan::Tls {
        ca_cert: read(&files.ca_cert)?,
        server_cert: read(&files.server_cert)?,
        server_key: read(&files.server_key)?,
    };
    let note = format!(
        "broker credentials {how} ({}); broker certificate {} for {} ({})",
        path.display(),
        if issued { "issued" } else { "kept" },
        addresses.join(", "),
        dir.display()
    );
    Ok((Keys { secrets, tls }, note))
}

/// `gridq deploy --rotate-secrets`, before the deploy that finishes it: new passwords for
/// every broker user and a new broker certificate, with no job lost.
///
/// 1. The running broker takes the new passwords at once (`rabbitmqctl change_password`, the
///    password on its standard input); connections opened with the old ones stay up.
/// 2. The workers restart one at a time with their new credentials ([`update`]): each hands
///    its running jobs back over its still-open connection before it stops.
/// 3. The deploy that follows replaces the master and then the broker (new definitions, new
///    certificate); everyone reconnects with the new passwords.
///
/// # Errors
/// When the broker cannot take a password (the secrets file is written only once every user's
/// password was changed, so a re-run starts over with new ones for all), and [`update`]'s.
pub async fn rotate_secrets(
    fleet: &Fleet,
    options: &DeployOptions,
    progress: &Progress,
) -> anyhow::Result<UpdateReport> {
    let cluster = &fleet.cluster;
    let (keys, _) = keys(fleet).await?;
    let mut secrets = keys.secrets.clone();
    secrets.rotate();
    let master = cluster.file.master.host;
    let conn = fleet
        .conn(master)
        .ok_or_else(|| anyhow::anyhow!("{}: unreachable", cluster.place_label(master)))?;
    let broker = plan::broker_name(cluster.name());
    let running = containers::list(conn.docker.docker(), cluster.name(), None)
        .await?
        .into_iter()
        .any(|c| c.name == broker && c.state == "running");
    if running {
        for (user, password) in &secrets.passwords {
            let argv = [
                "docker",
                "exec",
                "-i",
                "-u",
                "rabbitmq",
                "-e",
                "HOME=/var/lib/rabbitmq",
                broker.as_str(),
                "rabbitmqctl",
                "--quiet",
                "change_password",
                user.as_str(),
            ];
            run_at_with_input(conn, &argv, Some(format!("{password}\n").as_bytes()))
                .await
                .map_err(|e| anyhow::anyhow!("{}: changing {user}'s password: {e}", conn.label))?;
        }
    }
    secrets
        .save(&cluster.secrets_path())
        .map_err(anyhow::Error::msg)?;
    // The next call of `keys` issues the broker a new certificate (and key).
    let tls = cluster
        .secrets_path()
        .with_file_name(format!("cluster-{}.tls", cluster.name()));
    let _ = std::fs::remove_file(crate::pki::TlsFiles::in_dir(&tls).server_cert);
    progress(
        &conn.label,
        &format!(
            "{} broker passwords rotated{}; restarting the workers one at a time",
            secrets.passwords.len(),
            if running {
                " on the running broker"
            } else {
                ""
            }
        ),
    );
    update(fleet, options, progress).await
}

/// The role users' passwords from the running broker's definitions, else new ones.
async fn recovered_secrets(fleet: &Fleet) -> Secrets {
    if let Some(conn) = fleet.conn(fleet.cluster.file.master.host) {
        let defs = containers::read_file(
            conn.docker.docker(),
            &plan::broker_name(fleet.cluster.name()),
            &format!("{}/{}", plan::BROKER_CONF_DIR, plan::BROKER_DEFINITIONS),
        )
        .await
        .ok()
        .flatten();
        if let Some(s) = defs.as_deref().and_then(Secrets::from_definitions) {
            return s;
        }
    }
    Secrets::generate()
}

/// Makes sure `image` is on a place's engine (streamed from this machine, or pulled) and
/// returns its ID there and the bytes sent.
async fn image_at(
    fleet: &Fleet,
    conn: &PlaceConn,
    image: &str,
    progress: &Progress,
) -> anyhow::Result<(String, u64)> {
    if fleet.cluster.file.images.pull {
        if let Some(id) = conn.docker.image_id(image).await? {
            return Ok((id, 0));
        }
        progress(&conn.label, &format!("pulling {image}"));
        return Ok((crate::docker::pull_image(&conn.docker, image).await?, 0));
    }
    // An image the place has and this machine does not (the team's image, pulled there by
    // hand): used as it is.
    let local_has = match &fleet.local {
        Some(local) => local.image_id(image).await?.is_some(),
        None => false,
    };
    if !local_has {
        if let Some(id) = conn.docker.image_id(image).await? {
            return Ok((id, 0));
        }
    }
    let Some(local) = &fleet.local else {
        anyhow::bail!(
            "{}: image {image} is needed there and this machine has no Docker engine to send it from (or pass --pull)",
            conn.label
        );
    };
    let label = conn.label.clone();
    let p = progress.clone();
    let mut last = 0u64;
    let (id, outcome) = crate::docker::ensure_image(local, &conn.docker, image, move |sent| {
        if sent >= last + 64 * 1024 * 1024 {
            last = sent;
            p(&label, &format!("sending {image}: {} MiB", sent >> 20));
        }
    })
    .await?;
    let mut sent = 0;
    if let ImageOutcome::Transferred { bytes } = outcome {
        progress(
            &conn.label,
            &format!("image {image} sent ({} MiB)", bytes >> 20),
        );
        sent = bytes;
    }
    Ok((id, sent))
}

/// Where a place keeps gridq binaries: `.gridq/bin` under the project's remote path (this
/// machine: under the project).
async fn bin_dir(fleet: &Fleet, conn: &PlaceConn) -> anyhow::Result<String> {
    let base = match &conn.session {
        None => std::fs::canonicalize(&fleet.cluster.project)?
            .to_string_lossy()
            .into_owned(),
        Some(session) => remote_abs_path(session, &fleet.cluster.file.remote_path).await?,
    };
    Ok(format!("{base}/.gridq/bin"))
}

/// Places the static binary at a place (once per content); returns its path there.
async fn binary_at(
    fleet: &Fleet,
    conn: &PlaceConn,
    binary: &Binary,
    sent: &mut Sent,
    progress: &Progress,
) -> anyhow::Result<String> {
    let dir = bin_dir(fleet, conn).await?;
    let (path, bytes) = binary::place_binary(conn, &dir, binary).await?;
    if bytes > 0 {
        progress(
            &conn.label,
            &format!("gridq binary sent to {path} ({} MiB)", bytes >> 20),
        );
    }
    sent.binary += bytes;
    Ok(path)
}

/// A worker place's facts for its specs: its image, project, binary, user and GPUs.
async fn worker_facts(
    fleet: &Fleet,
    conn: &PlaceConn,
    gpus: Vec<u32>,
    options: &DeployOptions,
    sent: &mut Sent,
    progress: &Progress,
) -> anyhow::Result<WorkerFacts> {
    let cluster = &fleet.cluster;
    let image = cluster.file.worker_image.as_deref().context(
        "worker_image: no image given for the workers (--worker-image IMAGE: the image your jobs run in)",
    )?;
    let (image_id, bytes) = image_at(fleet, conn, image, progress).await?;
    sent.images += bytes;
    let project_dir = project_at(fleet, conn, &options.sync, progress).await?;
    let binary = binary_at(fleet, conn, options.binary()?, sent, progress).await?;
    let user = user_ids(conn).await.map_err(anyhow::Error::msg)?;
    Ok(WorkerFacts {
        user: Some(user),
        project_dir,
        gpus,
        image_id,
        binary,
    })
}

/// `uid:gid` of the SSH user (or of this process, locally).
async fn user_ids(conn: &PlaceConn) -> Result<String, String> {
    let uid = run_at(conn, &["id", "-u"]).await?;
    let gid = run_at(conn, &["id", "-g"]).await?;
    Ok(format!("{}:{}", uid.trim(), gid.trim()))
}

/// The project directory at a place: synced there (remote) or this machine's.
async fn project_at(
    fleet: &Fleet,
    conn: &PlaceConn,
    options: &SyncOptions,
    progress: &Progress,
) -> anyhow::Result<String> {
    let cluster = &fleet.cluster;
    match &conn.session {
        None => Ok(std::fs::canonicalize(&cluster.project)?
            .to_string_lossy()
            .into_owned()),
        Some(session) => {
            let report = sync_project(
                session,
                &cluster.project,
                &cluster.file.remote_path,
                options,
            )
            .await?;
            progress(
                &conn.label,
                &format!(
                    "project synced to {} ({:?}: {} of {} files sent)",
                    cluster.file.remote_path, report.method, report.sent, report.files
                ),
            );
            Ok(remote_abs_path(session, &cluster.file.remote_path).await?)
        }
    }
}

/// Everything deploy puts at one place, in order; returns the steps, how many containers
/// changed, and what was sent.
async fn deploy_place(
    fleet: &Fleet,
    conn: &PlaceConn,
    keys: &Keys,
    gpus: &HashMap<HostRef, Vec<u32>>,
    options: &DeployOptions,
    api: &tokio::sync::OnceCell<Option<MasterApi>>,
    progress: &Progress,
) -> anyhow::Result<(Vec<String>, usize, Sent)> {
    let cluster = &fleet.cluster;
    let mut steps = Vec::new();
    let mut changed = 0;
    let mut sent = Sent::default();
    let note = |steps: &mut Vec<String>, changed: &mut usize, name: &str, outcome: Outcome| {
        let line = format!("{name}: {}", outcome.verb());
        progress(&conn.label, &line);
        if outcome != Outcome::Unchanged {
            *changed += 1;
        }
        steps.push(line);
    };
    if cluster.file.master.host == conn.place {
        let (broker_image, bytes) =
            image_at(fleet, conn, &cluster.file.images.broker, progress).await?;
        sent.images += bytes;
        let spec = plan::broker_spec(cluster, keys, &broker_image);
        let outcome = containers::ensure(conn.docker.docker(), &spec).await?;
        note(&mut steps, &mut changed, &spec.name, outcome);
        let runtime = binary::runtime_image(&conn.docker).await?;
        sent.images += runtime.sent;
        let bin = binary_at(fleet, conn, options.binary()?, &mut sent, progress).await?;
        let spec = plan::master_spec(cluster, keys, (&runtime.reference, &runtime.id), &bin);
        let outcome = containers::ensure(conn.docker.docker(), &spec).await?;
        note(&mut steps, &mut changed, &spec.name, outcome);
    }
    for (i, w) in cluster.file.workers.iter().enumerate() {
        if w.host != conn.place {
            continue;
        }
        let gpus = gpus.get(&w.host).cloned().unwrap_or_default();
        let facts = worker_facts(fleet, conn, gpus, options, &mut sent, progress).await?;
        let specs = plan::worker_specs(cluster, keys, i, &facts);
        let wanted: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        if !options.now {
            drain_changed(fleet, conn, &specs, w.host, options, api, progress).await?;
        }
        for spec in &specs {
            let outcome = containers::ensure(conn.docker.docker(), spec).await?;
            note(&mut steps, &mut changed, &spec.name, outcome);
        }
        // Worker containers of this place that the configuration no longer has (a GPU
        // layout changed): removed.
        let label = cluster.place_label(w.host);
        for old in containers::list(conn.docker.docker(), cluster.name(), Some(&label)).await? {
            if old.role == Role::Worker.as_str() && !wanted.contains(&old.name) {
                containers::stop_and_remove(conn.docker.docker(), &old.name, 30).await?;
                let line = format!("{}: removed (no longer configured)", old.name);
                progress(&conn.label, &line);
                steps.push(line);
                changed += 1;
            }
        }
    }
    Ok((steps, changed, sent))
}

/// Before a deploy replaces running workers (their spec changed: a new gridq binary, other
/// slots or GPUs), lets their running jobs finish, as `update` does: the workers of the place
/// are drained (no new job; Docker will not restart them) and deploy waits until they are
/// idle. A new worker place, a stopped container or an unreachable master: nothing to wait
/// for. `--now` skips this (running jobs are handed back).
async fn drain_changed(
    fleet: &Fleet,
    conn: &PlaceConn,
    specs: &[ContainerSpec],
    place: HostRef,
    options: &DeployOptions,
    api: &tokio::sync::OnceCell<Option<MasterApi>>,
    progress: &Progress,
) -> anyhow::Result<()> {
    let cluster = &fleet.cluster;
    let label = cluster.place_label(place);
    let found = containers::list(conn.docker.docker(), cluster.name(), Some(&label)).await?;
    let changing: Vec<&ContainerSpec> = specs
        .iter()
        .filter(|s| {
            found
                .iter()
                .any(|f| f.name == s.name && f.state == "running" && f.spec != s.hash())
        })
        .collect();
    if changing.is_empty() {
        return Ok(());
    }
    let api = api
        .get_or_init(|| async {
            let deadline = Instant::now() + options.health_timeout;
            match MasterApi::open(fleet, deadline, None).await {
                Ok(api) => Some(api),
                Err(e) => {
                    progress(
                        "local",
                        &format!("the master does not answer ({e:#}): changed workers are replaced without waiting for their jobs"),
                    );
                    None
                }
            }
        })
        .await;
    let Some(api) = api else { return Ok(()) };
    for spec in &changing {
        containers::no_restart(conn.docker.docker(), &spec.name).await?;
    }
    drain_host(
        api,
        &worker_host_name(cluster, place),
        &conn.label,
        progress,
    )
    .await
}

/// `gridq deploy`: checks, then images, project, broker, master and workers at every place
/// in parallel, then the health check. Idempotent: what already matches is left running.
///
/// # Errors
/// Preflight failures (nothing was started) as one error listing them all; later failures
/// are per place in the report.
pub async fn deploy(
    fleet: &Fleet,
    options: &DeployOptions,
    progress: &Progress,
) -> anyhow::Result<DeployReport> {
    let gpus = match preflight(fleet).await {
        Ok(g) => g,
        Err(failures) => {
            anyhow::bail!(
                "deploy checks failed; nothing was started:\n  {}",
                failures.join("\n  ")
            );
        }
    };
    let (keys, note) = keys(fleet).await?;
    progress("local", &note);
    // The master's API, opened on first need: to drain workers about to be replaced.
    let api = tokio::sync::OnceCell::new();
    let mut tasks = Vec::new();
    for (place, conn) in &fleet.places {
        let Ok(conn) = conn else { continue };
        let (keys, gpus, api) = (&keys, &gpus, &api);
        tasks.push(async move {
            let result = deploy_place(fleet, conn, keys, gpus, options, api, progress).await;
            (*place, conn.label.clone(), result)
        });
    }
    let outcomes = futures_util::future::join_all(tasks).await;
    let mut places = Vec::new();
    let mut changed = 0;
    for (_, label, result) in outcomes {
        match result {
            Ok((steps, n, sent)) => {
                changed += n;
                places.push(PlaceReport {
                    place: label,
                    ok: true,
                    steps,
                    error: None,
                    sent,
                });
            }
            Err(e) => {
                let error = prefixed(&label, &format!("{e:#}"));
                progress(&label, &format!("FAILED: {error}"));
                places.push(PlaceReport {
                    place: label,
                    ok: false,
                    steps: Vec::new(),
                    error: Some(error),
                    sent: Sent::default(),
                });
            }
        }
    }
    let (healthy, workers_online, token) = health(fleet, options.health_timeout, progress).await;
    Ok(DeployReport {
        places,
        changed,
        workers_online,
        token,
        healthy,
    })
}

/// Waits until the master sees, for every worker place, as many online workers as it has
/// containers there; returns whether it did, what it saw, and the token.
async fn health(
    fleet: &Fleet,
    timeout: Duration,
    progress: &Progress,
) -> (bool, BTreeMap<String, usize>, Option<String>) {
    let cluster = &fleet.cluster;
    let master = cluster.file.master.host;
    let label = fleet.label(master);
    let deadline = Instant::now() + timeout;
    let api = match MasterApi::open(fleet, deadline, None).await {
        Ok(api) => api,
        Err(e) => {
            progress(&label, &format!("health check: {e:#}"));
            return (false, BTreeMap::new(), None);
        }
    };
    let mut wanted: BTreeMap<String, usize> = BTreeMap::new();
    for w in &cluster.file.workers {
        let Some(conn) = fleet.conn(w.host) else {
            continue;
        };
        let n = containers::list(
            conn.docker.docker(),
            cluster.name(),
            Some(&cluster.place_label(w.host)),
        )
        .await
        .map(|found| found.iter().filter(|c| c.role == "worker").count())
        .unwrap_or(0);
        wanted.insert(worker_host_name(cluster, w.host), n);
    }
    let mut seen = BTreeMap::new();
    // A worker counts once a heartbeat newer than the first answer reached the master: a row
    // that says `online` may be older than a broker or master that was just replaced.
    let mut first: Option<HashMap<String, u64>> = None;
    loop {
        if let Ok(workers) = api.workers().await {
            let last_seen = |w: &Value| w["last_seen_ms"].as_u64().unwrap_or(0);
            let before = first.get_or_insert_with(|| {
                workers
                    .iter()
                    .map(|w| (w["id"].as_str().unwrap_or("").to_owned(), last_seen(w)))
                    .collect()
            });
            seen = BTreeMap::new();
            for w in &workers {
                let fresh = before
                    .get(w["id"].as_str().unwrap_or(""))
                    .is_none_or(|t| last_seen(w) > *t);
                if fresh && matches!(w["state"].as_str(), Some("online" | "draining")) {
                    *seen
                        .entry(w["host"].as_str().unwrap_or_default().to_owned())
                        .or_insert(0) += 1;
                }
            }
            if wanted
                .iter()
                .all(|(h, n)| seen.get(h).copied().unwrap_or(0) >= *n)
            {
                progress(
                    &label,
                    &format!(
                        "health check passed: {} worker{} online",
                        seen.values().sum::<usize>(),
                        if seen.values().sum::<usize>() == 1 {
                            ""
                        } else {
                            "s"
                        }
                    ),
                );
                return (true, seen, Some(api.token.clone()));
            }
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = wanted
                .iter()
                .filter(|(h, n)| seen.get(*h).copied().unwrap_or(0) < **n)
                .map(|(h, n)| format!("{h} ({} of {n} online)", seen.get(h).copied().unwrap_or(0)))
                .collect();
            progress(
                &label,
                &format!(
                    "health check failed after {}: workers not seen by the master: {}; see `docker logs` of their containers",
                    humantime::format_duration(timeout),
                    missing.join(", ")
                ),
            );
            return (false, seen, Some(api.token.clone()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The name a worker place reports as its host (`GRIDQ_HOSTNAME`).
pub fn worker_host_name(cluster: &Cluster, place: HostRef) -> String {
    cluster
        .host(place)
        .map_or_else(|| "local".to_owned(), |h| h.addr.clone())
}

/// The master's API, reached through an SSH tunnel to the master host's loopback (or
/// directly for a local master).
#[derive(Debug)]
pub struct MasterApi {
    /// `http://127.0.0.1:PORT` on this machine.
    pub url: String,
    /// The token.
    pub token: String,
    http: reqwest::Client,
    _tunnel: Option<crate::tunnel::Tunnel>,
}

impl MasterApi {
    /// Opens the tunnel (its local end on `local`, or a free port) and reads the token from the
    /// master's state volume (waiting for the master to have written it, until `deadline`).
    /// A local master is reached directly and `local` is not used.
    ///
    /// # Errors
    /// No connection to the master host, no master container, no token before the deadline,
    /// `local` taken.
    pub async fn open(
        fleet: &Fleet,
        deadline: Instant,
        local: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let cluster = &fleet.cluster;
        let place = cluster.file.master.host;
        let Some(conn) = fleet.conn(place) else {
            anyhow::bail!(
                "{}",
                fleet
                    .error(place)
                    .unwrap_or("the master host is not connected")
            );
        };
        let name = plan::master_name(cluster.name());
        let token = loop {
            let read = containers::read_file(
                conn.docker.docker(),
                &name,
                &format!("{}/token", plan::MASTER_STATE),
            )
            .await?;
            if let Some(t) = read.filter(|t| !t.trim().is_empty()) {
                break t.trim().to_owned();
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{}: the master ({name}) has not written its token; is it running? see `docker logs {name}`",
                    conn.label
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let port = cluster.file.master.monitor_port;
        let (url, tunnel) = match &conn.session {
            None => (format!("http://127.0.0.1:{port}"), None),
            Some(session) => {
                let t = crate::tunnel::Tunnel::open(session, port, local).await?;
                (format!("http://{}", t.local), Some(t))
            }
        };
        Ok(Self {
            url,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            _tunnel: tunnel,
        })
    }

    /// `GET /api/v1{path}` as JSON.
    ///
    /// # Errors
    /// Transport errors and non-2xx answers.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}/api/v1{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(resp.json().await?)
    }

    /// `POST /api/v1{path}` with a JSON body.
    ///
    /// # Errors
    /// Transport errors and non-2xx answers.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}/api/v1{path}", self.url))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?
            .error_for_status()?;
        Ok(resp.json().await?)
    }

    /// The raw worker rows.
    ///
    /// # Errors
    /// As for [`MasterApi::get`].
    pub async fn workers(&self) -> anyhow::Result<Vec<Value>> {
        let v = self.get("/workers").await?;
        Ok(v["workers"].as_array().cloned().unwrap_or_default())
    }

    /// Online workers per reported host.
    ///
    /// # Errors
    /// As for [`MasterApi::get`].
    pub async fn online_workers(&self) -> anyhow::Result<BTreeMap<String, usize>> {
        let mut by_host = BTreeMap::new();
        for w in self.workers().await? {
            if matches!(w["state"].as_str(), Some("online" | "draining")) {
                *by_host
                    .entry(w["host"].as_str().unwrap_or_default().to_owned())
                    .or_insert(0) += 1;
            }
        }
        Ok(by_host)
    }
}

/// One place in `gridq status`.
#[derive(Debug, Clone, Serialize)]
pub struct PlaceStatus {
    /// `host N ...` or `local`.
    pub place: String,
    /// Roles configured there.
    pub roles: Vec<String>,
    /// Whether SSH and Docker answered.
    pub reachable: bool,
    /// Why not.
    pub error: Option<String>,
    /// This cluster's containers there.
    pub containers: Vec<Found>,
}

/// `gridq status`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: String,
    /// Per place.
    pub places: Vec<PlaceStatus>,
    /// The master's view: workers, queues, sweeps (absent when it cannot be reached).
    pub master: Option<Value>,
    /// Why the master's view is missing.
    pub master_error: Option<String>,
}

/// Gathers `gridq status`: containers at every place, and the master's view.
///
/// # Errors
/// Never for a host: unreachable places are reported in the status.
pub async fn status(fleet: &Fleet) -> ClusterStatus {
    let cluster = &fleet.cluster;
    let mut places = Vec::new();
    for (place, conn) in &fleet.places {
        let mut roles = Vec::new();
        if cluster.file.master.host == *place {
            roles.extend(["broker".to_owned(), "master".to_owned()]);
        }
        if cluster.file.workers.iter().any(|w| w.host == *place) {
            roles.push("worker".into());
        }
        match conn {
            Ok(conn) => {
                let label = cluster.place_label(*place);
                let (containers, error) = match containers::list(
                    conn.docker.docker(),
                    cluster.name(),
                    Some(&label),
                )
                .await
                {
                    Ok(c) => (c, None),
                    Err(e) => (Vec::new(), Some(format!("{}: {e}", conn.label))),
                };
                places.push(PlaceStatus {
                    place: conn.label.clone(),
                    roles,
                    reachable: error.is_none(),
                    error,
                    containers,
                });
            }
            Err(e) => places.push(PlaceStatus {
                place: fleet.label(*place),
                roles,
                reachable: false,
                error: Some(e.clone()),
                containers: Vec::new(),
            }),
        }
    }
    let (master, master_error) = match MasterApi::open(
        fleet,
        Instant::now() + Duration::from_secs(2),
        None,
    )
    .await
    {
        Ok(api) => {
            let view = async {
                let workers = api.get("/workers").await?;
                let queues = api.get("/queues").await.unwrap_or(Value::Null);
                let sweeps = api.get("/sweeps").await?;
                let overview = api.get("/overview").await.unwrap_or(Value::Null);
                anyhow::Ok(serde_json::json!({
                    "url_on_master_host": format!("http://127.0.0.1:{}", cluster.file.master.monitor_port),
                    "broker": overview["broker"],
                    "workers": workers["workers"],
                    "queues": queues,
                    "sweeps": sweeps["sweeps"],
                }))
            };
            match view.await {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            }
        }
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    ClusterStatus {
        cluster: cluster.name().to_owned(),
        places,
        master,
        master_error,
    }
}

/// How `clean` went at one place.
#[derive(Debug, Clone, Serialize)]
pub struct CleanReport {
    /// `host N ...` or `local`.
    pub place: String,
    /// Containers removed.
    pub removed: Vec<String>,
    /// Volumes removed (with `--purge`).
    pub volumes: Vec<String>,
    /// Whether the synced project was removed (with `--purge`).
    pub files_removed: bool,
    /// Why this place was not cleaned (unreachable) or not completely.
    pub error: Option<String>,
}

/// `gridq clean`: removes every container labelled with the cluster at every place, in
/// parallel; with `purge`, also its volumes and the synced project. Unreachable places are
/// reported, not fatal.
pub async fn clean(fleet: &Fleet, purge: bool, progress: &Progress) -> Vec<CleanReport> {
    let cluster = &fleet.cluster;
    let tasks = fleet.places.iter().map(|(place, conn)| async move {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                return CleanReport {
                    place: fleet.label(*place),
                    removed: Vec::new(),
                    volumes: Vec::new(),
                    files_removed: false,
                    error: Some(e.clone()),
                };
            }
        };
        let mut report = CleanReport {
            place: conn.label.clone(),
            removed: Vec::new(),
            volumes: Vec::new(),
            files_removed: false,
            error: None,
        };
        let work = async {
            let docker = conn.docker.docker();
            // This place's containers, and orphans whose host is no longer configured. (Hosts
            // may share an engine, as the test hosts do: each removes only its own.)
            let own = cluster.place_label(*place);
            let known: Vec<String> = cluster
                .places()
                .into_iter()
                .map(|p| cluster.place_label(p))
                .collect();
            let found: Vec<Found> = containers::list(docker, cluster.name(), None)
                .await?
                .into_iter()
                .filter(|c| c.host == own || !known.contains(&c.host))
                .collect();
            let removals = found.iter().map(|c| async move {
                containers::stop_and_remove(docker, &c.name, 30)
                    .await
                    .map(|()| c.name.clone())
            });
            for r in futures_util::future::join_all(removals).await {
                let name = r?;
                progress(&conn.label, &format!("{name}: removed"));
                report.removed.push(name);
            }
            if purge {
                for v in containers::list_volumes(docker, cluster.name(), Some(&own)).await? {
                    containers::remove_volume(docker, &v).await?;
                    progress(&conn.label, &format!("volume {v}: removed"));
                    report.volumes.push(v);
                }
                let is_worker = cluster.file.workers.iter().any(|w| w.host == *place);
                if let (true, Some(session)) = (is_worker, &conn.session) {
                    crate::sync::remove_remote(session, &cluster.file.remote_path).await?;
                    progress(
                        &conn.label,
                        &format!("{}: removed", cluster.file.remote_path),
                    );
                    report.files_removed = true;
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = work.await {
            report.error = Some(prefixed(&conn.label, &format!("{e:#}")));
        }
        report
    });
    futures_util::future::join_all(tasks).await
}

/// What `gridq clean --purge` would delete at one place, listed before it asks.
#[derive(Debug, Clone, Serialize)]
pub struct PurgePlan {
    /// `host N ...` or `local`.
    pub place: String,
    /// The cluster's containers there.
    pub containers: Vec<String>,
    /// Its volumes there (the broker's queues, the master's store and history).
    pub volumes: Vec<String>,
    /// The synced project directory, absolute (worker hosts reached over SSH; a local
    /// worker's project is this machine's and is never deleted).
    pub project: Option<String>,
    /// The job outputs in it (`.gridq/out`): files and bytes, when they could be counted.
    pub outputs: Option<(u64, u64)>,
    /// Why this place could not be looked at (it will not be cleaned either).
    pub error: Option<String>,
}

/// Looks at every place, in parallel, for what `clean(fleet, true, ..)` would delete there.
pub async fn purge_plan(fleet: &Fleet) -> Vec<PurgePlan> {
    let cluster = &fleet.cluster;
    let tasks = fleet.places.iter().map(|(place, conn)| async move {
        let mut plan = PurgePlan {
            place: fleet.label(*place),
            containers: Vec::new(),
            volumes: Vec::new(),
            project: None,
            outputs: None,
            error: None,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                plan.error = Some(e.clone());
                return plan;
            }
        };
        let work = async {
            let docker = conn.docker.docker();
            let own = cluster.place_label(*place);
            plan.containers = containers::list(docker, cluster.name(), Some(&own))
                .await?
                .into_iter()
                .map(|c| c.name)
                .collect();
            plan.volumes = containers::list_volumes(docker, cluster.name(), Some(&own)).await?;
            let is_worker = cluster.file.workers.iter().any(|w| w.host == *place);
            if let (true, Some(session)) = (is_worker, &conn.session) {
                let project = remote_abs_path(session, &cluster.file.remote_path).await?;
                // One line per file, its size: counted here (a directory that is not there
                // has none).
                let outputs = format!("{project}/.gridq/out");
                let listed = session
                    .run(
                        &["find", &outputs, "-type", "f", "-printf", "%s\\n"],
                        Some(Duration::from_secs(60)),
                    )
                    .await;
                plan.outputs = match listed {
                    Ok(out) if out.success() => {
                        let text = String::from_utf8_lossy(&out.stdout);
                        let sizes: Vec<u64> =
                            text.lines().filter_map(|l| l.trim().parse().ok()).collect();
                        Some((sizes.len() as u64, sizes.iter().sum()))
                    }
                    Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No such file") => {
                        Some((0, 0))
                    }
                    _ => None,
                };
                plan.project = Some(project);
            }
            anyhow::Ok(())
        };
        if let Err(e) = work.await {
            plan.error = Some(prefixed(&conn.label, &format!("{e:#}")));
        }
        plan
    });
    futures_util::future::join_all(tasks).await
}

/// How `update` went.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    /// Worker containers restarted, in order.
    pub restarted: Vec<String>,
    /// Failures, each naming its host.
    pub errors: Vec<String>,
    /// What was sent to each place.
    pub sent: BTreeMap<String, Sent>,
}

/// `gridq update`: re-syncs the project and the gridq binary everywhere, then replaces the
/// workers.
///
/// By default no running job is killed: every worker to be replaced is drained at once (it
/// takes no new job and Docker will not restart it), and each is replaced as soon as its own
/// running jobs have finished, the places in parallel. So no job starts on the old code once
/// the update has begun, and a worker idles only until its own last job ends. With
/// [`DeployOptions::now`], workers are replaced one at a time right away, each handing its
/// running jobs back (they run again elsewhere as new attempts), each new one online before
/// the next stops.
///
/// # Errors
/// The master cannot be reached; per-place failures are in the report.
pub async fn update(
    fleet: &Fleet,
    options: &DeployOptions,
    progress: &Progress,
) -> anyhow::Result<UpdateReport> {
    let cluster = &fleet.cluster;
    let (keys, _) = keys(fleet).await?;
    // GPUs as deploy gives them; a place whose GPUs cannot be determined is not restarted
    // (its worker would lose them).
    let gpus = worker_gpus(fleet).await;
    let deadline = Instant::now() + options.health_timeout;
    let api = MasterApi::open(fleet, deadline, None).await?;
    let mut report = UpdateReport {
        restarted: Vec::new(),
        errors: Vec::new(),
        sent: BTreeMap::new(),
    };
    // Sync everywhere first (in parallel), so every restarted worker sees the new project.
    let syncs = cluster.file.workers.iter().map(|w| async {
        let place = w.host;
        let Some(conn) = fleet.conn(place) else {
            return (
                place,
                Err(fleet.error(place).unwrap_or("not connected").to_owned()),
                Sent::default(),
            );
        };
        let mut sent = Sent::default();
        let work = async {
            let gpus = match gpus.get(&place) {
                Some(Ok(g)) => g.clone(),
                Some(Err(e)) => anyhow::bail!("{e}"),
                None => anyhow::bail!("{}: the GPU check did not finish", conn.label),
            };
            worker_facts(fleet, conn, gpus, options, &mut sent, progress).await
        };
        let facts = work
            .await
            .map_err(|e| prefixed(&conn.label, &format!("{e:#}")));
        (place, facts, sent)
    });
    let mut facts: HashMap<HostRef, WorkerFacts> = HashMap::new();
    for (place, f, sent) in futures_util::future::join_all(syncs).await {
        if let Some(conn) = fleet.conn(place) {
            report.sent.entry(conn.label.clone()).or_default().add(sent);
        }
        match f {
            Ok(f) => {
                facts.insert(place, f);
            }
            Err(e) => report.errors.push(e),
        }
    }
    let places: Vec<(Arc<PlaceConn>, Vec<ContainerSpec>, String)> = cluster
        .file
        .workers
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let conn = fleet.conn(w.host)?;
            let f = facts.get(&w.host)?;
            Some((
                Arc::clone(conn),
                plan::worker_specs(cluster, &keys, i, f),
                worker_host_name(cluster, w.host),
            ))
        })
        .collect();
    if options.now {
        for (conn, specs, host_name) in &places {
            for spec in specs {
                let step = replace_worker(&api, conn, spec, host_name, deadline, options, progress);
                match step.await {
                    Ok(()) => report.restarted.push(spec.name.clone()),
                    Err(e) => report.errors.push(prefixed(&conn.label, &format!("{e:#}"))),
                }
            }
        }
        return Ok(report);
    }
    let drains = places.iter().map(|(conn, specs, host_name)| {
        let api = &api;
        async move {
            let mut restarted = Vec::new();
            let work = async {
                // A drained worker exits once idle; Docker must not start it again (it would
                // take new jobs only to be stopped).
                for spec in specs {
                    containers::no_restart(conn.docker.docker(), &spec.name).await?;
                }
                drain_host(api, host_name, &conn.label, progress).await?;
                for spec in specs {
                    replace_worker(api, conn, spec, host_name, deadline, options, progress).await?;
                    restarted.push(spec.name.clone());
                }
                anyhow::Ok(())
            };
            let result = work
                .await
                .map_err(|e| prefixed(&conn.label, &format!("{e:#}")));
            (restarted, result)
        }
    });
    for (restarted, result) in futures_util::future::join_all(drains).await {
        report.restarted.extend(restarted);
        if let Err(e) = result {
            report.errors.push(e);
        }
    }
    Ok(report)
}

/// Replaces one worker container and waits for the new worker to be online (an id not seen
/// before the restart).
async fn replace_worker(
    api: &MasterApi,
    conn: &PlaceConn,
    spec: &ContainerSpec,
    host_name: &str,
    deadline: Instant,
    options: &DeployOptions,
    progress: &Progress,
) -> anyhow::Result<()> {
    let before: Vec<String> = api
        .workers()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|w| w["id"].as_str().map(str::to_owned))
        .collect();
    progress(
        &conn.label,
        &format!(
            "{}: stopping ({})",
            spec.name,
            if options.now {
                "running jobs handed back"
            } else {
                "its jobs have finished"
            }
        ),
    );
    containers::stop_and_remove(conn.docker.docker(), &spec.name, spec.stop_timeout).await?;
    containers::create_and_start(conn.docker.docker(), spec).await?;
    // The deadline starts again once the worker is restarted: draining took what it took.
    let deadline = deadline.max(Instant::now() + options.health_timeout);
    loop {
        let rows = api.workers().await.unwrap_or_default();
        let fresh = rows.iter().any(|r| {
            r["host"].as_str() == Some(host_name)
                && matches!(r["state"].as_str(), Some("online"))
                && r["id"]
                    .as_str()
                    .is_some_and(|id| !before.iter().any(|b| b == id))
        });
        if fresh {
            progress(&conn.label, &format!("{}: restarted, online", spec.name));
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{}: the restarted worker did not come online; see `docker logs {}`",
                spec.name,
                spec.name
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Asks the master to drain every online worker of `host` (they take no new job; running
/// ones finish) and waits until none of them runs a job, as their heartbeats say. Whenever the
/// set of running jobs changes it says which worker waits on which jobs. No deadline: a
/// training run takes what it takes (Ctrl-C leaves the workers draining; `update` again
/// resumes the wait).
async fn drain_host(
    api: &MasterApi,
    host: &str,
    label: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    // The master may be restarting (a deploy replaces it too): asked again for a while.
    let asked = Instant::now();
    let rows = loop {
        match api.workers().await {
            Ok(rows) => break rows,
            Err(e) if asked.elapsed() > Duration::from_secs(120) => {
                return Err(e.context("asking the master for its workers"));
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let ids: Vec<String> = rows
        .iter()
        .filter(|w| {
            w["host"].as_str() == Some(host)
                && matches!(w["state"].as_str(), Some("online" | "draining"))
        })
        .filter_map(|w| w["id"].as_str().map(str::to_owned))
        .collect();
    for id in &ids {
        // Retried for a while: the master may be restarting (a deploy replaces it too).
        let asked = Instant::now();
        while let Err(e) = api
            .post(&format!("/workers/{id}/drain"), &Value::Null)
            .await
        {
            if asked.elapsed() > Duration::from_secs(120) {
                return Err(e.context(format!("asking the master to drain {id}")));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut reported: Option<Vec<String>> = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        // The master may be replaced meanwhile (a deploy): it is asked again until it answers.
        let rows = match api.workers().await {
            Ok(rows) => {
                failing_since = None;
                rows
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(120) {
                    return Err(e.context("waiting for drained workers"));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let waits: Vec<String> = rows
            .iter()
            .filter(|w| {
                w["id"]
                    .as_str()
                    .is_some_and(|id| ids.iter().any(|i| i == id))
                    && matches!(w["state"].as_str(), Some("online" | "draining"))
            })
            .filter_map(|w| {
                let running = w["info"]["running"].as_array()?;
                if running.is_empty() {
                    return None;
                }
                let jobs: Vec<String> = running
                    .iter()
                    .map(|a| {
                        format!(
                            "{}/{}",
                            a["sweep"].as_str().unwrap_or("?"),
                            a["job"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                Some(format!(
                    "{} waits on {}",
                    w["id"].as_str().unwrap_or("?"),
                    jobs.join(", ")
                ))
            })
            .collect();
        if waits.is_empty() {
            return Ok(());
        }
        if reported.as_ref() != Some(&waits) {
            progress(
                label,
                &format!("draining: running jobs finish first: {}", waits.join("; ")),
            );
            reported = Some(waits);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `message`, starting with the place's label (once: most errors name their host already).
fn prefixed(label: &str, message: &str) -> String {
    if message.starts_with(label) {
        message.to_owned()
    } else {
        format!("{label}: {message}")
    }
}

/// Where `gridq deploy` saves the cluster file by default.
pub fn default_cluster_path(project: &std::path::Path) -> PathBuf {
    project.join(config::CLUSTER_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_come_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:2A3A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:9C40 0100007F:2A3A 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   0: 00000000000000000000000000000000:1628 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_listening(text), vec![5672, 10810]);
    }
}
