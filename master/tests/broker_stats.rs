//! Queue statistics against a real RabbitMQ: the management API's counts of a queue in use,
//! the passive AMQP fallback, and `collect` falling back (without the password in its note)
//! when the management API is down, hangs or refuses the login.
//!
//! The broker: the one `scripts/test.sh` names in `GRIDQ_TEST_BROKER_ENV`, else a private
//! node per test in a temporary directory (killed when the test ends). Each test works in a
//! vhost of its own, deleted at the end.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use gridq_common::amqp;
use gridq_common::rabbit_node::{NodeOptions, RabbitNode, percent_encode};
use gridq_common::topology;
use gridq_master::broker_stats::{self, BrokerStats, ManagementApi, QueueStats, StatsSource};
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

/// Management statistics refresh every 5 s; a queue's first numbers can take two rounds.
const STATS_DEADLINE: Duration = Duration::from_secs(30);

/// A broker for one test: the shared one, or a private node this test owns.
struct Broker {
    /// `amqp://user:password@host:port`, without a vhost.
    amqp_base: String,
    management: String,
    user: String,
    password: String,
    node: Option<RabbitNode>,
    _dir: Option<TempDir>,
}

impl Broker {
    async fn start() -> Broker {
        match std::env::var("GRIDQ_TEST_BROKER_ENV") {
            Ok(path) => Self::shared(Path::new(&path)).await,
            Err(_) => Self::private().await,
        }
    }

    async fn shared(path: &Path) -> Broker {
        let deadline = Instant::now() + Duration::from_secs(120);
        let text = loop {
            match std::fs::read_to_string(path) {
                Ok(text) if text.contains("GRIDQ_BROKER_MANAGEMENT=") => break text,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no broker settings in {} after 120 s",
                path.display()
            );
            sleep(Duration::from_millis(100)).await;
        };
        let get = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{key} missing from {}", path.display()))
                .to_owned()
        };
        let url = get("GRIDQ_BROKER");
        // Written for the default vhost, `/%2F`.
        let amqp_base = url
            .trim_end_matches("/%2F")
            .trim_end_matches("/%2f")
            .to_owned();
        Broker {
            amqp_base,
            management: get("GRIDQ_BROKER_MANAGEMENT"),
            user: get("GRIDQ_BROKER_USER"),
            password: get("GRIDQ_BROKER_PASSWORD"),
            node: None,
            _dir: None,
        }
    }

    async fn private() -> Broker {
        let dir = tempfile::tempdir().expect("temporary directory");
        let node = RabbitNode::start(NodeOptions {
            management: true,
            ..NodeOptions::new(dir.path())
        })
        .await
        .unwrap_or_else(|err| panic!("starting a RabbitMQ node: {err}"));
        let (user, password) = node.credentials();
        let (user, password) = (user.to_owned(), password.to_owned());
        let url = node.amqp_url("/");
        Broker {
            amqp_base: url.trim_end_matches("/%2F").to_owned(),
            management: node.management_url().expect("management enabled"),
            user,
            password,
            node: Some(node),
            _dir: Some(dir),
        }
    }

    /// Creates `name` afresh with full permissions for the test user; returns its AMQP URL.
    async fn vhost(&self, name: &str) -> String {
        let encoded = percent_encode(name);
        match &self.node {
            Some(node) => node.add_vhost(name).await.expect("adding the vhost"),
            None => {
                let client = reqwest::Client::new();
                // A run killed halfway may have left it behind.
                let _ = client
                    .delete(format!("{}/api/vhosts/{encoded}", self.management))
                    .basic_auth(&self.user, Some(&self.password))
                    .send()
                    .await;
                for (path, body) in [
                    (format!("/api/vhosts/{encoded}"), None),
                    (
                        format!("/api/permissions/{encoded}/{}", self.user),
                        Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
                    ),
                ] {
                    let mut request = client
                        .put(format!("{}{path}", self.management))
                        .basic_auth(&self.user, Some(&self.password));
                    if let Some(body) = body {
                        request = request.json(&body);
                    }
                    let response = request.send().await.expect("management API");
                    assert!(
                        response.status().is_success(),
                        "PUT {path}: {}",
                        response.status()
                    );
                }
            }
        }
        format!("{}/{encoded}", self.amqp_base)
    }

    /// Deletes a vhost of the shared broker; a private node goes away with its directory.
    async fn drop_vhost(&self, name: &str) {
        if self.node.is_none() {
            let _ = reqwest::Client::new()
                .delete(format!(
                    "{}/api/vhosts/{}",
                    self.management,
                    percent_encode(name)
                ))
                .basic_auth(&self.user, Some(&self.password))
                .send()
                .await;
        }
    }
}

/// A vhost name with a `/` in it, so the `%2F` encoding of the API path is exercised too.
fn vhost_name(test: &str) -> String {
    format!("gridq-test/broker-stats-{test}-{}", std::process::id())
}

async fn connect(url: &str) -> Connection {
    amqp::connect(url, "broker-stats test")
        .await
        .unwrap_or_else(|err| panic!("connecting to {}: {err}", amqp::redact(url)))
}

/// Declares the job queue `gridq.jobs.<name>` as the master does and publishes `count`
/// confirmed messages to it.
async fn job_queue_with_messages(connection: &Connection, name: &str, count: usize) -> String {
    let channel = connection.create_channel().await.expect("channel");
    let queue = topology::declare_jobs_queue(&channel, name, topology::DEFAULT_DELIVERY_LIMIT)
        .await
        .expect("declaring the jobs queue");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..count {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                format!("job {i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    queue
}

/// A consumer that has taken 2 messages and holds them without acking.
///
/// The shared test broker's `consumer_timeout` is 5 s, about as long as the management
/// statistics take to catch up, so the broker may cancel a holder (closing its channel and
/// returning its messages) before the API has seen it; the test then takes two again.
struct Holder {
    channel: Channel,
    _consumer: Consumer,
    _held: Vec<Delivery>,
}

impl Holder {
    async fn take_two(connection: &Connection, queue: &str) -> Holder {
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_qos(2, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "holder".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut held = Vec::new();
        for _ in 0..2 {
            let delivery = timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery within 10 s")
                .expect("consumer open")
                .expect("delivery");
            held.push(delivery);
        }
        Holder {
            channel,
            _consumer: consumer,
            _held: held,
        }
    }

    fn is_alive(&self) -> bool {
        self.channel.status().connected()
    }
}

fn stats(name: &str, ready: u64, unacked: Option<u64>, consumers: u64) -> QueueStats {
    QueueStats {
        name: name.to_owned(),
        ready,
        unacked,
        consumers,
    }
}

#[tokio::test]
async fn management_and_amqp_count_a_queue_in_use() {
    let broker = Broker::start().await;
    let vhost = vhost_name("in-use");
    let url = broker.vhost(&vhost).await;
    let connection = connect(&url).await;

    let setup = connection.create_channel().await.expect("channel");
    topology::declare_master(&setup)
        .await
        .expect("master topology");
    setup
        .queue_declare(
            "not-gridq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declaring a foreign queue");
    let jobs = job_queue_with_messages(&connection, &format!("bs{}", std::process::id()), 7).await;

    let mut holder = Holder::take_two(&connection, &jobs).await;

    // AMQP knows ready messages and consumers, not unacked ones; a missing queue is left out
    // without disturbing the ones after it. Checked first, while the deliveries are fresh.
    let asked = [
        "gridq.jobs.missing".to_owned(),
        jobs.clone(),
        topology::EVENTS_QUEUE.to_owned(),
        "gridq.jobs.missing-too".to_owned(),
    ];
    let passive = broker_stats::passive(&connection, &asked).await;
    assert_eq!(
        passive,
        [
            stats(topology::EVENTS_QUEUE, 0, None, 0),
            stats(&jobs, 5, None, 1),
        ]
    );

    let api = ManagementApi::new(&broker.management, &url).expect("management API");
    let client = reqwest::Client::new();
    let expected_jobs = stats(&jobs, 5, Some(2), 1);
    let deadline = Instant::now() + STATS_DEADLINE;
    let listed = loop {
        if !holder.is_alive() {
            holder = Holder::take_two(&connection, &jobs).await;
        }
        let seen = api.queues(&client).await;
        // A queue declared since the broker's last statistics round is listed without
        // counts (`unacked: None`) until the next one.
        if let Ok(queues) = &seen {
            if queues.contains(&expected_jobs) && queues.iter().all(|q| q.unacked.is_some()) {
                break queues.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "management API never showed {expected_jobs:?} within {STATS_DEADLINE:?}; \
             last seen: {seen:?}"
        );
        sleep(Duration::from_millis(250)).await;
    };
    // Only gridq's queues, sorted by name.
    let names: Vec<&str> = listed.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        [topology::DEAD_QUEUE, topology::EVENTS_QUEUE, jobs.as_str()]
    );

    // Every queue has statistics now, so nothing is filled in from AMQP. (The counts
    // themselves may have moved on if a consumer timeout cancelled the holder meanwhile.)
    let collected = broker_stats::collect(Some(&api), &client, &connection, &asked).await;
    assert_eq!(collected.source, StatsSource::Management);
    assert_eq!(collected.note, None);
    let collected_names: Vec<&str> = collected.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(collected_names, names);

    drop(holder);
    let _ = connection.close(200, "test done".into()).await;
    broker.drop_vhost(&vhost).await;
}

#[tokio::test]
async fn collect_falls_back_to_amqp_and_keeps_the_password_out_of_its_note() {
    let broker = Broker::start().await;
    let vhost = vhost_name("fallback");
    let url = broker.vhost(&vhost).await;
    let connection = connect(&url).await;
    let jobs = job_queue_with_messages(&connection, &format!("bs{}", std::process::id()), 3).await;
    let known = [jobs.clone(), "gridq.jobs.missing".to_owned()];
    let client = reqwest::Client::new();
    let expected = vec![stats(&jobs, 3, None, 0)];

    let check = |stats: BrokerStats, password: &str, cause: &str| {
        assert_eq!(stats.source, StatsSource::Amqp, "{stats:?}");
        assert_eq!(stats.queues, expected);
        let note = stats.note.expect("a note saying why");
        assert!(note.contains(cause), "{note}");
        assert!(!note.contains(password), "the password leaked: {note}");
        note
    };

    // Nothing listens on the port.
    let dead_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let dead = ManagementApi::from_amqp_url(&url, dead_port).expect("management API");
    let stats = broker_stats::collect(Some(&dead), &client, &connection, &known).await;
    let note = check(stats, &broker.password, "management API unreachable");
    assert!(note.contains(&format!("127.0.0.1:{dead_port}")), "{note}");

    // Something accepts connections and never answers: the short timeout ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_api = ManagementApi::new(
        &format!("http://{}", silent.local_addr().expect("address")),
        &url,
    )
    .expect("management API");
    let stats = timeout(
        Duration::from_secs(30),
        broker_stats::collect(Some(&silent_api), &client, &connection, &known),
    )
    .await
    .expect("collect gives up on a silent management API");
    check(stats, &broker.password, "management API unreachable");
    drop(silent);

    // The API answers, but refuses the login.
    let wrong_password = "wrong-Pa55word-for-test";
    let wrong_url = url.replacen(
        &format!(":{}@", broker.password),
        &format!(":{wrong_password}@"),
        1,
    );
    assert_ne!(wrong_url, url);
    let refused = ManagementApi::new(&broker.management, &wrong_url).expect("management API");
    let stats = broker_stats::collect(Some(&refused), &client, &connection, &known).await;
    let note = check(stats, wrong_password, "401");
    assert!(!note.contains(&broker.password), "{note}");

    // No management API at all.
    let stats = broker_stats::collect(None, &client, &connection, &known).await;
    check(stats, &broker.password, "not configured");

    let _ = connection.close(200, "test done".into()).await;
    broker.drop_vhost(&vhost).await;
}
