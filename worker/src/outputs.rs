//! A job's output directory, `GRIDQ_OUTPUT`: `<project>/.gridq/out/<SWEEP>/<JOB_ID>/`.
//!
//! The runner has the job's process make it (`mkdir -p`, as the job's user, before it execs:
//! see [`crate::spawn`]), so that with `--job-user` every directory of it belongs to the job's
//! user, never to root, and a link planted in the project cannot make the worker create a
//! directory elsewhere. Where it cannot be made (a job user that may not write the project),
//! the job runs all the same, without it, and the worker says why once in its log.
//! Directories it makes are mode 0700: outputs are often private
//! (checkpoints, data derived from the inputs) and everything that reads them (the job, `gridq
//! pull` over SSH) runs as that same user. The directory belongs to the job, not to one
//! attempt: a later attempt on the same host finds what an earlier one left (a checkpoint to
//! resume from).
//!
//! When the attempt has ended, [`list`] reads what is there: regular files, by name relative
//! to the directory, with their sizes, sorted; at most [`OutputListing::MAX_FILES`] (and
//! [`OutputListing::MAX_NAME_BYTES`] of names), else the listing says it is truncated. It walks
//! from the project directory with `openat(O_NOFOLLOW)` at every step, so a job that replaces a
//! directory by a link cannot make a worker running as root list (or remove) anything outside
//! it. A job that left its directory empty leaves no directory: it is removed, so that a sweep
//! of a million jobs that write nothing leaves no million empty directories. (If two attempts
//! of one job run at once on one host, one that ends may remove the directory under another
//! that has not written into it yet; the master never runs two attempts at once on purpose.)

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use gridq_common::wire::{OutputFile, OutputListing};
use gridq_common::{JobId, SweepId};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// The environment variable that tells the job where its output directory is.
pub const OUTPUT_ENV: &str = "GRIDQ_OUTPUT";

/// The components of every output directory's path below the project directory, before the
/// sweep's and the job's.
pub const OUTPUT_ROOT: [&str; 2] = [".gridq", "out"];

/// Directory entries a listing examines at most (files, directories, anything); beyond that it
/// is truncated, so that a job that leaves a huge tree cannot hold the worker up.
const MAX_ENTRIES: usize = 100_000;
/// Directory levels a listing descends at most.
const MAX_DEPTH: usize = 64;

/// Where one job's outputs go: a trusted base (the worker's project directory) and the
/// components below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputDir {
    /// The project directory, absolute.
    pub base: PathBuf,
    /// `.gridq`, `out`, the sweep's name, the job's id.
    pub parts: Vec<String>,
}

impl OutputDir {
    /// The output directory of `job` of `sweep` under the project directory `project` (made
    /// absolute against the current directory).
    pub fn new(project: &Path, sweep: &SweepId, job: &JobId) -> Self {
        let base = std::path::absolute(project).unwrap_or_else(|_| project.to_path_buf());
        let mut parts: Vec<String> = OUTPUT_ROOT.iter().map(|p| (*p).to_owned()).collect();
        parts.push(sweep.as_str().to_owned());
        parts.push(job.to_string());
        Self { base, parts }
    }

    /// The whole path.
    pub fn path(&self) -> PathBuf {
        let mut path = self.base.clone();
        path.extend(&self.parts);
        path
    }

    /// The directories to make, outermost first: the base joined with each prefix of the
    /// components.
    pub fn to_make(&self) -> Vec<PathBuf> {
        let mut path = self.base.clone();
        self.parts
            .iter()
            .map(|p| {
                path.push(p);
                path.clone()
            })
            .collect()
    }

    /// Why these components cannot name a directory below the base: each must be one plain
    /// name (not empty, `.` or `..`, no `/` or NUL). Sweep names allow dots, so `..` is a
    /// valid sweep name and must be refused here.
    pub fn check(&self) -> Result<(), String> {
        if self.base.as_os_str().as_bytes().contains(&0) {
            return Err(format!(
                "the project directory {} contains a NUL byte",
                self.base.display()
            ));
        }
        for part in &self.parts {
            if part.is_empty()
                || part == "."
                || part == ".."
                || part.contains('/')
                || part.contains('\0')
            {
                return Err(format!(
                    "`{part}` cannot name an output directory (a sweep named `.` or `..`?)"
                ));
            }
        }
        Ok(())
    }
}

fn open_dir(at: impl AsFd, name: &(impl ?Sized + nix::NixPath)) -> nix::Result<OwnedFd> {
    openat(
        at,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Lists what the job left in its output directory and removes the directory when it is
/// empty. `None` when it is not there (or is not a directory, or a step of its path is a
/// link): the job removed it, or it could not be made.
pub fn list(dir: &OutputDir) -> Option<OutputListing> {
    let base = nix::fcntl::open(
        &dir.base,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let (leaf, parents) = dir.parts.split_last()?;
    let mut parent = base;
    for part in parents {
        parent = open_dir(&parent, part.as_str()).ok()?;
    }
    let fd = match open_dir(&parent, leaf.as_str()) {
        Ok(fd) => fd,
        Err(e) => {
            if e != Errno::ENOENT {
                tracing::debug!(dir = %dir.path().display(), cause = %e, "cannot open the job's output directory");
            }
            return None;
        }
    };
    let mut walk = Walk {
        files: Vec::new(),
        entries: 0,
        name_bytes: 0,
        truncated: false,
    };
    walk.dir(fd, "", 0);
    if walk.entries == 0 {
        // Nothing at all in it: no directory is left behind. A job that has just written into
        // it (see the module docs) keeps it: the removal fails with ENOTEMPTY.
        let _ = unlinkat(&parent, leaf.as_str(), UnlinkatFlags::RemoveDir);
    }
    walk.files.sort_by(|a, b| a.name.cmp(&b.name));
    Some(OutputListing {
        dir: dir.path().to_string_lossy().into_owned(),
        files: walk.files,
        truncated: walk.truncated,
    })
}

struct Walk {
    files: Vec<OutputFile>,
    entries: usize,
    name_bytes: usize,
    truncated: bool,
}

impl Walk {
    fn full(&self) -> bool {
        self.files.len() >= OutputListing::MAX_FILES
            || self.name_bytes >= OutputListing::MAX_NAME_BYTES
            || self.entries >= MAX_ENTRIES
    }

    /// Walks the directory open at `fd`, whose path relative to the output directory is
    /// `prefix` (empty, or ending in `/`). Entries are taken in name order, so a truncated
    /// listing is the same prefix of the tree every time.
    fn dir(&mut self, fd: OwnedFd, prefix: &str, depth: usize) {
        let Ok(mut handle) = Dir::from_fd(fd) else {
            return;
        };
        let mut names: Vec<(Vec<u8>, Option<Type>)> = handle
            .iter()
            .filter_map(Result::ok)
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
            .map(|e| (e.file_name().to_bytes().to_vec(), e.file_type()))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            if self.full() {
                self.truncated = true;
                return;
            }
            self.entries += 1;
            let Ok(cname) = std::ffi::CString::new(name.clone()) else {
                continue;
            };
            let cname: &CStr = &cname;
            let shown = format!("{prefix}{}", OsStr::from_bytes(&name).to_string_lossy());
            let stat = |cname: &CStr| -> Option<FileStat> {
                fstatat(&handle, cname, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()
            };
            match kind {
                Some(Type::Directory) => self.subdir(&handle, cname, &shown, depth),
                Some(Type::File) => {
                    if let Some(st) = stat(cname) {
                        self.file(&st, shown);
                    }
                }
                // A file system that does not say: ask.
                None => match stat(cname) {
                    Some(st) if is(&st, SFlag::S_IFDIR) => {
                        self.subdir(&handle, cname, &shown, depth);
                    }
                    Some(st) => self.file(&st, shown),
                    None => {}
                },
                // Links, pipes, sockets, devices: not outputs to list.
                Some(_) => {}
            }
        }
    }

    fn subdir(&mut self, handle: &Dir, name: &CStr, shown: &str, depth: usize) {
        if depth + 1 >= MAX_DEPTH {
            self.truncated = true;
            return;
        }
        // O_NOFOLLOW: a directory replaced by a link since it was read is not entered.
        if let Ok(fd) = open_dir(handle, name) {
            self.dir(fd, &format!("{shown}/"), depth + 1);
        }
    }

    fn file(&mut self, st: &FileStat, name: String) {
        if !is(st, SFlag::S_IFREG) {
            return;
        }
        self.name_bytes += name.len();
        self.files.push(OutputFile {
            name,
            size: u64::try_from(st.st_size).unwrap_or(0),
        });
    }
}

fn is(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

/// Makes the output directory with the worker's own user (for tests and tools; jobs get theirs
/// from [`crate::spawn`]).
///
/// # Errors
/// The first `mkdir` that failed for another reason than that the directory exists.
pub fn make(dir: &OutputDir) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_in(root: &Path) -> OutputDir {
        OutputDir::new(
            root,
            &SweepId::new("s1").unwrap(),
            &JobId::from_bytes([0xab; 16]),
        )
    }

    #[test]
    fn the_path_is_under_the_project_and_bad_names_are_refused() {
        let d = dir_in(Path::new("/p"));
        assert_eq!(
            d.path(),
            Path::new(&format!("/p/.gridq/out/s1/{}", "ab".repeat(16)))
        );
        assert_eq!(d.to_make().len(), 4);
        assert_eq!(d.to_make()[0], Path::new("/p/.gridq"));
        assert!(d.check().is_ok());
        let bad = OutputDir::new(
            Path::new("/p"),
            &SweepId::new("..").unwrap(),
            &JobId::from_bytes([0; 16]),
        );
        assert_eq!(
            bad.check().unwrap_err(),
            "`..` cannot name an output directory (a sweep named `.` or `..`?)"
        );
    }

    #[test]
    fn lists_regular_files_sorted_without_following_links_and_removes_an_empty_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir_in(tmp.path());
        make(&d).unwrap();
        let out = d.path();
        std::fs::write(out.join("b.txt"), b"12345").unwrap();
        std::fs::create_dir_all(out.join("a/deep")).unwrap();
        std::fs::write(out.join("a/deep/x.bin"), vec![0u8; 1000]).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(&outside, out.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), out.join("flink")).unwrap();
        let listing = list(&d).unwrap();
        let names: Vec<(&str, u64)> = listing
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.size))
            .collect();
        assert_eq!(names, [("a/deep/x.bin", 1000), ("b.txt", 5)]);
        assert!(!listing.truncated);
        assert_eq!(listing.bytes(), 1005);
        assert_eq!(listing.dir, out.to_string_lossy());

        // An empty directory is listed as empty and removed; its parents stay.
        let empty = OutputDir::new(
            tmp.path(),
            &SweepId::new("s1").unwrap(),
            &JobId::from_bytes([1; 16]),
        );
        make(&empty).unwrap();
        let listing = list(&empty).unwrap();
        assert!(listing.files.is_empty() && !listing.truncated);
        assert!(!empty.path().exists());
        assert!(empty.path().parent().unwrap().is_dir());
        // Gone: no listing.
        assert_eq!(list(&empty), None);
    }

    #[test]
    fn a_link_in_the_path_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        let d = dir_in(&elsewhere);
        make(&d).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let project = tmp.path().join("project");
        std::fs::create_dir(&project).unwrap();
        std::os::unix::fs::symlink(elsewhere.join(".gridq"), project.join(".gridq")).unwrap();
        assert_eq!(list(&dir_in(&project)), None);
    }

    #[test]
    fn a_large_tree_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir_in(tmp.path());
        make(&d).unwrap();
        for i in 0..OutputListing::MAX_FILES + 5 {
            std::fs::write(d.path().join(format!("f{i:05}")), b"").unwrap();
        }
        let listing = list(&d).unwrap();
        assert_eq!(listing.files.len(), OutputListing::MAX_FILES);
        assert!(listing.truncated);
        assert_eq!(listing.files[0].name, "f00000");
    }
}
