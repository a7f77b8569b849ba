//! The AMQP topology, declared in one place.
//!
//! | name | type | declared by | what |
//! |---|---|---|---|
//! | `gridq.jobs.<queue>` | quorum queue | master | job messages; `x-delivery-limit` bounds redeliveries, then dead-letters |
//! | `gridq.events` | fanout exchange | master | where workers publish everything they send the master (they may write nowhere else but `gridq.dlx`) |
//! | `gridq.events` | classic durable queue | master | bound to that exchange: results persistent, claims, output and heartbeats transient |
//! | `gridq.dlx` | fanout exchange | master | dead letters, from the broker or from a consumer that refused a message |
//! | `gridq.dead` | quorum queue | master | bound to `gridq.dlx`; the master records and acks what arrives |
//! | `gridq.worker.<id>` | classic, exclusive, auto-delete | that worker | verdicts on its claims, cancels and drains for one worker |
//! | `gridq.master.lock` | classic, exclusive | master | held while a master runs: a second master on the vhost cannot declare it |
//! | `gridq.master.info` | classic, max one message | master | who holds the lock (host, pid, state directory), for the second master's error |
//!
//! Workers declare only their own queue; the master owns everything durable. Quorum queues are
//! durable and replicated once the broker is a cluster. The events queue is a classic durable
//! queue: claims, heartbeats and output are transient there (no disk write, no Raft round), and
//! results are persistent messages with publisher confirms; the master consumes it continuously,
//! so it is short-lived data in transit. Isolation between deployments (or tests) is by vhost.
//!
//! # Who may do what
//! [`master_permissions`] and [`worker_permissions`] are the RabbitMQ permissions of the two
//! roles: a worker's broker user can consume job queues and its own queue, and publish only to
//! `gridq.events` and `gridq.dlx`; it cannot declare, delete or publish to a job queue, read the
//! events or another worker's queue. Every message carries the AMQP `user_id` of its sender,
//! which RabbitMQ checks against the connection's user, so neither side can forge the other.
//! A worker whose broker user is not the master's has an id that starts with its user and a dot
//! ([`worker_id_user`]), so its own queue is `gridq.worker.<user>.<rest>`, and the master takes a
//! message about a worker only from that worker's user.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// The events queue.
pub const EVENTS_QUEUE: &str = "gridq.events";
/// The exchange workers publish events to (bound to [`EVENTS_QUEUE`]).
pub const EVENTS_EXCHANGE: &str = "gridq.events";

/// The dead-letter exchange.
pub const DEAD_LETTER_EXCHANGE: &str = "gridq.dlx";
/// The dead-letter queue.
pub const DEAD_QUEUE: &str = "gridq.dead";
/// The queue jobs go to when a sweep names none.
pub const DEFAULT_QUEUE: &str = "default";
/// How many times a job message is delivered before the broker dead-letters it, by default.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// The broker queue that holds the jobs of the user-facing queue `name`.
pub fn jobs_queue(name: &str) -> String {
    format!("gridq.jobs.{name}")
}

/// A worker's own queue.
pub fn worker_queue(worker: &crate::WorkerId) -> String {
    format!("gridq.worker.{worker}")
}

/// The broker user a worker id belongs to, when the worker does not share the master's user:
/// the part before the first dot. (Such users have no dot in their names.)
pub fn worker_id_user(worker: &crate::WorkerId) -> &str {
    worker.as_str().split('.').next().unwrap_or("")
}

/// Whether a message that says it is from `worker` may come from broker user `user` (the
/// message's RabbitMQ-checked `user_id`): the master's own user may speak for any worker (one
/// user for everything: local runs, tests), any other user only for the workers whose ids
/// start with its name and a dot.
pub fn may_speak_for(user: &str, master_user: &str, worker: &crate::WorkerId) -> bool {
    user == master_user || (!user.contains('.') && worker_id_user(worker) == user)
}

/// A broker user's permissions on the vhost: regular expressions over the names of the queues
/// and exchanges it may configure (declare, delete), write (publish to, bind) and read (consume,
/// get, purge, bind from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// The master's: everything gridq's, and the default exchange (it publishes jobs there).
pub fn master_permissions() -> Permissions {
    Permissions {
        configure: r"^gridq\..*$".to_owned(),
        write: r"^(gridq\..*|amq\.default)$".to_owned(),
        read: r"^gridq\..*$".to_owned(),
    }
}

/// A worker user's: its own queues (`gridq.worker.<user>.*`: declare, consume), the job queues
/// (consume; RabbitMQ ties purging to the same read right), and publishing to `gridq.events` and
/// `gridq.dlx` only. No default exchange: it cannot put a message on any queue by name.
pub fn worker_permissions(user: &str) -> Permissions {
    let own = format!(r"gridq\.worker\.{}\..*", regex_escape(user));
    Permissions {
        configure: format!("^{own}$"),
        write: r"^(gridq\.events|gridq\.dlx)$".to_owned(),
        read: format!(r"^({own}|gridq\.jobs\..*)$"),
    }
}

/// `text` with the characters special in a regular expression escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares what the master owns: the events queue and the dead-letter exchange and queue.
///
/// # Errors
/// The broker's error, e.g. when a queue exists with other arguments.
pub async fn declare_master(channel: &Channel) -> Result<(), lapin::Error> {
    declare_fanout(channel, DEAD_LETTER_EXCHANGE).await?;
    channel
        .queue_declare(DEAD_QUEUE.into(), durable(), quorum_args())
        .await?;
    channel
        .queue_bind(
            DEAD_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(EVENTS_QUEUE.into(), durable(), FieldTable::default())
        .await?;
    declare_fanout(channel, EVENTS_EXCHANGE).await?;
    channel
        .queue_bind(
            EVENTS_QUEUE.into(),
            EVENTS_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The queue a running master holds exclusively (see [`lock_master`]).
pub const MASTER_LOCK_QUEUE: &str = "gridq.master.lock";
/// Who holds [`MASTER_LOCK_QUEUE`]: one message, replaced by each master that takes the lock.
pub const MASTER_INFO_QUEUE: &str = "gridq.master.info";

/// Why a master could not take the vhost's lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another master's connection holds it; `holder` says who, as that master described itself.
    #[error("another gridq master runs on vhost `{vhost}` of this broker ({holder})")]
    Held { vhost: String, holder: String },
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

/// Takes the vhost's master lock on this connection: an exclusive queue, which the broker
/// deletes when the connection closes (or the broker restarts), so a crashed master never
/// leaves a stale lock. Then records `identity` as the holder.
///
/// # Errors
/// [`LockError::Held`] when another connection holds it (with what that master recorded);
/// otherwise the broker's error.
pub async fn lock_master(
    connection: &lapin::Connection,
    vhost: &str,
    identity: &str,
) -> Result<(), LockError> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            MASTER_LOCK_QUEUE.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {}
        Err(e) if is_soft_error(&e, 405) => {
            return Err(LockError::Held {
                vhost: vhost.to_owned(),
                holder: master_holder(connection)
                    .await
                    .unwrap_or_else(|| "it did not say who it is".to_owned()),
            });
        }
        Err(e) => return Err(e.into()),
    }
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(1));
    channel
        .queue_declare(MASTER_INFO_QUEUE.into(), durable(), args)
        .await?;
    channel
        .queue_purge(MASTER_INFO_QUEUE.into(), Default::default())
        .await?;
    channel
        .basic_publish(
            "".into(),
            MASTER_INFO_QUEUE.into(),
            lapin::options::BasicPublishOptions::default(),
            identity.as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    let _ = channel.close(200, "lock taken".into()).await;
    Ok(())
}

/// What the lock's holder recorded, read without taking it off the queue.
async fn master_holder(connection: &lapin::Connection) -> Option<String> {
    let channel = connection.create_channel().await.ok()?;
    let got = channel
        .basic_get(MASTER_INFO_QUEUE.into(), Default::default())
        .await
        .ok()
        .flatten();
    // Closing the channel puts the unacked message back.
    let text = got.map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned());
    let _ = channel.close(200, "read".into()).await;
    text
}

/// Whether `e` is the broker's soft (channel) error with this reply code, e.g. 403
/// ACCESS_REFUSED or 405 RESOURCE_LOCKED.
pub fn is_soft_error(e: &lapin::Error, code: u16) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err) if err.get_id() == code)
}

/// Declares a durable fanout exchange.
async fn declare_fanout(channel: &Channel, name: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the job queue for the user-facing queue `name`.
///
/// # Errors
/// The broker's error.
pub async fn declare_jobs_queue(
    channel: &Channel,
    name: &str,
    delivery_limit: u32,
) -> Result<String, lapin::Error> {
    let queue = jobs_queue(name);
    let mut args = quorum_args();
    args.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    channel
        .queue_declare(queue.as_str().into(), durable(), args)
        .await?;
    Ok(queue)
}

/// Declares a worker's own queue: exclusive to its connection, gone with it.
///
/// # Errors
/// The broker's error.
pub async fn declare_worker_queue(
    channel: &Channel,
    worker: &crate::WorkerId,
) -> Result<String, lapin::Error> {
    let queue = worker_queue(worker);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// Checks that a queue exists without declaring it (`passive`); a missing queue closes the
/// channel with 404, which the caller reports as "is the master running?".
///
/// # Errors
/// The broker's error.
pub async fn check_queue(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Header naming the queue a consumer-refused message came from.
pub const DEAD_QUEUE_HEADER: &str = "gridq-dead-queue";

/// Header naming the broker user that sent a consumer-refused message.
pub const DEAD_USER_HEADER: &str = "gridq-dead-user-id";

/// Sends a message this consumer cannot use to the dead-letter exchange with the reason, keeping
/// its headers and body. It goes out as `publisher` (the `user_id` the broker checks); who sent
/// it first is kept in [`DEAD_USER_HEADER`].
pub async fn dead_letter(
    channel: &Channel,
    publisher: &str,
    queue: &str,
    properties: &lapin::BasicProperties,
    body: &[u8],
    reason: &(dyn std::fmt::Display + Sync),
) -> Result<(), lapin::Error> {
    tracing::warn!(queue, cause = %reason, "dead-lettering a message");
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(crate::wire::HEADER_DEAD_REASON),
        AMQPValue::LongString(reason.to_string().into()),
    );
    headers.insert(
        ShortString::from(DEAD_QUEUE_HEADER),
        AMQPValue::LongString(queue.into()),
    );
    if let Some(sender) = properties.user_id() {
        headers.insert(
            ShortString::from(DEAD_USER_HEADER),
            AMQPValue::LongString(sender.as_str().into()),
        );
    }
    let props = properties
        .clone()
        .with_headers(headers)
        .with_user_id(publisher.into());
    channel
        .basic_publish(
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            props,
        )
        .await?
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkerId;

    #[test]
    fn a_worker_user_speaks_only_for_its_own_workers() {
        let w = |s: &str| WorkerId::new(s).unwrap();
        assert!(may_speak_for("gridq-m", "gridq-m", &w("anyone-1")));
        assert!(may_speak_for(
            "gridq-w1",
            "gridq-m",
            &w("gridq-w1.host-12-ab")
        ));
        assert!(!may_speak_for(
            "gridq-w1",
            "gridq-m",
            &w("gridq-w2.host-12-ab")
        ));
        assert!(!may_speak_for("gridq-w1", "gridq-m", &w("gridq-w1x.host")));
        assert!(!may_speak_for("gridq-w1", "gridq-m", &w("host-12-ab")));
        assert!(!may_speak_for("a.b", "m", &w("a.b.c")));
    }

    #[test]
    fn worker_permissions_escape_the_user() {
        let p = worker_permissions("w.1");
        assert_eq!(p.configure, r"^gridq\.worker\.w\.1\..*$");
        assert_eq!(p.write, r"^(gridq\.events|gridq\.dlx)$");
        assert_eq!(p.read, r"^(gridq\.worker\.w\.1\..*|gridq\.jobs\..*)$");
    }
}
