//! SSH to many hosts at once, over the `openssh` crate (the system `ssh` client with
//! ControlMaster multiplexing): [`Sessions::connect`] logs in to every host in parallel, a
//! bounded number at a time, and [`Sessions::for_each`] runs work on every connected host the
//! same way.
//!
//! Remote commands are argv lists: every element goes through `openssh`'s `.arg()`, which
//! quotes it for the remote shell, so a value arrives as exactly one argument whatever it holds.
//! Nothing here builds a shell command line from values.
//!
//! Failures are [`SshError`]s that name the host and say what to do: unreachable, login refused
//! (wrong key), host key mismatch or unknown, command not found, deadline. They are classified
//! from `openssh`'s errors and from what `ssh` wrote to its log, which is the only place ssh
//! says why a login failed.
//!
//! # Lifetime
//! Each host's connection is one `ssh -M -N` master process that gridq starts and owns: a child
//! of gridq (never daemonized), in its own process group (so a Ctrl-C at the terminal reaches
//! gridq, which then closes its connections in order), started with `ControlPersist=no` (no
//! idle timer: a port forward answers for as long as the connection is open, whether used or
//! not). The master ends when its [`HostSession`] is closed or dropped (SIGTERM, then SIGKILL
//! after a grace period), and with gridq itself, however gridq ends: it is started from a
//! thread that lives as long as the process, with `PR_SET_PDEATHSIG`.
//!
//! The control sockets and the masters' logs live in a private (0700) directory under the
//! system temporary directory (`$TMPDIR`), removed with the last session.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openssh::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::hosts::Host;

/// `Result` with [`SshError`].
pub type Result<T, E = SshError> = std::result::Result<T, E>;

/// How host keys are checked against the known_hosts file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// The host must be in known_hosts with the key it presents (`StrictHostKeyChecking=yes`).
    #[default]
    Strict,
    /// A host not yet in known_hosts is added; a changed key is still refused
    /// (`StrictHostKeyChecking=accept-new`).
    AcceptNew,
}

/// How to reach the hosts.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// The private key to log in with (`ssh -i`, with `IdentitiesOnly=yes`); ssh's defaults
    /// and agent when absent.
    pub identity: Option<PathBuf>,
    /// The known_hosts file (`UserKnownHostsFile`); `~/.ssh/known_hosts` when absent.
    pub known_hosts: Option<PathBuf>,
    /// How host keys are checked.
    pub host_keys: HostKeyPolicy,
    /// An ssh config file (`ssh -F`); `none` reads no config file at all, so that only these
    /// options apply. `~/.ssh/config` when absent.
    pub config_file: Option<PathBuf>,
    /// How long a TCP connection and the SSH banner may take (`ConnectTimeout`); a whole login
    /// may take twice this plus five seconds.
    pub connect_timeout: Duration,
    /// How many hosts are logged in to, or worked on, at once.
    pub parallel: usize,
}

impl Default for SshOptions {
    fn default() -> Self {
        Self {
            identity: None,
            known_hosts: None,
            host_keys: HostKeyPolicy::Strict,
            config_file: None,
            connect_timeout: Duration::from_secs(10),
            parallel: 8,
        }
    }
}

/// Why something failed on a host. Every message starts with `host N [user@]addr[:port]`.
///
/// Worth retrying: [`Unreachable`](Self::Unreachable) and [`Disconnected`](Self::Disconnected)
/// (see [`SshError::is_retryable`]); the others need the user to fix something first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    /// No SSH server answered: connection refused, timed out, no route, unknown name.
    #[error(
        "{host}: unreachable ({detail}); check the address and port, and that sshd is running there"
    )]
    Unreachable {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// What ssh said.
        detail: String,
    },
    /// The server refused the login: the key is not authorized for that user.
    #[error(
        "{host}: authentication failed ({detail}); {key} is not accepted for {user}: add its public key to that user's ~/.ssh/authorized_keys, or give the right key with -i"
    )]
    AuthFailed {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The user logged in as (`the default user` when none was given).
        user: String,
        /// The key tried (`the default keys` when none was given).
        key: String,
        /// What ssh said.
        detail: String,
    },
    /// ssh could not load the private key given with -i (too open, or not a key), so the
    /// server refused the login.
    #[error(
        "{host}: authentication failed: ssh cannot use the key {key} ({detail}); a private key must be readable by its owner only (chmod 600) and in a format ssh reads"
    )]
    BadKey {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The key file.
        key: String,
        /// What ssh said about it.
        detail: String,
    },
    /// The host presented a key other than the one known_hosts records for it.
    #[error(
        "{host}: host key mismatch: the server's key differs from the one recorded for {known_as} in {known_hosts}; this may be an attack, or the host was reinstalled: check its fingerprint, then remove the old key with `ssh-keygen -f {known_hosts} -R '{known_as}'`"
    )]
    HostKeyMismatch {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The name known_hosts knows the host by: `addr` or `[addr]:port`.
        known_as: String,
        /// The known_hosts file checked.
        known_hosts: String,
    },
    /// The host is not in known_hosts and host keys are checked strictly.
    #[error(
        "{host}: unknown host key: {known_as} is not in {known_hosts}; check the host's fingerprint and add it to that file (`ssh-keyscan{keyscan_port} {addr}`), or pass --accept-new-host-keys"
    )]
    UnknownHostKey {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The name known_hosts would know the host by.
        known_as: String,
        /// The known_hosts file checked.
        known_hosts: String,
        /// ` -p PORT`, or nothing for the default port.
        keyscan_port: String,
        /// The host's address.
        addr: String,
    },
    /// The remote shell could not find the program (exit status 127).
    #[error(
        "{host}: command not found: `{program}` is not installed or not on {user}'s PATH there"
    )]
    CommandNotFound {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The program (`argv[0]`).
        program: String,
        /// The remote user.
        user: String,
    },
    /// The command ran past its deadline; gridq stopped waiting and closed its channel.
    #[error("{host}: `{program}` did not finish within {limit}")]
    Deadline {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The program (`argv[0]`).
        program: String,
        /// The deadline, e.g. `30s`.
        limit: String,
    },
    /// The connection broke, or the remote command was killed by a signal (ssh's
    /// multiplexing cannot tell these apart).
    #[error("{host}: the connection was lost or `{program}` was killed by a signal ({detail})")]
    Disconnected {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The program (`argv[0]`), or `ssh` for the login itself.
        program: String,
        /// What openssh said.
        detail: String,
    },
    /// Any other failure of ssh on this host.
    #[error("{host}: ssh failed: {detail}")]
    Other {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// What ssh or openssh said.
        detail: String,
    },
    /// A local failure before any host was contacted.
    #[error("cannot create a private directory for the SSH control sockets in {dir}: {detail}")]
    ControlDir {
        /// Where it was to be created.
        dir: String,
        /// The I/O error.
        detail: String,
    },
}

impl SshError {
    /// [`SshError::Other`] for `host`: a failure this module cannot classify further (a
    /// caller's own check of a command's output, say).
    pub fn other(host: &Host, detail: impl Into<String>) -> Self {
        Self::Other {
            host: who(host),
            detail: detail.into(),
        }
    }

    /// Whether trying again later may succeed without anything being fixed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Disconnected { .. })
    }

    /// A short machine-readable name: `unreachable`, `auth_failed`, `bad_key`, `host_key_mismatch`,
    /// `unknown_host_key`, `command_not_found`, `deadline`, `disconnected`, `other`,
    /// `control_dir`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::AuthFailed { .. } => "auth_failed",
            Self::BadKey { .. } => "bad_key",
            Self::HostKeyMismatch { .. } => "host_key_mismatch",
            Self::UnknownHostKey { .. } => "unknown_host_key",
            Self::CommandNotFound { .. } => "command_not_found",
            Self::Deadline { .. } => "deadline",
            Self::Disconnected { .. } => "disconnected",
            Self::Other { .. } => "other",
            Self::ControlDir { .. } => "control_dir",
        }
    }
}

/// `host N [user@]addr[:port]`: how errors and messages name a host.
pub fn who(host: &Host) -> String {
    format!("host {} {host}", host.index)
}

/// The name ssh files a host under in known_hosts: `addr`, or `[addr]:port` off port 22.
fn known_as(host: &Host) -> String {
    match host.port {
        Some(port) if port != 22 => format!("[{}]:{port}", host.addr),
        _ => host.addr.clone(),
    }
}

/// Turns what ssh logged when a login failed into an error for `host`.
fn classify_login_failure(host: &Host, options: &SshOptions, log: &str) -> SshError {
    let known_hosts = options.known_hosts.as_ref().map_or_else(
        || "~/.ssh/known_hosts".to_owned(),
        |p| p.display().to_string(),
    );
    let lower = log.to_ascii_lowercase();
    if lower.contains("remote host identification has changed")
        || lower.contains("has changed and you have requested strict checking")
    {
        return SshError::HostKeyMismatch {
            host: who(host),
            known_as: known_as(host),
            known_hosts,
        };
    }
    if lower.contains("host key is known for") || lower.contains("host key verification failed") {
        return SshError::UnknownHostKey {
            host: who(host),
            known_as: known_as(host),
            known_hosts,
            keyscan_port: host.port.map(|p| format!(" -p {p}")).unwrap_or_default(),
            addr: host.addr.clone(),
        };
    }
    // The last line is ssh's reason; the lines before it are warnings and banners.
    let detail = log
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("ssh exited without saying why")
        .trim_start_matches("ssh: ")
        .to_owned();
    if let Some(line) = log.lines().find(|l| l.starts_with("Load key \"")) {
        return SshError::BadKey {
            host: who(host),
            key: options
                .identity
                .as_ref()
                .map_or_else(|| "(default)".to_owned(), |p| p.display().to_string()),
            detail: line.trim().to_owned(),
        };
    }
    if lower.contains("permission denied (") || lower.contains("too many authentication failures") {
        return SshError::AuthFailed {
            host: who(host),
            user: host
                .user
                .clone()
                .unwrap_or_else(|| "the default user".to_owned()),
            key: options.identity.as_ref().map_or_else(
                || "none of the default keys".to_owned(),
                |p| format!("the key {}", p.display()),
            ),
            detail,
        };
    }
    const UNREACHABLE: [&str; 9] = [
        "connection refused",
        "timed out",
        "no route to host",
        "network is unreachable",
        "could not resolve hostname",
        "name or service not known",
        "connection closed by",
        "connection reset",
        "kex_exchange_identification",
    ];
    if UNREACHABLE.iter().any(|s| lower.contains(s)) {
        return SshError::Unreachable {
            host: who(host),
            detail,
        };
    }
    SshError::Other {
        host: who(host),
        detail,
    }
}

/// An openssh error while running `program` on `host`.
fn command_error(host: &Host, program: &str, err: openssh::Error) -> SshError {
    match err {
        // openssh reports exit status 127, the shell's "command not found", this way.
        openssh::Error::Remote(e) if e.kind() == std::io::ErrorKind::NotFound => {
            SshError::CommandNotFound {
                host: who(host),
                program: program.to_owned(),
                user: host
                    .user
                    .clone()
                    .unwrap_or_else(|| "the remote user".to_owned()),
            }
        }
        openssh::Error::Disconnected
        | openssh::Error::RemoteProcessTerminated
        | openssh::Error::SshMux(_)
        | openssh::Error::Master(_) => SshError::Disconnected {
            host: who(host),
            program: program.to_owned(),
            detail: error_chain(&err),
        },
        _ => SshError::Other {
            host: who(host),
            detail: error_chain(&err),
        },
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A private directory for control sockets, removed on drop.
#[derive(Debug)]
struct ControlDir(PathBuf);

impl ControlDir {
    fn create() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last = None;
        // `create` (not `create_all`) fails on an existing path, so a directory planted by
        // someone else under a guessed name is never used.
        for attempt in 0..16u32 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!(
                "gridq-ssh-{}-{stamp:08x}-{n}-{attempt}",
                std::process::id()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(SshError::ControlDir {
                        dir: base.display().to_string(),
                        detail: e.to_string(),
                    });
                }
            }
        }
        Err(SshError::ControlDir {
            dir: base.display().to_string(),
            detail: last.map_or_else(String::new, |e| e.to_string()),
        })
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which stream an output line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The remote command's standard output.
    Stdout,
    /// Its standard error.
    Stderr,
}

/// What a remote command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its exit status.
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

impl Output {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// A logged-in connection to one host: its ssh master process, and the multiplexed session
/// over it. Dropping it ends the master (see the module documentation).
#[derive(Debug)]
pub struct HostSession {
    host: Host,
    // Fields drop in order: the session (a handle on the socket), then the master process,
    // then the directory that holds its socket and log.
    session: Arc<openssh::Session>,
    master: Master,
    _control: Arc<ControlDir>,
}

/// Lines longer than this are passed on in pieces, so a remote program that never writes a
/// newline cannot make gridq buffer without bound.
const MAX_LINE: usize = 64 * 1024;

impl HostSession {
    /// The host this session is logged in to.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The multiplexed `openssh` session, for what [`HostSession::run`] does not cover: a
    /// command with piped standard input (a tar stream, `docker system dial-stdio`), or a
    /// port forward. Commands spawned on it must still be argv lists (`.arg()` per element).
    pub fn openssh(&self) -> &Arc<openssh::Session> {
        &self.session
    }

    /// `host N [user@]addr[:port]`: how errors name this host.
    pub fn who(&self) -> String {
        who(&self.host)
    }

    /// Runs `argv` on the host with no input and collects its output.
    ///
    /// # Errors
    /// [`SshError::CommandNotFound`] when the remote shell cannot find `argv[0]` (openssh
    /// reads exit status 127 so, whoever exited with it),
    /// [`SshError::Deadline`] past `deadline` (the remote program is not killed: its channel
    /// is closed, so it gets EOF and SIGPIPE), [`SshError::Disconnected`] when the connection
    /// drops or the program is killed by a signal. A nonzero exit status is not an error.
    pub async fn run<S: AsRef<str>>(
        &self,
        argv: &[S],
        deadline: Option<Duration>,
    ) -> Result<Output> {
        self.collect(argv, None, deadline).await
    }

    /// Runs `argv` on the host with `input` on its standard input (a secret that must not be
    /// on a command line, say) and collects its output.
    ///
    /// # Errors
    /// As for [`HostSession::run`].
    pub async fn run_with_input<S: AsRef<str>>(
        &self,
        argv: &[S],
        input: &[u8],
        deadline: Option<Duration>,
    ) -> Result<Output> {
        self.collect(argv, Some(input), deadline).await
    }

    async fn collect<S: AsRef<str>>(
        &self,
        argv: &[S],
        input: Option<&[u8]>,
        deadline: Option<Duration>,
    ) -> Result<Output> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let code = self
            .run_lines_input(argv, input, deadline, |stream, line| {
                let buf = match stream {
                    Stream::Stdout => &mut stdout,
                    Stream::Stderr => &mut stderr,
                };
                buf.extend_from_slice(line);
                buf.push(b'\n');
            })
            .await?;
        Ok(Output {
            code,
            stdout,
            stderr,
        })
    }

    /// Runs `argv` on the host with no input, calling `on_line` with every line of its output
    /// as it arrives (without the newline), and returns its exit status.
    ///
    /// # Errors
    /// As for [`HostSession::run`].
    pub async fn run_lines<S: AsRef<str>>(
        &self,
        argv: &[S],
        deadline: Option<Duration>,
        on_line: impl FnMut(Stream, &[u8]),
    ) -> Result<i32> {
        self.run_lines_input(argv, None, deadline, on_line).await
    }

    async fn run_lines_input<S: AsRef<str>>(
        &self,
        argv: &[S],
        input: Option<&[u8]>,
        deadline: Option<Duration>,
        mut on_line: impl FnMut(Stream, &[u8]),
    ) -> Result<i32> {
        let Some(program) = argv.first().map(|p| p.as_ref().to_owned()) else {
            return Err(SshError::other(
                &self.host,
                "no command to run (empty argv)",
            ));
        };
        let work = async {
            let mut cmd = self.session.command(program.as_str());
            cmd.args(argv.iter().skip(1).map(AsRef::as_ref))
                .stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .await
                .map_err(|e| command_error(&self.host, &program, e))?;
            if let (Some(bytes), Some(mut stdin)) = (input, child.stdin().take()) {
                // Small: written whole before the output is read; closed for EOF.
                let _ = stdin.write_all(bytes).await;
                let _ = stdin.shutdown().await;
            }
            let mut out = child.stdout().take();
            let mut err = child.stderr().take();
            let (mut out_lines, mut err_lines) = (LineBuffer::default(), LineBuffer::default());
            let (mut out_buf, mut err_buf) = ([0u8; 8192], [0u8; 8192]);
            while out.is_some() || err.is_some() {
                tokio::select! {
                    read = async { out.as_mut().expect("guarded").read(&mut out_buf).await }, if out.is_some() => {
                        match read {
                            Ok(0) | Err(_) => {
                                out = None;
                                out_lines.finish(|l| on_line(Stream::Stdout, l));
                            }
                            Ok(n) => out_lines.push(&out_buf[..n], |l| on_line(Stream::Stdout, l)),
                        }
                    }
                    read = async { err.as_mut().expect("guarded").read(&mut err_buf).await }, if err.is_some() => {
                        let mut emit = |l: &[u8]| on_line(Stream::Stderr, l);
                        match read {
                            Ok(0) | Err(_) => {
                                err = None;
                                err_lines.finish(&mut emit);
                            }
                            Ok(n) => err_lines.push(&err_buf[..n], &mut emit),
                        }
                    }
                }
            }
            let status = child
                .wait()
                .await
                .map_err(|e| command_error(&self.host, &program, e))?;
            status.code().ok_or_else(|| SshError::Disconnected {
                host: who(&self.host),
                program: program.clone(),
                detail: "no exit status".to_owned(),
            })
        };
        match deadline {
            Some(limit) => {
                tokio::time::timeout(limit, work)
                    .await
                    .map_err(|_| SshError::Deadline {
                        host: who(&self.host),
                        program: program.clone(),
                        limit: humantime::format_duration(limit).to_string(),
                    })?
            }
            None => work.await,
        }
    }

    /// Makes the ssh master exit now (SIGTERM), dropping the channels of commands still
    /// running; those remote programs are not killed (they get EOF and SIGPIPE). A no-op when
    /// the master is gone already.
    pub async fn abort(&self) {
        self.master.terminate();
    }

    /// Ends the connection: the ssh master is asked to exit (SIGTERM) and, if it has not
    /// within a few seconds, killed.
    pub async fn close(self) {
        self.master.stop(MASTER_GRACE).await;
    }
}

/// How long a master may take to exit once asked, before it is killed.
const MASTER_GRACE: Duration = Duration::from_secs(5);

/// An `ssh -M -N` master process, owned by its [`HostSession`]; killed when dropped.
#[derive(Debug)]
struct Master {
    /// The child, until it has been reaped (its pid cannot be reused before that, so a signal
    /// sent while it is here reaches this process and no other).
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl Master {
    fn new(child: std::process::Child) -> Self {
        Self {
            child: std::sync::Mutex::new(Some(child)),
        }
    }

    /// Whether it is still running (reaping it when it is not).
    fn running(&self) -> bool {
        let mut slot = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.as_mut().map(std::process::Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *slot = None;
                false
            }
            None => false,
        }
    }

    /// Asks it to exit: ssh closes its channels and removes its socket.
    fn terminate(&self) {
        let slot = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pid) = slot.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Asks it to exit and waits up to `grace` for that, then kills it.
    async fn stop(&self, grace: Duration) {
        self.terminate();
        let deadline = tokio::time::Instant::now() + grace;
        while self.running() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill();
    }

    /// Kills it (when it still runs) and reaps it.
    fn kill(&self) {
        let mut slot = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(mut child) = slot.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                // SIGKILL cannot be caught: this returns as soon as the kernel has ended it.
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Splits a byte stream into lines.
#[derive(Debug, Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if self.0.is_empty() {
                emit(&bytes[..nl]);
            } else {
                self.0.extend_from_slice(&bytes[..nl]);
                emit(&self.0);
                self.0.clear();
            }
            bytes = &bytes[nl + 1..];
        }
        self.0.extend_from_slice(bytes);
        while self.0.len() >= MAX_LINE {
            let rest = self.0.split_off(MAX_LINE);
            emit(&self.0);
            self.0 = rest;
        }
    }

    fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.0.is_empty() {
            emit(&self.0);
            self.0.clear();
        }
    }
}

/// One host of a [`Sessions`]: logged in, or why not.
pub type Connection = Result<Arc<HostSession>, SshError>;

/// Connections to many hosts, in the order of the host list.
#[derive(Debug)]
pub struct Sessions {
    // Every session holds the control directory too: it is removed when the last one is
    // gone, even when a session outlives this (held by a task of an interrupted `for_each`).
    connections: Vec<(Host, Connection)>,
    parallel: usize,
    _control: Arc<ControlDir>,
}

impl Sessions {
    /// Logs in to every host, `options.parallel` at a time. A host that cannot be reached is
    /// recorded with its error; the others are unaffected.
    ///
    /// # Errors
    /// Only [`SshError::ControlDir`], when the private socket directory cannot be made.
    pub async fn connect(hosts: &[Host], options: &SshOptions) -> Result<Self> {
        let control = Arc::new(ControlDir::create()?);
        let parallel = options.parallel.max(1);
        let limit = Arc::new(Semaphore::new(parallel));
        let mut tasks = JoinSet::new();
        for (i, host) in hosts.iter().enumerate() {
            let (host, options, control, limit) = (
                host.clone(),
                options.clone(),
                Arc::clone(&control),
                Arc::clone(&limit),
            );
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                (i, connect_one(&host, &options, control, i).await)
            });
        }
        let mut results: Vec<Option<Connection>> = vec![None; hosts.len()];
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, result)) => results[i] = Some(result.map(Arc::new)),
                Err(e) => tracing::error!(cause = %e, "an ssh login task failed"),
            }
        }
        let connections = hosts
            .iter()
            .zip(results)
            .map(|(host, result)| {
                let result = result.unwrap_or_else(|| {
                    Err(SshError::Other {
                        host: who(host),
                        detail: "the login task panicked".to_owned(),
                    })
                });
                (host.clone(), result)
            })
            .collect();
        Ok(Self {
            connections,
            parallel,
            _control: control,
        })
    }

    /// Every host with its connection or the error that kept it from logging in.
    pub fn connections(&self) -> &[(Host, Connection)] {
        &self.connections
    }

    /// Runs `work` on every connected host, `parallel` at a time (the `parallel` of the
    /// options), and returns each host's outcome in host-list order; a host that did not log
    /// in gets its login error.
    pub async fn for_each<T, F, Fut>(&self, work: F) -> Vec<(Host, Result<T>)>
    where
        T: Send + 'static,
        F: Fn(Arc<HostSession>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let limit = Arc::new(Semaphore::new(self.parallel));
        let mut tasks = JoinSet::new();
        let mut results: Vec<Option<Result<T>>> = Vec::with_capacity(self.connections.len());
        for (i, (_, connection)) in self.connections.iter().enumerate() {
            match connection {
                Ok(session) => {
                    results.push(None);
                    let job = work(Arc::clone(session));
                    let limit = Arc::clone(&limit);
                    tasks.spawn(async move {
                        let _permit = limit.acquire_owned().await;
                        (i, job.await)
                    });
                }
                Err(e) => results.push(Some(Err(e.clone()))),
            }
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, result)) => results[i] = Some(result),
                Err(e) => tracing::error!(cause = %e, "a per-host task failed"),
            }
        }
        self.connections
            .iter()
            .zip(results)
            .map(|((host, _), result)| {
                let result = result.unwrap_or_else(|| {
                    Err(SshError::Other {
                        host: who(host),
                        detail: "the task panicked".to_owned(),
                    })
                });
                (host.clone(), result)
            })
            .collect()
    }

    /// Ends every connection at once, even with commands still running (see
    /// [`HostSession::abort`]): for an interrupted run.
    pub async fn abort(self) {
        let mut tasks = JoinSet::new();
        for (_, connection) in &self.connections {
            if let Ok(session) = connection {
                let session = Arc::clone(session);
                tasks.spawn(async move { session.abort().await });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Ends every connection (in parallel); the control directory goes with the last one.
    /// A session still held by a task of an interrupted [`Sessions::for_each`] ends when that
    /// task is dropped.
    pub async fn close(self) {
        let mut tasks = JoinSet::new();
        for (_, connection) in self.connections {
            if let Ok(session) = connection {
                if let Ok(session) = Arc::try_unwrap(session) {
                    tasks.spawn(session.close());
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Logs in to one host, within twice the connect timeout plus five seconds: starts its ssh
/// master (`slot` names its socket and log in the control directory) and waits until the
/// master listens on its control socket, which ssh does once the login has succeeded.
async fn connect_one(
    host: &Host,
    options: &SshOptions,
    control: Arc<ControlDir>,
    slot: usize,
) -> Result<HostSession> {
    let socket = control.0.join(format!("{slot}.sock"));
    let log = control.0.join(format!("{slot}.log"));
    let cmd = master_command(host, options, &socket, &log);
    let child = spawner::spawn(cmd).await.map_err(|e| SshError::Other {
        host: who(host),
        detail: format!("cannot start ssh: {e}"),
    })?;
    let master = Master::new(child);
    let limit = options.connect_timeout * 2 + Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if !master.running() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(classify_login_failure(host, options, &text));
        }
        // ssh creates the socket under another name and links it into place once it listens.
        if socket.exists() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            master.kill();
            return Err(SshError::Unreachable {
                host: who(host),
                detail: format!("no SSH login within {}", humantime::format_duration(limit)),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let session = openssh::Session::resume_mux(socket.into_boxed_path(), Some(log.into()));
    Ok(HostSession {
        host: host.clone(),
        session: Arc::new(session),
        master,
        _control: control,
    })
}

/// The master's command line: `ssh -M -N` in the foreground (no `-f`: it stays gridq's
/// child), with `ControlPersist=no` (ahead of any config file, which could otherwise make it
/// fork away or exit when idle), never prompting (`BatchMode`).
fn master_command(
    host: &Host,
    options: &SshOptions,
    socket: &std::path::Path,
    log: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-E")
        .arg(log)
        .arg("-S")
        .arg(socket)
        .args(["-M", "-N", "-o", "ControlPersist=no", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(match options.host_keys {
            HostKeyPolicy::Strict => "StrictHostKeyChecking=yes",
            HostKeyPolicy::AcceptNew => "StrictHostKeyChecking=accept-new",
        })
        .arg("-o")
        .arg(format!(
            "ConnectTimeout={}",
            options.connect_timeout.as_secs().max(1)
        ))
        .args(["-o", "ServerAliveInterval=15"]);
    if let Some(port) = host.port {
        cmd.arg("-p").arg(port.to_string());
    }
    if let Some(user) = &host.user {
        cmd.arg("-l").arg(user);
    }
    if let Some(key) = &options.identity {
        cmd.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(key);
    }
    if let Some(file) = &options.config_file {
        cmd.arg("-F").arg(file);
    }
    if let Some(file) = &options.known_hosts {
        let mut option = std::ffi::OsString::from("UserKnownHostsFile=");
        option.push(file);
        cmd.arg("-o").arg(option);
    }
    use std::os::unix::process::CommandExt as _;
    cmd.arg("--")
        .arg(&host.addr)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own process group: a Ctrl-C at the terminal goes to gridq alone, which closes
        // the connections itself (an interrupted deploy still has work to do over them).
        .process_group(0);
    cmd
}

/// Starts the ssh masters from one thread that lives as long as the process, each with
/// `PR_SET_PDEATHSIG`: that signal follows the *thread* that started a child, and a runtime's
/// threads may end before the process does; this one ends only with it.
mod spawner {
    #![allow(unsafe_code)]

    use std::io;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Child, Command};
    use std::sync::{Mutex, PoisonError, mpsc};

    type Request = (Command, tokio::sync::oneshot::Sender<io::Result<Child>>);

    static SPAWNER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

    /// Starts `cmd` so that it gets SIGTERM when gridq ends.
    pub(super) async fn spawn(mut cmd: Command) -> io::Result<Child> {
        let parent = nix::unistd::getpid();
        // SAFETY: the hook runs between fork and exec; it makes two system calls (prctl,
        // getppid), which are async-signal-safe, and neither allocates nor takes a lock.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                // gridq ended before the signal was armed: do not outlive it.
                if nix::unistd::getppid() != parent {
                    return Err(io::Error::other("gridq has exited"));
                }
                Ok(())
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender()?
            .send((cmd, reply))
            .map_err(|_| io::Error::other("the ssh spawner thread is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the ssh spawner thread is gone"))?
    }

    fn sender() -> io::Result<mpsc::Sender<Request>> {
        let mut slot = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = slot.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("gridq-ssh-spawner".into())
            .spawn(move || {
                // Never returns while the process lives: the sender stays in `SPAWNER`.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        *slot = Some(tx.clone());
        Ok(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::parse_hosts;

    fn host() -> Host {
        parse_hosts("gridq-h1@127.0.0.2:2222").unwrap().remove(0)
    }

    fn options() -> SshOptions {
        SshOptions {
            identity: Some("/k/id".into()),
            known_hosts: Some("/k/known_hosts".into()),
            ..SshOptions::default()
        }
    }

    #[test]
    fn refused_connections_are_unreachable() {
        let e = classify_login_failure(
            &host(),
            &options(),
            "connect to host 127.0.0.2 port 2222: Connection refused",
        );
        assert_eq!(
            e.to_string(),
            "host 1 gridq-h1@127.0.0.2:2222: unreachable (connect to host 127.0.0.2 port 2222: Connection refused); check the address and port, and that sshd is running there"
        );
        assert!(e.is_retryable());
    }

    #[test]
    fn refused_keys_are_authentication_failures() {
        let e = classify_login_failure(
            &host(),
            &options(),
            "Warning: something\ngridq-h1@127.0.0.2: Permission denied (publickey).",
        );
        assert_eq!(
            e.to_string(),
            "host 1 gridq-h1@127.0.0.2:2222: authentication failed (gridq-h1@127.0.0.2: Permission denied (publickey).); the key /k/id is not accepted for gridq-h1: add its public key to that user's ~/.ssh/authorized_keys, or give the right key with -i"
        );
        assert!(!e.is_retryable());
    }

    #[test]
    fn unusable_keys_are_named() {
        let log = "@@@\nPermissions 0644 for '/k/id' are too open.\nLoad key \"/k/id\": bad permissions\ngridq-h1@127.0.0.2: Permission denied (publickey).";
        let e = classify_login_failure(&host(), &options(), log);
        assert_eq!(
            e.to_string(),
            "host 1 gridq-h1@127.0.0.2:2222: authentication failed: ssh cannot use the key /k/id (Load key \"/k/id\": bad permissions); a private key must be readable by its owner only (chmod 600) and in a format ssh reads"
        );
    }

    #[test]
    fn host_key_problems_are_told_apart() {
        let changed = "@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key for [127.0.0.2]:2222 has changed and you have requested strict checking.\nHost key verification failed.";
        let e = classify_login_failure(&host(), &options(), changed);
        assert_eq!(e.kind(), "host_key_mismatch");
        assert!(
            e.to_string()
                .contains("ssh-keygen -f /k/known_hosts -R '[127.0.0.2]:2222'")
        );
        let unknown = "No ED25519 host key is known for [127.0.0.2]:2222 and you have requested strict checking.\nHost key verification failed.";
        let e = classify_login_failure(&host(), &options(), unknown);
        assert_eq!(
            e.to_string(),
            "host 1 gridq-h1@127.0.0.2:2222: unknown host key: [127.0.0.2]:2222 is not in /k/known_hosts; check the host's fingerprint and add it to that file (`ssh-keyscan -p 2222 127.0.0.2`), or pass --accept-new-host-keys"
        );
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut lines = Vec::new();
        let mut buf = LineBuffer::default();
        buf.push(b"a\nb", |l| lines.push(l.to_vec()));
        buf.push(b"c\n\nd", |l| lines.push(l.to_vec()));
        buf.finish(|l| lines.push(l.to_vec()));
        assert_eq!(lines, [&b"a"[..], b"bc", b"", b"d"]);
        let mut sizes = Vec::new();
        buf.push(&vec![b'x'; MAX_LINE * 2 + 5], |l| sizes.push(l.len()));
        buf.finish(|l| sizes.push(l.len()));
        assert_eq!(sizes, [MAX_LINE, MAX_LINE, 5]);
    }
}
