//! `gridq_deploy::docker` against the real SSH test hosts (`scripts/test-hosts.sh`) and the
//! real Docker engine they all share with this machine: bollard over `docker system
//! dial-stdio`, the permission-denied diagnosis of a user outside the docker group, and the
//! registry-free image handoff (`docker save` streamed into `docker load` over SSH).
//!
//! There is no registry and the engine may hold no images at all, so each test imports the
//! tiny images it needs itself (a one-file rootfs, `docker import`) under a unique tag, and a
//! guard removes its images and containers even when the test fails.

mod hosts;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};
use futures_util::StreamExt;
use gridq_deploy::docker::{self, DockerError, DockerHost, ImageOutcome};
use gridq_deploy::hosts::parse_hosts;
use gridq_deploy::ssh::{HostKeyPolicy, HostSession, Sessions, SshOptions};
use hosts::{TestHost, hosts, local_docker, output_within};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one whole test may take.
const LIMIT: Duration = Duration::from_secs(180);

/// A name no other test, or earlier run, uses.
fn unique(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "gridq-test-docker-{what}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the containers and images it names when dropped, through the local docker CLI
/// (the engine is the same), so that a failed test leaves nothing behind either.
#[derive(Debug, Default)]
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let docker = |args: &[&str]| {
            let mut cmd = Command::new("docker");
            cmd.args(args);
            output_within(cmd, b"", Duration::from_secs(60));
        };
        for c in &self.containers {
            docker(&["rm", "--force", c]);
        }
        for i in &self.images {
            docker(&["rmi", "--force", i]);
        }
    }
}

/// Logs in to `list` (numbered from 1 in that order) with the test key, strictly checked
/// host keys and no ssh config file.
async fn connect(list: &[&TestHost]) -> (Sessions, Vec<Arc<HostSession>>) {
    let targets: Vec<String> = list.iter().map(|h| h.target()).collect();
    let parsed = parse_hosts(&targets.join(",")).expect("test host list");
    let options = SshOptions {
        identity: Some(list[0].key.clone()),
        known_hosts: Some(list[0].known_hosts.clone()),
        host_keys: HostKeyPolicy::Strict,
        config_file: Some("none".into()),
        ..SshOptions::default()
    };
    let sessions = Sessions::connect(&parsed, &options)
        .await
        .expect("control directory");
    let connected = sessions
        .connections()
        .iter()
        .map(|(host, c)| match c {
            Ok(session) => Arc::clone(session),
            Err(e) => panic!("cannot log in to {host}: {e}"),
        })
        .collect();
    (sessions, connected)
}

/// A rootfs tarball holding one text file, `/hello.txt`.
fn tiny_rootfs(text: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, "hello.txt", text.as_bytes())
        .expect("tar entry");
    tar.into_inner().expect("tar")
}

/// `docker import`s a one-file image as `repo:tag` through `host` and returns its ID.
async fn import_tiny(host: &DockerHost, repo: &str, tag: &str) -> String {
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .build();
    let body = bollard::body_full(tiny_rootfs(&format!("hello from {repo}\n")).into());
    let mut replies = host.docker().create_image(Some(options), Some(body), None);
    while let Some(reply) = replies.next().await {
        reply.unwrap_or_else(|e| panic!("importing {repo}:{tag} via {}: {e}", host.label()));
    }
    host.image_id(&format!("{repo}:{tag}"))
        .await
        .expect("inspect")
        .unwrap_or_else(|| panic!("{repo}:{tag} missing right after its import"))
}

/// The IDs of all containers labelled `key=value`, as `host` lists them.
async fn labelled(host: &DockerHost, key: &str, value: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let mut ids: Vec<String> = host
        .docker()
        .list_containers(Some(options))
        .await
        .unwrap_or_else(|e| panic!("listing containers via {}: {e}", host.label()))
        .into_iter()
        .filter_map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

async fn within<F: Future>(what: &str, work: F) -> F::Output {
    tokio::time::timeout(LIMIT, work)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_and_this_machine_see_the_same_engine() {
    within("the shared-engine test", async {
        let test_hosts = hosts();
        let (h1, h2) = (&test_hosts.docker[0], &test_hosts.docker[1]);
        let (sessions, connected) = connect(&[h1, h2]).await;
        let d1 = docker::over_ssh(Arc::clone(&connected[0]))
            .await
            .expect("h1");
        let d2 = docker::over_ssh(Arc::clone(&connected[1]))
            .await
            .expect("h2");
        let local = docker::local().await.expect("local engine");
        assert_eq!(d1.label(), format!("host 1 {}", h1.target()));
        assert_eq!(d2.label(), format!("host 2 {}", h2.target()));
        assert_eq!(local.label(), "local");

        assert_eq!(d1.docker().ping().await.expect("ping h1"), "OK");
        let server = local_docker(["version", "--format", "{{.Server.Version}}"]);
        for d in [&d1, &d2, &local] {
            let version = d.docker().version().await.expect("version");
            assert_eq!(
                version.version.as_deref(),
                Some(server.as_str()),
                "{}",
                d.label()
            );
        }

        // More requests at once than channels: the pool opens several dial-stdio channels
        // (at most MAX_CHANNELS) and every request gets its answer.
        let answers = futures_util::future::join_all((0..20).map(|_| d1.docker().ping())).await;
        assert!(
            answers.iter().all(|a| matches!(a.as_deref(), Ok("OK"))),
            "{answers:?}"
        );

        let mut cleanup = Cleanup::default();
        let repo = unique("shared");
        let image = format!("{repo}:t");
        cleanup.images.push(image.clone());
        // The rootfs goes up through h1's SSH channel as a request body.
        let image_id = import_tiny(&d1, &repo, "t").await;
        assert_eq!(
            d2.image_id(&image).await.expect("inspect"),
            Some(image_id.clone())
        );

        let name = unique("box");
        cleanup.containers.push(name.clone());
        let label = ("gridq-test".to_owned(), name.clone());
        let created = d1
            .docker()
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                ContainerCreateBody {
                    image: Some(image.clone()),
                    // Never started: the image holds no program.
                    cmd: Some(vec!["/hello.txt".to_owned()]),
                    labels: Some(HashMap::from([label.clone()])),
                    ..ContainerCreateBody::default()
                },
            )
            .await
            .expect("create a container over h1");
        assert_eq!(
            labelled(&d2, &label.0, &label.1).await,
            std::slice::from_ref(&created.id)
        );
        assert_eq!(
            labelled(&local, &label.0, &label.1).await,
            std::slice::from_ref(&created.id)
        );

        d2.docker()
            .remove_container(
                &created.id,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await
            .expect("remove the container over h2");
        assert!(labelled(&local, &label.0, &label.1).await.is_empty());
        d1.docker()
            .remove_image(
                &image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .expect("remove the image over h1");
        assert_eq!(local.image_id(&image).await.expect("inspect"), None);

        // Every request of d1 goes through h1's SSH connection: once it is gone, its pooled
        // channels are not reused and no new one opens, while the engine still answers h2.
        connected[0].abort().await;
        let err = d1
            .image_id(&image)
            .await
            .expect_err("h1's SSH connection is closed");
        eprintln!("after the abort: {err}");
        assert!(
            err.to_string().starts_with(&format!("{}: ", d1.label())),
            "{err}"
        );
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(d2.docker().ping().await.expect("ping h2"), "OK");

        drop((d1, d2));
        sessions.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_outside_the_docker_group_is_told_how_to_fix_it() {
    within("the nodocker test", async {
        let nodocker = &hosts().nodocker;
        let (sessions, connected) = connect(&[nodocker]).await;
        let err = docker::over_ssh(Arc::clone(&connected[0]))
            .await
            .expect_err("the nodocker user may not use Docker");
        assert!(
            matches!(&err, DockerError::PermissionDenied { user, socket, .. }
                if *user == nodocker.user && socket == "/var/run/docker.sock"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "host 1 {target}: permission denied on the Docker socket /var/run/docker.sock: {user} may not use Docker there; add {user} to the docker group: `sudo usermod -aG docker {user}`, then log in again",
                target = nodocker.target(),
                user = nodocker.user,
            )
        );
        assert!(!err.is_retryable());
        sessions.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_handed_over_without_a_registry() {
    within("the image handoff test", async {
        let h1 = &hosts().docker[0];
        let (sessions, connected) = connect(&[h1]).await;
        let d1 = docker::over_ssh(Arc::clone(&connected[0])).await.expect("h1");
        let local = docker::local().await.expect("local engine");
        let mut cleanup = Cleanup::default();
        let repo = unique("handoff");
        let image = format!("{repo}:t");
        cleanup.images.push(image.clone());
        let image_id = import_tiny(&local, &repo, "t").await;

        // Same engine: the IDs match, nothing moves.
        let mut calls = 0;
        let (id, outcome) = docker::ensure_image(&local, &d1, &image, |_| calls += 1)
            .await
            .expect("ensure_image");
        assert_eq!(outcome, ImageOutcome::Present);
        assert_eq!(id, image_id);
        assert_eq!(calls, 0);

        let missing = format!("{}:t", unique("missing"));
        let err = docker::ensure_image(&local, &d1, &missing, |_| {})
            .await
            .expect_err("no such image");
        assert_eq!(
            err.to_string(),
            format!(
                "local: there is no image {missing} to copy; load or build it here first (`docker load`; `scripts/build-images.sh` builds gridq-python, gridq:local and gridq-rabbitmq:local), or let the hosts pull it (--pull)"
            )
        );

        // A failed export is reported against the source, not the load it fed.
        let err = docker::transfer_image(&local, &d1, &missing, |_| {})
            .await
            .expect_err("no such image to export");
        assert!(
            err.to_string()
                .starts_with(&format!("local: exporting {missing} failed: ")),
            "{err}"
        );

        // The export streamed through a load over SSH; the engine already has the image, so
        // the load changes nothing, but every byte goes through h1's channel.
        let mut seen = Vec::new();
        let sent = docker::transfer_image(&local, &d1, &image, |n| seen.push(n))
            .await
            .expect("transfer_image");
        assert!(sent > 1024, "a docker save tarball of {sent} bytes");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&sent));
        assert_eq!(d1.image_id(&image).await.expect("inspect"), Some(image_id.clone()));

        // The real handoff: save the image to a file, remove it from the engine, and load it
        // back over SSH; it returns with the same ID and tag.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.tar");
        let mut file = tokio::fs::File::create(&path).await.expect("create");
        let mut export = local.docker().export_image(&image);
        while let Some(chunk) = export.next().await {
            file.write_all(&chunk.expect("export")).await.expect("write");
        }
        file.flush().await.expect("flush");
        drop(file);
        let size = std::fs::metadata(&path).expect("metadata").len();
        assert!(
            saved_tags(&path).contains(&image),
            "the tarball carries the tag: {:?}",
            saved_tags(&path)
        );

        local
            .docker()
            .remove_image(
                &image,
                Some(RemoveImageOptionsBuilder::default().force(true).build()),
                None,
            )
            .await
            .expect("remove the image");
        assert_eq!(local.image_id(&image).await.expect("inspect"), None);
        assert_eq!(d1.image_id(&image).await.expect("inspect"), None);

        let body = chunks(tokio::fs::File::open(&path).await.expect("open"));
        let mut seen = Vec::new();
        let loaded = docker::load_image(&d1, body, |n| seen.push(n))
            .await
            .expect("load_image over SSH");
        assert_eq!(loaded, size);
        assert_eq!(seen.last(), Some(&size));
        assert_eq!(local.image_id(&image).await.expect("inspect"), Some(image_id));
        let tags = local
            .docker()
            .inspect_image(&image)
            .await
            .expect("inspect")
            .repo_tags
            .unwrap_or_default();
        assert_eq!(tags, std::slice::from_ref(&image));

        drop(d1);
        sessions.close().await;
    })
    .await;
}

/// `file` as a stream of chunks of up to 64 KiB.
fn chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0; 64 * 1024];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    })
}

/// The repo tags in the `manifest.json` of a `docker save` tarball.
fn saved_tags(path: &std::path::Path) -> Vec<String> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open"));
    for entry in archive.entries().expect("tar") {
        let entry = entry.expect("entry");
        if entry.path().expect("path").as_os_str() == "manifest.json" {
            let manifest: serde_json::Value = serde_json::from_reader(entry).expect("json");
            return manifest
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|m| m["RepoTags"].as_array().cloned().unwrap_or_default())
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
        }
    }
    Vec::new()
}
