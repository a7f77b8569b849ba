//! `gridq pull` end to end, through the real binary: after `gridq run --local` (the outputs
//! are on this machine; the store is read without a master), and from a deployed cluster on
//! the sshd test hosts (rsync over each host's SSH session, a host that is down reported while
//! the others come).

mod hosts;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `gridq ARGS` in `cwd`, with its own CLI context and no master or cluster from outside.
fn gridq(cwd: &Path, ctx: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gridq"));
    cmd.args(args)
        .current_dir(cwd)
        .env("GRIDQ_CONTEXT", ctx)
        .env_remove("GRIDQ_MASTER")
        .env_remove("GRIDQ_TOKEN")
        .env_remove("GRIDQ_CLUSTER")
        .env_remove("GRIDQ_STATE_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("gridq runs")
}

/// The files under `dir`, relative, with their contents.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// The job ids of a results CSV.
fn csv_ids(csv: &str) -> Vec<String> {
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect()
}

const JOB: &str = "import os\n\
    n = os.environ['GRIDQ_PARAM_N']\n\
    out = os.environ['GRIDQ_OUTPUT']\n\
    open(os.path.join(out, 'out.txt'), 'w').write('job ' + n + '\\n')\n\
    os.makedirs(os.path.join(out, 'sub'), exist_ok=True)\n\
    open(os.path.join(out, 'sub', 'data.bin'), 'wb').write(b'x' * (100 * int(n)))\n";

#[test]
fn pull_after_run_local_copies_every_jobs_outputs_once_and_says_what_is_missing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(support::vhost("pull-local"));
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("job.py"), JOB).unwrap();
    std::fs::write(
        project.join("sweep.yaml"),
        "name: outs\ncommand: python3 job.py\nparameters:\n  n: [1, 2, 3, 4]\n",
    )
    .unwrap();
    let ctx = dir.path().join("ctx.json");
    let run = gridq(
        &project,
        &ctx,
        &[("GRIDQ_BROKER", &url)],
        &["run", "sweep.yaml", "--local", "--workers", "2"],
    );
    assert!(run.status.success(), "{}", text(&run));
    let csv = std::fs::read_to_string(project.join(".gridq/results/outs.csv")).unwrap();
    let ids = csv_ids(&csv);
    assert_eq!(ids.len(), 4, "{csv}");

    // Without --dest: where they are.
    let out = gridq(&project, &ctx, &[], &["pull", "outs"]);
    assert!(out.status.success(), "{}", text(&out));
    let root = std::fs::canonicalize(&project)
        .unwrap()
        .join(".gridq/out/outs");
    assert!(
        stdout(&out).contains(&format!("outputs of 4 jobs in {}", root.display())),
        "{}",
        text(&out)
    );

    // With it: DEST/outs/<job>/..., and the results beside them.
    let dest = dir.path().join("dest");
    let out = gridq(
        &project,
        &ctx,
        &[],
        &["pull", "outs", "--dest", dest.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("outputs of 4 jobs in")
            && stdout(&out).contains("8 files (1.0 KiB) new or changed"),
        "{}",
        text(&out)
    );
    let got = tree(&dest.join("outs"));
    let mut want = BTreeMap::new();
    let n_of = |id: &str| -> usize {
        let row = csv.lines().find(|l| l.starts_with(id)).unwrap();
        row.rsplit(',').next().unwrap().parse().unwrap()
    };
    for id in &ids {
        let n = n_of(id);
        want.insert(format!("{id}/out.txt"), format!("job {n}\n").into_bytes());
        want.insert(format!("{id}/sub/data.bin"), vec![b'x'; 100 * n]);
    }
    want.insert("results.csv".into(), csv.clone().into_bytes());
    assert_eq!(got, want);

    // A second pull copies nothing.
    let out = gridq(
        &project,
        &ctx,
        &[],
        &["pull", "outs", "--dest", dest.to_str().unwrap(), "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (
            &report["hosts"][0]["files"],
            &report["hosts"][0]["jobs"],
            &report["ok"]
        ),
        (&Value::from(0), &Value::from(4), &Value::from(true)),
        "{report}"
    );

    // One job by prefix, only *.txt.
    let one = dir.path().join("one");
    let out = gridq(
        &project,
        &ctx,
        &[],
        &[
            "pull",
            "outs",
            &ids[2][..8],
            "--include",
            "*.txt",
            "--dest",
            one.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let got: BTreeSet<String> = tree(&one.join("outs")).into_keys().collect();
    assert_eq!(
        got,
        BTreeSet::from([format!("{}/out.txt", ids[2]), "results.csv".to_owned()])
    );

    // A job whose outputs are gone, and a job that is not in the sweep: said, exit 1; the
    // rest still comes.
    std::fs::remove_dir_all(root.join(&ids[0])).unwrap();
    let partial = dir.path().join("partial");
    let out = gridq(
        &project,
        &ctx,
        &[],
        &["pull", "outs", "--dest", partial.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("outputs missing for 1 job: {}", ids[0])),
        "{}",
        text(&out)
    );
    assert_eq!(tree(&partial.join("outs")).len(), 1 + 2 * 3);
    let out = gridq(
        &project,
        &ctx,
        &[],
        &[
            "pull",
            "outs",
            "0000000000000000",
            "--dest",
            partial.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("no job `0000000000000000` in sweep outs"),
        "{}",
        text(&out)
    );

    // Bad input: exit 2, with what is wrong.
    for (args, message) in [
        (vec!["pull", "nope"], "no sweep named `nope` in"),
        (vec!["pull", "outs", "xyz"], "`xyz` is not a job id"),
        (
            vec!["pull", "outs", "--state", "done"],
            "unknown state `done`",
        ),
    ] {
        let out = gridq(&project, &ctx, &[], &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", text(&out));
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = gridq(&elsewhere, &ctx, &[], &["pull", "outs"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("nothing to pull from"),
        "{}",
        text(&out)
    );
    rt.block_on(support::drop_vhost(&url));
}

// ---------------------------------------------------------------- a deployed cluster

fn images() -> Vec<(String, String)> {
    hosts::deploy_image_flags()
}

fn free_port() -> u16 {
    hosts::free_port()
}

/// A deployed test cluster, removed (containers, volumes, remote files) when dropped.
struct Deployed {
    name: String,
    dir: tempfile::TempDir,
}

impl Deployed {
    fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    fn run(&self, args: &[&str]) -> Output {
        gridq(
            &self.project(),
            &self.dir.path().join("ctx.json"),
            &[],
            args,
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "gridq {args:?}:\n{}", text(&out));
        stdout(&out)
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        let _ = self.run(&["clean", "--purge", "--yes"]);
        hosts::remove_cluster(&self.name);
    }
}

/// A sweep on three hosts, pulled: every job's files from the host that ran it, a second pull
/// that receives nothing, and with one worker host unreachable (its port wrong in a copy of
/// the cluster file) that host reported with its jobs, the others' outputs still there, exit 1.
#[test]
fn pull_from_a_cluster_fetches_from_every_host_and_reports_one_that_is_down() {
    let h = hosts::hosts();
    let name = format!("tpull-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(
        project.join("job.py"),
        format!("import time\ntime.sleep(1)\n{JOB}"),
    )
    .unwrap();
    std::fs::write(
        project.join("sweep.yaml"),
        "name: outs\ncommand: python3 job.py\nparameters:\n  n: !!python/tuple [1, 13]\n",
    )
    .unwrap();
    let c = Deployed {
        name: name.clone(),
        dir,
    };
    let hosts_list = h
        .docker
        .iter()
        .map(|t| t.target())
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = [
        "deploy",
        "-a",
        &hosts_list,
        "-i",
        &h.docker[0].key.display().to_string(),
        "--known-hosts",
        &h.docker[0].known_hosts.display().to_string(),
        "--ssh-config",
        "none",
        "-m",
        "1",
        "-w",
        "1,2,3",
        "--slots",
        "2",
        "--name",
        &name,
        "--broker-port",
        &free_port().to_string(),
        "--management-port",
        &free_port().to_string(),
        "--monitor-port",
        &free_port().to_string(),
        "--heartbeat-timeout",
        "5s",
        "--health-timeout",
        "120s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (flag, value) in images() {
        args.push(flag);
        args.push(value);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok(&args);
    c.ok(&["submit", "sweep.yaml", "--watch"]);
    let csv = c.ok(&["results", "outs", "--format", "csv"]);
    let ids = csv_ids(&csv);
    assert_eq!(ids.len(), 12, "{csv}");

    // Where each job ran, as the master says.
    let jobs: Vec<Value> = c
        .ok(&["results", "outs", "--format", "jsonl"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let host_of: BTreeMap<String, String> = jobs
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_owned(),
                j["host"].as_str().unwrap().to_owned(),
            )
        })
        .collect();

    let dest = c.dir.path().join("dest");
    let out = c.run(&["pull", "outs", "--dest", dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let got = tree(&dest.join("outs"));
    assert_eq!(got.len(), 1 + 2 * 12, "{:?}", got.keys());
    for id in &ids {
        assert!(
            got.contains_key(&format!("{id}/out.txt")),
            "{id}: {:?}",
            got.keys()
        );
    }
    assert_eq!(got["results.csv"], csv.as_bytes());
    let again = c.run(&["pull", "outs", "--dest", dest.to_str().unwrap(), "--json"]);
    assert!(again.status.success(), "{}", text(&again));
    let report: Value = serde_json::from_str(&stdout(&again)).unwrap();
    let received: u64 = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["files"].as_u64().unwrap())
        .sum();
    assert_eq!(received, 0, "{report}");

    // Host 3 down (its port wrong in a copy of the cluster file).
    let down = &h.docker[2];
    let file = std::fs::read_to_string(c.project().join("gridq-cluster.yaml")).unwrap();
    let broken = file.replace(
        &format!("{}:{}", down.addr, down.port),
        &format!("{}:{}", down.addr, free_port()),
    );
    assert_ne!(broken, file, "host 3's address in {file}");
    std::fs::write(c.project().join("broken.yaml"), broken).unwrap();
    let partial = c.dir.path().join("partial");
    let out = c.run(&[
        "pull",
        "outs",
        "--config",
        "broken.yaml",
        "--connect-timeout",
        "3s",
        "--dest",
        partial.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The host a job ran on: the address its worker reports (a master older than that
    // reporting names it by the worker's id, `gridq-worker-N.ADDR`).
    let ran_on_down = |id: &str| {
        let host = &host_of[id];
        *host == down.addr || host.ends_with(&format!(".{}", down.addr))
    };
    let on_down: Vec<&String> = ids.iter().filter(|id| ran_on_down(id)).collect();
    assert!(!on_down.is_empty(), "no job ran on host 3: {host_of:?}");
    assert!(
        stderr(&out).contains(&format!("{}@{}", down.user, down.addr))
            && stderr(&out).contains("unreachable"),
        "{}",
        text(&out)
    );
    let got = tree(&partial.join("outs"));
    for id in &ids {
        assert_eq!(
            got.contains_key(&format!("{id}/out.txt")),
            !ran_on_down(id),
            "{id} on {}",
            host_of[id]
        );
    }

    // A plain clean keeps the outputs and says so; --purge without a terminal needs --yes.
    let cleaned = c.run(&["clean"]);
    assert!(cleaned.status.success(), "{}", text(&cleaned));
    assert!(
        String::from_utf8_lossy(&cleaned.stdout).contains("outputs kept")
            || stderr(&cleaned).contains("outputs kept"),
        "{}",
        text(&cleaned)
    );
    let refused = c.run(&["clean", "--purge"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(stderr(&refused).contains("--yes"), "{}", text(&refused));
    let out = down.run(
        ["ls", &format!("gridq/{name}/.gridq/out/outs")],
        b"",
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "outputs still on host 3 after the refused purge"
    );
}
