//! The master's state directory: the store (`gridq.db`, which holds every output line of every
//! job), the API token and, for `gridq run --local`, the private broker and the results. Only
//! the master's user may read it: the directory is 0700 and the store's files 0600.

use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::Path;

use tracing::warn;

/// The store's file in the state directory.
pub const DB_FILE: &str = "gridq.db";
/// SQLite's companions of the store's file, made with its mode when SQLite creates them.
const DB_COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Makes `dir` private: created at mode 0700 (its parents as usual) when missing; an existing
/// one of this user's that others may enter is tightened to 0700, with a warning. Then the
/// store's file is created empty at 0600 when missing (SQLite takes an empty file for an empty
/// database and gives its WAL and shared-memory files the same mode), and an existing one, and
/// its companions, are tightened to 0600.
///
/// A directory or file of another user is left as it is (with a warning when others may read
/// it): its owner decides.
///
/// # Errors
/// When the directory or the store's file cannot be created.
pub fn prepare(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            tighten(dir, 0o700, "state directory")
        }
        other => other?,
    }
    let db = dir.join(DB_FILE);
    match std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&db)
    {
        Ok(_) => {}
        // A read-only store is the store's to report.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(e),
    }
    tighten(&db, 0o600, "store");
    for suffix in DB_COMPANIONS {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        tighten(Path::new(&name), 0o600, "store");
    }
    Ok(())
}

/// Sets `mode` on an existing `path` of this user's whose mode lets others in, with a warning.
fn tighten(path: &Path, mode: u32, what: &str) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let current = meta.mode() & 0o7777;
    if current & 0o077 == 0 || meta.file_type().is_symlink() {
        return;
    }
    let shown = path.display();
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        warn!(path = %shown, mode = format!("{current:o}"), owner = meta.uid(), "the {what} is another user's and other users may read it");
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => {
            warn!(path = %shown, was = format!("{current:o}"), now = format!("{mode:o}"), "the {what} was open to other users; made it private");
        }
        Err(e) => {
            warn!(path = %shown, mode = format!("{current:o}"), cause = %e, "the {what} is open to other users and cannot be made private")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_state_directory_and_store_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/state");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
        assert_eq!(std::fs::metadata(dir.join(DB_FILE)).unwrap().len(), 0);
    }

    #[test]
    fn an_open_state_directory_of_ours_is_tightened_and_the_store_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in [DB_FILE, "gridq.db-wal"] {
            std::fs::write(dir.join(name), "kept").unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for name in [DB_FILE, "gridq.db-wal"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), "kept");
        }
    }
}
