//! The job pipeline under faults, against a real RabbitMQ: a job that kills its worker every
//! time, a broker restart and a master restart mid-sweep, a step whose transaction fails, a
//! lease whose grant was lost, poison messages, cancellation, resubmission, and a worker
//! stopped by SIGTERM (once, or twice).
//!
//! Each test proves one semantic a user relies on; see the protocol notes at the top of
//! `master/src/service.rs` for the lease design these tests exercise.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use gridq_common::rabbit_node::{NodeOptions, RabbitNode};
use gridq_common::wire::{self, Finished, FromWorker, Outcome};
use gridq_common::{SweepId, WorkerId, topology};
use gridq_master::store::{JobRow, JobState};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use nix::sys::signal::Signal;
use support::{Cluster, alive, wait_until};

const MINUTE: Duration = Duration::from_secs(60);

fn sweep_id(name: &str) -> SweepId {
    SweepId::new(name).expect("sweep id")
}

/// The states of a job's attempts, oldest first.
fn attempt_states(c: &Cluster, sweep: &str, job: gridq_common::JobId) -> Vec<String> {
    c.attempts(sweep, job)
        .into_iter()
        .map(|a| a.state)
        .collect()
}

/// The value of parameter `x` of a job, as the command saw it.
fn param_x(j: &JobRow) -> String {
    j.params["x"].to_string().trim_matches('"').to_owned()
}

/// The lines of a project file (empty when it does not exist).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until a job writes its pid into `path`.
async fn wait_pid(path: &Path) -> i32 {
    wait_until(&format!("a pid in {}", path.display()), MINUTE, || {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .ok_or_else(|| "no pid yet".to_owned())
    })
    .await
}

/// Waits for a job to leave a file behind.
async fn wait_file(what: &str, path: &Path) {
    wait_until(what, MINUTE, || {
        if path.exists() {
            Ok(())
        } else {
            Err(format!("no {}", path.display()))
        }
    })
    .await;
}

async fn wait_gone(pid: i32, limit: Duration) {
    wait_until(&format!("process {pid} to be gone"), limit, || {
        if alive(pid) {
            Err(format!("pid {pid} alive"))
        } else {
            Ok(())
        }
    })
    .await;
}

/// A connection to the test's vhost once the master has declared the default job queue (a
/// message published to a queue that does not exist yet would be dropped unroutable).
async fn connect_when_declared(url: &str) -> Connection {
    let conn = gridq_common::amqp::connect(url, "gridq-test-publisher")
        .await
        .expect("connect to the test vhost");
    let queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    let deadline = Instant::now() + MINUTE;
    loop {
        // A failed passive declare closes its channel: probe on a fresh one each time.
        let probe = conn.create_channel().await.expect("channel");
        match topology::check_queue(&probe, &queue).await {
            Ok(_) => return conn,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the master never declared {queue}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one message to `queue` and waits for the broker's confirm.
async fn publish_raw(conn: &Connection, queue: &str, body: &[u8], headers: Option<FieldTable>) {
    // As the test's one broker user, which is also the master's: the user_id RabbitMQ checks.
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_user_id(support::broker().user.as_str().into());
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    publish_confirmed(conn, "", queue, body, props)
        .await
        .expect("the broker took the message");
}

/// Publishes one message on a new confirmed channel; the broker's refusal (a closed channel, a
/// nack) is the error.
async fn publish_confirmed(
    conn: &Connection,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await?;
    assert!(confirm.is_ack(), "the broker nacked the message");
    let _ = ch.close(200, "published".into()).await;
    Ok(())
}

fn gridq_headers(schema: u32, kind: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from(wire::HEADER_SCHEMA),
        AMQPValue::LongUInt(schema),
    );
    h.insert(
        ShortString::from(wire::HEADER_KIND),
        AMQPValue::LongString(kind.into()),
    );
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_every_time_fails_after_a_bounded_number_of_attempts() {
    let mut c = Cluster::new("killer").await;
    // x=1 kills its worker (the job's parent) each time it starts; x=2 is harmless.
    c.submit(
        "name: killer\ncommand: [sh, -c, 'if [ {x} = 1 ]; then echo start >> kills; kill -9 $PPID; sleep 5; fi']\nparameters:\n  x: [1, 2]\n",
    )
    .await;
    let jobs = c.jobs("killer");
    let killer = jobs.iter().find(|j| param_x(j) == "1").expect("x=1").id;
    let harmless = jobs.iter().find(|j| param_x(j) == "2").expect("x=2").id;
    // A supply of single-slot workers: whenever the newest one dies, start another.
    c.spawn_worker(&["--slots", "1"]);
    let reader = c.reader();
    let id = sweep_id("killer");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut deaths = 0;
    let failed = loop {
        let row = reader.view().job(&id, &killer).unwrap().expect("job");
        if row.state.is_final() {
            break row;
        }
        let newest = c.workers.last_mut().expect("a worker");
        if newest.child.try_wait().expect("try_wait").is_some() {
            deaths += 1;
            assert!(deaths <= 10, "workers keep dying: the job loops ({row:?})");
            c.spawn_worker(&["--slots", "1"]);
        }
        assert!(
            Instant::now() < deadline,
            "the killer job is not final after 40 s: {row:?}\n{}",
            c.worker_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    let reason = failed.reason.clone().unwrap_or_default();
    let attempts = c.attempts("killer", killer);
    let starts = lines(&c.project.join("kills"));
    if reason.contains("lost 3 times") {
        // The lease path: each attempt was granted, then its worker went silent.
        assert_eq!(failed.attempt, 3, "{failed:?}");
        assert_eq!(
            attempts
                .iter()
                .map(|a| a.state.as_str())
                .collect::<Vec<_>>(),
            ["lost", "lost", "lost"],
            "{attempts:?}"
        );
        assert_eq!(starts.len(), 3, "each attempt started once: {starts:?}");
    } else {
        // The broker path: the worker died before acking, and the delivery limit hit.
        assert!(
            reason.contains("delivered 3 times"),
            "unexpected reason: {reason:?}"
        );
        assert!(attempts.iter().all(|a| a.state == "lost"), "{attempts:?}");
        assert!(starts.len() <= 3, "{starts:?}");
    }
    // One result row for the failed job too (the failure is its result).
    let harmless_row = c
        .wait_state("killer", harmless, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(harmless_row.attempt, 1, "{harmless_row:?}");
    assert_eq!(reader.view().result_rows(&id).unwrap(), 2);
    // It does not loop: no message of it is left to kill a fresh worker. A new sweep runs on
    // a worker that stays alive, and the failed job starts no more.
    if c.workers
        .last_mut()
        .expect("a worker")
        .child
        .try_wait()
        .expect("try_wait")
        .is_some()
    {
        c.spawn_worker(&["--slots", "1"]);
    }
    let survivor = c.workers.len() - 1;
    c.submit("name: after-killer\ncommand: [sh, -c, 'sleep 0.2']\nparameters:\n  x: [1, 2, 3]\n")
        .await;
    let after = c.wait_done("after-killer", MINUTE).await;
    assert!(
        after.iter().all(|j| j.state == JobState::Succeeded),
        "{after:?}"
    );
    assert!(
        c.workers[survivor].child.try_wait().unwrap().is_none(),
        "the last worker died: {}",
        c.workers[survivor].log_text()
    );
    assert_eq!(lines(&c.project.join("kills")), starts);
    let again = reader.view().job(&id, &killer).unwrap().expect("job");
    assert_eq!(
        (again.state, again.attempt),
        (JobState::Failed, failed.attempt)
    );
    c.shutdown().await;
}

/// A RabbitMQ node of the test's own, which it may restart (the shared one must not).
async fn private_node() -> (tempfile::TempDir, RabbitNode) {
    let dir = tempfile::Builder::new()
        .prefix("gridq-private-node-")
        .tempdir()
        .expect("tempdir");
    let node = RabbitNode::start(NodeOptions {
        management: false,
        consumer_timeout: None,
        ..NodeOptions::new(dir.path().join("node"))
    })
    .await
    .expect("a private RabbitMQ node");
    (dir, node)
}

/// Tears down a cluster on a private node: never `Cluster::shutdown`, which deletes the vhost
/// of the same name on the shared broker.
async fn teardown_private(mut c: Cluster) {
    for w in &mut c.workers {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    c.stop_master().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_sweep_loses_nothing_and_keeps_one_result_per_job() {
    let (_node_dir, mut node) = private_node().await;
    let mut c = Cluster::with_url("brokerrestart", node.amqp_url("/"), |_| {}).await;
    c.spawn_worker(&["--slots", "2"]);
    c.spawn_worker(&["--slots", "2"]);
    // Jobs 0-3 end at once; the others wait for a gate the test opens once the broker is back.
    // So the restart falls mid-sweep however slow the machine is: four jobs done, a job running
    // through it in each slot (they report on the new sessions), the rest queued.
    let summary = c
        .submit("name: restart\ncommand: [sh, -c, 'if [ $1 -ge 4 ]; then while [ ! -e gate ]; do sleep 0.05; done; fi', sh, '{x}']\nparameters:\n  x: !!python/tuple [0, 30]\n")
        .await;
    assert_eq!(summary.added, 30);
    let reader = c.reader();
    let id = sweep_id("restart");
    wait_until("four jobs done and the slots filled", MINUTE, || {
        let counts = reader.view().counts(&id).map_err(|e| e.to_string())?;
        let running = counts.get("running").copied().unwrap_or(0);
        if counts.get("succeeded") == Some(&4) && running >= 4 {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    })
    .await;
    node.restart().await.expect("broker restarts");
    let counts = c.counts("restart");
    assert_eq!(counts.get("succeeded"), Some(&4), "{counts:?}");
    std::fs::write(c.project.join("gate"), "").expect("gate");
    let jobs = c.wait_done("restart", MINUTE).await;
    assert_eq!(jobs.len(), 30);
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let attempts = c.attempts("restart", j.id);
        let dups = reader.view().duplicates(&id, &j.id).unwrap();
        // A job that ran again did so as a recorded new attempt; every extra report of an
        // attempt is a recorded duplicate, never a second result.
        assert_eq!(attempts.len(), j.attempt as usize, "{j:?} {attempts:?}");
        assert_eq!(
            attempts.last().map(|a| a.state.as_str()),
            Some("succeeded"),
            "{attempts:?}"
        );
        assert!(
            attempts[..attempts.len() - 1]
                .iter()
                .all(|a| a.state == "lost"),
            "{attempts:?}"
        );
        assert!(dups <= u64::from(j.attempt), "{dups} duplicates for {j:?}");
    }
    assert_eq!(reader.view().result_rows(&id).unwrap(), 30);
    // Everyone reconnected by themselves.
    for w in &c.workers {
        wait_until("the worker to reconnect", MINUTE, || {
            let log = w.log_text();
            if log.contains("broker session lost; reconnecting")
                && log.matches("connected to the broker").count() >= 2
            {
                Ok(())
            } else {
                Err(log)
            }
        })
        .await;
    }
    // A late duplicate report (a `finished` for an attempt already stored) is kept as a
    // duplicate, and the results table still has one row per job.
    let target = &jobs[0];
    let dups_before = reader.view().duplicates(&id, &target.id).unwrap();
    let late = FromWorker::Finished(wire::Results {
        results: vec![Finished {
            worker: WorkerId::new(target.worker.clone().expect("a worker")).unwrap(),
            host: target.host.clone().unwrap_or_default(),
            attempt: wire::AttemptRef {
                sweep: id.clone(),
                job: target.id,
                attempt: target.attempt,
            },
            outcome: Outcome::Failed,
            exit_code: Some(9),
            signal: None,
            started_ms: target.started_ms.unwrap_or(0),
            finished_ms: target.finished_ms.unwrap_or(0) + 1,
            result: None,
            reason: Some("late report".into()),
            gpus: Vec::new(),
            lines: 0,
            code: None,
            outputs: None,
        }],
    });
    let enc = wire::encode(&late);
    let conn = gridq_common::amqp::connect(&c.url, "gridq-test-late")
        .await
        .expect("connect");
    publish_raw(
        &conn,
        topology::EVENTS_QUEUE,
        &enc.body,
        enc.properties.headers().clone(),
    )
    .await;
    wait_until(
        "the late report to be stored as a duplicate",
        MINUTE,
        || {
            let n = reader
                .view()
                .duplicates(&id, &target.id)
                .map_err(|e| e.to_string())?;
            if n == dups_before + 1 {
                Ok(())
            } else {
                Err(format!("{n} duplicates"))
            }
        },
    )
    .await;
    let unchanged = reader.view().job(&id, &target.id).unwrap().expect("job");
    assert_eq!(
        (
            unchanged.state,
            unchanged.exit_code,
            unchanged.finished_ms,
            unchanged.attempt
        ),
        (
            JobState::Succeeded,
            Some(0),
            target.finished_ms,
            target.attempt
        )
    );
    assert_eq!(reader.view().result_rows(&id).unwrap(), 30);
    let _ = conn.close(200, "done".into()).await;
    // The master kept working across the restart.
    c.submit("name: after-restart\ncommand: [true]\nparameters:\n  x: [1, 2, 3]\n")
        .await;
    let after = c.wait_done("after-restart", MINUTE).await;
    assert!(
        after
            .iter()
            .all(|j| j.state == JobState::Succeeded && j.attempt == 1),
        "{after:?}"
    );
    teardown_private(c).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_does_not_count_as_a_lost_worker() {
    let (_node_dir, mut node) = private_node().await;
    let mut c = Cluster::with_url("outage", node.amqp_url("/"), |_| {}).await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit(
        "name: outage\ncommand: [sh, -c, 'echo $GRIDQ_ATTEMPT >> starts; sleep 6']\nparameters:\n  x: 1\n",
    )
    .await;
    let job = c.jobs("outage")[0].id;
    let starts = c.project.join("starts");
    wait_until("the job to start", MINUTE, || {
        let seen = lines(&starts);
        if seen == ["1"] {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    // The restart keeps the broker away for longer than the 2 s heartbeat timeout; the worker
    // and its job are fine all along.
    node.restart().await.expect("broker restarts");
    let row = c
        .wait_state("outage", job, JobState::Succeeded, MINUTE)
        .await;
    let attempts = attempt_states(&c, "outage", job);
    assert_eq!(
        (row.attempt, attempts.clone()),
        (1, vec!["succeeded".to_owned()]),
        "{row:?}"
    );
    assert_eq!(lines(&starts), ["1"], "the job ran twice");
    let sweep = sweep_id("outage");
    assert_eq!(c.reader().view().duplicates(&sweep, &job).unwrap(), 0);
    teardown_private(c).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restart_mid_sweep_loses_no_result_and_keeps_history() {
    let mut c = Cluster::new("masterrestart").await;
    c.spawn_worker(&["--slots", "1"]);
    c.spawn_worker(&["--slots", "1"]);
    c.submit(
        "name: mrestart\ncommand: [sh, -c, 'sleep 0.5; touch done-{x}']\nparameters:\n  x: !!python/tuple [0, 20]\n",
    )
    .await;
    let reader = c.reader();
    let id = sweep_id("mrestart");
    wait_until("some jobs done and some running", MINUTE, || {
        let counts = reader.view().counts(&id).map_err(|e| e.to_string())?;
        let done = counts.get("succeeded").copied().unwrap_or(0);
        let running = counts.get("running").copied().unwrap_or(0);
        if done >= 2 && running >= 1 {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    })
    .await;
    c.stop_master().await;
    // What the master had committed when it stopped.
    let at_stop = c.jobs("mrestart");
    let finished_before: Vec<JobRow> = at_stop
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .cloned()
        .collect();
    let running = at_stop
        .iter()
        .find(|j| j.state == JobState::Running)
        .expect("a job running at stop time")
        .clone();
    // Its worker finishes it while no master listens: the report waits on the broker.
    let marker = c.project.join(format!("done-{}", param_x(&running)));
    wait_file("a job running at stop time to finish", &marker).await;
    c.start_master().await;
    let jobs = c.wait_done("mrestart", MINUTE).await;
    assert_eq!(jobs.len(), 20);
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        // Heartbeats resumed within the timeout: no lease was lost, nothing ran twice.
        assert_eq!(j.attempt, 1, "{j:?}\n{:?}", c.attempts("mrestart", j.id));
        assert_eq!(attempt_states(&c, "mrestart", j.id), ["succeeded"]);
        assert_eq!(reader.view().duplicates(&id, &j.id).unwrap(), 0, "{j:?}");
    }
    assert_eq!(reader.view().result_rows(&id).unwrap(), 20);
    let reran = jobs.iter().find(|j| j.id == running.id).expect("job");
    assert_eq!(reran.worker, running.worker, "{reran:?}");
    // History intact: what finished before the stop kept its record.
    for old in &finished_before {
        let now = jobs.iter().find(|j| j.id == old.id).expect("job");
        assert_eq!(
            (now.finished_ms, now.started_ms, &now.worker),
            (old.finished_ms, old.started_ms, &old.worker),
            "{old:?} became {now:?}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_transaction_fails_gives_its_events_back_and_loses_nothing() {
    // Heartbeats wait with the other events while steps fail: a long timeout keeps the worker
    // from being taken for lost, so each job's one attempt is the one stored.
    let url = support::vhost("stepfail").await;
    let mut c = Cluster::with_url("stepfail", url, |config| {
        config.heartbeat_timeout = Duration::from_secs(120);
    })
    .await;
    c.spawn_worker(&["--slots", "2"]);
    c.submit(
        "name: stepfail\ncommand: [sh, -c, 'sleep 1; touch done-{x}']\nparameters:\n  x: [1, 2]\n",
    )
    .await;
    let id = sweep_id("stepfail");
    let reader = c.reader();
    wait_until("both jobs to run", MINUTE, || {
        let counts = reader.view().counts(&id).map_err(|e| e.to_string())?;
        match counts.get("running") {
            Some(2) => Ok(()),
            _ => Err(format!("{counts:?}")),
        }
    })
    .await;
    // Storing a result now fails: every step that carries one rolls back.
    let db = rusqlite::Connection::open(&c.handle.db_path).expect("store");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    db.execute_batch(
        "CREATE TRIGGER test_fail_results BEFORE INSERT ON results
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .expect("trigger");
    for x in [1, 2] {
        let marker = c.project.join(format!("done-{x}"));
        wait_file("the jobs to finish", &marker).await;
    }
    // The failed steps gave their events back: the broker delivers them again.
    let deadline = Instant::now() + MINUTE;
    loop {
        let stats = support::queue_stats(&c.url, topology::EVENTS_QUEUE).await;
        let redelivered = stats["message_stats"]["redeliver"].as_u64().unwrap_or(0);
        if redelivered > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the events of the failed steps were never redelivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.counts("stepfail").get("running"), Some(&2));
    db.execute_batch("DROP TRIGGER test_fail_results")
        .expect("drop trigger");
    let jobs = c.wait_done("stepfail", MINUTE).await;
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        assert_eq!((j.state, j.attempt), (JobState::Succeeded, 1), "{j:?}");
        assert_eq!(attempt_states(&c, "stepfail", j.id), ["succeeded"]);
        assert_eq!(reader.view().duplicates(&id, &j.id).unwrap(), 0, "{j:?}");
    }
    assert_eq!(reader.view().result_rows(&id).unwrap(), 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_while_the_store_fails_is_taken_for_lost_once_it_recovers() {
    let mut c = Cluster::new("lostfail").await;
    c.spawn_worker(&["--slots", "1"]);
    // The first attempt runs far longer than the test.
    let job = c.submit_long_first_attempt("lostfail").await;
    c.wait_state("lostfail", job, JobState::Running, MINUTE)
        .await;
    let starts = c.project.join("starts");
    wait_file("the first attempt to start", &starts).await;
    // Marking an attempt lost now fails: the step that takes the worker for lost rolls back.
    let db = rusqlite::Connection::open(&c.handle.db_path).expect("store");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    db.execute_batch(
        "CREATE TRIGGER test_fail_lost BEFORE UPDATE OF state ON attempts WHEN NEW.state = 'lost'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .expect("trigger");
    let before = c.metric("gridq_store_errors_total").await;
    c.workers[0].signal(Signal::SIGKILL);
    c.workers[0].wait_exit(Duration::from_secs(10)).await;
    // Its heartbeats stop; after the timeout, the master's steps fail and are counted.
    let deadline = Instant::now() + MINUTE;
    while c.metric("gridq_store_errors_total").await <= before {
        assert!(
            Instant::now() < deadline,
            "no step of the master failed after its worker was killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attempt_states(&c, "lostfail", job), ["running"]);
    db.execute_batch("DROP TRIGGER test_fail_lost")
        .expect("drop trigger");
    // The rolled-back step forgot nothing: the worker is still taken for lost, and the job
    // runs again on a new worker.
    c.spawn_worker(&["--slots", "1"]);
    let done = c
        .wait_state("lostfail", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(done.attempt, 2, "{done:?}");
    assert_eq!(done.worker.as_deref(), Some(c.worker_id(1).as_str()));
    assert_eq!(attempt_states(&c, "lostfail", job), ["lost", "succeeded"]);
    let id = sweep_id("lostfail");
    assert_eq!(c.reader().view().result_rows(&id).unwrap(), 1);
    assert_eq!(std::fs::read_to_string(&starts).unwrap(), "1\n2\n");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_grant_never_arrived_is_recovered() {
    let mut c = Cluster::new("lostgrant").await;
    c.submit("name: lostgrant\ncommand: [true]\nparameters:\n  x: 1\n")
        .await;
    let job = c.jobs("lostgrant")[0].id;
    c.wait_state("lostgrant", job, JobState::Queued, MINUTE)
        .await;
    // A live worker that claimed the job but never received its grant: it has no queue of its
    // own (so the grant is dropped, as a lost one is) and keeps sending heartbeats that list
    // no running job, as a real worker does after its claim times out.
    let ghost = WorkerId::new("ghost-lostgrant").unwrap();
    let conn = connect_when_declared(&c.url).await;
    let claim = wire::encode(&FromWorker::Claim(wire::Claims {
        worker: ghost.clone(),
        claims: vec![wire::Claim {
            attempt: wire::AttemptRef {
                sweep: sweep_id("lostgrant"),
                job,
                attempt: 1,
            },
            token: 1,
        }],
        code: None,
    }));
    publish_raw(
        &conn,
        topology::EVENTS_QUEUE,
        &claim.body,
        claim.properties.headers().clone(),
    )
    .await;
    let running = c
        .wait_state("lostgrant", job, JobState::Running, MINUTE)
        .await;
    assert_eq!(running.worker.as_deref(), Some(ghost.as_str()));
    let heartbeats = tokio::spawn(async move {
        loop {
            let hb = wire::encode(&FromWorker::Heartbeat(Box::new(wire::Heartbeat {
                worker: ghost.clone(),
                host: "ghost".into(),
                pid: 1,
                version: "test".into(),
                slots: 1,
                queues: vec![topology::DEFAULT_QUEUE.to_owned()],
                running: Vec::new(),
                cpus: 1,
                load1: 0.0,
                mem_total_mb: 0,
                mem_used_mb: 0,
                gpus: Vec::new(),
                draining: false,
                reads_batches: false,
                short_jobs: false,
                ts_ms: 0,
                interval_ms: 250,
                code: None,
            })));
            publish_raw(
                &conn,
                topology::EVENTS_QUEUE,
                &hb.body,
                hb.properties.headers().clone(),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    c.spawn_worker(&["--slots", "1"]);
    let row = c
        .wait_state(
            "lostgrant",
            job,
            JobState::Succeeded,
            Duration::from_secs(30),
        )
        .await;
    heartbeats.abort();
    assert_eq!(row.worker.as_deref(), Some(c.worker_id(0).as_str()));
    assert_eq!(row.attempt, 2, "{row:?}");
    let attempts = c.attempts("lostgrant", job);
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.state.as_str())
            .collect::<Vec<_>>(),
        ["lost", "succeeded"],
        "{attempts:?}"
    );
    assert!(
        attempts[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no longer runs it")),
        "{attempts:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_consumers_keep_running() {
    let mut c = Cluster::new("poison").await;
    c.spawn_worker(&["--slots", "1"]);
    let worker_pid = c.workers[0].pid();
    let conn = connect_when_declared(&c.url).await;
    let jobs_queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    publish_raw(
        &conn,
        &jobs_queue,
        b"not json",
        Some(gridq_headers(wire::SCHEMA_VERSION, "job")),
    )
    .await;
    publish_raw(&conn, &jobs_queue, b"{}", Some(gridq_headers(99, "job"))).await;
    publish_raw(&conn, topology::EVENTS_QUEUE, b"no headers", None).await;
    let _ = conn.close(200, "done".into()).await;
    c.submit("name: poison\ncommand: [true]\nparameters:\n  x: [1, 2, 3]\n")
        .await;
    let jobs = c.wait_done("poison", MINUTE).await;
    assert!(
        jobs.iter()
            .all(|j| j.state == JobState::Succeeded && j.attempt == 1),
        "{jobs:?}"
    );
    let reader = c.reader();
    let dead = wait_until("three dead letters", MINUTE, || {
        let dead = reader.view().dead_letters(100).map_err(|e| e.to_string())?;
        if dead.len() >= 3 {
            Ok(dead)
        } else {
            Err(format!("{dead:?}"))
        }
    })
    .await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let find = |needle: &str| {
        dead.iter()
            .find(|d| d.reason.contains(needle))
            .unwrap_or_else(|| panic!("no dead letter with reason {needle:?}: {dead:?}"))
    };
    let bad_body = find("invalid `job` body");
    assert_eq!(
        (bad_body.kind.as_deref(), bad_body.body.as_str()),
        (Some("job"), "not json")
    );
    let bad_schema = find("unknown schema version 99");
    assert_eq!(bad_schema.body, "{}");
    let no_headers = find("missing header `gridq-schema`");
    assert_eq!(
        (
            no_headers.queue.as_str(),
            no_headers.kind.as_deref(),
            no_headers.body.as_str()
        ),
        (topology::EVENTS_QUEUE, None, "no headers")
    );
    // The same processes carried on: the worker never restarted or reconnected, the master
    // still takes commands.
    assert!(alive(worker_pid));
    assert!(c.workers[0].child.try_wait().unwrap().is_none());
    let log = c.workers[0].log_text();
    assert_eq!(log.matches("worker starting").count(), 1, "{log}");
    assert_eq!(log.matches("connected to the broker").count(), 1, "{log}");
    assert!(!c.handle.commands.is_closed());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_message_is_recorded_with_the_queue_it_came_from() {
    let mut c = Cluster::new("poisonq").await;
    c.spawn_worker(&["--slots", "1"]);
    let conn = connect_when_declared(&c.url).await;
    let jobs_queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    publish_raw(
        &conn,
        &jobs_queue,
        b"not json",
        Some(gridq_headers(wire::SCHEMA_VERSION, "job")),
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
    let reader = c.reader();
    let dead = wait_until("a dead letter", MINUTE, || {
        let dead = reader.view().dead_letters(100).map_err(|e| e.to_string())?;
        dead.into_iter().next().ok_or_else(|| "none yet".to_owned())
    })
    .await;
    assert!(dead.reason.contains("invalid `job` body"), "{dead:?}");
    assert_eq!(dead.queue, jobs_queue, "{dead:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_sweep_kills_its_running_job_and_never_starts_the_queued_ones() {
    let mut c = Cluster::new("cancel").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit(
        "name: cancel\ncommand: [sh, -c, 'echo $$ > pid-{x}; exec sleep 30']\nparameters:\n  x: !!python/tuple [0, 6]\n",
    )
    .await;
    let reader = c.reader();
    let id = sweep_id("cancel");
    let running = wait_until("one job running", MINUTE, || {
        let rows = reader
            .view()
            .jobs(Some(&id), Some(JobState::Running), 10, 0)
            .map_err(|e| e.to_string())?;
        rows.into_iter()
            .next()
            .ok_or_else(|| "none running".to_owned())
    })
    .await;
    let pid = wait_pid(&c.project.join(format!("pid-{}", param_x(&running)))).await;
    assert!(alive(pid));
    assert_eq!(c.handle.cancel_sweep(id.clone()).await, Ok(6));
    wait_gone(pid, Duration::from_secs(10)).await;
    let jobs = c.jobs("cancel");
    assert!(
        jobs.iter().all(|j| j.state == JobState::Canceled),
        "{jobs:?}"
    );
    // The worker reports the kill: the running attempt ends `canceled`.
    wait_until(
        "the running attempt to be recorded canceled",
        MINUTE,
        || {
            let states = attempt_states(&c, "cancel", running.id);
            if states == ["canceled"] {
                Ok(())
            } else {
                Err(format!("{states:?}"))
            }
        },
    )
    .await;
    // The slot is free again: a new sweep runs on the same worker. Its jobs queue behind the
    // canceled messages, so by the time it is done the worker has seen (and dropped) them all.
    c.submit("name: after-cancel\ncommand: [true]\nparameters:\n  x: [1, 2]\n")
        .await;
    let after = c.wait_done("after-cancel", MINUTE).await;
    for j in &after {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        assert_eq!(j.worker.as_deref(), Some(c.worker_id(0).as_str()));
    }
    for j in jobs.iter().filter(|j| j.id != running.id) {
        assert!(
            c.attempts("cancel", j.id).is_empty(),
            "a canceled job started: {j:?}"
        );
        assert!(
            !c.project.join(format!("pid-{}", param_x(j))).exists(),
            "a canceled job ran: {j:?}"
        );
    }
    // Cancellation survives a master restart.
    c.stop_master().await;
    c.start_master().await;
    let jobs = c.jobs("cancel");
    assert!(
        jobs.iter()
            .all(|j| j.state == JobState::Canceled && j.attempt == 1),
        "{jobs:?}"
    );
    // Canceling a finished job changes nothing, and says so.
    let done = after[0].clone();
    assert_eq!(
        c.handle.cancel_job(sweep_id("after-cancel"), done.id).await,
        Ok(false)
    );
    let still = reader
        .view()
        .job(&sweep_id("after-cancel"), &done.id)
        .unwrap()
        .expect("job");
    assert_eq!(
        (still.state, still.attempt, still.finished_ms),
        (JobState::Succeeded, 1, done.finished_ms)
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_sweep_never_starts_the_jobs_a_worker_holds_ahead() {
    let mut c = Cluster::new("cancelheld").await;
    c.spawn_worker(&["--slots", "1"]);
    c.warm_up_short_jobs().await;
    c.submit(
        "name: cancelheld\ncommand: [sh, -c, 'echo $$ > pid-{x}; if [ {x} = 0 ]; then exec sleep 30; fi']\nparameters:\n  x: !!python/tuple [0, 4]\n",
    )
    .await;
    let jobs = c.jobs("cancelheld");
    let first = jobs.iter().find(|j| j.index == 0).expect("job 0").id;
    c.wait_state("cancelheld", first, JobState::Running, MINUTE)
        .await;
    let pid = wait_pid(&c.project.join("pid-0")).await;
    assert_eq!(c.handle.cancel_sweep(sweep_id("cancelheld")).await, Ok(4));
    wait_gone(pid, Duration::from_secs(10)).await;
    // The worker drops what it holds (granted: "canceled before it started"; not yet
    // answered: its claim is denied).
    wait_until("the held jobs to be dropped", MINUTE, || {
        let log = c.workers[0].log_text();
        let dropped =
            log.matches("canceled before it started").count() + log.matches("claim denied").count();
        if dropped >= 3 { Ok(()) } else { Err(log) }
    })
    .await;
    wait_until("job 0's attempt to be recorded canceled", MINUTE, || {
        let states = attempt_states(&c, "cancelheld", first);
        if states == ["canceled"] {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
    // The worker still serves, and its slot is free.
    c.submit("name: after\ncommand: [true]\nparameters:\n  x: [1, 2]\n")
        .await;
    for j in c.wait_done("after", MINUTE).await {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    }
    for j in c.jobs("cancelheld") {
        assert_eq!(j.state, JobState::Canceled, "{j:?}");
        if j.id == first {
            continue;
        }
        assert!(
            !c.project.join(format!("pid-{}", param_x(&j))).exists(),
            "a canceled job ran: {j:?}"
        );
        // Granted before the cancel (an attempt that ended canceled) or never granted.
        let states = attempt_states(&c, "cancelheld", j.id);
        assert!(
            states.is_empty() || states == ["canceled"],
            "{j:?}: {states:?}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_a_sweep_runs_only_what_is_new_failed_or_asked_for() {
    let mut c = Cluster::new("resubmit").await;
    c.spawn_worker(&["--slots", "2"]);
    let runs = c.project.join("runs");
    let yaml = |values: &str| {
        format!(
            "name: resub\ncommand: [sh, -c, 'echo {{x}}-$GRIDQ_ATTEMPT >> runs']\nparameters:\n  x: [{values}]\n"
        )
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let first = c.submit(&yaml("1, 2, 3")).await;
    assert_eq!((first.total, first.added), (3, 3));
    c.wait_done("resub", MINUTE).await;
    assert_eq!(sorted(lines(&runs)), ["1-1", "2-1", "3-1"]);

    // The same file again: everything is skipped, nothing is published.
    let same = c.submit(&yaml("1, 2, 3")).await;
    assert_eq!(
        (
            same.total,
            same.added,
            same.skipped,
            same.rerun,
            same.in_flight
        ),
        (3, 0, 3, 0, 0)
    );
    let jobs = c.jobs("resub");
    assert!(
        jobs.iter()
            .all(|j| j.state == JobState::Succeeded && j.attempt == 1),
        "{jobs:?}"
    );

    // Two more values: only the new jobs run.
    let extended = c.submit(&yaml("1, 2, 3, 4, 5")).await;
    assert_eq!(
        (
            extended.total,
            extended.added,
            extended.skipped,
            extended.rerun
        ),
        (5, 2, 3, 0)
    );
    let jobs = c.wait_done("resub", MINUTE).await;
    assert_eq!(jobs.len(), 5);
    for j in &jobs {
        assert_eq!((j.state, j.attempt), (JobState::Succeeded, 1), "{j:?}");
        assert_eq!(c.attempts("resub", j.id).len(), 1, "{j:?}");
    }
    assert_eq!(sorted(lines(&runs)), ["1-1", "2-1", "3-1", "4-1", "5-1"]);
    assert_eq!(
        c.reader().view().result_rows(&sweep_id("resub")).unwrap(),
        5
    );

    // `rerun`: every job runs once more, as its next attempt.
    let rerun = c.submit_opts(&yaml("1, 2, 3, 4, 5"), true).await;
    assert_eq!(
        (rerun.total, rerun.added, rerun.skipped, rerun.rerun),
        (5, 0, 0, 5)
    );
    let jobs = c.wait_done("resub", MINUTE).await;
    for j in &jobs {
        assert_eq!((j.state, j.attempt), (JobState::Succeeded, 2), "{j:?}");
        assert_eq!(
            attempt_states(&c, "resub", j.id),
            ["succeeded", "succeeded"]
        );
    }
    assert_eq!(
        sorted(lines(&runs)),
        [
            "1-1", "1-2", "2-1", "2-2", "3-1", "3-2", "4-1", "4-2", "5-1", "5-2"
        ]
    );
    assert_eq!(
        c.reader().view().result_rows(&sweep_id("resub")).unwrap(),
        5
    );

    // A failed job runs again on resubmission; the succeeded ones are skipped.
    let failing = "name: resubfail\ncommand: [sh, -c, 'echo {x}-$GRIDQ_ATTEMPT >> runs-f; test {x} != 2 || test $GRIDQ_ATTEMPT -gt 1']\nparameters:\n  x: [1, 2, 3]\n";
    c.submit(failing).await;
    let jobs = c.wait_done("resubfail", MINUTE).await;
    let states: Vec<(String, JobState)> = jobs.iter().map(|j| (param_x(j), j.state)).collect();
    assert_eq!(
        states,
        [
            ("1".to_owned(), JobState::Succeeded),
            ("2".to_owned(), JobState::Failed),
            ("3".to_owned(), JobState::Succeeded)
        ]
    );
    let again = c.submit(failing).await;
    assert_eq!(
        (again.added, again.skipped, again.rerun),
        (0, 2, 1),
        "{again:?}"
    );
    let jobs = c.wait_done("resubfail", MINUTE).await;
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let want = if param_x(j) == "2" { 2 } else { 1 };
        assert_eq!(j.attempt, want, "{j:?}");
    }
    assert_eq!(
        sorted(lines(&c.project.join("runs-f"))),
        ["1-1", "2-1", "2-2", "3-1"]
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_job_finish_then_the_worker_stops_cleanly() {
    let mut c = Cluster::new("stopfinish").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit(
        "name: stopfinish\ncommand: [sh, -c, 'touch started; sleep 2']\nparameters:\n  x: 1\n",
    )
    .await;
    let job = c.jobs("stopfinish")[0].id;
    c.wait_state("stopfinish", job, JobState::Running, MINUTE)
        .await;
    let started = c.project.join("started");
    wait_file("the job to start", &started).await;
    c.workers[0].signal(Signal::SIGTERM);
    let status = c.workers[0].wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", c.workers[0].log_text());
    let row = c
        .wait_state("stopfinish", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(row.attempt, 1);
    assert_eq!(row.worker.as_deref(), Some(c.worker_id(0).as_str()));
    assert_eq!(attempt_states(&c, "stopfinish", job), ["succeeded"]);
    let reader = c.reader();
    let w1 = c.worker_id(0);
    wait_until("the worker to be recorded as stopped", MINUTE, || {
        let workers = reader.view().workers().map_err(|e| e.to_string())?;
        match workers.iter().find(|w| w.id == w1) {
            Some(w) if w.state == "stopped" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_on_stop_requeue_hands_the_job_back_without_a_failure() {
    let mut c = Cluster::new("stoprequeue").await;
    c.spawn_worker(&["--slots", "1", "--on-stop", "requeue"]);
    c.submit(
        "name: stoprequeue\ncommand: [sh, -c, 'echo $GRIDQ_ATTEMPT >> starts; sleep 5']\nparameters:\n  x: 1\n",
    )
    .await;
    let job = c.jobs("stoprequeue")[0].id;
    let starts = c.project.join("starts");
    wait_until("the first attempt to start", MINUTE, || {
        let seen = lines(&starts);
        if seen == ["1"] {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    // A second worker, idle until the job is handed back.
    c.spawn_worker(&["--slots", "1"]);
    c.workers[0].signal(Signal::SIGTERM);
    let status = c.workers[0].wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", c.workers[0].log_text());
    let row = c
        .wait_state("stoprequeue", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(row.attempt, 2, "{row:?}");
    assert_eq!(row.worker.as_deref(), Some(c.worker_id(1).as_str()));
    let attempts = c.attempts("stoprequeue", job);
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.state.as_str())
            .collect::<Vec<_>>(),
        ["handed_back", "succeeded"],
        "{attempts:?}"
    );
    assert_eq!(attempts[0].worker.as_deref(), Some(c.worker_id(0).as_str()));
    assert_eq!(lines(&starts), ["1", "2"]);
    let sweep = sweep_id("stoprequeue");
    assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 1);
    assert_eq!(c.reader().view().duplicates(&sweep, &job).unwrap(), 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_the_worker_at_once_and_the_job_runs_elsewhere() {
    let mut c = Cluster::new("stoptwice").await;
    c.spawn_worker(&["--slots", "1"]);
    // The first attempt sleeps long; a later one finishes at once.
    c.submit(
        "name: stoptwice\ncommand: [sh, -c, 'echo $GRIDQ_ATTEMPT >> starts; if [ $GRIDQ_ATTEMPT = 1 ]; then echo $$ > pid; exec sleep 30; fi']\nparameters:\n  x: 1\n",
    )
    .await;
    let job = c.jobs("stoptwice")[0].id;
    let pid = wait_pid(&c.project.join("pid")).await;
    c.spawn_worker(&["--slots", "1"]);
    c.workers[0].signal(Signal::SIGTERM);
    // The second signal must come after the first was taken in, or the two could merge.
    wait_until("the worker to start stopping", MINUTE, || {
        let log = c.workers[0].log_text();
        if log.contains("stopping: no new jobs") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    c.workers[0].signal(Signal::SIGTERM);
    c.workers[0].wait_exit(Duration::from_secs(3)).await;
    wait_gone(pid, Duration::from_secs(5)).await;
    let row = c
        .wait_state("stoptwice", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(row.attempt, 2, "{row:?}");
    assert_eq!(row.worker.as_deref(), Some(c.worker_id(1).as_str()));
    let attempts = c.attempts("stoptwice", job);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(
        ["lost", "handed_back"].contains(&attempts[0].state.as_str()),
        "{attempts:?}"
    );
    assert_eq!(attempts[1].state, "succeeded");
    assert_eq!(lines(&c.project.join("starts")), ["1", "2"]);
    let sweep = sweep_id("stoptwice");
    assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_users_run_jobs_but_cannot_touch_the_broker_or_speak_for_another_worker() {
    use gridq_common::amqp;
    use lapin::options::QueueDeclareOptions;
    let admin = support::vhost("roles").await;
    let master_url = support::role_user(&admin, "rolem", |_| topology::master_permissions()).await;
    let w1_url = support::role_user(&admin, "rolew1", topology::worker_permissions).await;
    let w2_url = support::role_user(&admin, "rolew2", topology::worker_permissions).await;
    let master_user = amqp::user(&master_url);
    let (w1_user, w2_user) = (amqp::user(&w1_url), amqp::user(&w2_url));

    let mut c = Cluster::with_url("roles", master_url.clone(), |_| {}).await;
    c.spawn_worker_on(&w1_url, &["--master-user", &master_user, "--slots", "2"]);
    c.spawn_worker_on(&w2_url, &["--master-user", &master_user, "--slots", "1"]);
    // A sweep runs to the end under the least-privilege users.
    c.submit("name: plain\ncommand: [true]\nparameters:\n  x: !!python/tuple [0, 8]\n")
        .await;
    let jobs = c.wait_done("plain", MINUTE).await;
    assert_eq!(jobs.len(), 8);
    assert!(
        jobs.iter().all(|j| j.state == JobState::Succeeded),
        "{jobs:?}"
    );
    // A job held running until the test opens its gate.
    c.write(
        "gate.sh",
        "while [ ! -e open ]; do sleep 0.05; done\nprintf '{\"loss\": 0.5}' > \"$GRIDQ_RESULT\"\n",
    );
    c.submit("name: roles\ncommand: [sh, gate.sh]\nparameters:\n  x: [1]\n")
        .await;
    let job = c.jobs("roles")[0].id;
    let running = c.wait_state("roles", job, JobState::Running, MINUTE).await;
    let holder = running.worker.clone().expect("a worker");
    assert!(
        holder.starts_with(&format!("{w1_user}.")) || holder.starts_with(&format!("{w2_user}.")),
        "worker ids start with their broker user: {holder}"
    );
    let (own_url, other_user) = if holder.starts_with(&format!("{w1_user}.")) {
        (&w1_url, &w2_user)
    } else {
        (&w2_url, &w1_user)
    };
    let other_queue = format!("gridq.worker.{other_user}.");

    // With a worker's credentials, the broker refuses all of these (403 ACCESS_REFUSED).
    let conn = amqp::connect(own_url, "gridq-test-worker-user")
        .await
        .expect("connect as a worker user");
    let jobs_queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    let refused = |what: &str, r: Result<(), lapin::Error>| match r {
        Err(e) if topology::is_soft_error(&e, 403) => {}
        other => panic!("{what}: expected ACCESS_REFUSED, got {other:?}"),
    };
    let ch = conn.create_channel().await.unwrap();
    let declare = ch
        .queue_declare(
            "gridq.jobs.evil".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    refused("declaring a job queue", declare.map(drop));
    let ch = conn.create_channel().await.unwrap();
    let delete = ch
        .queue_delete(jobs_queue.as_str().into(), Default::default())
        .await;
    refused("deleting a job queue", delete.map(drop));
    let ch = conn.create_channel().await.unwrap();
    let purge = ch
        .queue_purge(topology::EVENTS_QUEUE.into(), Default::default())
        .await;
    refused("purging the events queue", purge.map(drop));
    let ch = conn.create_channel().await.unwrap();
    let consume = ch
        .basic_consume(
            format!("{other_queue}w-anything").as_str().into(),
            "thief".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await;
    refused("reading another worker's queue", consume.map(drop));
    let as_master = BasicProperties::default().with_user_id(master_user.as_str().into());
    let forged_job = publish_confirmed(&conn, "", &jobs_queue, b"{}", as_master.clone()).await;
    refused("publishing a job message", forged_job);

    // Claiming to be the master: RabbitMQ checks user_id against the connection (406).
    let spoofed = publish_confirmed(&conn, topology::EVENTS_EXCHANGE, "", b"{}", as_master).await;
    assert!(
        matches!(&spoofed, Err(e) if topology::is_soft_error(e, 406)),
        "{spoofed:?}"
    );
    let _ = conn.close(200, "done".into()).await;

    // The other worker's user forges a result for the running job, in the holder's name.
    let forged = wire::encode(&FromWorker::Finished(wire::Results {
        results: vec![Finished {
            worker: WorkerId::new(holder.clone()).unwrap(),
            host: running.host.clone().unwrap_or_default(),
            attempt: wire::AttemptRef {
                sweep: sweep_id("roles"),
                job,
                attempt: running.attempt,
            },
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_ms: 0,
            finished_ms: 1,
            result: serde_json::json!({"loss": -999}).as_object().cloned(),
            reason: None,
            gpus: Vec::new(),
            lines: 0,
            code: None,
            outputs: None,
        }],
    }));
    let other_url = if own_url == &w1_url { &w2_url } else { &w1_url };
    let conn = amqp::connect(other_url, "gridq-test-forger").await.unwrap();
    let as_other = forged
        .properties
        .with_user_id(amqp::user(other_url).as_str().into());
    publish_confirmed(&conn, topology::EVENTS_EXCHANGE, "", &forged.body, as_other)
        .await
        .expect("a worker user may publish events");
    let _ = conn.close(200, "done".into()).await;
    let reader = c.reader();
    let dead = wait_until("the forged result to be refused", MINUTE, || {
        let dead = reader.view().dead_letters(100).map_err(|e| e.to_string())?;
        dead.into_iter()
            .find(|d| d.reason.contains("may not speak for worker"))
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    assert!(
        dead.reason.contains(&format!(
            "broker user `{}` may not speak for worker `{holder}`",
            amqp::user(other_url)
        )),
        "{dead:?}"
    );
    assert_eq!(
        c.metric(r#"gridq_rejected_messages_total{reason="wrong_user"}"#)
            .await,
        1.0
    );
    assert_eq!(c.jobs("roles")[0].state, JobState::Running);
    // The real result is the one stored, once.
    std::fs::write(c.project.join("open"), "").unwrap();
    let done = c
        .wait_state("roles", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(
        done.result.as_ref().and_then(|r| r.get("loss")),
        Some(&serde_json::json!(0.5))
    );
    assert_eq!(
        reader.view().duplicates(&sweep_id("roles"), &job).unwrap(),
        0
    );
    c.shutdown().await;
    for url in [&master_url, &w1_url, &w2_url] {
        support::drop_user(url).await;
    }
}
