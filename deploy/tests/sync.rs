//! Project sync against a real SSH test host (`scripts/test-hosts.sh`): exactly the selected
//! files arrive, with their contents, modes and links, by rsync and by the tar stream; a sync
//! of an unchanged tree sends nothing and one changed file is all a later sync sends; remote
//! removal refuses dangerous paths with its exact message and removes a project.
//!
//! Every test works in its own directory under the test user's home and removes it, also when
//! it fails.

mod hosts;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gridq_deploy::hosts::parse_hosts;
use gridq_deploy::ssh::{HostKeyPolicy, HostSession, Sessions, SshOptions};
use gridq_deploy::sync::{
    SyncMethod, SyncOptions, SyncReport, remote_abs_path, remove_remote, sync_project,
};
use hosts::{TestHost, hosts};

const LIMIT: Duration = Duration::from_secs(60);

/// Logs in to `host` the way `gridq deploy` does: its key only, strict host keys, no config.
async fn connect(host: &TestHost) -> (Sessions, Arc<HostSession>) {
    let list = parse_hosts(&host.target()).expect("host list");
    let options = SshOptions {
        identity: Some(host.key.clone()),
        known_hosts: Some(host.known_hosts.clone()),
        host_keys: HostKeyPolicy::Strict,
        config_file: Some("none".into()),
        connect_timeout: Duration::from_secs(10),
        parallel: 1,
    };
    let sessions = Sessions::connect(&list, &options)
        .await
        .expect("control directory");
    let session = match &sessions.connections()[0].1 {
        Ok(session) => Arc::clone(session),
        Err(e) => panic!("cannot log in to {}: {e}", host.target()),
    };
    (sessions, session)
}

/// A directory under the test user's home, removed (with plain ssh) when dropped.
struct RemoteDir {
    host: TestHost,
    name: String,
}

impl RemoteDir {
    fn new(test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .subsec_nanos();
        Self {
            host: hosts().docker[0].clone(),
            name: format!("gridq-sync-test-{test}-{}-{nanos:08x}", std::process::id()),
        }
    }
}

impl Drop for RemoteDir {
    fn drop(&mut self) {
        let _ = self.host.ssh(["rm", "-rf", "--", &self.name]).output();
    }
}

/// Runs `argv` on the host; panics unless it succeeds.
async fn remote(session: &HostSession, argv: &[&str]) -> Vec<u8> {
    let out = session.run(argv, Some(LIMIT)).await.expect("ssh");
    assert!(
        out.success(),
        "{argv:?} exited with {}: {}",
        out.code,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The regular files of the test project: path, contents, mode.
const FILES: [(&str, &str, u32); 20] = [
    ("a.txt", "alpha\n", 0o644),
    ("run.sh", "#!/bin/sh\necho hi\n", 0o755),
    ("nested/deep/b.txt", "bravo\n", 0o664),
    ("name with spaces 'and a quote'.txt", "quoted\n", 0o644),
    ("ünïcødé/файл.txt", "unicode ✓\n", 0o600),
    (".gridqignore", "*.log\ndata/\n!keep.log\n", 0o644),
    // .gitignore is not read, only sent.
    (".gitignore", "a.txt\nrun.sh\n", 0o644),
    ("keep.log", "kept\n", 0o644),
    ("sub/keep.log", "kept too\n", 0o644),
    ("debug.log", "left out\n", 0o644),
    ("sub/trace.log", "left out\n", 0o644),
    ("data/big.bin", "left out\n", 0o644),
    ("sub/data/x.bin", "left out\n", 0o644),
    (".git/config", "left out\n", 0o644),
    (".git/objects/ab/cdef", "left out\n", 0o644),
    ("target/debug/app", "left out\n", 0o755),
    (".gridq/state", "left out\n", 0o644),
    ("sub/target/y", "left out\n", 0o644),
    ("nested/.gridq/z", "left out\n", 0o644),
    ("nested/deep/.git", "gitdir: elsewhere\n", 0o644),
];

/// The regular files of [`FILES`] that are sent (besides the link `link -> a.txt`).
const SENT: [&str; 9] = [
    "a.txt",
    "run.sh",
    "nested/deep/b.txt",
    "name with spaces 'and a quote'.txt",
    "ünïcødé/файл.txt",
    ".gridqignore",
    ".gitignore",
    "keep.log",
    "sub/keep.log",
];

/// What arrives on the host, as `find -printf '%y\t%m\t%P\t%l'` reports it, made readable:
/// `f MODE PATH`, `l PATH -> TARGET`, `d PATH`.
fn expected_tree() -> BTreeSet<String> {
    let mut tree: BTreeSet<String> = FILES
        .iter()
        .filter(|(path, ..)| SENT.contains(path))
        .map(|(path, _, mode)| format!("f {mode:o} {path}"))
        .collect();
    tree.insert("l link -> a.txt".to_owned());
    for dir in ["nested", "nested/deep", "sub", "ünïcødé"] {
        tree.insert(format!("d {dir}"));
    }
    tree
}

/// How many files (and links) a full sync sends, and their size.
fn expected_sent() -> (usize, u64) {
    let bytes = FILES
        .iter()
        .filter(|(path, ..)| SENT.contains(path))
        .map(|(_, contents, _)| contents.len() as u64)
        .sum();
    (SENT.len() + 1, bytes)
}

/// Writes the test project into a new temporary directory.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, contents, mode) in FILES {
        let full = dir.path().join(path);
        let parent = full.parent().expect("parent");
        std::fs::create_dir_all(parent).expect("mkdir");
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        std::fs::write(&full, contents).expect("write");
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    std::os::unix::fs::symlink("a.txt", dir.path().join("link")).expect("symlink");
    dir
}

/// The tree under `dir` on the host, in the form of [`expected_tree`].
async fn remote_tree(session: &HostSession, dir: &str) -> BTreeSet<String> {
    let out = remote(
        session,
        &[
            "find",
            dir,
            "-mindepth",
            "1",
            "-printf",
            "%y\\t%m\\t%P\\t%l\\n",
        ],
    )
    .await;
    String::from_utf8(out)
        .expect("utf-8 listing")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [kind, mode, path, target] = fields.as_slice() else {
                panic!("bad listing line {line:?}");
            };
            match *kind {
                "f" => format!("f {mode} {path}"),
                "l" => format!("l {path} -> {target}"),
                other => format!("{other} {path}"),
            }
        })
        .collect()
}

/// Checks that every sent file on the host has the local contents.
async fn assert_contents(session: &HostSession, local: &Path, dir: &str) {
    for path in SENT {
        let remote_file = format!("{dir}/{path}");
        let got = remote(session, &["cat", "--", &remote_file]).await;
        let want = std::fs::read(local.join(path)).expect("local file");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "contents of {path}"
        );
    }
}

/// Syncs the test project three times with `method` into `remote_path` (whose files lie in
/// `dir`): everything, then nothing, then the one changed file.
async fn sync_three_times(method: SyncMethod, remote_path: &str, dir: &str) {
    let local = project();
    let (sessions, session) = connect(&hosts().docker[0]).await;
    let options = SyncOptions {
        method,
        ..SyncOptions::default()
    };
    let used = match method {
        SyncMethod::Tar => SyncMethod::Tar,
        _ => SyncMethod::Rsync,
    };
    let (files, bytes) = expected_sent();

    let first = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("first sync");
    assert_eq!(
        first,
        SyncReport {
            method: used,
            files,
            sent: files,
            bytes
        }
    );
    assert_eq!(remote_tree(&session, dir).await, expected_tree());
    assert_contents(&session, local.path(), dir).await;

    let second = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("second sync");
    assert_eq!(
        second,
        SyncReport {
            method: used,
            files,
            sent: 0,
            bytes: 0
        },
        "an unchanged tree sends nothing"
    );

    let changed = "bravo, changed\n";
    std::fs::write(local.path().join("nested/deep/b.txt"), changed).expect("write");
    let third = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("third sync");
    assert_eq!(
        third,
        SyncReport {
            method: used,
            files,
            sent: 1,
            bytes: changed.len() as u64
        },
        "only the changed file is sent"
    );
    assert_eq!(remote_tree(&session, dir).await, expected_tree());
    assert_contents(&session, local.path(), dir).await;

    drop(session);
    sessions.close().await;
}

#[tokio::test]
async fn rsync_sends_exactly_the_project_and_then_only_changes() {
    let dir = RemoteDir::new("rsync");
    // Auto picks rsync: it is installed here and on every test host.
    sync_three_times(SyncMethod::Auto, &dir.name, &dir.name).await;
}

#[tokio::test]
async fn tar_stream_sends_exactly_the_project_and_then_only_changes() {
    let dir = RemoteDir::new("tar");
    // `~/` is the home; missing parents are created.
    let nested = format!("{}/inner/-project", dir.name);
    sync_three_times(SyncMethod::Tar, &format!("~/{nested}"), &nested).await;
}

#[tokio::test]
async fn remove_remote_refuses_dangerous_paths_and_removes_a_project() {
    let dir = RemoteDir::new("remove");
    let (sessions, session) = connect(&hosts().docker[0]).await;
    let who = session.who();
    let home = String::from_utf8(remote(&session, &["pwd", "-P"]).await).expect("utf-8");
    let home = home.trim_end_matches('\n').to_owned();

    let refusals = [
        ("", "it is empty"),
        (".", "it is the remote home directory"),
        ("~", "it is the remote home directory"),
        ("./", "it is the remote home directory"),
        (home.as_str(), "it is the remote home directory"),
        ("/", "it is the root directory"),
        ("..", "it has a `..` component"),
        ("a/../..", "it has a `..` component"),
    ];
    for (path, reason) in refusals {
        let e = remove_remote(&session, path)
            .await
            .expect_err("a dangerous path");
        assert_eq!(
            e.to_string(),
            format!(
                "{who}: refusing to remove {path:?}: {reason}; name the project directory itself, e.g. gridq/myproject"
            )
        );
    }
    let parent = Path::new(&home)
        .parent()
        .expect("home has a parent")
        .display()
        .to_string();
    let e = remove_remote(&session, &parent)
        .await
        .expect_err("home's parent");
    assert!(
        e.to_string()
            .contains("it contains the remote home directory"),
        "{e}"
    );
    // Nothing was removed by any of those.
    remote(&session, &["test", "-d", &home]).await;

    let local = tempfile::tempdir().expect("tempdir");
    std::fs::write(local.path().join("f"), "x").expect("write");
    let report = sync_project(&session, local.path(), &dir.name, &SyncOptions::default())
        .await
        .expect("sync");
    assert_eq!(report.sent, 1);
    assert_eq!(
        remote_abs_path(&session, &dir.name)
            .await
            .expect("abs path"),
        format!("{home}/{}", dir.name)
    );
    assert_eq!(
        remote_abs_path(&session, &format!("~/{}/x/../y", dir.name))
            .await
            .expect("abs path"),
        format!("{home}/{}/y", dir.name)
    );

    remove_remote(&session, &dir.name).await.expect("remove");
    let out = session
        .run(&["test", "-e", &dir.name], Some(LIMIT))
        .await
        .expect("ssh");
    assert_eq!(out.code, 1, "{} is still there", dir.name);
    remove_remote(&session, &dir.name)
        .await
        .expect("removing a missing directory is fine");

    drop(session);
    sessions.close().await;
}
