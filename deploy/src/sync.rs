//! The project, copied to a directory on a host: [`sync_project`] sends the files that
//! [`project_files`] selects, with rsync when both ends have it and as a tar stream otherwise,
//! removes on request what was removed locally, and records the [`CodeVersion`] it sent.
//!
//! # What is sent
//! Every regular file and symbolic link (sent as a link, never followed) under the project
//! root, except what these leave out:
//! - `.gitignore` files, as git reads them: at any depth, their patterns relative to their
//!   directory, a deeper file overriding a shallower one, `!pattern` negations, and a
//!   directory left out with everything in it (nothing under it can be re-included). Also read:
//!   the `.git/info/exclude` of the repository the project is in, git's global excludes
//!   (`core.excludesFile`, else `~/.config/git/ignore`), and, when the project is a
//!   subdirectory of a git work tree, the `.gitignore` files of its parent directories up to
//!   that work tree's top. The project need not be a git repository: its `.gitignore` files
//!   count all the same. [`SyncOptions::gitignore`] `false` (`--no-gitignore`) turns all of
//!   this off;
//! - `.gridqignore` files: the same syntax and placement, and they take precedence over every
//!   git source, so `!venv/` re-includes a directory a `.gitignore` left out, and a pattern
//!   there leaves out more. The ignore files themselves are sent;
//! - `.git`, `target` and `.gridq`, at any depth, always (nothing re-includes them);
//! - the caller's extra exclude patterns ([`SyncOptions::excludes`], gitignore syntax relative
//!   to the root), which apply on top of everything else.
//!
//! `.ignore` files are not read, and hidden files are sent. Empty directories are not created.
//! An invalid pattern in a `.gridqignore` (or among the extra excludes) is an error naming the
//! file and line; one in a git source is skipped with a warning, as git does not stop on them.
//!
//! # Incremental
//! A file is sent only when the host's copy differs in size or modification time (rsync's
//! quick check; the tar stream compares whole seconds, the resolution tar keeps), or, for a
//! link, in its target. Syncing an unchanged tree again sends nothing.
//!
//! # Deleting ([`SyncOptions::delete`], `--delete`)
//! By default nothing on the host is deleted. With `delete`, before the transfer, the host's
//! project directory is listed (GNU `find`; without it the sync fails rather than delete
//! blindly) and every file or link there that the project does not send is removed, unless it
//! is excluded: what the ignore rules leave out (a data set placed on the host by hand and
//! ignored here, a `venv`) stays, and `.gridq` (where jobs write their outputs, under
//! `.gridq/out/`), `.git` and `target` are not even listed. Directories left empty that the
//! project does not have are removed too (`rmdir`, so never one that still holds something).
//! Removal is a fixed argv (`xargs -0 rm -f --`) reading NUL-separated paths on its standard
//! input; every path is the remote directory joined with a listed relative name that has no
//! `..`, `.` or empty component, so nothing outside the project directory can be named. A
//! delete into the remote home, the root, a path with `..`, or one that holds the home is
//! refused before anything happens ([`SyncError::RefusedDelete`]). [`SyncReport::deleted`]
//! counts the files and links removed.
//!
//! # Code version
//! [`code_version`] hashes exactly the files sent (BLAKE3 over their relative paths, permission
//! bits, link targets and contents, in path order, each file streamed) and asks git, when the
//! project is in a work tree, for the commit and whether the tree is dirty. After a successful
//! sync, [`sync_project`] writes it as JSON to `.gridq/code.json` in the remote project
//! ([`CODE_VERSION_FILE`]; a temporary file filled by `tee` from standard input, then `mv`),
//! and returns it in its [`SyncReport`]; [`write_code_version`] does the same in a local
//! project directory.
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
//! Every remote command is an argv list of fixed words plus remote paths as single arguments
//! (see [`crate::ssh`]); no shell command line is built from values. Remote paths are relative
//! to the remote user's home (where ssh starts) unless absolute; a leading `~/` means the home
//! too. Every remote step has a deadline.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use gridq_common::code::{CODE_VERSION_FILE, CodeVersion};
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use openssh::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::ssh::{HostSession, SshError};

/// `Result` with [`SyncError`].
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The names never sent, at any depth: version control, build output, gridq's own state.
pub const DEFAULT_EXCLUDES: [&str; 3] = [".git", "target", ".gridq"];

/// The name of gridq's own ignore files, honoured in the project at any depth.
pub const IGNORE_FILE: &str = ".gridqignore";

/// The name of git's ignore files, honoured unless [`SyncOptions::gitignore`] is off.
pub const GIT_IGNORE_FILE: &str = ".gitignore";

/// The deadline of the quick remote commands of [`remote_abs_path`] and [`remove_remote`]'s
/// checks.
const QUICK_DEADLINE: Duration = Duration::from_secs(60);

/// The deadline of [`remove_remote`]'s `rm -rf`, which may have a large tree to remove.
const REMOVE_DEADLINE: Duration = Duration::from_secs(600);

/// The deadline of each local `git` command of [`code_version`].
const GIT_DEADLINE: Duration = Duration::from_secs(30);

/// The most bytes of NUL-separated paths handed to one remote `xargs` (the rest go to the
/// next), so that its input and any error output stay small.
const DELETE_BATCH: usize = 64 * 1024;

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
    /// Whether `.gitignore` files, `.git/info/exclude` and git's global excludes leave files
    /// out (`--no-gitignore` turns it off); `.gridqignore` files count either way.
    pub gitignore: bool,
    /// Whether files on the host that the project no longer has are removed (`--delete`);
    /// excluded files and `.gridq` are kept.
    pub delete: bool,
    /// More gitignore-style patterns to leave out, on top of [`DEFAULT_EXCLUDES`] and the
    /// ignore files.
    pub excludes: Vec<String>,
    /// The deadline of each short remote step: creating the directory, looking for rsync,
    /// one batch of deletions, writing the code version.
    pub step_timeout: Duration,
    /// The deadline of the transfer itself (and of the remote listing it may start with).
    pub transfer_timeout: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            method: SyncMethod::Auto,
            gitignore: true,
            delete: false,
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
    /// The files (and links) removed from the host because the project no longer has them
    /// (always 0 without [`SyncOptions::delete`]).
    pub deleted: usize,
    /// The version of what was sent, as written to `.gridq/code.json` on the host.
    pub code: CodeVersion,
}

/// Why a sync, or a removal, failed. Messages start with `host N [user@]addr[:port]`, except
/// those of a [`Walk`](Self::Walk) or [`CodeFile`](Self::CodeFile) failure outside
/// [`sync_project`], which concern no host.
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
    /// A local file could not be read (or changed while it was sent or hashed).
    #[error("{}cannot read the local file {file}: {detail}; check it and sync again", host_prefix(.host))]
    LocalFile {
        /// `host N [user@]addr[:port]`, when reading for a sync to that host.
        host: Option<String>,
        /// The file.
        file: String,
        /// The I/O error.
        detail: String,
    },
    /// The code version could not be written into a local project directory.
    #[error(
        "cannot write the code version to {file}: {detail}; check that the directory is writable"
    )]
    CodeFile {
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
    /// A sync with [`SyncOptions::delete`] was given a path where deleting what the project
    /// lacks would destroy more than a project.
    #[error(
        "{host}: refusing to delete files in {path:?}: {reason}; sync with delete only into a directory of the project's own, e.g. gridq/myproject"
    )]
    RefusedDelete {
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
            Self::LocalFile { file, detail, .. } => Self::LocalFile {
                host: Some(host),
                file,
                detail,
            },
            other => other,
        }
    }
}

/// The files under `root` to send, as paths relative to it, sorted: every regular file and
/// symbolic link that neither the ignore files (`.gitignore` unless `options.gitignore` is
/// off, `.gridqignore` always), nor [`DEFAULT_EXCLUDES`], nor `options.excludes` leave out.
/// See the [module documentation](self) for the rules.
///
/// # Errors
/// [`SyncError::Walk`] when a directory cannot be read, a `.gridqignore` holds an invalid
/// pattern, or an exclude pattern is invalid.
pub fn project_files(root: &Path, options: &SyncOptions) -> Result<Vec<PathBuf>> {
    Ok(Selection::walk(root, options)?.files)
}

/// The version of the project at `root` as [`sync_project`] would send it with `options`:
/// the hash of exactly the files [`project_files`] selects, and git's commit and dirty flag
/// when `root` lies in a git work tree and git is installed (`None` otherwise, or when git
/// fails). Blocking: it reads every file selected (streamed) and runs `git`.
///
/// # Errors
/// [`SyncError::Walk`] as for [`project_files`], [`SyncError::LocalFile`] when a file cannot
/// be read or changes while it is hashed.
pub fn code_version(root: &Path, options: &SyncOptions) -> Result<CodeVersion> {
    let selection = Selection::walk(root, options)?;
    version_of(root, &selection.files)
}

/// Writes `code` as JSON to `.gridq/code.json` under the local project `root` (for local
/// mode, where nothing is synced), through a temporary file renamed into place. Returns the
/// file written.
///
/// # Errors
/// [`SyncError::CodeFile`] when `.gridq` cannot be created or the file written.
pub fn write_code_version(root: &Path, code: &CodeVersion) -> Result<PathBuf> {
    let file = root.join(CODE_VERSION_FILE);
    let error = |e: io::Error| SyncError::CodeFile {
        file: file.display().to_string(),
        detail: e.to_string(),
    };
    let dir = file.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(error)?;
    let tmp = dir.join(format!(".code.json.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, code_json(code)).and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error(e));
    }
    Ok(file)
}

/// The JSON of a code version, as files hold it.
fn code_json(code: &CodeVersion) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(code).expect("a code version serializes");
    json.push(b'\n');
    json
}

/// The ignore files of one project directory.
#[derive(Debug, Default)]
struct DirRules {
    /// Its `.gridqignore`.
    gridq: Option<Gitignore>,
    /// Its `.gitignore`.
    git: Option<Gitignore>,
    /// `info/exclude` of the repository whose `.git` it holds.
    exclude: Option<Gitignore>,
}

/// Every rule that decides whether a path of the project is left out. Each matcher is built
/// with the root `.` and given paths relative to its own directory.
#[derive(Debug)]
struct Rules {
    gitignore: bool,
    /// Per project directory that has ignore files (relative to the root, `""` for the root).
    dirs: HashMap<PathBuf, DirRules>,
    /// The `.gitignore` files of the directories above the root up to its work tree's top,
    /// deepest first, each with the root's path relative to its directory.
    above: Vec<(PathBuf, Gitignore)>,
    /// The enclosing repository's `info/exclude` and the root's path relative to its top.
    above_exclude: Option<(PathBuf, Gitignore)>,
    /// git's global excludes (relative to the work tree's top, or to the root).
    global: Option<(PathBuf, Gitignore)>,
    /// [`SyncOptions::excludes`].
    extra: Gitignore,
}

impl Rules {
    /// Whether `rel` (relative to the root; `is_dir` for a directory) is left out, assuming
    /// its parent directories are not.
    fn excluded_here(&self, rel: &Path, is_dir: bool) -> bool {
        if rel
            .file_name()
            .is_some_and(|name| DEFAULT_EXCLUDES.iter().any(|d| name == *d))
        {
            return true;
        }
        if self.extra.matched(rel, is_dir).is_ignore() {
            return true;
        }
        self.decide(rel, is_dir).is_ignore()
    }

    /// Whether `rel` or one of its parent directories is left out: for a path that may not
    /// exist here (one on a host).
    fn excluded(&self, rel: &Path, is_dir: bool) -> bool {
        let mut prefix = PathBuf::new();
        let mut parts = rel.components().peekable();
        while let Some(part) = parts.next() {
            prefix.push(part);
            let last = parts.peek().is_none();
            if self.excluded_here(&prefix, if last { is_dir } else { true }) {
                return true;
            }
        }
        false
    }

    /// The decision of the ignore files for `rel`, in git's order of precedence, with
    /// `.gridqignore` above it all.
    fn decide(&self, rel: &Path, is_dir: bool) -> Match<()> {
        // The directories holding `rel`, deepest first, with `rel` relative to each.
        let holders = || {
            rel.ancestors()
                .skip(1)
                .filter_map(|dir| Some((self.dirs.get(dir)?, rel.strip_prefix(dir).ok()?)))
        };
        let first = |matchers: &mut dyn Iterator<Item = (&Gitignore, &Path)>| {
            matchers
                .map(|(gi, path)| gi.matched(path, is_dir))
                .find(|m| !m.is_none())
                .map_or(Match::None, |m| m.map(|_| ()))
        };
        let m = first(&mut holders().filter_map(|(d, p)| Some((d.gridq.as_ref()?, p))));
        if !m.is_none() || !self.gitignore {
            return m;
        }
        let m = first(&mut holders().filter_map(|(d, p)| Some((d.git.as_ref()?, p))));
        if !m.is_none() {
            return m;
        }
        let above: Vec<(PathBuf, &Gitignore)> = self
            .above
            .iter()
            .map(|(prefix, gi)| (prefix.join(rel), gi))
            .collect();
        let m = first(&mut above.iter().map(|(p, gi)| (*gi, p.as_path())));
        if !m.is_none() {
            return m;
        }
        // Only the nearest repository's info/exclude applies.
        let m = match holders().find_map(|(d, p)| Some((d.exclude.as_ref()?, p))) {
            Some((gi, path)) => gi.matched(path, is_dir).map(|_| ()),
            None => self
                .above_exclude
                .as_ref()
                .map_or(Match::None, |(prefix, gi)| {
                    gi.matched(prefix.join(rel), is_dir).map(|_| ())
                }),
        };
        if !m.is_none() {
            return m;
        }
        self.global.as_ref().map_or(Match::None, |(prefix, gi)| {
            gi.matched(prefix.join(rel), is_dir).map(|_| ())
        })
    }
}

/// What the project sends, and the rules that chose it.
#[derive(Debug)]
struct Selection {
    /// The files and links sent, relative to the root, sorted.
    files: Vec<PathBuf>,
    /// The directories walked (not left out), relative to the root, the root (`""`) too.
    dirs: HashSet<PathBuf>,
    rules: Rules,
}

impl Selection {
    /// Walks the project at `root`, reading the ignore files as it goes.
    fn walk(root: &Path, options: &SyncOptions) -> Result<Self> {
        let walk_error = |detail: String| SyncError::Walk {
            host: None,
            root: root.display().to_string(),
            detail,
        };
        let mut extra = GitignoreBuilder::new(".");
        for pattern in &options.excludes {
            extra
                .add_line(None, pattern)
                .map_err(|e| walk_error(format!("bad exclude pattern {pattern:?}: {e}")))?;
        }
        let extra = extra
            .build()
            .map_err(|e| walk_error(format!("bad exclude patterns: {e}")))?;
        let mut rules = Rules {
            gitignore: options.gitignore,
            dirs: HashMap::new(),
            above: Vec::new(),
            above_exclude: None,
            global: None,
            extra,
        };
        if options.gitignore {
            load_above(root, &mut rules);
        }

        let mut files = Vec::new();
        let mut dirs = HashSet::new();
        let mut pending = vec![PathBuf::new()];
        while let Some(rel) = pending.pop() {
            let full = root.join(&rel);
            let read_error = |e: io::Error| walk_error(format!("{}: {e}", full.display()));
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(&full).map_err(read_error)? {
                let entry = entry.map_err(read_error)?;
                let kind = entry.file_type().map_err(read_error)?;
                entries.push((entry.file_name(), kind));
            }
            let has = |name: &str| entries.iter().find(|(n, _)| n == name).map(|(_, k)| *k);
            let mut here = DirRules::default();
            if has(IGNORE_FILE).is_some() {
                let file = full.join(IGNORE_FILE);
                here.gridq = Some(
                    read_ignore_file(&file, true)
                        .map_err(|e| walk_error(format!("{}: {e}", file.display())))?,
                );
            }
            if options.gitignore {
                if has(GIT_IGNORE_FILE).is_some() {
                    here.git = read_ignore_file(&full.join(GIT_IGNORE_FILE), false).ok();
                }
                if let Some(kind) = has(".git") {
                    here.exclude = git_exclude_file(&full, kind.is_file())
                        .and_then(|file| read_ignore_file(&file, false).ok());
                }
            }
            if here.gridq.is_some() || here.git.is_some() || here.exclude.is_some() {
                rules.dirs.insert(rel.clone(), here);
            }
            for (name, kind) in entries {
                let child = rel.join(&name);
                let is_dir = kind.is_dir();
                if !(is_dir || kind.is_file() || kind.is_symlink()) {
                    continue;
                }
                if rules.excluded_here(&child, is_dir) {
                    continue;
                }
                if is_dir {
                    pending.push(child);
                } else {
                    files.push(child);
                }
            }
            dirs.insert(rel);
        }
        files.sort();
        Ok(Self { files, dirs, rules })
    }
}

/// Reads one ignore file. With `strict` (a `.gridqignore`), a pattern that does not parse is
/// an error naming its line; otherwise (git's files) it is skipped with a warning, as is a
/// file that cannot be read.
fn read_ignore_file(file: &Path, strict: bool) -> std::result::Result<Gitignore, String> {
    let mut builder = GitignoreBuilder::new(".");
    if let Some(e) = builder.add(file) {
        if strict {
            return Err(e.to_string());
        }
        tracing::warn!(file = %file.display(), cause = %e, "skipping what cannot be read of an ignore file");
    }
    builder.build().map_err(|e| {
        if !strict {
            tracing::warn!(file = %file.display(), cause = %e, "ignoring an ignore file");
        }
        e.to_string()
    })
}

/// The `info/exclude` of the repository whose `.git` is in `dir`, when there is one:
/// `.git/info/exclude`, or, for a `.git` file (`gitdir: PATH`, a linked work tree or
/// submodule), the one in its common directory.
fn git_exclude_file(dir: &Path, dot_git_is_file: bool) -> Option<PathBuf> {
    let dot_git = dir.join(".git");
    let file = if dot_git_is_file {
        let text = std::fs::read_to_string(&dot_git).ok()?;
        let git_dir = dir.join(text.lines().next()?.strip_prefix("gitdir: ")?.trim_end());
        let common = match std::fs::read_to_string(git_dir.join("commondir")) {
            Ok(common) => git_dir.join(common.trim_end()),
            Err(_) => git_dir,
        };
        common.join("info/exclude")
    } else {
        dot_git.join("info/exclude")
    };
    file.is_file().then_some(file)
}

/// Loads the git rules from outside the project: those of the work tree it is a subdirectory
/// of (its parents' `.gitignore` files up to the top, the top's `info/exclude`) and git's
/// global excludes.
fn load_above(root: &Path, rules: &mut Rules) {
    let mut top: Option<PathBuf> = None;
    if let Ok(abs) = root.canonicalize() {
        let mut above = Vec::new();
        // The root's path relative to `dir`, as names from the root up.
        let mut names: Vec<&OsStr> = Vec::new();
        let mut dir = abs.as_path();
        // The root's own .git (a repository at the root) is read by the walk.
        if dir.join(".git").exists() {
            top = Some(abs.clone());
        } else {
            while let Some(parent) = dir.parent() {
                names.extend(dir.file_name());
                let prefix: PathBuf = names.iter().rev().collect();
                dir = parent;
                let gitignore = dir.join(GIT_IGNORE_FILE);
                if gitignore.is_file() {
                    if let Ok(gi) = read_ignore_file(&gitignore, false) {
                        above.push((prefix.clone(), gi));
                    }
                }
                let dot_git = dir.join(".git");
                if let Ok(meta) = std::fs::symlink_metadata(&dot_git) {
                    rules.above_exclude = git_exclude_file(dir, meta.is_file())
                        .and_then(|f| read_ignore_file(&f, false).ok())
                        .map(|gi| (prefix, gi));
                    top = Some(dir.to_owned());
                    break;
                }
            }
            // Outside a work tree, no parent's .gitignore counts.
            if top.is_some() {
                rules.above = above;
            }
        }
        let prefix_of_root = top
            .as_deref()
            .and_then(|t| abs.strip_prefix(t).ok())
            .map(Path::to_owned)
            .unwrap_or_default();
        let (global, err) = GitignoreBuilder::new(".").build_global();
        if let Some(e) = err {
            tracing::warn!(cause = %e, "skipping what cannot be read of git's global excludes");
        }
        if !global.is_empty() {
            rules.global = Some((prefix_of_root, global));
        }
    }
}

/// The code version of `files` under `root`, and git's view of `root`.
fn version_of(root: &Path, files: &[PathBuf]) -> Result<CodeVersion> {
    let tree = tree_hash(root, files).map_err(|(file, e)| SyncError::LocalFile {
        host: None,
        file: file.display().to_string(),
        detail: e.to_string(),
    })?;
    let (commit, dirty) = git_state(root);
    Ok(CodeVersion {
        tree,
        commit,
        dirty,
    })
}

/// The BLAKE3 hash of `files` (relative to `root`, in the given order): for each, a kind
/// byte, then length-prefixed fields: its path, and its permission bits and contents (a
/// file) or its target (a link). Contents are streamed.
fn tree_hash(root: &Path, files: &[PathBuf]) -> std::result::Result<String, (PathBuf, io::Error)> {
    let mut hasher = blake3::Hasher::new();
    let field = |hasher: &mut blake3::Hasher, bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for relative in files {
        let full = root.join(relative);
        let fail = |e: io::Error| (full.clone(), e);
        let meta = std::fs::symlink_metadata(&full).map_err(fail)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(fail)?;
            hasher.update(b"l");
            field(&mut hasher, relative.as_os_str().as_bytes());
            field(&mut hasher, target.as_os_str().as_bytes());
            continue;
        }
        let file = File::open(&full).map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        if !meta.is_file() {
            return Err(fail(io::Error::other("it is no longer a regular file")));
        }
        hasher.update(b"f");
        field(&mut hasher, relative.as_os_str().as_bytes());
        hasher.update(&(meta.permissions().mode() & 0o7777).to_le_bytes());
        hasher.update(&meta.len().to_le_bytes());
        let copied = io::copy(&mut file.take(meta.len()), &mut hasher).map_err(fail)?;
        if copied != meta.len() {
            return Err(fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "it shrank while it was being hashed",
            )));
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// git's commit and dirty flag for `root`, when it lies in a work tree and git runs.
fn git_state(root: &Path) -> (Option<String>, Option<bool>) {
    let inside = git_output(root, &["rev-parse", "--is-inside-work-tree"]);
    if inside.as_deref() != Some(b"true\n".as_slice()) {
        return (None, None);
    }
    let commit = git_output(root, &["rev-parse", "--verify", "--quiet", "HEAD"])
        .and_then(|out| String::from_utf8(out).ok())
        .map(|s| s.trim_end().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()));
    let dirty = git_output(
        root,
        &[
            "status",
            "--porcelain",
            "-z",
            "--untracked-files=normal",
            "--",
            ".",
        ],
    )
    .map(|out| status_is_dirty(&out));
    (commit, dirty)
}

/// Whether `git status --porcelain -z` output lists a change outside [`DEFAULT_EXCLUDES`]
/// (gridq's own `.gridq`, say, need not be in `.gitignore`).
fn status_is_dirty(out: &[u8]) -> bool {
    let mut records = out.split(|&b| b == 0).filter(|r| !r.is_empty());
    while let Some(record) = records.next() {
        let (Some(xy), Some(path)) = (record.get(..2), record.get(3..)) else {
            continue;
        };
        // A rename or copy is followed by its source path.
        if xy.contains(&b'R') || xy.contains(&b'C') {
            records.next();
        }
        let excluded = path
            .split(|&b| b == b'/')
            .any(|part| DEFAULT_EXCLUDES.iter().any(|d| part == d.as_bytes()));
        if !excluded {
            return true;
        }
    }
    false
}

/// The standard output of `git -C root ARGS`, or `None` when git is missing, fails, or takes
/// longer than [`GIT_DEADLINE`] (then it is killed). Variables that would point git at
/// another repository are removed; no optional lock is taken.
fn git_output(root: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let mut child = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_COMMON_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.read_to_end(&mut out);
        let _ = tx.send(read.map(|_| out));
    });
    match rx.recv_timeout(GIT_DEADLINE) {
        Ok(out) => {
            let status = child.wait().ok()?;
            if status.success() { out.ok() } else { None }
        }
        Err(_) => {
            tracing::warn!(root = %root.display(), ?args, "git took too long; the code version has no git state");
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// Copies the project at `local_root` into `remote_path` on the session's host (created if
/// missing), sending only what changed, removing (with [`SyncOptions::delete`]) what the
/// project no longer has, and writing the [`CodeVersion`] sent to `.gridq/code.json` there;
/// see the [module documentation](self).
///
/// # Errors
/// [`SyncError::RefusedDelete`] (before anything is done) when `delete` is asked for a path
/// that is not a project's own, [`SyncError::RsyncMissing`] when rsync is forced and an end
/// lacks it, [`SyncError::RsyncFailed`], [`SyncError::Remote`] (mkdir, the listing `delete`
/// needs, rm, tar or writing the code version failed on the host, with its message),
/// [`SyncError::LocalFile`], [`SyncError::Walk`], and [`SyncError::Ssh`] for connection
/// problems and deadlines.
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
    if options.delete {
        if let Err(reason) = check_project_dir(session, remote_path).await? {
            return Err(SyncError::RefusedDelete {
                host,
                path: remote_path.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }
    let dest = RemotePath::parse(remote_path).operand();
    let (selection, code) = {
        let (root, options) = (local_root.to_owned(), options.clone());
        join_blocking(tokio::task::spawn_blocking(move || {
            let selection = Selection::walk(&root, &options)?;
            let code = version_of(&root, &selection.files)?;
            Ok::<_, SyncError>((selection, code))
        }))
        .await
        .map_err(|e| e.on_host(host.clone()))?
    };
    let files = &selection.files;
    remote_checked(
        session,
        &["mkdir", "-p", "--", &dest],
        options.step_timeout,
        || format!("creating the remote directory {dest} (mkdir -p)"),
        "check that the remote user may create it",
    )
    .await?;
    let method = choose_method(session, options).await?;
    tracing::debug!(host = %session.host(), %method, files = files.len(), remote = %dest, delete = options.delete, "syncing the project");
    let listing = if method == SyncMethod::Tar || options.delete {
        remote_listing(session, &dest, &selection, options).await?
    } else {
        None
    };
    let deleted = match &listing {
        Some(listing) if options.delete => delete_stale(session, &dest, listing, options).await?,
        _ => 0,
    };
    let sent = match method {
        SyncMethod::Tar => {
            send_tar(
                session,
                local_root,
                &dest,
                files,
                listing.map(|l| l.known),
                options,
            )
            .await?
        }
        // `choose_method` never answers Auto.
        SyncMethod::Rsync | SyncMethod::Auto => {
            send_rsync(session, local_root, &dest, files, options).await?
        }
    };
    write_remote_code_version(session, &dest, &code, options).await?;
    tracing::debug!(host = %session.host(), %method, sent = sent.files, bytes = sent.bytes, deleted, tree = %code.tree, "project synced");
    Ok(SyncReport {
        method,
        files: files.len(),
        sent: sent.files,
        bytes: sent.bytes,
        deleted,
        code,
    })
}

/// Writes `code` to `DEST/.gridq/code.json` on the host: `tee` fills a temporary file from
/// standard input, `mv` puts it in place, so a reader sees the old version or the new one.
async fn write_remote_code_version(
    session: &HostSession,
    dest: &str,
    code: &CodeVersion,
    options: &SyncOptions,
) -> Result<()> {
    let file = format!("{dest}/{CODE_VERSION_FILE}");
    let dir = file.rsplit_once('/').map_or(".", |(dir, _)| dir).to_owned();
    remote_checked(
        session,
        &["mkdir", "-p", "--", &dir],
        options.step_timeout,
        || format!("creating {dir} (mkdir -p)"),
        "check that the remote user may write there",
    )
    .await?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let tmp = format!("{dir}/.code.json.{:016x}.tmp", u64::from_le_bytes(nonce));
    let out = session
        .run_with_input(
            &["tee", "--", &tmp],
            &code_json(code),
            Some(options.step_timeout),
        )
        .await?;
    if !out.success() {
        let _ = session
            .run(&["rm", "-f", "--", &tmp], Some(options.step_timeout))
            .await;
        return Err(SyncError::Remote {
            host: session.who(),
            action: format!("writing the code version to {tmp} (tee)"),
            code: out.code,
            stderr: tail(&out.stderr),
            hint: "check the free space and permissions there".to_owned(),
        });
    }
    remote_checked(
        session,
        &["mv", "-f", "--", &tmp, &file],
        options.step_timeout,
        || format!("putting the code version in place at {file} (mv)"),
        "check the permissions of that directory",
    )
    .await?;
    Ok(())
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
    if let Err(reason) = check_project_dir(session, remote_path).await? {
        return Err(SyncError::RefusedRemoval {
            host: session.who(),
            path: remote_path.to_owned(),
            reason: reason.to_owned(),
        });
    }
    let path = RemotePath::parse(remote_path);
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

/// Whether `remote_path` may be treated as a project's own directory, whose contents gridq
/// may remove: `Err(reason)` when it is empty, is the remote home (`.`, `~`, or its absolute
/// path) or the root, has a `..` component, or resolves to a directory that holds the home.
async fn check_project_dir(
    session: &HostSession,
    remote_path: &str,
) -> Result<std::result::Result<(), &'static str>> {
    if remote_path.trim().is_empty() {
        return Ok(Err("it is empty"));
    }
    let path = RemotePath::parse(remote_path);
    if path.parts.contains(&"..") {
        return Ok(Err("it has a `..` component"));
    }
    if path.parts.is_empty() {
        return Ok(Err(if path.absolute {
            "it is the root directory"
        } else {
            "it is the remote home directory"
        }));
    }
    let target = remote_abs_path(session, remote_path).await?;
    let home = remote_abs_path(session, ".").await?;
    if target == "/" {
        return Ok(Err("it is the root directory"));
    }
    if target == home {
        return Ok(Err("it is the remote home directory"));
    }
    if home.starts_with(&format!("{target}/")) {
        return Ok(Err("it contains the remote home directory"));
    }
    Ok(Ok(()))
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

/// The `-e` of rsync and its destination argument, for `dest` on the session's host (also the
/// source argument of `gridq pull`, which copies the other way).
pub(crate) fn rsync_remote(session: &HostSession, dest: &str) -> Result<(String, String)> {
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

/// A line of `--out-format=%i %l %n` split into the update type and file type of `%i` (its
/// first two characters: `<` sent, `>` received, `c` created, ...; `f` file, `L` link, ...) and
/// the length `%l`.
pub(crate) fn itemized(line: &[u8]) -> Option<(u8, u8, u64)> {
    let (&update, rest) = line.split_first()?;
    let (&kind, rest) = rest.split_first()?;
    // `%i` is 11 characters; a space and the length follow.
    let after = rest.get(9..)?.strip_prefix(b" ")?;
    let len_end = after.iter().position(|&b| b == b' ')?;
    let len = std::str::from_utf8(&after[..len_end]).ok()?.parse().ok()?;
    Some((update, kind, len))
}

/// From a line of `--out-format=%i %l %n`: the size when it reports a file or link sent (0
/// for a link), `None` for anything else (a directory, a change of attributes only, a
/// message).
fn rsync_transfer(line: &[u8]) -> Option<u64> {
    let (update, kind, len) = itemized(line)?;
    match (update, kind) {
        (b'<', b'f') => Some(len),
        (b'<' | b'c', b'L') => Some(0),
        _ => None,
    }
}

/// A file, link or directory as the remote listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RemoteEntry {
    /// `f`, `l` or `d` (find's `%y`).
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
        [k @ (b'f' | b'l' | b'd')] => *k,
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

/// `rel` (a name from the remote listing) as a relative path all of whose components are
/// names: not empty, not absolute, no `.`, `..` or empty component. Only such a path is ever
/// joined to the remote directory for removal.
fn plain_relative(rel: &[u8]) -> Option<&Path> {
    let plain = !rel.is_empty()
        && rel
            .split(|&b| b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..");
    let path = Path::new(OsStr::from_bytes(rel));
    (plain && path.components().all(|c| matches!(c, Component::Normal(_)))).then_some(path)
}

/// What the host's project directory holds, as it concerns a sync.
#[derive(Debug, Default)]
struct Listing {
    /// The host's files and links at the paths of files that are sent.
    known: HashMap<Vec<u8>, RemoteEntry>,
    /// With `delete`: files and links there that are neither sent nor excluded.
    stale_files: Vec<Vec<u8>>,
    /// With `delete`: directories there that the project lacks and that are not excluded.
    stale_dirs: Vec<Vec<u8>>,
}

/// Lists the host's tree under `dest` (pruning [`DEFAULT_EXCLUDES`], which a sync never
/// touches). `None` when it cannot be listed (GNU `find` missing, say): the tar stream then
/// sends everything; with `delete`, that is an error instead.
async fn remote_listing(
    session: &HostSession,
    dest: &str,
    selection: &Selection,
    options: &SyncOptions,
) -> Result<Option<Listing>> {
    let wanted: HashSet<&[u8]> = selection
        .files
        .iter()
        .map(|f| f.as_os_str().as_bytes())
        .collect();
    let mut listing = Listing::default();
    let mut stderr = Vec::new();
    let argv = [
        "find",
        "-H",
        dest,
        "-mindepth",
        "1",
        "(",
        "-name",
        ".git",
        "-o",
        "-name",
        "target",
        "-o",
        "-name",
        ".gridq",
        ")",
        "-prune",
        "-o",
        "(",
        "-type",
        "f",
        "-o",
        "-type",
        "l",
        "-o",
        "-type",
        "d",
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
                    let Some((path, entry)) = parse_listing_line(line) else {
                        return;
                    };
                    let is_dir = entry.kind == b'd';
                    if wanted.contains(path) {
                        if !is_dir {
                            listing.known.insert(path.to_vec(), entry);
                        }
                        return;
                    }
                    if !options.delete {
                        return;
                    }
                    let Some(rel) = plain_relative(path) else {
                        return;
                    };
                    if is_dir && selection.dirs.contains(rel) {
                        return;
                    }
                    if selection.rules.excluded(rel, is_dir) {
                        return;
                    }
                    if is_dir {
                        listing.stale_dirs.push(path.to_vec());
                    } else {
                        listing.stale_files.push(path.to_vec());
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
        Ok(0) => Ok(Some(listing)),
        Ok(code) if options.delete => Err(SyncError::Remote {
            host: session.who(),
            action: format!("listing {dest} to find what to delete (GNU find -printf)"),
            code,
            stderr: tail(&stderr),
            hint: "deleting needs GNU find on the host; install findutils there, or sync without delete"
                .to_owned(),
        }),
        Ok(code) => {
            tracing::info!(host = %session.host(), code, stderr = %tail(&stderr), "cannot list the remote project (GNU find needed); sending every file");
            Ok(None)
        }
        Err(e) if options.delete => Err(e.into()),
        Err(e) => {
            tracing::info!(host = %session.host(), cause = %e, "cannot list the remote project; sending every file");
            Ok(None)
        }
    }
}

/// `paths` joined to `dest`, NUL-terminated, in batches of at most [`DELETE_BATCH`] bytes
/// (at least one path each).
fn delete_batches(dest: &str, paths: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    for rel in paths {
        let len = dest.len() + 1 + rel.len() + 1;
        if !batch.is_empty() && batch.len() + len > DELETE_BATCH {
            batches.push(std::mem::take(&mut batch));
        }
        batch.extend_from_slice(dest.as_bytes());
        batch.push(b'/');
        batch.extend_from_slice(rel);
        batch.push(0);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Removes the listing's stale files and links under `dest` (`xargs -0 rm -f --`), then its
/// stale directories that are empty now, deepest first (`xargs -0 rmdir --`; one that still
/// holds something stays). Returns how many files and links were removed.
async fn delete_stale(
    session: &HostSession,
    dest: &str,
    listing: &Listing,
    options: &SyncOptions,
) -> Result<usize> {
    for batch in delete_batches(dest, &listing.stale_files) {
        let argv = ["xargs", "-0", "rm", "-f", "--"];
        let out = session
            .run_with_input(&argv, &batch, Some(options.step_timeout))
            .await?;
        if !out.success() {
            return Err(SyncError::Remote {
                host: session.who(),
                action: format!(
                    "removing files the project no longer has from {dest} (xargs -0 rm -f)"
                ),
                code: out.code,
                stderr: tail(&out.stderr),
                hint: "check the permissions there, or sync without delete".to_owned(),
            });
        }
    }
    let mut dirs = listing.stale_dirs.clone();
    // Descendants sort after their directory: reversed, they come first.
    dirs.sort_unstable_by(|a, b| b.cmp(a));
    for batch in delete_batches(dest, &dirs) {
        let out = session
            .run_with_input(
                &["xargs", "-0", "rmdir", "--"],
                &batch,
                Some(options.step_timeout),
            )
            .await?;
        if !out.success() {
            tracing::debug!(host = %session.host(), stderr = %tail(&out.stderr), "some directories the project lacks still hold files; kept");
        }
    }
    tracing::debug!(host = %session.host(), files = listing.stale_files.len(), dirs = dirs.len(), "removed what the project no longer has");
    Ok(listing.stale_files.len())
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

/// Sends the files of `files` that differ from `known` (the host's copies; all of them
/// without a listing) as a tar stream.
async fn send_tar(
    session: &HostSession,
    local_root: &Path,
    dest: &str,
    files: &[PathBuf],
    remote: Option<HashMap<Vec<u8>, RemoteEntry>>,
    options: &SyncOptions,
) -> Result<Sent> {
    let host = session.who();
    let plan = {
        let (root, files) = (local_root.to_owned(), files.to_vec());
        join_blocking(tokio::task::spawn_blocking(move || {
            plan_tar(&root, &files, remote.as_ref())
        }))
        .await
        .map_err(|(file, e)| SyncError::LocalFile {
            host: Some(host.clone()),
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
            host: Some(host),
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
            host: Some(host.clone()),
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
        names_with(
            root,
            &SyncOptions {
                excludes: excludes.iter().map(|s| (*s).to_owned()).collect(),
                ..SyncOptions::default()
            },
        )
    }

    fn names_with(root: &Path, options: &SyncOptions) -> Vec<String> {
        project_files(root, options)
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
    fn gitignore_counts_at_every_depth_without_a_repository() {
        let dir = tree(&[
            (".gitignore", "venv/\n*.bin\n/build\n"),
            ("sub/.gitignore", "!weights.bin\n*.tmp\n"),
            ("venv/bin/python", ""),
            ("venv/lib/site.py", ""),
            ("model.bin", ""),
            ("sub/weights.bin", ""),
            ("sub/other.bin", ""),
            ("sub/x.tmp", ""),
            ("x.tmp", ""),
            ("build/out", ""),
            ("sub/build/keep", ""),
            // `.ignore` files are not read; hidden files are sent.
            (".ignore", "*.txt\n"),
            ("a.txt", ""),
            (".env", ""),
        ]);
        assert_eq!(
            names(dir.path(), &[]),
            [
                ".env",
                ".gitignore",
                ".ignore",
                "a.txt",
                "sub/.gitignore",
                "sub/build/keep",
                "sub/weights.bin",
                "x.tmp"
            ]
        );
    }

    #[test]
    fn gridqignore_overrides_gitignore_both_ways() {
        let dir = tree(&[
            (".gitignore", "*.bin\ndata/\nlogs/\n"),
            (".gridqignore", "!vocab.bin\n!data/\nnotes.md\n"),
            ("vocab.bin", ""),
            ("model.bin", ""),
            ("data/a.csv", ""),
            ("logs/x", ""),
            ("notes.md", ""),
            ("main.py", ""),
        ]);
        assert_eq!(
            names(dir.path(), &[]),
            [
                ".gitignore",
                ".gridqignore",
                "data/a.csv",
                "main.py",
                "vocab.bin"
            ]
        );
    }

    #[test]
    fn no_gitignore_sends_what_git_ignores_but_not_what_gridqignore_does() {
        let dir = tree(&[
            (".gitignore", "venv/\n*.bin\n"),
            (".gridqignore", "*.log\n"),
            (".git/info/exclude", "secret\n"),
            ("venv/bin/python", ""),
            ("model.bin", ""),
            ("secret", ""),
            ("debug.log", ""),
            (".gridq/code.json", ""),
        ]);
        let options = SyncOptions {
            gitignore: false,
            ..SyncOptions::default()
        };
        assert_eq!(
            names_with(dir.path(), &options),
            [
                ".gitignore",
                ".gridqignore",
                "model.bin",
                "secret",
                "venv/bin/python"
            ]
        );
        assert_eq!(names(dir.path(), &[]), [".gitignore", ".gridqignore"]);
    }

    #[test]
    fn info_exclude_and_the_enclosing_work_tree_count() {
        let dir = tree(&[
            ("repo/.git/info/exclude", "secret.txt\n"),
            ("repo/.gitignore", "*.ckpt\n/proj/skip.me\n"),
            ("repo/proj/a.py", ""),
            ("repo/proj/m.ckpt", ""),
            ("repo/proj/secret.txt", ""),
            ("repo/proj/skip.me", ""),
            ("repo/proj/sub/skip.me", ""),
            ("repo/proj/sub/.gitignore", "!keep.ckpt\n"),
            ("repo/proj/sub/keep.ckpt", ""),
        ]);
        // The project is a subdirectory of the work tree: the parent's rules count.
        assert_eq!(
            names(&dir.path().join("repo/proj"), &[]),
            ["a.py", "sub/.gitignore", "sub/keep.ckpt", "sub/skip.me"]
        );
        // The project is the work tree.
        assert_eq!(
            names(&dir.path().join("repo"), &[]),
            [
                ".gitignore",
                "proj/a.py",
                "proj/sub/.gitignore",
                "proj/sub/keep.ckpt",
                "proj/sub/skip.me"
            ]
        );
        // Outside a work tree, a parent's .gitignore does not count.
        let plain = tree(&[(".gitignore", "*.ckpt\n"), ("proj/m.ckpt", "")]);
        assert_eq!(names(&plain.path().join("proj"), &[]), ["m.ckpt"]);
    }

    #[test]
    fn a_bad_git_pattern_is_skipped_a_bad_gridqignore_pattern_is_an_error() {
        let dir = tree(&[(".gitignore", "a{\n*.bin\n"), ("a{", ""), ("x.bin", "")]);
        assert_eq!(names(dir.path(), &[]), [".gitignore", "a{"]);
        std::fs::write(dir.path().join(".gridqignore"), "ok\nb{\n").expect("write");
        let e = project_files(dir.path(), &SyncOptions::default()).expect_err("bad glob");
        let text = e.to_string();
        let file = dir.path().join(".gridqignore");
        assert!(
            text.starts_with(&format!(
                "cannot list the project files in {}: {}: ",
                dir.path().display(),
                file.display()
            )) && text.contains("line 2"),
            "{text}"
        );
    }

    #[test]
    fn host_paths_are_excluded_as_the_walk_would_leave_them_out() {
        let dir = tree(&[
            (".gitignore", "venv/\ndata/\n*.ckpt\n"),
            (".gridqignore", "!keep.ckpt\n"),
            ("sub/.gitignore", "*.tmp\n"),
            ("main.py", ""),
        ]);
        let selection = Selection::walk(dir.path(), &SyncOptions::default()).expect("walk");
        let excluded = |p: &str, is_dir: bool| selection.rules.excluded(Path::new(p), is_dir);
        for path in [
            "venv/lib/python3/site.py",
            "data/hand-placed.csv",
            "data",
            "model.ckpt",
            "old/model.ckpt",
            "sub/x.tmp",
            ".gridq/out/s/j/result.json",
            "crates/x/target/debug/app",
            ".git/config",
        ] {
            assert!(excluded(path, path == "data"), "{path} is not excluded");
        }
        for path in [
            "old_module.py",
            "gone/a.py",
            "keep.ckpt",
            "sub/y.py",
            "x.tmp",
        ] {
            assert!(!excluded(path, false), "{path} is excluded");
        }
        assert!(selection.dirs.contains(Path::new("")));
        assert!(selection.dirs.contains(Path::new("sub")));
    }

    #[test]
    fn only_plain_relative_names_are_removable() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "./a",
            "a//b",
            "a/",
            "a/.",
        ] {
            assert!(plain_relative(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert_eq!(plain_relative(b"a b/c.py"), Some(Path::new("a b/c.py")));
        assert_eq!(plain_relative(b"..a/b.."), Some(Path::new("..a/b..")));
    }

    #[test]
    fn delete_batches_join_the_directory_and_split_by_size() {
        let paths = vec![b"a".to_vec(), b"b c/d".to_vec()];
        assert_eq!(
            delete_batches("gridq/p", &paths),
            [b"gridq/p/a\0gridq/p/b c/d\0".to_vec()]
        );
        let long: Vec<Vec<u8>> = (0..3).map(|i| vec![b'0' + i; DELETE_BATCH / 2]).collect();
        let batches = delete_batches("d", &long);
        assert_eq!(batches.len(), 3);
        for (batch, path) in batches.iter().zip(&long) {
            assert_eq!(batch.len(), 2 + path.len() + 1);
            assert!(batch.starts_with(b"d/") && batch.ends_with(b"\0"));
        }
    }

    fn version(root: &Path) -> CodeVersion {
        code_version(root, &SyncOptions::default()).expect("code version")
    }

    #[test]
    fn the_tree_hash_follows_exactly_what_is_sent() {
        let files = [
            (".gitignore", "*.ckpt\n"),
            ("main.py", "print(1)\n"),
            ("pkg/util.py", "x = 1\n"),
            ("m.ckpt", "weights"),
        ];
        let a = tree(&files);
        std::os::unix::fs::symlink("main.py", a.path().join("entry")).expect("symlink");
        let base = version(a.path());
        assert_eq!(base.tree.len(), 64);
        assert!(base.tree.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!((base.commit.as_deref(), base.dirty), (None, None));

        // The same tree elsewhere, written later: the same hash.
        let b = tree(&files);
        std::os::unix::fs::symlink("main.py", b.path().join("entry")).expect("symlink");
        assert_eq!(version(b.path()), base);

        // What is not sent does not count.
        std::fs::write(b.path().join("m.ckpt"), "other weights").expect("write");
        std::fs::write(b.path().join("new.ckpt"), "more").expect("write");
        std::fs::create_dir_all(b.path().join(".gridq")).expect("mkdir");
        std::fs::write(b.path().join(".gridq/state"), "x").expect("write");
        assert_eq!(version(b.path()), base);

        let changed = |change: &dyn Fn(&Path)| {
            let c = tree(&files);
            std::os::unix::fs::symlink("main.py", c.path().join("entry")).expect("symlink");
            change(c.path());
            version(c.path()).tree
        };
        let contents = changed(&|p| std::fs::write(p.join("pkg/util.py"), "x = 2\n").unwrap());
        let mode = changed(&|p| {
            std::fs::set_permissions(p.join("main.py"), std::fs::Permissions::from_mode(0o755))
                .unwrap()
        });
        let rename =
            changed(&|p| std::fs::rename(p.join("pkg/util.py"), p.join("pkg/utils.py")).unwrap());
        let link = changed(&|p| {
            std::fs::remove_file(p.join("entry")).unwrap();
            std::os::unix::fs::symlink("pkg/util.py", p.join("entry")).unwrap();
        });
        let added = changed(&|p| std::fs::write(p.join("extra.py"), "").unwrap());
        let all = [&base.tree, &contents, &mode, &rename, &link, &added];
        let distinct: HashSet<&&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
    }

    #[test]
    fn status_lines_outside_gridqs_own_directories_make_a_tree_dirty() {
        assert!(!status_is_dirty(b""));
        assert!(!status_is_dirty(b"?? .gridq/\0?? sub/target/\0"));
        assert!(status_is_dirty(b"?? .gridq/\0 M main.py\0"));
        assert!(status_is_dirty(b"R  new.py\0old.py\0"));
        // A rename's source path is not read as a record (it would be `idq/b`).
        assert!(!status_is_dirty(b"R  .gridq/a\0.gridq/b\0"));
    }

    /// Runs git in `dir`, which must succeed.
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=gridq test",
                "-c",
                "user.email=test@gridq.invalid",
            ])
            .args([
                "-c",
                "commit.gpgsign=false",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .output()
            .expect("git is installed");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    #[test]
    fn git_commit_and_dirty_flag_and_the_local_code_file() {
        let dir = tree(&[(".gitignore", "*.ckpt\n"), ("main.py", "print(1)\n")]);
        git(dir.path(), &["init", "-q"]);
        let unborn = version(dir.path());
        assert_eq!((unborn.commit, unborn.dirty), (None, Some(true)));
        git(dir.path(), &["add", "-A"]);
        git(dir.path(), &["commit", "-q", "-m", "first"]);
        let head = git(dir.path(), &["rev-parse", "HEAD"]).trim().to_owned();

        let clean = version(dir.path());
        assert_eq!(
            (clean.commit.as_deref(), clean.dirty),
            (Some(head.as_str()), Some(false))
        );
        // gridq's own file, and an ignored one, leave it clean.
        let file = write_code_version(dir.path(), &clean).expect("write");
        assert_eq!(file, dir.path().join(".gridq/code.json"));
        std::fs::write(dir.path().join("m.ckpt"), "w").expect("write");
        assert_eq!(version(dir.path()), clean);
        let read: CodeVersion =
            serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
        assert_eq!(read, clean);
        let left: Vec<_> = std::fs::read_dir(dir.path().join(".gridq"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["code.json"], "no temporary file is left");

        std::fs::write(dir.path().join("main.py"), "print(2)\n").expect("write");
        let dirty = version(dir.path());
        assert_eq!(
            (dirty.commit.as_deref(), dirty.dirty),
            (Some(head.as_str()), Some(true))
        );
        assert_ne!(dirty.tree, clean.tree);
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
        let options = SyncOptions {
            excludes: vec!["a{".to_owned()],
            ..SyncOptions::default()
        };
        let e = project_files(dir.path(), &options).expect_err("bad glob");
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
        let (path, dir) = parse_listing_line(b"d\x004096\x001.0\x00\x00dir\x00").unwrap();
        assert_eq!((path, dir.kind), (b"dir".as_slice(), b'd'));
        assert!(parse_listing_line(b"p\x000\x001.0\x00\x00fifo\x00").is_none());
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
