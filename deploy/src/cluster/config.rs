//! The cluster file (`gridq-cluster.yaml`): which hosts, which roles, which images and ports.
//!
//! `gridq deploy` writes one into the project on every run, from its mlframework-style flags
//! (`-a -i -r -d -m -w`); `-f` reuses it, and `--config FILE` takes a hand-written one with the
//! same fields. The YAML is parsed into [`ClusterFile`] (unknown fields refused, errors with
//! the file, line and column), then [`ClusterFile::resolve`] checks what serde cannot (host
//! numbers in range, one master, ports distinct) and gives a [`Cluster`].
//!
//! Secrets are never in this file: the broker's user and password live in
//! `.gridq/cluster-NAME.secrets.json` (mode 0600, never synced), and the monitor token stays in
//! the master's state volume, read back through the Docker API when needed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hosts::{Host, parse_hosts};

/// The file name `gridq deploy` writes into the project.
pub const CLUSTER_FILE: &str = "gridq-cluster.yaml";

/// The default broker image: RabbitMQ with its management plugin (`scripts/build-images.sh`
/// builds `gridq-rabbitmq:local` without a registry). Workers run in the project's own image
/// ([`ClusterFile::worker_image`]), which has no default; the master needs no image of its own.
pub const DEFAULT_BROKER_IMAGE: &str = "rabbitmq:3-management";

/// A bad cluster file or bad deploy flags. Messages name the file (and line) or the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The cluster file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not parse into a cluster file.
    #[error("{path}: {message}")]
    Yaml {
        /// The cluster file.
        path: String,
        /// serde_yaml's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{origin}: {field}: {message}")]
    Invalid {
        /// The cluster file, or `command line`.
        origin: String,
        /// The field, e.g. `workers[2].host`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with [`ConfigError`].
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Where a role runs: this machine, or host N of `hosts` (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostRef {
    /// The machine gridq runs on (its own Docker engine, no SSH).
    Local,
    /// Host N of the list, from 1.
    Index(usize),
}

impl HostRef {
    /// Parses `local` or a host number.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("local") {
            return Ok(Self::Local);
        }
        match t.parse::<usize>() {
            Ok(0) => Err("hosts are numbered from 1".into()),
            Ok(n) => Ok(Self::Index(n)),
            Err(_) => Err(format!("`{t}` is neither `local` nor a host number")),
        }
    }
}

impl fmt::Display for HostRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Index(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for HostRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Local => s.serialize_str("local"),
            Self::Index(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for HostRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => HostRef::parse(&n.to_string()).map_err(serde::de::Error::custom),
            Raw::S(s) => HostRef::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// GPUs for a worker: detected, none, or given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Gpus {
    /// Detected on the host: the NVIDIA runtime in `docker info` and GPUs from `nvidia-smi`.
    #[default]
    Auto,
    /// No GPUs, even where there are some.
    None,
    /// Every GPU of the host; deploy fails where there is none.
    All,
    /// These GPU indexes.
    List(Vec<u32>),
}

impl Gpus {
    /// Parses `auto`, `none`, `all` or a comma list of indexes.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "none" | "off" => Ok(Self::None),
            "all" | "on" => Ok(Self::All),
            list => list
                .split(',')
                .map(|i| {
                    i.trim().parse::<u32>().map_err(|_| {
                        format!("`{text}` is not auto, none, all or a list of GPU indexes")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Self::List),
        }
    }
}

impl Serialize for Gpus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::None => s.serialize_str("none"),
            Self::All => s.serialize_str("all"),
            Self::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            L(Vec<u32>),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::L(l) => Ok(Gpus::List(l)),
            Raw::S(s) => Gpus::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// How to log in to the hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    /// The private key (`-i`); relative paths are relative to the cluster file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// The known_hosts file; `~/.ssh/known_hosts` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<PathBuf>,
    /// An ssh config file, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Accept keys of hosts not yet in known_hosts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_new_host_keys: bool,
}

/// The master host: broker, master and monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSection {
    /// `local` or a host number.
    pub host: HostRef,
    /// The address workers reach the broker at; default: the master host's address (for a
    /// local master with remote workers it must be given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The AMQP port on the master host.
    #[serde(default = "default_broker_port")]
    pub broker_port: u16,
    /// The interface the AMQP port is published on (all by default: workers elsewhere connect).
    #[serde(default = "default_broker_bind")]
    pub broker_bind: String,
    /// RabbitMQ's management API, published on the master host's loopback only.
    #[serde(default = "default_management_port")]
    pub management_port: u16,
    /// The monitor (and API), on the master host's loopback only.
    #[serde(default = "default_monitor_port")]
    pub monitor_port: u16,
    /// RabbitMQ's consumer_timeout. A worker slot holds a delivery only until the master
    /// answers its claim, so this bounds a master outage before deliveries count towards the
    /// delivery limit; it does not bound job length.
    #[serde(default = "default_consumer_timeout", with = "humantime_serde_str")]
    pub consumer_timeout: Duration,
    /// A worker silent this long is lost and its jobs run again.
    #[serde(default = "default_heartbeat_timeout", with = "humantime_serde_str")]
    pub heartbeat_timeout: Duration,
}

/// One worker host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// `local` or a host number.
    pub host: HostRef,
    /// Jobs at once per container (default: the host's CPUs; one per GPU with GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<usize>,
    /// `auto`, `none`, `all` or a list of indexes.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub gpus: Gpus,
    /// One container per GPU instead of one per host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_gpu: bool,
    /// Queues to take jobs from.
    #[serde(default = "default_queues")]
    pub queues: Vec<String>,
}

fn is_auto(g: &Gpus) -> bool {
    *g == Gpus::Auto
}

/// The images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSection {
    /// Files written by gridq 0.x before workers ran in the project's image: `gridq` (the
    /// master image, no longer used) and `worker` (taken as `worker_image` when that is not
    /// set). Read, never written.
    #[serde(default, skip_serializing)]
    pub gridq: Option<String>,
    /// See `gridq`.
    #[serde(default, skip_serializing)]
    pub worker: Option<String>,
    /// The RabbitMQ image.
    #[serde(default = "default_broker_image")]
    pub broker: String,
    /// Pull missing images from a registry instead of streaming them from this machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull: bool,
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            gridq: None,
            worker: None,
            broker: default_broker_image(),
            pull: false,
        }
    }
}

/// The cluster file, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The cluster's name: the `gridq.cluster` label on everything deploy starts.
    pub name: String,
    /// The project directory, relative to the cluster file.
    #[serde(default = "default_project")]
    pub project: PathBuf,
    /// Where the project goes on the hosts, relative to the remote home.
    pub remote_path: String,
    /// `[user@]host[:port]`, numbered from 1.
    pub hosts: Vec<String>,
    /// How to log in.
    #[serde(default, skip_serializing_if = "is_default_ssh")]
    pub ssh: SshSection,
    /// The master host.
    pub master: MasterSection,
    /// The worker hosts.
    pub workers: Vec<WorkerSection>,
    /// The image the workers, and so the jobs, run in: the project's own (say its PyTorch and
    /// CUDA image), unchanged. Hosts that have it use theirs; otherwise it is pulled
    /// (`images.pull`) or sent once from this machine. gridq itself comes as one static
    /// binary mounted read-only into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_image: Option<String>,
    /// The static gridq binary that deploy puts on every host (default: the running `gridq`,
    /// when it is statically linked; `scripts/release.sh` builds one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gridq_binary: Option<PathBuf>,
    /// The images.
    #[serde(default)]
    pub images: ImagesSection,
    /// How the project is synced, kept so that `update` sends the same selection as deploy.
    #[serde(default, skip_serializing_if = "SyncSection::is_default")]
    pub sync: SyncSection,
}

/// How the project is synced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// Leave out what `.gitignore` files leave out (deploy's `--no-gitignore` sets false).
    #[serde(default = "yes")]
    pub gitignore: bool,
}

impl Default for SyncSection {
    fn default() -> Self {
        Self { gitignore: true }
    }
}

impl SyncSection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn yes() -> bool {
    true
}

fn is_default_ssh(s: &SshSection) -> bool {
    *s == SshSection::default()
}

fn default_project() -> PathBuf {
    PathBuf::from(".")
}
fn default_broker_port() -> u16 {
    5672
}
fn default_broker_bind() -> String {
    "0.0.0.0".into()
}
fn default_management_port() -> u16 {
    15672
}
fn default_monitor_port() -> u16 {
    8642
}
fn default_consumer_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_queues() -> Vec<String> {
    vec!["default".into()]
}
fn default_broker_image() -> String {
    DEFAULT_BROKER_IMAGE.into()
}

/// Durations written as `90s`, `1h`, ... in the file.
mod humantime_serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e} (e.g. 30s, 15m, 1h)")))
    }
}

impl MasterSection {
    /// A master on `host` with the default ports.
    pub fn on(host: HostRef) -> Self {
        Self {
            host,
            address: None,
            broker_port: default_broker_port(),
            broker_bind: default_broker_bind(),
            management_port: default_management_port(),
            monitor_port: default_monitor_port(),
            consumer_timeout: default_consumer_timeout(),
            heartbeat_timeout: default_heartbeat_timeout(),
        }
    }
}

impl WorkerSection {
    /// A worker on `host` with the defaults.
    pub fn on(host: HostRef) -> Self {
        Self {
            host,
            slots: None,
            gpus: Gpus::Auto,
            per_gpu: false,
            queues: default_queues(),
        }
    }
}

impl ClusterFile {
    /// Reads and parses a cluster file.
    ///
    /// # Errors
    /// [`ConfigError::Io`] or [`ConfigError::Yaml`] naming the file (and line and column).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses cluster-file text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Yaml`].
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut file: Self = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        if let Some(old) = file.images.worker.take() {
            file.worker_image.get_or_insert(old);
        }
        file.images.gridq = None;
        Ok(file)
    }

    /// The YAML text, with a header saying where it came from.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).unwrap_or_default();
        format!(
            "# gridq cluster file, written by `gridq deploy`. Edit it and run `gridq deploy -f`\n\
             # (or `gridq deploy --config FILE`); `gridq clean` removes what it started.\n\
             # Secrets are not here: see .gridq/cluster-{}.secrets.json.\n{body}",
            self.name
        )
    }

    /// Writes the file atomically (a temporary file renamed over it).
    ///
    /// # Errors
    /// [`ConfigError::Io`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        };
        // Unchanged content is not rewritten: the file is synced with the project, and a new
        // mtime would make every re-deploy send it again.
        if std::fs::read_to_string(path).is_ok_and(|old| old == self.to_yaml()) {
            return Ok(());
        }
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, self.to_yaml()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Checks what serde cannot and resolves paths against `base` (the cluster file's
    /// directory).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field; `origin` names the file or the flags.
    pub fn resolve(&self, base: &Path, origin: &str) -> Result<Cluster> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            field: field.to_owned(),
            message,
        };
        check_name(&self.name).map_err(|m| invalid("name", m))?;
        let hosts = if self.hosts.is_empty() {
            Vec::new()
        } else {
            parse_hosts(&self.hosts.join(",")).map_err(|e| {
                invalid(
                    "hosts",
                    e.to_string().trim_start_matches("--hosts: ").to_owned(),
                )
            })?
        };
        let check_ref = |field: &str, r: HostRef| match r {
            HostRef::Index(n) if n > hosts.len() => Err(invalid(
                field,
                format!(
                    "host {n} does not exist: {} host{} listed",
                    hosts.len(),
                    if hosts.len() == 1 { " is" } else { "s are" }
                ),
            )),
            _ => Ok(()),
        };
        check_ref("master.host", self.master.host)?;
        if self.workers.is_empty() {
            return Err(invalid("workers", "no worker host given".into()));
        }
        let mut seen = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let field = format!("workers[{}].host", i + 1);
            check_ref(&field, w.host)?;
            if seen.contains(&w.host) {
                return Err(invalid(&field, format!("host {} is listed twice", w.host)));
            }
            seen.push(w.host);
            if w.slots == Some(0) {
                return Err(invalid(
                    &format!("workers[{}].slots", i + 1),
                    "must be at least 1".into(),
                ));
            }
            if w.queues.is_empty() {
                return Err(invalid(
                    &format!("workers[{}].queues", i + 1),
                    "give at least one queue".into(),
                ));
            }
        }
        let m = &self.master;
        let ports = [
            ("master.broker_port", m.broker_port),
            ("master.management_port", m.management_port),
            ("master.monitor_port", m.monitor_port),
        ];
        for (i, (field, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(invalid(field, "0 is not a port".into()));
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(invalid(field, format!("{port} is also {other}")));
            }
        }
        if m.broker_bind.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                "master.broker_bind",
                format!("`{}` is not an IP address", m.broker_bind),
            ));
        }
        let master_addr = match (m.host, &m.address) {
            (_, Some(a)) => a.clone(),
            (HostRef::Index(n), None) => hosts[n - 1].addr.clone(),
            (HostRef::Local, None) => {
                if self.workers.iter().all(|w| w.host == HostRef::Local) {
                    "127.0.0.1".to_owned()
                } else {
                    return Err(invalid(
                        "master.address",
                        "a local master with remote workers needs the address they reach this machine at (--master-address)".into(),
                    ));
                }
            }
        };
        if self.remote_path.trim().is_empty() {
            return Err(invalid("remote_path", "must not be empty".into()));
        }
        let rel = |p: &Path| {
            if p.is_absolute() || p.as_os_str() == "none" {
                p.to_path_buf()
            } else if p.as_os_str() == "." {
                base.to_path_buf()
            } else {
                base.join(p)
            }
        };
        Ok(Cluster {
            file: self.clone(),
            project: rel(&self.project),
            hosts,
            master_addr,
            identity: self.ssh.identity.as_deref().map(rel),
            known_hosts: self.ssh.known_hosts.as_deref().map(rel),
            ssh_config: self.ssh.config.as_deref().map(rel),
            gridq_binary: self.gridq_binary.as_deref().map(rel),
        })
    }
}

/// Cluster names go into container, volume and label names: `[a-z0-9][a-z0-9_.-]*`, at most
/// 40 characters.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a cluster name: use lowercase letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 40 characters"
        ))
    }
}

/// A checked cluster file.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The file as given.
    pub file: ClusterFile,
    /// The project directory on this machine.
    pub project: PathBuf,
    /// The hosts, numbered from 1.
    pub hosts: Vec<Host>,
    /// The address workers reach the broker at.
    pub master_addr: String,
    /// The key, resolved against the cluster file's directory.
    pub identity: Option<PathBuf>,
    /// The known_hosts file, resolved.
    pub known_hosts: Option<PathBuf>,
    /// The ssh config file, resolved.
    pub ssh_config: Option<PathBuf>,
    /// The static gridq binary to deploy, resolved.
    pub gridq_binary: Option<PathBuf>,
}

impl Cluster {
    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.file.name
    }

    /// The host a reference points at (`None` for local).
    pub fn host(&self, r: HostRef) -> Option<&Host> {
        match r {
            HostRef::Local => None,
            HostRef::Index(n) => self.hosts.get(n - 1),
        }
    }

    /// The label of a place in messages and in `gridq.host`: `local` or `[user@]addr[:port]`.
    pub fn place_label(&self, r: HostRef) -> String {
        self.host(r)
            .map_or_else(|| "local".to_owned(), Host::to_string)
    }

    /// Every place that runs something, master first, each once.
    pub fn places(&self) -> Vec<HostRef> {
        let mut places = vec![self.file.master.host];
        for w in &self.file.workers {
            if !places.contains(&w.host) {
                places.push(w.host);
            }
        }
        places
    }

    /// The hosts reached over SSH (every listed host that has a role).
    pub fn remote_hosts(&self) -> Vec<Host> {
        self.places()
            .into_iter()
            .filter_map(|p| self.host(p).cloned())
            .collect()
    }

    /// Where the secrets file lives.
    pub fn secrets_path(&self) -> PathBuf {
        self.project
            .join(".gridq")
            .join(format!("cluster-{}.secrets.json", self.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ClusterFile {
        ClusterFile::parse(text, "c.yaml").unwrap()
    }

    const BASIC: &str = "name: demo\nremote_path: gridq/demo\nhosts: [a@10.0.0.1, b@10.0.0.2:2222]\nmaster: {host: 1}\nworkers: [{host: 1}, {host: 2, slots: 4, gpus: [0, 1]}]\n";

    #[test]
    fn parses_defaults_and_round_trips() {
        let f = file(BASIC);
        assert_eq!(f.master.broker_port, 5672);
        assert_eq!(f.master.consumer_timeout, Duration::from_secs(3600));
        assert_eq!(f.workers[1].gpus, Gpus::List(vec![0, 1]));
        assert_eq!(f.images.broker, DEFAULT_BROKER_IMAGE);
        let again = ClusterFile::parse(&f.to_yaml(), "again").unwrap();
        assert_eq!(again, f);
        let c = f.resolve(Path::new("/p"), "c.yaml").unwrap();
        assert_eq!(c.master_addr, "10.0.0.1");
        assert_eq!(c.places(), vec![HostRef::Index(1), HostRef::Index(2)]);
        assert_eq!(c.place_label(HostRef::Index(2)), "b@10.0.0.2:2222");
    }

    #[test]
    fn unknown_fields_name_the_line() {
        let e = ClusterFile::parse(&format!("{BASIC}extra: 1\n"), "c.yaml").unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("c.yaml: unknown field `extra`"), "{m}");
        assert!(m.contains("line 6"), "{m}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (
                BASIC.replace("master: {host: 1}", "master: {host: 3}"),
                "c.yaml: master.host: host 3 does not exist: 2 hosts are listed",
            ),
            (
                BASIC.replace("{host: 1}, {host: 2", "{host: 2}, {host: 2"),
                "c.yaml: workers[2].host: host 2 is listed twice",
            ),
            (
                BASIC.replace("name: demo", "name: Demo!"),
                "c.yaml: name: `Demo!` is not a cluster name: use lowercase letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 40 characters",
            ),
            (
                BASIC.replace("master: {host: 1}", "master: {host: 1, monitor_port: 5672}"),
                "c.yaml: master.monitor_port: 5672 is also master.broker_port",
            ),
            (
                BASIC.replace("master: {host: 1}", "master: {host: local}"),
                "c.yaml: master.address: a local master with remote workers needs the address they reach this machine at (--master-address)",
            ),
            (
                BASIC.replace("slots: 4", "slots: 0"),
                "c.yaml: workers[2].slots: must be at least 1",
            ),
        ];
        for (text, want) in cases {
            let e = file(&text).resolve(Path::new("/p"), "c.yaml").unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let e = ClusterFile::parse(
            &BASIC.replace("workers: [{host: 1}", "workers: [{host: 0}"),
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hosts are numbered from 1"), "{e}");
        let e = ClusterFile::parse(
            &BASIC.replace(
                "master: {host: 1}",
                "master: {host: 1, heartbeat_timeout: soon}",
            ),
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`soon`"), "{e}");
    }
}
