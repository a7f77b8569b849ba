//! The portable binary: the static `gridq` of `scripts/release.sh` runs as a real worker
//! inside images that are not gridq's, with nothing of its own in them: an image made
//! `FROM scratch` that holds the binary and nothing else, and a Debian image with python3
//! (`gridq-python`, made offline by scripts/build-images.sh) into which the binary is only
//! mounted. In both, gridq is its own init (`gridq init --`): signals reach the worker, and
//! the orphans that jobs leave behind are reaped.
//!
//! Needs the real broker, the Docker engine and GRIDQ_TEST_IMAGES_ENV (scripts/test.sh).

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use support::{Cluster, wait_until};

fn images_env() -> BTreeMap<String, String> {
    let path = std::env::var("GRIDQ_TEST_IMAGES_ENV").expect(
        "GRIDQ_TEST_IMAGES_ENV: run scripts/build-images.sh --env-file FILE (scripts/test.sh does)",
    );
    std::fs::read_to_string(&path)
        .expect("images env file")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("docker")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A container removed at the end, whatever happens.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.0]);
    }
}

/// An image made `FROM scratch` with the binary at /gridq/gridq and nothing else; removed at
/// the end.
struct ScratchImage(String);

impl ScratchImage {
    fn build(binary: &str, tag: &str) -> Self {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(binary, ctx.path().join("gridq")).unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY gridq /gridq/gridq\nLABEL gridq.test=portable\n",
        )
        .unwrap();
        let out = Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag])
            .arg(ctx.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        Self(tag.to_owned())
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

/// Runs `gridq worker` in a container of `image` (host network, the broker URL in a mounted
/// file, /tmp a tmpfs), with the binary mounted unless the image has it.
fn start_worker(c: &Cluster, image: &str, binary: Option<&str>, id: &str) -> Container {
    let url_file = c.dir.path().join(format!("broker-{id}"));
    std::fs::write(&url_file, format!("{}\n", c.url)).unwrap();
    std::fs::set_permissions(
        &url_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();
    let name = format!("gridq-portable-{id}-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        "--label".into(),
        "gridq.test=portable".into(),
        "--network".into(),
        "host".into(),
        "--tmpfs".into(),
        "/tmp:mode=1777".into(),
        "-v".into(),
        format!("{}:/run/broker:ro", url_file.display()),
    ];
    if let Some(b) = binary {
        args.push("-v".into());
        args.push(format!("{b}:/gridq/gridq:ro"));
    }
    args.extend(
        [
            image,
            "/gridq/gridq",
            "init",
            "--",
            "/gridq/gridq",
            "worker",
            "--broker-file",
            "/run/broker",
            "--project",
            "/tmp",
            "--heartbeat",
            "250ms",
            "--slots",
            "2",
            "--id",
            id,
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = docker(&args);
    assert!(out.status.success(), "{}", text(&out));
    Container(name)
}

/// Stops the container (SIGTERM to init, which passes it on) and returns its exit code.
fn stop(container: &Container) -> i64 {
    let out = docker(&["stop", "-t", "30", &container.0]);
    assert!(out.status.success(), "{}", text(&out));
    let out = docker(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn logs(container: &Container) -> String {
    let out = docker(&["logs", &container.0]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_binary_runs_a_worker_in_an_empty_image_and_in_a_foreign_one() {
    let env = images_env();
    let binary = PathBuf::from(env.get("GRIDQ_BINARY").expect("GRIDQ_BINARY"));
    let binary = binary.to_str().unwrap().to_owned();
    let user_image = env
        .get("GRIDQ_USER_IMAGE")
        .expect("GRIDQ_USER_IMAGE")
        .clone();

    // Statically linked: no interpreter, no needed library.
    let out = Command::new("readelf")
        .args(["-l", "-d", &binary])
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout);
    assert!(
        !headers.contains("program interpreter") && !headers.contains("(NEEDED)"),
        "{headers}"
    );

    let scratch = ScratchImage::build(
        &binary,
        &format!("gridq-test-scratch:{}", std::process::id()),
    );
    let version = format!("gridq {}\n", env!("CARGO_PKG_VERSION"));
    for (image, mount) in [(&scratch.0, None), (&user_image, Some(binary.as_str()))] {
        let mut args = vec!["run", "--rm"];
        let volume = format!("{binary}:/gridq/gridq:ro");
        if mount.is_some() {
            args.extend(["-v", volume.as_str()]);
        }
        args.extend([image.as_str(), "/gridq/gridq", "--version"]);
        let out = docker(&args);
        assert!(out.status.success(), "{image}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), version, "{image}");
    }

    // A real worker in the empty image: its jobs are the binary itself (there is nothing
    // else to run), and they all succeed.
    let mut c = Cluster::new("portable-scratch").await;
    let worker = start_worker(&c, &scratch.0, None, "scratch");
    c.submit("name: empty\ncommand: [/gridq/gridq, --version]\nparameters:\n  x: !!python/tuple [0, 6]\n")
        .await;
    let jobs = c.wait_done("empty", Duration::from_secs(120)).await;
    assert_eq!(jobs.len(), 6);
    assert_eq!(
        c.counts("empty").get("succeeded"),
        Some(&6),
        "{}",
        logs(&worker)
    );
    // SIGTERM reaches the worker through init: it stops gracefully (exit 0), not killed.
    assert_eq!(stop(&worker), 0, "{}", logs(&worker));
    c.stop_master().await;

    // A real worker in a foreign Debian image with the binary mounted: python jobs, each of
    // which leaves an orphan behind, which init reaps.
    let mut c = Cluster::new("portable-debian").await;
    let worker = start_worker(&c, &user_image, Some(&binary), "debian");
    c.write(
        "orphan.py",
        "import os, subprocess, sys\nsubprocess.Popen(['sleep', '0.2'])\nprint('python', sys.version_info[0], os.environ['GRIDQ_PARAM_X'])\n",
    );
    // The project is the container's /tmp: the script goes through the sweep's argv.
    let script = std::fs::read_to_string(c.project.join("orphan.py")).unwrap();
    c.submit(&format!(
        "name: orphans\ncommand: [python3, -c, {script:?}]\nparameters:\n  x: !!python/tuple [0, 6]\n"
    ))
    .await;
    c.wait_done("orphans", Duration::from_secs(120)).await;
    assert_eq!(
        c.counts("orphans").get("succeeded"),
        Some(&6),
        "{}",
        logs(&worker)
    );
    wait_until(
        "no zombie left in the container",
        Duration::from_secs(20),
        || {
            let out = docker(&["exec", &worker.0, "ps", "-eo", "pid,stat,comm"]);
            let table = String::from_utf8_lossy(&out.stdout).into_owned();
            let zombies = table
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|s| s.starts_with('Z'))
                })
                .count();
            if out.status.success() && zombies == 0 && !table.contains("sleep") {
                Ok(())
            } else {
                Err(table)
            }
        },
    )
    .await;
    assert_eq!(stop(&worker), 0, "{}", logs(&worker));
    c.stop_master().await;
}
