//! The worker's scratch directory: where jobs leave their `GRIDQ_RESULT` files and, when they
//! run as another user (`--job-user`), have their home.
//!
//! A job writes its result file with the job's rights (root's, for a worker run as root
//! without `--job-user`), so nobody else may be able to create entries in the directory:
//! another local user who planted `<job>-1.json -> /root/file` there would make the job
//! overwrite that file. Hence:
//! - By default the directory is new and private: `gridq-worker-XXXXXXXXXX` (a random name)
//!   under the system's temporary directory, made with a single `mkdir` at mode 0700 that fails
//!   when the name exists (as `mkdtemp` does), and removed with its content when the worker
//!   stops.
//! - A directory given explicitly may exist, but must be a real directory (not a symbolic
//!   link), owned by the worker's effective user and writable by nobody else; it is made 0700
//!   (created so when missing) and kept when the worker stops.
//!
//! With a job user the root stays the worker's, at mode 0711 so the job user can pass through
//! it without listing it, and two directories inside belong to the job user (mode 0700):
//! `results/` for the result files and `home/` for its `HOME`. The job user can plant links in
//! `results/`, but the worker only ever unlinks result files (never following a link) and
//! reads them with `O_NOFOLLOW`, and the job itself writes with no more than its own rights.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// How many random names [`Scratch::private_in`] tries before giving up (each is new unless
/// someone guesses 50 random bits).
const NAME_ATTEMPTS: usize = 16;
/// Random characters in a private directory's name.
const NAME_LEN: usize = 10;
/// The prefix of a private directory's name.
pub const PRIVATE_PREFIX: &str = "gridq-worker-";

/// Why the scratch directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("scratch directory {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("scratch directory {}: is a symbolic link; give the directory itself", .path.display())]
    Symlink { path: PathBuf },
    #[error("scratch directory {}: not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "scratch directory {}: owned by uid {owner}, not by this worker (uid {uid}); another user's directory could hold links planted for the worker's jobs to follow",
        .path.display()
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "scratch directory {}: writable by other users (mode {mode:o}); give a directory only this worker's user can write to (chmod 700)",
        .path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
}

pub type Result<T> = std::result::Result<T, ScratchError>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ScratchError + '_ {
    move |source| ScratchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A prepared scratch directory; a private one is removed when this is dropped.
#[derive(Debug)]
pub struct Scratch {
    root: PathBuf,
    results: PathBuf,
    home: Option<PathBuf>,
    remove_on_drop: bool,
}

impl Scratch {
    /// A new private directory under `parent` (see the module docs), for jobs run as
    /// `job_user` or as the worker's own user. Removed, with everything in it, on drop.
    ///
    /// # Errors
    /// When `parent` does not exist or cannot be written to.
    pub fn private_in(parent: &Path, job_user: Option<(u32, u32)>) -> Result<Self> {
        let mut last = None;
        for _ in 0..NAME_ATTEMPTS {
            let name = random_name().map_err(io_error(parent))?;
            let root = parent.join(format!("{PRIVATE_PREFIX}{name}"));
            // One mkdir, which fails on any existing entry (a link included): the directory is
            // ours from its first moment. The sticky bit of /tmp keeps it from being renamed.
            match std::fs::DirBuilder::new().mode(0o700).create(&root) {
                Ok(()) => {
                    let mut scratch = Scratch {
                        results: root.clone(),
                        root,
                        home: None,
                        remove_on_drop: true,
                    };
                    // On an error, dropping `scratch` removes what was made.
                    scratch.set_up(job_user)?;
                    return Ok(scratch);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((root, e)),
                Err(e) => return Err(io_error(&root)(e)),
            }
        }
        let (root, e) = last.expect("at least one attempt");
        Err(io_error(&root)(e))
    }

    /// `dir` as given: a missing one is created (0700; its parents as usual); an existing one
    /// must be a real directory, owned by the worker's effective user and writable by no one
    /// else, and is made 0700 (0711 with a job user). Kept on drop.
    ///
    /// # Errors
    /// [`ScratchError::Symlink`], [`ScratchError::NotOwned`], [`ScratchError::Writable`] for a
    /// directory that others could plant files in; [`ScratchError::Io`] when it cannot be
    /// created.
    pub fn given(dir: &Path, job_user: Option<(u32, u32)>) -> Result<Self> {
        let root = std::path::absolute(dir).map_err(io_error(dir))?;
        match std::fs::symlink_metadata(&root) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = root.parent() {
                    std::fs::create_dir_all(parent).map_err(io_error(parent))?;
                }
                match std::fs::DirBuilder::new().mode(0o700).create(&root) {
                    // Made by someone else meanwhile: checked below like any existing one.
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(io_error(&root)(e));
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(io_error(&root)(e)),
        }
        check_private(&root)?;
        let mut scratch = Scratch {
            results: root.clone(),
            root,
            home: None,
            remove_on_drop: false,
        };
        scratch.set_up(job_user)?;
        Ok(scratch)
    }

    /// The root's mode, and for a job user its `results/` and `home/`.
    fn set_up(&mut self, job_user: Option<(u32, u32)>) -> Result<()> {
        let mode = if job_user.is_some() { 0o711 } else { 0o700 };
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(mode))
            .map_err(io_error(&self.root))?;
        if let Some((uid, gid)) = job_user {
            let results = self.root.join("results");
            let home = self.root.join("home");
            for dir in [&results, &home] {
                job_user_dir(dir, uid, gid)?;
            }
            self.results = results;
            self.home = Some(home);
        }
        Ok(())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Where the result file of an attempt goes.
    pub fn result_path(&self, job: impl std::fmt::Display, attempt: u32) -> PathBuf {
        self.results.join(format!("{job}-{attempt}.json"))
    }

    /// The job user's home, with a job user.
    pub fn home(&self) -> Option<&Path> {
        self.home.as_deref()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove_on_drop {
            // `remove_dir_all` never follows a link out of the directory.
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                tracing::warn!(cause = %e, dir = %self.root.display(), "cannot remove the scratch directory");
            }
        }
    }
}

/// Refuses a link, a non-directory, another user's directory and one others may write to.
fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(io_error(path))?;
    if meta.file_type().is_symlink() {
        return Err(ScratchError::Symlink {
            path: path.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(ScratchError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(ScratchError::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(ScratchError::Writable {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// A directory of the job user's inside the scratch root (which only the worker can write,
/// so what is found there was made by the worker, and may since belong to the job user).
fn job_user_dir(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_error(dir)(e)),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_error(dir))?;
    if meta.file_type().is_symlink() {
        return Err(ScratchError::Symlink {
            path: dir.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(ScratchError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(io_error(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_error(dir))
}

/// Lowercase letters and digits, from the system's random source.
fn random_name() -> io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; NAME_LEN];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("no random source: {e}")))?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names_differ_and_use_safe_characters() {
        let (a, b) = (random_name().unwrap(), random_name().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), NAME_LEN);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}
