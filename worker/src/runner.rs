//! Runs one job as a subprocess: spawns it in its own process group, streams its output line by
//! line, enforces the wall-clock timeout and the agent's kill requests (SIGTERM to the group, SIGKILL
//! after a grace period), makes sure nothing of the job outlives it, and reads the JSON object the
//! job left in `GRIDQ_RESULT` and the list of files it left in its output directory,
//! `GRIDQ_OUTPUT` (see [`crate::outputs`]).
//!
//! # Process lifetime
//! - The job is the leader of a new process group, so every signal goes to the whole group
//!   (`killpg`), and once the main process has exited, whatever is left of the group is SIGKILLed.
//!   A process that leaves the group (`setsid`, a double fork into a new group) escapes this; the
//!   runner then stops waiting for the output pipes it may hold 2 s after the main process exited.
//! - The main process gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies if the worker is SIGKILLed.
//!   The kernel ties that signal to the *thread* that started the child, not to the process: a
//!   job started from a short-lived thread (a `spawn_blocking` thread, a worker thread after
//!   `block_in_place`) would be killed when that thread exits. So every job is started from a
//!   thread that lives as long as the worker process: the main thread, where the worker's
//!   runtime runs, or else one dedicated spawner thread; by [`crate::spawn`] (a
//!   `posix_spawn`-like clone that can still set the signal). Caveats: only the main
//!   process gets the signal, so its own children in the group survive a SIGKILLed worker (run
//!   the worker as the init of a container or PID namespace to get those too), and the kernel
//!   clears the setting when the job execs a set-user-ID or file-capability binary.
//! - The job starts with every signal at its default disposition and none blocked.
//! - Dropping the process SIGKILLs and reaps it, and if the supervising task is dropped
//!   (runtime shutdown) before the job was reaped, the whole group is SIGKILLed.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::outputs::{OUTPUT_ENV, OutputDir};
use crate::spawn;
use gridq_common::wire::OutputListing;

/// Which stream an output line came from (the wire type, so lines pass through unchanged).
pub use gridq_common::wire::Stream;

/// Output lines longer than this many bytes are delivered in pieces of at most this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// The largest `GRIDQ_RESULT` file that is read.
pub const MAX_RESULT_BYTES: u64 = 1024 * 1024;
/// The name of the environment variable that tells the job where to write its result.
pub const RESULT_ENV: &str = "GRIDQ_RESULT";

/// How long after the main process exited the output pipes may stay open before the runner stops
/// waiting for their end (a process that escaped the group can hold them forever).
const EOF_WAIT: Duration = Duration::from_secs(2);
/// After giving up on a pipe, what is already in it is still read (it was written by processes
/// that are dead now), as long as each read completes within this time...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...and up to this many bytes (the largest pipe buffer an unprivileged process can ask for), so
/// that an escaped process writing without end cannot keep the runner busy.
const DRAIN_LIMIT: usize = 1024 * 1024;
const READ_CHUNK: usize = 64 * 1024;
/// The first read of each stream: enough for most jobs' whole output.
const FIRST_READ_CHUNK: usize = 4 * 1024;

/// Whether a job's output directory could not be made before (said loudly once per worker).
static OUTPUT_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What to run, and how.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `argv[0]` is the program, looked up on `PATH`; each element is passed as one argument,
    /// exactly, never through a shell.
    pub argv: Vec<String>,
    /// What the job inherits from the worker: [`crate::job_env::inherited`], never the worker's
    /// whole environment (it holds the broker's credentials).
    pub inherit: Arc<[(OsString, OsString)]>,
    /// Added on top of `inherit`; later entries win.
    pub env: Vec<(String, String)>,
    /// The job's working directory.
    pub workdir: PathBuf,
    /// Wall-clock limit, counted from the spawn.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL, for timeouts and kills.
    pub grace: Duration,
    /// Exported to the job as `GRIDQ_RESULT` (made absolute; a relative path is taken relative to
    /// `workdir`). Removed before the spawn if it exists.
    pub result_path: PathBuf,
    /// Run as this `(uid, gid)` instead of the worker's user.
    pub user: Option<(u32, u32)>,
    /// The job's output directory: made (as the job's user) before it starts, exported as
    /// `GRIDQ_OUTPUT`, and listed when it has ended. `None`: no output directory.
    pub output: Option<OutputDir>,
}

/// One line of the job's output, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: Stream,
    pub line: String,
    /// Unix time in milliseconds when the line was read.
    pub ts_ms: u64,
}

/// Why the agent killed a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KillReason {
    Canceled,
    Shutdown,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The main process exited by itself with this code.
    Exited { code: i32 },
    /// The main process died of a signal that the runner did not send.
    Signaled { signal: i32 },
    /// The timeout fired; the group got SIGTERM, then SIGKILL if it outlived the grace period.
    TimedOut,
    /// The agent asked for it through a [`Killer`]. A kill and a timeout: the first one wins.
    Killed { reason: KillReason },
    /// The exit status could not be obtained (`waitpid` failed, e.g. because something else in the
    /// worker reaped the child, or the runtime shut down under the job). The group was SIGKILLed.
    Unknown { error: String },
}

/// Everything known about a finished job.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub termination: Termination,
    pub started_at: SystemTime,
    /// From the spawn to the main process's exit (not counting the output drain).
    pub duration: Duration,
    /// The JSON object the job wrote to `GRIDQ_RESULT`.
    pub result: Option<Map<String, Value>>,
    /// Why a `GRIDQ_RESULT` file was ignored; not a failure of the job itself.
    pub result_error: Option<String>,
    /// What the job left in its output directory, when it has one and it is there.
    pub outputs: Option<OutputListing>,
    /// Why the output directory could not be made (the job ran without it: `GRIDQ_OUTPUT`
    /// names a directory that is not there).
    pub output_error: Option<String>,
    pub pid: u32,
}

/// Why a job could not be started. Only [`SpawnError::is_retryable`] ones are worth trying again:
/// the others come from the job's spec or the worker's setup and fail the same way every time.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the job's argv is empty")]
    EmptyArgv,
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("invalid environment variable name {name:?}: it must be non-empty and contain no '='")]
    InvalidEnvName { name: String },
    #[error("cannot use {} as the working directory of `{program}`: {source}", .dir.display())]
    Workdir {
        program: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the old result file {} of `{program}`: {source}", .path.display())]
    ResultPath {
        program: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no output directory for `{program}`: {reason}")]
    OutputName { program: String, reason: String },
    #[error("program `{program}` not found: {source}")]
    ProgramNotFound {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("program `{program}` is not executable: {source}")]
    NotExecutable {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("a job can only be spawned inside a Tokio runtime")]
    NoRuntime,
}

impl SpawnError {
    /// Whether the same spawn may succeed later: the system was short of processes, memory or
    /// file descriptors.
    pub fn is_retryable(&self) -> bool {
        match self {
            SpawnError::Spawn { source, .. } => matches!(
                source.raw_os_error().map(Errno::from_raw),
                Some(Errno::EAGAIN | Errno::ENOMEM | Errno::EMFILE | Errno::ENFILE)
            ),
            _ => false,
        }
    }
}

/// Asks a running job to stop. Cheap to clone; usable from any thread, with or without a runtime.
#[derive(Debug, Clone)]
pub struct Killer {
    request: Arc<watch::Sender<Option<KillReason>>>,
}

impl Killer {
    /// Starts SIGTERM to the job's process group, then SIGKILL after the grace period. Idempotent:
    /// only the first request (or the timeout, if it fired first) counts, and a request after the
    /// job ended does nothing.
    pub fn kill(&self, reason: KillReason) {
        self.request.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// Kills the job when the [`RunningJob`] (or its unfinished `wait`) is dropped, like `kill_on_drop`.
#[derive(Debug)]
struct KillOnDrop(Killer);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill(KillReason::Shutdown);
    }
}

/// A job that was started. Dropping it without [`RunningJob::wait`] kills the job (SIGTERM, then
/// SIGKILL after the grace period); the runner still reaps it and cleans up its group.
#[derive(Debug)]
pub struct RunningJob {
    pid: u32,
    started_at: SystemTime,
    start: Instant,
    killer: Killer,
    supervisor: JoinHandle<Outcome>,
    _kill_on_drop: KillOnDrop,
}

impl RunningJob {
    /// Spawns the job. Output lines are sent to `output` as they are read; when the channel is
    /// full the runner waits (the job then blocks on its pipes), it never drops lines. Keep
    /// receiving while awaiting [`RunningJob::wait`]. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// A [`SpawnError`] naming the program or directory and the OS error: empty argv, NUL bytes,
    /// a bad environment variable name, an unusable working directory, a stale result file that
    /// cannot be removed, a program that is not found or not executable.
    pub fn spawn(
        spec: JobSpec,
        output: mpsc::Sender<OutputLine>,
    ) -> Result<RunningJob, SpawnError> {
        let runtime = Handle::try_current().map_err(|_| SpawnError::NoRuntime)?;
        let program = validate(&spec)?;
        let result_path =
            std::path::absolute(spec.workdir.join(&spec.result_path)).map_err(|source| {
                SpawnError::ResultPath {
                    program: program.clone(),
                    path: spec.result_path.clone(),
                    source,
                }
            })?;
        match std::fs::remove_file(&result_path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                // A result path inside a working directory that is not one: name the directory.
                if let Err(source) = check_workdir(&spec.workdir) {
                    return Err(SpawnError::Workdir {
                        program,
                        dir: spec.workdir.clone(),
                        source,
                    });
                }
                return Err(SpawnError::ResultPath {
                    program,
                    path: result_path,
                    source: err,
                });
            }
            _ => {}
        }

        let mut env = spec.env.clone();
        env.push((
            RESULT_ENV.to_owned(),
            result_path.to_string_lossy().into_owned(),
        ));
        let mut mkdir = Vec::new();
        if let Some(output) = &spec.output {
            output.check().map_err(|reason| SpawnError::OutputName {
                program: program.clone(),
                reason,
            })?;
            env.push((
                OUTPUT_ENV.to_owned(),
                output.path().to_string_lossy().into_owned(),
            ));
            mkdir = output.to_make();
        }
        let started_at = SystemTime::now();
        let start = Instant::now();
        let mut child = spawn_from_lasting_thread(
            spec.argv.clone(),
            spec.inherit.clone(),
            env,
            spec.workdir.clone(),
            spec.user,
            mkdir,
        )
        .map_err(|failure| {
            // The child may have made the output directory before it failed: a job that never
            // ran leaves no empty one behind (a misspelt program would leave one per job).
            if let Some(output) = &spec.output {
                let _ = crate::outputs::list(output);
            }
            match failure {
                // The child's chdir failed, before its exec.
                spawn::SpawnFailure::Workdir(source) => SpawnError::Workdir {
                    program: program.clone(),
                    dir: spec.workdir.clone(),
                    source,
                },
                spawn::SpawnFailure::Start(err) => classify(program.clone(), err),
            }
        })?;
        // Dropping `child` on these error paths SIGKILLs and reaps it.
        let (pid, pgid) = match (u32::try_from(child.pid), child.pid) {
            (Ok(pid), raw) if raw > 1 => (pid, Pid::from_raw(raw)),
            _ => {
                return Err(SpawnError::Spawn {
                    program,
                    source: io::Error::other("the spawned process has no usable pid"),
                });
            }
        };
        let pipes = match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => reader_pipe(out).and_then(|o| Ok((o, reader_pipe(err)?))),
            _ => Err(io::Error::other("the output pipes are gone")),
        };
        let (stdout_pipe, stderr_pipe) = pipes.map_err(|source| SpawnError::Spawn {
            program: program.clone(),
            source,
        })?;

        let mut output_dir = spec.output;
        let output_error = child.output_error.take().map(|e| {
            let dir = output_dir.take().map(|o| o.path()).unwrap_or_default();
            let why = format!("cannot make the output directory {}: {e}", dir.display());
            // Every job of the worker would say the same: loud once, then quiet.
            if OUTPUT_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(why = %why, "the job runs without its output directory");
            } else {
                tracing::warn!(
                    why = %why,
                    "jobs run without their output directory (GRIDQ_OUTPUT) where it cannot be made; does the job's user own the project directory? (this is said once)"
                );
            }
            why
        });
        let span = tracing::debug_span!("job_process", pid, program = %program);
        let stop_reading = CancellationToken::new();
        let stdout = spawn_reader(
            &runtime,
            stdout_pipe,
            Stream::Stdout,
            output.clone(),
            stop_reading.clone(),
            span.clone(),
        );
        let stderr = spawn_reader(
            &runtime,
            stderr_pipe,
            Stream::Stderr,
            output,
            stop_reading.clone(),
            span.clone(),
        );

        let (request, requests) = watch::channel(None);
        let killer = Killer {
            request: Arc::new(request),
        };
        tracing::debug!(parent: &span, "job started");
        let supervisor = runtime.spawn(
            supervise(
                child,
                Supervision {
                    pid,
                    pgid,
                    started_at,
                    start,
                    deadline: spec.timeout.and_then(|t| start.checked_add(t)),
                    grace: spec.grace,
                    requests,
                    readers: [stdout, stderr],
                    stop_reading,
                    result_path,
                    output: output_dir,
                    output_error,
                },
            )
            .instrument(span),
        );
        Ok(RunningJob {
            pid,
            started_at,
            start,
            killer: killer.clone(),
            supervisor,
            _kill_on_drop: KillOnDrop(killer),
        })
    }

    /// The main process's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that can kill the job while someone else waits for it.
    pub fn killer(&self) -> Killer {
        self.killer.clone()
    }

    /// Resolves once the main process has exited, the rest of its group is killed, the output is
    /// drained into the channel and the result file is read.
    pub async fn wait(self) -> Outcome {
        let RunningJob {
            pid,
            started_at,
            start,
            supervisor,
            _kill_on_drop,
            ..
        } = self;
        match supervisor.await {
            Ok(outcome) => outcome,
            // Only when the runtime shuts down under the job (the supervisor never panics); its
            // drop guard has SIGKILLed the group.
            Err(err) => Outcome {
                termination: Termination::Unknown {
                    error: format!("the job's supervisor stopped: {err}"),
                },
                started_at,
                duration: start.elapsed(),
                result: None,
                result_error: None,
                outputs: None,
                output_error: None,
                pid,
            },
        }
    }
}

fn validate(spec: &JobSpec) -> Result<String, SpawnError> {
    let program = spec.argv.first().ok_or(SpawnError::EmptyArgv)?.clone();
    if program.contains('\0') {
        return Err(SpawnError::Nul {
            what: format!("the program name {program:?}"),
        });
    }
    if let Some(i) = spec.argv.iter().position(|arg| arg.contains('\0')) {
        return Err(SpawnError::Nul {
            what: format!("argument {i} of `{program}`"),
        });
    }
    for (name, value) in &spec.env {
        if name.contains('\0') || value.contains('\0') {
            return Err(SpawnError::Nul {
                what: format!("environment variable {name:?} of `{program}`"),
            });
        }
        if name.is_empty() || name.contains('=') {
            return Err(SpawnError::InvalidEnvName { name: name.clone() });
        }
    }
    if spec.workdir.as_os_str().as_encoded_bytes().contains(&0)
        || spec.result_path.as_os_str().as_encoded_bytes().contains(&0)
    {
        return Err(SpawnError::Nul {
            what: format!("the working directory or result path of `{program}`"),
        });
    }
    Ok(program)
}

/// Only on an error path: the child's failed `chdir` names a bad directory on its own.
fn check_workdir(dir: &Path) -> io::Result<()> {
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(Errno::ENOTDIR.into());
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::X_OK)?;
    Ok(())
}

fn classify(program: String, source: io::Error) -> SpawnError {
    match source.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT | Errno::ENOTDIR) => SpawnError::ProgramNotFound { program, source },
        Some(Errno::EACCES | Errno::ENOEXEC | Errno::EISDIR) => {
            SpawnError::NotExecutable { program, source }
        }
        _ => SpawnError::Spawn { program, source },
    }
}

/// The read end of an output pipe, non-blocking, registered with the runtime. It is known to
/// be the read end of a fresh pipe with no status flags, so one `fcntl` sets it non-blocking
/// (Tokio's checked constructor would `fstat` it and read its flags first).
fn reader_pipe(fd: std::os::fd::OwnedFd) -> io::Result<tokio::net::unix::pipe::Receiver> {
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd)
}

type SpawnRequest = Box<dyn FnOnce() + Send>;

/// The long-lived thread every job is started from, because PDEATHSIG follows the thread that
/// started the process.
static SPAWNER: Mutex<Option<std_mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Whether the calling thread is the process's main thread, which lives as long as the
/// process does.
fn on_main_thread() -> bool {
    thread_local! {
        static MAIN: bool = nix::unistd::gettid() == nix::unistd::getpid();
    }
    MAIN.with(|main| *main)
}

/// Starts a job from a thread that outlives it: the calling thread when it is the main thread
/// (the worker's runtime runs there: no hand-off, two thread switches less per job), else the
/// spawner thread. Either way the caller waits for the clone and exec.
fn spawn_from_lasting_thread(
    argv: Vec<String>,
    inherit: Arc<[(OsString, OsString)]>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    user: Option<(u32, u32)>,
    mkdir: Vec<PathBuf>,
) -> Result<spawn::Process, spawn::SpawnFailure> {
    if on_main_thread() {
        return spawn::spawn(&spawn::Spawn {
            argv: &argv,
            inherit: &inherit,
            env: &env,
            cwd: &cwd,
            user,
            mkdir: &mkdir,
        });
    }
    let gone = || spawn::SpawnFailure::Start(io::Error::other("the job spawner thread is gone"));
    let (reply, replies) = std_mpsc::sync_channel(1);
    let request: SpawnRequest = Box::new(move || {
        let _ = reply.send(spawn::spawn(&spawn::Spawn {
            argv: &argv,
            inherit: &inherit,
            env: &env,
            cwd: &cwd,
            user,
            mkdir: &mkdir,
        }));
    });
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        let requests = match spawner.as_ref() {
            Some(requests) => requests,
            None => {
                let (requests, incoming) = std_mpsc::channel::<SpawnRequest>();
                std::thread::Builder::new()
                    .name("gridq-job-spawner".into())
                    .spawn(move || {
                        while let Ok(request) = incoming.recv() {
                            request();
                        }
                    })?;
                &*spawner.insert(requests)
            }
        };
        if requests.send(request).is_err() {
            *spawner = None;
            return Err(gone());
        }
    }
    // Blocks for as long as the clone and exec take, like a direct spawn.
    replies.recv().map_err(|_| gone())?
}

struct Supervision {
    pid: u32,
    pgid: Pid,
    started_at: SystemTime,
    start: Instant,
    deadline: Option<Instant>,
    grace: Duration,
    requests: watch::Receiver<Option<KillReason>>,
    readers: [Reader; 2],
    stop_reading: CancellationToken,
    result_path: PathBuf,
    output: Option<OutputDir>,
    output_error: Option<String>,
}

/// SIGKILLs the group if the supervisor is dropped before the main process was reaped (while it
/// is unreaped, its pid cannot name another group).
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            signal_group(pgid, Signal::SIGKILL);
        }
    }
}

async fn supervise(mut child: spawn::Process, mut job: Supervision) -> Outcome {
    // Declared after `child`'s binding, so dropped before it: the group dies before the reap.
    let mut guard = GroupGuard(Some(job.pgid));
    let mut cause: Option<Termination> = None;
    let mut sigkill_at: Option<Instant> = None;
    let mut requests_open = true;
    let status = {
        let wait = child.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                status = &mut wait => break status,
                changed = job.requests.changed(), if requests_open && cause.is_none() => {
                    match changed.map(|()| *job.requests.borrow_and_update()) {
                        Ok(Some(reason)) => {
                            tracing::info!(?reason, "killing job");
                            cause = Some(Termination::Killed { reason });
                            sigkill_at = terminate(job.pgid, job.grace);
                        }
                        Ok(None) => {}
                        Err(_) => requests_open = false,
                    }
                }
                () = sleep_until(job.deadline), if cause.is_none() => {
                    tracing::info!("job timed out");
                    cause = Some(Termination::TimedOut);
                    sigkill_at = terminate(job.pgid, job.grace);
                }
                () = sleep_until(sigkill_at), if sigkill_at.is_some() => {
                    tracing::info!("job outlived its grace period, sending SIGKILL");
                    signal_group(job.pgid, Signal::SIGKILL);
                    sigkill_at = None;
                }
            }
        }
    };
    let duration = job.start.elapsed();
    // No orphans: whatever is left of the group goes too, whatever way the main process ended.
    signal_group(job.pgid, Signal::SIGKILL);
    guard.0 = None;

    let termination = match (cause, status) {
        (Some(cause), _) => cause,
        (None, status) => termination_of(status),
    };
    tracing::debug!(?termination, "job exited");

    let [stdout, stderr] = job.readers;
    let both_ended = async {
        // An error only means the reader is gone, which also ends the wait.
        let _ = stdout.eof.await;
        let _ = stderr.eof.await;
    };
    if tokio::time::timeout(EOF_WAIT, both_ended).await.is_err() {
        tracing::warn!(
            "the job's output pipes are still open after it exited (a process escaped its \
             process group?); no longer waiting for them"
        );
    }
    job.stop_reading.cancel();
    for task in [stdout.task, stderr.task] {
        if let Err(err) = task.await {
            tracing::warn!(cause = %err, "an output reader failed");
        }
    }

    let (result, result_error) = read_result(&job.result_path).await;
    // A walk of a directory tree may wait on the disk: off the runtime's threads.
    let outputs = match job.output {
        Some(dir) => tokio::task::spawn_blocking(move || crate::outputs::list(&dir))
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(cause = %err, "cannot list the job's output directory");
                None
            }),
        None => None,
    };
    Outcome {
        termination,
        started_at: job.started_at,
        duration,
        result,
        result_error,
        outputs,
        output_error: job.output_error,
        pid: job.pid,
    }
}

fn termination_of(status: io::Result<ExitStatus>) -> Termination {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Termination::Exited { code },
            (None, Some(signal)) => Termination::Signaled { signal },
            (None, None) => Termination::Unknown {
                error: format!("unexpected wait status: {status}"),
            },
        },
        Err(err) => {
            tracing::error!(cause = %err, "cannot get the job's exit status");
            Termination::Unknown {
                error: format!("cannot get the job's exit status: {err}"),
            }
        }
    }
}

/// SIGTERMs the group and says when to follow up with SIGKILL (never, for an absurd grace).
fn terminate(pgid: Pid, grace: Duration) -> Option<Instant> {
    signal_group(pgid, Signal::SIGTERM);
    Instant::now().checked_add(grace)
}

fn signal_group(pgid: Pid, signal: Signal) {
    // 0 and 1 would mean our own group and init's: never signal those.
    if pgid.as_raw() <= 1 {
        return;
    }
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => tracing::warn!(cause = %err, ?signal, "cannot signal the job's process group"),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Reader {
    /// Fires when the pipe reached its end (or the reader is gone).
    eof: oneshot::Receiver<()>,
    task: JoinHandle<()>,
}

fn spawn_reader<R>(
    runtime: &Handle,
    pipe: R,
    stream: Stream,
    output: mpsc::Sender<OutputLine>,
    stop: CancellationToken,
    span: tracing::Span,
) -> Reader
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (eof_tx, eof) = oneshot::channel();
    let task = runtime.spawn(
        async move {
            let sink = LineSink {
                stream,
                output,
                open: true,
            };
            read_lines(pipe, sink, stop, eof_tx).await;
        }
        .instrument(span),
    );
    Reader { eof, task }
}

/// Empties the read buffer for the next read, growing it to [`READ_CHUNK`] once a read filled
/// it. Reads go into its spare capacity, so nothing is zeroed: most jobs print little, and a
/// zeroed 64 KiB buffer per stream was a `memset` of 128 KiB per job.
fn next_read(buf: &mut Vec<u8>) {
    let filled = !buf.is_empty() && buf.len() == buf.capacity();
    buf.clear();
    if filled && buf.capacity() < READ_CHUNK {
        buf.reserve_exact(READ_CHUNK);
    }
}

/// Reads until the end of the pipe or until told to stop; then still delivers what the pipe holds
/// (bounded by [`DRAIN_IDLE`] and [`DRAIN_LIMIT`]), so a slow consumer loses nothing that the
/// job's processes wrote before they died.
async fn read_lines<R: AsyncRead + Unpin>(
    mut pipe: R,
    mut sink: LineSink,
    stop: CancellationToken,
    eof: oneshot::Sender<()>,
) {
    let mut assembler = LineAssembler::default();
    let mut lines = Vec::new();
    let mut buf = Vec::with_capacity(FIRST_READ_CHUNK);
    let mut eof = Some(eof);
    loop {
        next_read(&mut buf);
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = pipe.read_buf(&mut buf) => read,
        };
        match read {
            Ok(0) => {
                signal_eof(&mut eof);
                break;
            }
            Ok(n) => {
                assembler.push(&buf[..n], &mut lines);
                sink.send(&mut lines).await;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::warn!(cause = %err, stream = ?sink.stream, "cannot read the job's output");
                signal_eof(&mut eof);
                break;
            }
        }
    }
    if eof.is_some() {
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            next_read(&mut buf);
            match tokio::time::timeout(DRAIN_IDLE, pipe.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => {
                    drained += n;
                    assembler.push(&buf[..n], &mut lines);
                    sink.send(&mut lines).await;
                }
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => break,
            }
        }
    }
    assembler.finish(&mut lines);
    sink.send(&mut lines).await;
}

fn signal_eof(eof: &mut Option<oneshot::Sender<()>>) {
    if let Some(eof) = eof.take() {
        // The supervisor may have stopped listening; nothing to do then.
        let _ = eof.send(());
    }
}

struct LineSink {
    stream: Stream,
    output: mpsc::Sender<OutputLine>,
    /// Once the receiver is gone the lines are discarded, but the pipe is still read so the job
    /// does not block on it.
    open: bool,
}

impl LineSink {
    async fn send(&mut self, lines: &mut Vec<String>) {
        let ts_ms = unix_ms(SystemTime::now());
        for line in lines.drain(..) {
            if self.open {
                let line = OutputLine {
                    stream: self.stream,
                    line,
                    ts_ms,
                };
                if self.output.send(line).await.is_err() {
                    tracing::debug!("output receiver dropped; discarding the job's output");
                    self.open = false;
                }
            }
        }
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Turns a byte stream into lines: `\n` and `\r\n` stripped, invalid UTF-8 replaced by U+FFFD
/// (also across chunk boundaries), lines longer than [`MAX_LINE_BYTES`] cut on char boundaries.
#[derive(Debug, Default)]
struct LineAssembler {
    /// Bytes not decoded yet: at most an incomplete UTF-8 sequence between pushes.
    raw: Vec<u8>,
    /// The decoded part of the current line, at most [`MAX_LINE_BYTES`] (+ `\r`) between pushes.
    line: String,
}

impl LineAssembler {
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(newline) = data.iter().position(|&b| b == b'\n') {
            self.raw.extend_from_slice(&data[..newline]);
            data = &data[newline + 1..];
            self.decode(true);
            if self.line.ends_with('\r') {
                self.line.pop();
            }
            self.cut_while(out, |line| line.len() > MAX_LINE_BYTES);
            out.push(std::mem::take(&mut self.line));
        }
        self.raw.extend_from_slice(data);
        self.decode(false);
        // A trailing '\r' may be half of a "\r\n": it does not count yet.
        self.cut_while(out, |line| {
            line.len() - usize::from(line.ends_with('\r')) > MAX_LINE_BYTES
        });
    }

    /// Delivers a last line that has no newline.
    fn finish(&mut self, out: &mut Vec<String>) {
        self.decode(true);
        if !self.line.is_empty() {
            self.cut_while(out, |line| line.len() > MAX_LINE_BYTES);
            out.push(std::mem::take(&mut self.line));
        }
    }

    fn cut_while(&mut self, out: &mut Vec<String>, too_long: impl Fn(&str) -> bool) {
        while too_long(&self.line) {
            let mut at = MAX_LINE_BYTES;
            while !self.line.is_char_boundary(at) {
                at -= 1;
            }
            let rest = self.line.split_off(at);
            out.push(std::mem::replace(&mut self.line, rest));
        }
    }

    /// Moves `raw` into `line`; unless `complete`, an incomplete UTF-8 sequence at the end stays
    /// in `raw` for the next chunk.
    fn decode(&mut self, complete: bool) {
        let mut input = &self.raw[..];
        let consumed = loop {
            match std::str::from_utf8(input) {
                Ok(valid) => {
                    self.line.push_str(valid);
                    break self.raw.len();
                }
                Err(err) => {
                    let (valid, rest) = input.split_at(err.valid_up_to());
                    self.line.push_str(&String::from_utf8_lossy(valid));
                    match err.error_len() {
                        Some(len) => {
                            self.line.push(char::REPLACEMENT_CHARACTER);
                            input = &rest[len..];
                        }
                        None if complete => {
                            self.line.push(char::REPLACEMENT_CHARACTER);
                            break self.raw.len();
                        }
                        None => break self.raw.len() - rest.len(),
                    }
                }
            }
        };
        self.raw.drain(..consumed);
    }
}

async fn read_result(path: &Path) -> (Option<Map<String, Value>>, Option<String>) {
    match read_result_file(path).await {
        Ok(None) => (None, None),
        Ok(Some(map)) => (Some(map), None),
        Err(why) => {
            tracing::info!(why = %why, "ignoring the job's result file");
            (None, Some(why))
        }
    }
}

async fn read_result_file(path: &Path) -> Result<Option<Map<String, Value>>, String> {
    let cannot_read = |err: io::Error| {
        format!(
            "cannot read the {RESULT_ENV} file {}: {err}",
            path.display()
        )
    };
    // O_NONBLOCK: a job could leave a FIFO there, and opening it must not hang the worker.
    // Opened in place (an open of a local path does not wait on anything, and most jobs write
    // no result: no trip to the blocking pool); read through Tokio.
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Never through a link: the job may have put one there, to a file only the worker may read.
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW).bits())
        .open(path);
    let file = match file {
        Ok(file) => tokio::fs::File::from_std(file),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(cannot_read(err)),
    };
    let meta = file.metadata().await.map_err(cannot_read)?;
    if !meta.is_file() {
        return Err(format!("{RESULT_ENV} file is not a regular file"));
    }
    let too_large = |len: u64| format!("{RESULT_ENV} file is larger than 1 MiB ({len} bytes)");
    if meta.len() > MAX_RESULT_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RESULT_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_RESULT_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let not_object = |what: String| format!("{RESULT_ENV} file is not a JSON object: {what}");
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(Value::Array(_)) => Err(not_object("found an array".into())),
        Ok(Value::String(_)) => Err(not_object("found a string".into())),
        Ok(Value::Number(_)) => Err(not_object("found a number".into())),
        Ok(Value::Bool(_)) => Err(not_object("found a boolean".into())),
        Ok(Value::Null) => Err(not_object("found null".into())),
        Err(err) => Err(not_object(format!("invalid JSON ({err})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut assembler = LineAssembler::default();
        let mut out = Vec::new();
        for chunk in chunks {
            assembler.push(chunk, &mut out);
        }
        assembler.finish(&mut out);
        out
    }

    /// Feeds `data` one byte at a time, the worst case for every boundary.
    fn lines_bytewise(data: &[u8]) -> Vec<String> {
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        lines_of(&chunks)
    }

    #[test]
    fn splits_lines_and_strips_terminators() {
        let data = b"a\nb\r\n\nc\r\rd\r\nlast";
        let expected = ["a", "b", "", "c\r\rd", "last"];
        assert_eq!(lines_of(&[data]), expected);
        assert_eq!(lines_bytewise(data), expected);
        assert_eq!(lines_of(&[b"x\n"]), ["x"]);
        assert_eq!(lines_of(&[b""]), Vec::<String>::new());
        assert_eq!(lines_of(&[b"\n"]), [""]);
    }

    #[test]
    fn decodes_utf8_across_chunks_and_replaces_invalid_bytes() {
        let data = "é✓🎉\n".as_bytes();
        assert_eq!(lines_bytewise(data), ["é✓🎉"]);
        assert_eq!(lines_of(&[b"\xffab\xc3\n"]), ["\u{fffd}ab\u{fffd}"]);
        assert_eq!(lines_bytewise(b"\xffab\xc3\n"), ["\u{fffd}ab\u{fffd}"]);
        // An incomplete sequence at the very end of the stream.
        assert_eq!(lines_of(&[b"ab\xe2\x9c"]), ["ab\u{fffd}"]);
    }

    #[test]
    fn cuts_long_lines_on_char_boundaries() {
        let long = "x".repeat(MAX_LINE_BYTES * 2 + 5);
        let data = format!("{long}\n");
        let expected = [
            "x".repeat(MAX_LINE_BYTES),
            "x".repeat(MAX_LINE_BYTES),
            "x".repeat(5),
        ];
        assert_eq!(lines_of(&[data.as_bytes()]), expected);
        assert_eq!(lines_bytewise(data.as_bytes()), expected);

        // 'é' is two bytes; after the leading 'a' every char starts at an odd offset.
        let accents = format!("a{}", "é".repeat(40_000));
        for got in [
            lines_of(&[accents.as_bytes()]),
            lines_bytewise(accents.as_bytes()),
        ] {
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].len(), MAX_LINE_BYTES - 1);
            assert_eq!(got.concat(), accents);
        }
    }

    #[test]
    fn a_line_of_exactly_the_limit_stays_whole() {
        let exact = "y".repeat(MAX_LINE_BYTES);
        for data in [format!("{exact}\n"), format!("{exact}\r\n"), exact.clone()] {
            assert_eq!(lines_of(&[data.as_bytes()]), [exact.as_str()]);
            assert_eq!(lines_bytewise(data.as_bytes()), [exact.as_str()]);
        }
        let plus_cr = format!("{exact}\rz\n");
        assert_eq!(lines_bytewise(plus_cr.as_bytes()), [exact, "\rz".into()]);
    }
}
