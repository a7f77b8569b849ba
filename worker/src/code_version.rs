//! Which version of the project's code a job runs: `<project>/.gridq/code.json`
//! ([`CODE_VERSION_FILE`]), which the project's sync writes (a [`CodeVersion`]: the synced tree's hash, and the git commit with a
//! dirty flag). The worker reads it when it starts each job, since a sync may change the
//! code under a running worker, and sends it with the attempt's result.
//!
//! The file is opened step by step with `O_NOFOLLOW` (a worker running as root must not read
//! through a link a job planted), at most 64 KiB of it is read, and it is parsed again only
//! when it changed (its inode, size or times). A missing or unreadable file means no version;
//! that is logged once per worker.

use std::io::Read as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use gridq_common::code::{CODE_VERSION_FILE, CodeVersion};
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

/// The largest file that is read.
const MAX_BYTES: u64 = 64 * 1024;

/// What identifies one content of the file.
type Key = (u64, u64, i64, i64, i64);

/// Reads a project's `code.json`, remembering the last answer while the file is unchanged.
#[derive(Debug)]
pub struct CodeFile {
    project: PathBuf,
    last: Mutex<Option<(Key, Option<CodeVersion>)>>,
    warned: AtomicBool,
}

impl CodeFile {
    /// The file of the project directory `project`.
    pub fn new(project: &Path) -> Self {
        Self {
            project: project.to_path_buf(),
            last: Mutex::new(None),
            warned: AtomicBool::new(false),
        }
    }

    /// The code version the project holds now, or `None` (logged once per worker).
    pub fn read(&self) -> Option<CodeVersion> {
        match self.try_read() {
            Ok(version) => version,
            Err(why) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        file = %self.path().display(),
                        why = %why,
                        "no code version: jobs are recorded without one (this is said once)"
                    );
                }
                None
            }
        }
    }

    fn path(&self) -> PathBuf {
        self.project.join(CODE_VERSION_FILE)
    }

    fn try_read(&self) -> Result<Option<CodeVersion>, String> {
        let nofollow = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let project = open(
            &self.project,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open the project directory: {e}"))?;
        let parts: Vec<&str> = CODE_VERSION_FILE.split('/').collect();
        let (name, dirs) = parts.split_last().ok_or("no file name")?;
        let mut dir = project;
        for part in dirs {
            dir = openat(
                &dir,
                *part,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | nofollow,
                Mode::empty(),
            )
            .map_err(|e| format!("cannot open {part}: {e}"))?;
        }
        // O_NONBLOCK: a FIFO there must not hang the worker.
        let file = openat(
            &dir,
            *name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | nofollow,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open it: {e}"))?;
        let st = fstat(file.as_fd()).map_err(|e| format!("cannot stat it: {e}"))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err("it is not a regular file".into());
        }
        let key = key_of(&st);
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((k, version)) = last.as_ref()
            && *k == key
        {
            return Ok(version.clone());
        }
        let mut bytes = Vec::new();
        std::fs::File::from(file)
            .take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(format!("it is larger than {MAX_BYTES} bytes"));
        }
        let version: CodeVersion =
            serde_json::from_slice(&bytes).map_err(|e| format!("it is not a code version: {e}"))?;
        if version.tree.is_empty() || version.tree.len() > 256 {
            return Err("its `tree` is empty or longer than 256 characters".into());
        }
        *last = Some((key, Some(version.clone())));
        Ok(Some(version))
    }
}

fn key_of(st: &FileStat) -> Key {
    (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime.wrapping_mul(1_000_000_000) + st.st_mtime_nsec,
        st.st_ctime.wrapping_mul(1_000_000_000) + st.st_ctime_nsec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_file_and_sees_it_change() {
        let tmp = tempfile::tempdir().unwrap();
        let code = CodeFile::new(tmp.path());
        assert_eq!(code.read(), None);
        std::fs::create_dir(tmp.path().join(".gridq")).unwrap();
        let file = tmp.path().join(".gridq/code.json");
        std::fs::write(&file, br#"{"tree":"aa11","commit":"bb22","dirty":false}"#).unwrap();
        assert_eq!(
            code.read(),
            Some(CodeVersion {
                tree: "aa11".into(),
                commit: Some("bb22".into()),
                dirty: Some(false),
            })
        );
        std::fs::write(&file, br#"{"tree":"cc33"}"#).unwrap();
        assert_eq!(
            code.read(),
            Some(CodeVersion {
                tree: "cc33".into(),
                commit: None,
                dirty: None,
            })
        );
        std::fs::write(&file, b"not json").unwrap();
        assert_eq!(code.read(), None);
    }

    #[test]
    fn a_link_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir_all(real.join(".gridq")).unwrap();
        std::fs::write(real.join(".gridq/code.json"), br#"{"tree":"aa"}"#).unwrap();
        let project = tmp.path().join("project");
        std::fs::create_dir_all(project.join(".gridq")).unwrap();
        std::os::unix::fs::symlink(
            real.join(".gridq/code.json"),
            project.join(".gridq/code.json"),
        )
        .unwrap();
        assert_eq!(CodeFile::new(&project).read(), None);
        assert!(CodeFile::new(&real).read().is_some());
    }
}
