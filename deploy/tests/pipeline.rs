//! The job pipeline against a real RabbitMQ: the happy path, argv and environment, a worker
//! killed mid-job, retries, timeouts, and jobs longer than the broker's consumer timeout.

mod support;

use std::time::Duration;

use gridq_master::store::JobState;
use support::{Cluster, alive, wait_until};

const MINUTE: Duration = Duration::from_secs(60);

/// A job that writes its argv and gridq environment as its result.
const DUMP: &str = r#"
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("GRIDQ_") and k != "GRIDQ_RESULT"}
with open(os.environ["GRIDQ_RESULT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}, f)
print("done", flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_runs_once_with_its_argv_and_environment() {
    let mut c = Cluster::new("happy").await;
    c.write("dump.py", DUMP);
    c.spawn_worker(&["--slots", "2"]);
    c.spawn_worker(&["--slots", "2"]);
    let summary = c
        .submit(
            "name: happy\ncommand: python3 dump.py {args}\nenv: {EXTRA: 'yes'}\nparameters:\n  model.lr: [0.1, 1e-3]\n  seed: !!python/tuple [0, 10]\n",
        )
        .await;
    assert_eq!(summary.total, 20);
    assert_eq!(summary.added, 20);
    let jobs = c.wait_done("happy", MINUTE).await;
    assert_eq!(jobs.len(), 20);
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        assert_eq!(j.attempt, 1, "ran more than once: {j:?}");
        let result = j.result.as_ref().expect("result");
        let argv: Vec<String> = serde_json::from_value(result["argv"].clone()).unwrap();
        assert_eq!(argv, j.argv[2..].to_vec());
        let env = &result["env"];
        assert_eq!(env["GRIDQ_JOB_ID"], j.id.to_string());
        assert_eq!(env["GRIDQ_SWEEP"], "happy");
        assert_eq!(env["GRIDQ_ATTEMPT"], "1");
        assert_eq!(
            env["GRIDQ_PARAM_MODEL_LR"],
            j.params["model.lr"].to_string().trim_matches('"')
        );
        assert_eq!(env["GRIDQ_PARAM_SEED"], j.params["seed"].to_string());
        assert_eq!(
            result["cwd"],
            c.project.canonicalize().unwrap().display().to_string()
        );
    }
    // Nothing lost, nothing run twice: one result row per job, no duplicates.
    let reader = c.reader();
    let sweep = gridq_common::SweepId::new("happy").unwrap();
    assert_eq!(reader.view().result_rows(&sweep).unwrap(), 20);
    for j in &jobs {
        assert_eq!(reader.view().duplicates(&sweep, &j.id).unwrap(), 0);
        assert_eq!(c.attempts("happy", j.id).len(), 1);
        let logs = reader.view().logs(&sweep, &j.id, None, 100).unwrap();
        assert_eq!(
            logs.iter()
                .map(|(_, _, l)| l.line.as_str())
                .collect::<Vec<_>>(),
            ["done"]
        );
    }
    c.shutdown().await;
}

/// Jobs go onto the queue in expansion order, so a worker takes them in that order: the master
/// publishes a batch of job messages all at once, and their order must survive it. (A worker
/// that gives jobs back, as one that leaves the short-job mode does, runs those later: the
/// queue is read here, not the order the jobs ran in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_sweep_lies_on_the_queue_in_expansion_order() {
    let c = Cluster::new("order").await;
    let summary = c
        .submit("name: order\ncommand: [\"true\"]\nparameters:\n  i: {range: [0, 300]}\n")
        .await;
    assert_eq!(summary.added, 300);
    c.wait_count("order", "queued", 300, MINUTE).await;
    let (conn, _ch, jobs, _) = support::get_jobs(&c.url, 300).await;
    let order: Vec<String> = jobs
        .iter()
        .map(|j| {
            j.params
                .iter()
                .find(|(name, _)| name == "i")
                .map(|(_, v)| v.clone())
                .expect("parameter i")
        })
        .collect();
    let expected: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(order, expected);
    let _ = conn.close(200, "done".into()).await;
    c.shutdown().await;
}

/// A message that carries several jobs (kind `jobs`): each job is claimed and runs once; with
/// long jobs, those no free slot takes are given back and run later; the message is acked once
/// every job in it has started or gone back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_several_jobs_runs_each_of_them_once_and_is_acked() {
    use gridq_common::topology;
    use gridq_common::wire::{self, JobBatch};
    use lapin::options::{BasicAckOptions, BasicPublishOptions};

    let mut c = Cluster::new("batch").await;
    c.submit(
        "name: batch\ncommand: [sh, -c, 'echo $GRIDQ_PARAM_I >> ran.txt; sleep 0.3']\nparameters:\n  i: {range: [0, 6]}\n",
    )
    .await;
    c.wait_count("batch", "queued", 6, MINUTE).await;
    // The master's six messages become one: taken off the queue, published again together,
    // and only then acked.
    let (conn, ch, jobs, last_tag) = support::get_jobs(&c.url, 6).await;
    let queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    let batch = wire::encode(&JobBatch { jobs });
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &batch.body,
            // Published as the master's broker user: workers take jobs from no one else.
            batch
                .properties
                .with_user_id(support::broker().user.as_str().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
        .await
        .expect("ack");
    let _ = conn.close(200, "done".into()).await;

    c.spawn_worker(&["--slots", "2"]);
    let done = c.wait_done("batch", MINUTE).await;
    assert_eq!(done.len(), 6);
    for j in &done {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        assert_eq!(j.attempt, 1, "{j:?}");
    }
    let mut ran: Vec<u32> = std::fs::read_to_string(c.project.join("ran.txt"))
        .expect("ran.txt")
        .lines()
        .map(|l| l.parse().expect("a number"))
        .collect();
    ran.sort_unstable();
    assert_eq!(ran, (0..6).collect::<Vec<_>>(), "each job runs once");
    // Two slots took two jobs; the other four went back as the same attempts.
    assert!(
        c.worker_logs()
            .contains("giving back granted jobs that have no free slot"),
        "{}",
        c.worker_logs()
    );
    // Nothing left on the queue, and the batch was acked.
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let stats = support::queue_stats(&c.url, &queue).await;
        if stats["messages"] == 0 && stats["messages_unacknowledged"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job queue never emptied: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Acked, not redelivered until the broker gave up on it: no claim was ever denied and
    // nothing was dead-lettered.
    assert!(
        !c.worker_logs().contains("claim denied"),
        "{}",
        c.worker_logs()
    );
    assert_eq!(c.reader().view().dead_letters(10).unwrap().len(), 0);
    c.shutdown().await;
}

/// While every worker holds short jobs ahead, a large submission goes out several jobs per
/// message: each job still runs exactly once, and the queue carries far fewer messages than
/// jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_jobs_go_out_several_per_message_and_each_runs_once() {
    use gridq_common::topology;

    // The workers are stopped for a while below: a long heartbeat timeout keeps them online.
    let url = support::vhost("batched").await;
    let mut c = Cluster::with_url("batched", url, |config| {
        config.heartbeat_timeout = Duration::from_secs(120);
    })
    .await;
    c.spawn_worker(&["--slots", "2"]);
    c.spawn_worker(&["--slots", "2"]);
    // Short jobs until both workers hold jobs ahead (each needs its last 4 jobs short; one
    // worker may take most of a warm-up). 40 jobs go out one per message (fewer than 64).
    let mut round = 0;
    loop {
        round += 1;
        c.submit(&format!(
            "name: warm{round}\ncommand: [\"true\"]\nparameters:\n  x: !!python/tuple [0, 40]\n"
        ))
        .await;
        c.wait_done(&format!("warm{round}"), MINUTE).await;
        // Heartbeats (every 250 ms) sent well after the warm-up report the mode it left.
        let after = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
            + 300;
        let short = wait_until("heartbeats after the warm-up", MINUTE, || {
            let workers = c.reader().view().workers().map_err(|e| e.to_string())?;
            let fresh = workers.len() == 2
                && workers
                    .iter()
                    .all(|w| w.info["ts_ms"].as_u64().unwrap_or(0) > after);
            fresh
                .then_some(workers)
                .ok_or_else(|| "stale heartbeats".to_owned())
        })
        .await
        .iter()
        .filter(|w| w.info["short_jobs"] == true && w.info["reads_batches"] == true)
        .count();
        if short == 2 {
            break;
        }
        assert!(round < 20, "the workers never both held short jobs ahead");
    }
    // Both workers stop where they are (their heartbeats said short jobs), so that what the
    // master publishes stays on the queue to be counted: 400 jobs in 50 messages, where one
    // job per message would be 400.
    for w in &c.workers {
        w.signal(nix::sys::signal::Signal::SIGSTOP);
    }
    c.submit("name: batched\ncommand: [\"true\"]\nparameters:\n  i: {range: [0, 400]}\n")
        .await;
    c.wait_count("batched", "queued", 400, MINUTE).await;
    // Ready or delivered to the stopped workers and not acked: every message of the sweep (the
    // management API refreshes its figures every few seconds).
    let queue = topology::jobs_queue(topology::DEFAULT_QUEUE);
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let stats = support::queue_stats(&c.url, &queue).await;
        let messages = stats["messages"].as_u64();
        if messages == Some(50) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && messages.is_none_or(|m| m < 50),
            "{messages:?} messages on the job queue for 400 jobs (ready {}, unacked {})",
            stats["messages_ready"],
            stats["messages_unacknowledged"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in &c.workers {
        w.signal(nix::sys::signal::Signal::SIGCONT);
    }
    let jobs = c.wait_done("batched", MINUTE).await;
    assert_eq!(jobs.len(), 400);
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        assert_eq!(j.attempt, 1, "ran more than once: {j:?}");
    }
    let reader = c.reader();
    let sweep = gridq_common::SweepId::new("batched").unwrap();
    assert_eq!(reader.view().result_rows(&sweep).unwrap(), 400);
    for j in &jobs {
        assert_eq!(reader.view().duplicates(&sweep, &j.id).unwrap(), 0);
    }
    assert_eq!(reader.view().dead_letters(10).unwrap().len(), 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_reach_the_program_byte_for_byte() {
    let mut c = Cluster::new("hostile").await;
    c.write("dump.py", DUMP);
    c.spawn_worker(&["--slots", "2"]);
    let values = [
        "; rm -rf /",
        "$(whoami)",
        "`id`",
        "a b\tc\nd",
        "ünï ✓ 日本",
        "' \" \\",
        "*",
        "--x=1 --y=2",
    ];
    let list: Vec<String> = values
        .iter()
        .map(|v| serde_json::to_string(v).unwrap())
        .collect();
    let yaml = format!(
        "name: hostile\ncommand: [python3, dump.py, '{{v}}']\nparameters:\n  v: [{}]\n",
        list.join(", ")
    );
    c.submit(&yaml).await;
    let jobs = c.wait_done("hostile", MINUTE).await;
    let mut got: Vec<String> = jobs
        .iter()
        .map(|j| {
            assert_eq!(j.state, JobState::Succeeded, "{j:?}");
            let argv: Vec<String> =
                serde_json::from_value(j.result.as_ref().unwrap()["argv"].clone()).unwrap();
            assert_eq!(argv.len(), 1, "one value, one argument: {argv:?}");
            argv[0].clone()
        })
        .collect();
    let mut want: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_killed_runs_again_elsewhere_exactly_once() {
    let mut c = Cluster::new("sigkill").await;
    c.spawn_worker(&["--slots", "1"]);
    // The job records each start and its pid; the first attempt runs far longer than the test.
    let job = c.submit_long_first_attempt("sigkill").await;
    let running = c
        .wait_state("sigkill", job, JobState::Running, MINUTE)
        .await;
    assert_eq!(running.worker.as_deref(), Some(c.worker_id(0).as_str()));
    let starts = c.project.join("starts");
    wait_until("the first attempt to start", MINUTE, || {
        let text = std::fs::read_to_string(&starts).unwrap_or_default();
        if text == "1\n" {
            Ok(())
        } else {
            Err(format!("{text:?}"))
        }
    })
    .await;
    let first: i32 = std::fs::read_to_string(c.project.join("pid-1"))
        .unwrap()
        .parse()
        .unwrap();
    c.workers[0].signal(nix::sys::signal::Signal::SIGKILL);
    c.workers[0].wait_exit(Duration::from_secs(10)).await;
    // The worker starts jobs from its main thread: the parent-death signal, which follows the
    // thread that started the process, kills the job with the worker.
    wait_until("the first attempt to die with its worker", MINUTE, || {
        let stat = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
        match stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
        {
            None | Some("Z") => Ok(()),
            Some(state) => Err(format!("pid {first} is in state {state}")),
        }
    })
    .await;
    c.spawn_worker(&["--slots", "1"]);
    let done = c
        .wait_state("sigkill", job, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.worker.as_deref(), Some(c.worker_id(1).as_str()));
    let attempts = c.attempts("sigkill", job);
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.state.as_str())
            .collect::<Vec<_>>(),
        ["lost", "succeeded"]
    );
    assert!(
        attempts[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("missed heartbeats"),
        "{attempts:?}"
    );
    let sweep = gridq_common::SweepId::new("sigkill").unwrap();
    assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 1);
    assert_eq!(c.reader().view().duplicates(&sweep, &job).unwrap(), 0);
    // It started twice and finished once.
    assert_eq!(std::fs::read_to_string(&starts).unwrap(), "1\n2\n");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_with_backoff_then_fails_with_its_exit_code() {
    let mut c = Cluster::new("retries").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit("name: retries\ncommand: [sh, -c, 'echo try $GRIDQ_ATTEMPT; exit 3']\nretries: 2\nparameters:\n  x: 1\n")
        .await;
    let jobs = c.wait_done("retries", MINUTE).await;
    let j = &jobs[0];
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.exit_code, Some(3));
    assert_eq!(j.attempt, 3);
    let attempts = c.attempts("retries", j.id);
    assert_eq!(attempts.len(), 3);
    for a in &attempts {
        assert_eq!(a.state, "failed");
        assert_eq!(a.exit_code, Some(3));
    }
    // Backoff: the second retry waited longer than the first (1 s, then 1.5 s capped here).
    let gap = |a: &gridq_master::store::AttemptRow, b: &gridq_master::store::AttemptRow| {
        b.started_ms.unwrap() - a.finished_ms.unwrap()
    };
    assert!(gap(&attempts[0], &attempts[1]) >= 1000, "{attempts:?}");
    assert!(gap(&attempts[1], &attempts[2]) >= 1500, "{attempts:?}");
    // A job without retries fails at once.
    c.submit("name: noretry\ncommand: [sh, -c, 'exit 4']\nparameters:\n  x: 1\n")
        .await;
    let jobs = c.wait_done("noretry", MINUTE).await;
    assert_eq!(
        (jobs[0].state, jobs[0].exit_code, jobs[0].attempt),
        (JobState::Failed, Some(4), 1)
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_job_is_killed_with_its_process_group_and_frees_its_slot() {
    let mut c = Cluster::new("timeout").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit(
        "name: timeout\ncommand: [sh, -c, 'sleep 300 & echo $! > bg.pid; wait']\ntimeout: 1s\nparameters:\n  x: 1\n",
    )
    .await;
    let jobs = c.wait_done("timeout", MINUTE).await;
    assert_eq!(jobs[0].state, JobState::TimedOut, "{:?}", jobs[0]);
    let bg: i32 = std::fs::read_to_string(c.project.join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(
        "the background process to be gone",
        Duration::from_secs(10),
        || {
            if alive(bg) {
                Err(format!("pid {bg} alive"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    // The slot is free again: the next job runs.
    c.submit("name: after\ncommand: [true]\nparameters:\n  x: 1\n")
        .await;
    let jobs = c.wait_done("after", MINUTE).await;
    assert_eq!(jobs[0].state, JobState::Succeeded);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_consumer_timeout_is_neither_killed_nor_duplicated() {
    // The shared test broker runs with consumer_timeout = 5 s.
    let mut c = Cluster::new("longjob").await;
    c.spawn_worker(&["--slots", "1"]);
    c.submit("name: longjob\ncommand: [sh, -c, 'sleep 8; echo ok']\nparameters:\n  x: 1\n")
        .await;
    let jobs = c.wait_done("longjob", MINUTE).await;
    let j = &jobs[0];
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(j.attempt, 1);
    assert!(j.finished_ms.unwrap() - j.started_ms.unwrap() >= 8000);
    assert_eq!(c.attempts("longjob", j.id).len(), 1);
    let sweep = gridq_common::SweepId::new("longjob").unwrap();
    assert_eq!(c.reader().view().duplicates(&sweep, &j.id).unwrap(), 0);
    // The worker kept its connection: no reconnect was needed.
    assert!(
        !c.workers[0].log_text().contains("reconnecting"),
        "{}",
        c.workers[0].log_text()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_behind_a_long_one_is_given_back_and_runs_elsewhere_once() {
    let mut c = Cluster::new("holdback").await;
    c.spawn_worker(&["--slots", "1"]);
    c.warm_up_short_jobs().await;
    // Job 0 runs for a while; the others are instant. The worker starts job 0 and holds the
    // next ones; they wait for its only slot until it gives them back.
    c.submit(
        "name: holdback\ncommand: [sh, -c, 'if [ {x} = 0 ]; then sleep 8; fi']\nparameters:\n  x: !!python/tuple [0, 4]\n",
    )
    .await;
    let jobs = c.jobs("holdback");
    let long = jobs.iter().find(|j| j.index == 0).expect("job 0").id;
    let running = c
        .wait_state("holdback", long, JobState::Running, MINUTE)
        .await;
    assert_eq!(running.worker.as_deref(), Some(c.worker_id(0).as_str()));
    wait_until("the held jobs to be given back", MINUTE, || {
        let log = c.workers[0].log_text();
        if log.contains("giving back granted jobs that have no free slot") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    // A second worker runs them while job 0 still runs on the first.
    c.spawn_worker(&["--slots", "1"]);
    for j in jobs.iter().filter(|j| j.index != 0) {
        let done = c
            .wait_state("holdback", j.id, JobState::Succeeded, MINUTE)
            .await;
        assert_eq!(
            (done.worker.as_deref(), done.attempt),
            (Some(c.worker_id(1).as_str()), 1),
            "{done:?}"
        );
        let attempts = c.attempts("holdback", j.id);
        assert_eq!(attempts.len(), 1, "{attempts:?}");
    }
    assert_eq!(
        c.jobs("holdback")
            .iter()
            .find(|j| j.id == long)
            .map(|j| j.state),
        Some(JobState::Running)
    );
    let done = c
        .wait_state("holdback", long, JobState::Succeeded, MINUTE)
        .await;
    assert_eq!(
        (done.worker.as_deref(), done.attempt),
        (Some(c.worker_id(0).as_str()), 1)
    );
    let sweep = gridq_common::SweepId::new("holdback").unwrap();
    assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 4);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_given_back_and_delivered_again_to_the_same_worker_each_run_once() {
    let mut c = Cluster::new("giveback").await;
    c.spawn_worker(&["--slots", "2"]);
    c.warm_up_short_jobs().await;
    // Each round is a sweep the worker takes whole into its look-ahead (32 jobs for 2 slots):
    // jobs 0 and 1 take 60 ms and fill both slots, the others are instant. When job 0 ends,
    // the worker leaves the short-job mode and gives back what it holds; then job 1 ends and
    // frees a slot. The master queues the given-back attempts again, and with nothing else
    // queued the broker delivers them straight back to this worker, often before the broker's
    // confirm of the release has reached it. Four short jobs later the worker holds jobs ahead
    // again, ready for the next round.
    let mut given_back = 0;
    for round in 0..8 {
        let name = format!("giveback-{round}");
        c.submit(&format!(
            "name: {name}\ncommand: [sh, -c, 'if [ $1 -lt 2 ]; then sleep 0.06; fi', sh, '{{x}}']\nparameters:\n  x: !!python/tuple [0, 24]\n"
        ))
        .await;
        let jobs = c.wait_done(&name, MINUTE).await;
        assert_eq!(jobs.len(), 24);
        let sweep = gridq_common::SweepId::new(&name).unwrap();
        for j in &jobs {
            assert_eq!((j.state, j.attempt), (JobState::Succeeded, 1), "{j:?}");
            assert_eq!(c.attempts(&name, j.id).len(), 1, "{j:?}");
            assert_eq!(c.reader().view().duplicates(&sweep, &j.id).unwrap(), 0);
        }
        assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 24);
        given_back = c.workers[0]
            .log_text()
            .matches("giving back granted jobs that have no free slot")
            .count();
    }
    assert!(
        given_back >= 4,
        "jobs were given back {given_back} times: the test proves little"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_reach_only_workers_of_their_queue_and_a_worker_of_two_queues_loses_nothing() {
    let mut c = Cluster::new("queues").await;
    // Worker 0 serves `gpu` only; worker 1 serves both queues on one channel, so its
    // deliveries of the two queues interleave (and are acked together).
    c.spawn_worker(&["--slots", "1", "--queue", "gpu"]);
    c.spawn_worker(&["--slots", "2", "--queue", "default,gpu"]);
    c.submit(
        "name: ongpu\nqueue: gpu\ncommand: [true]\nparameters:\n  x: !!python/tuple [0, 60]\n",
    )
    .await;
    c.submit("name: oncpu\ncommand: [true]\nparameters:\n  x: !!python/tuple [0, 60]\n")
        .await;
    let gpu = c.wait_done("ongpu", MINUTE).await;
    let cpu = c.wait_done("oncpu", MINUTE).await;
    for j in gpu.iter().chain(&cpu) {
        assert_eq!((j.state, j.attempt), (JobState::Succeeded, 1), "{j:?}");
    }
    assert!(
        cpu.iter()
            .all(|j| j.worker.as_deref() == Some(c.worker_id(1).as_str())),
        "a `default` job ran on the `gpu`-only worker"
    );
    for (name, jobs) in [("ongpu", &gpu), ("oncpu", &cpu)] {
        assert_eq!(jobs.len(), 60);
        let sweep = gridq_common::SweepId::new(name).unwrap();
        assert_eq!(c.reader().view().result_rows(&sweep).unwrap(), 60);
        for j in jobs.iter().take(5) {
            assert_eq!(c.attempts(name, j.id).len(), 1);
        }
    }
    // Nothing left behind on the broker: no message ready, none delivered and never acked.
    for q in ["default", "gpu"] {
        let queue = gridq_common::topology::jobs_queue(q);
        let deadline = std::time::Instant::now() + MINUTE;
        loop {
            let stats = support::queue_stats(&c.url, &queue).await;
            let counts = (
                stats["messages_ready"].as_u64(),
                stats["messages_unacknowledged"].as_u64(),
            );
            if counts == (Some(0), Some(0)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{queue}: ready and unacked {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    c.shutdown().await;
}
