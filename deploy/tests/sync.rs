//! Project sync against a real SSH test host (`scripts/test-hosts.sh`): exactly the selected
//! files arrive, with their contents, modes and links, by rsync and by the tar stream
//! (`.gitignore` files at any depth with their negations, `.gridqignore` overriding them, a venv
//! and a 100 MB ignored file left behind, or sent with `gitignore` off); a sync of an
//! unchanged tree sends nothing and one changed file is all a later sync sends; the code
//! version lands in `.gridq/code.json`; `delete` removes what was removed locally and nothing
//! else (job outputs under `.gridq/`, ignored files placed on the host), and refuses the home;
//! remote removal refuses dangerous paths with its exact message and removes a project.
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
    CodeVersion, SyncMethod, SyncOptions, SyncReport, code_version, remote_abs_path, remove_remote,
    sync_project,
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

/// Writes `contents` to `path` on the host (its parent created), with argv only.
async fn put(session: &HostSession, path: &str, contents: &str) {
    let parent = path.rsplit_once('/').map_or(".", |(p, _)| p);
    remote(session, &["mkdir", "-p", "--", parent]).await;
    let out = session
        .run_with_input(&["tee", "--", path], contents.as_bytes(), Some(LIMIT))
        .await
        .expect("ssh");
    assert!(
        out.success(),
        "tee {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The regular files of the test project: path, contents, mode.
const FILES: [(&str, &str, u32); 31] = [
    ("a.txt", "alpha\n", 0o644),
    ("run.sh", "#!/bin/sh\necho hi\n", 0o755),
    ("nested/deep/b.txt", "bravo\n", 0o664),
    ("name with spaces 'and a quote'.txt", "quoted\n", 0o644),
    ("ünïcødé/файл.txt", "unicode ✓\n", 0o600),
    // Overrides .gitignore both ways: re-includes vocab.bin, leaves out more.
    (
        ".gridqignore",
        "*.log\ndata/\n!keep.log\n!vocab.bin\n",
        0o644,
    ),
    (".gitignore", "venv/\n*.bin\nbig.dat\nwandb/\n", 0o644),
    // A nested .gitignore with a negation.
    ("sub/.gitignore", "!weights.bin\n*.tmp\n", 0o644),
    ("vocab.bin", "vocab\n", 0o644),
    ("sub/weights.bin", "weights\n", 0o644),
    ("x.tmp", "a tmp file above sub/.gitignore\n", 0o644),
    ("keep.log", "kept\n", 0o644),
    ("sub/keep.log", "kept too\n", 0o644),
    ("model.bin", "left out\n", 0o644),
    ("sub/x.tmp", "left out\n", 0o644),
    ("venv/bin/python", "left out\n", 0o755),
    (
        "venv/lib/python3.12/site-packages/torch/__init__.py",
        "left out\n",
        0o644,
    ),
    ("venv/pyvenv.cfg", "left out\n", 0o644),
    ("wandb/run-1/files/config.yaml", "left out\n", 0o644),
    ("debug.log", "left out\n", 0o644),
    ("sub/trace.log", "left out\n", 0o644),
    ("data/big.csv", "left out\n", 0o644),
    ("sub/data/x.csv", "left out\n", 0o644),
    (".git/config", "left out\n", 0o644),
    (".git/objects/ab/cdef", "left out\n", 0o644),
    ("target/debug/app", "left out\n", 0o755),
    (".gridq/state", "left out\n", 0o644),
    ("sub/target/y", "left out\n", 0o644),
    ("nested/.gridq/z", "left out\n", 0o644),
    ("nested/deep/.git", "gitdir: elsewhere\n", 0o644),
    ("nested/deep/.gitignore", "", 0o644),
];

/// The regular files of [`FILES`] that are sent (besides the link `link -> a.txt`).
const SENT: [&str; 14] = [
    "a.txt",
    "run.sh",
    "nested/deep/b.txt",
    "name with spaces 'and a quote'.txt",
    "ünïcødé/файл.txt",
    ".gridqignore",
    ".gitignore",
    "sub/.gitignore",
    "vocab.bin",
    "sub/weights.bin",
    "x.tmp",
    "keep.log",
    "sub/keep.log",
    "nested/deep/.gitignore",
];

/// The 100 MB file (sparse) that `.gitignore` leaves out.
const BIG: &str = "big.dat";

/// What arrives on the host, as `find -printf '%y\t%m\t%P\t%l'` reports it, made readable:
/// `f MODE PATH`, `l PATH -> TARGET`, `d PATH`; `.gridq` aside (see [`take_code_file`]).
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

/// Writes `files` (path, contents, mode) into a new temporary directory.
fn write_project(files: &[(&str, &str, u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, contents, mode) in files {
        let full = dir.path().join(path);
        let parent = full.parent().expect("parent");
        std::fs::create_dir_all(parent).expect("mkdir");
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        std::fs::write(&full, contents).expect("write");
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    dir
}

/// Writes the test project into a new temporary directory.
fn project() -> tempfile::TempDir {
    let dir = write_project(&FILES);
    std::os::unix::fs::symlink("a.txt", dir.path().join("link")).expect("symlink");
    let big = std::fs::File::create(dir.path().join(BIG)).expect("create");
    big.set_len(100 << 20).expect("a 100 MB sparse file");
    dir
}

/// The tree under `dir` on the host, in the form of [`expected_tree`] (with `modes`) or
/// without modes.
async fn remote_tree_as(session: &HostSession, dir: &str, modes: bool) -> BTreeSet<String> {
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
                "f" if modes => format!("f {mode} {path}"),
                "l" => format!("l {path} -> {target}"),
                other => format!("{other} {path}"),
            }
        })
        .collect()
}

async fn remote_tree(session: &HostSession, dir: &str) -> BTreeSet<String> {
    remote_tree_as(session, dir, true).await
}

/// Takes `.gridq` and `.gridq/code.json` out of a remote tree (with modes), checking that
/// the file is there; `.gridq` must hold nothing else.
fn take_code_file(tree: &mut BTreeSet<String>) {
    assert!(tree.remove("d .gridq"), "no .gridq on the host: {tree:?}");
    let code: Vec<String> = tree
        .iter()
        .filter(|e| e.starts_with("f ") && e.ends_with(" .gridq/code.json"))
        .cloned()
        .collect();
    assert_eq!(code.len(), 1, "no .gridq/code.json on the host: {tree:?}");
    tree.remove(&code[0]);
}

/// The code version the host holds in the project at `dir`.
async fn remote_code(session: &HostSession, dir: &str) -> CodeVersion {
    let json = remote(session, &["cat", "--", &format!("{dir}/.gridq/code.json")]).await;
    serde_json::from_slice(&json).expect("code.json is a code version")
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

/// The method a sync with `method` uses on the test hosts (which all have rsync).
fn used(method: SyncMethod) -> SyncMethod {
    match method {
        SyncMethod::Tar => SyncMethod::Tar,
        _ => SyncMethod::Rsync,
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
    let (files, bytes) = expected_sent();
    let code = code_version(local.path(), &options).expect("code version");
    assert_eq!((code.commit.as_deref(), code.dirty), (None, None));

    let first = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("first sync");
    assert_eq!(
        first,
        SyncReport {
            method: used(method),
            files,
            sent: files,
            bytes,
            deleted: 0,
            code: code.clone(),
        }
    );
    let mut tree = remote_tree(&session, dir).await;
    take_code_file(&mut tree);
    assert_eq!(tree, expected_tree(), "the venv and {BIG} stay here");
    assert_contents(&session, local.path(), dir).await;
    assert_eq!(remote_code(&session, dir).await, code);

    let second = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("second sync");
    assert_eq!(
        second,
        SyncReport {
            method: used(method),
            files,
            sent: 0,
            bytes: 0,
            deleted: 0,
            code: code.clone(),
        },
        "an unchanged tree sends nothing"
    );

    let changed = "bravo, changed\n";
    std::fs::write(local.path().join("nested/deep/b.txt"), changed).expect("write");
    let new_code = code_version(local.path(), &options).expect("code version");
    assert_ne!(new_code.tree, code.tree);
    let third = sync_project(&session, local.path(), remote_path, &options)
        .await
        .expect("third sync");
    assert_eq!(
        third,
        SyncReport {
            method: used(method),
            files,
            sent: 1,
            bytes: changed.len() as u64,
            deleted: 0,
            code: new_code.clone(),
        },
        "only the changed file is sent"
    );
    let mut tree = remote_tree(&session, dir).await;
    take_code_file(&mut tree);
    assert_eq!(tree, expected_tree());
    assert_contents(&session, local.path(), dir).await;
    assert_eq!(remote_code(&session, dir).await, new_code);

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

/// With `gitignore` off, what .gitignore leaves out is sent (.gridqignore still applies); a
/// later sync with it on and `delete` leaves those files on the host: they are excluded.
async fn no_gitignore(method: SyncMethod, test: &str) {
    let dir = RemoteDir::new(test);
    let local = write_project(&[
        (".gitignore", "venv/\n*.bin\n", 0o644),
        (".gridqignore", "*.log\n", 0o644),
        ("main.py", "print(1)\n", 0o644),
        ("model.bin", "weights\n", 0o644),
        ("venv/bin/python", "#!/bin/sh\n", 0o755),
        ("debug.log", "left out\n", 0o644),
    ]);
    let (sessions, session) = connect(&hosts().docker[0]).await;
    let off = SyncOptions {
        method,
        gitignore: false,
        ..SyncOptions::default()
    };
    let report = sync_project(&session, local.path(), &dir.name, &off)
        .await
        .expect("sync without gitignore");
    assert_eq!((report.files, report.sent), (5, 5));
    assert_eq!(report.code, code_version(local.path(), &off).expect("code"));
    let sent: BTreeSet<String> = [
        "f .gitignore",
        "f .gridqignore",
        "f main.py",
        "f model.bin",
        "d venv",
        "d venv/bin",
        "f venv/bin/python",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let mut tree = remote_tree_as(&session, &dir.name, false).await;
    assert!(
        tree.remove("d .gridq") && tree.remove("f .gridq/code.json"),
        "{tree:?}"
    );
    assert_eq!(tree, sent);

    let on = SyncOptions {
        method,
        delete: true,
        ..SyncOptions::default()
    };
    let report = sync_project(&session, local.path(), &dir.name, &on)
        .await
        .expect("sync with gitignore and delete");
    assert_eq!(
        (report.files, report.sent, report.deleted),
        (3, 0, 0),
        "ignored files on the host are left alone"
    );
    assert_ne!(report.code, code_version(local.path(), &off).expect("code"));
    let mut tree = remote_tree_as(&session, &dir.name, false).await;
    assert!(
        tree.remove("d .gridq") && tree.remove("f .gridq/code.json"),
        "{tree:?}"
    );
    assert_eq!(tree, sent);
    assert_eq!(remote_code(&session, &dir.name).await, report.code);

    drop(session);
    sessions.close().await;
}

#[tokio::test]
async fn no_gitignore_sends_what_git_ignores_by_rsync() {
    no_gitignore(SyncMethod::Rsync, "nogit-rsync").await;
}

#[tokio::test]
async fn no_gitignore_sends_what_git_ignores_by_tar() {
    no_gitignore(SyncMethod::Tar, "nogit-tar").await;
}

/// A module deleted here is gone from the host after a sync with `delete`, and only then;
/// job outputs under `.gridq/out`, ignored files placed on the host, and the code version
/// survive it.
async fn delete_cycle(method: SyncMethod, test: &str) {
    let dir = RemoteDir::new(test);
    let d = dir.name.as_str();
    let local = write_project(&[
        (".gitignore", "data/\n*.ckpt\n", 0o644),
        ("main.py", "import pkg\n", 0o644),
        ("old_module.py", "x = 1\n", 0o644),
        ("name with space.py", "y = 2\n", 0o644),
        ("pkg/__init__.py", "", 0o644),
        ("pkg/util.py", "z = 3\n", 0o644),
        ("gone/__init__.py", "", 0o644),
        ("gone/sub/b.py", "w = 4\n", 0o644),
    ]);
    let (sessions, session) = connect(&hosts().docker[0]).await;
    let keep = SyncOptions {
        method,
        ..SyncOptions::default()
    };
    let delete = SyncOptions {
        delete: true,
        ..keep.clone()
    };
    let first = sync_project(&session, local.path(), d, &delete)
        .await
        .expect("first sync");
    assert_eq!((first.sent, first.deleted), (8, 0));

    // What jobs and people leave on the host.
    let output = format!("{d}/.gridq/out/sweep-1/0123/result.json");
    put(&session, &output, "{\"loss\": 0.1}\n").await;
    put(&session, &format!("{d}/data/hand-placed.csv"), "a,b\n").await;
    put(&session, &format!("{d}/model.ckpt"), "weights\n").await;
    put(&session, &format!("{d}/pkg/stray.txt"), "not ignored\n").await;
    put(&session, &format!("{d}/gone/sub/notes.ckpt"), "ignored\n").await;

    std::fs::remove_file(local.path().join("old_module.py")).expect("rm");
    std::fs::remove_file(local.path().join("name with space.py")).expect("rm");
    std::fs::remove_dir_all(local.path().join("gone")).expect("rm -r");

    let before = remote_tree_as(&session, d, false).await;
    let report = sync_project(&session, local.path(), d, &keep)
        .await
        .expect("sync without delete");
    assert_eq!((report.files, report.sent, report.deleted), (4, 0, 0));
    assert_eq!(
        remote_tree_as(&session, d, false).await,
        before,
        "without delete, nothing is deleted"
    );

    let report = sync_project(&session, local.path(), d, &delete)
        .await
        .expect("sync with delete");
    assert_eq!(
        (report.method, report.files, report.sent, report.deleted),
        (used(method), 4, 0, 5),
        "old_module.py, name with space.py, gone/__init__.py, gone/sub/b.py, pkg/stray.txt"
    );
    let want: BTreeSet<String> = [
        "f .gitignore",
        "f main.py",
        "d pkg",
        "f pkg/__init__.py",
        "f pkg/util.py",
        // Ignored here, so left alone there; gone/sub still holds one.
        "d data",
        "f data/hand-placed.csv",
        "f model.ckpt",
        "d gone",
        "d gone/sub",
        "f gone/sub/notes.ckpt",
        // Never listed, never deleted.
        "d .gridq",
        "f .gridq/code.json",
        "d .gridq/out",
        "d .gridq/out/sweep-1",
        "d .gridq/out/sweep-1/0123",
        "f .gridq/out/sweep-1/0123/result.json",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(remote_tree_as(&session, d, false).await, want);
    assert_eq!(
        remote(&session, &["cat", "--", &output]).await,
        b"{\"loss\": 0.1}\n"
    );
    assert_eq!(remote_code(&session, d).await, report.code);

    // Once the ignored file is gone too, its emptied directories go.
    remote(&session, &["rm", "--", &format!("{d}/gone/sub/notes.ckpt")]).await;
    let again = sync_project(&session, local.path(), d, &delete)
        .await
        .expect("sync with delete again");
    assert_eq!((again.sent, again.deleted), (0, 0));
    let mut want = want;
    for gone in ["d gone", "d gone/sub", "f gone/sub/notes.ckpt"] {
        want.remove(gone);
    }
    assert_eq!(remote_tree_as(&session, d, false).await, want);

    drop(session);
    sessions.close().await;
}

#[tokio::test]
async fn delete_by_rsync_removes_only_what_was_removed_locally() {
    delete_cycle(SyncMethod::Rsync, "delete-rsync").await;
}

#[tokio::test]
async fn delete_by_tar_removes_only_what_was_removed_locally() {
    delete_cycle(SyncMethod::Tar, "delete-tar").await;
}

#[tokio::test]
async fn delete_refuses_the_home_and_paths_outside_a_project() {
    let (sessions, session) = connect(&hosts().docker[0]).await;
    let who = session.who();
    // A name no other test uses: other tests make directories of their own in this home
    // meanwhile, so only this project's own file is looked for there.
    let marker = format!("refused-{}-marker.py", std::process::id());
    let local = write_project(&[(marker.as_str(), "", 0o644)]);
    let delete = SyncOptions {
        delete: true,
        ..SyncOptions::default()
    };
    for (path, reason) in [
        (".", "it is the remote home directory"),
        ("~", "it is the remote home directory"),
        ("/", "it is the root directory"),
        ("gridq/../..", "it has a `..` component"),
    ] {
        let e = sync_project(&session, local.path(), path, &delete)
            .await
            .expect_err("a path that is no project's own");
        assert_eq!(
            e.to_string(),
            format!(
                "{who}: refusing to delete files in {path:?}: {reason}; sync with delete only into a directory of the project's own, e.g. gridq/myproject"
            )
        );
    }
    let home = String::from_utf8_lossy(&remote(&session, &["ls", "-A"]).await).into_owned();
    assert!(
        !home.lines().any(|l| l == marker),
        "nothing was synced into the home: {home}"
    );

    drop(session);
    sessions.close().await;
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
