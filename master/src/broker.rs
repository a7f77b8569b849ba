//! The master's AMQP session: it declares the topology, consumes the events and dead-letter
//! queues into the core, and publishes job messages (with publisher confirms) and worker
//! control messages.
//!
//! The session is rebuilt from scratch whenever the connection drops, with backoff. Deliveries
//! carry their acker to the core, which acks only after its transaction has committed; a
//! delivery whose channel died is simply redelivered by the broker later, and the core's
//! handlers are idempotent. Publishes not confirmed before a drop are reported as failed, and
//! the core republishes them on the next session.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gridq_common::amqp::{self, Backoff};
use gridq_common::topology;
use gridq_common::wire::{self, FromWorker, JobBatch, JobMessage, ToWorker};
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::store::Publish;

/// Something the broker session hands to the core.
#[derive(Debug)]
pub enum Inbound {
    /// A decoded event; ack it after commit.
    Event(FromWorker, Acker),
    /// A message on the dead-letter queue; record it, then ack.
    Dead {
        properties: Box<BasicProperties>,
        body: Vec<u8>,
        acker: Acker,
    },
    /// These job messages are on the broker (confirmed).
    Confirmed(Vec<Publish>),
    /// These were not confirmed (nack or connection loss); publish them again later.
    Unconfirmed(Vec<Publish>),
    /// A session is up: anything pending can be published now.
    Up,
    /// The session is down.
    Down(String),
}

/// A request to the publisher.
#[derive(Debug)]
pub enum Outbound {
    /// Messages to workers, each to its worker's queue (no confirm: after a lost verdict the
    /// worker claims again).
    Control(Vec<(String, ToWorker)>),
    /// Declare a job queue (on submit of a sweep that names a new queue).
    DeclareQueue(String),
}

/// Job messages to put on their queues, confirmed in order, with at most this many jobs of
/// one queue per message (1: each job alone, kind `job`). They have a channel of their own,
/// read only while fewer than [`CONFIRM_WINDOW`] batches wait for their confirms, so that
/// messages to workers never wait behind them.
#[derive(Debug)]
pub struct JobsOut(pub Vec<(Publish, JobMessage)>, pub usize);

/// What the core sends to the broker session.
#[derive(Debug)]
pub struct Outgoing {
    pub control: mpsc::Receiver<Outbound>,
    pub jobs: mpsc::Receiver<JobsOut>,
}

/// Batches of job messages (up to 1,000 jobs each) published and not yet confirmed.
const CONFIRM_WINDOW: usize = 32;

/// Settings of the session.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub url: String,
    pub delivery_limit: u32,
    /// Events fetched ahead of the core (bounded).
    pub prefetch: u16,
    pub name: String,
    /// The broker URL's vhost, for messages.
    pub vhost: String,
    /// How this master describes itself to a second master on the same vhost.
    pub identity: String,
    /// The broker user it connects as: the `user_id` of everything it publishes, and the one
    /// user that may speak for any worker.
    pub user: String,
    /// Where refused events are counted (`gridq_rejected_messages_total{reason}`).
    pub metrics: crate::http::metrics::Metrics,
}

/// Told once, after the first try to connect: `Err` when another master holds the vhost (this
/// master must not start); `Ok` when the session is up or the broker could not be reached (the
/// master starts and keeps trying).
pub type FirstSession = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Runs sessions until `outbound` closes (the core stopped).
pub async fn run(
    config: BrokerConfig,
    inbound: mpsc::Sender<Inbound>,
    mut outbound: Outgoing,
    first: FirstSession,
) {
    let mut first = Some(first);
    let mut backoff = Backoff::default();
    let mut queues: Vec<String> = vec![topology::DEFAULT_QUEUE.to_owned()];
    loop {
        let connection = match amqp::connect(&config.url, &config.name).await {
            Ok(c) => c,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(broker = %amqp::redact(&config.url), cause = %e, retry_in = ?delay, "cannot connect to the broker");
                if let Some(f) = first.take() {
                    let _ = f.send(Ok(()));
                }
                if inbound.send(Inbound::Down(e.to_string())).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        match session(
            &config,
            &connection,
            &inbound,
            &mut outbound,
            &mut queues,
            &mut backoff,
            &mut first,
        )
        .await
        {
            SessionEnd::Shutdown => {
                let _ = connection.close(200, "master stopping".into()).await;
                return;
            }
            SessionEnd::Locked(why) => {
                let _ = connection
                    .close(200, "another master holds the vhost".into())
                    .await;
                if let Some(f) = first.take() {
                    let _ = f.send(Err(why));
                    return;
                }
                // The lock was lost (a broker restart) and another master took it meanwhile:
                // this one consumes nothing until it is free again.
                let delay = backoff.next_delay();
                error!(cause = %why, retry_in = ?delay, "this master's vhost is held by another master; waiting for it to be free");
                if inbound.send(Inbound::Down(why)).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
            }
            SessionEnd::Lost(why) => {
                warn!(cause = %why, "broker session lost; reconnecting");
                let _ = connection.close(200, "reconnecting".into()).await;
                if inbound.send(Inbound::Down(why)).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// Another master holds the vhost's lock.
    Locked(String),
}

async fn session(
    config: &BrokerConfig,
    connection: &Connection,
    inbound: &mpsc::Sender<Inbound>,
    outbound: &mut Outgoing,
    queues: &mut Vec<String>,
    backoff: &mut Backoff,
    first: &mut Option<FirstSession>,
) -> SessionEnd {
    // One master per vhost: before it consumes anything, it takes the vhost's lock.
    match topology::lock_master(connection, &config.vhost, &config.identity).await {
        Ok(()) => {}
        Err(e @ topology::LockError::Held { .. }) => return SessionEnd::Locked(e.to_string()),
        Err(topology::LockError::Broker(e)) => {
            return SessionEnd::Lost(format!("taking the master lock: {e}"));
        }
    }
    let setup = async {
        let declare = connection.create_channel().await?;
        topology::declare_master(&declare).await?;
        for q in queues.iter() {
            topology::declare_jobs_queue(&declare, q, config.delivery_limit).await?;
        }
        let events = connection.create_channel().await?;
        events
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await?;
        let events_consumer = events
            .basic_consume(
                topology::EVENTS_QUEUE.into(),
                "gridq-master-events".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let dead = connection.create_channel().await?;
        dead.basic_qos(64, BasicQosOptions::default()).await?;
        let dead_consumer = dead
            .basic_consume(
                topology::DEAD_QUEUE.into(),
                "gridq-master-dead".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let control = connection.create_channel().await?;
        Ok::<_, lapin::Error>((
            declare,
            events,
            events_consumer,
            dead_consumer,
            publish,
            control,
        ))
    };
    let (declare, events, mut events_consumer, mut dead_consumer, publish, control) =
        match setup.await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Lost(format!("setting up the session: {e}")),
        };
    info!(broker = %amqp::redact(&config.url), "connected to the broker");
    backoff.reset();
    if let Some(f) = first.take() {
        let _ = f.send(Ok(()));
    }
    if inbound.send(Inbound::Up).await.is_err() {
        return SessionEnd::Shutdown;
    }
    // Confirms are awaited off the main loop so that publishing never waits on the broker.
    let (confirm_tx, mut confirm_rx) =
        mpsc::channel::<Result<Vec<Publish>, (Vec<Publish>, String)>>(64);
    // At most this many batches wait for their confirms: a broker slower than the core holds
    // the core back instead of a growing pile of batches in this process. (Fewer than the
    // confirm channel holds, so a confirmed batch can always be handed on.)
    let window = Arc::new(tokio::sync::Semaphore::new(CONFIRM_WINDOW));
    loop {
        tokio::select! {
            delivery = events_consumer.next() => {
                let Some(delivery) = delivery else { return SessionEnd::Lost("events consumer ended".into()) };
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(e) => return SessionEnd::Lost(format!("events consumer: {e}")),
                };
                match check_event(config, &delivery.properties, &delivery.data) {
                    Ok(event) => {
                        if inbound.send(Inbound::Event(event, delivery.acker)).await.is_err() {
                            return SessionEnd::Shutdown;
                        }
                    }
                    Err((label, why)) => {
                        config.metrics.rejected(label);
                        if let Err(err) = topology::dead_letter(&events, &config.user, topology::EVENTS_QUEUE, &delivery.properties, &delivery.data, &why).await {
                            return SessionEnd::Lost(format!("dead-lettering a refused event: {err}"));
                        }
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                }
            }
            delivery = dead_consumer.next() => {
                let Some(delivery) = delivery else { return SessionEnd::Lost("dead-letter consumer ended".into()) };
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(e) => return SessionEnd::Lost(format!("dead-letter consumer: {e}")),
                };
                let msg = Inbound::Dead { properties: Box::new(delivery.properties), body: delivery.data, acker: delivery.acker };
                if inbound.send(msg).await.is_err() {
                    return SessionEnd::Shutdown;
                }
            }
            confirmed = confirm_rx.recv() => {
                match confirmed {
                    Some(Ok(batch)) => {
                        let sent = inbound.send(Inbound::Confirmed(batch)).await;
                        if sent.is_err() {
                            return SessionEnd::Shutdown;
                        }
                    }
                    Some(Err((batch, why))) => {
                        let _ = inbound.send(Inbound::Unconfirmed(batch)).await;
                        return SessionEnd::Lost(format!("publishing: {why}"));
                    }
                    None => {}
                }
            }
            (batch, permit) = async {
                let permit = window.clone().acquire_owned().await;
                (outbound.jobs.recv().await, permit)
            } => {
                let Some(JobsOut(batch, per_message)) = batch else { return SessionEnd::Shutdown };
                // A new queue's declaration travels on the other channel: never publish to a
                // queue not yet declared (the default exchange would drop the message).
                for (p, _) in &batch {
                    if !queues.contains(&p.queue) {
                        if let Err(e) = topology::declare_jobs_queue(&declare, &p.queue, config.delivery_limit).await {
                            let publishes = batch.iter().map(|(p, _)| p.clone()).collect();
                            let _ = inbound.send(Inbound::Unconfirmed(publishes)).await;
                            return SessionEnd::Lost(format!("declaring queue {}: {e}", p.queue));
                        }
                        queues.push(p.queue.clone());
                    }
                }
                let publishes: Vec<Publish> = batch.iter().map(|(p, _)| p.clone()).collect();
                match publish_jobs(&publish, &config.user, batch, per_message).await {
                    Ok(confirms) => {
                        let tx = confirm_tx.clone();
                        tokio::spawn(async move {
                            let mut failed = None;
                            for c in confirms {
                                match c.await {
                                    Ok(conf) if conf.is_ack() => {}
                                    Ok(_) => failed = Some("the broker refused a job message (nack)".to_string()),
                                    Err(e) => failed = Some(e.to_string()),
                                }
                            }
                            let _ = tx.send(match failed {
                                None => Ok(publishes),
                                Some(why) => Err((publishes, why)),
                            }).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        let _ = inbound.send(Inbound::Unconfirmed(publishes)).await;
                        return SessionEnd::Lost(format!("publishing jobs: {e}"));
                    }
                }
            }
            request = outbound.control.recv() => {
                let Some(request) = request else { return SessionEnd::Shutdown };
                match request {
                    Outbound::Control(messages) => {
                        if let Err(e) = publish_control(&control, &config.user, messages).await {
                            return SessionEnd::Lost(e);
                        }
                    }
                    Outbound::DeclareQueue(name) => {
                        if !queues.contains(&name) {
                            if let Err(e) = topology::declare_jobs_queue(&declare, &name, config.delivery_limit).await {
                                return SessionEnd::Lost(format!("declaring queue {name}: {e}"));
                            }
                            queues.push(name);
                        }
                    }
                }
            }
        }
    }
}

async fn publish_jobs(
    channel: &Channel,
    user: &str,
    batch: Vec<(Publish, JobMessage)>,
    per_message: usize,
) -> Result<Vec<lapin::PublisherConfirm>, lapin::Error> {
    // Runs of jobs for the same queue, at most `per_message` long, each one message.
    let mut groups: Vec<(String, Vec<JobMessage>)> = Vec::new();
    for (p, message) in batch {
        match groups.last_mut() {
            Some((queue, jobs)) if *queue == p.queue && jobs.len() < per_message.max(1) => {
                jobs.push(message);
            }
            _ => groups.push((p.queue, vec![message])),
        }
    }
    let mut encoded: Vec<(String, wire::Encoded)> = groups
        .into_iter()
        .map(|(queue, mut jobs)| {
            let enc = if jobs.len() == 1 {
                wire::encode(&jobs.remove(0))
            } else {
                wire::encode(&JobBatch { jobs })
            };
            (topology::jobs_queue(&queue), enc)
        })
        .collect();
    // All at once: each publish waits until lapin's I/O thread has written its frames, so one
    // after another cost a thread round trip and a socket write per job. Polled together (in
    // order, so delivery tags and the queue keep the batch's order), the I/O thread writes
    // many frames per wake-up.
    let sent = futures_util::future::join_all(encoded.iter_mut().map(|(queue, enc)| {
        let properties = std::mem::take(&mut enc.properties).with_user_id(user.into());
        let (queue, enc): (&String, &wire::Encoded) = (queue, enc);
        channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &enc.body,
            properties,
        )
    }))
    .await;
    let confirms = sent.into_iter().collect::<Result<Vec<_>, _>>()?;
    debug!(n = confirms.len(), "published job messages");
    Ok(confirms)
}

/// Publishes messages to workers' queues, all at once: each publish is a round trip to lapin's
/// I/O thread, and a step of the core often answers several workers. A worker queue that is gone
/// (the worker died) drops its message: fine.
async fn publish_control(
    channel: &Channel,
    user: &str,
    messages: Vec<(String, ToWorker)>,
) -> Result<(), String> {
    let encoded: Vec<(String, wire::Encoded)> = messages
        .into_iter()
        .map(|(queue, message)| (queue, wire::encode(&message)))
        .collect();
    let sent = futures_util::future::join_all(encoded.iter().map(|(queue, enc)| {
        channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &enc.body,
            enc.properties
                .clone()
                .with_delivery_mode(1)
                .with_user_id(user.into()),
        )
    }))
    .await;
    for ((queue, _), result) in encoded.iter().zip(sent) {
        if let Err(e) = result {
            return Err(format!("publishing to {queue}: {e}"));
        }
    }
    Ok(())
}

/// Decodes an event and checks its sender: RabbitMQ has checked the `user_id` against the
/// publishing connection's user, and that user must be one that may speak for every worker the
/// event names ([`topology::may_speak_for`]). A refusal gives the metric's label and the reason.
fn check_event(
    config: &BrokerConfig,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<FromWorker, (&'static str, String)> {
    let event =
        wire::decode::<FromWorker>(properties, body).map_err(|e| ("undecodable", e.to_string()))?;
    let Some(user) = properties.user_id().as_ref().map(|u| u.as_str()) else {
        return Err((
            "no_user_id",
            "no user_id: the sender is unknown (gridq workers always set it)".to_owned(),
        ));
    };
    if let Some(w) = event
        .workers()
        .into_iter()
        .find(|w| !topology::may_speak_for(user, &config.user, w))
    {
        return Err((
            "wrong_user",
            format!("broker user `{user}` may not speak for worker `{w}`"),
        ));
    }
    Ok(event)
}

/// Reads why a dead-lettered message died: gridq's own reason header, or the broker's
/// `x-first-death-reason` (`delivery_limit`, `rejected`, `expired`, ...).
pub fn dead_reason(properties: &BasicProperties) -> (String, String) {
    let headers = properties.headers().clone().unwrap_or_default();
    let text = |key: &str| -> Option<String> {
        match headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    };
    let queue = text(topology::DEAD_QUEUE_HEADER)
        .or_else(|| text("x-first-death-queue"))
        .unwrap_or_else(|| "?".into());
    let reason = text(wire::HEADER_DEAD_REASON)
        .or_else(|| {
            text("x-first-death-reason").map(|r| format!("dead-lettered by the broker: {r}"))
        })
        .unwrap_or_else(|| "dead-lettered".into());
    (queue, reason)
}

/// How long the core waits for a session before reporting the broker as unreachable.
pub const CONNECT_GRACE: Duration = Duration::from_secs(10);
