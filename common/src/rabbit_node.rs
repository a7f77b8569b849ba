//! A private RabbitMQ node that gridq starts, owns and stops itself.
//!
//! `gridq run --local` starts one under its state directory when no broker answers, and the
//! integration tests start them with a short `consumer_timeout`, restart or crash them, and give
//! each test its own vhost. The node is an ordinary `rabbitmq-server` (Debian's package, or any
//! install on `PATH`) run as the current user with every path pointed into [`NodeOptions::dir`]:
//!
//! ```text
//! dir/credentials       password of the `gridq` user (0600), generated on first start
//! dir/node.json         node name and the ports last used
//! dir/config/           rabbitmq.conf (0600: it holds the password), enabled_plugins, rabbitmq-env.conf
//! dir/mnesia/           the node's database: vhosts, users, durable queues and their messages
//! dir/log/              the node's log, and console.log (the server's stdout and stderr)
//! dir/rabbitmq.pid      the Erlang VM's pid, written by RabbitMQ
//! ```
//!
//! The node name (`gridq-<random>@localhost`) is chosen once per directory and kept, because
//! RabbitMQ files its database under the node name: a later [`RabbitNode::start`] on the same
//! directory finds the same queues even when it has to pick new ports.
//!
//! Security: nothing relies on `guest`. The first boot creates the `gridq` user with a random
//! password, administrator tag and full permissions on `/` from `default_user`/`default_pass` in
//! rabbitmq.conf, so `guest` never exists (and no slow `rabbitmqctl` call is needed). AMQP, the
//! management API and Erlang distribution listen on 127.0.0.1 only. URLs that may be shown
//! to a person come from [`RabbitNode::redacted_url`]; errors never contain the password.
//!
//! Processes: the server runs in its own process group, so stopping or dropping the node can
//! signal the shell wrapper and the Erlang VM together. The VM's helpers (`erl_child_setup`,
//! `inet_gethost`) sit in their own sessions and exit when the VM does; `epmd` is shared by all
//! Erlang nodes of the user and is left running. A node started with
//! [`NodeOptions::stop_with_parent`] also stops when the process that started it dies.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

/// The user gridq creates on every node it starts.
pub const USER: &str = "gridq";

/// Where Debian's package keeps the scripts that run as the calling user (the ones in
/// `/usr/sbin` switch to the `rabbitmq` user when run as root and then cannot use our dirs).
const DEBIAN_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";
const INSTALL_HINT: &str = "sudo apt-get install rabbitmq-server";

/// Ports the RabbitMQ CLI tools listen on for Erlang distribution (`RABBITMQ_CTL_DIST_PORT_MIN`
/// and the 10 after it); a node on one of them would make `rabbitmqctl` fail now and then.
const CLI_DIST_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;
const PASSWORD_LEN: usize = 32;
const NODE_SUFFIX_LEN: usize = 10;
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const EPMD_TIMEOUT: Duration = Duration::from_secs(10);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// A probe connection on loopback takes milliseconds; one made just as the listener opens
/// sometimes hangs, and the next one succeeds at once.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const PREVIOUS_PORT_GRACE: Duration = Duration::from_secs(2);
const LOG_TAIL_LINES: usize = 20;

/// Ports handed to nodes of this process and not yet given back, so that two nodes started at
/// the same time never pick the same free port before either has bound it.
static CLAIMED_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Result alias for this module.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// What went wrong while running a private node.
///
/// Worth retrying: [`NodeError::StartupTimeout`] (a slow machine; raise
/// [`NodeOptions::startup_timeout`]), [`NodeError::NameInUse`] and [`NodeError::Http`].
/// The others need a change first (install RabbitMQ, free a port, fix the directory).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// No usable `rabbitmq-server` / `rabbitmqctl` on this machine.
    #[error(
        "RabbitMQ is not installed: `{tool}` is neither in {DEBIAN_BIN_DIR} nor on PATH; \
         install it with `{INSTALL_HINT}`"
    )]
    NotInstalled {
        /// The program that was looked for.
        tool: &'static str,
    },
    /// A file or directory of the node could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create directory".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file gridq wrote earlier into the node's directory cannot be read back.
    #[error("invalid {}: {reason}", path.display())]
    BadStateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory holds a database but the password that goes with it is gone.
    #[error(
        "{} holds a RabbitMQ database but no credentials file; the gridq user's password is \
         lost. Delete the directory to start with an empty node",
        dir.display()
    )]
    CredentialsMissing {
        /// The node's directory.
        dir: PathBuf,
    },
    /// The system random generator failed.
    #[error("cannot generate a random password: {reason}")]
    Random {
        /// The generator's error.
        reason: String,
    },
    /// A port asked for in [`NodeOptions::amqp_port`] is taken.
    #[error("port 127.0.0.1:{port} is already in use")]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// No free loopback port could be found.
    #[error("cannot find a free loopback TCP port: {source}")]
    NoFreePort {
        /// The underlying error.
        source: io::Error,
    },
    /// epmd still lists the node name, so another VM (or one still dying) holds it.
    #[error(
        "node name {node} is still registered with epmd after {timeout:?}; \
         is another node running from {}?",
        dir.display()
    )]
    NameInUse {
        /// The full node name.
        node: String,
        /// The node's directory.
        dir: PathBuf,
        /// How long we waited for the name to become free.
        timeout: Duration,
    },
    /// The server process ended before the node accepted connections.
    #[error("RabbitMQ node {node} exited during startup (rabbitmq-server {status})\n{log_tail}")]
    ExitedDuringStartup {
        /// The full node name.
        node: String,
        /// How the `rabbitmq-server` wrapper ended (it exits 0 whatever the VM did).
        status: String,
        /// The last lines of the node's logs.
        log_tail: String,
    },
    /// The node did not accept an AMQP connection in time; it has been killed.
    #[error(
        "RabbitMQ node {node} did not accept AMQP connections within {timeout:?} \
         (last attempt: {last_error})\n{log_tail}"
    )]
    StartupTimeout {
        /// The full node name.
        node: String,
        /// [`NodeOptions::startup_timeout`].
        timeout: Duration,
        /// Why the last connection attempt failed.
        last_error: String,
        /// The last lines of the node's logs.
        log_tail: String,
    },
    /// The node is up but refuses the `gridq` user; it has been stopped.
    #[error(
        "RabbitMQ node {node} refused user {USER}: {reason}. The database in {} was \
         probably created with another password; delete the directory to start afresh",
        dir.display()
    )]
    AccessRefused {
        /// The full node name.
        node: String,
        /// The node's directory.
        dir: PathBuf,
        /// The broker's reply.
        reason: String,
    },
    /// The node is stopped, so the operation cannot run.
    #[error("RabbitMQ node {node} is not running")]
    NotRunning {
        /// The full node name.
        node: String,
    },
    /// A vhost name RabbitMQ cannot take.
    #[error("invalid vhost name {name:?}: must not be empty")]
    InvalidVhost {
        /// The name.
        name: String,
    },
    /// A `rabbitmqctl` call failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (it never contains the password).
        command: String,
        /// How it ended.
        status: String,
        /// Its standard error (and output), trimmed.
        stderr: String,
    },
    /// A `rabbitmqctl` call did not finish in time; it has been killed.
    #[error("`{command}` did not finish within {timeout:?}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// The management API answered with an error status.
    #[error("management API {method} {path} answered {status}: {body}")]
    Management {
        /// HTTP method.
        method: String,
        /// Request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// The management API could not be reached.
    #[error("management API {method} {path} failed: {source}")]
    Http {
        /// HTTP method.
        method: String,
        /// Request path.
        path: String,
        /// The client's error (it never contains the password: credentials travel in a header).
        source: reqwest::Error,
    },
}

impl NodeError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        NodeError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How to run a private node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Data, logs and configuration all live under here; created if missing.
    pub dir: PathBuf,
    /// AMQP port on 127.0.0.1. `None`: the port the directory used last time if it is free,
    /// otherwise any free port.
    pub amqp_port: Option<u16>,
    /// Enable the `rabbitmq_management` plugin on a free loopback port. Vhosts are then
    /// managed over HTTP (milliseconds) instead of `rabbitmqctl` (about a second per call).
    pub management: bool,
    /// RabbitMQ's `consumer_timeout`: how long a delivery may stay unacknowledged before the
    /// broker closes the channel. `None` keeps RabbitMQ's default (30 minutes).
    pub consumer_timeout: Option<Duration>,
    /// How long the node may take to accept its first AMQP connection.
    pub startup_timeout: Duration,
    /// Also listen for AMQP over TLS (on 127.0.0.1, another free port) with these files.
    pub tls: Option<NodeTls>,
    /// Stop the node when the process that started it dies, however it dies (SIGKILL
    /// included): the server gets `PR_SET_PDEATHSIG(SIGTERM)`, on which its wrapper stops the
    /// VM cleanly. The kernel sends that signal when the *thread* that started the node exits,
    /// so start (and restart) such a node from a thread that lives as long as the process:
    /// the main thread, as `gridq run --local` does.
    pub stop_with_parent: bool,
}

/// The PEM files of a node's TLS listener. Clients are not asked for certificates.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The CA that issued `cert`, which clients verify the node against.
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeOptions {
    /// Options with the defaults: any free port, no management plugin, RabbitMQ's default
    /// consumer timeout and 90 s to start.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NodeOptions {
            dir: dir.into(),
            amqp_port: None,
            management: false,
            consumer_timeout: None,
            startup_timeout: Duration::from_secs(90),
            tls: None,
            stop_with_parent: false,
        }
    }
}

/// The node name and ports a directory used last, kept in `dir/node.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedNode {
    node_name: String,
    amqp_port: u16,
    dist_port: u16,
    #[serde(default)]
    management_port: Option<u16>,
    #[serde(default)]
    tls_port: Option<u16>,
}

/// The password of the node's user; its `Debug` never shows it.
#[derive(Clone)]
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// The files and directories of one node.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    config_dir: PathBuf,
    mnesia_dir: PathBuf,
    log_dir: PathBuf,
    credentials: PathBuf,
    saved_node: PathBuf,
    pid_file: PathBuf,
    console_log: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        let log_dir = dir.join("log");
        Layout {
            dir: dir.to_path_buf(),
            config_dir: dir.join("config"),
            mnesia_dir: dir.join("mnesia"),
            console_log: log_dir.join("console.log"),
            log_dir,
            credentials: dir.join("credentials"),
            saved_node: dir.join("node.json"),
            pid_file: dir.join("rabbitmq.pid"),
        }
    }

    fn config_file(&self) -> PathBuf {
        self.config_dir.join("rabbitmq.conf")
    }

    fn node_log(&self, node_name: &str) -> PathBuf {
        self.log_dir.join(format!("{node_name}.log"))
    }
}

/// A RabbitMQ node that this process started and owns.
///
/// Dropping it kills the node (SIGKILL to its process group); call [`RabbitNode::stop`] first
/// for a clean shutdown. Messages that were confirmed to a publisher survive either way.
#[derive(Debug)]
pub struct RabbitNode {
    options: NodeOptions,
    layout: Layout,
    server: PathBuf,
    ctl: PathBuf,
    node_name: String,
    amqp_port: u16,
    dist_port: u16,
    management_port: Option<u16>,
    tls_port: Option<u16>,
    password: Password,
    /// The `rabbitmq-server` shell wrapper: leader of the node's process group.
    child: Option<Child>,
    /// The Erlang VM, from the pid file, once the node is up.
    server_pid: Option<Pid>,
    /// Ports in [`CLAIMED_PORTS`] to give back on drop.
    claimed: Vec<u16>,
    http: reqwest::Client,
}

impl RabbitNode {
    /// Starts a node under `options.dir` and waits until it accepts AMQP connections.
    ///
    /// The first start on a directory creates the `gridq` user with a new random password and
    /// stores it in `dir/credentials`; later starts reuse it, the node name and the data.
    ///
    /// # Errors
    /// [`NodeError::NotInstalled`] without RabbitMQ; [`NodeError::ExitedDuringStartup`] and
    /// [`NodeError::StartupTimeout`] carry the end of the node's logs; on every error no process
    /// of the node is left running.
    pub async fn start(options: NodeOptions) -> Result<RabbitNode> {
        let server = locate_server()?;
        let ctl = locate_tool(&server, "rabbitmqctl")?;
        fs::create_dir_all(&options.dir)
            .map_err(|e| NodeError::io("create directory", &options.dir, e))?;
        // Absolute, because the server runs with the directory as its working directory.
        let mut options = options;
        options.dir = fs::canonicalize(&options.dir)
            .map_err(|e| NodeError::io("resolve", &options.dir, e))?;
        let layout = Layout::new(&options.dir);
        for dir in [&layout.mnesia_dir, &layout.log_dir] {
            fs::create_dir_all(dir).map_err(|e| NodeError::io("create directory", dir, e))?;
        }
        create_private_dir(&layout.config_dir)?;

        let password = load_or_create_password(&layout)?;
        let saved = load_saved_node(&layout.saved_node)?;
        let node_name = match &saved {
            Some(saved) => saved.node_name.clone(),
            None => format!(
                "gridq-{}@localhost",
                random_alphanumeric(NODE_SUFFIX_LEN)?.to_ascii_lowercase()
            ),
        };

        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|source| NodeError::Http {
                method: "build".into(),
                path: "client".into(),
                source,
            })?;
        let mut node = RabbitNode {
            options,
            layout,
            server,
            ctl,
            node_name,
            amqp_port: 0,
            dist_port: 0,
            management_port: None,
            tls_port: None,
            password,
            child: None,
            server_pid: None,
            claimed: Vec::new(),
            http,
        };
        // From here on, Drop gives back claimed ports and kills whatever was started.
        node.amqp_port = match node.options.amqp_port {
            Some(port) => node.claim_exact(port)?,
            None => {
                let previous = saved.as_ref().map(|s| s.amqp_port);
                if let Some(port) = previous {
                    // Keep the URL stable across runs if the port frees up soon: a node that
                    // was just killed can hold it for a moment.
                    wait_port_free(port, PREVIOUS_PORT_GRACE).await;
                }
                node.claim_port(previous)?
            }
        };
        node.dist_port = node.claim_port(saved.as_ref().map(|s| s.dist_port))?;
        if node.options.management {
            let previous = saved.as_ref().and_then(|s| s.management_port);
            node.management_port = Some(node.claim_port(previous)?);
        }
        if node.options.tls.is_some() {
            let previous = saved.as_ref().and_then(|s| s.tls_port);
            node.tls_port = Some(node.claim_port(previous)?);
        }
        write_atomically(
            &node.layout.saved_node,
            &serde_json::to_vec_pretty(&SavedNode {
                node_name: node.node_name.clone(),
                amqp_port: node.amqp_port,
                dist_port: node.dist_port,
                management_port: node.management_port,
                tls_port: node.tls_port,
            })
            .map_err(|e| NodeError::io("serialize", &node.layout.saved_node, e.into()))?,
            0o644,
        )?;
        node.launch().await?;
        Ok(node)
    }

    /// The AMQP URL for `vhost`, with the password. Give it to clients, never to a log: see
    /// [`RabbitNode::redacted_url`].
    pub fn amqp_url(&self, vhost: &str) -> String {
        amqp_url(&self.password.0, self.amqp_port, vhost)
    }

    /// The `amqps://` URL for `vhost` when the node listens with TLS: it names the CA to verify
    /// the node against (`cacertfile`, as RabbitMQ's URI spec has it).
    pub fn amqps_url(&self, vhost: &str) -> Option<String> {
        let (port, tls) = (self.tls_port?, self.options.tls.as_ref()?);
        Some(format!(
            "amqps://{USER}:{}@127.0.0.1:{port}/{}?{}={}",
            self.password.0,
            percent_encode(vhost),
            crate::amqp::CA_FILE_PARAM,
            percent_encode(&tls.ca_cert.to_string_lossy())
        ))
    }

    /// [`RabbitNode::amqp_url`] with the password replaced by `***`, for logs and messages.
    pub fn redacted_url(&self, vhost: &str) -> String {
        amqp_url("***", self.amqp_port, vhost)
    }

    /// The management API's base URL (`http://127.0.0.1:PORT`) when the plugin is enabled.
    pub fn management_url(&self) -> Option<String> {
        self.management_port
            .map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// User name and password of the node's administrator.
    pub fn credentials(&self) -> (&str, &str) {
        (USER, &self.password.0)
    }

    /// The Erlang node name, e.g. `gridq-k3x9q2m1za@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The AMQP port on 127.0.0.1.
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The node's directory ([`NodeOptions::dir`]).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The process group of the running node (the id of the `rabbitmq-server` wrapper that
    /// leads it), or `None` while the node is stopped.
    pub fn process_group(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The Erlang VM's pid while the node runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server_pid
            .and_then(|pid| u32::try_from(pid.as_raw()).ok())
    }

    /// Whether this handle has a node process (it may have died on its own since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Creates vhost `name` (if missing) and gives the node user all permissions on it.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`], [`NodeError::InvalidVhost`] for an empty name, and the
    /// management API's or `rabbitmqctl`'s error.
    pub async fn add_vhost(&self, name: &str) -> Result<()> {
        self.check_vhost_call(name)?;
        let vhost = percent_encode(name);
        if self.management_port.is_some() {
            self.management_call(reqwest::Method::PUT, &format!("/api/vhosts/{vhost}"), None)
                .await?;
            let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
            self.management_call(
                reqwest::Method::PUT,
                &format!("/api/permissions/{vhost}/{USER}"),
                Some(permissions),
            )
            .await?;
        } else {
            self.ctl(&["add_vhost", "--", name]).await?;
            let vhost_arg = format!("--vhost={name}");
            self.ctl(&["set_permissions", &vhost_arg, "--", USER, ".*", ".*", ".*"])
                .await?;
        }
        debug!(node = %self.node_name, vhost = name, "added vhost");
        Ok(())
    }

    /// Deletes vhost `name` with everything in it.
    ///
    /// # Errors
    /// Deleting a vhost that does not exist is an error (404 from the management API, a
    /// `rabbitmqctl` failure otherwise), as are [`NodeError::NotRunning`] and
    /// [`NodeError::InvalidVhost`].
    pub async fn delete_vhost(&self, name: &str) -> Result<()> {
        self.check_vhost_call(name)?;
        if self.management_port.is_some() {
            let path = format!("/api/vhosts/{}", percent_encode(name));
            self.management_call(reqwest::Method::DELETE, &path, None)
                .await?;
        } else {
            self.ctl(&["delete_vhost", "--", name]).await?;
        }
        debug!(node = %self.node_name, vhost = name, "deleted vhost");
        Ok(())
    }

    /// Stops the node cleanly (`rabbitmqctl stop`) and waits for its processes to exit; the
    /// data stays in the directory. Falls back to SIGTERM if `rabbitmqctl` fails and to SIGKILL
    /// after 30 s. Does nothing if the node is not running.
    ///
    /// # Errors
    /// None at present: a node that will not stop is killed, with a warning in the log.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(leader) = self.leader_pid() else {
            return Ok(());
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        if let Err(err) = self.ctl_until(&["stop"], deadline).await {
            warn!(node = %self.node_name, error = %err, "rabbitmqctl stop failed; sending SIGTERM");
            // The wrapper script turns SIGTERM into a clean shutdown of the VM.
            if let Err(errno) = kill(leader, Signal::SIGTERM) {
                debug!(node = %self.node_name, %errno, "SIGTERM to the node failed");
            }
        }
        if self.wait_child_exit(deadline).await.is_none() {
            warn!(
                node = %self.node_name,
                timeout = ?STOP_TIMEOUT,
                "node did not stop in time; killing it"
            );
            self.kill().await;
            return Ok(());
        }
        self.wait_server_gone(Instant::now() + KILL_TIMEOUT).await;
        self.server_pid = None;
        info!(node = %self.node_name, "RabbitMQ node stopped");
        Ok(())
    }

    /// Stops the node (if running) and starts it again with the same directory, ports, node
    /// name and user; durable queues and persistent messages survive. Also brings a node back
    /// after [`RabbitNode::kill`].
    ///
    /// # Errors
    /// As [`RabbitNode::start`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// Kills the node with SIGKILL, as a crash would, and waits until its processes are gone.
    /// [`RabbitNode::restart`] starts it again.
    pub async fn kill(&mut self) {
        if let Some(leader) = self.leader_pid() {
            signal_group(leader, Signal::SIGKILL);
            if self
                .wait_child_exit(Instant::now() + KILL_TIMEOUT)
                .await
                .is_none()
            {
                warn!(node = %self.node_name, "node survived SIGKILL; giving up on it");
                self.child = None;
            }
        }
        self.wait_server_gone(Instant::now() + KILL_TIMEOUT).await;
        self.server_pid = None;
    }

    /// Writes the configuration, spawns the server and waits until it is ready. On error,
    /// nothing of the node is left running.
    async fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + self.options.startup_timeout;
        wait_name_free(&self.node_name, &self.layout.dir, EPMD_TIMEOUT).await?;
        self.write_config()?;
        // A stale pid file would make the new VM's pid unreadable until RabbitMQ rewrites it.
        remove_if_exists(&self.layout.pid_file)?;

        let mut console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.layout.console_log)
            .map_err(|e| NodeError::io("open", &self.layout.console_log, e))?;
        writeln!(
            console,
            "--- gridq: starting {} (AMQP port {}, dist port {}) ---",
            self.node_name, self.amqp_port, self.dist_port
        )
        .map_err(|e| NodeError::io("write", &self.layout.console_log, e))?;
        let stderr = console
            .try_clone()
            .map_err(|e| NodeError::io("open", &self.layout.console_log, e))?;

        let mut command = std::process::Command::new(&self.server);
        command
            .current_dir(&self.layout.dir)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            .process_group(0);
        if self.options.stop_with_parent {
            stop_with_parent(&mut command);
        }
        self.apply_env(&mut command);
        let child = command
            .spawn()
            .map_err(|e| NodeError::io("run", &self.server, e))?;
        info!(
            node = %self.node_name,
            pid = child.id(),
            url = %self.redacted_url("/"),
            dir = %self.layout.dir.display(),
            "starting RabbitMQ node"
        );
        self.child = Some(child);

        if let Err(err) = self.wait_ready(deadline).await {
            self.kill().await;
            return Err(err);
        }
        self.server_pid = read_pid_file(&self.layout.pid_file);
        info!(
            node = %self.node_name,
            elapsed = ?started.elapsed(),
            url = %self.redacted_url("/"),
            management = ?self.management_url(),
            "RabbitMQ node ready"
        );
        Ok(())
    }

    /// Polls until an AMQP connection (and, with the plugin, a management call) succeeds.
    async fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        let url = self.amqp_url("/");
        let mut last_error = String::from("none finished");
        loop {
            if let Some(status) = self.child_exit_status() {
                return Err(NodeError::ExitedDuringStartup {
                    node: self.node_name.clone(),
                    status: status.to_string(),
                    log_tail: self.log_tail(),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NodeError::StartupTimeout {
                    node: self.node_name.clone(),
                    timeout: self.options.startup_timeout,
                    last_error,
                    log_tail: self.log_tail(),
                });
            }
            let attempt = timeout(
                remaining.min(CONNECT_ATTEMPT_TIMEOUT),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            match attempt {
                Ok(Ok(connection)) => {
                    // Best effort: the probe connection has served its purpose either way.
                    let _ = connection.close(200, "gridq readiness probe".into()).await;
                    break;
                }
                Ok(Err(err)) => {
                    if let ErrorKind::ProtocolError(amqp) = err.kind() {
                        if matches!(
                            amqp.kind(),
                            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                        ) {
                            return Err(NodeError::AccessRefused {
                                node: self.node_name.clone(),
                                dir: self.layout.dir.clone(),
                                reason: self.redact(&amqp.get_message().to_string()),
                            });
                        }
                    }
                    last_error = self.redact(&err.to_string());
                }
                Err(_) => last_error = "connection attempt timed out".into(),
            }
            sleep(POLL_INTERVAL).await;
        }

        // The management listener starts before the AMQP one; this is a cheap confirmation.
        while self.management_port.is_some() {
            match self
                .management_call(reqwest::Method::GET, "/api/overview", None)
                .await
            {
                Ok(()) => break,
                Err(err) if Instant::now() >= deadline => {
                    return Err(NodeError::StartupTimeout {
                        node: self.node_name.clone(),
                        timeout: self.options.startup_timeout,
                        last_error: err.to_string(),
                        log_tail: self.log_tail(),
                    });
                }
                Err(_) => sleep(POLL_INTERVAL).await,
            }
        }
        Ok(())
    }

    fn write_config(&self) -> Result<()> {
        let mut conf = format!(
            "# Written by gridq on every start of this node; edits are overwritten.\n\
             listeners.tcp.default = 127.0.0.1:{amqp}\n\
             default_vhost = /\n\
             default_user = {USER}\n\
             default_pass = {password}\n\
             default_user_tags.administrator = true\n\
             default_permissions.configure = .*\n\
             default_permissions.read = .*\n\
             default_permissions.write = .*\n",
            amqp = self.amqp_port,
            password = self.password.0,
        );
        if let Some(consumer_timeout) = self.options.consumer_timeout {
            conf.push_str(&format!(
                "consumer_timeout = {}\n",
                consumer_timeout.as_millis().max(1)
            ));
        }
        if let Some(port) = self.management_port {
            conf.push_str(&format!(
                "management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {port}\n"
            ));
        }
        if let (Some(port), Some(tls)) = (self.tls_port, &self.options.tls) {
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n\
                 ssl_options.versions.1 = tlsv1.3\n\
                 ssl_options.versions.2 = tlsv1.2\n",
                tls.ca_cert.display(),
                tls.cert.display(),
                tls.key.display()
            ));
        }
        write_atomically(&self.layout.config_file(), conf.as_bytes(), 0o600)?;

        let plugins = if self.management_port.is_some() {
            "[rabbitmq_management].\n"
        } else {
            "[].\n"
        };
        write_atomically(
            &self.layout.config_dir.join("enabled_plugins"),
            plugins.as_bytes(),
            0o644,
        )?;
        // RabbitMQ checks consumer timeouts only on a channel's tick, every 60 s by default, so
        // a 5 s timeout would fire after up to a minute. The tick interval is not in the
        // rabbitmq.conf schema; advanced.config can set it.
        let advanced = match self.options.consumer_timeout {
            Some(consumer_timeout) => format!(
                "[{{rabbit, [{{channel_tick_interval, {}}}]}}].\n",
                channel_tick_ms(consumer_timeout)
            ),
            None => "[].\n".to_string(),
        };
        write_atomically(
            &self.layout.config_dir.join("advanced.config"),
            advanced.as_bytes(),
            0o644,
        )?;
        // Our own (empty) env file, so /etc/rabbitmq/rabbitmq-env.conf cannot move the node.
        write_atomically(
            &self.layout.config_dir.join("rabbitmq-env.conf"),
            b"# Intentionally empty: gridq passes all settings in the environment.\n",
            0o644,
        )
    }

    /// Environment for the server and `rabbitmqctl`: every path points into the node's dir.
    fn apply_env(&self, command: &mut std::process::Command) {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RABBITMQ_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env());
    }

    fn env(&self) -> Vec<(&'static str, OsString)> {
        let layout = &self.layout;
        vec![
            ("RABBITMQ_NODENAME", self.node_name.clone().into()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string().into()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string().into()),
            ("RABBITMQ_MNESIA_BASE", layout.mnesia_dir.clone().into()),
            ("RABBITMQ_LOG_BASE", layout.log_dir.clone().into()),
            (
                "RABBITMQ_CONFIG_FILE",
                layout.config_dir.join("rabbitmq").into(),
            ),
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                layout.config_dir.join("advanced.config").into(),
            ),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                layout.config_dir.join("enabled_plugins").into(),
            ),
            (
                "RABBITMQ_CONF_ENV_FILE",
                layout.config_dir.join("rabbitmq-env.conf").into(),
            ),
            ("RABBITMQ_PID_FILE", layout.pid_file.clone().into()),
            // Erlang distribution on loopback only (it listens on all interfaces by default).
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            (
                "ERL_CRASH_DUMP",
                layout.log_dir.join("erl_crash.dump").into(),
            ),
        ]
    }

    fn check_vhost_call(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(NodeError::InvalidVhost { name: name.into() });
        }
        if self.child.is_none() {
            return Err(NodeError::NotRunning {
                node: self.node_name.clone(),
            });
        }
        Ok(())
    }

    async fn management_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<()> {
        let Some(base) = self.management_url() else {
            return Err(NodeError::NotRunning {
                node: self.node_name.clone(),
            });
        };
        let mut request = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .basic_auth(USER, Some(&self.password.0));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|source| NodeError::Http {
            method: method.to_string(),
            path: path.into(),
            source: source.without_url(),
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(NodeError::Management {
            method: method.to_string(),
            path: path.into(),
            status: status.as_u16(),
            body: self.redact(&truncate(body.trim(), 500)),
        })
    }

    async fn ctl(&self, args: &[&str]) -> Result<String> {
        self.ctl_until(args, Instant::now() + CTL_TIMEOUT).await
    }

    /// Runs `rabbitmqctl -n <node> <args>` with the node's environment.
    async fn ctl_until(&self, args: &[&str], deadline: Instant) -> Result<String> {
        let mut std_command = std::process::Command::new(&self.ctl);
        std_command
            .arg("-n")
            .arg(&self.node_name)
            .args(args)
            .current_dir(&self.layout.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.apply_env(&mut std_command);
        let mut command = tokio::process::Command::from(std_command);
        command.kill_on_drop(true);
        let display = format!("rabbitmqctl -n {} {}", self.node_name, args.join(" "));
        let limit = deadline.saturating_duration_since(Instant::now());
        let output = match timeout(limit, command.output()).await {
            Ok(output) => output.map_err(|e| NodeError::io("run", &self.ctl, e))?,
            Err(_) => {
                return Err(NodeError::CommandTimeout {
                    command: display,
                    timeout: limit,
                });
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(NodeError::Command {
            command: display,
            status: output.status.to_string(),
            stderr: self
                .redact(&truncate(
                    &format!("{}\n{}", stderr.trim(), stdout.trim()),
                    2000,
                ))
                .trim()
                .to_string(),
        })
    }

    fn leader_pid(&self) -> Option<Pid> {
        let id = self.child.as_ref()?.id();
        i32::try_from(id).ok().map(Pid::from_raw)
    }

    /// Reaps the wrapper if it has exited; `None` while it runs (or when there is none).
    fn child_exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let leader = Pid::from_raw(i32::try_from(child.id()).ok()?);
        // Look without reaping first: while the exited leader is unreaped its pid, which is the
        // group id, cannot be reused, so the VM's leftovers can be signalled safely.
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(leader), flags) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => {}
            Err(errno) => {
                warn!(node = %self.node_name, %errno, "cannot query the node process");
                return None;
            }
        }
        signal_group(leader, Signal::SIGKILL);
        let status = child.wait();
        self.child = None;
        match status {
            Ok(status) => Some(status),
            Err(err) => {
                warn!(node = %self.node_name, error = %err, "cannot reap the node process");
                None
            }
        }
    }

    /// Waits until the wrapper has exited and has been reaped; `None` on timeout.
    async fn wait_child_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.child_exit_status() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the Erlang VM itself is gone: it is not our child, so reaping the wrapper
    /// does not prove that it has released its ports and its database yet.
    async fn wait_server_gone(&self, deadline: Instant) {
        let Some(pid) = self
            .server_pid
            .or_else(|| read_pid_file(&self.layout.pid_file))
        else {
            return;
        };
        while process_alive(pid) {
            if Instant::now() >= deadline {
                warn!(node = %self.node_name, pid = pid.as_raw(), "Erlang VM still alive");
                return;
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    fn claim_exact(&mut self, port: u16) -> Result<u16> {
        let mut claimed = lock_claims();
        if claimed.contains(&port) || !port_is_free(port) {
            return Err(NodeError::PortInUse { port });
        }
        claimed.push(port);
        self.claimed.push(port);
        Ok(port)
    }

    /// `previous` if it is still free, otherwise any free loopback port.
    fn claim_port(&mut self, previous: Option<u16>) -> Result<u16> {
        let mut claimed = lock_claims();
        let usable = |port: u16, claimed: &[u16]| {
            port != 0 && !claimed.contains(&port) && !CLI_DIST_PORTS.contains(&port)
        };
        let port = match previous {
            Some(port) if usable(port, &claimed) && port_is_free(port) => port,
            _ => {
                let mut found = None;
                for _ in 0..100 {
                    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                        .map_err(|source| NodeError::NoFreePort { source })?;
                    let port = listener
                        .local_addr()
                        .map_err(|source| NodeError::NoFreePort { source })?
                        .port();
                    if usable(port, &claimed) {
                        found = Some(port);
                        break;
                    }
                }
                found.ok_or_else(|| NodeError::NoFreePort {
                    source: io::Error::other("every port offered was already taken"),
                })?
            }
        };
        claimed.push(port);
        self.claimed.push(port);
        Ok(port)
    }

    /// The last lines of the console output and of the node's log, password redacted.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for path in [
            self.layout.console_log.clone(),
            self.layout.node_log(&self.node_name),
        ] {
            match tail_lines(&path, LOG_TAIL_LINES) {
                Ok(lines) if lines.is_empty() => {}
                Ok(lines) => {
                    out.push_str(&format!("--- last lines of {} ---\n", path.display()));
                    out.push_str(&lines);
                    if !lines.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => out.push_str(&format!("({}: {err})\n", path.display())),
            }
        }
        if out.is_empty() {
            out.push_str("(the node wrote no logs)\n");
        }
        self.redact(&out)
    }

    fn redact(&self, text: &str) -> String {
        text.replace(&self.password.0, "***")
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Signal before reaping: an unreaped leader keeps the group id from being reused.
            if let Ok(leader) = i32::try_from(child.id()) {
                signal_group(Pid::from_raw(leader), Signal::SIGKILL);
            }
            if let Err(err) = child.wait() {
                warn!(node = %self.node_name, error = %err, "cannot reap the node process");
            }
            info!(node = %self.node_name, "RabbitMQ node killed on drop");
        }
        let mut claimed = lock_claims();
        claimed.retain(|port| !self.claimed.contains(port));
    }
}

/// Gives the command's process `PR_SET_PDEATHSIG(SIGTERM)`, and makes it fail to start when
/// this process died before the signal was set (it would never come).
#[allow(unsafe_code)]
fn stop_with_parent(command: &mut std::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: prctl and getppid are async-signal-safe system calls; the closure allocates
    // nothing and touches no memory of the parent's.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Finds `rabbitmq-server`: Debian's `/usr/lib/rabbitmq/bin` first (its `/usr/sbin` wrapper
/// switches to the `rabbitmq` user when run as root), then `PATH`.
///
/// # Errors
/// [`NodeError::NotInstalled`], whose message gives the command that installs it.
pub fn locate_server() -> Result<PathBuf> {
    let preferred = Path::new(DEBIAN_BIN_DIR).join("rabbitmq-server");
    if is_executable(&preferred) {
        return Ok(preferred);
    }
    find_on_path("rabbitmq-server").ok_or(NodeError::NotInstalled {
        tool: "rabbitmq-server",
    })
}

/// `rabbitmqctl` next to the server, else on `PATH`.
fn locate_tool(server: &Path, tool: &'static str) -> Result<PathBuf> {
    if let Some(dir) = server.parent() {
        let sibling = dir.join(tool);
        if is_executable(&sibling) {
            return Ok(sibling);
        }
    }
    find_on_path(tool).ok_or(NodeError::NotInstalled { tool })
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// How often channels look for deliveries past `consumer_timeout`: a fifth of it, so a timeout
/// fires at most 20 % late, between 100 ms and RabbitMQ's default of 60 s.
fn channel_tick_ms(consumer_timeout: Duration) -> u128 {
    (consumer_timeout.as_millis() / 5).clamp(100, 60_000)
}

/// `amqp://gridq:PASSWORD@127.0.0.1:PORT/VHOST` with the vhost percent-encoded.
fn amqp_url(password: &str, port: u16, vhost: &str) -> String {
    format!(
        "amqp://{USER}:{password}@127.0.0.1:{port}/{}",
        percent_encode(vhost)
    )
}

pub use crate::amqp::percent_encode;

/// `len` characters drawn uniformly from `[A-Za-z0-9]` by the system's random generator.
fn random_alphanumeric(len: usize) -> Result<String> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).map_err(|err| NodeError::Random {
            reason: err.to_string(),
        })?;
        // 248 = 4 * 62: rejecting the bytes above keeps every character equally likely.
        for &byte in buf.iter().filter(|&&byte| byte < 248) {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(byte % 62)]));
        }
    }
    Ok(out)
}

fn load_or_create_password(layout: &Layout) -> Result<Password> {
    match fs::read_to_string(&layout.credentials) {
        Ok(text) => {
            let password = text.trim();
            if password.len() < 16 || !password.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(NodeError::BadStateFile {
                    path: layout.credentials.clone(),
                    reason: "expected one line of at least 16 letters and digits".into(),
                });
            }
            Ok(Password(password.to_string()))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let has_database = fs::read_dir(&layout.mnesia_dir)
                .map_err(|e| NodeError::io("read directory", &layout.mnesia_dir, e))?
                .next()
                .is_some();
            if has_database {
                return Err(NodeError::CredentialsMissing {
                    dir: layout.dir.clone(),
                });
            }
            let password = random_alphanumeric(PASSWORD_LEN)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&layout.credentials)
                .map_err(|e| NodeError::io("create", &layout.credentials, e))?;
            file.write_all(format!("{password}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| NodeError::io("write", &layout.credentials, e))?;
            Ok(Password(password))
        }
        Err(err) => Err(NodeError::io("read", &layout.credentials, err)),
    }
}

fn load_saved_node(path: &Path) -> Result<Option<SavedNode>> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(NodeError::io("read", path, err)),
    };
    let saved: SavedNode =
        serde_json::from_slice(&text).map_err(|err| NodeError::BadStateFile {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    let valid_name = saved
        .node_name
        .strip_suffix("@localhost")
        .is_some_and(|short| {
            !short.is_empty()
                && short
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid_name {
        return Err(NodeError::BadStateFile {
            path: path.to_path_buf(),
            reason: format!("invalid node name {:?}", saved.node_name),
        });
    }
    Ok(Some(saved))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| NodeError::io("create directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| NodeError::io("set permissions of", dir, e))
}

/// Writes `contents` to a temporary file with `mode` and renames it over `path`.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    remove_if_exists(&tmp)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| NodeError::io("create", &tmp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| NodeError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| NodeError::io("replace", path, e))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(NodeError::io("remove", path, err))
        }
        _ => Ok(()),
    }
}

fn read_pid_file(path: &Path) -> Option<Pid> {
    let text = fs::read_to_string(path).ok()?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&pid| pid > 0)
        .map(Pid::from_raw)
}

/// Whether `pid` is a live process; a zombie (dead, waiting to be reaped) counts as gone.
fn process_alive(pid: Pid) -> bool {
    match kill(pid, None) {
        Err(Errno::ESRCH) => false,
        _ => {
            // Field 3 of /proc/PID/stat, after the parenthesised command name, is the state.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
    }
}

fn signal_group(group: Pid, signal: Signal) {
    match killpg(group, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(errno) => {
            warn!(group = group.as_raw(), %errno, "cannot signal the node's process group")
        }
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

async fn wait_port_free(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if port_is_free(port) {
            return true;
        }
        if Instant::now() >= deadline {
            debug!(port, "previous port still busy; picking another");
            return false;
        }
        sleep(POLL_INTERVAL).await;
    }
}

fn lock_claims() -> std::sync::MutexGuard<'static, Vec<u16>> {
    // The list stays consistent even if a holder panicked: every update is a single push/retain.
    CLAIMED_PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits until epmd no longer lists the node's short name. After a crash epmd notices the
/// dead VM's closed socket quickly, but a restart that races it fails with "name in use".
async fn wait_name_free(node_name: &str, dir: &Path, limit: Duration) -> Result<()> {
    let short = node_name.split('@').next().unwrap_or(node_name);
    let deadline = Instant::now() + limit;
    loop {
        match epmd_names().await {
            Ok(names) if names.iter().any(|name| name == short) => {}
            Ok(_) => return Ok(()),
            Err(err) => {
                // No epmd (or one we cannot read): the VM starts or reuses one itself.
                debug!(error = %err, "cannot query epmd; assuming the node name is free");
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(NodeError::NameInUse {
                node: node_name.into(),
                dir: dir.to_path_buf(),
                timeout: limit,
            });
        }
        sleep(POLL_INTERVAL).await;
    }
}

/// The names registered with the local epmd (its `NAMES_REQ`), empty when none runs.
async fn epmd_names() -> io::Result<Vec<String>> {
    let port = std::env::var("ERL_EPMD_PORT")
        .ok()
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or(4369);
    let exchange = async {
        let mut stream = match tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Ok(stream) => stream,
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                return Ok(Vec::new());
            }
            Err(err) => return Err(err),
        };
        // Two-byte length, then 'n' (NAMES_REQ); epmd answers with its port and one
        // "name NAME at port PORT" line per node, then closes.
        stream.write_all(&[0, 1, b'n']).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        let text = reply
            .get(4..)
            .ok_or_else(|| io::Error::other("short reply from epmd"))?;
        Ok(String::from_utf8_lossy(text)
            .lines()
            .filter_map(|line| line.strip_prefix("name "))
            .filter_map(|rest| rest.split(" at port ").next())
            .map(str::to_owned)
            .collect())
    };
    timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| io::Error::other("epmd did not answer within 2 s"))?
}

/// The last `lines` lines of a text file (reading at most its last 64 KiB).
fn tail_lines(path: &Path, lines: usize) -> io::Result<String> {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_installed_message_names_the_install_command() {
        let message = NodeError::NotInstalled {
            tool: "rabbitmq-server",
        }
        .to_string();
        assert!(
            message.contains("`sudo apt-get install rabbitmq-server`"),
            "{message}"
        );
        assert!(message.contains("`rabbitmq-server`"), "{message}");
        assert!(message.contains(DEBIAN_BIN_DIR), "{message}");
    }

    #[test]
    fn urls_encode_the_vhost_and_redaction_hides_the_password() {
        assert_eq!(
            amqp_url("s3cret", 5999, "/"),
            "amqp://gridq:s3cret@127.0.0.1:5999/%2F"
        );
        assert_eq!(
            amqp_url("***", 5999, "test a/b"),
            "amqp://gridq:***@127.0.0.1:5999/test%20a%2Fb"
        );
        assert_eq!(percent_encode("a-Z_0.9~"), "a-Z_0.9~");
        assert_eq!(percent_encode("é%"), "%C3%A9%25");
    }

    #[test]
    fn passwords_are_long_alphanumeric_and_differ() {
        let first = random_alphanumeric(PASSWORD_LEN).unwrap();
        let second = random_alphanumeric(PASSWORD_LEN).unwrap();
        assert_eq!(first.len(), PASSWORD_LEN);
        assert!(first.bytes().all(|b| b.is_ascii_alphanumeric()), "{first}");
        assert_ne!(first, second);
        assert_eq!(format!("{:?}", Password(first.clone())), "Password(***)");
    }

    #[test]
    fn credentials_are_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        fs::create_dir_all(&layout.mnesia_dir).unwrap();
        let created = load_or_create_password(&layout).unwrap();
        let mode = fs::metadata(&layout.credentials)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_password(&layout).unwrap().0, created.0);
    }

    #[test]
    fn lost_credentials_with_a_database_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        fs::create_dir_all(layout.mnesia_dir.join("gridq-x@localhost")).unwrap();
        let err = load_or_create_password(&layout).unwrap_err();
        assert!(matches!(err, NodeError::CredentialsMissing { .. }), "{err}");
    }

    #[test]
    fn channel_tick_follows_short_consumer_timeouts() {
        assert_eq!(channel_tick_ms(Duration::from_secs(5)), 1000);
        assert_eq!(channel_tick_ms(Duration::from_millis(50)), 100);
        assert_eq!(channel_tick_ms(Duration::from_secs(1800)), 60_000);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        let tail = tail_lines(&path, 3).unwrap();
        assert_eq!(tail, "line 28\nline 29\nline 30");
    }
}
