//! From a [`Cluster`] to the containers of each place: names, commands, ports, mounts.
//!
//! Networking: the broker is on Docker's bridge with only its AMQP port published (on
//! `master.broker_bind`) and its management API on the master host's loopback; the master and
//! the workers use the host's network, so the monitor binds to the master host's own loopback
//! and jobs see the host's interfaces (NCCL, InfiniBand, ports of their own).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::{Cluster, HostRef};
use super::containers::{ContainerSpec, File, Mounted, Network, Role};

/// The broker's credentials, generated once per cluster and kept in the project's
/// `.gridq/cluster-NAME.secrets.json` (0600); recovered from the broker container when that
/// file is gone, since RabbitMQ only applies `default_user` to a fresh data volume.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    /// The broker user (never `guest`).
    pub broker_user: String,
    /// Its password.
    pub broker_password: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("broker_user", &self.broker_user)
            .field("broker_password", &"<redacted>")
            .finish()
    }
}

impl Secrets {
    /// New random credentials.
    pub fn generate() -> Self {
        Self {
            broker_user: format!("gridq-{}", random_hex(4)),
            broker_password: random_hex(24),
        }
    }

    /// Reads the secrets file, if there is one.
    ///
    /// # Errors
    /// A message naming the file when it exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Option<Self>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the secrets file with mode 0600 (its directory 0700).
    ///
    /// # Errors
    /// A message naming the file.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(fail)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)
    }

    /// Recovers the credentials from the broker's `rabbitmq.conf` text.
    pub fn from_broker_conf(text: &str) -> Option<Self> {
        let value = |key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_owned())
            })
        };
        Some(Self {
            broker_user: value("default_user")?,
            broker_password: value("default_pass")?,
        })
    }

    /// The AMQP URL for `host:port` (it holds the password: never print it unredacted).
    pub fn broker_url(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!(
            "amqp://{}:{}@{host}:{port}/%2f",
            self.broker_user, self.broker_password
        )
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the broker's config goes, and its name there.
pub const BROKER_CONF_DIR: &str = "/etc/rabbitmq";
/// See [`BROKER_CONF_DIR`].
pub const BROKER_CONF: &str = "conf.d/10-gridq.conf";
/// The master's state directory in its container (a volume).
pub const MASTER_STATE: &str = "/var/lib/gridq";

/// Container names.
pub fn broker_name(cluster: &str) -> String {
    format!("gridq-{cluster}-broker")
}
/// See [`broker_name`].
pub fn master_name(cluster: &str) -> String {
    format!("gridq-{cluster}-master")
}
/// A worker container's name: one per host, or one per GPU.
pub fn worker_name(cluster: &str, place: HostRef, gpu: Option<u32>) -> String {
    let base = format!("gridq-{cluster}-worker-{place}");
    match gpu {
        Some(g) => format!("{base}-gpu{g}"),
        None => base,
    }
}

/// What deploy found out about a worker place before building its specs.
#[derive(Debug, Clone, Default)]
pub struct WorkerFacts {
    /// `uid:gid` of the SSH user (jobs write files as them).
    pub user: Option<String>,
    /// The absolute project path on the host.
    pub project_dir: String,
    /// The GPUs to use (host indexes).
    pub gpus: Vec<u32>,
    /// The worker image's ID there.
    pub image_id: String,
}

/// The broker's container.
pub fn broker_spec(cluster: &Cluster, secrets: &Secrets, image_id: &str) -> ContainerSpec {
    let m = &cluster.file.master;
    let conf = format!(
        "# Written by gridq deploy.\ndefault_user = {}\ndefault_pass = {}\ndefault_vhost = /\nconsumer_timeout = {}\nlisteners.tcp.default = 5672\nmanagement.tcp.port = 15672\n",
        secrets.broker_user,
        secrets.broker_password,
        m.consumer_timeout.as_millis()
    );
    ContainerSpec {
        name: broker_name(cluster.name()),
        cluster: cluster.name().to_owned(),
        role: Role::Broker,
        host: cluster.place_label(m.host),
        image: cluster.file.images.broker.clone(),
        image_id: image_id.to_owned(),
        cmd: Vec::new(),
        env: Vec::new(),
        user: None,
        network: Network::Published(vec![
            (m.broker_bind.clone(), m.broker_port, 5672),
            ("127.0.0.1".to_owned(), m.management_port, 15672),
        ]),
        mounts: vec![Mounted::Volume {
            name: format!("gridq-{}-broker", cluster.name()),
            target: "/var/lib/rabbitmq".to_owned(),
        }],
        gpus: Vec::new(),
        // uid 999 is rabbitmq in the official image; gridq-rabbitmq copies it as root.
        files: vec![File {
            base: BROKER_CONF_DIR.to_owned(),
            path: BROKER_CONF.to_owned(),
            mode: 0o600,
            uid: 999,
            gid: 999,
            contents: conf,
        }],
        stop_timeout: 60,
    }
}

/// Where the master reaches the broker on its own host.
fn local_broker_addr(cluster: &Cluster) -> String {
    let bind = &cluster.file.master.broker_bind;
    match bind.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() || ip.is_loopback() => "127.0.0.1".to_owned(),
        _ => bind.clone(),
    }
}

/// The master's container.
pub fn master_spec(cluster: &Cluster, secrets: &Secrets, image_id: &str) -> ContainerSpec {
    let m = &cluster.file.master;
    ContainerSpec {
        name: master_name(cluster.name()),
        cluster: cluster.name().to_owned(),
        role: Role::Master,
        host: cluster.place_label(m.host),
        image: cluster.file.images.gridq.clone(),
        image_id: image_id.to_owned(),
        cmd: vec![
            "master".into(),
            "--state-dir".into(),
            MASTER_STATE.into(),
            "--listen".into(),
            format!("127.0.0.1:{}", m.monitor_port),
            "--heartbeat-timeout".into(),
            humantime::format_duration(m.heartbeat_timeout).to_string(),
            "--management-url".into(),
            format!("http://127.0.0.1:{}", m.management_port),
        ],
        env: vec![format!(
            "GRIDQ_BROKER={}",
            secrets.broker_url(&local_broker_addr(cluster), m.broker_port)
        )],
        user: None,
        network: Network::Host,
        mounts: vec![Mounted::Volume {
            name: format!("gridq-{}-master", cluster.name()),
            target: MASTER_STATE.to_owned(),
        }],
        gpus: Vec::new(),
        files: Vec::new(),
        stop_timeout: 30,
    }
}

/// The worker containers of one place: one, or one per GPU.
pub fn worker_specs(
    cluster: &Cluster,
    secrets: &Secrets,
    index: usize,
    facts: &WorkerFacts,
) -> Vec<ContainerSpec> {
    let w = &cluster.file.workers[index];
    let m = &cluster.file.master;
    let host_name = cluster
        .host(w.host)
        .map_or_else(|| "local".to_owned(), |h| h.addr.clone());
    let spec = |gpus: Vec<u32>, name: String| {
        let mut cmd = vec!["--on-stop".to_owned(), "requeue".to_owned()];
        if !w.queues.is_empty() {
            cmd.push("--queue".into());
            cmd.push(w.queues.join(","));
        }
        if gpus.is_empty() {
            if let Some(s) = w.slots {
                cmd.push("--slots".into());
                cmd.push(s.to_string());
            }
        } else {
            // The container sees its GPUs renumbered from 0.
            cmd.push("--gpus".into());
            cmd.push(
                (0..gpus.len())
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        ContainerSpec {
            name,
            cluster: cluster.name().to_owned(),
            role: Role::Worker,
            host: cluster.place_label(w.host),
            image: cluster.file.images.worker.clone(),
            image_id: facts.image_id.clone(),
            cmd,
            env: vec![
                format!(
                    "GRIDQ_BROKER={}",
                    secrets.broker_url(&cluster.master_addr, m.broker_port)
                ),
                format!("GRIDQ_HOSTNAME={host_name}"),
            ],
            user: facts.user.clone(),
            network: Network::Host,
            mounts: vec![Mounted::Bind {
                source: facts.project_dir.clone(),
                target: "/project".to_owned(),
            }],
            gpus,
            files: Vec::new(),
            stop_timeout: 30,
        }
    };
    if w.per_gpu && !facts.gpus.is_empty() {
        facts
            .gpus
            .iter()
            .map(|g| spec(vec![*g], worker_name(cluster.name(), w.host, Some(*g))))
            .collect()
    } else {
        vec![spec(
            facts.gpus.clone(),
            worker_name(cluster.name(), w.host, None),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::config::ClusterFile;

    #[test]
    fn secrets_round_trip_through_the_broker_conf() {
        let s = Secrets::generate();
        assert!(s.broker_user.starts_with("gridq-"));
        assert_eq!(s.broker_password.len(), 48);
        let c = ClusterFile::parse(
            "name: t\nremote_path: p\nhosts: [u@10.0.0.1]\nmaster: {host: 1}\nworkers: [{host: 1, per_gpu: true}]\n",
            "t",
        )
        .unwrap()
        .resolve(Path::new("/p"), "t")
        .unwrap();
        let b = broker_spec(&c, &s, "sha256:x");
        assert_eq!(
            Secrets::from_broker_conf(&b.files[0].contents),
            Some(s.clone())
        );
        assert!(b.files[0].contents.contains("consumer_timeout = 3600000\n"));
        assert!(!format!("{s:?}").contains(&s.broker_password));
        let facts = WorkerFacts {
            user: Some("1000:1000".into()),
            project_dir: "/home/u/p".into(),
            gpus: vec![2, 3],
            image_id: "sha256:w".into(),
        };
        let w = worker_specs(&c, &s, 0, &facts);
        assert_eq!(
            w.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["gridq-t-worker-1-gpu2", "gridq-t-worker-1-gpu3"]
        );
        assert_eq!(w[1].gpus, vec![3]);
        assert_eq!(
            w[1].cmd,
            ["--on-stop", "requeue", "--queue", "default", "--gpus", "0"]
        );
        assert_eq!(
            w[0].env[0],
            format!(
                "GRIDQ_BROKER=amqp://{}:{}@10.0.0.1:5672/%2f",
                s.broker_user, s.broker_password
            )
        );
    }
}
