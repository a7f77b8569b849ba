//! The worker agent: consumes job messages, claims them from the master, runs them with the
//! [`runner`], and reports output, results and heartbeats.
//!
//! # Slots
//! The [`feeder`] takes deliveries, claims them and starts granted jobs on free
//! slots; a job's delivery is acked when it starts, so RabbitMQ's `consumer_timeout` never
//! applies to a running job. With `--gpus 0,1` there is one slot per GPU and each job sees only
//! its GPU through `CUDA_VISIBLE_DEVICES`.
//!
//! # Connection loss
//! Sessions are rebuilt with backoff. Running jobs are untouched by a broker outage; their
//! `finished` reports wait in the outbox and go out, confirmed, once a session is back.
//! Deliveries whose claim was not answered when the connection dropped are redelivered by the
//! broker; granted ones are this worker's lease and still run.
//!
//! # Stopping
//! The first stop request (SIGTERM, Ctrl-C, or a `drain` from the master) stops consuming;
//! running jobs then finish (`OnStop::Finish`, the default) or are killed and handed back to be
//! run again without counting as a failure (`OnStop::Requeue`). A second request exits at once:
//! the jobs die with the worker (parent-death signal) and the master redelivers them when the
//! heartbeats stop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use gridq_common::amqp::{self, Backoff};
use gridq_common::secret::Redactor;
use gridq_common::topology;
use gridq_common::wire::{
    self, AttemptRef, FromWorker, GpuStat, Heartbeat, JobMessage, LogLine, Outcome, OutputBatch,
    Results, Stopped, ToWorker,
};
use gridq_common::{WorkerId, wire::Finished};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::code_version::CodeFile;
use crate::feeder::{self, Feed};
use crate::outputs::OutputDir;
use crate::runner::{self, JobSpec, KillReason, Killer, RunningJob, Termination};
use crate::scratch::Scratch;

/// What running jobs do when the worker is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStop {
    /// Let them finish, then exit.
    #[default]
    Finish,
    /// Kill them and hand them back to be run elsewhere.
    Requeue,
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub broker_url: String,
    /// Jobs run at once (ignored when `gpus` is set: one slot per GPU).
    pub slots: usize,
    pub gpus: Option<Vec<u32>>,
    /// User-facing queue names to consume.
    pub queues: Vec<String>,
    /// Jobs run here (a sweep's `workdir` is relative to it).
    pub project_dir: PathBuf,
    /// Scratch space for result files (see [`crate::scratch`]). `None`: a new private
    /// directory under the system's temporary directory, removed when the worker stops; a
    /// given one must be the worker's own and writable by no other user.
    pub scratch_dir: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    /// How long to wait for the master's answer to a claim before giving the delivery back.
    pub claim_timeout: Duration,
    /// SIGTERM → SIGKILL grace for timeouts, cancels and requeues.
    pub grace: Duration,
    pub on_stop: OnStop,
    pub id: Option<WorkerId>,
    /// The master's broker user: the only one whose job and control messages this worker takes.
    /// `None`: the worker's own user (one user for everything).
    pub master_user: Option<String>,
    /// Jobs run as this `(uid, gid)` (a worker started as root, whose credentials file only
    /// root can read); `None`: as the worker's own user.
    pub job_user: Option<(u32, u32)>,
}

impl WorkerConfig {
    /// Defaults: one slot per CPU, the default queue, a private scratch directory.
    pub fn new(broker_url: String, project_dir: PathBuf) -> Self {
        Self {
            broker_url,
            slots: std::thread::available_parallelism().map_or(1, usize::from),
            gpus: None,
            queues: vec![topology::DEFAULT_QUEUE.to_owned()],
            project_dir,
            scratch_dir: None,
            heartbeat_interval: Duration::from_secs(2),
            claim_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            on_stop: OnStop::Finish,
            id: None,
            master_user: None,
            job_user: None,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The host name the worker reports: `GRIDQ_HOSTNAME` when set (deploy sets it to the host's
/// address, since a container on the host network sees only the machine's name), else the
/// system's.
fn hostname() -> String {
    if let Some(name) = std::env::var_os("GRIDQ_HOSTNAME").and_then(|n| n.into_string().ok()) {
        if !name.is_empty() {
            return name;
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A fresh worker id: `host-pid-random`.
pub fn new_worker_id() -> WorkerId {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let host = if host.is_empty() {
        "worker".to_owned()
    } else {
        host
    };
    WorkerId::new(format!(
        "{host}-{}-{:02x}{:02x}",
        std::process::id(),
        r[0],
        r[1]
    ))
    .expect("host name is sanitised to id characters")
}

/// The worker's id as the master will take it: a worker whose broker user is not the master's
/// speaks only for ids that start with its user and a dot (see
/// [`topology::may_speak_for`]), so the id gets that prefix when it lacks it.
///
/// # Errors
/// When the user cannot name workers (a dot or a character ids do not allow).
fn owned_id(id: WorkerId, user: &str, master_user: &str) -> std::io::Result<WorkerId> {
    if user == master_user || topology::may_speak_for(user, master_user, &id) {
        return Ok(id);
    }
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    if user.contains('.') {
        return Err(invalid(format!(
            "broker user `{user}` has a dot in its name, so it cannot name workers of its own; give the worker a user without one"
        )));
    }
    WorkerId::new(format!("{user}.{id}"))
        .map_err(|e| invalid(format!("broker user `{user}` cannot name workers: {e}")))
}

/// Stop requests: 0 none, 1 graceful, 2 or more immediate.
pub type StopSignal = watch::Receiver<u32>;

pub(crate) struct Shared {
    pub(crate) id: WorkerId,
    host: String,
    pub(crate) config: WorkerConfig,
    /// Running attempts and how to kill them.
    pub(crate) running: Mutex<HashMap<AttemptRef, Killer>>,
    /// Granted attempts waiting for a slot (listed in heartbeats with the running ones).
    pub(crate) held: Mutex<HashSet<AttemptRef>>,
    /// Verdicts and cancels for the feeder.
    feed: mpsc::UnboundedSender<Feed>,
    pub(crate) outbox: mpsc::Sender<Out>,
    /// The current session, when connected.
    pub(crate) session: watch::Receiver<Option<Arc<Session>>>,
    draining: watch::Sender<bool>,
    /// Whether the feeder holds jobs ahead (its recent jobs were short), for heartbeats.
    pub(crate) short_jobs: AtomicBool,
    /// The worker's secrets, masked in a job's output and result before they leave the host.
    secrets: Redactor,
    /// What every job inherits of the worker's environment (see [`crate::job_env`]).
    inherit: Arc<[(OsString, OsString)]>,
    /// The broker user it connects as: the `user_id` of everything it publishes.
    pub(crate) broker_user: String,
    /// The master's broker user (see [`WorkerConfig::master_user`]).
    pub(crate) master_user: String,
    /// Where result files go, and the job user's home.
    scratch: Arc<Scratch>,
    /// The project's code version (`.gridq/code.json`), read as each job starts and sent
    /// with each claim and heartbeat.
    pub(crate) code: CodeFile,
}

impl Shared {
    /// Whether a message comes from the master's broker user (RabbitMQ checks the `user_id`
    /// against the publishing connection's user, so it cannot be forged); else why not.
    pub(crate) fn check_from_master(
        &self,
        properties: &lapin::BasicProperties,
    ) -> Result<(), String> {
        match properties.user_id().as_ref().map(|u| u.as_str()) {
            Some(u) if u == self.master_user => Ok(()),
            sender => Err(format!(
                "not from the master's broker user `{}` but from {}",
                self.master_user,
                sender.map_or_else(
                    || "an unnamed user (no user_id)".to_owned(),
                    |u| format!("`{u}`")
                )
            )),
        }
    }
}

#[cfg(test)]
impl Shared {
    /// A worker's shared state with nothing connected (its feed and outbox lead nowhere).
    pub(crate) fn for_tests() -> Self {
        let (feed, _) = mpsc::unbounded_channel();
        let (outbox, _) = mpsc::channel(16);
        let (_, session) = watch::channel(None);
        let (draining, _) = watch::channel(false);
        let config = WorkerConfig::new(String::new(), PathBuf::new());
        Self {
            id: WorkerId::new("w-test").expect("worker id"),
            host: "localhost".into(),
            config,
            running: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            feed,
            outbox,
            session,
            draining,
            short_jobs: AtomicBool::new(false),
            secrets: Redactor::default(),
            inherit: Arc::from(Vec::new()),
            broker_user: "guest".into(),
            master_user: "guest".into(),
            scratch: Arc::new(
                Scratch::private_in(&std::env::temp_dir(), None).expect("a scratch directory"),
            ),
            code: CodeFile::new(std::path::Path::new(".")),
        }
    }
}

pub(crate) struct Session {
    pub(crate) connection: Arc<Connection>,
}

/// Something to send to the master.
pub(crate) struct Out {
    pub(crate) message: FromWorker,
    /// Wait for the broker's confirm, re-sending across reconnects.
    pub(crate) confirmed: bool,
    /// Told once the broker confirmed it.
    pub(crate) done: Vec<oneshot::Sender<()>>,
}

/// Runs a worker until it is stopped.
///
/// # Errors
/// Only setup errors (the scratch directory: see [`crate::scratch`]); broker problems are
/// retried forever.
pub async fn run(config: WorkerConfig, mut stop: StopSignal) -> std::io::Result<()> {
    // A private one is removed once the last reference goes: when this function has returned
    // and the tasks it spawned are dropped.
    let scratch = Arc::new(
        match &config.scratch_dir {
            Some(dir) => Scratch::given(dir, config.job_user),
            None => Scratch::private_in(&std::env::temp_dir(), config.job_user),
        }
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
    );
    let broker_user = amqp::user(&config.broker_url);
    let master_user = config
        .master_user
        .clone()
        .unwrap_or_else(|| broker_user.clone());
    let id = owned_id(
        config.id.clone().unwrap_or_else(new_worker_id),
        &broker_user,
        &master_user,
    )?;
    let host = hostname();
    let slots: Vec<Option<u32>> = match &config.gpus {
        Some(gpus) => gpus.iter().map(|g| Some(*g)).collect(),
        None => vec![None; config.slots.max(1)],
    };
    let (outbox_tx, outbox_rx) = mpsc::channel::<Out>(4096);
    let (session_tx, session_rx) = watch::channel::<Option<Arc<Session>>>(None);
    let (draining_tx, draining_rx) = watch::channel(false);
    let (feed_tx, feed_rx) = mpsc::unbounded_channel();
    let secrets = Redactor::for_broker_url(&config.broker_url);
    let inherit = crate::job_env::inherited(&secrets);
    let shared = Arc::new(Shared {
        id: id.clone(),
        host,
        config: config.clone(),
        running: Mutex::new(HashMap::new()),
        held: Mutex::new(HashSet::new()),
        feed: feed_tx.clone(),
        outbox: outbox_tx,
        session: session_rx,
        draining: draining_tx,
        short_jobs: AtomicBool::new(false),
        secrets,
        inherit,
        broker_user,
        master_user,
        scratch: scratch.clone(),
        code: CodeFile::new(&config.project_dir),
    });
    info!(worker = %id, scratch = %scratch.path().display(), slots = slots.len(), queues = ?config.queues, broker = %amqp::redact(&config.broker_url), "worker starting");

    let sessions = tokio::spawn(sessions(shared.clone(), session_tx));
    let outbox = tokio::spawn(outbox_loop(shared.clone(), outbox_rx));
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let mut feeder = tokio::spawn(feeder::run(
        shared.clone(),
        slots,
        feed_tx,
        feed_rx,
        draining_rx.clone(),
    ));

    // Wait for the first stop request (signal or drain).
    let mut drain_seen = draining_rx.clone();
    // A drain (asked by the master) always lets running jobs finish; `--on-stop` is what a
    // signal does.
    let signaled = tokio::select! {
        () = until(&mut stop, |n| *n >= 1) => true,
        () = until(&mut drain_seen, |d| *d) => false,
    };
    let _ = shared.draining.send(true);
    info!(worker = %id, mode = ?config.on_stop, signaled, "stopping: no new jobs");
    if signaled && config.on_stop == OnStop::Requeue {
        kill_all(&shared, KillReason::Shutdown);
    }
    // The feeder ends once every job is reported and every held one given back; a second
    // request ends everything now.
    tokio::select! {
        _ = &mut feeder => {
            let handed_back = Vec::new();
            let _ = shared.outbox.send(Out {
                message: FromWorker::Stopped(Stopped { worker: id.clone(), reason: "clean stop".into(), handed_back }),
                confirmed: true,
                done: Vec::new(),
            }).await;
            // Give the outbox a bounded time to flush the final reports.
            let flush = async {
                while shared.outbox.capacity() < shared.outbox.max_capacity() || OUTBOX_PENDING.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), flush).await;
            info!(worker = %id, "worker stopped");
        }
        () = until(&mut stop, |n| *n >= 2) => {
            warn!(worker = %id, "second stop request: exiting now; running jobs are killed and will be redelivered");
            kill_all(&shared, KillReason::Shutdown);
        }
    }
    feeder.abort();
    heartbeat.abort();
    outbox.abort();
    sessions.abort();
    Ok(())
}

/// Waits until the watched value satisfies `f` (or its sender is gone), holding no guard.
pub(crate) async fn until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(f).await.map(|_| ());
}

static OUTBOX_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn kill_all(shared: &Shared, reason: KillReason) {
    if let Ok(running) = shared.running.lock() {
        for killer in running.values() {
            killer.kill(reason);
        }
    }
}

/// Keeps a session up: connects, declares the worker's own queue, and dispatches control
/// messages; on loss, reconnects with backoff.
async fn sessions(shared: Arc<Shared>, session_tx: watch::Sender<Option<Arc<Session>>>) {
    let mut backoff = Backoff::default();
    let name = format!("gridq-worker {}", shared.id);
    loop {
        let connection = match amqp::connect_small(&shared.config.broker_url, &name).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(cause = %e, retry_in = ?delay, "cannot connect to the broker");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let control = async {
            let ch = connection.create_channel().await?;
            let queue = topology::declare_worker_queue(&ch, &shared.id).await?;
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "control".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((ch, consumer))
        };
        let (_ch, mut consumer) = match control.await {
            Ok(c) => c,
            Err(e) => {
                warn!(cause = %e, "cannot set up the worker's queue");
                let _ = connection.close(200, "retry".into()).await;
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        info!(broker = %amqp::redact(&shared.config.broker_url), "connected to the broker");
        let _ = session_tx.send(Some(Arc::new(Session {
            connection: connection.clone(),
        })));
        while let Some(delivery) = consumer.next().await {
            let Ok(delivery) = delivery else { break };
            if let Err(why) = shared.check_from_master(&delivery.properties) {
                warn!(cause = %why, "ignoring a control message");
                continue;
            }
            match wire::decode::<ToWorker>(&delivery.properties, &delivery.data) {
                Ok(msg) => dispatch(&shared, msg),
                Err(e) => warn!(cause = %e, "ignoring a control message this worker cannot read"),
            }
        }
        warn!("broker session lost; reconnecting");
        let _ = session_tx.send(None);
        let _ = connection.close(200, "reconnecting".into()).await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn dispatch(shared: &Shared, msg: ToWorker) {
    match msg {
        ToWorker::Verdicts { verdicts } => {
            let _ = shared.feed.send(Feed::Verdicts(verdicts));
        }
        ToWorker::Cancel { attempt } => {
            let _ = shared.feed.send(Feed::Cancel(attempt));
        }
        // All into the feed at once: the feeder applies them before the end of a job killed by
        // one of them (which comes after them in the same feed) frees its slot.
        ToWorker::Cancels { attempts } => {
            for attempt in attempts {
                let _ = shared.feed.send(Feed::Cancel(attempt));
            }
        }
        ToWorker::Drain => {
            info!("the master asked this worker to drain");
            let _ = shared.draining.send(true);
        }
    }
}

/// Publishes what workers send the master; confirmed messages are re-sent until confirmed.
async fn outbox_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Out>) {
    let mut queue: VecDeque<Out> = VecDeque::new();
    let mut session_rx = shared.session.clone();
    let mut channel: Option<Channel> = None;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(out) => queue.push_back(out),
                None => return,
            }
        }
        while let Ok(out) = rx.try_recv() {
            queue.push_back(out);
        }
        OUTBOX_PENDING.store(queue.len(), std::sync::atomic::Ordering::SeqCst);
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = None;
            let session = session_rx.borrow_and_update().clone();
            match session {
                Some(s) => match open_publish_channel(&s.connection).await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        warn!(cause = %e, "cannot open a channel to report to the master");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                None => {
                    // Heartbeats and output are not worth keeping forever while disconnected.
                    queue.retain(|o| o.confirmed || matches!(o.message, FromWorker::Output(_)));
                    while queue.len() > 20_000 {
                        if let Some(pos) = queue.iter().position(|o| !o.confirmed) {
                            queue.remove(pos);
                        } else {
                            break;
                        }
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), session_rx.changed()).await;
                    continue;
                }
            }
        }
        let Some(ch) = channel.as_ref() else { continue };
        // Publish everything queued; wait for the confirms of those that need one.
        let mut confirms = Vec::new();
        let batch = merge_results(queue.drain(..));
        let mut failed_from = None;
        for (i, out) in batch.iter().enumerate() {
            let enc = wire::encode(&out.message);
            // Only results need to survive a broker restart; the rest is transient.
            let properties = if out.confirmed {
                enc.properties
            } else {
                enc.properties.with_delivery_mode(1)
            };
            match ch
                .basic_publish(
                    topology::EVENTS_EXCHANGE.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &enc.body,
                    properties.with_user_id(shared.broker_user.as_str().into()),
                )
                .await
            {
                Ok(c) => {
                    if out.confirmed {
                        confirms.push((i, c));
                    }
                }
                Err(e) => {
                    warn!(cause = %e, "publishing to the master failed; will retry");
                    failed_from = Some(i);
                    break;
                }
            }
        }
        let mut retry: Vec<usize> = Vec::new();
        let mut confirmed = Vec::new();
        for (i, c) in confirms {
            match c.await {
                Ok(conf) if conf.is_ack() => confirmed.push(i),
                _ => retry.push(i),
            }
        }
        let mut batch: Vec<Option<Out>> = batch.into_iter().map(Some).collect();
        for i in confirmed {
            if let Some(o) = batch[i].as_mut() {
                for done in o.done.drain(..) {
                    let _ = done.send(());
                }
            }
        }
        // Unconfirmed (or unsent) confirmed messages go back to the front, in order.
        let mut back: Vec<Out> = Vec::new();
        for i in retry {
            if let Some(o) = batch[i].take() {
                back.push(o);
            }
        }
        if let Some(from) = failed_from {
            for o in batch.iter_mut().skip(from) {
                if let Some(o) = o.take() {
                    back.push(o);
                }
            }
            channel = None;
        }
        for o in back.into_iter().rev() {
            queue.push_front(o);
        }
        OUTBOX_PENDING.store(queue.len(), std::sync::atomic::Ordering::SeqCst);
        if !queue.is_empty() {
            channel = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Results at most in one message.
const RESULTS_PER_MESSAGE: usize = 256;

/// Joins results that follow each other into one message (one publish, one confirm, one
/// master event); everything keeps its order.
fn merge_results(outs: impl Iterator<Item = Out>) -> Vec<Out> {
    let mut merged: Vec<Out> = Vec::new();
    for out in outs {
        if let (
            Some(Out {
                message: FromWorker::Finished(last),
                done,
                ..
            }),
            FromWorker::Finished(next),
        ) = (merged.last_mut(), &out.message)
        {
            if last.results.len() + next.results.len() <= RESULTS_PER_MESSAGE {
                let Out {
                    message: FromWorker::Finished(next),
                    done: next_done,
                    ..
                } = out
                else {
                    unreachable!("matched above")
                };
                last.results.extend(next.results);
                done.extend(next_done);
                continue;
            }
        }
        merged.push(out);
    }
    merged
}

async fn open_publish_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let ch = connection.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    let mut n: u64 = 0;
    let mut gpus: Vec<GpuStat> = Vec::new();
    loop {
        tick.tick().await;
        if shared.session.borrow().is_none() {
            continue;
        }
        if n % 5 == 0 {
            gpus = gpu_stats().await;
        }
        n += 1;
        // Held (granted, waiting for a slot) and running: both are this worker's leases.
        let mut running: Vec<AttemptRef> = shared
            .held
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        if let Ok(r) = shared.running.lock() {
            running.extend(r.keys().cloned());
        }
        let (mem_total_mb, mem_used_mb) = memory_mb();
        let hb = Heartbeat {
            worker: shared.id.clone(),
            host: shared.host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            slots: u32::try_from(
                shared
                    .config
                    .gpus
                    .as_ref()
                    .map_or(shared.config.slots, Vec::len),
            )
            .unwrap_or(u32::MAX),
            queues: shared.config.queues.clone(),
            running,
            cpus: u32::try_from(std::thread::available_parallelism().map_or(1, usize::from))
                .unwrap_or(1),
            load1: load1(),
            mem_total_mb,
            mem_used_mb,
            gpus: gpus.clone(),
            draining: *shared.draining.borrow(),
            reads_batches: true,
            short_jobs: shared.short_jobs.load(Ordering::Relaxed),
            ts_ms: now_ms(),
            interval_ms: u64::try_from(shared.config.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
            code: shared.code.read().map(|c| c.tree),
        };
        let _ = shared.outbox.try_send(Out {
            message: FromWorker::Heartbeat(Box::new(hb)),
            confirmed: false,
            done: Vec::new(),
        });
    }
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn memory_mb() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = field("MemTotal:") / 1024;
    let available = field("MemAvailable:") / 1024;
    (total, total.saturating_sub(available))
}

/// GPUs as `nvidia-smi` reports them; empty where there is none.
pub async fn gpu_stats() -> Vec<GpuStat> {
    let out = tokio::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .kill_on_drop(true)
        .output();
    let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(5), out).await else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total
/// --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuStat> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 5 {
                return None;
            }
            Some(GpuStat {
                index: f[0].parse().ok()?,
                name: f[1].to_owned(),
                utilization: f[2].parse::<f64>().map(|u| u / 100.0).unwrap_or(0.0),
                memory_used_mb: f[3].parse().unwrap_or(0),
                memory_total_mb: f[4].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// The job's environment: gridq's variables, the sweep's, and the GPU pin.
fn job_env(shared: &Shared, job: &JobMessage, gpu: Option<u32>) -> Vec<(String, String)> {
    let mut env = vec![
        ("GRIDQ_JOB_ID".to_owned(), job.job.to_string()),
        ("GRIDQ_SWEEP".to_owned(), job.sweep.to_string()),
        ("GRIDQ_ATTEMPT".to_owned(), job.attempt.to_string()),
        ("GRIDQ_WORKER".to_owned(), shared.id.to_string()),
    ];
    for (name, value) in &job.params {
        env.push((format!("GRIDQ_PARAM_{}", env_name(name)), value.clone()));
    }
    if let Some(home) = shared.scratch.home() {
        // The worker's HOME is root's: a job of another user gets one it can write to.
        env.push(("HOME".to_owned(), home.to_string_lossy().into_owned()));
    }
    env.extend(job.env.iter().cloned());
    if let Some(g) = gpu {
        env.push(("CUDA_VISIBLE_DEVICES".to_owned(), g.to_string()));
    }
    env
}

/// `model.lr` → `MODEL_LR`.
pub fn env_name(param: &str) -> String {
    param
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) async fn run_job(shared: &Arc<Shared>, job: JobMessage, gpu: Option<u32>) {
    let attempt = AttemptRef {
        sweep: job.sweep.clone(),
        job: job.job,
        attempt: job.attempt,
    };
    let workdir = match &job.workdir {
        Some(w) => shared.config.project_dir.join(w),
        None => shared.config.project_dir.clone(),
    };
    let result_path = shared.scratch.result_path(job.job, job.attempt);
    let spec = JobSpec {
        argv: job.argv.clone(),
        inherit: shared.inherit.clone(),
        env: job_env(shared, &job, gpu),
        workdir,
        timeout: job.timeout_ms.map(Duration::from_millis),
        grace: shared.config.grace,
        result_path: result_path.clone(),
        user: shared.config.job_user,
        output: Some(OutputDir::new(
            &shared.config.project_dir,
            &job.sweep,
            &job.job,
        )),
    };
    let code = shared.code.read();
    let (lines_tx, lines_rx) = mpsc::channel(1024);
    let started_ms = now_ms();
    // Whether the job may have left a result file to remove (most jobs write none: no unlink).
    let mut result_file = true;
    let finished = match RunningJob::spawn(spec, lines_tx) {
        Ok(running) => {
            if let Ok(mut r) = shared.running.lock() {
                r.insert(attempt.clone(), running.killer());
            }
            info!(sweep = %job.sweep, job = %job.job, attempt = job.attempt, "job started");
            let forward = tokio::spawn(forward_output(shared.clone(), attempt.clone(), lines_rx));
            let outcome = running.wait().await;
            // The runner found a file there exactly when it read a result or failed to.
            result_file = outcome.result.is_some() || outcome.result_error.is_some();
            let lines = forward.await.unwrap_or(0);
            let mut report = finished_report(shared, &attempt, outcome, lines, gpu);
            report.code = code;
            report
        }
        Err(e) => {
            drop(lines_rx);
            Finished {
                worker: shared.id.clone(),
                host: shared.host.clone(),
                attempt: attempt.clone(),
                outcome: Outcome::SpawnFailed,
                exit_code: None,
                signal: None,
                started_ms,
                finished_ms: now_ms(),
                result: None,
                reason: Some(e.to_string()),
                gpus: gpu.into_iter().collect(),
                lines: 0,
                code,
                outputs: None,
            }
        }
    };
    if result_file {
        let _ = std::fs::remove_file(&result_path);
    }
    info!(sweep = %job.sweep, job = %job.job, attempt = job.attempt, outcome = ?finished.outcome, "job finished");
    let mut message = FromWorker::Finished(Results {
        results: vec![finished],
    });
    shared.secrets.redact_event(&mut message);
    let _ = shared
        .outbox
        .send(Out {
            message,
            confirmed: true,
            done: Vec::new(),
        })
        .await;
    // Only now: a heartbeat that no longer lists the attempt is queued behind its report, so the
    // master never takes the attempt for lost.
    if let Ok(mut r) = shared.running.lock() {
        r.remove(&attempt);
    }
}

fn finished_report(
    shared: &Shared,
    attempt: &AttemptRef,
    outcome: runner::Outcome,
    lines: u64,
    gpu: Option<u32>,
) -> Finished {
    let started_ms = outcome
        .started_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let finished_ms = started_ms + u64::try_from(outcome.duration.as_millis()).unwrap_or(0);
    let (kind, exit_code, signal, mut reason) = match outcome.termination {
        Termination::Exited { code: 0 } => (Outcome::Succeeded, Some(0), None, None),
        Termination::Exited { code } => (
            Outcome::Failed,
            Some(code),
            None,
            Some(format!("exit code {code}")),
        ),
        Termination::Signaled { signal } => (
            Outcome::Failed,
            None,
            Some(signal),
            Some(format!("killed by signal {signal}")),
        ),
        Termination::TimedOut => (
            Outcome::TimedOut,
            None,
            None,
            Some("timeout exceeded".to_owned()),
        ),
        Termination::Killed {
            reason: KillReason::Canceled,
        } => (Outcome::Canceled, None, None, Some("canceled".to_owned())),
        Termination::Killed {
            reason: KillReason::Shutdown,
        } => (
            Outcome::HandedBack,
            None,
            None,
            Some("worker stopped; handed back".to_owned()),
        ),
        Termination::Unknown { error } => (Outcome::Failed, None, None, Some(error)),
    };
    if let Some(e) = outcome.result_error {
        reason = Some(match reason {
            Some(r) => format!("{r}; {e}"),
            None => e,
        });
    }
    Finished {
        worker: shared.id.clone(),
        host: shared.host.clone(),
        attempt: attempt.clone(),
        outcome: kind,
        exit_code,
        signal,
        started_ms,
        finished_ms,
        result: outcome.result,
        reason,
        gpus: gpu.into_iter().collect(),
        lines,
        code: None,
        outputs: outcome.outputs,
    }
}

/// Batches a job's output lines (up to 200 lines or 100 ms) and sends them to the master.
async fn forward_output(
    shared: Arc<Shared>,
    attempt: AttemptRef,
    mut rx: mpsc::Receiver<runner::OutputLine>,
) -> u64 {
    let mut seq: u64 = 0;
    let mut batch: Vec<LogLine> = Vec::new();
    let flush_every = Duration::from_millis(100);
    loop {
        let line = if batch.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(flush_every, rx.recv()).await {
                Ok(l) => l,
                Err(_) => {
                    send_batch(&shared, &attempt, &mut seq, &mut batch).await;
                    continue;
                }
            }
        };
        match line {
            Some(l) => {
                batch.push(LogLine {
                    stream: l.stream,
                    line: l.line,
                    ts_ms: l.ts_ms,
                });
                if batch.len() >= 200 {
                    send_batch(&shared, &attempt, &mut seq, &mut batch).await;
                }
            }
            None => {
                send_batch(&shared, &attempt, &mut seq, &mut batch).await;
                return seq;
            }
        }
    }
}

async fn send_batch(
    shared: &Shared,
    attempt: &AttemptRef,
    seq: &mut u64,
    batch: &mut Vec<LogLine>,
) {
    if batch.is_empty() {
        return;
    }
    let lines = std::mem::take(batch);
    let first_seq = *seq;
    *seq += lines.len() as u64;
    let mut message = FromWorker::Output(OutputBatch {
        worker: shared.id.clone(),
        attempt: attempt.clone(),
        first_seq,
        lines,
    });
    shared.secrets.redact_event(&mut message);
    let _ = shared
        .outbox
        .send(Out {
            message,
            confirmed: false,
            done: Vec::new(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(env_name("model.lr"), "MODEL_LR");
        assert_eq!(env_name("batch-size"), "BATCH_SIZE");
    }

    #[test]
    fn parses_nvidia_smi() {
        let gpus = parse_nvidia_smi(
            "0, NVIDIA H100 80GB HBM3, 37, 1024, 81559\n1, NVIDIA H100 80GB HBM3, 0, 4, 81559\n",
        );
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert!((gpus[0].utilization - 0.37).abs() < 1e-9);
        assert_eq!(gpus[1].memory_total_mb, 81559);
        assert!(parse_nvidia_smi("garbage").is_empty());
    }
}
