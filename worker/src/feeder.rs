//! The feeder: takes job deliveries from the broker, claims them from the master, and starts
//! granted jobs on free slots.
//!
//! One channel per session consumes every job queue the worker serves. Deliveries that arrive
//! together are claimed together (one message), the master answers them together, and a
//! granted job is acked when it starts, never while it runs: RabbitMQ's `consumer_timeout`
//! never applies to a running job.
//!
//! # How many jobs a worker holds
//! - **Long jobs** (the default, and whenever a recent job took longer than [`SHORT_JOB`]):
//!   the worker receives only what its free slots can start. Its consumers have a prefetch of
//!   one and are cancelled, before the ack, when the start fills the last free slot; so a job
//!   never waits at a busy worker while another worker is idle. (With several queues each
//!   consumer may deliver one job: one without a free slot is released once granted.)
//! - **Short jobs** (the last [`SHORT_RUN`] jobs each took at most [`SHORT_JOB`]): the
//!   consumers stay on with a prefetch of [`LOOKAHEAD_PER_SLOT`] per slot, so the next jobs
//!   are delivered, claimed and granted while the current ones run, and a freed slot starts
//!   the next job at once. A granted job that waits longer than [`HOLD_LIMIT`] for a slot (a
//!   long job came along) is released: the master queues the same attempt again, and the
//!   worker goes back to the long-job rule.
//!
//! A message may carry several jobs (kind `jobs`): each is claimed, granted and started on its
//! own, and the message is acked once all of them have started, been denied or gone back. The
//! look-ahead counts jobs, so the prefetch shrinks by the size of the largest message.
//!
//! A granted job is the worker's lease: heartbeats list it (held or running), and it runs even
//! when the session that delivered it is gone. A second delivery of an attempt the worker
//! already holds (the broker requeued it with a lost channel) is dropped.
//!
//! A delivery of an attempt the worker is giving back is the master's new message for it (or
//! the old one, requeued with a lost channel): it is claimed once the broker has confirmed the
//! release, never before. The claim then reaches the master behind the release on the events
//! queue, so the master has ended the old lease when it decides the claim.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SelectAll;
use futures_util::{FutureExt, StreamExt};
use gridq_common::topology;
use gridq_common::wire::{self, AttemptRef, Claim, Claims, FromWorker, JobMessage, Release};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::agent::{Out, Session, Shared, run_job, until};
use crate::runner::KillReason;

/// Jobs delivered ahead of the free slots while jobs are short, per slot. With [`SHORT_JOB`],
/// the last of them waits about 0.4 s for its slot, well within [`HOLD_LIMIT`].
pub const LOOKAHEAD_PER_SLOT: u16 = 16;
/// A job that ends within this time counts as short: for longer ones the claim round trip
/// (a few milliseconds) is not worth holding jobs for.
pub const SHORT_JOB: Duration = Duration::from_millis(25);
/// How many recent jobs must all be short for the worker to hold jobs ahead.
pub const SHORT_RUN: usize = 4;
/// The longest a granted job waits at a busy worker before it is given back.
pub const HOLD_LIMIT: Duration = Duration::from_secs(1);

/// What the rest of the worker tells the feeder.
#[derive(Debug)]
pub(crate) enum Feed {
    /// The master's answers to claims.
    Verdicts(Vec<wire::Verdict>),
    /// Cancel this attempt: drop it if held, kill it if running.
    Cancel(AttemptRef),
    /// A job ended and its report is in the outbox.
    Ended { slot: usize, took: Duration },
    /// The broker confirmed the release of these held jobs (by claim token).
    Released(Vec<u64>),
}

/// A delivery the worker claimed and has not started.
struct Held {
    job: JobMessage,
    attempt: AttemptRef,
    /// Its delivery tag; `None` once the channel that delivered it is gone.
    tag: Option<u64>,
    token: u64,
    /// Its claim has been sent (see [`State::releases`] for when it waits).
    claimed: bool,
    granted: bool,
    /// When the claim was (last) sent, or when the grant arrived.
    since: Instant,
}

/// What applying a [`Feed`] leaves to do on the job channel.
#[derive(Debug, Default, PartialEq)]
struct Applied {
    /// Delivery tags of held jobs that were dropped.
    settle: Vec<u64>,
    /// Claims that can go out now.
    claims: Vec<Claim>,
}

struct State {
    /// Slots with nothing running (indexes into `gpus`).
    free: Vec<usize>,
    gpus: Vec<Option<u32>>,
    /// Claimed and not started, in delivery order.
    held: VecDeque<Held>,
    /// Given back, waiting for the broker's confirm of the release.
    releasing: HashMap<u64, Held>,
    /// Durations of the last jobs.
    recent: VecDeque<Duration>,
    short: bool,
    next_token: u64,
}

impl State {
    /// Every slot free, nothing held, long-job mode.
    fn new(gpus: Vec<Option<u32>>) -> Self {
        Self {
            free: (0..gpus.len()).rev().collect(),
            gpus,
            held: VecDeque::new(),
            releasing: HashMap::new(),
            recent: VecDeque::new(),
            short: false,
            next_token: 1,
        }
    }

    /// Deliveries the worker may still take under the long-job rule.
    fn capacity(&self) -> isize {
        self.free.len() as isize - self.held.len() as isize
    }

    fn idle(&self) -> bool {
        self.held.is_empty() && self.releasing.is_empty() && self.free.len() == self.gpus.len()
    }

    /// The worker holds the attempt (claimed or granted) or runs it: a delivery of it is a
    /// second one.
    fn holds(&self, shared: &Shared, attempt: &AttemptRef) -> bool {
        self.held.iter().any(|h| &h.attempt == attempt)
            || shared.running.lock().is_ok_and(|r| r.contains_key(attempt))
    }

    /// The worker is giving the attempt back and the broker has not confirmed the release yet.
    /// A delivery of it is claimed only after that confirm: the release and the claim travel
    /// on different channels, and a claim the master decided first would be granted on the
    /// old lease (a worker's claim of its own lease is granted again), which the release would
    /// then end while the job runs.
    fn releases(&self, attempt: &AttemptRef) -> bool {
        self.releasing.values().any(|h| &h.attempt == attempt)
    }

    /// Takes a delivered job: claimed now, or once its attempt's release is confirmed.
    fn hold(&mut self, job: JobMessage, attempt: AttemptRef, tag: u64) -> Option<Claim> {
        let token = self.next_token;
        self.next_token += 1;
        let claimed = !self.releases(&attempt);
        if !claimed {
            debug!(job = %attempt.job, "a delivery of an attempt being given back; claiming it once the release is confirmed");
        }
        let claim = claimed.then(|| Claim {
            attempt: attempt.clone(),
            token,
        });
        self.held.push_back(Held {
            job,
            attempt,
            tag: Some(tag),
            token,
            claimed,
            granted: false,
            since: Instant::now(),
        });
        claim
    }

    fn ended(&mut self, slot: usize, took: Duration) {
        self.free.push(slot);
        self.recent.push_back(took);
        while self.recent.len() > SHORT_RUN {
            self.recent.pop_front();
        }
        let short = self.recent.len() == SHORT_RUN && self.recent.iter().all(|d| *d <= SHORT_JOB);
        if short != self.short {
            debug!(short, "job length mode changed");
        }
        self.short = short;
    }

    /// Moves every granted held job to `releasing`: returns their attempts, for the release
    /// message, and their tokens, for its confirm.
    fn give_back(&mut self, shared: &Shared) -> (Vec<AttemptRef>, Vec<u64>) {
        let (give_back, waiting): (VecDeque<Held>, VecDeque<Held>) =
            self.held.drain(..).partition(|h| h.granted);
        self.held = waiting;
        let attempts = give_back.iter().map(|h| h.attempt.clone()).collect();
        let tokens = give_back.iter().map(|h| h.token).collect();
        for h in give_back {
            set_held(shared, &h.attempt, false);
            self.releasing.insert(h.token, h);
        }
        (attempts, tokens)
    }

    /// Applies what the rest of the worker says: returns the delivery tags to ack (of the held
    /// jobs it dropped) and the claims that can go out now.
    fn apply(&mut self, shared: &Shared, m: Feed) -> Applied {
        let mut settle = Vec::new();
        let mut claims = Vec::new();
        match m {
            Feed::Verdicts(verdicts) => {
                debug!(verdicts = verdicts.len(), "verdicts arrived");
                for v in verdicts {
                    let Some(pos) = self
                        .held
                        .iter()
                        .position(|h| h.token == v.token && !h.granted)
                    else {
                        continue;
                    };
                    match v.deny {
                        None => {
                            let h = &mut self.held[pos];
                            h.granted = true;
                            h.since = Instant::now();
                            set_held(shared, &h.attempt, true);
                        }
                        Some(reason) => {
                            if let Some(h) = self.held.remove(pos) {
                                info!(sweep = %h.job.sweep, job = %h.job.job, attempt = h.job.attempt, reason = %reason, "claim denied; dropping the message");
                                settle.extend(h.tag);
                            }
                        }
                    }
                }
            }
            Feed::Cancel(attempt) => {
                let pos = self.held.iter().position(|h| h.attempt == attempt);
                match pos.and_then(|pos| self.held.remove(pos)) {
                    Some(h) => {
                        info!(sweep = %attempt.sweep, job = %attempt.job, "canceled before it started");
                        set_held(shared, &h.attempt, false);
                        settle.extend(h.tag);
                    }
                    None => kill_running(shared, &attempt),
                }
            }
            Feed::Ended { slot, took } => self.ended(slot, took),
            Feed::Released(tokens) => {
                for t in tokens {
                    let Some(released) = self.releasing.remove(&t) else {
                        continue;
                    };
                    settle.extend(released.tag);
                    for h in self
                        .held
                        .iter_mut()
                        .filter(|h| !h.claimed && h.attempt == released.attempt)
                    {
                        h.claimed = true;
                        h.since = Instant::now();
                        claims.push(Claim {
                            attempt: h.attempt.clone(),
                            token: h.token,
                        });
                    }
                }
            }
        }
        Applied { settle, claims }
    }
}

fn set_held(shared: &Shared, attempt: &AttemptRef, held: bool) {
    if let Ok(mut h) = shared.held.lock() {
        if held {
            h.insert(attempt.clone());
        } else {
            h.remove(attempt);
        }
    }
}

/// Runs until the worker drains and everything it held has started and ended or gone back.
pub(crate) async fn run(
    shared: Arc<Shared>,
    gpus: Vec<Option<u32>>,
    feed_tx: mpsc::UnboundedSender<Feed>,
    mut feed: mpsc::UnboundedReceiver<Feed>,
    mut draining: watch::Receiver<bool>,
) {
    let mut state = State::new(gpus);
    let mut session_rx = shared.session.clone();
    loop {
        if *draining.borrow() && state.idle() {
            return;
        }
        let Some(session) = session_rx.borrow_and_update().clone() else {
            // No broker: running jobs go on; their reports wait in the outbox.
            if *draining.borrow() && state.free.len() == state.gpus.len() {
                // Nothing runs: what is held cannot be given back without a broker, and the
                // master takes it back when this worker's heartbeats stop.
                return;
            }
            tokio::select! {
                r = session_rx.changed() => if r.is_err() { return },
                m = feed.recv() => match m {
                    // Nothing to ack without a channel: the deliveries went with it.
                    Some(m) => drop(state.apply(&shared, m)),
                    None => return,
                },
                _ = draining.changed() => {}
            }
            continue;
        };
        let ch = match open_intake(&shared, &session, &mut draining).await {
            Ok(Some(ch)) => ch,
            Ok(None) => {
                // Draining before the queues existed: nothing was delivered.
                if state.idle() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                debug!(cause = %e, "cannot open the job channel");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut session = Intake {
            shared: &shared,
            ch,
            consumers: SelectAll::new(),
            unsettled: BTreeSet::new(),
            ready: BTreeSet::new(),
            parts: HashMap::new(),
            per_message: 1,
            seen_upto: 0,
            seen_above: BTreeSet::new(),
            prefetch: None,
            generation: 0,
            feed_tx: &feed_tx,
        };
        if let Err(e) = session.run(&mut state, &mut feed, &mut draining).await {
            debug!(cause = %e, "job channel lost");
        }
        let _ = session.ch.close(200, "done".into()).await;
        // Unanswered claims go back with the channel (the broker requeues them); granted jobs
        // are this worker's and still run.
        state.held.retain(|h| h.granted);
        for h in &mut state.held {
            h.tag = None;
        }
        for h in state.releasing.values_mut() {
            h.tag = None;
        }
        if *draining.borrow() && state.idle() {
            return;
        }
        if !*draining.borrow() || !state.held.is_empty() || !state.releasing.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn kill_running(shared: &Shared, attempt: &AttemptRef) {
    let killer = shared
        .running
        .lock()
        .ok()
        .and_then(|r| r.get(attempt).cloned());
    match killer {
        Some(k) => {
            info!(sweep = %attempt.sweep, job = %attempt.job, "canceling a running job");
            k.kill(KillReason::Canceled);
        }
        None => debug!(job = %attempt.job, "cancel for a job not running here"),
    }
}

/// Opens the job channel once the job queues exist; `None` when draining first.
async fn open_intake(
    shared: &Shared,
    session: &Session,
    draining: &mut watch::Receiver<bool>,
) -> Result<Option<Channel>, lapin::Error> {
    for q in &shared.config.queues {
        let queue = topology::jobs_queue(q);
        // The master owns the job queues; wait until they exist.
        loop {
            let probe = session.connection.create_channel().await?;
            match topology::check_queue(&probe, &queue).await {
                Ok(_) => {
                    let _ = probe.close(200, "ok".into()).await;
                    break;
                }
                Err(_) => {
                    warn!(queue = %queue, "job queue does not exist yet; is the master running?");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                        () = until(draining, |d| *d) => return Ok(None),
                    }
                }
            }
        }
    }
    Ok(Some(session.connection.create_channel().await?))
}

/// One session's job channel and its consumers.
struct Intake<'a> {
    shared: &'a Arc<Shared>,
    ch: Channel,
    consumers: SelectAll<Consumer>,
    /// Delivery tags not acked or nacked yet.
    unsettled: BTreeSet<u64>,
    /// Of those, the ones to ack: they go out together (see [`Intake::flush_acks`]).
    ready: BTreeSet<u64>,
    /// Of those, the ones whose message carried several jobs: how many are still held.
    parts: HashMap<u64, usize>,
    /// The most jobs one message of this session carried: it divides the look-ahead into
    /// messages.
    per_message: u16,
    /// Every delivery tag up to this one has been seen (tags count up from 1 on a channel)...
    seen_upto: u64,
    /// ...and these above it (deliveries of several consumers interleave).
    seen_above: BTreeSet<u64>,
    /// The prefetch of the active consumers; `None` when not consuming.
    prefetch: Option<u16>,
    /// Numbers consumer tags, which must be unique on the channel.
    generation: u64,
    feed_tx: &'a mpsc::UnboundedSender<Feed>,
}

impl Intake<'_> {
    async fn run(
        &mut self,
        state: &mut State,
        feed: &mut mpsc::UnboundedReceiver<Feed>,
        draining: &mut watch::Receiver<bool>,
    ) -> Result<(), lapin::Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = *draining.borrow();
            self.shared
                .short_jobs
                .store(state.short, std::sync::atomic::Ordering::Relaxed);
            self.start_ready(state, stopping).await?;
            // While jobs are short and enough granted ones wait, acks (which return the
            // broker's credit) go out by half windows: the next deliveries then arrive, and are
            // claimed and granted, in batches of that size rather than one or two at a time.
            let slots = state.gpus.len();
            let window = u16::try_from(slots)
                .unwrap_or(u16::MAX)
                .saturating_mul(LOOKAHEAD_PER_SLOT)
                .max(1);
            // The look-ahead counts jobs; the prefetch counts messages.
            let messages = (window / self.per_message).max(1);
            let waiting = state.held.iter().filter(|h| h.granted).count();
            if !state.short
                || stopping
                || waiting < slots
                || self.ready.len() >= usize::from(messages) / 2
            {
                self.flush_acks().await?;
            }
            let wanted = if stopping {
                None
            } else if state.short {
                Some(messages)
            } else if state.capacity() > 0 {
                Some(1)
            } else {
                None
            };
            if wanted != self.prefetch {
                self.consume(wanted).await?;
            }
            if stopping && state.idle() {
                return Ok(());
            }
            if !self.ch.status().connected() {
                debug!("job channel closed");
                return Ok(());
            }
            tokio::select! {
                d = self.consumers.next(), if !self.consumers.is_empty() => match d {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        while let Some(Some(Ok(d))) = self.consumers.next().now_or_never() {
                            batch.push(d);
                        }
                        self.on_deliveries(state, batch, stopping).await?;
                    }
                    Some(Err(e)) => return Err(e),
                    // A cancelled consumer ended.
                    None => {}
                },
                m = feed.recv() => match m {
                    Some(m) => {
                        let applied = state.apply(self.shared, m);
                        for tag in applied.settle {
                            self.settle(Some(tag));
                        }
                        self.send_claims(applied.claims).await?;
                    }
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    self.on_tick(state).await?;
                    self.flush_acks().await?;
                }
                _ = draining.changed() => {}
            }
        }
    }

    /// Cancels the active consumers, then consumes every queue with `prefetch` (if any).
    async fn consume(&mut self, prefetch: Option<u16>) -> Result<(), lapin::Error> {
        if self.prefetch.is_some() {
            self.cancel().await?;
        }
        if let Some(n) = prefetch {
            self.ch.basic_qos(n, BasicQosOptions::default()).await?;
            self.generation += 1;
            for q in &self.shared.config.queues {
                let queue = topology::jobs_queue(q);
                let tag = format!("jobs-{}-{q}", self.generation);
                let consumer = self
                    .ch
                    .basic_consume(
                        queue.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                self.consumers.push(consumer);
            }
            self.prefetch = Some(n);
        }
        Ok(())
    }

    /// Cancels the active consumers. Deliveries already sent still arrive on their streams,
    /// which then end.
    async fn cancel(&mut self) -> Result<(), lapin::Error> {
        for q in &self.shared.config.queues {
            let tag = format!("jobs-{}-{q}", self.generation);
            self.ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
        }
        self.prefetch = None;
        Ok(())
    }

    /// Records a delivery tag as seen.
    fn saw(&mut self, tag: u64) {
        self.seen_above.insert(tag);
        while self.seen_above.remove(&(self.seen_upto + 1)) {
            self.seen_upto += 1;
        }
    }

    /// One job of a delivery of this channel has started, been dropped or gone back: the
    /// delivery is to be acked once that holds for all of its jobs.
    fn settle(&mut self, tag: Option<u64>) {
        let Some(tag) = tag else { return };
        if !self.unsettled.contains(&tag) {
            return;
        }
        if let Some(left) = self.parts.get_mut(&tag) {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.parts.remove(&tag);
        }
        self.ready.insert(tag);
    }

    /// Acks what is ready: everything below the oldest delivery still held in one `multiple`
    /// ack (one frame, one settlement for the queue), the rest one by one. Jobs mostly start
    /// in delivery order, so it is mostly one ack per batch. A `multiple` ack never reaches past
    /// a tag not seen yet (a delivery still on its way through another consumer's stream).
    async fn flush_acks(&mut self) -> Result<(), lapin::Error> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let blocking = self
            .unsettled
            .iter()
            .find(|t| !self.ready.contains(t))
            .copied();
        let limit = blocking.map_or(self.seen_upto + 1, |b| b.min(self.seen_upto + 1));
        let below: Vec<u64> = self.ready.range(..limit).copied().collect();
        if let Some(&last) = below.last() {
            self.ch
                .basic_ack(
                    last,
                    BasicAckOptions {
                        multiple: below.len() > 1,
                    },
                )
                .await?;
            for t in &below {
                self.ready.remove(t);
                self.unsettled.remove(t);
            }
        }
        let rest: Vec<u64> = self.ready.iter().copied().collect();
        for t in rest {
            self.ch.basic_ack(t, BasicAckOptions::default()).await?;
            self.ready.remove(&t);
            self.unsettled.remove(&t);
        }
        Ok(())
    }

    async fn on_deliveries(
        &mut self,
        state: &mut State,
        batch: Vec<Delivery>,
        stopping: bool,
    ) -> Result<(), lapin::Error> {
        let mut claims = Vec::new();
        debug!(deliveries = batch.len(), "jobs delivered");
        for delivery in batch {
            self.saw(delivery.delivery_tag);
            // Only the master's broker user may publish jobs.
            let jobs = self
                .shared
                .check_from_master(&delivery.properties)
                .map_err(|why| format!("a job message is {why}"))
                .and_then(|()| {
                    wire::decode_jobs(&delivery.properties, &delivery.data)
                        .map_err(|e| e.to_string())
                });
            let jobs = match jobs {
                Ok(jobs) => jobs,
                Err(e) => {
                    warn!(cause = %e, "dead-lettering a job message this worker cannot run");
                    topology::dead_letter(
                        &self.ch,
                        &self.shared.broker_user,
                        delivery.routing_key.as_str(),
                        &delivery.properties,
                        &delivery.data,
                        &e,
                    )
                    .await?;
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    continue;
                }
            };
            let tag = delivery.delivery_tag;
            // The largest message seen: the prefetch only shrinks, never flips back and forth
            // (each change cancels and restarts the consumers).
            self.per_message = self
                .per_message
                .max(u16::try_from(jobs.len()).unwrap_or(u16::MAX));
            let mut new = Vec::with_capacity(jobs.len());
            for job in jobs {
                let attempt = AttemptRef {
                    sweep: job.sweep.clone(),
                    job: job.job,
                    attempt: job.attempt,
                };
                if state.holds(self.shared, &attempt)
                    || new
                        .iter()
                        .any(|(_, a): &(JobMessage, AttemptRef)| a == &attempt)
                {
                    debug!(job = %attempt.job, "a second delivery of an attempt this worker holds; dropping it");
                    continue;
                }
                new.push((job, attempt));
            }
            if new.is_empty() {
                self.unsettled.insert(tag);
                self.settle(Some(tag));
                continue;
            }
            // Draining: back to the queue before anyone claims it. A delivery with no free
            // slot for it otherwise (one consumer per queue, each may deliver one) is claimed
            // and, once granted, released: a requeue would count against the queue's delivery
            // limit, and a message requeued at every job's end would end dead-lettered.
            if stopping {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await?;
                continue;
            }
            self.unsettled.insert(tag);
            if new.len() > 1 {
                self.parts.insert(tag, new.len());
            }
            for (job, attempt) in new {
                claims.extend(state.hold(job, attempt, tag));
            }
        }
        self.send_claims(claims).await
    }

    /// Claims are transient: one lost with a broker restart is sent again.
    async fn send_claims(&self, claims: Vec<Claim>) -> Result<(), lapin::Error> {
        if claims.is_empty() {
            return Ok(());
        }
        let enc = wire::encode(&FromWorker::Claim(Claims {
            worker: self.shared.id.clone(),
            claims,
            code: self.shared.code.read().map(|c| c.tree),
        }));
        self.ch
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                &enc.body,
                enc.properties
                    .with_delivery_mode(1)
                    .with_user_id(self.shared.broker_user.as_str().into()),
            )
            .await?;
        Ok(())
    }

    /// Claims without an answer are sent again; a granted job that waited too long for a slot
    /// ends the short-job mode.
    async fn on_tick(&mut self, state: &mut State) -> Result<(), lapin::Error> {
        let timeout = self.shared.config.claim_timeout;
        let mut again = Vec::new();
        for h in state.held.iter_mut().filter(|h| h.claimed && !h.granted) {
            if h.since.elapsed() >= timeout {
                warn!(sweep = %h.job.sweep, job = %h.job.job, "no answer to a claim yet; is the master running? asking again");
                h.since = Instant::now();
                again.push(Claim {
                    attempt: h.attempt.clone(),
                    token: h.token,
                });
            }
        }
        self.send_claims(again).await?;
        if state.short
            && state
                .held
                .iter()
                .any(|h| h.granted && h.since.elapsed() >= HOLD_LIMIT)
        {
            info!(
                "a held job waited for a slot too long: holding no jobs ahead while jobs are long"
            );
            state.short = false;
            state.recent.clear();
        }
        Ok(())
    }

    /// Starts granted jobs on free slots, in delivery order. Under the long-job rule (and when
    /// draining) a granted job with no free slot is released.
    async fn start_ready(&mut self, state: &mut State, stopping: bool) -> Result<(), lapin::Error> {
        while !state.free.is_empty() && !stopping {
            let Some(pos) = state.held.iter().position(|h| h.granted) else {
                break;
            };
            let Some(h) = state.held.remove(pos) else {
                break;
            };
            let Some(slot) = state.free.pop() else {
                break;
            };
            // The last free place is taken: stop consuming before the ack, so that the broker
            // sends nothing this worker could not start (it handles the cancel first).
            if !state.short && self.prefetch.is_some() && state.capacity() <= 0 {
                self.cancel().await?;
            }
            self.settle(h.tag);
            set_held(self.shared, &h.attempt, false);
            let shared = self.shared.clone();
            let gpu = state.gpus[slot];
            let feed_tx = self.feed_tx.clone();
            let job = h.job;
            tokio::spawn(async move {
                let started = Instant::now();
                run_job(&shared, job, gpu).await;
                let _ = feed_tx.send(Feed::Ended {
                    slot,
                    took: started.elapsed(),
                });
            });
        }
        if state.short && !stopping {
            return Ok(());
        }
        // Granted jobs that cannot start now go back as the same attempt.
        let (attempts, tokens) = state.give_back(self.shared);
        if attempts.is_empty() {
            return Ok(());
        }
        info!(
            jobs = attempts.len(),
            "giving back granted jobs that have no free slot"
        );
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self
            .shared
            .outbox
            .send(Out {
                message: FromWorker::Release(Release {
                    worker: self.shared.id.clone(),
                    attempts,
                }),
                confirmed: true,
                done: vec![done_tx],
            })
            .await;
        let feed_tx = self.feed_tx.clone();
        tokio::spawn(async move {
            if done_rx.await.is_ok() {
                let _ = feed_tx.send(Feed::Released(tokens));
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u8) -> (JobMessage, AttemptRef) {
        let job = JobMessage {
            sweep: gridq_common::SweepId::new("s").expect("sweep id"),
            job: gridq_common::JobId::from_bytes([n; 16]),
            attempt: 1,
            argv: vec!["true".into()],
            env: Vec::new(),
            params: Vec::new(),
            workdir: None,
            timeout_ms: None,
            gpus: 0,
        };
        let attempt = AttemptRef {
            sweep: job.sweep.clone(),
            job: job.job,
            attempt: job.attempt,
        };
        (job, attempt)
    }

    fn grant(state: &mut State, shared: &Shared, claim: &Claim) {
        let applied = state.apply(
            shared,
            Feed::Verdicts(vec![wire::Verdict {
                attempt: claim.attempt.clone(),
                token: claim.token,
                deny: None,
            }]),
        );
        assert_eq!(applied, Applied::default());
    }

    /// A job delivered with tag 1, claimed, granted, then given back: the job, its attempt and
    /// its first claim.
    fn given_back(state: &mut State, shared: &Shared, n: u8) -> (JobMessage, AttemptRef, Claim) {
        let (msg, attempt) = job(n);
        let first = state
            .hold(msg.clone(), attempt.clone(), 1)
            .expect("claimed at once");
        grant(state, shared, &first);
        assert_eq!(
            state.give_back(shared),
            (vec![attempt.clone()], vec![first.token])
        );
        (msg, attempt, first)
    }

    #[test]
    fn a_delivery_of_an_attempt_being_given_back_is_claimed_once_the_release_is_confirmed() {
        let shared = Shared::for_tests();
        let mut state = State::new(vec![None]);
        let (msg, attempt, first) = given_back(&mut state, &shared, 7);
        // The master's new message for it arrives (tag 2) before the release's confirm: it is
        // not a second delivery of something held, and it waits unclaimed.
        assert!(!state.holds(&shared, &attempt));
        assert_eq!(state.hold(msg.clone(), attempt.clone(), 2), None);
        assert_eq!(state.capacity(), 0, "it counts against the free slot");
        // Once the broker confirms the release, the old delivery is acked and the new one
        // claimed, under a token of its own.
        let applied = state.apply(&shared, Feed::Released(vec![first.token]));
        assert_eq!(applied.settle, vec![1]);
        let [claim] = applied.claims.as_slice() else {
            panic!("one claim expected: {applied:?}");
        };
        assert_eq!(claim.attempt, attempt);
        assert_ne!(claim.token, first.token);
        // Now it is held: a further delivery is a second one.
        assert!(state.holds(&shared, &attempt));
        grant(&mut state, &shared, claim);
        assert!(state.held[0].granted);
        // A confirm that comes again changes nothing.
        assert_eq!(
            state.apply(&shared, Feed::Released(vec![first.token])),
            Applied::default()
        );
    }

    #[test]
    fn a_canceled_delivery_waiting_for_a_release_is_dropped_and_never_claimed() {
        let shared = Shared::for_tests();
        let mut state = State::new(vec![None]);
        let (msg, attempt, first) = given_back(&mut state, &shared, 9);
        assert_eq!(state.hold(msg, attempt.clone(), 2), None);
        let applied = state.apply(&shared, Feed::Cancel(attempt));
        assert_eq!(applied.settle, vec![2]);
        assert!(applied.claims.is_empty());
        let applied = state.apply(&shared, Feed::Released(vec![first.token]));
        assert_eq!(applied.settle, vec![1]);
        assert!(applied.claims.is_empty(), "{applied:?}");
        assert!(state.idle());
    }
}
