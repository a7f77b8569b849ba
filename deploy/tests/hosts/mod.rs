//! SSH test hosts for the end-to-end tests of `gridq deploy`: private sshd instances on their
//! own loopback addresses (127.0.0.2-4 in the docker group, 127.0.0.5 without Docker access),
//! each for its own Unix user, key-only. `scripts/test-hosts.sh` makes them.
//!
//! `scripts/test.sh` brings them up once and names their description in `GRIDQ_TEST_HOSTS_ENV`.
//! Without it (plain `cargo test`, as root), the first test runs `scripts/test-hosts.sh up`
//! itself; the script is idempotent and leaves running instances alone.
//!
//! Commands run on a host are given as argv: [`TestHost::ssh`] quotes every element for the
//! remote shell, so a value reaches the remote program as one argument, whatever it holds.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One SSH host: an sshd on `addr:port` that lets `user` in with `key`.
#[derive(Debug, Clone)]
pub struct TestHost {
    /// `h1`, `h2`, `h3` or `nodocker`.
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub user: String,
    /// The client's private key.
    pub key: PathBuf,
    /// Holds the host keys of all test hosts; ssh checks them strictly.
    pub known_hosts: PathBuf,
    /// Whether `user` is in the docker group.
    pub docker: bool,
}

/// All test hosts.
#[derive(Debug)]
pub struct TestHosts {
    /// The three hosts whose users can use Docker.
    pub docker: Vec<TestHost>,
    /// A host whose user is not in the docker group.
    pub nodocker: TestHost,
    /// An ssh_config naming the hosts h1, h2, h3 and nodocker (for `ssh -F`).
    pub ssh_config: PathBuf,
}

impl TestHost {
    /// `user@addr:port`, the way a deploy host list names it.
    pub fn target(&self) -> String {
        format!("{}@{}:{}", self.user, self.addr, self.port)
    }

    /// The ssh options that reach this host: its key only, strict host key checking against
    /// the test known_hosts, never a prompt.
    pub fn ssh_options(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-p".into(),
            self.port.to_string(),
            "-l".into(),
            self.user.clone(),
        ]
    }

    /// `ssh ... HOST ARGV`: runs `argv` on the host. Each element is quoted for the remote
    /// shell (ssh hands the command line to the user's shell), so it arrives as one argument.
    pub fn ssh<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options()).arg("--").arg(&self.addr);
        let line = remote_command_line(argv);
        if !line.is_empty() {
            cmd.arg(line);
        }
        cmd
    }

    /// Runs `argv` on the host with `stdin` as its input; panics if it takes longer than
    /// `limit` (and kills ssh).
    pub fn run<I, S>(&self, argv: I, stdin: &[u8], limit: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        output_within(self.ssh(argv), stdin, limit)
    }

    /// Waits until the host's sshd answers with its banner.
    pub fn wait_listening(&self, limit: Duration) {
        let addr: SocketAddr = format!("{}:{}", self.addr, self.port)
            .parse()
            .expect("host address");
        let deadline = Instant::now() + limit;
        loop {
            let seen = match banner(addr) {
                Ok(b) if b.starts_with("SSH-") => return,
                Ok(b) => format!("banner {b:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "sshd of {} did not answer within {limit:?}; last seen: {seen}",
                self.target()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The remote command line for `argv`: every element single-quoted for a POSIX shell.
pub fn remote_command_line<I, S>(argv: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    argv.into_iter()
        .map(|a| shell_words::quote(a.as_ref()).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn banner(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Runs `cmd` with `stdin` as its input and collects its output; panics after `limit`.
pub fn output_within(mut cmd: Command, stdin: &[u8], limit: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Closing stdin is the end of the input (for dial-stdio: the request is complete).
        let _ = input.write_all(&data);
        drop(input);
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `user@addr:port` into a host.
fn parse_target(
    name: &str,
    target: &str,
    key: &Path,
    known_hosts: &Path,
    docker: bool,
) -> TestHost {
    let (user, rest) = target
        .split_once('@')
        .unwrap_or_else(|| panic!("bad test host {target:?}"));
    let (addr, port) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("bad test host {target:?}"));
    TestHost {
        name: name.to_owned(),
        addr: addr.to_owned(),
        port: port
            .parse()
            .unwrap_or_else(|_| panic!("bad port in {target:?}")),
        user: user.to_owned(),
        key: key.to_owned(),
        known_hosts: known_hosts.to_owned(),
        docker,
    }
}

fn wait_for_file(path: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.contains("GRIDQ_TEST_HOST_NODOCKER=") {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the test hosts were not up within {limit:?} (no {})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bring_up() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-hosts.sh");
    let out = output_within(
        {
            let mut c = Command::new(&script);
            c.arg("up");
            c
        },
        b"",
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{} up failed ({}); it needs root, sshd and ssh (scripts/setup.sh):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("test-hosts.sh up prints its env file")
            .trim(),
    )
}

/// The test hosts, brought up on first use when `scripts/test.sh` did not.
pub fn hosts() -> &'static TestHosts {
    static HOSTS: OnceLock<TestHosts> = OnceLock::new();
    HOSTS.get_or_init(|| {
        let env_file = match std::env::var_os("GRIDQ_TEST_HOSTS_ENV") {
            Some(path) => PathBuf::from(path),
            None => bring_up(),
        };
        let env = parse_env(&wait_for_file(&env_file, Duration::from_secs(120)));
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing from {}", env_file.display()))
        };
        let key = PathBuf::from(get("GRIDQ_TEST_SSH_KEY"));
        let known_hosts = PathBuf::from(get("GRIDQ_TEST_SSH_KNOWN_HOSTS"));
        let docker: Vec<TestHost> = get("GRIDQ_TEST_HOSTS")
            .split_whitespace()
            .enumerate()
            .map(|(i, t)| parse_target(&format!("h{}", i + 1), t, &key, &known_hosts, true))
            .collect();
        let nodocker = parse_target(
            "nodocker",
            &get("GRIDQ_TEST_HOST_NODOCKER"),
            &key,
            &known_hosts,
            false,
        );
        for h in docker.iter().chain([&nodocker]) {
            h.wait_listening(Duration::from_secs(30));
        }
        TestHosts {
            docker,
            nodocker,
            ssh_config: PathBuf::from(get("GRIDQ_TEST_SSH_CONFIG")),
        }
    })
}

/// `docker` on this machine with `args`, its stdout trimmed; panics when it fails.
pub fn local_docker<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("docker");
    cmd.args(args);
    let out = output_within(cmd, b"", Duration::from_secs(60));
    assert!(
        out.status.success(),
        "local docker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The deploy flags for the images and the static gridq binary, from GRIDQ_TEST_IMAGES_ENV
/// (written by `scripts/build-images.sh --env-file`): the workers run in `gridq-python`, a
/// Debian image with python3 and no gridq (the stand-in for a team's own image), with the
/// binary mounted. The images must be present.
pub fn deploy_image_flags() -> Vec<(String, String)> {
    let path = std::env::var("GRIDQ_TEST_IMAGES_ENV").expect(
        "GRIDQ_TEST_IMAGES_ENV: run scripts/build-images.sh --env-file FILE (scripts/test.sh does)",
    );
    let found = parse_env(&std::fs::read_to_string(&path).expect("images env file"));
    let get = |k: &str| {
        found
            .get(k)
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("{k} in {path}"))
    };
    let flags = vec![
        ("--worker-image".to_owned(), get("GRIDQ_USER_IMAGE")),
        ("--broker-image".to_owned(), get("GRIDQ_RABBITMQ_IMAGE")),
        ("--gridq-binary".to_owned(), get("GRIDQ_BINARY")),
    ];
    for (_, image) in &flags[..2] {
        let ok = Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", image])
            .output()
            .expect("docker")
            .status
            .success();
        assert!(
            ok,
            "image {image} is missing: build it with scripts/build-images.sh (scripts/test.sh does)"
        );
    }
    assert!(
        Path::new(&flags[2].1).is_file(),
        "{} is missing",
        flags[2].1
    );
    flags
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes whatever a test cluster left: every container and volume labelled with it, and its
/// remote path (`gridq/NAME`) on the Docker hosts.
pub fn remove_cluster(name: &str) {
    let label = format!("label=gridq.cluster={name}");
    for what in [
        &["ps", "-aq", "--filter", &label][..],
        &["volume", "ls", "-q", "--filter", &label][..],
    ] {
        let Ok(out) = Command::new("docker").args(what).output() else {
            continue;
        };
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let rm: &[&str] = if what[0] == "ps" {
                &["rm", "-f", "-v", id]
            } else {
                &["volume", "rm", "-f", id]
            };
            let _ = Command::new("docker").args(rm).output();
        }
    }
    for h in &hosts().docker {
        let _ = h.run(
            ["rm", "-rf", "--", &format!("gridq/{name}")],
            b"",
            Duration::from_secs(30),
        );
    }
}
