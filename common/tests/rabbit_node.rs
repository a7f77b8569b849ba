//! Integration tests of `gridq_common::rabbit_node` against the real `rabbitmq-server`.
//!
//! Each node start costs about 5 s, so one test walks a node through its whole life (start,
//! restart, crash, drop, a new start on the same directory) and another runs two nodes side by
//! side. Both need RabbitMQ installed (`sudo apt-get install rabbitmq-server`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gridq_common::rabbit_node::{NodeOptions, RabbitNode, USER};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const QUEUE: &str = "durable-jobs";
const PAYLOAD: &[u8] = b"job 42: confirmed and persistent";

/// Polls `condition` until it holds; on timeout panics with what the last poll saw.
async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut poll: impl FnMut() -> (bool, T),
) {
    let deadline = Instant::now() + limit;
    loop {
        let (done, seen) = poll();
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processes of process group `group` that are alive (not zombies), as (pid, command).
fn live_members(group: u32) -> Vec<(u32, String)> {
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // After the command name: state, ppid, pgrp, ...
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let command = head.split_once('(').map_or("", |(_, c)| c).to_string();
        if fields.get(2) == Some(&group.to_string().as_str()) && !matches!(fields[0], "Z" | "X") {
            members.push((pid, command));
        }
    }
    members
}

fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
    })
}

/// Waits until nothing of the node is left: no live process in its process group, not its
/// Erlang VM, and none of the VM's helpers (which run in sessions of their own).
async fn assert_processes_gone(group: u32, server_pid: u32, dir: &Path) {
    wait_until(
        "the node's processes to exit",
        Duration::from_secs(15),
        || {
            let members = live_members(group);
            let vm = process_alive(server_pid);
            let helpers = processes_using(dir);
            (
                members.is_empty() && !vm && helpers.is_empty(),
                (members, vm, helpers),
            )
        },
    )
    .await;
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to the node")
}

async fn declare(channel: &Channel, passive: bool) -> u32 {
    let options = QueueDeclareOptions {
        durable: true,
        passive,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(QUEUE.into(), options, FieldTable::default())
        .await
        .expect("declare the durable queue")
        .message_count()
}

/// Management API `GET path` as the node user, parsed as JSON.
async fn management_get(node: &RabbitNode, path: &str) -> serde_json::Value {
    let base = node.management_url().expect("management is enabled");
    let (user, password) = node.credentials();
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}{path}"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("management API answers");
    assert!(response.status().is_success(), "GET {path}: {response:?}");
    response.json().await.expect("JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_confirmed_messages_through_restart_crash_and_a_new_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    let mut options = NodeOptions::new(&dir);
    options.management = true;
    options.consumer_timeout = Some(Duration::from_secs(5));

    let started = Instant::now();
    let mut node = RabbitNode::start(options.clone())
        .await
        .expect("start node");
    eprintln!(
        "first start (new database, management): {:?}",
        started.elapsed()
    );

    // The password is random, private, on disk only in 0600 files and never in redacted URLs.
    let (user, password) = node.credentials();
    assert_eq!(user, USER);
    assert!(password.len() >= 24 && password.bytes().all(|b| b.is_ascii_alphanumeric()));
    let credentials = dir.join("credentials");
    assert_eq!(fs::read_to_string(&credentials).unwrap().trim(), password);
    for private in [credentials, dir.join("config/rabbitmq.conf")] {
        let mode = fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", private.display());
    }
    let redacted = node.redacted_url("/");
    assert!(!redacted.contains(password), "{redacted}");
    assert_eq!(
        redacted,
        format!("amqp://gridq:***@127.0.0.1:{}/%2F", node.amqp_port())
    );

    // No guest: the only user is gridq, and guest cannot log in.
    let users = management_get(&node, "/api/users").await;
    let names: Vec<&str> = users
        .as_array()
        .expect("a list of users")
        .iter()
        .filter_map(|user| user["name"].as_str())
        .collect();
    assert_eq!(names, [USER]);
    let guest_url = format!("amqp://guest:guest@127.0.0.1:{}/%2F", node.amqp_port());
    assert!(
        Connection::connect(&guest_url, ConnectionProperties::default())
            .await
            .is_err(),
        "guest must not be able to log in"
    );

    // A vhost whose name needs percent-encoding, a durable queue and a confirmed message.
    let vhost = "durable test/1";
    node.add_vhost(vhost).await.expect("add vhost");
    let vhosts = management_get(&node, "/api/vhosts").await;
    assert!(
        vhosts
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == vhost),
        "{vhosts}"
    );
    let url = node.amqp_url(vhost);
    {
        let connection = connect(&url).await;
        let channel = connection.create_channel().await.unwrap();
        assert_eq!(declare(&channel, false).await, 0);
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                PAYLOAD,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert!(confirm.is_ack(), "{confirm:?}");
        connection.close(200, "done".into()).await.unwrap();
    }

    // The consumer timeout from the options is in force: a delivery left unacknowledged gets
    // its channel closed, and the message goes back to the queue.
    {
        let connection = connect(&url).await;
        let channel = connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                QUEUE.into(),
                "slow-worker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let delivery = consumer
            .next()
            .await
            .expect("a delivery")
            .expect("delivery ok");
        assert_eq!(delivery.data, PAYLOAD);
        let held = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await;
        assert!(closed.is_ok(), "channel still open 30 s after the delivery");
        eprintln!(
            "unacked delivery's channel closed after {:?}",
            held.elapsed()
        );
        assert!(!channel.status().connected(), "{:?}", channel.status());
        assert!(
            held.elapsed() >= Duration::from_secs(4),
            "{:?}",
            held.elapsed()
        );
        let _ = connection.close(200, "done".into()).await;
    }

    // Graceful restart: same port and user, the message is still there.
    let port = node.amqp_port();
    let restarted = Instant::now();
    node.restart().await.expect("restart");
    eprintln!("restart (graceful stop + start): {:?}", restarted.elapsed());
    assert_eq!(node.amqp_port(), port);
    {
        let connection = connect(&url).await;
        let channel = connection.create_channel().await.unwrap();
        let message = channel
            .basic_get(QUEUE.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("the message survived the restart");
        assert_eq!(message.delivery.data, PAYLOAD);
        // Closing without an ack puts the message back for the next check.
        connection.close(200, "done".into()).await.unwrap();
    }

    // A crash: SIGKILL, then restart() brings the node and the confirmed message back.
    let group = node.process_group().expect("running");
    let vm = node.server_pid().expect("VM pid known");
    node.kill().await;
    assert!(node.process_group().is_none());
    assert_processes_gone(group, vm, &dir).await;
    let recovered = Instant::now();
    node.restart().await.expect("restart after kill");
    eprintln!("start after SIGKILL: {:?}", recovered.elapsed());
    {
        let connection = connect(&url).await;
        let channel = connection.create_channel().await.unwrap();
        assert_eq!(declare(&channel, true).await, 1);
        connection.close(200, "done".into()).await.unwrap();
    }

    // Drop kills everything the node started.
    let group = node.process_group().expect("running");
    let vm = node.server_pid().expect("VM pid known");
    let node_name = node.node_name().to_string();
    drop(node);
    assert_processes_gone(group, vm, &dir).await;

    // A new start on the same directory reuses name, password, port and data.
    let again = Instant::now();
    let mut node = RabbitNode::start(options).await.expect("start again");
    eprintln!(
        "second start() on the same directory: {:?}",
        again.elapsed()
    );
    assert_eq!(node.node_name(), node_name);
    assert_eq!(node.amqp_port(), port);
    assert_eq!(node.amqp_url(vhost), url);
    {
        let connection = connect(&url).await;
        let channel = connection.create_channel().await.unwrap();
        let message = channel
            .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the message survived drop and a new start");
        assert_eq!(message.delivery.data, PAYLOAD);
        connection.close(200, "done".into()).await.unwrap();
    }

    node.delete_vhost(vhost).await.expect("delete vhost");
    assert!(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .is_err(),
        "the deleted vhost still accepts connections"
    );
    let err = node.delete_vhost(vhost).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    let group = node.process_group().expect("running");
    let vm = node.server_pid().expect("VM pid known");
    let stopping = Instant::now();
    node.stop().await.expect("stop");
    eprintln!("graceful stop: {:?}", stopping.elapsed());
    assert!(!node.is_running());
    assert_processes_gone(group, vm, &dir).await;
    let err = node.add_vhost("late").await.unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_side_by_side_and_manage_vhosts_with_rabbitmqctl() {
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (a, b) = tokio::join!(
        RabbitNode::start(NodeOptions::new(tmp.path().join("a"))),
        RabbitNode::start(NodeOptions::new(tmp.path().join("b"))),
    );
    let (a, b) = (a.expect("start node a"), b.expect("start node b"));
    eprintln!("two nodes started concurrently: {:?}", started.elapsed());

    assert_ne!(a.amqp_port(), b.amqp_port());
    assert_ne!(a.node_name(), b.node_name());
    assert_ne!(a.credentials().1, b.credentials().1);
    assert_eq!(a.management_url(), None);

    // Each node accepts its own user and refuses the other's password and guest.
    for node in [&a, &b] {
        connect(&node.amqp_url("/"))
            .await
            .close(200, "done".into())
            .await
            .unwrap();
        let guest = format!("amqp://guest:guest@127.0.0.1:{}/%2F", node.amqp_port());
        assert!(
            Connection::connect(&guest, ConnectionProperties::default())
                .await
                .is_err()
        );
    }
    let crossed = a
        .amqp_url("/")
        .replace(&a.amqp_port().to_string(), &b.amqp_port().to_string());
    assert!(
        Connection::connect(&crossed, ConnectionProperties::default())
            .await
            .is_err(),
        "node b accepted node a's password"
    );

    // Without the management plugin, vhosts go through rabbitmqctl.
    let vhost = "-ctl vhost/2";
    let url = a.amqp_url(vhost);
    assert!(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .is_err()
    );
    a.add_vhost(vhost)
        .await
        .expect("add vhost with rabbitmqctl");
    a.add_vhost(vhost).await.expect("adding it again is fine");
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(declare(&channel, false).await, 0);
    connection.close(200, "done".into()).await.unwrap();
    a.delete_vhost(vhost).await.expect("delete vhost");
    assert!(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .is_err()
    );
    let err = a.delete_vhost(vhost).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    // Node b never saw any of it.
    assert!(
        Connection::connect(&b.amqp_url(vhost), ConnectionProperties::default())
            .await
            .is_err()
    );

    let groups = [a.process_group().unwrap(), b.process_group().unwrap()];
    let vms = [a.server_pid().unwrap(), b.server_pid().unwrap()];
    drop(a);
    drop(b);
    for ((group, vm), name) in groups.into_iter().zip(vms).zip(["a", "b"]) {
        assert_processes_gone(group, vm, &tmp.path().join(name)).await;
    }
}

/// Live processes whose environment points into `dir` (the node's processes all carry
/// `RABBITMQ_MNESIA_BASE=<dir>/mnesia`), as (pid, command).
fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        if String::from_utf8_lossy(&environ).contains(&needle) && process_alive(pid) {
            let command = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push((pid, command.trim().to_string()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_misses_its_startup_deadline_is_killed_and_its_log_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("slow");
    let mut options = NodeOptions::new(&dir);
    options.startup_timeout = Duration::from_millis(1500);
    let err = RabbitNode::start(options)
        .await
        .expect_err("no node boots in 1.5 s");
    let message = err.to_string();
    assert!(
        message.contains("did not accept AMQP connections within 1.5s"),
        "{message}"
    );
    assert!(message.contains("console.log ---"), "{message}");
    let password = fs::read_to_string(dir.join("credentials")).unwrap();
    assert!(!message.contains(password.trim()), "{message}");
    wait_until(
        "the failed node's processes to exit",
        Duration::from_secs(15),
        || {
            let left = processes_using(&dir);
            (left.is_empty(), left)
        },
    )
    .await;
}

#[tokio::test]
async fn an_explicit_port_that_is_taken_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut options = NodeOptions::new(tmp.path().join("node"));
    options.amqp_port = Some(port);
    let err = RabbitNode::start(options).await.expect_err("port is taken");
    assert_eq!(
        err.to_string(),
        format!("port 127.0.0.1:{port} is already in use")
    );
}
