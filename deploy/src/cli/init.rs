//! `gridq init -- PROGRAM [ARGS...]`: the init process of a worker or master container.
//!
//! gridq's services run in images that are not gridq's (the team's own CUDA image), whose
//! entrypoint may be anything and which may have no init at all. The container's PID 1 has
//! two duties nobody else takes: reaping the orphans that a job leaves behind (a process that
//! double-forks, a data loader whose parent died), which would otherwise pile up as zombies,
//! and passing signals on (PID 1 ignores every signal it has no handler for, so `docker stop`
//! would wait its whole timeout and then kill the worker without letting it hand its jobs
//! back). The static `gridq` binary is mounted into the container anyway, so it is its own
//! init: no `tini` in the image, no `docker run --init` needed from the engine.
//!
//! What it does, in the main thread before anything else starts:
//! 1. blocks the signals it handles, so they queue for `sigwait` instead of acting;
//! 2. becomes a child subreaper when it is not PID 1 (orphans come to it either way);
//! 3. starts PROGRAM with an empty signal mask (a child inherits its parent's mask, and
//!    std's spawn keeps it, so the mask of step 1 is undone between fork and exec);
//! 4. loops on `sigwait`: SIGCHLD reaps every exited child (`waitpid(-1, WNOHANG)`); SIGTERM,
//!    SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH go on to PROGRAM;
//! 5. once PROGRAM has exited, exits with its status (128 + the signal when it was killed).

use std::ffi::OsString;
use std::process::Command;

use clap::Args;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Failure;

/// `gridq init` arguments.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// The program to run and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<OsString>,
}

/// The signals passed on to the program.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Runs the program as PID 1 would; returns only on a failure to start it.
///
/// # Errors
/// The program could not be started (exit code 1, with the reason).
#[allow(unsafe_code)] // pre_exec: the signal mask of the child
pub(crate) fn run(args: &InitArgs) -> Result<(), Failure> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| anyhow::anyhow!("init: blocking signals: {e}"))?;
    if std::process::id() != 1 {
        // Orphans of the program's jobs come to us rather than to the real PID 1.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "init: could not become a child subreaper");
        }
    }
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| Failure::Usage("init: no program given".into()))?;
    let mut command = Command::new(program);
    command.args(rest);
    // SAFETY: between fork and exec only async-signal-safe calls are made: sigprocmask.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
    let child = command
        .spawn()
        .map_err(|e| anyhow::anyhow!("init: starting {}: {e}", program.to_string_lossy()))?;
    let main = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The std handle is not waited on: every child is reaped by the loop below.
    drop(child);
    loop {
        let signal = match set.wait() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "init: sigwait");
                continue;
            }
        };
        if signal != Signal::SIGCHLD {
            // ESRCH: the program has just exited; its SIGCHLD is queued and ends the loop.
            let _ = kill(main, signal);
            continue;
        }
        if let Some(code) = reap(main) {
            std::process::exit(code);
        }
    }
}

/// Reaps every child that has exited; returns the exit code once `main` is among them.
fn reap(main: Pid) -> Option<i32> {
    let mut code = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, status)) if pid == main => code = Some(status),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == main => {
                code = Some(128 + signal as i32);
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return code,
            Ok(_) => {}
        }
    }
}
