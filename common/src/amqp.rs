//! Connecting to the broker: URL redaction, connection names, and reconnection backoff.
//!
//! gridq services do not rely on client-side auto-recovery: when a connection drops, a service
//! throws away its channels and consumers and builds its session again from its own state, with
//! exponential backoff between attempts. That keeps the semantics explicit (what is in flight,
//! what must be re-sent) and the same for a broker restart, a network cut or a channel error.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// The default broker for local use.
pub const DEFAULT_BROKER: &str = "amqp://127.0.0.1:5672/%2f";

/// The URL with its password replaced by `***`, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // userinfo ends at the last '@' before the first '/'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Whether the URL logs in as `guest`, which RabbitMQ allows only over loopback.
pub fn uses_guest(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => authority[..at].split(':').next() == Some("guest"),
        // No credentials: clients default to guest.
        None => true,
    }
}

/// Opens a connection named `name` (shown in the broker's management UI).
///
/// # Errors
/// lapin's error; the caller adds the redacted URL as context.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties).await
}

/// The largest frame a small connection asks for (AMQP's minimum is 4,096 bytes).
pub const SMALL_FRAME_MAX: u32 = 16 * 1024;

/// Like [`connect`], for a process that should stay small (a worker): it asks the broker for
/// frames of at most [`SMALL_FRAME_MAX`] bytes unless the URL sets `frame_max` itself.
///
/// lapin keeps a send and a receive buffer of 32 frames each, zero-filled, so with RabbitMQ's
/// default `frame_max` of 128 KiB a connection holds 8 MiB of resident memory (which every
/// `fork` of a job then copies page tables for). A message larger than a frame is split into
/// more body frames: a little more framing for large results, none for claims and grants.
///
/// # Errors
/// lapin's error, also for a URL that does not parse.
pub async fn connect_small(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let Ok(mut uri) = url.parse::<lapin::uri::AMQPUri>() else {
        // lapin reports the parse error.
        return connect(url, name).await;
    };
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(SMALL_FRAME_MAX);
    }
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties).await
}

/// Exponential backoff with a cap: 100 ms, 200 ms, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success, start again from the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("amqp://gridq:s3cr3t@10.0.0.1:5672/%2f"),
            "amqp://gridq:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://p%40ss@host/vh"), "amqp://p%40ss@host/vh");
        assert_eq!(redact("amqp://u:p@ss@host/vh"), "amqp://u:***@host/vh");
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn detects_guest() {
        assert!(uses_guest("amqp://guest:guest@10.0.0.1/"));
        assert!(uses_guest("amqp://127.0.0.1:5672"));
        assert!(!uses_guest("amqp://gridq:x@127.0.0.1:5672/%2f"));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
