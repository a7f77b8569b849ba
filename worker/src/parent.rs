//! Ties the worker's life to its parent's (`--exit-with-parent-fd`): the parent hands the
//! worker the read end of a pipe whose write end only the parent holds. However the parent
//! dies, SIGKILL included, the kernel closes that write end and the read returns end of file.
//!
//! A pipe rather than `PR_SET_PDEATHSIG`: that signal is tied to the parent's *thread* that
//! started the worker (a runtime's worker thread may exit long before the process), and it
//! cannot tell the worker to take its jobs down with it before exiting.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt as _;

use nix::libc;
use tokio::sync::oneshot;

/// Takes the inherited descriptor `fd` and returns a receiver that completes once the parent
/// is gone (its pipe reads end of file). Whatever the parent writes into the pipe is ignored.
///
/// # Errors
/// When `fd` is not open or not a pipe: taking a descriptor that is something else would close
/// or read a file the worker uses for another purpose.
pub fn watch(fd: RawFd) -> io::Result<oneshot::Receiver<()>> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd}: {why}"),
        )
    };
    if fd < 0 {
        return Err(invalid("not a descriptor"));
    }
    // SAFETY: only asks whether `fd` is open; touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(invalid("not open (was it inherited?)"));
    }
    // SAFETY: `fd` is open, and it was handed to this process to own (the command line says
    // so); nothing else in the worker uses it. Checked to be a pipe before anything reads it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = File::from(owned);
    let is_pipe = file.metadata().is_ok_and(|m| m.file_type().is_fifo());
    if !is_pipe {
        // Not ours after all: leave it open for whoever uses it.
        let _ = file.into_raw_fd();
        return Err(invalid("not a pipe"));
    }
    // Jobs must not hold it (they could not keep the parent alive, but it is none of theirs).
    // SAFETY: sets a flag of our own descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("gridq-parent".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Unreadable (EIO, ...): the parent cannot be watched, so take it as gone
                    // rather than outlive it unnoticed.
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd as _;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_parent_is_gone_once_the_write_end_closes_and_not_before() {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut gone = watch(read.into_raw_fd()).unwrap();
        nix::unistd::write(&write, b"ignored").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut gone)
                .await
                .is_err(),
            "the parent still holds the write end"
        );
        drop(write);
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("end of file seen")
            .expect("the watcher says so");
    }

    #[test]
    fn a_descriptor_that_is_not_an_open_pipe_is_refused_and_left_open() {
        assert!(watch(-1).is_err());
        let file = tempfile::tempfile().unwrap();
        let fd = file.into_raw_fd();
        let err = watch(fd).unwrap_err();
        assert!(err.to_string().contains("not a pipe"), "{err}");
        // Still open, and still ours to close.
        // SAFETY: `fd` came from `into_raw_fd` above and nothing closed it.
        let file = unsafe { File::from_raw_fd(fd) };
        assert!(file.metadata().is_ok());
        drop(file);
        // Far above any descriptor limit: never open.
        let err = watch(1_000_000).unwrap_err();
        assert!(err.to_string().contains("not open"), "{err}");
    }
}
