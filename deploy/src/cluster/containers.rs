//! The containers a cluster is made of, and how deploy makes a host's engine match them.
//!
//! A [`ContainerSpec`] says everything about one container: image (by ID, so a rebuilt image
//! counts as a change), command, environment, user, network, mounts, GPUs, and files put in
//! place before it starts. Its [`ContainerSpec::hash`] goes into the `gridq.spec` label, so
//! [`ensure`] can tell, from the engine alone, whether a running container is already what is
//! wanted (left alone: no job is killed), stopped (started), or different (replaced).
//!
//! Every container and volume carries `gridq.cluster`, `gridq.role` and `gridq.host`;
//! teardown and status find them only through these labels.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use serde::Serialize;

/// Label: the cluster's name.
pub const LABEL_CLUSTER: &str = "gridq.cluster";
/// Label: `broker`, `master` or `worker`.
pub const LABEL_ROLE: &str = "gridq.role";
/// Label: the host, as `[user@]addr[:port]` or `local`.
pub const LABEL_HOST: &str = "gridq.host";
/// Label: the hash of the container's spec.
pub const LABEL_SPEC: &str = "gridq.spec";

/// What a container does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// RabbitMQ.
    Broker,
    /// `gridq master`: store, API, monitor.
    Master,
    /// `gridq worker`.
    Worker,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::Master => "master",
            Self::Worker => "worker",
        }
    }
}

/// A mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Mounted {
    /// A named volume (created with the cluster's labels).
    Volume {
        /// Volume name.
        name: String,
        /// Path in the container.
        target: String,
    },
    /// A directory (or file) of the host.
    Bind {
        /// Absolute path on the host.
        source: String,
        /// Path in the container.
        target: String,
        /// Mounted read-only.
        read_only: bool,
    },
}

/// How the container is networked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Network {
    /// The host's network: the container's loopback is the host's.
    Host,
    /// Docker's bridge, with these ports published: (host interface, host port, container port).
    Published(Vec<(String, u16, u16)>),
}

/// A file placed into the container before it starts (through the Docker API, so it never
/// touches the host's disk): where, mode, owner uid and gid, contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct File {
    /// A directory that exists in the image; nothing above it is touched.
    pub base: String,
    /// The file's path under `base`; missing directories on the way are made (0755).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Contents.
    pub contents: String,
}

/// Everything about one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    /// The container's name on its engine.
    pub name: String,
    /// The cluster.
    pub cluster: String,
    /// Its role.
    pub role: Role,
    /// `gridq.host`.
    pub host: String,
    /// The image reference (tag).
    pub image: String,
    /// The image's ID on the engine, resolved before the spec is hashed.
    pub image_id: String,
    /// The entrypoint; empty: the image's.
    pub entrypoint: Vec<String>,
    /// The command (after the entrypoint).
    pub cmd: Vec<String>,
    /// The working directory; `None`: the image's.
    pub workdir: Option<String>,
    /// `NAME=value` pairs (they may hold the broker password: see the module doc of deploy).
    pub env: Vec<String>,
    /// `uid:gid`, or the image's user.
    pub user: Option<String>,
    /// Networking.
    pub network: Network,
    /// Mounts.
    pub mounts: Vec<Mounted>,
    /// GPU indexes of the host given to the container (NVIDIA device requests).
    pub gpus: Vec<u32>,
    /// Files placed before it starts.
    pub files: Vec<File>,
    /// Seconds between SIGTERM and SIGKILL on stop.
    pub stop_timeout: i64,
}

impl ContainerSpec {
    /// A stable hash of the whole spec (the `gridq.spec` label).
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex()[..16].to_owned()
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_CLUSTER.to_owned(), self.cluster.clone()),
            (LABEL_ROLE.to_owned(), self.role.as_str().to_owned()),
            (LABEL_HOST.to_owned(), self.host.clone()),
            (LABEL_SPEC.to_owned(), self.hash()),
        ])
    }

    fn body(&self) -> ContainerCreateBody {
        let mounts = self
            .mounts
            .iter()
            .map(|m| match m {
                Mounted::Volume { name, target } => Mount {
                    target: Some(target.clone()),
                    source: Some(name.clone()),
                    typ: Some(MountType::VOLUME),
                    ..Default::default()
                },
                Mounted::Bind {
                    source,
                    target,
                    read_only,
                } => Mount {
                    target: Some(target.clone()),
                    source: Some(source.clone()),
                    typ: Some(MountType::BIND),
                    read_only: read_only.then_some(true),
                    ..Default::default()
                },
            })
            .collect();
        let (network_mode, port_bindings, exposed) = match &self.network {
            Network::Host => (Some("host".to_owned()), None, None),
            Network::Published(ports) => {
                let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
                let mut exposed = Vec::new();
                for (ip, host_port, port) in ports {
                    let key = format!("{port}/tcp");
                    bindings
                        .entry(key.clone())
                        .or_default()
                        .get_or_insert_with(Vec::new)
                        .push(PortBinding {
                            host_ip: Some(ip.clone()),
                            host_port: Some(host_port.to_string()),
                        });
                    exposed.push(key);
                }
                (Some("bridge".to_owned()), Some(bindings), Some(exposed))
            }
        };
        let device_requests = (!self.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".to_owned()),
                device_ids: Some(self.gpus.iter().map(u32::to_string).collect()),
                capabilities: Some(vec![vec!["gpu".to_owned()]]),
                ..Default::default()
            }]
        });
        ContainerCreateBody {
            image: Some(self.image_id.clone()),
            entrypoint: (!self.entrypoint.is_empty()).then(|| self.entrypoint.clone()),
            cmd: Some(self.cmd.clone()),
            working_dir: self.workdir.clone(),
            env: Some(self.env.clone()),
            user: self.user.clone(),
            labels: Some(self.labels()),
            stop_timeout: Some(self.stop_timeout),
            exposed_ports: exposed,
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                network_mode,
                port_bindings,
                device_requests,
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Already running with this spec: untouched.
    Unchanged,
    /// There with this spec but stopped: started.
    Started,
    /// Not there: created and started.
    Created,
    /// There with another spec: stopped, removed, created and started.
    Replaced,
}

impl Outcome {
    /// A word for progress lines.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::Started => "started",
            Self::Created => "created",
            Self::Replaced => "replaced",
        }
    }
}

/// Why a container could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A container of that name exists that this cluster did not start.
    #[error(
        "a container named {name} exists that is not this cluster's (its gridq.cluster label is {found:?}); remove or rename it, or pick another cluster name"
    )]
    Foreign {
        /// The name.
        name: String,
        /// Its cluster label, if any.
        found: Option<String>,
    },
    /// The engine refused.
    #[error("{operation} {name}: {source}")]
    Docker {
        /// What was being done.
        operation: &'static str,
        /// The container or volume.
        name: String,
        /// The engine's error.
        source: bollard::errors::Error,
    },
}

fn docker_err(
    operation: &'static str,
    name: &str,
) -> impl FnOnce(bollard::errors::Error) -> ContainerError {
    let name = name.to_owned();
    move |source| ContainerError::Docker {
        operation,
        name,
        source,
    }
}

/// Whether an engine error is "no such container/volume".
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Makes the engine run `spec`, touching nothing that already matches it. Volumes it mounts
/// are created first (with the cluster's labels).
///
/// # Errors
/// [`ContainerError`].
pub async fn ensure(docker: &Docker, spec: &ContainerSpec) -> Result<Outcome, ContainerError> {
    for m in &spec.mounts {
        if let Mounted::Volume { name, .. } = m {
            ensure_volume(docker, name, &spec.cluster, spec.role, &spec.host).await?;
        }
    }
    let hash = spec.hash();
    let mut replaced = false;
    match docker.inspect_container(&spec.name, None).await {
        Ok(found) => {
            let labels = found
                .config
                .as_ref()
                .and_then(|c| c.labels.clone())
                .unwrap_or_default();
            let cluster = labels.get(LABEL_CLUSTER).cloned();
            if cluster.as_deref() != Some(spec.cluster.as_str()) {
                return Err(ContainerError::Foreign {
                    name: spec.name.clone(),
                    found: cluster,
                });
            }
            let running = found
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if labels.get(LABEL_SPEC) == Some(&hash) {
                if running {
                    return Ok(Outcome::Unchanged);
                }
                docker
                    .start_container(&spec.name, None)
                    .await
                    .map_err(docker_err("starting", &spec.name))?;
                return Ok(Outcome::Started);
            }
            stop_and_remove(docker, &spec.name, spec.stop_timeout).await?;
            replaced = true;
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(docker_err("inspecting", &spec.name)(e)),
    }
    create_and_start(docker, spec).await?;
    Ok(if replaced {
        Outcome::Replaced
    } else {
        Outcome::Created
    })
}

/// Creates, fills and starts a container (which must not exist).
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn create_and_start(docker: &Docker, spec: &ContainerSpec) -> Result<(), ContainerError> {
    let options = CreateContainerOptionsBuilder::default()
        .name(&spec.name)
        .build();
    docker
        .create_container(Some(options), spec.body())
        .await
        .map_err(docker_err("creating", &spec.name))?;
    for f in &spec.files {
        let tar = files_tar(std::slice::from_ref(f)).map_err(|e| ContainerError::Docker {
            operation: "packing files for",
            name: spec.name.clone(),
            source: bollard::errors::Error::IOError { err: e },
        })?;
        let options = UploadToContainerOptionsBuilder::default()
            .path(&f.base)
            .build();
        docker
            .upload_to_container(&spec.name, Some(options), bollard::body_full(tar.into()))
            .await
            .map_err(docker_err("placing files in", &spec.name))?;
    }
    docker
        .start_container(&spec.name, None)
        .await
        .map_err(docker_err("starting", &spec.name))
}

/// A tar of `files` (and the directories between their base and them), relative to the base.
fn files_tar(files: &[File]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let rel = f.path.trim_start_matches('/');
        let mut parent = std::path::Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent {
            if p.as_os_str().is_empty() {
                break;
            }
            chain.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.contains(&d) {
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            builder.append_data(&mut h, format!("{d}/"), std::io::empty())?;
            dirs.push(d);
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(f.mode);
        h.set_uid(f.uid);
        h.set_gid(f.gid);
        h.set_size(f.contents.len() as u64);
        builder.append_data(&mut h, rel, f.contents.as_bytes())?;
    }
    builder.into_inner()
}

/// Sets a container's restart policy to `no` (a missing container is fine).
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn no_restart(docker: &Docker, name: &str) -> Result<(), ContainerError> {
    let body = bollard::models::ContainerUpdateBody {
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    match docker.update_container(name, body).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(docker_err("updating the restart policy of", name)(e)),
    }
}

/// Stops (SIGTERM, then SIGKILL after `timeout` seconds) and removes a container; a missing
/// one is fine.
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn stop_and_remove(
    docker: &Docker,
    name: &str,
    timeout: i64,
) -> Result<(), ContainerError> {
    let stop = StopContainerOptionsBuilder::default()
        .t(i32::try_from(timeout).unwrap_or(i32::MAX))
        .build();
    match docker.stop_container(name, Some(stop)).await {
        Ok(()) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        // 304: already stopped.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => {}
        Err(e) => return Err(docker_err("stopping", name)(e)),
    }
    let remove = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(name, Some(remove)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        // 409: removal already in progress (another clean on the same engine).
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(docker_err("removing", name)(e)),
    }
}

async fn ensure_volume(
    docker: &Docker,
    name: &str,
    cluster: &str,
    role: Role,
    host: &str,
) -> Result<(), ContainerError> {
    let labels = HashMap::from([
        (LABEL_CLUSTER.to_owned(), cluster.to_owned()),
        (LABEL_ROLE.to_owned(), role.as_str().to_owned()),
        (LABEL_HOST.to_owned(), host.to_owned()),
    ]);
    docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(docker_err("creating volume", name))
}

/// The engine's filter for what carries `cluster`'s label (and `host`'s, when given).
fn label_filters(cluster: &str, host: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut labels = vec![format!("{LABEL_CLUSTER}={cluster}")];
    if let Some(h) = host {
        labels.push(format!("{LABEL_HOST}={h}"));
    }
    HashMap::from([("label".to_owned(), labels)])
}

/// One container of a cluster as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    /// Its name.
    pub name: String,
    /// `gridq.role`.
    pub role: String,
    /// `gridq.host`.
    pub host: String,
    /// `running`, `exited`, ...
    pub state: String,
    /// Docker's status text (`Up 5 minutes`).
    pub status: String,
    /// The image it runs.
    pub image: String,
    /// `gridq.spec`.
    pub spec: String,
}

/// Every container (running or not) labelled with `cluster`, optionally only those of `host`.
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn list(
    docker: &Docker,
    cluster: &str,
    host: Option<&str>,
) -> Result<Vec<Found>, ContainerError> {
    let filters = label_filters(cluster, host);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let found = docker
        .list_containers(Some(options))
        .await
        .map_err(docker_err("listing containers of", cluster))?;
    let mut out: Vec<Found> = found
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            Found {
                name: c
                    .names
                    .and_then(|n| n.first().cloned())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                role: label(LABEL_ROLE),
                host: label(LABEL_HOST),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                status: c.status.unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                spec: label(LABEL_SPEC),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Names of the volumes labelled with `cluster` (and `host`, when given).
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn list_volumes(
    docker: &Docker,
    cluster: &str,
    host: Option<&str>,
) -> Result<Vec<String>, ContainerError> {
    let filters = label_filters(cluster, host);
    let options = ListVolumesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let found = docker
        .list_volumes(Some(options))
        .await
        .map_err(docker_err("listing volumes of", cluster))?;
    let mut names: Vec<String> = found
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Removes a volume; a missing one is fine.
///
/// # Errors
/// [`ContainerError::Docker`].
pub async fn remove_volume(docker: &Docker, name: &str) -> Result<(), ContainerError> {
    match docker
        .remove_volume(
            name,
            Some(bollard::query_parameters::RemoveVolumeOptions { force: true }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(docker_err("removing volume", name)(e)),
    }
}

/// Reads one small file out of a container (the master's token, the broker's config).
///
/// # Errors
/// [`ContainerError::Docker`]; `Ok(None)` when the container or file is not there.
pub async fn read_file(
    docker: &Docker,
    container: &str,
    path: &str,
) -> Result<Option<String>, ContainerError> {
    use futures_util::TryStreamExt;
    let options = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
        .path(path)
        .build();
    let chunks: Result<Vec<hyper::body::Bytes>, _> = docker
        .download_from_container(container, Some(options))
        .try_collect()
        .await;
    let chunks = match chunks {
        Ok(c) => c,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(docker_err("reading a file of", container)(e)),
    };
    let data: Vec<u8> = chunks.concat();
    let mut archive = tar::Archive::new(data.as_slice());
    let entries = archive.entries().map_err(|e| ContainerError::Docker {
        operation: "unpacking a file of",
        name: container.to_owned(),
        source: bollard::errors::Error::IOError { err: e },
    })?;
    for entry in entries {
        let Ok(mut entry) = entry else { continue };
        if entry.header().entry_type().is_file() {
            let mut text = String::new();
            if std::io::Read::read_to_string(&mut entry, &mut text).is_ok() {
                return Ok(Some(text));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "gridq-t-worker-1".into(),
            cluster: "t".into(),
            role: Role::Worker,
            host: "u@h".into(),
            image: "gridq-worker:local".into(),
            image_id: "sha256:1".into(),
            entrypoint: vec![],
            cmd: vec!["--slots".into(), "2".into()],
            workdir: None,
            env: vec!["A=b".into()],
            user: Some("1000:1000".into()),
            network: Network::Host,
            mounts: vec![],
            gpus: vec![],
            files: vec![],
            stop_timeout: 30,
        }
    }

    #[test]
    fn the_hash_follows_every_field() {
        let a = spec();
        assert_eq!(a.hash(), spec().hash());
        let mut b = spec();
        b.image_id = "sha256:2".into();
        assert_ne!(a.hash(), b.hash());
        let mut c = spec();
        c.env.push("X=1".into());
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn files_tar_holds_parents_and_modes() {
        let tar = files_tar(&[File {
            base: "/etc/rabbitmq".into(),
            path: "conf.d/10-gridq.conf".into(),
            mode: 0o600,
            uid: 999,
            gid: 999,
            contents: "x = 1\n".into(),
        }])
        .unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("conf.d/".into(), 0o755),
                ("conf.d/10-gridq.conf".into(), 0o600),
            ]
        );
    }
}
