//! Submission: a sweep's jobs reach the store and the broker in chunks, expanded as they go.
//!
//! Memory stays flat in the number of jobs: a blocking task expands the sweep into chunks of
//! [`CHUNK`] jobs, at most two ahead, and at most [`WINDOW`] chunks wait in the core's queue;
//! the core stores and publishes the chunks waiting there in one step (see
//! [`crate::service::Command::SubmitJobs`]). A submission stops
//! when its caller goes away (an HTTP client that disconnects drops the request's future),
//! and when the sweep is canceled meanwhile; in the first case the sweep is canceled, with
//! the reason on each job it had stored. The master's own cap,
//! [`MasterConfig::max_jobs_per_sweep`](crate::service::MasterConfig::max_jobs_per_sweep),
//! bounds every sweep, whatever its file's `max_jobs` says.

use std::sync::Arc;

use gridq_common::SweepId;
use tokio::sync::{mpsc, oneshot};

use crate::service::{Command, Handle, SubmitRefused};
use crate::store::{NewJob, SortValue, SubmitSummary, SweepRecord};
use crate::sweep::{Diagnostic, Job, Sweep, SweepError};

/// Jobs per command to the core.
pub const CHUNK: usize = 4096;
/// Chunks sent to the core and not yet answered, at most, per submission.
const WINDOW: usize = 16;
/// Chunks sent to the core and not yet answered, at most, over all submissions at once.
static IN_CORE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);
/// Submission numbers (from 1: 0 marks an ended submission).
static NUMBERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The sweep is invalid or too large; nothing was stored.
    #[error(transparent)]
    Invalid(#[from] SweepError),
    /// The core refused: another submission of the sweep runs, or the sweep was canceled.
    #[error(transparent)]
    Refused(#[from] SubmitRefused),
    /// The core did not answer: the master is stopping, or a step failed to store (its log
    /// says why); what was stored of the sweep is canceled.
    #[error("the master did not take the jobs: it is stopping, or its store failed (see its log)")]
    Stopping,
}

/// Submits a loaded sweep through the master's core, chunk by chunk, and returns the summary
/// once every job is stored (the core then publishes them from the store).
///
/// # Errors
/// See [`SubmitError`]. An invalid or too large sweep changes nothing.
pub async fn submit_sweep(
    handle: &Handle,
    sweep: Sweep,
    yaml: String,
    rerun: bool,
) -> Result<SubmitSummary, SubmitError> {
    let cap = handle.max_jobs_per_sweep;
    let record = plan_record(&sweep, yaml)?;
    // Counting can take a while (a sweep with exclusions is expanded to count it).
    let sweep = tokio::task::spawn_blocking(move || check_count(&sweep, cap).map(|()| sweep))
        .await
        .map_err(|_| SubmitError::Stopping)??;
    let record = Arc::new(record);
    // Numbered here, and guarded before the core hears of it: however this future ends, the
    // core hears the end (an end for a submission it refused or never saw is ignored).
    let number = NUMBERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut guard = Submission {
        commands: handle.commands.clone(),
        sweep: record.name.clone(),
        number,
        jobs: 0,
        interrupted: Some("the client went away".to_owned()),
    };
    let begun = request(handle, |reply| Command::SubmitBegin {
        record: (*record).clone(),
        submission: number,
        reply,
    })
    .await?;
    if let Err(refused) = begun {
        guard.interrupted = Some(refused.to_string());
        return Err(refused.into());
    }
    let (tx, mut rx) = mpsc::channel::<Vec<NewJob>>(2);
    let names = record.param_names.clone();
    let producer =
        tokio::task::spawn_blocking(move || produce(&sweep, &names, cap, &tx).map(|()| sweep));
    let mut summary = SubmitSummary::default();
    // Chunks go to the core without waiting for each answer, up to `WINDOW` unanswered: the
    // core stores those that wait together in one transaction. (A transaction per chunk
    // rewrote the pages of the id indexes, which a chunk's hashed ids touch all over, once
    // per chunk: half the speed at 300,000 jobs, and worse the larger the sweep.)
    let mut unanswered = std::collections::VecDeque::new();
    while let Some(jobs) = rx.recv().await {
        if unanswered.len() == WINDOW {
            if let Some(oldest) = unanswered.pop_front() {
                settle(oldest, &mut guard, &mut summary).await?;
            }
        }
        let n = jobs.len() as u64;
        let permit = IN_CORE.acquire().await.map_err(|_| SubmitError::Stopping)?;
        let (reply, answer) = oneshot::channel();
        handle
            .commands
            .send(Command::SubmitJobs {
                record: record.clone(),
                submission: number,
                jobs,
                rerun,
                reply,
            })
            .await
            .map_err(|_| SubmitError::Stopping)?;
        unanswered.push_back((n, answer, permit));
    }
    while let Some(oldest) = unanswered.pop_front() {
        settle(oldest, &mut guard, &mut summary).await?;
    }
    match producer.await {
        Ok(Ok(_sweep)) => {}
        Ok(Err(e)) => {
            guard.interrupted = Some(e.to_string());
            return Err(e.into());
        }
        Err(_) => {
            guard.interrupted = Some("the expansion stopped".to_owned());
            return Err(SubmitError::Stopping);
        }
    }
    guard.interrupted = None;
    guard.end().await;
    Ok(summary)
}

/// Waits for the core's answer to one chunk and counts it in.
async fn settle(
    (n, answer, permit): (
        u64,
        oneshot::Receiver<Result<SubmitSummary, SubmitRefused>>,
        tokio::sync::SemaphorePermit<'static>,
    ),
    guard: &mut Submission,
    summary: &mut SubmitSummary,
) -> Result<(), SubmitError> {
    let answer = answer.await;
    drop(permit);
    let Ok(answer) = answer else {
        guard.interrupted = Some("the master did not take a part of it".to_owned());
        return Err(SubmitError::Stopping);
    };
    match answer {
        Ok(part) => {
            guard.jobs += n;
            summary.add(&part);
            Ok(())
        }
        Err(refused) => {
            guard.interrupted = Some(refused.to_string());
            Err(refused.into())
        }
    }
}

/// Checks a sweep against the master's cap, then against its own `max_jobs`.
///
/// # Errors
/// When it has more jobs than either allows.
pub fn check_count(sweep: &Sweep, cap: u64) -> Result<(), SweepError> {
    let count = sweep.count();
    if count.jobs > u128::from(cap) {
        let jobs = if count.upper_bound {
            format!("up to {}", count.jobs)
        } else {
            count.jobs.to_string()
        };
        return Err(invalid(
            sweep,
            format!(
                "this sweep would produce {jobs} jobs, more than this master accepts in one sweep ({cap}, set by `gridq master --max-jobs-per-sweep`); narrow the parameters or split the sweep"
            ),
        ));
    }
    // The sweep's own limit (and a missing command) are checked where the expansion starts.
    sweep.expand().map(|_| ())
}

/// The sweep's settings as the store keeps them.
///
/// # Errors
/// When its name is not a valid sweep name.
pub fn plan_record(sweep: &Sweep, yaml: String) -> Result<SweepRecord, SweepError> {
    let options = sweep.options();
    check_code(sweep)?;
    Ok(SweepRecord {
        name: SweepId::new(sweep.name()).map_err(|e| invalid(sweep, e.to_string()))?,
        source: sweep.source().to_owned(),
        yaml,
        param_names: sweep.param_names().map(str::to_owned).collect(),
        retries: options.retries,
        timeout_ms: options
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        gpus: options.gpus,
        queue: options
            .queue
            .clone()
            .unwrap_or_else(|| gridq_common::topology::DEFAULT_QUEUE.to_owned()),
        workdir: options.workdir.clone(),
        code: sweep.code().cloned(),
        same_code: options.same_code,
    })
}

/// One expanded job as the store keeps it.
pub fn new_job(names: &[String], job: &Job, sweep: &Sweep) -> NewJob {
    let mut params_json = serde_json::Map::new();
    let mut sort_values = Vec::with_capacity(names.len());
    for (name, value) in names.iter().zip(&job.params) {
        let v: serde_json::Value =
            serde_json::from_str(value.json().get()).unwrap_or(serde_json::Value::Null);
        sort_values.push(SortValue::of(&v).unwrap_or_else(|| SortValue::Text("null".into())));
        params_json.insert(name.clone(), v);
    }
    NewJob {
        id: job.id,
        index: job.index,
        argv: job.argv_strings(),
        params_json: serde_json::Value::Object(params_json).to_string(),
        env: job.env(sweep),
        sort_values,
    }
}

/// Expands the sweep into chunks sent to `tx`; stops early, without error, once nobody
/// receives them.
fn produce(
    sweep: &Sweep,
    names: &[String],
    cap: u64,
    tx: &mpsc::Sender<Vec<NewJob>>,
) -> Result<(), SweepError> {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut n = 0u64;
    for job in sweep.expand()? {
        n += 1;
        if n > cap {
            // The count said otherwise; never store more than the cap all the same.
            return Err(invalid(
                sweep,
                format!(
                    "this sweep produces more than {cap} jobs, more than this master accepts in one sweep"
                ),
            ));
        }
        chunk.push(new_job(names, &job, sweep));
        if chunk.len() == CHUNK
            && tx
                .blocking_send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))
                .is_err()
        {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(())
}

/// The code version at submission must look like one (`code.tree`: hex digits, as
/// `gridq deploy` writes them), and a sweep bound to its code (`same_code`) must carry one.
fn check_code(sweep: &Sweep) -> Result<(), SweepError> {
    let hex = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    match sweep.code() {
        Some(code) if !hex(&code.tree, 128) => Err(invalid(
            sweep,
            "code.tree: must be 1 to 128 hex digits (the tree hash `.gridq/code.json` holds)"
                .to_owned(),
        )),
        Some(code) if code.commit.as_deref().is_some_and(|c| !hex(c, 64)) => Err(invalid(
            sweep,
            "code.commit: must be 1 to 64 hex digits (a git commit id)".to_owned(),
        )),
        None if sweep.options().same_code => Err(invalid(
            sweep,
            "same_code: the sweep is bound to the code it was submitted with, but the submission carries no `code` (submit it with `gridq submit`, which computes the project's code version)".to_owned(),
        )),
        _ => Ok(()),
    }
}

fn invalid(sweep: &Sweep, message: String) -> SweepError {
    SweepError::Invalid(Box::new(Diagnostic {
        source: sweep.source().to_owned(),
        pos: None,
        param: None,
        message,
    }))
}

/// Sends a command built around its reply channel and waits for the answer.
async fn request<T>(
    handle: &Handle,
    build: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, SubmitError> {
    let (reply, rx) = oneshot::channel();
    handle
        .commands
        .send(build(reply))
        .await
        .map_err(|_| SubmitError::Stopping)?;
    rx.await.map_err(|_| SubmitError::Stopping)
}

/// A submission the core knows of: ended when dropped, as interrupted unless told otherwise.
struct Submission {
    commands: mpsc::Sender<Command>,
    sweep: SweepId,
    number: u64,
    jobs: u64,
    /// Why it ends early, if it does.
    interrupted: Option<String>,
}

impl Submission {
    fn command(&self) -> Command {
        Command::SubmitEnd {
            sweep: self.sweep.clone(),
            submission: self.number,
            interrupted: self.interrupted.clone(),
            jobs: self.jobs,
        }
    }

    /// Ends it now, in order with the commands that follow (so that a client's next
    /// submission of the same sweep finds this one ended). Dropped before the end is sent,
    /// the guard sends it instead.
    async fn end(mut self) {
        if self.commands.send(self.command()).await.is_ok() {
            self.number = 0;
        }
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if self.number == 0 {
            return;
        }
        let end = self.command();
        if let Err(mpsc::error::TrySendError::Full(end)) = self.commands.try_send(end) {
            let commands = self.commands.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = commands.send(end).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use gridq_common::code::CodeVersion;

    use super::*;
    use crate::sweep::{LoadOptions, load_str};

    fn load(yaml: &str) -> Sweep {
        load_str(yaml, "s.yaml", "s", &LoadOptions::default())
            .expect("valid sweep")
            .sweep
    }

    /// A sweep bound to its code (`same_code: true` in the file, or set as `--same-code`
    /// does) needs the code version; with one, the record keeps both.
    #[test]
    fn a_bound_sweep_needs_its_code_version() {
        let yaml = "same_code: true\ncommand: [true]\nparameters:\n  x: [1]\n";
        let err = plan_record(&load(yaml), String::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "s.yaml: same_code: the sweep is bound to the code it was submitted with, but the submission carries no `code` (submit it with `gridq submit`, which computes the project's code version)"
        );
        let mut flagged = load("command: [true]\nparameters:\n  x: [1]\n");
        assert!(!plan_record(&flagged, String::new()).unwrap().same_code);
        flagged.set_same_code();
        assert!(plan_record(&flagged, String::new()).is_err());
        let code = CodeVersion {
            tree: "3f2a91c0e4b2".repeat(4),
            commit: None,
            dirty: None,
        };
        let mut sweep = load(yaml);
        sweep.set_code(Some(code.clone()));
        let record = plan_record(&sweep, String::new()).unwrap();
        assert!(record.same_code);
        assert_eq!(record.code, Some(code));
        sweep.set_code(Some(CodeVersion {
            tree: "../x".into(),
            commit: None,
            dirty: None,
        }));
        assert_eq!(
            plan_record(&sweep, String::new()).unwrap_err().to_string(),
            "s.yaml: code.tree: must be 1 to 128 hex digits (the tree hash `.gridq/code.json` holds)"
        );
    }
}
