//! Starts a job's process the way `posix_spawn` does (`clone` with `CLONE_VM | CLONE_VFORK`:
//! the child shares the worker's memory until it execs, so nothing is copied), with the one
//! step `posix_spawn` cannot take: `PR_SET_PDEATHSIG`.
//!
//! A `fork` copies the worker's page tables and the child's `exec` tears the copy down again;
//! measured on a 2-core machine from a 12 MB parent, that was 0.45 ms in the parent and 0.83 ms
//! in the child per `true` job, against 0.06 ms and 0.50 ms this way. `std::process::Command`
//! takes this path only without a `pre_exec` hook, and the parent-death signal needs one.
//!
//! Between `clone` and `exec` the child runs on its own stack in the parent's memory, with
//! the parent thread suspended. It makes raw system calls only, on data the parent prepared
//! (no allocation, no locks), with every signal blocked until the handlers it inherited are
//! reset to their defaults. A failure before `exec` is written into that shared memory (the
//! step and its errno), as `posix_spawn` does: the parent reads it once it resumes.
//!
//! A sweep starts the same program thousands of times, so what costs a system call per job
//! and rarely changes is kept for a second ([`TTL`]): the program's place in `PATH` (one
//! `statx` per `PATH` entry before the hit), and which signals the worker handles or ignores
//! (one `rt_sigaction` per signal in the child otherwise). The child's stack is reused per
//! thread, and `/dev/null` (every job's stdin) stays open.
//!
//! The exit is awaited through a pidfd (Linux 5.3); where there is none, by polling.
//!
//! The child also makes the job's output directory ([`Spawn::mkdir`], see
//! [`crate::outputs`]) after it has taken the job's user and before it execs: so the
//! directories belong to that user and a link in their path is followed with that user's
//! rights only, never root's. One `mkdir` of the innermost directory in the common case; its
//! parents only when it says they are missing. A directory it cannot make does not stop the
//! job (a job user that may not write the project can still run jobs that write nothing
//! there): [`Process::output_error`] says why.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::libc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What to start.
#[derive(Debug)]
pub struct Spawn<'a> {
    pub argv: &'a [String],
    /// What the job inherits (see [`crate::job_env`]): never the worker's whole environment.
    pub inherit: &'a [(OsString, OsString)],
    /// Added to (and overriding) `inherit`.
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// Run as this `(uid, gid)` instead of the worker's user (a worker started as root runs
    /// jobs as the project's owner); `None`: the worker's own.
    pub user: Option<(u32, u32)>,
    /// Directories to make (mode 0700, as the job's user) before the exec, outermost first;
    /// one that exists is fine, and one that cannot be made is reported in
    /// [`Process::output_error`]. Empty: none.
    pub mkdir: &'a [PathBuf],
}

/// A started process, the leader of its own process group, with its output pipes.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    /// Why the directories of [`Spawn::mkdir`] could not be made (the process runs anyway).
    pub output_error: Option<io::Error>,
    /// The read ends of its stdout and stderr, until taken.
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pidfd: Option<OwnedFd>,
    reaped: bool,
}

/// Why a start failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnFailure {
    /// The child could not change into the working directory.
    #[error("cannot change into the working directory: {0}")]
    Workdir(#[source] io::Error),
    /// Anything else: the program's lookup or `exec` (`ENOENT`, `EACCES`...), or the system
    /// (`EAGAIN`, `EMFILE`...).
    #[error(transparent)]
    Start(io::Error),
}

impl From<io::Error> for SpawnFailure {
    fn from(e: io::Error) -> Self {
        SpawnFailure::Start(e)
    }
}

/// Everything the child reads, prepared by the parent, and where it reports a failure.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// Directories to make, outermost first, and how many.
    mkdirs: *const *const libc::c_char,
    mkdirs_len: usize,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// `(uid, gid)` to switch to, or `(-1, -1)`.
    uid: libc::c_long,
    gid: libc::c_long,
    parent: libc::pid_t,
    mask: libc::sigset_t,
    /// Bit `n - 1` set: signal `n` has a handler or is ignored, and is reset in the child.
    reset: u64,
    /// Written by the child before it exits on a failure: the step ([`STEP_SETUP`],
    /// [`STEP_CHDIR`], [`STEP_EXEC`]; 0 while none failed) and its errno.
    failed_step: AtomicI32,
    errno: AtomicI32,
    /// The errno of the `mkdir` that failed, when one did (the child goes on); 0: none.
    mkdir_errno: AtomicI32,
}

const STEP_SETUP: i32 = 1;
const STEP_CHDIR: i32 = 2;
const STEP_EXEC: i32 = 3;

const CHILD_STACK: usize = 64 * 1024;

/// How long a program's place in `PATH` and the worker's signal dispositions are reused.
pub const TTL: Duration = Duration::from_secs(1);

thread_local! {
    /// The child's stack, reused by the next start from this thread (the thread is suspended
    /// while a child runs on it).
    static STACK: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Lookups of programs in `PATH`: (program, `PATH`, working directory) to the file found.
struct Lookups {
    since: Instant,
    found: HashMap<(String, OsString, PathBuf), PathBuf>,
}

static LOOKUPS: Mutex<Option<Lookups>> = Mutex::new(None);

/// The signals with a handler or ignored, as [`ChildArgs::reset`], and when they were read.
static DISPOSITIONS: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

/// Every job's stdin.
static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();

/// Starts the process. The program is looked up in the job's `PATH` (or the worker's) when it
/// has no `/`; a relative path is relative to `cwd`.
///
/// # Errors
/// [`SpawnFailure::Workdir`] with the `chdir` error for a bad directory; otherwise the OS error
/// of the step that failed: `ENOENT` for a program that is not found, `EACCES` for one that
/// cannot be executed.
pub fn spawn(spec: &Spawn<'_>) -> Result<Process, SpawnFailure> {
    let program = spec
        .argv
        .first()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    // What the job inherits, then its own; a later value of a name replaces an earlier.
    let mut env: Vec<(OsString, OsString)> = spec.inherit.to_vec();
    for (k, v) in spec.env {
        match env.iter_mut().find(|(n, _)| n.as_os_str() == OsStr::new(k)) {
            Some(slot) => slot.1 = OsString::from(v),
            None => env.push((OsString::from(k), OsString::from(v))),
        }
    }
    let search = env.iter().find(|(k, _)| k == "PATH").map_or_else(
        || OsString::from("/usr/local/bin:/usr/bin:/bin"),
        |(_, v)| v.clone(),
    );
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let envs: Vec<CString> = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstr(&kv)
        })
        .collect::<io::Result<_>>()?;
    let cwd = cstr(spec.cwd.as_os_str().as_bytes())?;
    let mkdirs: Vec<CString> = spec
        .mkdir
        .iter()
        .map(|d| cstr(d.as_os_str().as_bytes()))
        .collect::<io::Result<_>>()?;
    let mkdir_ptrs: Vec<*const libc::c_char> = mkdirs.iter().map(|d| d.as_ptr()).collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let stdin = dev_null()?;

    // A program found a moment ago is started from there; if it is no longer there (or no
    // longer executable), it is looked up again once.
    let (path, cached) = lookup(program, &search, spec.cwd)?;
    let prepared = Prepared {
        argv: &argv_ptrs,
        envp: &env_ptrs,
        cwd: &cwd,
        mkdirs: &mkdir_ptrs,
        stdin,
        user: spec.user,
    };
    let started = start(&path, &prepared);
    match started {
        Err(SpawnFailure::Start(e)) if cached && lookup_may_be_stale(&e) => {
            forget(program, &search, spec.cwd);
            let (path, _) = lookup(program, &search, spec.cwd)?;
            start(&path, &prepared)
        }
        other => other,
    }
}

fn lookup_may_be_stale(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::EACCES | libc::ENOEXEC)
    )
}

/// What [`start`] hands the child, prepared once per spawn.
struct Prepared<'a> {
    /// Null-terminated.
    argv: &'a [*const libc::c_char],
    /// Null-terminated.
    envp: &'a [*const libc::c_char],
    cwd: &'a CString,
    /// Not null-terminated.
    mkdirs: &'a [*const libc::c_char],
    stdin: RawFd,
    user: Option<(u32, u32)>,
}

/// The clone and exec, with prepared arguments.
fn start(path: &Path, prepared: &Prepared<'_>) -> Result<Process, SpawnFailure> {
    let Prepared {
        argv,
        envp,
        cwd,
        mkdirs,
        stdin,
        user,
    } = *prepared;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        mkdirs: mkdirs.as_ptr(),
        mkdirs_len: mkdirs.len(),
        stdin,
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        uid: user.map_or(-1, |(u, _)| libc::c_long::from(u)),
        gid: user.map_or(-1, |(_, g)| libc::c_long::from(g)),
        parent: std::process::id() as libc::pid_t,
        // SAFETY: a plain C struct; filled in below by pthread_sigmask.
        mask: unsafe { std::mem::zeroed() },
        reset: handled_signals(),
        failed_step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
        mkdir_errno: AtomicI32::new(0),
    };
    let mut stack = STACK
        .take()
        .unwrap_or_else(|| vec![0u8; CHILD_STACK].into_boxed_slice());
    let pid = {
        // SAFETY: sigfillset and pthread_sigmask write only into the sets given.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.mask);
        }
        // The stack grows down: pass its top, 16-byte aligned.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
        // SAFETY: the child runs `child_main` on `stack` with `args`, both alive until the
        // parent resumes (CLONE_VFORK: after the child's exec or exit).
        let pid = unsafe {
            libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw mut args).cast::<libc::c_void>(),
            )
        };
        let err = io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
        }
        STACK.set(Some(stack));
        if pid < 0 {
            return Err(err.into());
        }
        pid
    };
    drop((out_w, err_w));
    // The child has exec'd or exited; if it failed, it said where before exiting.
    let step = args.failed_step.load(Ordering::SeqCst);
    if step != 0 {
        // It has exited: reap it.
        let _ = waitpid(pid, 0);
        let e = io::Error::from_raw_os_error(args.errno.load(Ordering::SeqCst));
        return Err(match step {
            STEP_CHDIR => SpawnFailure::Workdir(e),
            _ => SpawnFailure::Start(e),
        });
    }
    // SAFETY: pidfd_open on our own unreaped child.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    Ok(Process {
        pid,
        stdout: Some(out_r),
        stderr: Some(err_r),
        pidfd,
        reaped: false,
        output_error: match args.mkdir_errno.load(Ordering::SeqCst) {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        },
    })
}

/// The child, between clone and exec: raw system calls on prepared data only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent waits for the exec.
    let a = unsafe { &*(arg as *const ChildArgs) };
    let fail = |step: i32| -> ! {
        // SAFETY: errno of this thread into the parent's memory (shared until exec), then _exit.
        unsafe {
            a.errno.store(*libc::__errno_location(), Ordering::SeqCst);
            a.failed_step.store(step, Ordering::SeqCst);
            libc::_exit(127)
        }
    };
    // SAFETY: raw system calls on the child's own state; see the module docs.
    unsafe {
        // Every handled or ignored signal to its default: handlers inherited from the worker
        // would run on its memory, and a job starts clean (the worker ignores SIGPIPE, as Rust
        // programs do). A raw rt_sigaction: glibc's wrapper refuses its own internal signals.
        // An all-zero kernel sigaction is SIG_DFL with no flags and an empty mask on every
        // architecture.
        let default_action = [0u64; 4];
        for sig in 1..=64 {
            if a.reset & (1u64 << (sig - 1)) != 0 {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default_action.as_ptr(),
                    std::ptr::null_mut::<libc::c_void>(),
                    8usize,
                );
            }
        }
        // Another user: raw system calls, which change this task's credentials only (glibc's
        // wrappers would signal every thread of the worker, whose memory this child shares).
        // Before the parent-death signal, which a change of credentials clears.
        if a.uid >= 0 {
            let groups = [a.gid as libc::gid_t];
            if libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, a.gid, a.gid, a.gid) != 0
                || libc::syscall(libc::SYS_setresuid, a.uid, a.uid, a.uid) != 0
            {
                fail(STEP_SETUP);
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(STEP_SETUP);
        }
        // The worker died before the prctl: the signal will never come.
        if libc::getppid() != a.parent {
            *libc::__errno_location() = libc::ESRCH;
            fail(STEP_SETUP);
        }
        if libc::setpgid(0, 0) != 0
            || libc::dup2(a.stdin, 0) < 0
            || libc::dup2(a.stdout, 1) < 0
            || libc::dup2(a.stderr, 2) < 0
        {
            fail(STEP_SETUP);
        }
        // The output directory, as the job's user: the innermost first, its parents only
        // when it says they are missing. A failure is noted, not fatal.
        if a.mkdirs_len > 0 {
            let leaf = *a.mkdirs.add(a.mkdirs_len - 1);
            if libc::mkdir(leaf, 0o700) != 0 {
                match *libc::__errno_location() {
                    libc::EEXIST => {}
                    libc::ENOENT => {
                        for i in 0..a.mkdirs_len {
                            if libc::mkdir(*a.mkdirs.add(i), 0o700) != 0
                                && *libc::__errno_location() != libc::EEXIST
                            {
                                a.mkdir_errno
                                    .store(*libc::__errno_location(), Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                    errno => a.mkdir_errno.store(errno, Ordering::SeqCst),
                }
            }
        }
        if libc::chdir(a.cwd) != 0 {
            fail(STEP_CHDIR);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        fail(STEP_EXEC)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `/dev/null`, opened once (close-on-exec; the child's `dup2` onto 0 clears that).
fn dev_null() -> io::Result<RawFd> {
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let file = std::fs::File::open("/dev/null")?;
    // Two threads may open it at once: one copy stays, the other closes.
    Ok(DEV_NULL.get_or_init(|| file.into()).as_raw_fd())
}

/// The signals the worker handles or ignores, read again when older than [`TTL`] (the worker
/// installs its handlers at start; one installed later is seen within a second).
fn handled_signals() -> u64 {
    let mut cached = DISPOSITIONS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((since, set)) = *cached
        && since.elapsed() < TTL
    {
        return set;
    }
    let mut set = 0u64;
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // The kernel's sigaction: the handler comes first (0 is SIG_DFL).
        let mut old = [0u64; 4];
        // SAFETY: reads signal `sig`'s disposition into a local buffer large enough for the
        // kernel's struct.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<libc::c_void>(),
                old.as_mut_ptr(),
                8usize,
            )
        };
        // Unreadable: reset it anyway, as before this cache.
        if r != 0 || old[0] != 0 {
            set |= 1u64 << (sig - 1);
        }
    }
    *cached = Some((Instant::now(), set));
    set
}

/// `execvp`'s lookup, remembered for [`TTL`]: a name with a `/` is used as is; otherwise the
/// first executable file of that name in `search` (relative entries relative to `cwd`). Also
/// says whether the answer came from memory.
fn lookup(program: &str, search: &OsStr, cwd: &Path) -> io::Result<(PathBuf, bool)> {
    if program.contains('/') {
        return Ok((PathBuf::from(program), false));
    }
    let key = (program.to_owned(), search.to_owned(), cwd.to_owned());
    {
        let mut lookups = LOOKUPS.lock().unwrap_or_else(PoisonError::into_inner);
        match lookups.as_mut() {
            Some(l) if l.since.elapsed() < TTL => {
                if let Some(path) = l.found.get(&key) {
                    return Ok((path.clone(), true));
                }
            }
            _ => {
                *lookups = Some(Lookups {
                    since: Instant::now(),
                    found: HashMap::new(),
                });
            }
        }
    }
    let path = resolve(program, search, cwd)?;
    let mut lookups = LOOKUPS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(l) = lookups.as_mut()
        && l.found.len() < 1024
    {
        l.found.insert(key, path.clone());
    }
    Ok((path, false))
}

fn forget(program: &str, search: &OsStr, cwd: &Path) {
    let key = (program.to_owned(), search.to_owned(), cwd.to_owned());
    if let Some(l) = LOOKUPS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        l.found.remove(&key);
    }
}

/// `execvp`'s lookup of a name without a `/`: the first executable file of that name in
/// `search` (relative entries relative to `cwd`).
fn resolve(program: &str, search: &OsStr, cwd: &Path) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let mut denied = false;
    for dir in std::env::split_paths(search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = cwd.join(dir).join(program);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
        denied = true;
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// `waitpid` for our own child, retried on `EINTR`; `None` while it runs (with `WNOHANG`).
fn waitpid(pid: i32, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Ok(Some(ExitStatus::from_raw(status)));
        }
        if r == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl Process {
    /// Waits for the process to exit and reaps it.
    ///
    /// # Errors
    /// Only when the process cannot be waited for (it is not our child).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let flags = match self.pidfd.take() {
            Some(fd) => {
                // SAFETY: an OwnedFd: the descriptor stays open and the same while the
                // AsyncFd owns it.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(io::Error::from)?;
                // Readable once the process has exited: the wait below returns at once.
                let _ = fd.readable().await?;
                0
            }
            // No pidfd (Linux before 5.3): poll.
            None => libc::WNOHANG,
        };
        loop {
            if let Some(status) = self.reap(flags)? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        let status = waitpid(self.pid, flags)?;
        self.reaped |= status.is_some();
        Ok(status)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.reaped {
            // Never leave a zombie: kill and reap (the process group is the runner's concern).
            // SAFETY: signals our own unreaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = waitpid(self.pid, 0);
        }
    }
}
