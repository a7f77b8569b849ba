//! The project, copied to a directory on a host: [`sync_project`] sends the files that
//! [`project_files`] selects, with rsync when both ends have it and as a tar stream otherwise.
//!
//! # What is sent
//! Every regular file and symbolic link (sent as a link, never followed) under the project
//! root, except:
//! - what `.gridqignore` files exclude. They use gitignore syntax and may sit at any depth,
//!   where their patterns apply below them; a deeper file overrides a shallower one, so a
//!   `!keep.log` re-includes what a parent's `*.log` left out. The `.gridqignore` files
//!   themselves are sent;
//! - `.git`, `target` and `.gridq`, at any depth, always;
//! - the caller's extra exclude patterns ([`SyncOptions::excludes`], gitignore syntax relative
//!   to the root).
//!
//! `.gitignore`, `.ignore` and git's global excludes are not read, and hidden files are sent:
//! a file git ignores (a data set, a local config) is often exactly what a job needs. Empty
//! directories are not created.
//!
//! # Incremental, never deleting
//! A file is sent only when the host's copy differs in size or modification time (rsync's
//! quick check; the tar stream compares whole seconds, the resolution tar keeps), or, for a
//! link, in its target. Syncing an unchanged tree again sends nothing.
//!
//! Nothing on the host is ever deleted (no `rsync --delete`): jobs may write their outputs
//! into the project directory, and a sync must not take them away. A file removed locally
//! stays on the host until `gridq clean --purge` ([`remove_remote`]) removes the whole
//! directory.
//!
//! # rsync over the existing connection
//! rsync starts its own `ssh`; gridq points it at the control socket of the session it
//! already holds (`-e 'ssh -S SOCKET ...'`), so the transfer is one more channel on the
//! multiplexed connection: no second login, no second host key check, and the key and
//! known_hosts gridq was given apply. `ProxyCommand=false` keeps that ssh from logging in on
//! its own should the master be gone; rsync then fails with exit 255. rsync splits `-e` on
//! whitespace, so a socket path with whitespace in it (from `TMPDIR`) is refused. The file
//! list goes to rsync's standard input NUL-separated (`--from0 --files-from=-`) and
//! `--protect-args` hands the remote path over without a remote shell, so no name is ever
//! parsed by a shell.
//!
//! # Tar stream
//! Without rsync, the host's tree is listed first with a fixed GNU `find -printf` command and
//! only files whose size or whole-second modification time differ are put into the archive
//! (everything, when the listing fails, say with a non-GNU `find`). The archive is written by
//! a blocking task straight into the standard input of `tar -x -p -f - -C PATH` on the host,
//! so it is streamed, never held in memory; modes and modification times are kept, files
//! belong to the remote user.
//!
//! # Remote commands
//! Every remote command is an argv list of fixed words plus the remote path as one argument
//! (see [`crate::ssh`]); no shell command line is built from values. Remote paths are relative
//! to the remote user's home (where ssh starts) unless absolute; a leading `~/` means the home
//! too. Every remote step has a deadline.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ignore::WalkBuilder;
use ignore::gitignore::GitignoreBuilder;
use openssh::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::ssh::{HostSession, SshError};

/// `Result` with [`SyncError`].
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The names never sent, at any depth: version control, build output, gridq's own state.
pub const DEFAULT_EXCLUDES: [&str; 3] = [".git", "target", ".gridq"];

/// The name of the ignore files honoured in the project, at any depth.
pub const IGNORE_FILE: &str = ".gridqignore";

/// The deadline of the quick remote commands of [`remote_abs_path`] and [`remove_remote`]'s
/// checks.
const QUICK_DEADLINE: Duration = Duration::from_secs(60);

/// The deadline of [`remove_remote`]'s `rm -rf`, which may have a large tree to remove.
const REMOVE_DEADLINE: Duration = Duration::from_secs(600);

/// How the files travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMethod {
    /// rsync when this machine and the host both have it, the tar stream otherwise.
    #[default]
    Auto,
    /// rsync over the existing SSH connection; an error when either end lacks it.
    Rsync,
    /// A tar archive streamed into `tar -x` on the host.
    Tar,
}

impl fmt::Display for SyncMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Rsync => "rsync",
            Self::Tar => "tar",
        })
    }
}

impl FromStr for SyncMethod {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "rsync" => Ok(Self::Rsync),
            "tar" => Ok(Self::Tar),
            other => Err(format!(
                "unknown sync method {other:?}; use auto, rsync or tar"
            )),
        }
    }
}

/// How [`sync_project`] works.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// rsync, tar, or whichever both ends support.
    pub method: SyncMethod,
    /// More gitignore-style patterns to leave out, on top of [`DEFAULT_EXCLUDES`] and the
    /// `.gridqignore` files.
    pub excludes: Vec<String>,
    /// The deadline of each short remote step: creating the directory, looking for rsync.
    pub step_timeout: Duration,
    /// The deadline of the transfer itself (and of the remote listing the tar stream starts
    /// with).
    pub transfer_timeout: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            method: SyncMethod::Auto,
            excludes: Vec::new(),
            step_timeout: Duration::from_secs(60),
            transfer_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// What [`sync_project`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// The method used: [`SyncMethod::Rsync`] or [`SyncMethod::Tar`], never `Auto`.
    pub method: SyncMethod,
    /// The files considered (all of [`project_files`]).
    pub files: usize,
    /// The files (and links) sent because the host's copy was missing or differed.
    pub sent: usize,
    /// The size of the regular files sent, in bytes.
    pub bytes: u64,
}

/// Why a sync, or a removal, failed. Messages start with `host N [user@]addr[:port]`, except
/// that of a [`Walk`](Self::Walk) failure outside [`sync_project`], which concerns no host.
///
/// Worth retrying (see [`SyncError::is_retryable`]): SSH failures that are, a broken tar
/// stream, and rsync failures of its connection or timeouts.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// SSH failed: the host unreachable, a command not found, a deadline passed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The project directory could not be listed (a local problem, the same for every host).
    #[error(
        "{}cannot list the project files in {root}: {detail}; check that the directory exists and is readable, and the syntax of its {IGNORE_FILE} files and exclude patterns",
        host_prefix(.host)
    )]
    Walk {
        /// `host N [user@]addr[:port]`, when listing for a sync to that host.
        host: Option<String>,
        /// The project root.
        root: String,
        /// What went wrong, naming the file.
        detail: String,
    },
    /// A local file could not be read (or changed while it was sent).
    #[error("{host}: cannot read the local file {file}: {detail}; check it and sync again")]
    LocalFile {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The file.
        file: String,
        /// The I/O error.
        detail: String,
    },
    /// The remote path cannot be synced to.
    #[error(
        "{host}: cannot sync to the remote path {path:?}: {reason}; name a directory, e.g. gridq/myproject"
    )]
    BadRemotePath {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The path as given.
        path: String,
        /// Why not.
        reason: String,
    },
    /// [`remove_remote`] was given a path whose removal would destroy more than a project.
    #[error(
        "{host}: refusing to remove {path:?}: {reason}; name the project directory itself, e.g. gridq/myproject"
    )]
    RefusedRemoval {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The path as given.
        path: String,
        /// Why it is dangerous.
        reason: String,
    },
    /// rsync was asked for and one end lacks it.
    #[error(
        "{host}: rsync is not installed {place}; install rsync there, or sync with the tar method"
    )]
    RsyncMissing {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// `on this machine` or `on the host`.
        place: &'static str,
    },
    /// The session's control socket cannot be handed to rsync.
    #[error(
        "{host}: rsync cannot use the ssh control socket {socket}: {reason}; set TMPDIR to a directory whose path has no whitespace, or sync with the tar method"
    )]
    ControlSocket {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The socket path.
        socket: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The local rsync could not be started or waited for.
    #[error("{host}: cannot run rsync on this machine: {detail}")]
    RsyncSpawn {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The I/O error.
        detail: String,
    },
    /// rsync ran and failed.
    #[error("{host}: rsync failed ({status}): {stderr}; {hint}")]
    RsyncFailed {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// `exit N` or `signal N`.
        status: String,
        /// rsync's exit code, when it exited.
        code: Option<i32>,
        /// The last lines rsync wrote to its standard error.
        stderr: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A remote command exited with a failure status.
    #[error("{host}: {action} failed (exit {code}): {stderr}; {hint}")]
    Remote {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// What was being done, with the command.
        action: String,
        /// Its exit status.
        code: i32,
        /// The last lines it wrote to its standard error.
        stderr: String,
        /// What to do about it.
        hint: String,
    },
    /// The tar stream to the host broke off.
    #[error(
        "{host}: the tar stream to the host broke off: {detail}; check the connection and sync again"
    )]
    Stream {
        /// `host N [user@]addr[:port]`.
        host: String,
        /// The I/O error.
        detail: String,
    },
}

fn host_prefix(host: &Option<String>) -> String {
    host.as_ref().map_or_else(String::new, |h| format!("{h}: "))
}

impl SyncError {
    /// Whether trying again later may succeed without anything being fixed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Ssh(e) => e.is_retryable(),
            Self::Stream { .. } => true,
            // Socket I/O, protocol stream, timeouts, connection (see rsync(1), EXIT VALUES).
            Self::RsyncFailed { code, .. } => {
                matches!(code, Some(10 | 12 | 30 | 35 | 255))
            }
            _ => false,
        }
    }

    /// This error, for a sync to `host`.
    fn on_host(self, host: String) -> Self {
        match self {
            Self::Walk { root, detail, .. } => Self::Walk {
                host: Some(host),
                root,
                detail,
            },
            other => other,
        }
    }
}

/// The files under `root` to send, as paths relative to it, sorted: every regular file and
/// symbolic link that neither a `.gridqignore` file, nor [`DEFAULT_EXCLUDES`], nor `excludes`
/// (gitignore-style patterns relative to `root`) leaves out. See the [module
/// documentation](self) for the rules.
///
/// # Errors
/// [`SyncError::Walk`] when a directory cannot be read, a `.gridqignore` holds an invalid
/// pattern, or an exclude pattern is invalid.
pub fn project_files(root: &Path, excludes: &[String]) -> Result<Vec<PathBuf>> {
    let walk_error = |detail: String| SyncError::Walk {
        host: None,
        root: root.display().to_string(),
        detail,
    };
    let mut extra = GitignoreBuilder::new(root);
    for pattern in excludes {
        extra
            .add_line(None, pattern)
            .map_err(|e| walk_error(format!("bad exclude pattern {pattern:?}: {e}")))?;
    }
    let extra = extra
        .build()
        .map_err(|e| walk_error(format!("bad exclude patterns: {e}")))?;

    let mut walk = WalkBuilder::new(root);
    walk.standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(move |entry| {
            if entry.depth() == 0 {
                return true;
            }
            let name = entry.file_name();
            if DEFAULT_EXCLUDES.iter().any(|d| name == *d) {
                return false;
            }
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            !extra.matched(entry.path(), is_dir).is_ignore()
        });
    let mut files = Vec::new();
    for entry in walk.build() {
        let entry = entry.map_err(|e| walk_error(e.to_string()))?;
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if !(kind.is_file() || kind.is_symlink()) {
            continue;
        }
        let relative = entry
            .path()
            .strip_prefix(root)
            .map_err(|_| walk_error(format!("{} is outside it", entry.path().display())))?;
        files.push(relative.to_owned());
    }
    files.sort();
    Ok(files)
}

/// Copies the project at `local_root` into `remote_path` on the session's host (created if
/// missing), sending only what changed; see the [module documentation](self).
///
/// # Errors
/// [`SyncError::RsyncMissing`] when rsync is forced and an end lacks it,
/// [`SyncError::RsyncFailed`], [`SyncError::Remote`] (mkdir or tar failed on the host, with
/// its message), [`SyncError::LocalFile`], [`SyncError::Walk`], and [`SyncError::Ssh`] for
/// connection problems and deadlines.
pub async fn sync_project(
    session: &HostSession,
    local_root: &Path,
    remote_path: &str,
    options: &SyncOptions,
) -> Result<SyncReport> {
    let host = session.who();
    if remote_path.trim().is_empty() {
        return Err(SyncError::BadRemotePath {
            host,
            path: remote_path.to_owned(),
            reason: "it is empty".to_owned(),
        });
    }
    let dest = RemotePath::parse(remote_path).operand();
    let files = {
        let (root, excludes) = (local_root.to_owned(), options.excludes.clone());
        join_blocking(tokio::task::spawn_blocking(move || {
            project_files(&root, &excludes)
        }))
        .await
        .map_err(|e| e.on_host(host.clone()))?
    };
    remote_checked(
        session,
        &["mkdir", "-p", "--", &dest],
        options.step_timeout,
        || format!("creating the remote directory {dest} (mkdir -p)"),
        "check that the remote user may create it",
    )
    .await?;
    let method = choose_method(session, options).await?;
    tracing::debug!(host = %session.host(), %method, files = files.len(), remote = %dest, "syncing the project");
    let sent = match method {
        SyncMethod::Tar => send_tar(session, local_root, &dest, &files, options).await?,
        // `choose_method` never answers Auto.
        SyncMethod::Rsync | SyncMethod::Auto => {
            send_rsync(session, local_root, &dest, &files, options).await?
        }
    };
    tracing::debug!(host = %session.host(), %method, sent = sent.files, bytes = sent.bytes, "project synced");
    Ok(SyncReport {
        method,
        files: files.len(),
        sent: sent.files,
        bytes: sent.bytes,
    })
}

/// The absolute path of `remote_path` on the host, symbolic links resolved (whether or not it
/// exists): what a container bind-mounts. GNU `realpath -m`; where that is missing, the
/// home's physical path (`pwd -P`) joined with `remote_path`, `..` resolved lexically.
///
/// # Errors
/// [`SyncError::Remote`] when neither works, [`SyncError::Ssh`] for connection problems.
pub async fn remote_abs_path(session: &HostSession, remote_path: &str) -> Result<String> {
    let path = RemotePath::parse(remote_path);
    let operand = path.operand();
    let out = session
        .run(&["realpath", "-m", "--", &operand], Some(QUICK_DEADLINE))
        .await;
    match out {
        Ok(out) if out.success() => return utf8_line(session, &out.stdout, "realpath"),
        Ok(out) => {
            tracing::debug!(host = %session.host(), stderr = %tail(&out.stderr), "realpath -m failed; resolving by hand");
        }
        Err(SshError::CommandNotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if path.absolute {
        return Ok(lexical_join("/", &path.parts));
    }
    let home = remote_checked(
        session,
        &["pwd", "-P"],
        QUICK_DEADLINE,
        || "finding the remote home directory (pwd -P)".to_owned(),
        "check the remote user's shell",
    )
    .await?;
    let home = utf8_line(session, &home, "pwd")?;
    Ok(lexical_join(&home, &path.parts))
}

/// Removes `remote_path` on the host and everything in it (`rm -rf`), for
/// `gridq clean --purge`. Missing already is fine.
///
/// # Errors
/// [`SyncError::RefusedRemoval`], before anything is removed, when the path is empty, is the
/// remote home (`.`, `~`, or its absolute path) or the root, contains a `..` component, or
/// resolves to a directory that holds the home; [`SyncError::Remote`] when `rm` fails.
pub async fn remove_remote(session: &HostSession, remote_path: &str) -> Result<()> {
    let refuse = |reason: &str| SyncError::RefusedRemoval {
        host: session.who(),
        path: remote_path.to_owned(),
        reason: reason.to_owned(),
    };
    if remote_path.trim().is_empty() {
        return Err(refuse("it is empty"));
    }
    let path = RemotePath::parse(remote_path);
    if path.parts.contains(&"..") {
        return Err(refuse("it has a `..` component"));
    }
    if path.parts.is_empty() {
        return Err(refuse(if path.absolute {
            "it is the root directory"
        } else {
            "it is the remote home directory"
        }));
    }
    let target = remote_abs_path(session, remote_path).await?;
    let home = remote_abs_path(session, ".").await?;
    if target == "/" {
        return Err(refuse("it is the root directory"));
    }
    if target == home {
        return Err(refuse("it is the remote home directory"));
    }
    if home.starts_with(&format!("{target}/")) {
        return Err(refuse("it contains the remote home directory"));
    }
    let operand = path.operand();
    remote_checked(
        session,
        &["rm", "-rf", "--", &operand],
        REMOVE_DEADLINE,
        || format!("removing {operand} (rm -rf)"),
        "check the permissions of that directory on the host",
    )
    .await?;
    tracing::debug!(host = %session.host(), path = operand, "remote project removed");
    Ok(())
}

/// A remote path split into its components: `~/` (the home) and empty and `.` components
/// dropped, `..` kept.
#[derive(Debug, PartialEq, Eq)]
struct RemotePath<'a> {
    absolute: bool,
    parts: Vec<&'a str>,
}

impl<'a> RemotePath<'a> {
    fn parse(path: &'a str) -> Self {
        let rest = if path == "~" {
            ""
        } else {
            path.strip_prefix("~/").unwrap_or(path)
        };
        Self {
            absolute: rest.starts_with('/'),
            parts: rest
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .collect(),
        }
    }

    /// The path as a remote command's operand: `.` for the home, `./-x` for `-x`, so that no
    /// program reads it as an option.
    fn operand(&self) -> String {
        let joined = self.parts.join("/");
        match (self.absolute, joined.is_empty()) {
            (true, _) => format!("/{joined}"),
            (false, true) => ".".to_owned(),
            (false, false) if joined.starts_with('-') => format!("./{joined}"),
            (false, false) => joined,
        }
    }
}

/// `base` joined with `parts`, `..` taking away a component (never above `/`).
fn lexical_join(base: &str, parts: &[&str]) -> String {
    let mut out: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in parts {
        if *part == ".." {
            out.pop();
        } else {
            out.push(part);
        }
    }
    format!("/{}", out.join("/"))
}

/// The first line of a command's output as UTF-8 (a path), without its newline.
fn utf8_line(session: &HostSession, stdout: &[u8], program: &str) -> Result<String> {
    let line = stdout.strip_suffix(b"\n").unwrap_or(stdout);
    let text = std::str::from_utf8(line).map_err(|_| {
        SshError::other(
            session.host(),
            format!("{program} printed a path that is not UTF-8: {line:?}"),
        )
    })?;
    if text.is_empty() || text.contains('\n') {
        return Err(SshError::other(
            session.host(),
            format!("{program} printed {text:?}, not one path"),
        )
        .into());
    }
    Ok(text.to_owned())
}

/// Runs `argv` on the host and returns its standard output, or [`SyncError::Remote`] when it
/// exits with a failure status.
async fn remote_checked(
    session: &HostSession,
    argv: &[&str],
    deadline: Duration,
    action: impl FnOnce() -> String,
    hint: &str,
) -> Result<Vec<u8>> {
    let out = session.run(argv, Some(deadline)).await?;
    if out.success() {
        return Ok(out.stdout);
    }
    Err(SyncError::Remote {
        host: session.who(),
        action: action(),
        code: out.code,
        stderr: tail(&out.stderr),
        hint: hint.to_owned(),
    })
}

/// The last few lines of a program's error output, on one line.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "(no error output)".to_owned();
    }
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Reads `reader` to its end, keeping the last 8 KiB.
async fn read_tail(reader: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    const KEEP: usize = 8 * 1024;
    let mut kept = Vec::new();
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > KEEP {
                    kept.drain(..kept.len() - KEEP);
                }
            }
        }
    }
}

/// Waits for a blocking task, passing its panic on.
async fn join_blocking<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels a blocking task.
        Err(e) => panic!("a blocking sync task was cancelled: {e}"),
    }
}

/// Files sent and their size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sent {
    files: usize,
    bytes: u64,
}

async fn choose_method(session: &HostSession, options: &SyncOptions) -> Result<SyncMethod> {
    let missing = |place| SyncError::RsyncMissing {
        host: session.who(),
        place,
    };
    match options.method {
        SyncMethod::Tar => Ok(SyncMethod::Tar),
        SyncMethod::Rsync => {
            if !local_has_rsync().await {
                return Err(missing("on this machine"));
            }
            if !remote_has_rsync(session, options).await? {
                return Err(missing("on the host"));
            }
            Ok(SyncMethod::Rsync)
        }
        SyncMethod::Auto => {
            if local_has_rsync().await && remote_has_rsync(session, options).await? {
                Ok(SyncMethod::Rsync)
            } else {
                Ok(SyncMethod::Tar)
            }
        }
    }
}

/// Whether `rsync --version` runs here (asked once per process).
async fn local_has_rsync() -> bool {
    static HAS: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    *HAS.get_or_init(|| async {
        let mut cmd = tokio::process::Command::new("rsync");
        cmd.arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(10), cmd.status()).await {
            Ok(Ok(status)) => status.success(),
            Ok(Err(e)) => {
                tracing::debug!(cause = %e, "no local rsync");
                false
            }
            Err(_) => false,
        }
    })
    .await
}

async fn remote_has_rsync(session: &HostSession, options: &SyncOptions) -> Result<bool> {
    match session
        .run(&["rsync", "--version"], Some(options.step_timeout))
        .await
    {
        Ok(out) => Ok(out.success()),
        Err(SshError::CommandNotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The `-e` of rsync and its destination argument, for `dest` on the session's host.
fn rsync_remote(session: &HostSession, dest: &str) -> Result<(String, String)> {
    let socket = session.openssh().control_socket();
    let socket_error = |reason| SyncError::ControlSocket {
        host: session.who(),
        socket: socket.display().to_string(),
        reason,
    };
    let socket_text = socket
        .to_str()
        .ok_or_else(|| socket_error("its path is not UTF-8"))?;
    if socket_text.chars().any(char::is_whitespace) {
        return Err(socket_error(
            "its path contains whitespace, on which rsync splits its -e command",
        ));
    }
    let host = session.host();
    let mut rsh = format!(
        "ssh -F /dev/null -S {socket_text} -o ControlMaster=no -o BatchMode=yes -o ProxyCommand=false -T"
    );
    if let Some(port) = host.port {
        rsh.push_str(&format!(" -p {port}"));
    }
    let addr = if host.is_ipv6() {
        format!("[{}]", host.addr)
    } else {
        host.addr.clone()
    };
    let destination = match &host.user {
        Some(user) => format!("{user}@{addr}:{dest}/"),
        None => format!("{addr}:{dest}/"),
    };
    Ok((rsh, destination))
}

/// A process group killed (SIGKILL) on drop unless disarmed: rsync and the ssh it started.
#[derive(Debug)]
struct GroupKill(Option<nix::unistd::Pid>);

impl GroupKill {
    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(pgid, signal);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

async fn send_rsync(
    session: &HostSession,
    local_root: &Path,
    dest: &str,
    files: &[PathBuf],
    options: &SyncOptions,
) -> Result<Sent> {
    if files.is_empty() {
        return Ok(Sent::default());
    }
    let host = session.who();
    let (rsh, destination) = rsync_remote(session, dest)?;
    let mut cmd = tokio::process::Command::new("rsync");
    // Run in the project root, the source `.`: a root path with a colon in it is never read
    // as a remote one.
    cmd.current_dir(local_root)
        .args([
            "--archive",
            // Files belong to the remote user, as with the tar stream.
            "--no-owner",
            "--no-group",
            "--protect-args",
            "--from0",
            "--files-from=-",
            "--out-format=%i %l %n",
            "-e",
            &rsh,
            "--",
            ".",
            &destination,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| SyncError::RsyncSpawn {
        host: host.clone(),
        detail: e.to_string(),
    })?;
    let mut group = GroupKill(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
    );
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("rsync's standard streams are piped");
    };
    let work = async {
        let write = async {
            // A write error means rsync has exited; its status and message say why.
            for file in files {
                if stdin.write_all(file.as_os_str().as_bytes()).await.is_err()
                    || stdin.write_all(b"\0").await.is_err()
                {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
            drop(stdin);
        };
        let count = async {
            let mut sent = Sent::default();
            let mut lines = BufReader::new(stdout);
            let mut line = Vec::new();
            while matches!(lines.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                if let Some(bytes) = rsync_transfer(&line) {
                    sent.files += 1;
                    sent.bytes += bytes;
                }
                line.clear();
            }
            sent
        };
        let ((), sent, stderr) = tokio::join!(write, count, read_tail(Some(stderr)));
        (sent, stderr, child.wait().await)
    };
    let limit = options.transfer_timeout;
    let Ok((sent, stderr, status)) = tokio::time::timeout(limit, work).await else {
        group.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        return Err(SshError::Deadline {
            host,
            program: "rsync".to_owned(),
            limit: humantime::format_duration(limit).to_string(),
        }
        .into());
    };
    // rsync has been waited for (or could not be): its process group is gone.
    group.0 = None;
    let status = status.map_err(|e| SyncError::RsyncSpawn {
        host: host.clone(),
        detail: e.to_string(),
    })?;
    match status.code() {
        Some(0) => Ok(sent),
        Some(24) => {
            tracing::warn!(host = %session.host(), "some files vanished while rsync sent them");
            Ok(sent)
        }
        code => Err(SyncError::RsyncFailed {
            host,
            status: code.map_or_else(
                || format!("signal {}", status.signal().unwrap_or(0)),
                |c| format!("exit {c}"),
            ),
            code,
            stderr: tail(&stderr),
            hint: rsync_hint(code),
        }),
    }
}

fn rsync_hint(code: Option<i32>) -> &'static str {
    match code {
        Some(255) => {
            "the ssh connection through gridq's control socket failed; check that the host is still reachable and sync again"
        }
        Some(23) => {
            "some files could not be written on the host; check the permissions and free space of the remote directory"
        }
        Some(10 | 12 | 30 | 35) => "the connection broke or timed out; sync again",
        _ => "see EXIT VALUES in rsync(1)",
    }
}

/// From a line of `--out-format=%i %l %n`: the size when it reports a file or link sent (0
/// for a link), `None` for anything else (a directory, a change of attributes only, a
/// message).
fn rsync_transfer(line: &[u8]) -> Option<u64> {
    let (&update, rest) = line.split_first()?;
    let (&kind, rest) = rest.split_first()?;
    // `%i` is 11 characters; a space and the length follow.
    let after = rest.get(9..)?;
    let after = after.strip_prefix(b" ")?;
    let len_end = after.iter().position(|&b| b == b' ')?;
    let len: u64 = std::str::from_utf8(&after[..len_end]).ok()?.parse().ok()?;
    match (update, kind) {
        (b'<', b'f') => Some(len),
        (b'<' | b'c', b'L') => Some(0),
        _ => None,
    }
}

/// A file or link as the remote listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RemoteEntry {
    /// `f` or `l` (find's `%y`).
    kind: u8,
    size: u64,
    /// Whole seconds.
    mtime: i64,
    /// A link's target.
    target: Vec<u8>,
}

/// The fields of the listing, NUL-separated (names may hold anything but NUL); the trailing
/// `\0\n` lets a record split by a newline in a name be recognised and dropped.
const LISTING_FORMAT: &str = "%y\\0%s\\0%T@\\0%l\\0%P\\0\\n";

/// Parses one line of the listing into the path and its entry.
fn parse_listing_line(line: &[u8]) -> Option<(&[u8], RemoteEntry)> {
    let fields: Vec<&[u8]> = line.split(|&b| b == 0).collect();
    let [kind, size, mtime, target, path, end] = fields.as_slice() else {
        return None;
    };
    if !end.is_empty() || path.is_empty() {
        return None;
    }
    let kind = match kind {
        [k @ (b'f' | b'l')] => *k,
        _ => return None,
    };
    let size = std::str::from_utf8(size).ok()?.parse().ok()?;
    let mtime = std::str::from_utf8(mtime).ok()?;
    let (whole, fraction) = mtime.split_once('.').unwrap_or((mtime, ""));
    let mut mtime: i64 = whole.parse().ok()?;
    // `-1.5` is 1.5 s before the epoch: its whole second (what stat reports) is -2.
    if whole.starts_with('-') && fraction.bytes().any(|b| b != b'0') {
        mtime -= 1;
    }
    Some((
        path,
        RemoteEntry {
            kind,
            size,
            mtime,
            target: target.to_vec(),
        },
    ))
}

/// The host's files under `dest` that are also in `files`, or `None` when it cannot be
/// listed.
async fn remote_listing(
    session: &HostSession,
    dest: &str,
    files: &[PathBuf],
    options: &SyncOptions,
) -> Option<HashMap<Vec<u8>, RemoteEntry>> {
    let wanted: HashSet<&[u8]> = files.iter().map(|f| f.as_os_str().as_bytes()).collect();
    let mut entries = HashMap::new();
    let mut stderr = Vec::new();
    let argv = [
        "find",
        dest,
        "-mindepth",
        "1",
        "(",
        "-type",
        "f",
        "-o",
        "-type",
        "l",
        ")",
        "-printf",
        LISTING_FORMAT,
    ];
    let status = session
        .run_lines(
            &argv,
            Some(options.transfer_timeout),
            |stream, line| match stream {
                crate::ssh::Stream::Stdout => {
                    if let Some((path, entry)) = parse_listing_line(line) {
                        if wanted.contains(path) {
                            entries.insert(path.to_vec(), entry);
                        }
                    }
                }
                crate::ssh::Stream::Stderr if stderr.len() < 4096 => {
                    stderr.extend_from_slice(line);
                    stderr.push(b'\n');
                }
                crate::ssh::Stream::Stderr => {}
            },
        )
        .await;
    match status {
        Ok(0) => Some(entries),
        Ok(code) => {
            tracing::info!(host = %session.host(), code, stderr = %tail(&stderr), "cannot list the remote project (GNU find needed); sending every file");
            None
        }
        Err(e) => {
            tracing::info!(host = %session.host(), cause = %e, "cannot list the remote project; sending every file");
            None
        }
    }
}

/// Whether the local file (`meta` from `symlink_metadata`, `target` a link's) matches the
/// host's copy.
fn unchanged(meta: &Metadata, target: Option<&Path>, remote: &RemoteEntry) -> bool {
    match target {
        Some(target) => remote.kind == b'l' && remote.target == target.as_os_str().as_bytes(),
        None => remote.kind == b'f' && remote.size == meta.len() && remote.mtime == meta.mtime(),
    }
}

/// The files of `files` to send: all, or those that differ from `remote`.
fn plan_tar(
    root: &Path,
    files: &[PathBuf],
    remote: Option<&HashMap<Vec<u8>, RemoteEntry>>,
) -> std::result::Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let Some(remote) = remote else {
        return Ok(files.to_vec());
    };
    let mut send = Vec::new();
    for file in files {
        let Some(entry) = remote.get(file.as_os_str().as_bytes()) else {
            send.push(file.clone());
            continue;
        };
        let full = root.join(file);
        let meta = std::fs::symlink_metadata(&full).map_err(|e| (full.clone(), e))?;
        let target = if meta.file_type().is_symlink() {
            Some(std::fs::read_link(&full).map_err(|e| (full.clone(), e))?)
        } else {
            None
        };
        if !unchanged(&meta, target.as_deref(), entry) {
            send.push(file.clone());
        }
    }
    Ok(send)
}

async fn send_tar(
    session: &HostSession,
    local_root: &Path,
    dest: &str,
    files: &[PathBuf],
    options: &SyncOptions,
) -> Result<Sent> {
    let host = session.who();
    let remote = remote_listing(session, dest, files, options).await;
    let plan = {
        let (root, files) = (local_root.to_owned(), files.to_vec());
        join_blocking(tokio::task::spawn_blocking(move || {
            plan_tar(&root, &files, remote.as_ref())
        }))
        .await
        .map_err(|(file, e)| SyncError::LocalFile {
            host: host.clone(),
            file: file.display().to_string(),
            detail: e.to_string(),
        })?
    };
    if plan.is_empty() {
        return Ok(Sent::default());
    }

    let program = "tar";
    let mut cmd = session.openssh().command(program);
    cmd.args(["-x", "-p", "-f", "-", "-C", dest])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .await
        .map_err(|e| ssh_error(session, program, e))?;
    let stream_error = |detail: String| SyncError::Stream {
        host: host.clone(),
        detail,
    };
    let pipe = child
        .stdin()
        .take()
        .ok_or_else(|| stream_error("no standard input to write to".to_owned()))?
        .into_owned_fd()
        .map_err(|e| stream_error(e.to_string()))?;
    let stderr = child.stderr().take();
    let cancel = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, cancel) = (local_root.to_owned(), Arc::clone(&cancel));
        let pipe = Pipe {
            file: File::from(pipe),
            cancel,
        };
        tokio::task::spawn_blocking(move || write_archive(&root, &plan, pipe))
    };
    let work = async {
        let (written, stderr) = tokio::join!(join_blocking(writer), read_tail(stderr));
        (written, stderr, child.wait().await)
    };
    let limit = options.transfer_timeout;
    let Ok((written, stderr, status)) = tokio::time::timeout(limit, work).await else {
        cancel.store(true, Ordering::Relaxed);
        return Err(SshError::Deadline {
            host,
            program: program.to_owned(),
            limit: humantime::format_duration(limit).to_string(),
        }
        .into());
    };
    // A local file that could not be read cut the stream short, and that is what the remote
    // tar complains about: name the file.
    if let Err(ArchiveError::Local { file, detail }) = &written {
        return Err(SyncError::LocalFile {
            host,
            file: file.display().to_string(),
            detail: detail.clone(),
        });
    }
    let status = status.map_err(|e| ssh_error(session, program, e))?;
    match status.code() {
        Some(0) => {}
        Some(code) => {
            return Err(SyncError::Remote {
                host,
                action: format!("unpacking the tar stream into {dest} (tar -x)"),
                code,
                stderr: tail(&stderr),
                hint: "check the free space and permissions there".to_owned(),
            });
        }
        None => {
            return Err(SshError::Disconnected {
                host,
                program: program.to_owned(),
                detail: "no exit status".to_owned(),
            }
            .into());
        }
    }
    written.map_err(|e| match e {
        ArchiveError::Local { file, detail } => SyncError::LocalFile {
            host: host.clone(),
            file: file.display().to_string(),
            detail,
        },
        ArchiveError::Pipe(e) => stream_error(e.to_string()),
    })
}

/// An openssh error while running `program` on the session's host.
fn ssh_error(session: &HostSession, program: &str, err: openssh::Error) -> SshError {
    match err {
        // openssh reports exit status 127, the shell's "command not found", this way.
        openssh::Error::Remote(e) if e.kind() == io::ErrorKind::NotFound => {
            SshError::CommandNotFound {
                host: session.who(),
                program: program.to_owned(),
                user: session
                    .host()
                    .user
                    .clone()
                    .unwrap_or_else(|| "the remote user".to_owned()),
            }
        }
        openssh::Error::Disconnected
        | openssh::Error::RemoteProcessTerminated
        | openssh::Error::SshMux(_)
        | openssh::Error::Master(_) => SshError::Disconnected {
            host: session.who(),
            program: program.to_owned(),
            detail: err.to_string(),
        },
        other => SshError::other(session.host(), other.to_string()),
    }
}

/// Why writing the archive stopped.
#[derive(Debug)]
enum ArchiveError {
    /// A local file could not be read.
    Local { file: PathBuf, detail: String },
    /// The stream to the host failed (or the transfer was cancelled).
    Pipe(io::Error),
}

/// The write end of the remote tar's standard input; fails once the transfer is cancelled,
/// so that a blocking writer past its deadline stops.
#[derive(Debug)]
struct Pipe {
    file: File,
    cancel: Arc<AtomicBool>,
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("the transfer was cancelled"));
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A file's contents, exactly as many bytes as its header announced; remembers whether
/// reading (rather than writing) failed.
#[derive(Debug)]
struct Source {
    file: File,
    left: u64,
    failed: Option<String>,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.file.read(&mut buf[..want]) {
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it shrank while it was being sent",
                );
                self.failed = Some(e.to_string());
                Err(e)
            }
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// Writes the tar archive of `files` (relative to `root`) into `pipe`.
fn write_archive(
    root: &Path,
    files: &[PathBuf],
    pipe: Pipe,
) -> std::result::Result<Sent, ArchiveError> {
    let cancel = Arc::clone(&pipe.cancel);
    let mut archive = tar::Builder::new(BufWriter::with_capacity(256 * 1024, pipe));
    let result = append_all(&mut archive, root, files);
    if result.is_err() {
        // Stop here: the end-of-archive blocks the builder writes when dropped would make a
        // truncated entry look whole.
        cancel.store(true, Ordering::Relaxed);
        return result;
    }
    archive
        .into_inner()
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .map_err(ArchiveError::Pipe)?;
    result
}

fn append_all(
    archive: &mut tar::Builder<BufWriter<Pipe>>,
    root: &Path,
    files: &[PathBuf],
) -> std::result::Result<Sent, ArchiveError> {
    let mut sent = Sent::default();
    for relative in files {
        let full = root.join(relative);
        let local = |e: io::Error| ArchiveError::Local {
            file: full.clone(),
            detail: e.to_string(),
        };
        let meta = std::fs::symlink_metadata(&full).map_err(local)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        // Owned by whoever unpacks it.
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(local)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            archive
                .append_link(&mut header, relative, &target)
                .map_err(ArchiveError::Pipe)?;
            sent.files += 1;
            continue;
        }
        let file = File::open(&full).map_err(local)?;
        // The metadata of what was opened, in case the path changed since.
        let meta = file.metadata().map_err(local)?;
        if !meta.is_file() {
            return Err(local(io::Error::other("it is no longer a regular file")));
        }
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(meta.permissions().mode() & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        let mut source = Source {
            file,
            left: meta.len(),
            failed: None,
        };
        if let Err(e) = archive.append_data(&mut header, relative, &mut source) {
            return Err(match source.failed {
                Some(detail) => ArchiveError::Local { file: full, detail },
                None => ArchiveError::Pipe(e),
            });
        }
        sent.files += 1;
        sent.bytes += meta.len();
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `files` (path, contents) under a new temporary directory.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, contents) in files {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(full, contents).expect("write");
        }
        dir
    }

    fn names(root: &Path, excludes: &[&str]) -> Vec<String> {
        let excludes: Vec<String> = excludes.iter().map(|s| (*s).to_owned()).collect();
        project_files(root, &excludes)
            .expect("project files")
            .into_iter()
            .map(|p| p.to_str().expect("utf-8").to_owned())
            .collect()
    }

    #[test]
    fn gridqignore_files_apply_at_every_depth_and_are_sent() {
        let dir = tree(&[
            (".gridqignore", "*.log\ndata/\n"),
            ("run.py", ""),
            ("debug.log", ""),
            ("data/big.bin", ""),
            ("sub/data/more.bin", ""),
            ("sub/.gridqignore", "!keep.log\n*.tmp\n"),
            ("sub/keep.log", ""),
            ("sub/other.log", ""),
            ("sub/x.tmp", ""),
            ("y.tmp", ""),
        ]);
        assert_eq!(
            names(dir.path(), &[]),
            [
                ".gridqignore",
                "run.py",
                "sub/.gridqignore",
                "sub/keep.log",
                "y.tmp"
            ]
        );
    }

    #[test]
    fn negation_re_includes_in_the_same_file() {
        let dir = tree(&[
            (".gridqignore", "*.log\n!keep.log\n"),
            ("a.log", ""),
            ("keep.log", ""),
            ("deep/er/keep.log", ""),
            ("deep/er/b.log", ""),
        ]);
        assert_eq!(
            names(dir.path(), &[]),
            [".gridqignore", "deep/er/keep.log", "keep.log"]
        );
    }

    #[test]
    fn default_excludes_apply_at_any_depth_and_cannot_be_negated() {
        let dir = tree(&[
            (".gridqignore", "!target\n!.git\n"),
            (".git/config", ""),
            ("target/debug/app", ""),
            (".gridq/state", ""),
            ("crates/a/target/x", ""),
            ("crates/a/.git", "gitdir: ..."),
            ("crates/a/src/lib.rs", ""),
            ("targets.txt", ""),
        ]);
        assert_eq!(
            names(dir.path(), &["!target"]),
            [".gridqignore", "crates/a/src/lib.rs", "targets.txt"]
        );
    }

    #[test]
    fn extra_excludes_use_gitignore_syntax() {
        let dir = tree(&[
            ("a.csv", ""),
            ("keep.csv", ""),
            ("out/result.txt", ""),
            ("src/out/code.rs", ""),
            ("docs/x.md", ""),
            ("src/docs/y.md", ""),
        ]);
        assert_eq!(
            names(dir.path(), &["*.csv", "!keep.csv", "out/", "/docs"]),
            ["keep.csv", "src/docs/y.md"]
        );
    }

    #[test]
    fn gitignore_and_hidden_files_do_not_count() {
        let dir = tree(&[
            (".gitignore", "*.bin\n"),
            (".ignore", "*.bin\n"),
            ("model.bin", ""),
            (".env", ""),
        ]);
        assert_eq!(
            names(dir.path(), &[]),
            [".env", ".gitignore", ".ignore", "model.bin"]
        );
    }

    #[test]
    fn links_are_listed_not_followed() {
        let dir = tree(&[("real/file", "")]);
        std::os::unix::fs::symlink("real", dir.path().join("alias")).expect("symlink");
        std::os::unix::fs::symlink("missing", dir.path().join("dangling")).expect("symlink");
        assert_eq!(names(dir.path(), &[]), ["alias", "dangling", "real/file"]);
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_the_root() {
        let dir = tree(&[("a", "")]);
        let e = project_files(dir.path(), &["a{".to_owned()]).expect_err("bad glob");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot list the project files in {}: bad exclude pattern \"a{{\"",
                dir.path().display()
            )),
            "{text}"
        );
        let e = e.on_host("host 1 h".to_owned());
        assert!(e.to_string().starts_with("host 1 h: cannot list"), "{e}");
    }

    #[test]
    fn remote_paths_become_safe_operands() {
        let op = |p: &str| RemotePath::parse(p).operand();
        assert_eq!(op("gridq/proj"), "gridq/proj");
        assert_eq!(op("gridq//proj/./"), "gridq/proj");
        assert_eq!(op("~/gridq/proj"), "gridq/proj");
        assert_eq!(op("~"), ".");
        assert_eq!(op("."), ".");
        assert_eq!(op("/srv/x/"), "/srv/x");
        assert_eq!(op("/"), "/");
        assert_eq!(op("-rf"), "./-rf");
        assert_eq!(op("a/../b"), "a/../b");
        assert_eq!(op("with space/'q'"), "with space/'q'");
    }

    #[test]
    fn paths_join_lexically() {
        assert_eq!(lexical_join("/home/u", &["a", "b"]), "/home/u/a/b");
        assert_eq!(lexical_join("/home/u", &["..", "v"]), "/home/v");
        assert_eq!(lexical_join("/", &["..", ".."]), "/");
    }

    #[test]
    fn rsync_lines_count_files_and_links_sent() {
        assert_eq!(rsync_transfer(b"<f+++++++++ 12 a b/c.txt\n"), Some(12));
        assert_eq!(rsync_transfer(b"<f.st...... 7 x\n"), Some(7));
        assert_eq!(rsync_transfer(b"cL+++++++++ 5 link\n"), Some(0));
        assert_eq!(rsync_transfer(b"cd+++++++++ 4096 dir/\n"), None);
        assert_eq!(rsync_transfer(b".d..t...... 4096 ./\n"), None);
        assert_eq!(rsync_transfer(b".f...p..... 3 x\n"), None);
        assert_eq!(rsync_transfer(b"created directory x\n"), None);
        assert_eq!(rsync_transfer(b""), None);
    }

    #[test]
    fn listing_lines_parse_and_broken_records_are_dropped() {
        let (path, entry) =
            parse_listing_line(b"f\x0012\x001700000000.5000000000\x00\x00a b/c\x00").unwrap();
        assert_eq!(path, b"a b/c");
        assert_eq!(
            entry,
            RemoteEntry {
                kind: b'f',
                size: 12,
                mtime: 1_700_000_000,
                target: Vec::new()
            }
        );
        let (_, link) = parse_listing_line(b"l\x005\x001.0\x00a.txt\x00link\x00").unwrap();
        assert_eq!(link.target, b"a.txt");
        // A name with a newline arrives as two lines, neither of them a record.
        assert!(parse_listing_line(b"f\x001\x001.0\x00\x00first").is_none());
        assert!(parse_listing_line(b"second\x00").is_none());
        assert!(parse_listing_line(b"d\x001\x001.0\x00\x00dir\x00").is_none());
    }

    #[test]
    fn unchanged_compares_size_whole_seconds_and_link_targets() {
        let dir = tree(&[("f", "abc")]);
        let meta = std::fs::symlink_metadata(dir.path().join("f")).unwrap();
        let remote = RemoteEntry {
            kind: b'f',
            size: 3,
            mtime: meta.mtime(),
            target: Vec::new(),
        };
        assert!(unchanged(&meta, None, &remote));
        assert!(!unchanged(
            &meta,
            None,
            &RemoteEntry {
                size: 4,
                ..remote.clone()
            }
        ));
        assert!(!unchanged(
            &meta,
            None,
            &RemoteEntry {
                mtime: meta.mtime() - 1,
                ..remote.clone()
            }
        ));
        let link = RemoteEntry {
            kind: b'l',
            size: 1,
            mtime: 0,
            target: b"f".to_vec(),
        };
        assert!(unchanged(&meta, Some(Path::new("f")), &link));
        assert!(!unchanged(&meta, Some(Path::new("g")), &link));
        assert!(!unchanged(&meta, None, &link));
    }
}
