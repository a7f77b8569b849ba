//! `gridq probe`: what each host offers (CPUs, memory, disk, GPUs, Docker), in one SSH round
//! trip per host, all hosts in parallel. Also the SSH flags shared with `gridq exec`: the
//! hosts and login come from the flags, or from a cluster file (`-f`: the project's saved
//! `gridq-cluster.yaml`; `--config FILE`), as for `gridq deploy`; flags given with a cluster
//! file take precedence over its values.
//!
//! The remote side is one fixed script, [`SCRIPT`], run as `sh -c SCRIPT gridq-probe PATH`:
//! the remote path reaches it as `$1`, never pasted into the script. It prints `key=value`
//! lines that [`parse_report`] reads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use serde::Serialize;

use super::Failure;
use crate::cluster::config::{CLUSTER_FILE, Cluster};
use crate::hosts::{Host, parse_hosts};
use crate::ssh::{HostKeyPolicy, SshError, SshOptions};

/// How to log in (mlframework's `-i`, plus ssh's host key options): shared by the SSH
/// commands (`probe`, `exec`, `deploy`).
#[derive(Debug, Clone, Args)]
pub(crate) struct LoginArgs {
    /// The private key to log in with (only this key is offered); ssh's defaults otherwise.
    #[arg(short = 'i', long, env = "GRIDQ_IDENTITY", value_name = "KEY")]
    pub(crate) identity: Option<PathBuf>,
    /// The known_hosts file that host keys are checked against (default ~/.ssh/known_hosts).
    #[arg(long, env = "GRIDQ_KNOWN_HOSTS", value_name = "FILE")]
    pub(crate) known_hosts: Option<PathBuf>,
    /// Add the keys of hosts not yet in known_hosts instead of refusing them (a changed key is
    /// still refused).
    #[arg(long)]
    pub(crate) accept_new_host_keys: bool,
    /// An ssh config file to use instead of ~/.ssh/config; `none` for none at all.
    #[arg(long, env = "GRIDQ_SSH_CONFIG", value_name = "FILE")]
    pub(crate) ssh_config: Option<PathBuf>,
}

/// How to reach the hosts: mlframework's `-a`, the login, timeouts; or a cluster file.
#[derive(Debug, Args)]
pub(crate) struct SshArgs {
    /// The hosts, comma-separated: `[user@]host[:port],...` (IPv6 with a port as
    /// `[addr]:port`), numbered from 1 (default: the cluster file's, with -f or --config).
    #[arg(short = 'a', long = "hosts", env = "GRIDQ_HOSTS", value_name = "HOSTS")]
    hosts: Option<String>,
    #[command(flatten)]
    login: LoginArgs,
    /// Take the hosts and the login from the saved configuration (the project's
    /// gridq-cluster.yaml, written by `gridq deploy`).
    #[arg(short = 'f')]
    saved: bool,
    /// Take the hosts and the login from this cluster file.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The project directory whose gridq-cluster.yaml -f reads (mlframework's -d).
    #[arg(short = 'd', long = "project", value_name = "DIR", default_value = ".")]
    project: PathBuf,
    /// How long connecting to a host may take (e.g. 10s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// How many hosts are worked on at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
}

impl SshArgs {
    /// The cluster file named by `-f` or `--config`, loaded and checked; `None` without
    /// either.
    ///
    /// # Errors
    /// A missing or bad file is a usage error naming it.
    pub(crate) fn cluster(&self) -> Result<Option<(PathBuf, Cluster)>, Failure> {
        let path = match (&self.config, self.saved) {
            (Some(p), _) => p.clone(),
            (None, true) => self.project.join(CLUSTER_FILE),
            (None, false) => return Ok(None),
        };
        if !path.exists() {
            return Err(Failure::Usage(format!(
                "{}: no cluster file at {}; deploy first (gridq deploy -a HOSTS -m N -w N,... saves one), or pass --config FILE",
                if self.config.is_some() {
                    "--config"
                } else {
                    "-f"
                },
                path.display()
            )));
        }
        super::cluster::load_cluster(&path).map(|c| Some((path, c)))
    }

    /// The host list and the SSH options, validated: a bad list or a missing key file is a
    /// usage error. With a cluster file, its hosts, key, known_hosts, host key policy and ssh
    /// config, each replaced by the flag given for it.
    pub(crate) fn resolve(&self) -> Result<(Vec<Host>, SshOptions), Failure> {
        self.resolve_with(self.cluster()?.as_ref())
    }

    /// [`SshArgs::resolve`] with the cluster file already loaded.
    pub(crate) fn resolve_with(
        &self,
        file: Option<&(PathBuf, Cluster)>,
    ) -> Result<(Vec<Host>, SshOptions), Failure> {
        let cluster = file.map(|(_, c)| c);
        let hosts = match (&self.hosts, cluster) {
            (Some(list), _) => parse_hosts(list).map_err(|e| Failure::Usage(e.to_string()))?,
            (None, Some(c)) if !c.hosts.is_empty() => c.hosts.clone(),
            (None, Some(c)) => {
                return Err(Failure::Usage(format!(
                    "cluster {}: its file lists no hosts (every role runs locally); pass -a HOSTS",
                    c.name()
                )));
            }
            (None, None) => {
                return Err(Failure::Usage(
                    "--hosts: give the hosts (-a [user@]host[:port],...), or a cluster file: -f for the project's gridq-cluster.yaml, or --config FILE".into(),
                ));
            }
        };
        let base = SshOptions {
            connect_timeout: self.connect_timeout,
            parallel: usize::from(self.parallel),
            ..SshOptions::default()
        };
        let mut options = match cluster {
            Some(c) => crate::cluster::ssh_options(c, &base),
            None => base,
        };
        if let Some(key) = &self.login.identity {
            options.identity = Some(key.clone());
        }
        if let Some(file) = &self.login.known_hosts {
            options.known_hosts = Some(file.clone());
        }
        if let Some(file) = &self.login.ssh_config {
            options.config_file = Some(file.clone());
        }
        if self.login.accept_new_host_keys {
            options.host_keys = HostKeyPolicy::AcceptNew;
        }
        // Named as the user gave them: the flag, or the cluster file's field.
        let origin = |flag: &str, given: bool, field: &str| match file {
            Some((path, _)) if !given => format!("{}: {field}", path.display()),
            _ => flag.to_owned(),
        };
        for (what, path) in [
            (
                origin("--identity", self.login.identity.is_some(), "ssh.identity"),
                &options.identity,
            ),
            (
                origin(
                    "--known-hosts",
                    self.login.known_hosts.is_some(),
                    "ssh.known_hosts",
                ),
                &options.known_hosts,
            ),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(Failure::Usage(format!("{what}: {}: {e}", path.display())));
                }
            }
        }
        Ok((hosts, options))
    }
}

#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    #[command(flatten)]
    ssh: SshArgs,
    /// The remote path whose free disk space is shown, relative to the remote home (as
    /// mlframework's -r); its nearest existing parent is measured when it does not exist yet.
    /// Default: the cluster file's remote path with -f or --config, else the home.
    #[arg(short = 'r', long, value_name = "PATH")]
    remote_path: Option<String>,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// How long the probe may take on a host once logged in.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs on every host as `sh -c SCRIPT gridq-probe PATH`. Fixed text: no value is ever pasted
/// into it; the path is `$1`. Multi-line command output is folded onto one line with `tr`.
const SCRIPT: &str = r#"p=${1:-.}
echo "hostname=$(uname -n)"
echo "cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
awk '/^MemTotal:/ { print "mem_total_kb=" $2 } /^MemAvailable:/ { print "mem_available_kb=" $2 }' /proc/meminfo
while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done
df -Pk -- "$p" | awk 'NR == 2 { print "disk_free_kb=" $4 }'
if command -v nvidia-smi >/dev/null 2>&1; then
    if out=$(nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits 2>&1); then
        printf '%s\n' "$out" | sed 's/^/gpu=/'
    else
        printf 'gpu_error=%s\n' "$(printf '%s' "$out" | tr '\n' ' ')"
    fi
fi
if ! command -v docker >/dev/null 2>&1; then
    echo docker=not-installed
elif out=$(docker version --format '{{.Server.Version}}' 2>&1); then
    printf 'docker=ok\ndocker_version=%s\n' "$(printf '%s' "$out" | tr '\n' ' ')"
    printf 'runtimes=%s\n' "$(docker info --format '{{json .Runtimes}}' 2>/dev/null | tr '\n' ' ')"
else
    printf 'docker=failed\ndocker_error=%s\n' "$(printf '%s' "$out" | tr '\n' ' ')"
fi
echo end=ok
"#;

/// One host's answer (or its error): the `--json` form, one object per host.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct HostReport {
    index: usize,
    host: String,
    ok: bool,
    /// The error, naming the host, when `ok` is false.
    error: Option<String>,
    /// [`SshError::kind`] of `error`.
    error_kind: Option<String>,
    hostname: Option<String>,
    cpus: Option<u64>,
    memory_total_bytes: Option<u64>,
    memory_available_bytes: Option<u64>,
    remote_path: String,
    disk_free_bytes: Option<u64>,
    gpus: Vec<Gpu>,
    /// Why nvidia-smi failed, when it is installed but did not answer.
    gpu_error: Option<String>,
    docker: Docker,
    /// Whether Docker has a runtime named like `nvidia`; null when Docker is unusable.
    nvidia_runtime: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Gpu {
    index: u32,
    name: String,
    memory_total_mib: Option<u64>,
    memory_free_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Docker {
    /// `ok`, `no_access`, `not_installed`, `not_running`, `error` or `unknown` (host not
    /// reached).
    status: &'static str,
    version: Option<String>,
    /// What docker said, when it failed.
    detail: Option<String>,
}

impl HostReport {
    fn empty(host: &Host, remote_path: &str) -> Self {
        Self {
            index: host.index,
            host: host.to_string(),
            ok: false,
            error: None,
            error_kind: None,
            hostname: None,
            cpus: None,
            memory_total_bytes: None,
            memory_available_bytes: None,
            remote_path: remote_path.to_owned(),
            disk_free_bytes: None,
            gpus: Vec::new(),
            gpu_error: None,
            docker: Docker {
                status: "unknown",
                version: None,
                detail: None,
            },
            nvidia_runtime: None,
        }
    }

    fn failed(host: &Host, remote_path: &str, error: &SshError) -> Self {
        Self {
            error: Some(error.to_string()),
            error_kind: Some(error.kind().to_owned()),
            ..Self::empty(host, remote_path)
        }
    }
}

/// Reads the script's `key=value` lines. A report without the final `end=ok` is an error:
/// the script was cut short.
fn parse_report(host: &Host, remote_path: &str, stdout: &str) -> Result<HostReport, String> {
    let mut r = HostReport::empty(host, remote_path);
    let mut ended = false;
    let kb = |v: &str| v.trim().parse::<u64>().ok().map(|n| n * 1024);
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "hostname" => r.hostname = Some(value.to_owned()),
            "cpus" => r.cpus = value.trim().parse().ok(),
            "mem_total_kb" => r.memory_total_bytes = kb(value),
            "mem_available_kb" => r.memory_available_bytes = kb(value),
            "disk_free_kb" => r.disk_free_bytes = kb(value),
            "gpu" => r.gpus.extend(parse_gpu(value)),
            "gpu_error" => r.gpu_error = Some(value.trim().to_owned()),
            "docker" => {
                r.docker.status = match value {
                    "ok" => "ok",
                    "not-installed" => "not_installed",
                    _ => "error",
                };
            }
            "docker_version" => r.docker.version = Some(value.trim().to_owned()),
            "docker_error" => {
                let lower = value.to_ascii_lowercase();
                r.docker.status = if lower.contains("permission denied") {
                    "no_access"
                } else if lower.contains("cannot connect to the docker daemon")
                    || lower.contains("is the docker daemon running")
                {
                    "not_running"
                } else {
                    "error"
                };
                r.docker.detail = Some(value.trim().to_owned());
            }
            "runtimes" => {
                r.nvidia_runtime = Some(
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(value)
                        .map(|m| m.keys().any(|k| k.contains("nvidia")))
                        .unwrap_or(false),
                );
            }
            "end" => ended = value == "ok",
            _ => {}
        }
    }
    if !ended {
        return Err("the probe script was cut short".to_owned());
    }
    if r.docker.status == "ok" && r.nvidia_runtime.is_none() {
        r.nvidia_runtime = Some(false);
    }
    r.ok = true;
    Ok(r)
}

/// `0, NVIDIA H100 80GB HBM3, 81559, 81000` (the name may hold commas; `[N/A]` is unknown).
fn parse_gpu(line: &str) -> Option<Gpu> {
    let (index, rest) = line.split_once(',')?;
    let mut tail = rest.rsplitn(3, ',');
    let free = tail.next()?.trim();
    let total = tail.next()?.trim();
    let name = tail.next()?.trim();
    Some(Gpu {
        index: index.trim().parse().ok()?,
        name: name.to_owned(),
        memory_total_mib: total.parse().ok(),
        memory_free_mib: free.parse().ok(),
    })
}

pub(crate) fn run(args: &ProbeArgs) -> Result<(), Failure> {
    let cluster = args.ssh.cluster()?;
    let (hosts, options) = args.ssh.resolve_with(cluster.as_ref())?;
    let remote_path = remote_path(
        args.remote_path
            .as_deref()
            .or(cluster.as_ref().map(|(_, c)| c.file.remote_path.as_str()))
            .unwrap_or("."),
    );
    let reports = super::services::runtime()?.block_on(probe(
        &hosts,
        &options,
        &remote_path,
        args.timeout,
    ))?;
    if args.json {
        #[derive(Serialize)]
        struct Doc<'a> {
            hosts: &'a [HostReport],
        }
        let doc = Doc { hosts: &reports };
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?
        );
    } else {
        print_table(&reports, &hosts);
    }
    let failed: Vec<&HostReport> = reports.iter().filter(|r| !r.ok).collect();
    for r in &failed {
        eprintln!("error: {}", r.error.as_deref().unwrap_or("failed"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Other(anyhow!(
            "{} of {} hosts did not answer the probe",
            failed.len(),
            reports.len()
        )))
    }
}

/// mlframework's paths are relative to the remote home, where ssh starts: `~/x` is `x`.
fn remote_path(path: &str) -> String {
    match path {
        "" | "~" => ".".to_owned(),
        p => p.strip_prefix("~/").unwrap_or(p).to_owned(),
    }
}

async fn probe(
    hosts: &[Host],
    options: &SshOptions,
    remote_path: &str,
    timeout: Duration,
) -> Result<Vec<HostReport>, Failure> {
    let sessions = crate::ssh::Sessions::connect(hosts, options)
        .await
        .map_err(|e| Failure::Other(e.into()))?;
    let path = remote_path.to_owned();
    let outcomes = sessions
        .for_each(move |session| {
            let path = path.clone();
            async move {
                let argv = ["sh", "-c", SCRIPT, "gridq-probe", path.as_str()];
                let out = session.run(&argv, Some(timeout)).await?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                parse_report(session.host(), &path, &stdout).map_err(|why| {
                    SshError::other(
                        session.host(),
                        format!(
                            "{why} (exit status {}): {}",
                            out.code,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    )
                })
            }
        })
        .await;
    sessions.close().await;
    Ok(outcomes
        .into_iter()
        .map(|(host, outcome)| {
            outcome.unwrap_or_else(|e| HostReport::failed(&host, remote_path, &e))
        })
        .collect())
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    format!("{g:.1}")
}

fn print_table(reports: &[HostReport], hosts: &[Host]) {
    let header = [
        "HOST",
        "CPUS",
        "MEM FREE/TOTAL",
        "DISK FREE",
        "GPUS",
        "DOCKER",
        "NVIDIA",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (r, host) in reports.iter().zip(hosts) {
        let name = format!("{} {host}", host.index);
        if !r.ok {
            let kind = r.error_kind.as_deref().unwrap_or("error").replace('_', " ");
            rows.push(vec![name, format!("error: {kind} (see below)")]);
            continue;
        }
        let opt = |v: Option<u64>, f: fn(u64) -> String| v.map_or_else(|| "?".to_owned(), f);
        let gpus = if let Some(e) = &r.gpu_error {
            format!("error: {e}")
        } else if r.gpus.is_empty() {
            "none".to_owned()
        } else {
            r.gpus
                .iter()
                .map(|g| {
                    let mib = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |m| gib(m << 20));
                    format!(
                        "{}:{}/{}G",
                        g.index,
                        mib(g.memory_free_mib),
                        mib(g.memory_total_mib)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let docker = match (r.docker.status, &r.docker.version) {
            ("ok", Some(v)) => v.clone(),
            ("no_access", _) => "no access".to_owned(),
            ("not_installed", _) => "not installed".to_owned(),
            ("not_running", _) => "not running".to_owned(),
            (_, _) => format!("error: {}", r.docker.detail.as_deref().unwrap_or("unknown")),
        };
        let nvidia = match r.nvidia_runtime {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        rows.push(vec![
            name,
            opt(r.cpus, |n| n.to_string()),
            format!(
                "{}/{} GiB",
                opt(r.memory_available_bytes, gib),
                opt(r.memory_total_bytes, gib)
            ),
            opt(r.disk_free_bytes, |b| format!("{} GiB", gib(b))),
            gpus,
            docker,
            nvidia.to_owned(),
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        // An error row's second cell spans the rest of the line.
        if row.len() == header.len() {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        } else {
            widths[0] = widths[0].max(row[0].chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}", w = widths[i]));
            }
        }
        text
    };
    println!(
        "{}",
        line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())
    );
    for row in &rows {
        println!("{}", line(row));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        parse_hosts("u@h:2222").unwrap().remove(0)
    }

    #[test]
    fn reads_a_full_report() {
        let out = "hostname=node1\ncpus=16\nmem_total_kb=1000\nmem_available_kb=500\n\
                   disk_free_kb=2048\ngpu=0, NVIDIA H100 80GB HBM3, 81559, 81000\n\
                   gpu=1, Odd, Name, [N/A], 5\ndocker=ok\ndocker_version=27.3.1\n\
                   runtimes={\"nvidia\":{\"path\":\"nvidia-container-runtime\"},\"runc\":{}}\nend=ok\n";
        let r = parse_report(&host(), "work", out).unwrap();
        assert!(r.ok);
        assert_eq!(r.cpus, Some(16));
        assert_eq!(r.memory_total_bytes, Some(1_024_000));
        assert_eq!(r.memory_available_bytes, Some(512_000));
        assert_eq!(r.disk_free_bytes, Some(2048 * 1024));
        assert_eq!(
            r.gpus,
            vec![
                Gpu {
                    index: 0,
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_mib: Some(81559),
                    memory_free_mib: Some(81000)
                },
                Gpu {
                    index: 1,
                    name: "Odd, Name".into(),
                    memory_total_mib: None,
                    memory_free_mib: Some(5)
                },
            ]
        );
        assert_eq!(r.docker.status, "ok");
        assert_eq!(r.docker.version.as_deref(), Some("27.3.1"));
        assert_eq!(r.nvidia_runtime, Some(true));
    }

    #[test]
    fn docker_failures_are_classified() {
        let denied = "cpus=1\ndocker=failed\ndocker_error=permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: ...\nend=ok\n";
        let r = parse_report(&host(), ".", denied).unwrap();
        assert_eq!(r.docker.status, "no_access");
        assert_eq!(r.nvidia_runtime, None);
        let r = parse_report(&host(), ".", "docker=not-installed\nend=ok\n").unwrap();
        assert_eq!(r.docker.status, "not_installed");
        let down = "docker=failed\ndocker_error=Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\nend=ok\n";
        assert_eq!(
            parse_report(&host(), ".", down).unwrap().docker.status,
            "not_running"
        );
        let r = parse_report(
            &host(),
            ".",
            "docker=ok\ndocker_version=1\nruntimes={\"runc\":{}}\nend=ok\n",
        )
        .unwrap();
        assert_eq!(r.nvidia_runtime, Some(false));
    }

    #[test]
    fn a_cut_short_report_is_an_error() {
        assert!(parse_report(&host(), ".", "cpus=2\n").is_err());
    }

    #[test]
    fn remote_paths_are_relative_to_home() {
        assert_eq!(remote_path("~/data/x"), "data/x");
        assert_eq!(remote_path("~"), ".");
        assert_eq!(remote_path(""), ".");
        assert_eq!(remote_path("/abs"), "/abs");
    }
}
