//! Queue depths for the monitor's Broker page and `/metrics`.
//!
//! The management API is the better source: it knows ready and unacknowledged counts and sees
//! every `gridq.*` queue in the vhost, including the workers' exclusive ones. It is an optional
//! plugin, though, so [`collect`] falls back to passive `queue.declare` over the AMQP connection
//! the master already holds, which gives ready messages and consumers of the queues it names,
//! and says in [`BrokerStats::note`] why the numbers are thinner.
//!
//! Credentials come from the AMQP URL (the management API takes the same user); the password
//! travels only in the `Authorization` header and never appears in `Debug` output, errors or
//! notes.

use std::fmt;
use std::time::Duration;

use gridq_common::amqp::redact;
use gridq_common::rabbit_node::percent_encode;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ErrorKind};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The management plugin's default port.
pub const DEFAULT_MANAGEMENT_PORT: u16 = 15672;

/// How long one management API request may take before [`collect`] falls back to AMQP: a
/// monitor page must not hang on a broker that is slow or firewalled.
pub const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`ManagementApi::queues`] asks the API for.
const QUEUE_COLUMNS: &str = "name,messages_ready,messages_unacknowledged,consumers";
/// Only queues with this prefix are gridq's.
const QUEUE_PREFIX: &str = "gridq.";
/// How much of an unexpected reply body goes into an error message.
const BODY_EXCERPT_CHARS: usize = 200;

/// Result alias for this module.
pub type Result<T, E = BrokerStatsError> = std::result::Result<T, E>;

/// Why queue statistics could not be read from the management API.
///
/// Worth retrying: [`BrokerStatsError::Unreachable`] and [`BrokerStatsError::Status`] with a
/// 5xx status. The others need a change of configuration first. No variant's message contains
/// the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerStatsError {
    /// The AMQP URL cannot be parsed.
    #[error("invalid broker URL {url}: {reason}")]
    InvalidBrokerUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The management base URL cannot be used.
    #[error("invalid management API URL {url}: {reason}")]
    InvalidManagementUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No answer: connection refused, timeout, DNS failure.
    #[error("management API unreachable at {url}: {}", error_chain(.source))]
    Unreachable {
        /// The request URL (it carries no credentials).
        url: String,
        /// The client's error, without its URL.
        source: reqwest::Error,
    },
    /// The API answered with an error status, e.g. 401 for a user without the `monitoring`
    /// or `management` tag, 404 for an unknown vhost.
    #[error("management API at {url} answered {status}: {body}")]
    Status {
        /// The request URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The API answered 200 with something that is not a list of queues.
    #[error("management API at {url} sent an unexpected reply: {reason}")]
    BadReply {
        /// The request URL.
        url: String,
        /// Why it could not be read.
        reason: String,
    },
}

/// The messages and consumers of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// The broker's queue name, e.g. `gridq.jobs.default`.
    pub name: String,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged; `None` where the source cannot tell (AMQP,
    /// or a queue the management API has no statistics for yet).
    pub unacked: Option<u64>,
    /// Consumers attached to the queue.
    pub consumers: u64,
}

/// Where [`BrokerStats`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatsSource {
    /// The management plugin's HTTP API: every `gridq.*` queue, with unacknowledged counts.
    Management,
    /// Passive `queue.declare` over AMQP: only the queues asked for, no unacknowledged counts.
    Amqp,
}

/// The queues of one vhost, for the Broker page and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokerStats {
    /// Where the numbers came from.
    pub source: StatsSource,
    /// Sorted by name.
    pub queues: Vec<QueueStats>,
    /// Why the numbers are incomplete, for showing to the user.
    pub note: Option<String>,
}

/// The password; its `Debug` never shows it.
#[derive(Clone)]
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where and as whom to ask RabbitMQ's management API about one vhost.
#[derive(Debug, Clone)]
pub struct ManagementApi {
    /// `http://host:port` plus any path prefix, without a trailing `/`.
    base_url: String,
    vhost: String,
    user: String,
    password: Password,
}

/// User, password, host and vhost of an AMQP URL, decoded as lapin decodes them.
struct AmqpParts {
    user: String,
    password: String,
    host: String,
    vhost: String,
}

fn parse_amqp_url(amqp_url: &str) -> Result<AmqpParts> {
    let invalid = |reason: &str| BrokerStatsError::InvalidBrokerUrl {
        url: redact(amqp_url),
        reason: reason.to_owned(),
    };
    // amq-protocol's own errors may quote the whole URL, password included, so they are
    // replaced by a reason of our own.
    let uri: AMQPUri = amqp_url
        .parse()
        .map_err(|_| invalid("expected amqp://user:password@host:port/vhost"))?;
    // amq-protocol reads an IP-address host as "localhost" (it only looks for a domain name),
    // so the host comes from the URL crate.
    let url = reqwest::Url::parse(amqp_url).map_err(|_| invalid("not a URL"))?;
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| invalid("no host"))?
        .to_owned();
    if uri.vhost.is_empty() {
        return Err(invalid("empty vhost; write /%2F for the default vhost `/`"));
    }
    Ok(AmqpParts {
        user: uri.authority.userinfo.username,
        password: uri.authority.userinfo.password,
        host,
        vhost: uri.vhost,
    })
}

impl ManagementApi {
    /// The API on the AMQP URL's host at `port` ([`DEFAULT_MANAGEMENT_PORT`] normally), over
    /// plain HTTP, with the URL's user, password and vhost. A URL without credentials means
    /// `guest`, as it does for AMQP.
    ///
    /// # Errors
    /// [`BrokerStatsError::InvalidBrokerUrl`] when the URL has no host or an empty vhost.
    pub fn from_amqp_url(amqp_url: &str, port: u16) -> Result<Self> {
        let parts = parse_amqp_url(amqp_url)?;
        Ok(Self {
            // The URL crate writes an IPv6 host in brackets already.
            base_url: format!("http://{}:{port}", parts.host),
            vhost: parts.vhost,
            user: parts.user,
            password: Password(parts.password),
        })
    }

    /// The API at `base_url` (e.g. `http://rabbit:15672`, or with the plugin's path prefix),
    /// with user, password and vhost from the AMQP URL.
    ///
    /// # Errors
    /// Credentials in `base_url` (`http://user:pass@host:15672`) are used instead of the AMQP
    /// URL's: a user tagged `monitoring` that may read nothing over AMQP, say.
    ///
    /// [`BrokerStatsError::InvalidManagementUrl`] for a URL that is not `http(s)://`, and
    /// [`BrokerStatsError::InvalidBrokerUrl`].
    pub fn new(base_url: &str, amqp_url: &str) -> Result<Self> {
        let invalid = |reason: &str| BrokerStatsError::InvalidManagementUrl {
            url: redact(base_url),
            reason: reason.to_owned(),
        };
        let url = reqwest::Url::parse(base_url).map_err(|err| invalid(&err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("expected http:// or https://"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("expected no query or fragment"));
        }
        let parts = parse_amqp_url(amqp_url)?;
        let decode =
            |s: &str| gridq_common::amqp::percent_decode(s).unwrap_or_else(|| s.to_owned());
        let (user, password) = if url.username().is_empty() {
            (parts.user, parts.password)
        } else {
            (decode(url.username()), decode(url.password().unwrap_or("")))
        };
        let mut base = url;
        let _ = base.set_username("");
        let _ = base.set_password(None);
        Ok(Self {
            base_url: base.as_str().trim_end_matches('/').to_owned(),
            vhost: parts.vhost,
            user,
            password: Password(password),
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:15672`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The vhost asked about.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The endpoint of [`ManagementApi::queues`], as errors name it.
    fn queues_path(&self) -> String {
        format!(
            "{}/api/queues/{}",
            self.base_url,
            percent_encode(&self.vhost)
        )
    }

    /// The `gridq.*` queues of the vhost, sorted by name; waits at most
    /// [`MANAGEMENT_TIMEOUT`].
    ///
    /// The counts are the broker's statistics, which it refreshes every few seconds
    /// (`collect_statistics_interval`, 5 s by default), so they lag behind by that much. A
    /// queue declared since the last refresh is listed by name only; it comes out with
    /// `unacked: None` and zero ready messages and consumers ([`collect`] asks AMQP for those).
    ///
    /// # Errors
    /// [`BrokerStatsError::Unreachable`], [`BrokerStatsError::Status`] (401: wrong password
    /// or a user without a management tag; 404: no such vhost), [`BrokerStatsError::BadReply`].
    pub async fn queues(&self, client: &reqwest::Client) -> Result<Vec<QueueStats>> {
        let url = self.queues_path();
        let unreachable = |source: reqwest::Error| BrokerStatsError::Unreachable {
            url: url.clone(),
            source: source.without_url(),
        };
        // Asking for the four columns spares the broker rendering every queue's full record.
        let response = client
            .get(format!("{url}?columns={QUEUE_COLUMNS}"))
            .basic_auth(&self.user, Some(&self.password.0))
            .timeout(MANAGEMENT_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let body = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(BrokerStatsError::Status {
                url,
                status: status.as_u16(),
                body: self.scrub(&excerpt(body.trim())),
            });
        }
        parse_queues(&body).map_err(|reason| BrokerStatsError::BadReply { url, reason })
    }

    /// `text` with the password masked, for text that came from elsewhere.
    fn scrub(&self, text: &str) -> String {
        if self.password.0.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.password.0, "***")
        }
    }
}

/// One queue as `/api/queues?columns=...` lists it. A queue the broker has not gathered
/// statistics for yet (just declared) comes without its counts.
#[derive(Debug, Deserialize)]
struct ApiQueue {
    name: String,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u64>,
}

/// The `gridq.*` queues of a management API reply, sorted by name.
fn parse_queues(body: &str) -> Result<Vec<QueueStats>, String> {
    let listed: Vec<ApiQueue> = serde_json::from_str(body)
        .map_err(|err| format!("{err}; reply starts with {:?}", excerpt(body)))?;
    let mut queues: Vec<QueueStats> = listed
        .into_iter()
        .filter(|queue| queue.name.starts_with(QUEUE_PREFIX))
        .map(|queue| QueueStats {
            name: queue.name,
            ready: queue.messages_ready.unwrap_or(0),
            unacked: queue.messages_unacknowledged,
            consumers: queue.consumers.unwrap_or(0),
        })
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(queues)
}

/// Ready messages and consumers of the named queues, by passive `queue.declare`; sorted by
/// name, each name once. Queues that do not exist are left out, as are exclusive queues of
/// other connections (RabbitMQ refuses even a passive declare of those). Unacknowledged
/// counts are unknown over AMQP.
///
/// A refused declare closes its channel, so the next queue gets a fresh one. If no channel
/// can be opened at all (the connection is gone), the queues seen so far are returned.
pub async fn passive(connection: &Connection, names: &[String]) -> Vec<QueueStats> {
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let mut queues = Vec::with_capacity(names.len());
    let mut channel: Option<Channel> = None;
    for name in names {
        let current = match channel.take() {
            Some(open) if open.status().connected() => open,
            _ => match connection.create_channel().await {
                Ok(fresh) => fresh,
                Err(err) => {
                    warn!(cause = %err, "cannot open a channel to read queue depths");
                    break;
                }
            },
        };
        let declared = current
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => {
                queues.push(QueueStats {
                    name: name.to_owned(),
                    ready: u64::from(queue.message_count()),
                    unacked: None,
                    consumers: u64::from(queue.consumer_count()),
                });
                channel = Some(current);
            }
            // The broker has closed the channel; the next queue opens another.
            Err(err) => match refusal(&err) {
                Some(AMQPSoftError::NOTFOUND) => debug!(queue = name, "no such queue"),
                Some(AMQPSoftError::RESOURCELOCKED) => {
                    debug!(queue = name, "exclusive queue of another connection")
                }
                _ => warn!(queue = name, cause = %err, "cannot read the queue's depth"),
            },
        }
    }
    if let Some(open) = channel {
        // Best effort: the connection outlives this channel either way.
        let _ = open.close(200, "queue depths read".into()).await;
    }
    queues
}

/// The broker's channel-level refusal in `err`, if that is what it is.
fn refusal(err: &lapin::Error) -> Option<AMQPSoftError> {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// The queues' statistics from the management API when it answers within
/// [`MANAGEMENT_TIMEOUT`], else from passive declares of `known_queues` over `connection`,
/// with a note saying why. Never fails: the worst case is an empty list with a note.
///
/// Queues the management API has no statistics for yet (declared since its last refresh)
/// get their ready and consumer counts from AMQP, and the note names them.
pub async fn collect(
    mgmt: Option<&ManagementApi>,
    client: &reqwest::Client,
    connection: &Connection,
    known_queues: &[String],
) -> BrokerStats {
    let note = match mgmt {
        Some(api) => match api.queues(client).await {
            Ok(mut queues) => {
                let missing: Vec<String> = queues
                    .iter()
                    .filter(|queue| queue.unacked.is_none())
                    .map(|queue| queue.name.clone())
                    .collect();
                let note = if missing.is_empty() {
                    None
                } else {
                    fill_from_amqp(&mut queues, &passive(connection, &missing).await);
                    Some(format!(
                        "no management statistics yet for {}; ready messages and consumers \
                         from AMQP",
                        missing.join(", ")
                    ))
                };
                return BrokerStats {
                    source: StatsSource::Management,
                    queues,
                    note,
                };
            }
            Err(err) => {
                let cause = api.scrub(&err.to_string());
                warn!(%cause, "falling back to AMQP for queue depths");
                format!("{cause}; showing counts from AMQP, without unacknowledged messages")
            }
        },
        None => "management API not configured; showing counts from AMQP, without \
                 unacknowledged messages"
            .to_owned(),
    };
    BrokerStats {
        source: StatsSource::Amqp,
        queues: passive(connection, known_queues).await,
        note: Some(note),
    }
}

/// Takes ready and consumer counts from `amqp` for the queues the management API listed
/// without statistics; `unacked` stays unknown.
fn fill_from_amqp(queues: &mut [QueueStats], amqp: &[QueueStats]) {
    for queue in queues.iter_mut().filter(|queue| queue.unacked.is_none()) {
        if let Some(seen) = amqp.iter().find(|seen| seen.name == queue.name) {
            queue.ready = seen.ready;
            queue.consumers = seen.consumers;
        }
    }
}

/// An error and its sources, `: `-separated (reqwest's own message says little on its own,
/// e.g. "error sending request").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and reqwest sometimes repeat their source's message in their own.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(BODY_EXCERPT_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "amqp://gridq:s3cr%2Ft@10.1.2.3:5999/team%2Fa";

    #[test]
    fn management_api_is_derived_from_the_amqp_url() {
        let api = ManagementApi::from_amqp_url(URL, 15999).unwrap();
        assert_eq!(api.base_url(), "http://10.1.2.3:15999");
        assert_eq!(api.vhost(), "team/a");
        assert_eq!(api.user, "gridq");
        assert_eq!(api.password.0, "s3cr/t");
        assert_eq!(
            api.queues_path(),
            "http://10.1.2.3:15999/api/queues/team%2Fa"
        );

        let default_vhost = ManagementApi::from_amqp_url("amqp://u:p@rabbit/%2F", 15672).unwrap();
        assert_eq!(default_vhost.base_url(), "http://rabbit:15672");
        assert_eq!(
            default_vhost.queues_path(),
            "http://rabbit:15672/api/queues/%2F"
        );

        let no_path = ManagementApi::from_amqp_url("amqp://[::1]:5672", 15672).unwrap();
        assert_eq!(no_path.base_url(), "http://[::1]:15672");
        assert_eq!(no_path.vhost(), "/");
        assert_eq!(no_path.user, "guest");
    }

    #[test]
    fn explicit_base_url_keeps_its_prefix_and_may_carry_its_own_credentials() {
        let api = ManagementApi::new("https://rabbit.example:443/rabbitmq/", URL).unwrap();
        assert_eq!(api.base_url(), "https://rabbit.example/rabbitmq");
        assert_eq!(api.vhost(), "team/a");

        let api = ManagementApi::new("http://mon:hunter%402@rabbit:15672", URL).unwrap();
        assert_eq!(api.base_url(), "http://rabbit:15672");
        assert_eq!(
            (api.user.as_str(), api.password.0.as_str()),
            ("mon", "hunter@2")
        );
        assert_eq!(api.vhost(), "team/a");
        assert!(!format!("{api:?}").contains("hunter"));
        assert!(ManagementApi::new("ftp://rabbit", URL).is_err());
    }

    #[test]
    fn the_password_stays_out_of_debug_and_errors() {
        let api = ManagementApi::from_amqp_url(URL, 15672).unwrap();
        let debug = format!("{api:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
        assert!(debug.contains("***"), "{debug}");

        for bad in [
            "amqp://gridq:s3cr3t@/vh",
            "amqp://gridq:s3cr3t@host:notaport/vh",
            "amqp://gridq:s3cr3t@host/",
            "http://gridq:s3cr3t@host/vh",
        ] {
            let err = ManagementApi::from_amqp_url(bad, 15672).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, BrokerStatsError::InvalidBrokerUrl { .. }),
                "{bad}: {message}"
            );
            assert!(!message.contains("s3cr3t"), "{bad}: {message}");
        }
    }

    #[test]
    fn replies_keep_gridq_queues_sorted_and_tolerate_missing_counts() {
        let body = r#"[
            {"name":"gridq.jobs.b","messages_ready":5,"messages_unacknowledged":2,"consumers":1},
            {"name":"other","messages_ready":9,"messages_unacknowledged":0,"consumers":0},
            {"name":"gridq.events","consumers":0},
            {"name":"gridq.dead","messages_ready":0,"messages_unacknowledged":0,"consumers":1}
        ]"#;
        let queues = parse_queues(body).unwrap();
        assert_eq!(
            queues,
            [
                QueueStats {
                    name: "gridq.dead".into(),
                    ready: 0,
                    unacked: Some(0),
                    consumers: 1
                },
                QueueStats {
                    name: "gridq.events".into(),
                    ready: 0,
                    unacked: None,
                    consumers: 0
                },
                QueueStats {
                    name: "gridq.jobs.b".into(),
                    ready: 5,
                    unacked: Some(2),
                    consumers: 1
                },
            ]
        );
        let err = parse_queues(r#"{"error":"not_authorized"}"#).unwrap_err();
        assert!(err.contains("not_authorized"), "{err}");
    }

    #[test]
    fn queues_without_statistics_take_amqp_counts() {
        let mut queues = [
            QueueStats {
                name: "gridq.jobs.new".into(),
                ready: 0,
                unacked: None,
                consumers: 0,
            },
            QueueStats {
                name: "gridq.jobs.old".into(),
                ready: 4,
                unacked: Some(1),
                consumers: 2,
            },
        ];
        let amqp = [
            QueueStats {
                name: "gridq.jobs.new".into(),
                ready: 7,
                unacked: None,
                consumers: 1,
            },
            QueueStats {
                name: "gridq.jobs.old".into(),
                ready: 9,
                unacked: None,
                consumers: 9,
            },
        ];
        fill_from_amqp(&mut queues, &amqp);
        assert_eq!(
            (queues[0].ready, queues[0].unacked, queues[0].consumers),
            (7, None, 1)
        );
        assert_eq!(
            (queues[1].ready, queues[1].unacked, queues[1].consumers),
            (4, Some(1), 2)
        );
    }

    #[test]
    fn stats_serialise_with_a_lowercase_source() {
        let stats = BrokerStats {
            source: StatsSource::Amqp,
            queues: vec![QueueStats {
                name: "gridq.events".into(),
                ready: 3,
                unacked: None,
                consumers: 1,
            }],
            note: Some("why".into()),
        };
        assert_eq!(
            serde_json::to_value(&stats).unwrap(),
            serde_json::json!({
                "source": "amqp",
                "queues": [{"name": "gridq.events", "ready": 3, "unacked": null, "consumers": 1}],
                "note": "why"
            })
        );
    }
}
