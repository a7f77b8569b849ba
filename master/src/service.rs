//! The master service: the core loop that owns the store, the broker session and the HTTP API.
//!
//! # The job protocol (lease design)
//! RabbitMQ closes a channel that holds an unacked delivery longer than `consumer_timeout`
//! (30 minutes by default), and training jobs run for hours. So a worker never holds a delivery
//! while a job runs:
//!
//! 1. The master publishes a job message for attempt *n* (persistent, confirmed). The job is
//!    `pending` until the confirm arrives, then `queued`.
//! 2. A worker with a free slot receives it and sends a `claim`.
//! 3. The master decides in one transaction: it grants the attempt (recording the lease: job
//!    `running` on that worker) or denies it (canceled, superseded, already running or done).
//!    A job of a sweep bound to its code (`same_code`) is also denied to a worker whose claim
//!    names another code tree (or none): it waits in `retrying` and goes out again for a
//!    worker with that code, or fails when no online worker has it (see [`deny_wrong_code`]).
//! 4. On a grant the worker stops consuming on that slot, acks the delivery and runs the job.
//!    On a denial it acks and drops the message. Either way the delivery is held for one round
//!    trip, not for the job.
//! 5. The worker reports `finished` (confirmed, re-sent after reconnects). The master commits
//!    the result, then acks the event.
//! 6. The master watches heartbeats. When a worker misses them for `heartbeat_timeout`, each
//!    attempt it held is published again as attempt *n+1*; after `max_lost` lost workers the
//!    job fails with that reason. A worker that dies before its grant never acked: the broker
//!    redelivers, and the quorum queue's delivery limit dead-letters a message that keeps
//!    killing workers before they can claim it.
//!
//! Duplicates (a republished message whose first copy was in fact stored, a late `finished`
//! from a worker thought lost) are harmless: claims of a non-current attempt are denied, and a
//! late result is stored as a duplicate while the results table keeps one row per job.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gridq_common::secret::Redactor;
use gridq_common::topology;
use gridq_common::wire::{self, AttemptRef, FromWorker, ToWorker, Verdict};
use gridq_common::{JobId, SweepId, WorkerId};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::broker::{self, BrokerConfig, Inbound, JobsOut, Outbound};
use crate::http::{self, activity::Activity, pages::Monitor};
use crate::store::{
    ClaimVerdict, FinishEffect, JobState, LostEffect, NewJob, Publish, Store, StoreError,
    SubmitSummary, SweepRecord,
};

/// How often the retention period is enforced.
const RETENTION_CHECK: Duration = Duration::from_secs(600);

/// Settings of the master.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Where the store, the token and (in local mode) the private broker live.
    pub state_dir: PathBuf,
    /// The broker URL (with credentials).
    pub broker_url: String,
    /// Where the HTTP API listens (127.0.0.1:8642 by default; port 0 picks one).
    pub listen: SocketAddr,
    /// A worker silent this long is lost.
    pub heartbeat_timeout: Duration,
    /// Lost workers after which a job fails instead of running again.
    pub max_lost: u32,
    /// Deliveries of one job message before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Cap of the exponential backoff between retries.
    pub max_retry_backoff: Duration,
    /// A fixed token instead of the saved or generated one.
    pub token: Option<String>,
    /// The RabbitMQ management API's base URL, for queue statistics; `None` tries the broker's
    /// host on port 15672 and falls back to AMQP.
    pub management_url: Option<String>,
    /// Finished sweeps untouched for this long are deleted with their jobs and logs; `None`
    /// keeps everything.
    pub retention: Option<Duration>,
    /// The most jobs one sweep may have, whatever its file's `max_jobs` says.
    pub max_jobs_per_sweep: u64,
}

/// The default of [`MasterConfig::max_jobs_per_sweep`].
pub const DEFAULT_MAX_JOBS_PER_SWEEP: u64 = 10_000_000;

/// Why the core refused a step of a submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitRefused {
    #[error("sweep `{0}` is being submitted right now; wait for that submission to end")]
    Busy(SweepId),
    #[error("sweep `{0}` was canceled while it was being submitted")]
    Canceled(SweepId),
}

impl MasterConfig {
    /// Defaults for a state directory and broker.
    pub fn new(state_dir: PathBuf, broker_url: String) -> Self {
        Self {
            state_dir,
            broker_url,
            listen: SocketAddr::from(([127, 0, 0, 1], 8642)),
            heartbeat_timeout: Duration::from_secs(15),
            max_lost: 3,
            delivery_limit: topology::DEFAULT_DELIVERY_LIMIT,
            max_retry_backoff: Duration::from_secs(300),
            token: None,
            management_url: None,
            retention: None,
            max_jobs_per_sweep: DEFAULT_MAX_JOBS_PER_SWEEP,
        }
    }
}

/// Why the master could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another master holds the broker vhost (what it said of itself).
    #[error(
        "{0}; stop that master first, or give this one a vhost of its own (the path of the broker URL, e.g. amqp://user:pass@host:5672/my-project)"
    )]
    AnotherMaster(String),
}

/// A command from the API (or an embedding program) to the core.
#[derive(Debug)]
pub enum Command {
    /// Starts a submission, numbered by the caller: stores the sweep's settings. Its
    /// [`Command::SubmitJobs`] and [`Command::SubmitEnd`] carry the same number.
    SubmitBegin {
        record: SweepRecord,
        submission: u64,
        reply: oneshot::Sender<Result<(), SubmitRefused>>,
    },
    /// The next jobs of a submission, stored and published in one step.
    SubmitJobs {
        record: Arc<SweepRecord>,
        submission: u64,
        jobs: Vec<NewJob>,
        rerun: bool,
        reply: oneshot::Sender<Result<SubmitSummary, SubmitRefused>>,
    },
    /// Ends a submission: `Some(reason)` when it stopped short (the client went away, the
    /// expansion failed), which cancels the sweep with that reason.
    SubmitEnd {
        sweep: SweepId,
        submission: u64,
        interrupted: Option<String>,
        jobs: u64,
    },
    CancelSweep {
        sweep: SweepId,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    CancelJob {
        sweep: SweepId,
        job: JobId,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    RetryFailed {
        sweep: SweepId,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// One failed, timed-out or canceled job again; `false` when it is in another state.
    RetryJob {
        sweep: SweepId,
        job: JobId,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    /// Asks a worker to stop taking jobs and exit once its running ones are done.
    DrainWorker {
        worker: WorkerId,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A handle to a running master: commands, change notifications, where it listens.
#[derive(Debug, Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    /// Bumped after every commit that changed something.
    pub changes: watch::Receiver<u64>,
    pub addr: SocketAddr,
    pub token: Arc<str>,
    pub db_path: PathBuf,
    /// See [`MasterConfig::max_jobs_per_sweep`].
    pub max_jobs_per_sweep: u64,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Loads the token from `dir/token`, or generates and saves one (mode 0600).
///
/// # Errors
/// When the file cannot be read or written.
pub fn load_or_create_token(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &token)?;
    Ok(token)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// How long [`start`] waits for the first broker session to say whether the vhost is free.
const FIRST_SESSION_WAIT: Duration = Duration::from_secs(15);

/// Starts the master and returns once it listens; it runs until `shutdown` resolves.
///
/// # Errors
/// When the state directory, store or listener cannot be set up.
pub async fn start(
    config: MasterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<()>), MasterError> {
    let dir = &config.state_dir;
    // 0700, and the store 0600: it holds every output line.
    crate::state_dir::prepare(dir).map_err(|source| MasterError::StateDir {
        path: dir.display().to_string(),
        source,
    })?;
    let token: Arc<str> = match &config.token {
        Some(t) => Arc::from(t.as_str()),
        None => Arc::from(
            load_or_create_token(dir).map_err(|source| MasterError::StateDir {
                path: dir.join("token").display().to_string(),
                source,
            })?,
        ),
    };
    let db_path = dir.join("gridq.db");
    let store = Store::open(&db_path)?;
    let activity = Arc::new(Activity::default());
    store
        .read()
        .for_each_duration(|seconds| activity.metrics.observe_duration(seconds))?;
    let monitor = Monitor::new(
        activity.clone(),
        &config.broker_url,
        config.management_url.as_deref(),
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| MasterError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| MasterError::Listen {
            addr: config.listen,
            source,
        })?;
    let (commands_tx, commands_rx) = mpsc::channel(256);
    let (changes_tx, changes_rx) = watch::channel(0u64);
    let handle = Handle {
        commands: commands_tx,
        changes: changes_rx,
        addr,
        token: token.clone(),
        db_path: db_path.clone(),
        max_jobs_per_sweep: config.max_jobs_per_sweep,
    };
    let (inbound_tx, inbound_rx) = mpsc::channel(4096);
    let (outbound_tx, outbound_rx) = mpsc::channel(1024);
    // Job batches: few wait here (the session reads them as confirms come back), so a large
    // submission holds the core back instead of piling up in memory.
    let (jobs_tx, jobs_rx) = mpsc::channel(4);
    let broker_config = BrokerConfig {
        url: config.broker_url.clone(),
        delivery_limit: config.delivery_limit,
        prefetch: 1000,
        name: format!("gridq-master@{}", hostname()),
        vhost: gridq_common::amqp::vhost(&config.broker_url),
        identity: format!(
            "host {}, pid {}, state directory {}, API http://{addr}, since {}",
            hostname(),
            std::process::id(),
            dir.display(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        ),
        user: gridq_common::amqp::user(&config.broker_url),
        metrics: activity.metrics.clone(),
    };
    let (first_tx, first_rx) = oneshot::channel();
    let broker_task = tokio::spawn(broker::run(
        broker_config,
        inbound_tx,
        broker::Outgoing {
            control: outbound_rx,
            jobs: jobs_rx,
        },
        first_tx,
    ));
    // A second master on a vhost that has one must not start (both would consume the same
    // events). An unreachable broker does not stop the start: the session keeps trying, and
    // takes the lock before it consumes anything.
    if let Ok(Ok(Err(holder))) = tokio::time::timeout(FIRST_SESSION_WAIT, first_rx).await {
        return Err(MasterError::AnotherMaster(holder));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_task = tokio::spawn(http::serve(
        listener,
        handle.clone(),
        db_path.clone(),
        monitor,
        stop_rx.clone(),
    ));
    info!(listen = %addr, broker = %gridq_common::amqp::redact(&config.broker_url), "master started");
    let mut secrets = Redactor::for_broker_url(&config.broker_url);
    secrets.add(token.to_string());
    let core = Core::new(
        store,
        config,
        (outbound_tx, jobs_tx),
        changes_tx,
        activity,
        secrets,
    )?;
    let task = tokio::spawn(async move {
        let mut stop = stop_rx;
        tokio::select! {
            () = core.run(inbound_rx, commands_rx, &mut stop) => {}
            () = shutdown => {}
        }
        let _ = stop_tx.send(true);
        let _ = http_task.await;
        // The core is gone, so its outbound channel is closed: the session closes the
        // connection, which frees the vhost's master lock at once for the next master.
        let abort = broker_task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), broker_task)
            .await
            .is_err()
        {
            abort.abort();
        }
        info!("master stopped");
    });
    Ok((handle, task))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Clone)]
struct Live {
    last_seen: Instant,
    /// Its last heartbeat said it reads several jobs per message and holds short jobs ahead.
    batches: bool,
    /// The code tree its project holds, as its last heartbeat or claim said.
    code: Option<String>,
    /// The queues it reads, as its last heartbeat said (empty before one).
    queues: Vec<String>,
    /// Whether its last heartbeat showed a free slot (`true` before one).
    free: bool,
}

/// Jobs per message when every online worker takes batches (see [`Core::per_message`]): small
/// enough for the look-ahead of a one-slot worker (16 jobs) to hold two messages.
pub const JOBS_PER_MESSAGE: usize = 8;
/// Fewer jobs than this at once go out one per message.
const BATCH_FROM: usize = 64;

struct Core {
    store: Store,
    config: MasterConfig,
    out: mpsc::Sender<Outbound>,
    jobs_out: mpsc::Sender<JobsOut>,
    changes: watch::Sender<u64>,
    broker_up: bool,
    workers: HashMap<String, Live>,
    queues: HashSet<String>,
    activity: Arc<Activity>,
    last_purge: Instant,
    /// The master's secrets (its broker password and API token), masked in whatever a worker
    /// sends of a job's output or result before it is stored, whatever the worker did.
    secrets: Arc<Redactor>,
    /// Submissions in progress, by sweep.
    submitting: Submitting,
    pump: Pump,
    /// Claims denied per job because its sweep is bound to other code than the claiming
    /// worker's (see [`deny_wrong_code`]).
    code_denials: HashMap<(SweepId, JobId), u32>,
}

/// Submissions in progress: each sweep's submission number, and whether the sweep was
/// canceled meanwhile (its next jobs are then refused).
#[derive(Clone, Default)]
struct Submitting {
    by_sweep: HashMap<String, (u64, bool)>,
    /// Ends of submissions whose step failed to commit: they come again with the next step
    /// (nobody waits for an answer to them, so nobody would send them again).
    ends: Vec<(SweepId, u64, Option<String>, u64)>,
}

/// Jobs that submissions stored, sent to the broker from the store as the session takes them:
/// the store, not memory, holds a large submission's backlog, and the core never waits for
/// the broker on its behalf.
#[derive(Default)]
struct Pump {
    /// Whether stored jobs may remain unsent.
    active: bool,
    /// The walk's place: the sweep, expansion index and row id of the last job sent.
    cursor: Option<crate::store::PendingPlace>,
    /// Jobs were stored since the walk began: once at its end, walk again from the start.
    rescan: bool,
    /// Sent and not yet confirmed: skipped by a second walk.
    in_flight: HashSet<(SweepId, JobId, u32)>,
    /// Released attempts, sent again first and whatever their state: a late confirm of
    /// their first message may have marked them `queued`, which the walk does not see.
    released: std::collections::VecDeque<Publish>,
}

impl Pump {
    /// Everything pending is sent again (a new broker session).
    fn restart(&mut self) {
        let released = std::mem::take(&mut self.released);
        *self = Self {
            active: true,
            released,
            ..Self::default()
        };
    }

    fn settled(&mut self, batch: &[Publish]) {
        for p in batch {
            self.in_flight.remove(&(p.sweep.clone(), p.job, p.attempt));
        }
    }
}

/// Jobs per batch the pump reads from the store.
const PUMP_BATCH: u64 = 1000;

/// What to do once a transaction has committed.
#[derive(Default)]
struct Effects {
    /// Jobs became `pending` (a submission, a retry, a requeue): the pump sends them from the
    /// store.
    backlog: bool,
    /// Attempts a worker gave back, to publish again as they are.
    released: Vec<Publish>,
    control: Vec<(String, ToWorker)>,
    /// Answers to claims, one message per worker queue.
    verdicts: HashMap<String, Vec<Verdict>>,
    replies: Vec<Box<dyn FnOnce() + Send>>,
    changed: bool,
}

/// A committed batch: what it sets off.
struct Committed {
    effects: Effects,
    session_up: bool,
    big_submit: bool,
}

/// The last delivery of each consumer (events, dead letters) of each broker session in a
/// batch. A consumer's deliveries reach the core in their order, and every earlier one was
/// settled by an earlier step, so a `multiple` ack or nack of the last settles exactly the
/// batch's. (A poison event, acked by the broker task on arrival, is no longer outstanding
/// and so not covered again.)
fn last_deliveries(inbound: &[Inbound]) -> Vec<lapin::Acker> {
    let mut session = 0u32;
    let mut last: Vec<((u32, bool), lapin::Acker)> = Vec::new();
    for m in inbound {
        let (dead, acker) = match m {
            Inbound::Up => {
                session += 1;
                continue;
            }
            Inbound::Event(_, acker) => (false, acker),
            Inbound::Dead { acker, .. } => (true, acker),
            Inbound::Confirmed(_) | Inbound::Unconfirmed(_) | Inbound::Down(_) => continue,
        };
        match last.iter_mut().find(|(k, _)| *k == (session, dead)) {
            Some(slot) => slot.1 = acker.clone(),
            None => last.push(((session, dead), acker.clone())),
        }
    }
    last.into_iter().map(|(_, a)| a).collect()
}

impl Core {
    fn new(
        store: Store,
        config: MasterConfig,
        (out, jobs_out): (mpsc::Sender<Outbound>, mpsc::Sender<JobsOut>),
        changes: watch::Sender<u64>,
        activity: Arc<Activity>,
        secrets: Redactor,
    ) -> Result<Self, MasterError> {
        // Leases survive a restart: every worker holding one gets a full timeout to show up.
        let mut workers = HashMap::new();
        for (worker, _) in store.running()? {
            workers.insert(
                worker,
                Live {
                    last_seen: Instant::now(),
                    batches: false,
                    code: None,
                    queues: Vec::new(),
                    free: true,
                },
            );
        }
        Ok(Self {
            store,
            config,
            out,
            jobs_out,
            changes,
            broker_up: false,
            workers,
            queues: HashSet::from([topology::DEFAULT_QUEUE.to_owned()]),
            activity,
            last_purge: Instant::now(),
            secrets: Arc::new(secrets),
            submitting: Submitting::default(),
            pump: Pump::default(),
            code_denials: HashMap::new(),
        })
    }

    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
        _stop: &mut watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let jobs_out = self.jobs_out.clone();
        loop {
            let mut batch_in = Vec::new();
            let mut batch_cmd = Vec::new();
            let mut ticked = false;
            let pumping = self.pump.active && self.broker_up;
            tokio::select! {
                permit = jobs_out.reserve(), if pumping => {
                    let Ok(permit) = permit else { return };
                    if let Err(e) = self.pump_once(permit) {
                        self.activity.metrics.store_error();
                        error!(cause = %e, "reading stored jobs to publish failed; trying again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    continue;
                }
                msg = inbound.recv() => match msg {
                    Some(m) => batch_in.push(m),
                    None => return,
                },
                cmd = commands.recv() => match cmd {
                    Some(c) => batch_cmd.push(c),
                    None => return,
                },
                _ = tick.tick() => ticked = true,
            }
            while batch_in.len() < 512 {
                match inbound.try_recv() {
                    Ok(m) => batch_in.push(m),
                    Err(_) => break,
                }
            }
            while batch_cmd.len() < 16 {
                match commands.try_recv() {
                    Ok(c) => batch_cmd.push(c),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.step(batch_in, batch_cmd, ticked).await {
                // A store error rolls the transaction back and gives the batch's deliveries
                // back to their queues, which deliver them again. Keep going; persistent
                // failures are logged and counted (`gridq_store_errors_total`) each time.
                self.activity.metrics.store_error();
                error!(cause = %e, "master step failed; its messages will be redelivered");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// One turn of the core: the batch's changes in one transaction, then what they set off.
    /// The deliveries of the batch are settled together: acked once committed, or given back
    /// to their queue (nack with requeue) when the transaction fails, so that they are
    /// processed again and never acked unprocessed by a later `multiple` ack.
    async fn step(
        &mut self,
        inbound: Vec<Inbound>,
        commands: Vec<Command>,
        ticked: bool,
    ) -> Result<(), StoreError> {
        let deliveries = last_deliveries(&inbound);
        let committed = match self.commit(inbound, commands, ticked) {
            Ok(c) => c,
            Err(e) => {
                let requeue = lapin::options::BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                futures_util::future::join_all(deliveries.iter().map(|d| d.nack(requeue))).await;
                return Err(e);
            }
        };
        let after = self.after_commit(committed).await;
        // Last, together: one `multiple` ack per consumer settles the whole batch. Each ack is
        // a round trip to lapin's I/O thread and a command for the broker; one per event cost
        // both a thread switch per event.
        let ack = lapin::options::BasicAckOptions { multiple: true };
        futures_util::future::join_all(deliveries.iter().map(|d| d.ack(ack))).await;
        after
    }

    /// The batch's changes, in one transaction.
    fn commit(
        &mut self,
        inbound: Vec<Inbound>,
        commands: Vec<Command>,
        ticked: bool,
    ) -> Result<Committed, StoreError> {
        let now = now_ms();
        let mut effects = Effects::default();
        let mut session_up = false;
        // Ends of submissions that a failed step lost come first; this step's are kept until
        // it has committed.
        let mut commands = commands;
        commands.splice(
            0..0,
            self.submitting
                .ends
                .drain(..)
                .map(
                    |(sweep, submission, interrupted, jobs)| Command::SubmitEnd {
                        sweep,
                        submission,
                        interrupted,
                        jobs,
                    },
                ),
        );
        let ends: Vec<_> = commands
            .iter()
            .filter_map(|c| match c {
                Command::SubmitEnd {
                    sweep,
                    submission,
                    interrupted,
                    jobs,
                } => Some((sweep.clone(), *submission, interrupted.clone(), *jobs)),
                _ => None,
            })
            .collect();
        for m in &inbound {
            match m {
                Inbound::Up => {
                    session_up = true;
                    // Heartbeats could not arrive while the broker was away: every worker gets
                    // a full timeout from now, so an outage does not count as losing them.
                    for live in self.workers.values_mut() {
                        live.last_seen = Instant::now();
                    }
                }
                Inbound::Down(_) => self.broker_up = false,
                Inbound::Confirmed(batch) | Inbound::Unconfirmed(batch) => {
                    self.pump.settled(batch);
                }
                _ => {}
            }
        }
        let due = if ticked {
            self.store.due_retries(now)?
        } else {
            Vec::new()
        };
        let lost: Vec<String> = if ticked && self.broker_up {
            let limit = self.config.heartbeat_timeout;
            self.workers
                .iter()
                .filter(|(_, l)| l.last_seen.elapsed() > limit)
                .map(|(w, _)| w.clone())
                .collect()
        } else {
            Vec::new()
        };
        // A large submission changes the shape of the tables: refresh the planner's statistics.
        let big_submit = commands
            .iter()
            .any(|c| matches!(c, Command::SubmitEnd { jobs, .. } if *jobs >= 10_000));
        let housekeeping = ticked && self.last_purge.elapsed() > RETENTION_CHECK;
        if housekeeping {
            self.last_purge = Instant::now();
            self.store.refresh_statistics()?;
        }
        let purge_before = match self.config.retention {
            Some(keep) if housekeeping => {
                Some(now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX)))
            }
            _ => None,
        };
        let config = self.config.clone();
        let activity = self.activity.clone();
        let secrets = self.secrets.clone();
        // The transaction works on a copy of what the core knows of its workers, which takes
        // the place of the original only once committed: a failed step leaves it as it was.
        // (A worker taken for lost and dropped from it by a step that then rolled back would
        // never be taken for lost again, and its jobs would stay `running`.)
        let mut workers = self.workers.clone();
        let mut submitting = self.submitting.clone();
        let queues = &mut self.queues;
        let code_denials = &mut self.code_denials;
        let out = &self.out;
        let done = self.store.transaction(|tx| {
            for m in inbound {
                match m {
                    Inbound::Event(mut event, _) => {
                        secrets.redact_event(&mut event);
                        let core = Known { config: &config, activity: &activity, code_denials: &mut *code_denials };
                        handle_event(tx, event, core, &mut workers, &mut effects, now)?;
                    }
                    Inbound::Dead { properties, body, .. } => {
                        let (queue, reason) = broker::dead_reason(&properties);
                        let kind = wire::kind_of(&properties).ok();
                        if matches!(kind.as_deref(), Some("job" | "jobs")) {
                            // Every attempt a dead job message carried is marked.
                            for job in wire::decode_jobs(&properties, &body).unwrap_or_default() {
                                let a = AttemptRef { sweep: job.sweep, job: job.job, attempt: job.attempt };
                                let why = if reason.contains("delivery_limit") {
                                    format!(
                                        "delivered {} times without being claimed: it kills its worker before it can start (out of memory?)",
                                        config.delivery_limit
                                    )
                                } else {
                                    reason.clone()
                                };
                                if tx.job_dead_lettered(&a, &why, now)? {
                                    effects.changed = true;
                                }
                            }
                        }
                        tx.dead_letter(&queue, kind.as_deref(), &reason, &body, now)?;
                    }
                    Inbound::Confirmed(batch) => {
                        tx.confirmed(&batch, now)?;
                        effects.changed = true;
                    }
                    Inbound::Unconfirmed(_) | Inbound::Up | Inbound::Down(_) => {}
                }
            }
            for cmd in commands {
                handle_command(tx, cmd, queues, &mut submitting, out, &mut effects, now)?;
            }
            for a in due {
                if tx.retry_due(&a, now)?.is_some() {
                    effects.backlog = true;
                    effects.changed = true;
                }
            }
            if let Some(cutoff) = purge_before {
                let purged = tx.purge_finished_sweeps(cutoff)?;
                if !purged.is_empty() {
                    info!(sweeps = ?purged, "deleted finished sweeps past the retention period");
                    effects.changed = true;
                }
            }
            for w in lost {
                warn!(worker = %w, "worker lost: no heartbeat");
                workers.remove(&w);
                for effect in tx.worker_lost(&w, "missed heartbeats", config.max_lost, now)? {
                    effects.changed = true;
                    match effect {
                        LostEffect::Requeue(_) => effects.backlog = true,
                        LostEffect::Failed(a) => warn!(sweep = %a.sweep, job = %a.job, "job failed: its workers keep dying"),
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = done {
            self.submitting.ends = ends;
            return Err(e);
        }
        self.workers = workers;
        self.submitting = submitting;
        Ok(Committed {
            effects,
            session_up,
            big_submit,
        })
    }

    /// What a committed batch sets off. What someone waits for goes first: verdicts (a worker
    /// waits to start its jobs), replies and the change notice (API clients), then new job
    /// messages.
    async fn after_commit(&mut self, committed: Committed) -> Result<(), StoreError> {
        let Committed {
            mut effects,
            session_up,
            big_submit,
        } = committed;
        if big_submit {
            self.store.refresh_statistics()?;
        }
        for (queue, verdicts) in effects.verdicts {
            effects
                .control
                .push((queue, ToWorker::Verdicts { verdicts }));
        }
        if !effects.control.is_empty() {
            let _ = self.out.send(Outbound::Control(effects.control)).await;
        }
        for reply in effects.replies {
            reply();
        }
        if effects.changed {
            self.changes.send_modify(|v| *v += 1);
        }
        if session_up {
            self.broker_up = true;
            for q in &self.queues {
                let _ = self.out.send(Outbound::DeclareQueue(q.clone())).await;
            }
            // Everything not yet confirmed goes out again (duplicates are denied at claim
            // time), through the pump.
            self.pump.restart();
        }
        // Every job to publish is `pending` in the store: the pump sends it, without the core
        // ever waiting for the broker.
        if effects.backlog {
            self.pump.active = true;
            self.pump.rescan = true;
        }
        if !effects.released.is_empty() {
            for p in &effects.released {
                self.pump
                    .in_flight
                    .remove(&(p.sweep.clone(), p.job, p.attempt));
            }
            self.pump.released.extend(effects.released);
            self.pump.active = true;
        }
        Ok(())
    }
}

impl Core {
    /// Jobs per message for a publication of `n` jobs. Many jobs at once go out several per
    /// message (a quorum queue's cost is per message) while every online worker takes
    /// batches: it reads them, and its recent jobs were short, so it holds jobs ahead. A
    /// worker running long jobs would start only one job of a message and give the others
    /// back.
    fn per_message(&self, n: usize) -> usize {
        if n >= BATCH_FROM && !self.workers.is_empty() && self.workers.values().all(|w| w.batches) {
            JOBS_PER_MESSAGE
        } else {
            1
        }
    }

    /// Sends the next batch of stored, unsent jobs, or ends the walk when there is none.
    fn pump_once(&mut self, permit: mpsc::Permit<'_, JobsOut>) -> Result<(), StoreError> {
        if !self.pump.released.is_empty() {
            let n = self.pump.released.len().min(PUMP_BATCH as usize);
            let publish: Vec<Publish> = self.pump.released.iter().take(n).cloned().collect();
            let batch = self.store.read().job_messages(&publish)?;
            self.pump.released.drain(..n);
            self.send_pumped(permit, &publish, batch);
            return Ok(());
        }
        loop {
            let rows = self
                .store
                .pending_after(self.pump.cursor.as_ref(), PUMP_BATCH)?;
            let Some((place, _)) = rows.last() else {
                if std::mem::take(&mut self.pump.rescan) {
                    self.pump.cursor = None;
                    continue;
                }
                self.pump.active = false;
                return Ok(());
            };
            let place = place.clone();
            let publish: Vec<Publish> = rows
                .into_iter()
                .map(|(_, p)| p)
                .filter(|p| {
                    !self
                        .pump
                        .in_flight
                        .contains(&(p.sweep.clone(), p.job, p.attempt))
                })
                .collect();
            let batch = if publish.is_empty() {
                Vec::new()
            } else {
                self.store.read().job_messages(&publish)?
            };
            // Only once the batch is built: a failed read leaves the walk where it was.
            self.pump.cursor = Some(place);
            if batch.is_empty() {
                continue;
            }
            self.send_pumped(permit, &publish, batch);
            return Ok(());
        }
    }

    /// Hands a batch the pump read to the broker session; its jobs are in flight until their
    /// confirms come back.
    fn send_pumped(
        &mut self,
        permit: mpsc::Permit<'_, JobsOut>,
        publish: &[Publish],
        batch: Vec<(Publish, gridq_common::wire::JobMessage)>,
    ) {
        for p in publish {
            self.pump
                .in_flight
                .insert((p.sweep.clone(), p.job, p.attempt));
        }
        let per_message = self.per_message(batch.len());
        permit.send(JobsOut(batch, per_message));
    }
}

/// What the core knows that an event's handling reads or keeps.
struct Known<'a> {
    config: &'a MasterConfig,
    activity: &'a Activity,
    code_denials: &'a mut HashMap<(SweepId, JobId), u32>,
}

/// Denials of one job for other code, while a worker with its code had a free slot, after
/// which the job fails (that worker does not take it: it reads other queues, say).
const MAX_CODE_DENIALS: u32 = 20;
/// How long a job denied for other code waits before it goes out again while every worker
/// with its code is busy (such denials are not counted: the job waits for as long as needed,
/// sent out again at this pace, never in a tight loop).
const CODE_BUSY_WAIT_MS: u64 = 5_000;

/// Decides a claim of a job bound to the code tree `tree` (a `same_code` sweep) from a worker
/// that holds other code (`theirs`): the claim is denied, and the job waits a while in
/// `retrying` and goes out again (as its next attempt), for a worker with that code: 0.25 s,
/// doubling up to 2 s while such a worker has a free slot (counted), [`CODE_BUSY_WAIT_MS`]
/// while all of them are busy (not counted). It fails instead when no online worker reading
/// its queue holds that code, or after [`MAX_CODE_DENIALS`] counted denials. Returns the deny
/// reason, or `None` when the job is not waiting to start (the ordinary claim answers it).
#[allow(clippy::too_many_arguments)]
fn deny_wrong_code(
    tx: &crate::store::Tx<'_>,
    a: &AttemptRef,
    (tree, queue): (&str, &str),
    theirs: Option<&str>,
    worker: &WorkerId,
    workers: &HashMap<String, Live>,
    code_denials: &mut HashMap<(SweepId, JobId), u32>,
    now: u64,
) -> Result<Option<String>, StoreError> {
    let short = |t: &str| t.chars().take(12).collect::<String>();
    let holders: Vec<&Live> = workers
        .iter()
        .filter(|(id, live)| {
            id.as_str() != worker.as_str()
                && live.code.as_deref() == Some(tree)
                && (live.queues.is_empty() || live.queues.iter().any(|q| q == queue))
        })
        .map(|(_, live)| live)
        .collect();
    let held = !holders.is_empty();
    let busy = holders.iter().all(|live| !live.free);
    let key = (a.sweep.clone(), a.job);
    let counted = code_denials.get(&key).copied().unwrap_or(0);
    let denials = if busy { counted } else { counted + 1 };
    let theirs = theirs.map_or_else(
        || "no code version".to_owned(),
        |t| format!("tree {}", short(t)),
    );
    if held && denials < MAX_CODE_DENIALS {
        let delay = if busy {
            CODE_BUSY_WAIT_MS
        } else {
            250u64 << (denials - 1).min(3)
        };
        let reason = format!(
            "code mismatch: this sweep runs only on the code it was submitted with (tree {}); this worker's project holds {theirs}: left for a worker that holds it",
            short(tree)
        );
        if !tx.wrong_code(a, Some(delay), &reason, now)? {
            return Ok(None);
        }
        code_denials.insert(key, denials);
        return Ok(Some(reason));
    }
    let why = if held {
        format!(
            "denied {denials} times on workers with other code, while the worker(s) with it had a free slot and did not take it"
        )
    } else {
        "no online worker runs the code this sweep was submitted with".to_owned()
    };
    let reason = format!(
        "code mismatch: {why} (tree {}; the last claim came from a worker with {theirs}); sync that code to the workers' project (`gridq update`), or submit the sweep again from the code they run, then `gridq retry {} --failed`",
        short(tree),
        a.sweep
    );
    if !tx.wrong_code(a, None, &reason, now)? {
        return Ok(None);
    }
    code_denials.remove(&key);
    warn!(sweep = %a.sweep, job = %a.job, tree = %short(tree), "job failed: no worker runs its sweep's code");
    Ok(Some(reason))
}

fn handle_event(
    tx: &crate::store::Tx<'_>,
    event: FromWorker,
    known: Known<'_>,
    workers: &mut HashMap<String, Live>,
    effects: &mut Effects,
    now: u64,
) -> Result<(), StoreError> {
    let Known {
        config,
        activity,
        code_denials,
    } = known;
    fn seen(workers: &mut HashMap<String, Live>, w: &WorkerId) {
        workers
            .entry(w.as_str().to_owned())
            .and_modify(|l| l.last_seen = Instant::now())
            .or_insert(Live {
                last_seen: Instant::now(),
                batches: false,
                code: None,
                queues: Vec::new(),
                free: true,
            });
    }
    match event {
        FromWorker::Claim(claims) => {
            let worker = claims.worker;
            let host = host_of(&worker);
            if !workers.contains_key(worker.as_str()) {
                // Known from its first claim, before its first heartbeat lands.
                tx.worker_seen(
                    worker.as_str(),
                    &host,
                    "online",
                    None,
                    &serde_json::Value::Null,
                    now,
                )?;
            }
            seen(workers, &worker);
            if let Some(live) = workers.get_mut(worker.as_str()) {
                live.code.clone_from(&claims.code);
            }
            let answers = effects
                .verdicts
                .entry(topology::worker_queue(&worker))
                .or_default();
            // Each sweep's code binding, read once per message.
            let mut bindings: HashMap<SweepId, Option<(String, String)>> = HashMap::new();
            for claim in claims.claims {
                let a = &claim.attempt;
                let binding = match bindings.get(&a.sweep) {
                    Some(b) => b.clone(),
                    None => {
                        let b = tx.code_binding(&a.sweep)?;
                        bindings.insert(a.sweep.clone(), b.clone());
                        b
                    }
                };
                let wrong = match &binding {
                    Some((tree, queue)) if claims.code.as_deref() != Some(tree.as_str()) => {
                        deny_wrong_code(
                            tx,
                            a,
                            (tree, queue),
                            claims.code.as_deref(),
                            &worker,
                            workers,
                            code_denials,
                            now,
                        )?
                    }
                    _ => None,
                };
                let deny = if let Some(reason) = wrong {
                    effects.changed = true;
                    Some(reason)
                } else {
                    match tx.claim(a, &worker, &host, now)? {
                        ClaimVerdict::Grant => {
                            effects.changed = true;
                            if binding.is_some() {
                                code_denials.remove(&(a.sweep.clone(), a.job));
                            }
                            None
                        }
                        ClaimVerdict::Deny(reason) => Some(reason),
                    }
                };
                answers.push(Verdict {
                    attempt: claim.attempt,
                    token: claim.token,
                    deny,
                });
            }
        }
        FromWorker::Release(release) => {
            seen(workers, &release.worker);
            for attempt in &release.attempts {
                if let Some(p) = tx.release(attempt, release.worker.as_str(), now)? {
                    effects.released.push(p);
                    effects.changed = true;
                }
            }
        }
        FromWorker::Output(batch) => {
            tx.output(&batch.attempt, batch.first_seq, &batch.lines)?;
            effects.changed = true;
        }
        FromWorker::Finished(results) => {
            for f in results.results {
                seen(workers, &f.worker);
                match tx.finish(
                    &f,
                    u64::try_from(config.max_retry_backoff.as_millis()).unwrap_or(u64::MAX),
                    now,
                )? {
                    FinishEffect::Requeue(_) => effects.backlog = true,
                    FinishEffect::Duplicate => {
                        info!(sweep = %f.attempt.sweep, job = %f.attempt.job, attempt = f.attempt.attempt, worker = %f.worker, "duplicate result stored as such");
                    }
                    FinishEffect::Applied(_) | FinishEffect::Retry { .. } => {
                        activity.finished(now, f.finished_ms.checked_sub(f.started_ms));
                    }
                }
            }
            effects.changed = true;
        }
        FromWorker::Heartbeat(hb) => {
            seen(workers, &hb.worker);
            if let Some(live) = workers.get_mut(hb.worker.as_str()) {
                live.batches = hb.reads_batches && hb.short_jobs;
                live.code.clone_from(&hb.code);
                live.queues.clone_from(&hb.queues);
                live.free = hb.running.len() < usize::try_from(hb.slots).unwrap_or(usize::MAX);
            }
            let info = serde_json::to_value(&*hb).unwrap_or(serde_json::Value::Null);
            let state = if hb.draining { "draining" } else { "online" };
            tx.worker_seen(hb.worker.as_str(), &hb.host, state, None, &info, now)?;
            // Leases the worker does not list (granted well before this heartbeat) are lost.
            let margin = (3 * hb.interval_ms).max(3000);
            for effect in tx.reconcile(
                hb.worker.as_str(),
                &hb.running,
                now.saturating_sub(margin),
                config.max_lost,
                now,
            )? {
                effects.changed = true;
                if let LostEffect::Requeue(_) = effect {
                    effects.backlog = true;
                }
            }
        }
        FromWorker::Stopped(stopped) => {
            workers.remove(stopped.worker.as_str());
            let host = host_of(&stopped.worker);
            tx.worker_seen(
                stopped.worker.as_str(),
                &host,
                "stopped",
                Some(&stopped.reason),
                &serde_json::Value::Null,
                now,
            )?;
            // Anything it still held (it should have handed all back) runs again; the worker
            // stays `stopped` (worker_lost leaves a stopped worker's state alone).
            for effect in tx.worker_lost(
                stopped.worker.as_str(),
                &format!("stopped: {}", stopped.reason),
                u32::MAX,
                now,
            )? {
                if let LostEffect::Requeue(_) = effect {
                    effects.backlog = true;
                }
            }
            effects.changed = true;
        }
    }
    Ok(())
}

/// The host part of a `host-pid-random` worker id.
fn host_of(worker: &WorkerId) -> String {
    worker
        .as_str()
        .rsplitn(3, '-')
        .nth(2)
        .unwrap_or("")
        .to_owned()
}

/// One `cancels` message per worker with all of its leased attempts: sent one by one, the first
/// kill could free a slot that the worker filled with the next held job before its cancel came.
fn cancel_on_workers(effects: &mut Effects, leased: Vec<(String, AttemptRef)>) {
    let mut by_worker: Vec<(WorkerId, Vec<AttemptRef>)> = Vec::new();
    for (worker, attempt) in leased {
        let Ok(w) = WorkerId::new(worker) else {
            continue;
        };
        match by_worker.iter_mut().find(|(id, _)| *id == w) {
            Some((_, attempts)) => attempts.push(attempt),
            None => by_worker.push((w, vec![attempt])),
        }
    }
    for (w, attempts) in by_worker {
        effects
            .control
            .push((topology::worker_queue(&w), ToWorker::Cancels { attempts }));
    }
}

fn handle_command(
    tx: &crate::store::Tx<'_>,
    cmd: Command,
    queues: &mut HashSet<String>,
    submitting: &mut Submitting,
    out: &mpsc::Sender<Outbound>,
    effects: &mut Effects,
    now: u64,
) -> Result<(), StoreError> {
    match cmd {
        Command::SubmitBegin {
            record,
            submission,
            reply,
        } => {
            if submitting.by_sweep.contains_key(record.name.as_str()) {
                let busy = SubmitRefused::Busy(record.name.clone());
                effects.replies.push(Box::new(move || {
                    let _ = reply.send(Err(busy));
                }));
                return Ok(());
            }
            if queues.insert(record.queue.clone()) {
                let _ = out.try_send(Outbound::DeclareQueue(record.queue.clone()));
            }
            tx.put_sweep(&record, now)?;
            submitting
                .by_sweep
                .insert(record.name.as_str().to_owned(), (submission, false));
            effects.changed = true;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(()));
            }));
        }
        Command::SubmitJobs {
            record,
            submission,
            jobs,
            rerun,
            reply,
        } => {
            let refused = match submitting.by_sweep.get(record.name.as_str()) {
                Some(&(n, false)) if n == submission => None,
                Some(&(n, true)) if n == submission => {
                    Some(SubmitRefused::Canceled(record.name.clone()))
                }
                // Not this submission's: a bug of the caller, refused like a second submission.
                _ => Some(SubmitRefused::Busy(record.name.clone())),
            };
            if let Some(refused) = refused {
                effects.replies.push(Box::new(move || {
                    let _ = reply.send(Err(refused));
                }));
                return Ok(());
            }
            // Sent by the pump, from the store.
            let (summary, _) = tx.add_jobs(&record, jobs, rerun, now)?;
            effects.backlog = true;
            effects.changed = true;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(summary));
            }));
        }
        Command::SubmitEnd {
            sweep,
            submission,
            interrupted,
            jobs,
        } => {
            if submitting.by_sweep.get(sweep.as_str()).map(|s| s.0) != Some(submission) {
                return Ok(());
            }
            let canceled = submitting
                .by_sweep
                .remove(sweep.as_str())
                .is_some_and(|s| s.1);
            match interrupted {
                None => info!(sweep = %sweep, jobs, "sweep submitted"),
                Some(why) if !canceled => {
                    warn!(sweep = %sweep, jobs, reason = %why, "submission interrupted; the sweep is canceled");
                    let reason = format!("submission interrupted: {why}");
                    let (_, running) = tx.cancel_sweep_because(&sweep, &reason, now)?;
                    cancel_on_workers(effects, running);
                    effects.changed = true;
                }
                Some(_) => {
                    info!(sweep = %sweep, jobs, "submission stopped: the sweep was canceled")
                }
            }
        }
        Command::CancelSweep { sweep, reply } => {
            if tx.view().sweep_record(&sweep)?.is_none() {
                effects.replies.push(Box::new(move || {
                    let _ = reply.send(Err(format!("no sweep named `{sweep}`")));
                }));
                return Ok(());
            }
            if let Some(s) = submitting.by_sweep.get_mut(sweep.as_str()) {
                s.1 = true;
            }
            let (n, running) = tx.cancel_sweep(&sweep, now)?;
            cancel_on_workers(effects, running);
            effects.changed = true;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(n));
            }));
        }
        Command::CancelJob { sweep, job, reply } => {
            let outcome = tx.cancel_job(&sweep, &job, now)?;
            let changed = outcome.is_some();
            cancel_on_workers(effects, outcome.unwrap_or_default());
            effects.changed |= changed;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(changed));
            }));
        }
        Command::RetryFailed { sweep, reply } => {
            let publish = tx.retry_failed(&sweep, now)?;
            let n = publish.len() as u64;
            effects.backlog |= n > 0;
            effects.changed = true;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(n));
            }));
        }
        Command::RetryJob { sweep, job, reply } => {
            let publish = tx.retry_job(&sweep, &job, now)?;
            let retried = publish.is_some();
            effects.backlog |= retried;
            effects.changed |= retried;
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(retried));
            }));
        }
        Command::DrainWorker { worker, reply } => {
            effects
                .control
                .push((topology::worker_queue(&worker), ToWorker::Drain));
            effects.replies.push(Box::new(move || {
                let _ = reply.send(Ok(()));
            }));
        }
    }
    Ok(())
}

impl Handle {
    /// Sends a command built around its reply channel and waits for the answer.
    async fn request<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        let stopping = || "the master is stopping".to_string();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(build(reply))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// Cancels a sweep; returns how many jobs were canceled.
    ///
    /// # Errors
    /// When the sweep does not exist or the core is gone.
    pub async fn cancel_sweep(&self, sweep: SweepId) -> Result<u64, String> {
        self.request(|reply| Command::CancelSweep { sweep, reply })
            .await
    }

    /// Cancels a job; `false` when it had already finished.
    ///
    /// # Errors
    /// When the core is gone.
    pub async fn cancel_job(&self, sweep: SweepId, job: JobId) -> Result<bool, String> {
        self.request(|reply| Command::CancelJob { sweep, job, reply })
            .await
    }

    /// Retries one failed, timed-out or canceled job; `false` when it is in another state.
    ///
    /// # Errors
    /// When the core is gone.
    pub async fn retry_job(&self, sweep: SweepId, job: JobId) -> Result<bool, String> {
        self.request(|reply| Command::RetryJob { sweep, job, reply })
            .await
    }

    /// Asks a worker to drain (finish its running jobs, take no new ones, exit).
    ///
    /// # Errors
    /// When the master is stopping.
    pub async fn drain_worker(&self, worker: WorkerId) -> Result<(), String> {
        self.request(|reply| Command::DrainWorker { worker, reply })
            .await
    }

    /// Retries the failed jobs of a sweep; returns how many.
    ///
    /// # Errors
    /// When the core is gone.
    pub async fn retry_failed(&self, sweep: SweepId) -> Result<u64, String> {
        self.request(|reply| Command::RetryFailed { sweep, reply })
            .await
    }
}

/// Whether every job of the summary's sweep is final.
pub fn sweep_done(counts: &std::collections::BTreeMap<String, u64>) -> bool {
    counts
        .iter()
        .all(|(state, n)| *n == 0 || state.parse::<JobState>().is_ok_and(JobState::is_final))
}
