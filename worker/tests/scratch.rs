//! Tests for `gridq_worker::scratch`: the default scratch directory is new, private and
//! removed; a given one that another user could plant links in is refused before any job
//! writes there; and a link planted at a result path is removed, never followed. Run as root
//! (as the test suite is), to give directories to another user (uid 65534).
#![cfg(target_os = "linux")]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use gridq_worker::runner::{JobSpec, RunningJob};
use gridq_worker::scratch::{PRIVATE_PREFIX, Scratch, ScratchError};
use tokio::sync::mpsc;

const NOBODY: u32 = 65534;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

fn owner(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").uid()
}

/// A root-owned file the attack would overwrite, and its content.
fn precious(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("precious");
    std::fs::write(&target, "root's data\n").expect("write the target");
    target
}

/// `dir` given to another user, as if that user had made it.
fn give_away(dir: &Path) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run as root, to make directories of another user"
    );
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
}

#[test]
fn the_default_scratch_dir_is_new_private_and_removed_on_drop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Scratch::private_in(tmp.path(), None).expect("a private scratch dir");
    let b = Scratch::private_in(tmp.path(), None).expect("another private scratch dir");
    assert_ne!(a.path(), b.path());
    for s in [&a, &b] {
        let name = s.path().file_name().unwrap().to_string_lossy().into_owned();
        let suffix = name.strip_prefix(PRIVATE_PREFIX).expect("the prefix");
        // Random, not the predictable pid.
        assert_eq!(suffix.len(), 10, "{name}");
        assert_ne!(suffix, std::process::id().to_string());
        assert_eq!(mode(s.path()), 0o700);
        assert_eq!(owner(s.path()), nix::unistd::geteuid().as_raw());
        assert_eq!(s.result_path("j1", 2), s.path().join("j1-2.json"));
        assert!(s.home().is_none());
    }
    let path = a.path().to_owned();
    std::fs::write(a.result_path("j1", 1), "{}").unwrap();
    drop(a);
    assert!(
        !path.exists(),
        "the private dir is removed with its content"
    );
    assert!(b.path().exists());
}

#[test]
fn a_given_scratch_dir_of_another_user_is_refused_and_its_planted_link_left_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = precious(tmp.path());
    // Another user made the directory the worker was told to use, and planted a link where a
    // job's result would go.
    let dir = tmp.path().join("scratch");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&target, dir.join("job-1.json")).unwrap();
    give_away(&dir);
    let err = Scratch::given(&dir, None).expect_err("another user's directory is refused");
    assert!(
        matches!(err, ScratchError::NotOwned { owner: NOBODY, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&dir.display().to_string()) && message.contains("uid 65534"),
        "the message names the directory and its owner: {message}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's data\n");
    assert_eq!(owner(&dir), NOBODY, "left as it was");
}

#[test]
fn a_given_scratch_dir_others_may_write_to_or_a_link_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for m in [0o777, 0o770, 0o1777, 0o702] {
        let dir = tmp.path().join(format!("open-{m:o}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
        let err = Scratch::given(&dir, None).expect_err("an open directory is refused");
        assert!(
            matches!(err, ScratchError::Writable { .. }),
            "{m:o}: {err:?}"
        );
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        assert_eq!(mode(&dir), m, "left as it was");
    }
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = Scratch::given(&link, None).expect_err("a link is refused");
    assert!(matches!(err, ScratchError::Symlink { .. }), "{err:?}");
}

#[test]
fn a_given_scratch_dir_is_created_private_or_tightened_and_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("a/b/scratch");
    let s = Scratch::given(&missing, None).expect("created");
    assert_eq!(mode(&missing), 0o700);
    drop(s);
    assert!(missing.exists(), "a given directory is kept");

    let readable = tmp.path().join("readable");
    std::fs::create_dir(&readable).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Scratch::given(&readable, None).expect("ours, written by nobody else");
    assert_eq!(mode(&readable), 0o700);
    assert_eq!(s.result_path("j", 1), readable.join("j-1.json"));
}

#[test]
fn with_a_job_user_the_root_stays_the_workers_and_results_and_home_are_the_job_users() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Scratch::private_in(tmp.path(), Some((NOBODY, NOBODY))).expect("scratch");
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!((owner(s.path()), mode(s.path())), (me, 0o711));
    let results = s.result_path("j", 1).parent().unwrap().to_owned();
    assert_eq!(results, s.path().join("results"));
    let home = s.home().expect("a home").to_owned();
    for dir in [&results, &home] {
        assert_eq!(
            (owner(dir), mode(dir)),
            (NOBODY, 0o700),
            "{}",
            dir.display()
        );
    }
    // A worker restarted on the same given directory takes it again.
    let given = tmp.path().join("given");
    drop(Scratch::given(&given, Some((NOBODY, NOBODY))).expect("first"));
    let again = Scratch::given(&given, Some((NOBODY, NOBODY))).expect("again");
    assert_eq!((owner(&given), mode(&given)), (me, 0o711));
    assert_eq!(owner(&again.path().join("results")), NOBODY);
}

/// The runner's part: whatever sits at the result path before the job starts (a link the job
/// user planted in `results/`, say) is unlinked, never followed, so the job writes a file of
/// its own and the link's target keeps its content.
#[tokio::test]
async fn a_link_planted_at_the_result_path_is_removed_not_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = precious(tmp.path());
    let scratch = Scratch::private_in(tmp.path(), None).expect("scratch");
    let result = scratch.result_path("j", 1);
    std::os::unix::fs::symlink(&target, &result).unwrap();
    let spec = JobSpec {
        argv: ["sh", "-c", "printf '{\"x\": 1}' > \"$GRIDQ_RESULT\""]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        inherit: gridq_worker::job_env::inherited(&Default::default()),
        env: Vec::new(),
        workdir: tmp.path().to_owned(),
        timeout: Some(Duration::from_secs(60)),
        grace: Duration::from_millis(500),
        result_path: result.clone(),
        user: None,
        output: None,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let job = RunningJob::spawn(spec, tx).expect("spawn");
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let outcome = tokio::time::timeout(Duration::from_secs(60), job.wait())
        .await
        .expect("the job ends");
    drain.await.unwrap();
    assert_eq!(
        outcome.result.map(serde_json::Value::Object),
        Some(serde_json::json!({"x": 1}))
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's data\n");
    assert!(
        !std::fs::symlink_metadata(&result)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
