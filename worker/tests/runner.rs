//! Tests for `gridq_worker::runner` against real processes (`sh`, `python3`, `sleep`, `setsid`):
//! exit statuses, spawn errors, exact argv and environment, output lines, result files, timeouts,
//! kills, and that nothing of a job outlives it.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gridq_worker::runner::{
    JobSpec, KillReason, MAX_LINE_BYTES, Outcome, OutputLine, RunningJob, SpawnError, Stream,
    Termination,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// The most any single wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

fn spec(dir: &Path, argv: &[&str]) -> JobSpec {
    JobSpec {
        argv: argv.iter().map(|arg| arg.to_string()).collect(),
        inherit: gridq_worker::job_env::inherited(&Default::default()),
        env: Vec::new(),
        workdir: dir.to_path_buf(),
        // A safety net so that a broken runner fails the test instead of hanging it.
        timeout: Some(Duration::from_secs(60)),
        grace: Duration::from_millis(500),
        result_path: dir.join("result.json"),
        user: None,
        output: None,
    }
}

fn sh(dir: &Path, script: &str) -> JobSpec {
    spec(dir, &["sh", "-c", script])
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

/// A job whose output is collected while it runs, so tests can react to it.
struct Started {
    job: RunningJob,
    lines: Arc<Mutex<Vec<OutputLine>>>,
    collector: JoinHandle<()>,
}

struct Finished {
    outcome: Outcome,
    lines: Vec<OutputLine>,
}

impl Finished {
    fn stream(&self, stream: Stream) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|line| line.stream == stream)
            .map(|line| line.line.as_str())
            .collect()
    }

    fn stdout(&self) -> Vec<&str> {
        self.stream(Stream::Stdout)
    }

    fn stderr(&self) -> Vec<&str> {
        self.stream(Stream::Stderr)
    }
}

fn start(spec: JobSpec) -> Started {
    let (output, mut received) = mpsc::channel(16);
    let job = RunningJob::spawn(spec, output).expect("spawn the job");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let collector = tokio::spawn(async move {
        while let Some(line) = received.recv().await {
            sink.lock().unwrap().push(line);
        }
    });
    Started {
        job,
        lines,
        collector,
    }
}

impl Started {
    fn stdout_now(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|line| line.stream == Stream::Stdout)
            .map(|line| line.line.clone())
            .collect()
    }

    /// Waits until the job has printed `n` stdout lines and returns them.
    async fn stdout_lines(&self, n: usize) -> Vec<String> {
        wait_until(&format!("{n} stdout line(s)"), || {
            let seen = self.stdout_now();
            if seen.len() >= n {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
        .await;
        self.stdout_now()[..n].to_vec()
    }

    async fn finish(self) -> Finished {
        let outcome = timeout(DEADLINE, self.job.wait())
            .await
            .expect("the job did not finish in time");
        timeout(DEADLINE, self.collector)
            .await
            .expect("the output channel was not closed after wait()")
            .expect("collector task");
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        Finished { outcome, lines }
    }
}

async fn run(spec: JobSpec) -> Finished {
    start(spec).finish().await
}

/// Polls `check` until it succeeds; on timeout fails with what it last saw.
async fn wait_until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let end = Instant::now() + DEADLINE;
    loop {
        match check() {
            Ok(()) => return,
            Err(saw) if Instant::now() >= end => {
                panic!("timed out after {DEADLINE:?} waiting for {what}; last saw: {saw}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A process state from `/proc/<pid>/stat`, `None` once the pid is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn alive(pid: u32) -> bool {
    // A zombie is dead: only its exit status is left, waiting for init (or a subreaper) to reap it.
    !matches!(proc_state(pid), None | Some('Z' | 'X'))
}

async fn wait_until_dead(pid: u32) {
    wait_until(&format!("pid {pid} to die"), || match proc_state(pid) {
        None | Some('Z' | 'X') => Ok(()),
        Some(state) => Err(format!("pid {pid} in state {state}")),
    })
    .await;
}

fn unix_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

fn spawn_error(spec: JobSpec) -> SpawnError {
    let (output, _received) = mpsc::channel(1);
    RunningJob::spawn(spec, output).expect_err("the spawn should fail")
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let dir = tempdir();
    let before = SystemTime::now();
    let started = start(spec(dir.path(), &["true"]));
    let pid = started.job.pid();
    let done = started.finish().await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.outcome.pid, pid);
    assert!(done.outcome.started_at >= before && done.outcome.started_at <= SystemTime::now());
    assert_eq!(done.outcome.result, None);
    assert_eq!(done.outcome.result_error, None);
    assert!(done.lines.is_empty(), "{:?}", done.lines);

    let done = run(sh(dir.path(), "exit 7")).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 7 });
}

#[tokio::test]
async fn a_signal_the_runner_did_not_send_is_reported() {
    let dir = tempdir();
    let done = run(sh(dir.path(), "kill -9 $$")).await;
    assert_eq!(
        done.outcome.termination,
        Termination::Signaled { signal: 9 }
    );
}

#[tokio::test]
async fn spawn_errors_name_the_program_or_directory_and_the_os_error() {
    let dir = tempdir();

    let err = spawn_error(spec(dir.path(), &["gridq-no-such-program", "x"]));
    assert!(matches!(err, SpawnError::ProgramNotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "program `gridq-no-such-program` not found: No such file or directory (os error 2)"
    );

    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let script = script.to_str().unwrap();
    let err = spawn_error(spec(dir.path(), &[script]));
    assert!(matches!(err, SpawnError::NotExecutable { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("program `{script}` is not executable: Permission denied (os error 13)")
    );

    let missing = dir.path().join("missing");
    let err = spawn_error(spec(&missing, &["true"]));
    assert!(matches!(err, SpawnError::Workdir { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use {} as the working directory of `true`: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let err = spawn_error(spec(&file, &["true"]));
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use {} as the working directory of `true`: Not a directory (os error 20)",
            file.display()
        )
    );

    let err = spawn_error(spec(dir.path(), &["echo", "a\0b"]));
    assert_eq!(err.to_string(), "argument 1 of `echo` contains a NUL byte");
    let err = spawn_error(spec(dir.path(), &[]));
    assert!(matches!(err, SpawnError::EmptyArgv), "{err:?}");
    let mut bad_env = spec(dir.path(), &["true"]);
    bad_env.env.push(("A=B".into(), "1".into()));
    let err = spawn_error(bad_env);
    assert!(matches!(err, SpawnError::InvalidEnvName { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn argv_reaches_the_job_exactly() {
    let dir = tempdir();
    let hostile = [
        "; rm -rf /",
        "$(whoami)",
        "`id`",
        "a b\tc\nd",
        "",
        "héllo wörld ✓ 日本語 🎉",
        "'\"\\",
        "*",
        "~",
        "--",
        "x > /tmp/gridq-pwned",
    ];
    let mut argv = vec![
        "python3",
        "-c",
        "import sys, json; print(json.dumps(sys.argv[1:]))",
    ];
    argv.extend(hostile);
    let done = run(spec(dir.path(), &argv)).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let stdout = done.stdout();
    assert_eq!(stdout.len(), 1, "{stdout:?}");
    let received: Vec<String> = serde_json::from_str(stdout[0]).unwrap();
    assert_eq!(received, hostile);
    assert!(!Path::new("/tmp/gridq-pwned").exists());
}

#[tokio::test]
async fn output_lines_arrive_per_stream_in_order() {
    let dir = tempdir();
    let before = unix_ms();
    let done = run(sh(
        dir.path(),
        r#"echo out1; echo err1 >&2; echo; printf 'err2\r\n' >&2; printf 'a\rb\n'; printf '\377bad\n'; printf last"#,
    ))
    .await;
    let after = unix_ms();
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.stdout(), ["out1", "", "a\rb", "\u{fffd}bad", "last"]);
    assert_eq!(done.stderr(), ["err1", "err2"]);
    assert!(
        done.lines
            .iter()
            .all(|line| (before..=after).contains(&line.ts_ms)),
        "{:?} not within {before}..={after}",
        done.lines
    );

    // Many lines on both streams at once, through a small channel: nothing lost or reordered.
    let done = run(sh(dir.path(), "seq 1 5000 & seq 1 5000 >&2; wait")).await;
    let expected: Vec<String> = (1..=5000).map(|i| i.to_string()).collect();
    assert_eq!(done.stdout(), expected);
    assert_eq!(done.stderr(), expected);
}

#[tokio::test]
async fn long_lines_are_cut_into_pieces_on_char_boundaries() {
    let dir = tempdir();
    let done = run(spec(
        dir.path(),
        &[
            "python3",
            "-c",
            "import sys; o = sys.stdout.buffer; \
             o.write(b'x' * 70000 + b'\\n'); o.write(('a' + 'é' * 40000).encode())",
        ],
    ))
    .await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let stdout = done.stdout();
    assert_eq!(
        stdout.len(),
        4,
        "{:?}",
        stdout.iter().map(|l| l.len()).collect::<Vec<_>>()
    );
    assert_eq!(stdout[0], "x".repeat(MAX_LINE_BYTES));
    assert_eq!(stdout[1], "x".repeat(70000 - MAX_LINE_BYTES));
    // After the 'a', every two-byte 'é' starts at an odd offset: the cut backs off by one byte.
    assert_eq!(stdout[2].len(), MAX_LINE_BYTES - 1);
    assert_eq!(
        format!("{}{}", stdout[2], stdout[3]),
        format!("a{}", "é".repeat(40000))
    );
}

#[tokio::test]
async fn wait_returns_with_all_output_in_the_channel() {
    let dir = tempdir();
    let (output, mut received) = mpsc::channel(64);
    let job = RunningJob::spawn(sh(dir.path(), "seq 1 10; printf tail >&2"), output).unwrap();
    // Nothing is received until wait() has returned.
    let outcome = timeout(DEADLINE, job.wait()).await.unwrap();
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    let mut lines = Vec::new();
    loop {
        match received.try_recv() {
            Ok(line) => lines.push((line.stream, line.line)),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => panic!("output still open after wait()"),
        }
    }
    let mut expected: Vec<_> = (1..=10).map(|i| (Stream::Stdout, i.to_string())).collect();
    expected.push((Stream::Stderr, "tail".into()));
    lines.sort_by_key(|(stream, _)| *stream == Stream::Stderr); // stable: keeps per-stream order
    assert_eq!(lines, expected);
}

#[tokio::test]
async fn the_job_sees_its_environment_and_workdir() {
    let dir = tempdir();
    let mut job = sh(
        dir.path(),
        r#"printf '%s\n' "$GRIDQ_TEST_VAR" "$GRIDQ_RESULT" "$PATH"; pwd -P"#,
    );
    job.env = vec![
        ("GRIDQ_TEST_VAR".into(), "first".into()),
        ("GRIDQ_RESULT".into(), "/not/this/one".into()),
        ("GRIDQ_TEST_VAR".into(), "two words".into()),
    ];
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let result_path = dir.path().join("result.json");
    let workdir = dir.path().canonicalize().unwrap();
    assert_eq!(
        done.stdout(),
        [
            "two words",
            result_path.to_str().unwrap(),
            &std::env::var("PATH").unwrap(),
            workdir.to_str().unwrap(),
        ]
    );
}

#[tokio::test]
async fn a_program_found_in_path_moments_ago_is_looked_up_again_once_it_is_gone() {
    // The worker remembers where it found a program in PATH for a second; a job must not fail
    // because the file it found there a moment ago was removed while another is further on.
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempdir();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    for (bin, says) in [(&first, "first"), (&second, "second")] {
        std::fs::create_dir(bin).unwrap();
        let program = bin.join("gridq-test-which");
        std::fs::write(&program, format!("#!/bin/sh\necho {says}\n")).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", first.display(), second.display());
    let job = || {
        let mut job = spec(dir.path(), &["gridq-test-which"]);
        job.env = vec![("PATH".into(), path.clone())];
        job
    };
    let done = run(job()).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.stdout(), ["first"]);

    std::fs::remove_file(first.join("gridq-test-which")).unwrap();
    let done = run(job()).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.stdout(), ["second"]);

    std::fs::remove_file(second.join("gridq-test-which")).unwrap();
    let err = spawn_error(job());
    assert_eq!(
        err.to_string(),
        "program `gridq-test-which` not found: No such file or directory (os error 2)"
    );
}

#[tokio::test]
async fn a_relative_result_path_is_taken_relative_to_the_workdir() {
    let dir = tempdir();
    let mut job = sh(
        dir.path(),
        r#"echo "$GRIDQ_RESULT"; echo '{"ok": 1}' > "$GRIDQ_RESULT""#,
    );
    job.result_path = PathBuf::from("result.json");
    let done = run(job).await;
    assert_eq!(
        done.stdout(),
        [dir.path().join("result.json").to_str().unwrap()]
    );
    assert_eq!(done.outcome.result, Some(object(r#"{"ok": 1}"#)));
}

fn object(json: &str) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(json).unwrap()
}

/// Runs a job that copies `payload` to its result file.
async fn result_of(payload: &[u8]) -> Outcome {
    let dir = tempdir();
    std::fs::write(dir.path().join("payload"), payload).unwrap();
    run(sh(dir.path(), r#"cp payload "$GRIDQ_RESULT""#))
        .await
        .outcome
}

#[tokio::test]
async fn a_json_object_result_is_returned() {
    let outcome = result_of(br#"{"loss": 0.25, "tags": ["a"], "nested": {"n": null}}"#).await;
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(outcome.result_error, None);
    assert_eq!(
        outcome.result,
        Some(object(
            r#"{"loss": 0.25, "tags": ["a"], "nested": {"n": null}}"#
        ))
    );

    // Exactly 1 MiB is still accepted.
    let mut exact = br#"{"k": 1}"#.to_vec();
    exact.resize(1024 * 1024, b' ');
    let outcome = result_of(&exact).await;
    assert_eq!(outcome.result_error, None);
    assert_eq!(outcome.result, Some(object(r#"{"k": 1}"#)));
}

#[tokio::test]
async fn a_bad_result_file_is_ignored_with_a_reason() {
    let outcome = result_of(b"not json").await;
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(outcome.result, None);
    assert_eq!(
        outcome.result_error.as_deref(),
        Some(
            "GRIDQ_RESULT file is not a JSON object: invalid JSON (expected ident at line 1 column 2)"
        )
    );

    let outcome = result_of(b"[1, 2]").await;
    assert_eq!(outcome.result, None);
    assert_eq!(
        outcome.result_error.as_deref(),
        Some("GRIDQ_RESULT file is not a JSON object: found an array")
    );

    let mut big = br#"{"k": 1}"#.to_vec();
    big.resize(1024 * 1024 + 1, b' ');
    let outcome = result_of(&big).await;
    assert_eq!(outcome.result, None);
    assert_eq!(
        outcome.result_error.as_deref(),
        Some("GRIDQ_RESULT file is larger than 1 MiB (1048577 bytes)")
    );

    // A FIFO must not hang the worker.
    let dir = tempdir();
    let done = run(sh(dir.path(), r#"mkfifo "$GRIDQ_RESULT""#)).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(
        done.outcome.result_error.as_deref(),
        Some("GRIDQ_RESULT file is not a regular file")
    );
}

#[tokio::test]
async fn a_stale_result_file_is_removed_before_the_spawn() {
    let dir = tempdir();
    let result = dir.path().join("result.json");
    std::fs::write(&result, r#"{"stale": true}"#).unwrap();
    let done = run(sh(
        dir.path(),
        r#"test -e "$GRIDQ_RESULT" && echo exists || echo absent"#,
    ))
    .await;
    assert_eq!(done.stdout(), ["absent"]);
    assert_eq!(done.outcome.result, None);
    assert_eq!(done.outcome.result_error, None);
    assert!(!result.exists());
}

#[tokio::test]
async fn a_timeout_sends_sigterm_first() {
    let dir = tempdir();
    let mut job = spec(dir.path(), &["sleep", "30"]);
    job.timeout = Some(Duration::from_millis(300));
    job.grace = Duration::from_secs(10);
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::TimedOut);
    // Over before the grace period: SIGTERM ended it, not the SIGKILL that follows.
    let duration = done.outcome.duration;
    assert!(
        duration >= Duration::from_millis(300) && duration < Duration::from_secs(10),
        "{duration:?}"
    );
}

#[tokio::test]
async fn a_job_that_ignores_sigterm_is_sigkilled_after_the_grace() {
    let dir = tempdir();
    let mut job = sh(dir.path(), r#"trap "" TERM; sleep 30"#);
    job.timeout = Some(Duration::from_millis(300));
    job.grace = Duration::from_millis(500);
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::TimedOut);
    let duration = done.outcome.duration;
    assert!(
        duration >= Duration::from_millis(800) && duration < Duration::from_secs(10),
        "{duration:?}"
    );
}

/// The main shell ignores SIGTERM and waits for a subshell that reports its SIGTERM, which it
/// only gets if the signal goes to the whole group.
const REPORTS_GROUP_SIGTERM: &str = r#"trap "" TERM
(trap "echo got-term; exit 0" TERM; echo ready; while :; do sleep 0.05; done) &
wait"#;

#[tokio::test]
async fn sigterm_goes_to_the_whole_group_on_timeout() {
    let dir = tempdir();
    let mut job = sh(dir.path(), REPORTS_GROUP_SIGTERM);
    job.timeout = Some(Duration::from_secs(1));
    job.grace = Duration::from_secs(20);
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::TimedOut);
    assert_eq!(done.stdout(), ["ready", "got-term"]);
    assert!(done.outcome.duration < Duration::from_secs(20));
}

#[tokio::test]
async fn sigterm_goes_to_the_whole_group_on_kill() {
    let dir = tempdir();
    let mut job = sh(dir.path(), REPORTS_GROUP_SIGTERM);
    job.grace = Duration::from_secs(20);
    let started = start(job);
    assert_eq!(started.stdout_lines(1).await, ["ready"]);
    started.job.killer().kill(KillReason::Shutdown);
    let done = started.finish().await;
    assert_eq!(
        done.outcome.termination,
        Termination::Killed {
            reason: KillReason::Shutdown
        }
    );
    assert_eq!(done.stdout(), ["ready", "got-term"]);
}

/// Prints the pid of a background child, then waits for it.
const BACKGROUND_CHILD: &str = "sleep 300 & echo $!; wait";

#[tokio::test]
async fn no_orphans_after_a_timeout() {
    let dir = tempdir();
    let mut job = sh(dir.path(), BACKGROUND_CHILD);
    job.timeout = Some(Duration::from_millis(500));
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::TimedOut);
    let child: u32 = done.stdout()[0].parse().unwrap();
    wait_until_dead(child).await;
}

#[tokio::test]
async fn kill_stops_the_job_and_its_group_and_is_idempotent() {
    let dir = tempdir();
    let started = start(sh(dir.path(), BACKGROUND_CHILD));
    let child: u32 = started.stdout_lines(1).await[0].parse().unwrap();
    assert!(alive(child), "the background child should be running");
    let killer = started.job.killer();
    killer.kill(KillReason::Canceled);
    killer.kill(KillReason::Canceled);
    killer.clone().kill(KillReason::Shutdown);
    let done = started.finish().await;
    assert_eq!(
        done.outcome.termination,
        Termination::Killed {
            reason: KillReason::Canceled
        }
    );
    wait_until_dead(child).await;
    // After the end, a kill does nothing (and must not signal a recycled pid).
    killer.kill(KillReason::Shutdown);
}

#[tokio::test]
async fn no_orphans_after_a_normal_exit() {
    let dir = tempdir();
    let done = run(sh(dir.path(), "sleep 300 & echo $!; exit 0")).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let child: u32 = done.stdout()[0].parse().unwrap();
    wait_until_dead(child).await;
}

#[tokio::test]
async fn a_kill_wins_over_a_later_timeout() {
    let dir = tempdir();
    let mut job = sh(dir.path(), r#"trap "" TERM; echo ready; sleep 30"#);
    job.timeout = Some(Duration::from_secs(1));
    job.grace = Duration::from_secs(2);
    let started = start(job);
    started.stdout_lines(1).await;
    started.job.killer().kill(KillReason::Canceled);
    let done = started.finish().await;
    // The timeout passed during the grace period; the kill came first.
    assert!(done.outcome.duration >= Duration::from_secs(2));
    assert_eq!(
        done.outcome.termination,
        Termination::Killed {
            reason: KillReason::Canceled
        }
    );
}

#[tokio::test]
async fn a_timeout_wins_over_a_later_kill() {
    let dir = tempdir();
    let mut job = sh(
        dir.path(),
        r#"trap "echo term" TERM; echo ready; while :; do sleep 0.05; done"#,
    );
    job.timeout = Some(Duration::from_millis(300));
    job.grace = Duration::from_secs(1);
    let started = start(job);
    // The job saw the timeout's SIGTERM (and survives it until the SIGKILL).
    assert_eq!(started.stdout_lines(2).await, ["ready", "term"]);
    started.job.killer().kill(KillReason::Canceled);
    let done = started.finish().await;
    assert_eq!(done.outcome.termination, Termination::TimedOut);
}

#[tokio::test]
async fn dropping_the_job_kills_it() {
    let dir = tempdir();
    let (output, _received) = mpsc::channel(1);
    let job = RunningJob::spawn(spec(dir.path(), &["sleep", "300"]), output).unwrap();
    let pid = job.pid();
    assert!(alive(pid));
    drop(job);
    wait_until_dead(pid).await;
}

#[tokio::test]
async fn an_escaped_process_holding_the_pipes_does_not_block_wait() {
    let dir = tempdir();
    // The escaped process writes its pid once it is in its own session, then keeps the output
    // pipes open for 30 s; the main process exits as soon as it knows that pid.
    let script = r#"setsid sh -c 'echo $$ > escaped; exec sleep 30' &
while [ ! -s escaped ]; do sleep 0.01; done
cat escaped"#;
    let begin = Instant::now();
    let done = run(sh(dir.path(), script)).await;
    let elapsed = begin.elapsed();
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let escaped: u32 = done.stdout()[0].parse().unwrap();
    let still_alive = alive(escaped);
    let _ = kill(Pid::from_raw(escaped as i32), Signal::SIGKILL);
    assert!(
        still_alive,
        "the setsid process should have escaped the group"
    );
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_loses_no_output() {
    let dir = tempdir();
    // A1 and A2 in one write: the runner sends A1 into the 1-slot channel and blocks on A2. Only
    // then does the job write the rest, which stays in the pipe, and exit.
    let script = r#"printf 'A1\nA2\n'; while [ ! -e go ]; do sleep 0.01; done; seq 1 1000"#;
    let (output, mut received) = mpsc::channel(1);
    let job = RunningJob::spawn(sh(dir.path(), script), output).unwrap();
    let pid = job.pid();
    let waiter = tokio::spawn(job.wait());
    wait_until("the first line in the channel", || {
        if received.len() == 1 {
            Ok(())
        } else {
            Err(format!("{} lines", received.len()))
        }
    })
    .await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    wait_until_dead(pid).await;
    // The consumer is slower than the runner's 2 s wait for the end of the pipes: this is the
    // slowness being simulated, not a synchronisation.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut lines = Vec::new();
    while let Some(line) = timeout(DEADLINE, received.recv()).await.unwrap() {
        lines.push(line.line);
    }
    let mut expected = vec!["A1".to_string(), "A2".to_string()];
    expected.extend((1..=1000).map(|i| i.to_string()));
    assert_eq!(lines, expected);
    let outcome = timeout(DEADLINE, waiter).await.unwrap().unwrap();
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
}

/// PDEATHSIG follows the thread that forked the job. A job spawned from a blocking-pool thread
/// must survive that thread's exit.
#[test]
fn a_job_outlives_the_thread_that_spawned_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempdir();
        let job = sh(
            dir.path(),
            "echo ready; while [ ! -e go ]; do sleep 0.01; done; echo survived",
        );
        let (output, mut received) = mpsc::channel(16);
        let (job, thread) = tokio::task::spawn_blocking(move || {
            (RunningJob::spawn(job, output), nix::unistd::gettid())
        })
        .await
        .unwrap();
        let job = job.unwrap();
        let collector = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = received.recv().await {
                lines.push(line.line);
            }
            lines
        });
        wait_until("the spawning thread to exit", || {
            let task = format!("/proc/self/task/{thread}");
            if Path::new(&task).exists() {
                Err(format!("{task} exists"))
            } else {
                Ok(())
            }
        })
        .await;
        std::fs::write(dir.path().join("go"), "").unwrap();
        let outcome = timeout(DEADLINE, job.wait()).await.unwrap();
        assert_eq!(outcome.termination, Termination::Exited { code: 0 });
        assert_eq!(collector.await.unwrap(), ["ready", "survived"]);
    });
}

const HELPER_ENV: &str = "GRIDQ_RUNNER_TEST_HELPER_DIR";

/// Not a test on its own: the worker process that `a_job_dies_with_a_sigkilled_worker` runs and
/// SIGKILLs. Without its environment variable it does nothing.
#[tokio::test]
#[ignore = "helper process for a_job_dies_with_a_sigkilled_worker"]
async fn sigkilled_worker_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let mut job = spec(Path::new(&dir), &["sleep", "300"]);
    job.timeout = None;
    let (output, _received) = mpsc::channel(16);
    let job = RunningJob::spawn(job, output).unwrap();
    println!("JOBPID {}", job.pid());
    job.wait().await;
}

#[tokio::test]
async fn a_job_dies_with_a_sigkilled_worker() {
    let dir = tempdir();
    let mut worker = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkilled_worker_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let worker_pid = worker.id().unwrap();
    let mut lines = tokio::io::BufReader::new(worker.stdout.take().unwrap()).lines();
    let job: u32 = timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may print "test <name> ... " on the same line first.
            if let Some((_, pid)) = line.split_once("JOBPID ") {
                return pid.parse().unwrap();
            }
        }
        panic!("the helper exited without printing the job's pid")
    })
    .await
    .expect("the helper did not start a job");
    assert!(alive(job));
    let stat = std::fs::read_to_string(format!("/proc/{job}/stat")).unwrap();
    let parent: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(parent, worker_pid, "the job should be the helper's child");

    kill(Pid::from_raw(worker_pid as i32), Signal::SIGKILL).unwrap();
    timeout(DEADLINE, worker.wait()).await.unwrap().unwrap();
    wait_until_dead(job).await;
}

#[tokio::test]
async fn the_job_starts_with_no_blocked_or_ignored_signals_and_one_value_per_variable() {
    let dir = tempdir();
    // The worker ignores SIGPIPE (Rust's default) and blocks every signal around the spawn; the
    // job must see neither. `env` prints what a program's environment really holds.
    let mut job = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "grep -E '^(SigBlk|SigIgn):' /proc/self/status; env",
        ],
    );
    job.env = vec![
        ("GRIDQ_TEST_VAR".into(), "first".into()),
        ("GRIDQ_TEST_VAR".into(), "second".into()),
    ];
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let out = done.stdout();
    assert_eq!(
        out[..2],
        ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"]
    );
    let values: Vec<&str> = out
        .iter()
        .copied()
        .filter(|l| l.starts_with("GRIDQ_TEST_VAR="))
        .collect();
    assert_eq!(values, ["GRIDQ_TEST_VAR=second"]);
}

const NOBODY: u32 = 65534;

fn output_dir(project: &Path, sweep: &str) -> gridq_worker::outputs::OutputDir {
    gridq_worker::outputs::OutputDir::new(
        project,
        &gridq_common::SweepId::new(sweep).unwrap(),
        &gridq_common::JobId::from_bytes([0x5a; 16]),
    )
}

fn mode_and_owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid())
}

#[tokio::test]
async fn the_output_directory_is_made_before_the_job_and_what_it_left_is_listed_after() {
    let project = tempdir();
    let out = output_dir(project.path(), "s.1");
    let mut job = sh(
        project.path(),
        r#"test -d "$GRIDQ_OUTPUT" || exit 3
           echo "$GRIDQ_OUTPUT"
           printf hello > "$GRIDQ_OUTPUT/out.txt"
           mkdir "$GRIDQ_OUTPUT/sub" && printf 123 > "$GRIDQ_OUTPUT/sub/n"
           ln -s /etc/passwd "$GRIDQ_OUTPUT/link""#,
    );
    job.output = Some(out.clone());
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    let path = out.path();
    assert!(path.is_absolute());
    assert_eq!(done.stdout(), [path.to_str().unwrap()]);
    let listing = done.outcome.outputs.expect("a listing");
    let files: Vec<(&str, u64)> = listing
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.size))
        .collect();
    assert_eq!(files, [("out.txt", 5), ("sub/n", 3)]);
    assert!(!listing.truncated);
    assert_eq!(listing.dir, path.to_string_lossy());
    let me = nix::unistd::geteuid().as_raw();
    for dir in out.to_make() {
        assert_eq!(mode_and_owner(&dir), (0o700, me), "{}", dir.display());
    }

    // The next attempt of the same job finds what the first left; one that leaves the
    // directory empty leaves none.
    let mut again = sh(project.path(), r#"cat "$GRIDQ_OUTPUT/out.txt""#);
    again.output = Some(out.clone());
    let done = run(again).await;
    assert_eq!(done.stdout(), ["hello"]);
    assert_eq!(done.outcome.outputs.unwrap().files.len(), 2);
    let mut empty = sh(project.path(), r#"rm -r "$GRIDQ_OUTPUT"/*"#);
    empty.output = Some(out.clone());
    let done = run(empty).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.outcome.outputs.unwrap().files, []);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_job_that_cannot_start_leaves_no_output_directory() {
    let project = tempdir();
    let out = output_dir(project.path(), "s");
    // Found, so the child runs (and makes the directory), but its exec fails.
    std::fs::write(project.path().join("not-executable"), "#!/bin/sh\n").unwrap();
    let mut job = spec(project.path(), &["./not-executable"]);
    job.output = Some(out.clone());
    let (tx, _rx) = mpsc::channel(16);
    let err = RunningJob::spawn(job, tx).unwrap_err();
    assert!(matches!(err, SpawnError::NotExecutable { .. }), "{err}");
    assert!(!out.path().exists());
    assert!(out.path().parent().unwrap().is_dir());
}

#[tokio::test]
async fn a_sweep_named_dot_dot_gets_no_output_directory_and_does_not_start() {
    let project = tempdir();
    let mut job = sh(project.path(), "exit 0");
    job.output = Some(output_dir(project.path(), ".."));
    let (tx, _rx) = mpsc::channel(16);
    let err = RunningJob::spawn(job, tx).unwrap_err();
    assert!(matches!(err, SpawnError::OutputName { .. }), "{err}");
    assert!(!project.path().join(".gridq").exists());
}

/// With a job user, the directories are that user's (a worker running as root makes none of
/// its own in the user's project), and a link planted in their path is followed with the
/// job user's rights only.
#[tokio::test]
async fn with_a_job_user_the_output_directory_is_that_users_and_a_planted_link_grants_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs as root, to run a job as another user"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempdir();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let project = tmp.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::os::unix::fs::chown(&project, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = output_dir(&project, "s");
    let mut job = sh(&project, r#"printf x > "$GRIDQ_OUTPUT/f""#);
    job.user = Some((NOBODY, NOBODY));
    job.output = Some(out.clone());
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    for dir in out.to_make() {
        assert_eq!(mode_and_owner(&dir), (0o700, NOBODY), "{}", dir.display());
    }
    assert_eq!(done.outcome.outputs.unwrap().files.len(), 1);

    // `.gridq` replaced by a link to a directory only root may write: the job user's mkdir
    // fails there and nothing is made in it; the job still runs (its user may not write the
    // project, and it need not write outputs), and says why its directory is missing.
    let root_only = tmp.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::symlink(&root_only, other.join(".gridq")).unwrap();
    let mut job = sh(&other, r#"test -d "$GRIDQ_OUTPUT" || echo missing"#);
    job.user = Some((NOBODY, NOBODY));
    job.output = Some(output_dir(&other, "s"));
    let done = run(job).await;
    assert_eq!(done.outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(done.stdout(), ["missing"]);
    assert_eq!(done.outcome.outputs, None);
    let why = done
        .outcome
        .output_error
        .expect("why the directory is missing");
    assert!(why.ends_with("Permission denied (os error 13)"), "{why}");
    assert_eq!(std::fs::read_dir(&root_only).unwrap().count(), 0);
}
