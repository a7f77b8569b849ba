//! From a [`Cluster`] to the containers of each place: names, commands, ports, mounts.
//!
//! Networking: the broker is on Docker's bridge with only its AMQP-over-TLS port published (on
//! `master.broker_bind`; plain AMQP does not listen at all) and its management API on the
//! master host's loopback; the master and the workers use the host's network, so the monitor
//! binds to the master host's own loopback and jobs see the host's interfaces (NCCL,
//! InfiniBand, ports of their own).
//!
//! Broker users, one per role, all on the cluster's vhost (named after the cluster), created by
//! the broker itself from a definitions file at every start (so no default user, and never
//! `guest`): [`MASTER_USER`] with [`topology::master_permissions`], and one worker user per
//! worker place ([`worker_user`]) with [`topology::worker_permissions`]. Each container gets its
//! own URL in a file only its service user can read, with the cluster CA's certificate.

use std::collections::BTreeMap;
use std::path::Path;

use gridq_common::topology;

use serde::{Deserialize, Serialize};

use super::binary::{self, MOUNTED, RUNTIME_UID};
use super::config::{Cluster, HostRef};
use super::containers::{ContainerSpec, File, Mounted, Network, Role};

/// The master's broker user.
pub const MASTER_USER: &str = "gridq-master";
/// The management API's user for the monitor's queue statistics: tag `monitoring`, no AMQP
/// rights.
pub const MONITOR_USER: &str = "gridq-monitor";

/// The broker user of the workers at `place` (no dot in it: see
/// [`topology::may_speak_for`]).
pub fn worker_user(place: HostRef) -> String {
    format!("gridq-worker-{place}")
}

/// Where a container finds its broker URL (mode 0400, its service user's) and the cluster CA.
pub const CREDENTIALS_DIR: &str = "run/gridq";
/// See [`CREDENTIALS_DIR`].
pub const BROKER_FILE: &str = "/run/gridq/broker";
/// See [`CREDENTIALS_DIR`].
pub const CA_FILE: &str = "/run/gridq/ca.pem";
/// The user the master runs as in its runtime image: its credentials file is this user's.
pub const GRIDQ_IMAGE_UID: u64 = RUNTIME_UID;
/// The port the broker's TLS listener has inside its container.
pub const BROKER_TLS_PORT: u16 = 5671;

/// The broker's credentials, generated once per cluster and kept in the project's
/// `.gridq/cluster-NAME.secrets.json` (0600); recovered from the broker container when that
/// file is gone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    /// The administrator of deploys before per-role users; created on no new broker.
    pub broker_user: String,
    /// Its password.
    pub broker_password: String,
    /// Each role user's password, by user name.
    #[serde(default)]
    pub passwords: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("broker_user", &self.broker_user)
            .field("users", &self.passwords.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Secrets {
    /// New random credentials.
    pub fn generate() -> Self {
        Self {
            broker_user: format!("gridq-{}", random_hex(4)),
            broker_password: random_hex(24),
            passwords: BTreeMap::new(),
        }
    }

    /// Gives every role user of `cluster` a password (kept ones stay); true when one was added.
    pub fn ensure_users(&mut self, cluster: &Cluster) -> bool {
        let before = self.passwords.len();
        for user in role_users(cluster).into_keys() {
            self.passwords.entry(user).or_insert_with(|| random_hex(24));
        }
        self.passwords.len() != before
    }

    /// New passwords for every role user (`gridq deploy --rotate-secrets`).
    pub fn rotate(&mut self) {
        for p in self.passwords.values_mut() {
            *p = random_hex(24);
        }
    }

    /// `user`'s URL on the cluster's vhost at `host:port`, over TLS checked against [`CA_FILE`]
    /// (it holds the password: never print it unredacted).
    pub fn url_for(&self, user: &str, host: &str, port: u16, vhost: &str) -> String {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let password = self.passwords.get(user).map_or("", String::as_str);
        format!(
            "amqps://{user}:{password}@{host}:{port}/{}?{}={}",
            gridq_common::amqp::percent_encode(vhost),
            gridq_common::amqp::CA_FILE_PARAM,
            gridq_common::amqp::percent_encode(CA_FILE)
        )
    }

    /// The broker's definitions file: the cluster's vhost, the role users (with their
    /// passwords, which RabbitMQ hashes on import) and their permissions.
    pub fn definitions(&self, cluster: &Cluster) -> String {
        let vhost = cluster.name();
        let mut users = Vec::new();
        let mut permissions = Vec::new();
        for (user, p) in role_users(cluster) {
            let tags = if user == MONITOR_USER {
                "monitoring"
            } else {
                ""
            };
            users.push(serde_json::json!({
                "name": user,
                "password": self.passwords.get(&user).cloned().unwrap_or_default(),
                "tags": tags,
            }));
            permissions.push(serde_json::json!({
                "user": user, "vhost": vhost,
                "configure": p.configure, "write": p.write, "read": p.read,
            }));
        }
        serde_json::to_string_pretty(&serde_json::json!({
            "users": users,
            "vhosts": [{"name": vhost}],
            "permissions": permissions,
        }))
        .unwrap_or_default()
    }

    /// Recovers the role users' passwords from the broker's definitions file.
    pub fn from_definitions(text: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let mut s = Self::generate();
        for u in v["users"].as_array()? {
            s.passwords.insert(
                u["name"].as_str()?.to_owned(),
                u["password"].as_str()?.to_owned(),
            );
        }
        Some(s)
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
}

/// Every role user of the cluster and its permissions.
fn role_users(cluster: &Cluster) -> BTreeMap<String, topology::Permissions> {
    let mut users = BTreeMap::new();
    users.insert(MASTER_USER.to_owned(), topology::master_permissions());
    // Access to the vhost (to see its queues in the management API), but to no resource in it:
    // RabbitMQ reads an empty pattern as matching nothing.
    users.insert(
        MONITOR_USER.to_owned(),
        topology::Permissions {
            configure: String::new(),
            write: String::new(),
            read: String::new(),
        },
    );
    for w in &cluster.file.workers {
        let user = worker_user(w.host);
        let p = topology::worker_permissions(&user);
        users.insert(user, p);
    }
    users
}

/// The cluster CA's certificate, and the broker's certificate and key from it (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// What the containers are made with that is not in the cluster file.
#[derive(Debug, Clone)]
pub struct Keys {
    pub secrets: Secrets,
    pub tls: Tls,
}

/// The addresses the broker's certificate names: where the master (its own host's loopback)
/// and the workers (the master's address) reach it.
pub fn broker_addresses(cluster: &Cluster) -> Vec<String> {
    let mut addrs = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    for a in [cluster.master_addr.clone(), local_broker_addr(cluster)] {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    addrs
}

/// A container's credentials: its broker URL (0400, its service user's) and the CA (0444).
fn credential_files(url: &str, ca: &str, uid: u64, gid: u64) -> Vec<File> {
    vec![
        File {
            base: "/".to_owned(),
            path: format!("{CREDENTIALS_DIR}/broker"),
            mode: 0o400,
            uid,
            gid,
            contents: format!("{url}\n"),
        },
        File {
            base: "/".to_owned(),
            path: format!("{CREDENTIALS_DIR}/ca.pem"),
            mode: 0o444,
            uid,
            gid,
            contents: ca.to_owned(),
        },
    ]
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
    /// The static gridq binary's absolute path there.
    pub binary: String,
}

/// The mount of the static gridq binary into a container.
fn binary_mount(path: &str) -> Mounted {
    Mounted::Bind {
        source: path.to_owned(),
        target: MOUNTED.to_owned(),
        read_only: true,
    }
}

/// The broker's definitions file, next to its configuration.
pub const BROKER_DEFINITIONS: &str = "definitions.json";

/// The broker's container: TLS only, users from the definitions file.
pub fn broker_spec(cluster: &Cluster, keys: &Keys, image_id: &str) -> ContainerSpec {
    let m = &cluster.file.master;
    let conf = format!(
        "# Written by gridq deploy.\n\
         load_definitions = {BROKER_CONF_DIR}/{BROKER_DEFINITIONS}\n\
         consumer_timeout = {}\n\
         listeners.tcp = none\n\
         listeners.ssl.default = {BROKER_TLS_PORT}\n\
         ssl_options.cacertfile = {BROKER_CONF_DIR}/tls/ca.pem\n\
         ssl_options.certfile = {BROKER_CONF_DIR}/tls/server.pem\n\
         ssl_options.keyfile = {BROKER_CONF_DIR}/tls/server.key\n\
         ssl_options.verify = verify_none\n\
         ssl_options.fail_if_no_peer_cert = false\n\
         ssl_options.versions.1 = tlsv1.3\n\
         ssl_options.versions.2 = tlsv1.2\n\
         management.tcp.port = 15672\n",
        m.consumer_timeout.as_millis()
    );
    // uid 999 is rabbitmq in the official image; gridq-rabbitmq copies it as root.
    let file = |path: &str, contents: &str| File {
        base: BROKER_CONF_DIR.to_owned(),
        path: path.to_owned(),
        mode: 0o600,
        uid: 999,
        gid: 999,
        contents: contents.to_owned(),
    };
    ContainerSpec {
        name: broker_name(cluster.name()),
        cluster: cluster.name().to_owned(),
        role: Role::Broker,
        host: cluster.place_label(m.host),
        image: cluster.file.images.broker.clone(),
        image_id: image_id.to_owned(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        workdir: None,
        env: Vec::new(),
        user: None,
        network: Network::Published(vec![
            (m.broker_bind.clone(), m.broker_port, BROKER_TLS_PORT),
            ("127.0.0.1".to_owned(), m.management_port, 15672),
        ]),
        mounts: vec![Mounted::Volume {
            name: format!("gridq-{}-broker", cluster.name()),
            target: "/var/lib/rabbitmq".to_owned(),
        }],
        gpus: Vec::new(),
        files: vec![
            file(BROKER_CONF, &conf),
            file(BROKER_DEFINITIONS, &keys.secrets.definitions(cluster)),
            file("tls/ca.pem", &keys.tls.ca_cert),
            file("tls/server.pem", &keys.tls.server_cert),
            file("tls/server.key", &keys.tls.server_key),
        ],
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

/// The master's container: the runtime image (`image`, `image_id`) with the static binary at
/// `binary` on the host mounted into it.
pub fn master_spec(
    cluster: &Cluster,
    keys: &Keys,
    (image, image_id): (&str, &str),
    binary: &str,
) -> ContainerSpec {
    let m = &cluster.file.master;
    let url = keys.secrets.url_for(
        MASTER_USER,
        &local_broker_addr(cluster),
        m.broker_port,
        cluster.name(),
    );
    ContainerSpec {
        name: master_name(cluster.name()),
        cluster: cluster.name().to_owned(),
        role: Role::Master,
        host: cluster.place_label(m.host),
        image: image.to_owned(),
        image_id: image_id.to_owned(),
        entrypoint: binary::entrypoint(),
        workdir: None,
        cmd: vec![
            "master".into(),
            "--state-dir".into(),
            MASTER_STATE.into(),
            "--listen".into(),
            format!("127.0.0.1:{}", m.monitor_port),
            "--heartbeat-timeout".into(),
            humantime::format_duration(m.heartbeat_timeout).to_string(),
            "--broker-file".into(),
            BROKER_FILE.into(),
        ],
        env: Vec::new(),
        user: Some(format!("{GRIDQ_IMAGE_UID}:{GRIDQ_IMAGE_UID}")),
        network: Network::Host,
        mounts: vec![
            Mounted::Volume {
                name: format!("gridq-{}-master", cluster.name()),
                target: MASTER_STATE.to_owned(),
            },
            binary_mount(binary),
        ],
        gpus: Vec::new(),
        files: credential_files(
            &format!(
                "{url}\nmanagement_url=http://{MONITOR_USER}:{}@127.0.0.1:{}",
                keys.secrets
                    .passwords
                    .get(MONITOR_USER)
                    .map_or("", String::as_str),
                m.management_port
            ),
            &keys.tls.ca_cert,
            GRIDQ_IMAGE_UID,
            GRIDQ_IMAGE_UID,
        ),
        stop_timeout: 30,
    }
}

/// The worker containers of one place: one, or one per GPU.
pub fn worker_specs(
    cluster: &Cluster,
    keys: &Keys,
    index: usize,
    facts: &WorkerFacts,
) -> Vec<ContainerSpec> {
    let w = &cluster.file.workers[index];
    let m = &cluster.file.master;
    let host_name = cluster
        .host(w.host)
        .map_or_else(|| "local".to_owned(), |h| h.addr.clone());
    let url = keys.secrets.url_for(
        &worker_user(w.host),
        &cluster.master_addr,
        m.broker_port,
        cluster.name(),
    );
    let spec = |gpus: Vec<u32>, name: String| {
        // The worker runs as root, to read its credentials file; jobs run as the SSH user,
        // so the files they write are theirs and the credentials are out of their reach.
        let mut cmd = vec![
            "worker".to_owned(),
            "--project".to_owned(),
            "/project".to_owned(),
            "--on-stop".to_owned(),
            "requeue".to_owned(),
            "--broker-file".to_owned(),
            BROKER_FILE.to_owned(),
            "--master-user".to_owned(),
            MASTER_USER.to_owned(),
        ];
        if let Some(user) = &facts.user {
            cmd.push("--job-user".into());
            cmd.push(user.clone());
        }
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
            image: cluster.file.worker_image.clone().unwrap_or_default(),
            image_id: facts.image_id.clone(),
            entrypoint: binary::entrypoint(),
            cmd,
            workdir: Some("/project".to_owned()),
            env: vec![format!("GRIDQ_HOSTNAME={host_name}")],
            // Root whatever the image's default user: to read the credentials and to start
            // jobs as the SSH user.
            user: Some("0:0".to_owned()),
            network: Network::Host,
            mounts: vec![
                Mounted::Bind {
                    source: facts.project_dir.clone(),
                    target: "/project".to_owned(),
                    read_only: false,
                },
                binary_mount(&facts.binary),
            ],
            gpus,
            files: credential_files(&url, &keys.tls.ca_cert, 0, 0),
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

    fn tls() -> Tls {
        Tls {
            ca_cert: "CA".into(),
            server_cert: "CERT".into(),
            server_key: "KEY".into(),
        }
    }

    #[test]
    fn each_role_has_its_user_and_the_containers_get_urls_in_files_only() {
        let c = ClusterFile::parse(
            "name: t\nremote_path: p\nhosts: [u@10.0.0.1, u@10.0.0.2]\nmaster: {host: 1}\nworkers: [{host: 1, per_gpu: true}, {host: 2}]\n",
            "t",
        )
        .unwrap()
        .resolve(Path::new("/p"), "t")
        .unwrap();
        let mut secrets = Secrets::generate();
        assert!(secrets.ensure_users(&c));
        assert!(!secrets.ensure_users(&c), "kept passwords stay");
        assert_eq!(
            secrets.passwords.keys().collect::<Vec<_>>(),
            [
                "gridq-master",
                "gridq-monitor",
                "gridq-worker-1",
                "gridq-worker-2"
            ]
        );
        let keys = Keys {
            secrets: secrets.clone(),
            tls: tls(),
        };
        let b = broker_spec(&c, &keys, "sha256:x");
        let conf = &b.files[0].contents;
        assert!(conf.contains("consumer_timeout = 3600000\n"));
        assert!(conf.contains("listeners.tcp = none\n"), "{conf}");
        assert!(!conf.contains("default_user"), "{conf}");
        let defs = &b.files[1].contents;
        let recovered = Secrets::from_definitions(defs).unwrap();
        assert_eq!(recovered.passwords, secrets.passwords);
        let v: serde_json::Value = serde_json::from_str(defs).unwrap();
        assert_eq!(v["vhosts"][0]["name"], "t");
        let perms = v["permissions"].as_array().unwrap();
        assert_eq!(v["users"][1]["tags"], "monitoring");
        assert_eq!(perms[1]["user"], "gridq-monitor");
        assert_eq!(perms[1]["read"], "");
        assert_eq!(perms[2]["user"], "gridq-worker-1");
        assert_eq!(perms[2]["write"], r"^(gridq\.events|gridq\.dlx)$");
        assert!(b.files.iter().all(|f| f.mode == 0o600 && f.uid == 999));
        assert!(!format!("{secrets:?}").contains(&secrets.passwords["gridq-master"]));

        let facts = WorkerFacts {
            user: Some("1000:1000".into()),
            project_dir: "/home/u/p".into(),
            gpus: vec![2, 3],
            image_id: "sha256:w".into(),
            binary: "/home/u/p/.gridq/bin/gridq-0123456789abcdef".into(),
        };
        let w = worker_specs(&c, &keys, 0, &facts);
        assert_eq!(
            w.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["gridq-t-worker-1-gpu2", "gridq-t-worker-1-gpu3"]
        );
        assert_eq!(w[1].gpus, vec![3]);
        assert_eq!(
            w[1].cmd,
            [
                "worker",
                "--project",
                "/project",
                "--on-stop",
                "requeue",
                "--broker-file",
                BROKER_FILE,
                "--master-user",
                MASTER_USER,
                "--job-user",
                "1000:1000",
                "--queue",
                "default",
                "--gpus",
                "0"
            ]
        );
        // No password in the environment or the command line: in a file only root reads.
        let pw = &secrets.passwords["gridq-worker-1"];
        assert!(
            w[0].env
                .iter()
                .chain(&w[0].cmd)
                .all(|e| !e.contains(pw.as_str()))
        );
        assert_eq!(w[0].user.as_deref(), Some("0:0"));
        let creds = &w[0].files[0];
        assert_eq!(
            (creds.path.as_str(), creds.mode, creds.uid),
            ("run/gridq/broker", 0o400, 0)
        );
        assert_eq!(
            creds.contents,
            format!(
                "amqps://gridq-worker-1:{pw}@10.0.0.1:5672/t?cacertfile=%2Frun%2Fgridq%2Fca.pem\n"
            )
        );
        // gridq runs from the static binary mounted read-only, as its own init.
        assert_eq!(
            w[0].entrypoint,
            ["/gridq/gridq", "init", "--", "/gridq/gridq"]
        );
        assert!(w[0].mounts.contains(&Mounted::Bind {
            source: facts.binary.clone(),
            target: "/gridq/gridq".into(),
            read_only: true
        }));
        let m = master_spec(
            &c,
            &keys,
            ("gridq-runtime:1", "sha256:m"),
            "/home/u/p/.gridq/bin/gridq-0123456789abcdef",
        );
        assert_eq!(m.entrypoint, w[0].entrypoint);
        assert_eq!(m.cmd[0], "master");
        assert_eq!(m.user.as_deref(), Some("10001:10001"));
        assert!(m.env.is_empty());
        assert!(m.files[0].contents.starts_with("amqps://gridq-master:"));
        assert!(m.files[0].contents.contains("@127.0.0.1:5672/t?"));
        assert!(
            m.files[0]
                .contents
                .contains("\nmanagement_url=http://gridq-monitor:"),
            "{}",
            m.files[0].contents
        );
        assert!(!m.cmd.iter().any(|a| a.contains("management")));
        assert_eq!(broker_addresses(&c), ["127.0.0.1", "localhost", "10.0.0.1"]);
    }
}
