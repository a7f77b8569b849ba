//! `gridq probe` and `gridq exec --each-host` against the real SSH test hosts
//! (`scripts/test-hosts.sh`): what each host reports, argv arriving literally, per-host exit
//! statuses, parallelism and its bound, and every login failure with its exact message.

mod hosts;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use hosts::{TestHost, hosts, local_docker, output_within};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs the `gridq` binary with `args`; panics after `LIMIT`.
fn gridq<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gridq"));
    cmd.args(args).env_remove("GRIDQ_HOSTS");
    output_within(cmd, b"", LIMIT)
}

/// `-a HOSTS -i KEY --known-hosts FILE --ssh-config none` for `list`.
fn ssh_args(list: &[&TestHost]) -> Vec<String> {
    let first = list.first().expect("a host");
    ssh_args_with(list, &first.key, &first.known_hosts)
}

/// [`ssh_args`] with another key or known_hosts file.
fn ssh_args_with(list: &[&TestHost], key: &Path, known_hosts: &Path) -> Vec<String> {
    vec![
        "-a".into(),
        list.iter()
            .map(|h| h.target())
            .collect::<Vec<_>>()
            .join(","),
        "-i".into(),
        key.display().to_string(),
        "--known-hosts".into(),
        known_hosts.display().to_string(),
        "--ssh-config".into(),
        "none".into(),
    ]
}

fn docker_hosts() -> Vec<&'static TestHost> {
    hosts().docker.iter().collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `[N user@addr]`: the prefix exec puts before a host's lines.
fn label(index: usize, h: &TestHost) -> String {
    format!("[{index} {}@{}]", h.user, h.addr)
}

fn local_stdout(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = output_within(cmd, b"", LIMIT);
    assert!(out.status.success(), "{program} {args:?}: {}", show(&out));
    text(&out.stdout).trim().to_owned()
}

/// The lines of `stdout` that carry `prefix`, without it.
fn lines_of<'a>(stdout: &'a str, prefix: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .collect()
}

/// An unreachable host: nothing listens on 127.0.0.9:2222.
fn unreachable() -> TestHost {
    let mut h = hosts().docker[0].clone();
    h.addr = "127.0.0.9".into();
    h
}

#[test]
fn probe_reports_every_docker_host() {
    let list = docker_hosts();
    let nproc: u64 = local_stdout("nproc", &[]).parse().expect("nproc");
    let docker_version = local_docker(["version", "--format", "{{.Server.Version}}"]);
    let runtimes = local_docker(["info", "--format", "{{json .Runtimes}}"]);
    let hostname = local_stdout("uname", &["-n"]);

    let out = gridq(
        ["probe"]
            .into_iter()
            .map(String::from)
            .chain(ssh_args(&list)),
    );
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    let rows: Vec<&str> = stdout.lines().collect();
    assert_eq!(rows.len(), 4, "a header and three rows: {}", show(&out));
    assert!(rows[0].starts_with("HOST "), "{stdout}");
    for (i, h) in list.iter().enumerate() {
        let row = rows[i + 1];
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], (i + 1).to_string(), "{row}");
        assert_eq!(cells[1], h.target(), "{row}");
        assert_eq!(cells[2], nproc.to_string(), "{row}");
        assert!(
            cells.contains(&docker_version.as_str()),
            "{row} lacks {docker_version}"
        );
    }

    let mut args = vec!["probe".to_owned(), "--json".to_owned()];
    args.extend(ssh_args(&list));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("probe --json is JSON");
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&doc), ["hosts"]);
    let reports = doc["hosts"].as_array().expect("hosts");
    assert_eq!(reports.len(), 3);
    for (i, (r, h)) in reports.iter().zip(&list).enumerate() {
        assert_eq!(
            keys(r),
            [
                "cpus",
                "disk_free_bytes",
                "docker",
                "error",
                "error_kind",
                "gpu_error",
                "gpus",
                "host",
                "hostname",
                "index",
                "memory_available_bytes",
                "memory_total_bytes",
                "nvidia_runtime",
                "ok",
                "remote_path"
            ],
            "{r}"
        );
        assert_eq!(r["index"], i + 1);
        assert_eq!(r["host"], h.target());
        assert_eq!(r["ok"], true);
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["error_kind"], Value::Null);
        assert_eq!(r["hostname"], hostname.as_str());
        assert_eq!(r["cpus"], nproc);
        let total = r["memory_total_bytes"].as_u64().expect("memory total");
        let available = r["memory_available_bytes"]
            .as_u64()
            .expect("memory available");
        assert!(total > 0 && available > 0 && available <= total, "{r}");
        assert!(r["disk_free_bytes"].as_u64().expect("disk free") > 0, "{r}");
        assert_eq!(r["remote_path"], ".");
        assert_eq!(
            r["docker"],
            serde_json::json!({"status": "ok", "version": docker_version, "detail": null})
        );
        assert_eq!(r["nvidia_runtime"], runtimes.contains("nvidia"));
        assert_eq!(r["gpu_error"], Value::Null);
    }
}

#[test]
fn probe_says_no_access_for_the_host_outside_the_docker_group() {
    let all = hosts();
    let mut list = docker_hosts();
    list.push(&all.nodocker);
    let mut args = vec!["probe".to_owned(), "--json".to_owned()];
    args.extend(ssh_args(&list));
    let out = gridq(&args);
    // Every host answered: Docker access is a finding, not a failure of the probe.
    assert!(out.status.success(), "{}", show(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let reports = doc["hosts"].as_array().expect("hosts");
    assert_eq!(reports.len(), 4);
    for r in &reports[..3] {
        assert_eq!(r["docker"]["status"], "ok", "{r}");
    }
    let nodocker = &reports[3];
    assert_eq!(nodocker["host"], all.nodocker.target());
    assert_eq!(nodocker["ok"], true);
    assert_eq!(nodocker["docker"]["status"], "no_access", "{nodocker}");
    assert_eq!(nodocker["docker"]["version"], Value::Null);
    assert!(
        nodocker["docker"]["detail"]
            .as_str()
            .expect("detail")
            .contains("permission denied"),
        "{nodocker}"
    );
    assert_eq!(nodocker["nvidia_runtime"], Value::Null);

    let out = gridq(
        ["probe"]
            .into_iter()
            .map(String::from)
            .chain(ssh_args(&list)),
    );
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&format!("4 {} ", all.nodocker.target())))
        .unwrap_or_else(|| panic!("no row for nodocker: {stdout}"));
    assert!(row.contains("no access"), "{row}");
}

#[test]
fn probe_passes_the_remote_path_as_an_argument() {
    let h = &hosts().docker[0];
    let dir = tempfile::tempdir().expect("tempdir");
    // Writable by the remote user, so an injected `touch` would succeed.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    let witness = dir.path().join("pwned");
    let path = format!(
        "x; touch {} #$(touch {})",
        witness.display(),
        witness.display()
    );
    let mut args = vec![
        "probe".to_owned(),
        "--json".to_owned(),
        "-r".to_owned(),
        path.clone(),
    ];
    args.extend(ssh_args(&[h]));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["hosts"][0]["remote_path"], path.as_str());
    assert!(
        doc["hosts"][0]["disk_free_bytes"]
            .as_u64()
            .expect("disk free")
            > 0
    );
    assert!(!witness.exists(), "the remote path was run by a shell");
}

#[test]
fn exec_passes_hostile_argv_literally_to_every_host() {
    let list = docker_hosts();
    let values = ["a b", "$HOME", "; rm -rf /", "it's"];
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend(["--", "printf", "%s\\n"].map(String::from));
    args.extend(values.map(String::from));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 12, "{stdout}");
    for (i, h) in list.iter().enumerate() {
        assert_eq!(
            lines_of(&stdout, &label(i + 1, h)),
            values,
            "{}",
            show(&out)
        );
    }
    let stderr = text(&out.stderr);
    let expected: String = list
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{} exit 0\n", label(i + 1, h)))
        .chain(["exec: succeeded on all 3 hosts\n".to_owned()])
        .collect();
    assert_eq!(stderr, expected);
}

#[test]
fn exec_runs_as_each_hosts_user() {
    let list = docker_hosts();
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend(["--", "id", "-un"].map(String::from));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    for (i, h) in list.iter().enumerate() {
        assert_eq!(lines_of(&stdout, &label(i + 1, h)), [h.user.as_str()]);
    }
}

#[test]
fn exec_reports_the_host_where_the_command_failed() {
    let list = docker_hosts();
    // `test ! -O DIR`: false only where DIR belongs to the user, so only on h2.
    let h2_home = format!("/home/{}", list[1].user);
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend([
        "--".to_owned(),
        "test".into(),
        "!".into(),
        "-O".into(),
        h2_home,
    ]);
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{} exit 0\n{} exit 1\n{} exit 0\nerror: exec: failed on 1 of 3 hosts\n",
            label(1, list[0]),
            label(2, list[1]),
            label(3, list[2])
        )
    );
}

#[test]
fn exec_names_a_missing_command() {
    let h = &hosts().docker[0];
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&[h]));
    args.extend(["--", "gridq-no-such-command", "x"].map(String::from));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = text(&out.stderr);
    let summary = format!(
        "{} error: host 1 {}: command not found: `gridq-no-such-command` is not installed or not on {}'s PATH there\nerror: exec: failed on 1 of 1 hosts\n",
        label(1, h),
        h.target(),
        h.user
    );
    assert!(stderr.ends_with(&summary), "{}", show(&out));
}

#[test]
fn exec_runs_on_all_hosts_at_once_and_honours_parallel() {
    let list = docker_hosts();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    let dir_arg = dir.path().display().to_string();
    // Each host checks in, then waits (10 s at most) until all three have: this only passes
    // when the three commands run at the same time.
    let barrier = r#"touch "$1/$(id -un)"; i=0
while [ "$(ls "$1" | wc -l)" -lt 3 ]; do
    i=$((i + 1)); [ "$i" -le 200 ] || { echo "alone in $1: $(ls "$1")"; exit 9; }
    sleep 0.05
done"#;
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend(["--", "sh", "-c", barrier, "barrier", &dir_arg].map(String::from));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));

    // With --parallel 1, one at a time: each takes a lock directory for a moment, and a
    // second command running meanwhile would find it taken.
    let lock = r#"mkdir "$1/lock" || { echo "lock taken"; exit 7; }; sleep 0.3; rmdir "$1/lock""#;
    let mut args = vec![
        "exec".to_owned(),
        "--each-host".to_owned(),
        "--parallel".to_owned(),
        "1".to_owned(),
    ];
    args.extend(ssh_args(&list));
    args.extend(["--", "sh", "-c", lock, "lock", &dir_arg].map(String::from));
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn exec_stops_waiting_at_the_timeout() {
    let h = &hosts().docker[0];
    let mut args = vec![
        "exec".to_owned(),
        "--each-host".to_owned(),
        "--timeout".to_owned(),
        "1s".to_owned(),
    ];
    args.extend(ssh_args(&[h]));
    args.extend(["--", "sleep", "5"].map(String::from));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{} error: host 1 {}: `sleep` did not finish within 1s\nerror: exec: failed on 1 of 1 hosts\n",
            label(1, h),
            h.target()
        )
    );
}

#[test]
fn an_unreachable_host_is_named_and_the_others_still_run() {
    let good = &hosts().docker[1];
    let bad = unreachable();
    let list = [good, &bad];
    let message = format!(
        "host 2 {}: unreachable (connect to host 127.0.0.9 port {}: Connection refused); check the address and port, and that sshd is running there",
        bad.target(),
        bad.port
    );

    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend(["--", "id", "-un"].map(String::from));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stdout),
        format!("{} {}\n", label(1, good), good.user)
    );
    assert_eq!(
        text(&out.stderr),
        format!(
            "{} exit 0\n{} error: {message}\nerror: exec: failed on 1 of 2 hosts\n",
            label(1, good),
            label(2, &bad)
        )
    );

    let out = gridq(
        ["probe"]
            .into_iter()
            .map(String::from)
            .chain(ssh_args(&list)),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        format!("error: {message}\nerror: 1 of 2 hosts did not answer the probe\n")
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "2 {}  error: unreachable (see below)\n",
            bad.target()
        )),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("1 {} ", good.target()))),
        "{stdout}"
    );

    let mut args = vec!["probe".to_owned(), "--json".to_owned()];
    args.extend(ssh_args(&list));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["hosts"][0]["ok"], true);
    assert_eq!(doc["hosts"][1]["ok"], false);
    assert_eq!(doc["hosts"][1]["error"], message.as_str());
    assert_eq!(doc["hosts"][1]["error_kind"], "unreachable");
}

#[test]
fn a_key_the_host_does_not_accept_is_named() {
    let h = &hosts().docker[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("id_other");
    local_stdout(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().expect("utf-8"),
        ],
    );
    let mut args = vec!["probe".to_owned()];
    args.extend(ssh_args_with(&[h], &key, &h.known_hosts));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: host 1 {t}: authentication failed ({u}@{a}: Permission denied (publickey).); the key {k} is not accepted for {u}: add its public key to that user's ~/.ssh/authorized_keys, or give the right key with -i\nerror: 1 of 1 hosts did not answer the probe\n",
            t = h.target(),
            u = h.user,
            a = h.addr,
            k = key.display()
        )
    );
}

#[test]
fn a_changed_host_key_is_refused_and_named() {
    let all = hosts();
    let (h1, h2) = (&all.docker[0], &all.docker[1]);
    let known = std::fs::read_to_string(&h1.known_hosts).expect("known_hosts");
    let key_of = |h: &TestHost| {
        let pattern = format!("[{}]:{} ", h.addr, h.port);
        known
            .lines()
            .find_map(|l| l.strip_prefix(&pattern))
            .unwrap_or_else(|| panic!("no {pattern} in known_hosts"))
            .to_owned()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let forged = dir.path().join("known_hosts");
    std::fs::write(
        &forged,
        format!("[{}]:{} {}\n", h1.addr, h1.port, key_of(h2)),
    )
    .expect("write known_hosts");
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args_with(&[h1], &h1.key, &forged));
    args.extend(["--".to_owned(), "true".to_owned()]);
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let f = forged.display();
    let known_as = format!("[{}]:{}", h1.addr, h1.port);
    assert_eq!(
        text(&out.stderr),
        format!(
            "{} error: host 1 {}: host key mismatch: the server's key differs from the one recorded for {known_as} in {f}; this may be an attack, or the host was reinstalled: check its fingerprint, then remove the old key with `ssh-keygen -f {f} -R '{known_as}'`\nerror: exec: failed on 1 of 1 hosts\n",
            label(1, h1),
            h1.target()
        )
    );
    // --accept-new-host-keys accepts unknown hosts only, never a changed key.
    args.insert(2, "--accept-new-host-keys".to_owned());
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("host key mismatch"),
        "{}",
        show(&out)
    );
}

#[test]
fn an_unknown_host_key_is_refused_unless_accepted() {
    let h = &hosts().docker[2];
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").expect("write");
    let mut args = vec!["probe".to_owned()];
    args.extend(ssh_args_with(&[h], &h.key, &empty));
    let out = gridq(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: host 1 {}: unknown host key: [{a}]:{p} is not in {f}; check the host's fingerprint and add it to that file (`ssh-keyscan -p {p} {a}`), or pass --accept-new-host-keys\nerror: 1 of 1 hosts did not answer the probe\n",
            h.target(),
            a = h.addr,
            p = h.port,
            f = empty.display()
        )
    );
    args.push("--accept-new-host-keys".to_owned());
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
    // The key was recorded: a strict probe now passes.
    args.pop();
    let out = gridq(&args);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn malformed_host_lists_are_usage_errors_naming_the_entry() {
    for command in [&["probe"][..], &["exec", "--each-host"]] {
        let mut args: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["-a".to_owned(), "gridq-h1@127.0.0.2:2222,a@@b".to_owned()]);
        if command[0] == "exec" {
            args.extend(["--".to_owned(), "true".to_owned()]);
        }
        let out = gridq(&args);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert_eq!(text(&out.stdout), "");
        assert_eq!(
            text(&out.stderr),
            "error: --hosts: entry 2 `a@@b`: more than one `@`\n"
        );
    }
    let out = gridq(["probe", "-a", "h1:99999"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert_eq!(
        text(&out.stderr),
        "error: --hosts: entry 1 `h1:99999`: bad port `99999` (expected 1-65535)\n"
    );
}

/// Polls `cond` until it holds; panics with what it last saw after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match cond() {
            Ok(()) => return,
            Err(seen) if std::time::Instant::now() >= deadline => {
                panic!("{what}: not within {limit:?}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Command lines of this machine's processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if line.contains(needle) {
                found.push(line);
            }
        }
    }
    found
}

#[test]
fn ctrl_c_stops_exec_and_leaves_no_ssh_behind() {
    use std::io::BufRead;
    let list = docker_hosts();
    let tmp = tempfile::tempdir().expect("tempdir");
    // The remote users must see the gate: the remote commands run until it goes, so none
    // outlives the test.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let gate = tmp.path().join("gate");
    std::fs::write(&gate, "").expect("gate");
    let control = tmp.path().join("control");
    std::fs::create_dir(&control).expect("control dir");
    let hold = r#"echo started; while [ -e "$1" ]; do sleep 0.1; done"#;
    let mut args = vec!["exec".to_owned(), "--each-host".to_owned()];
    args.extend(ssh_args(&list));
    args.extend(["--", "sh", "-c", hold, "hold"].map(String::from));
    args.push(gate.display().to_string());
    let mut child = Command::new(env!("CARGO_BIN_EXE_gridq"))
        .args(&args)
        .env("TMPDIR", &control)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gridq");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut started = Vec::new();
    while started.len() < list.len() {
        match rx.recv_timeout(LIMIT) {
            Ok(line) => started.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("only {started:?} started: {e}");
            }
        }
    }
    let needle = control.display().to_string();
    assert_eq!(
        processes_mentioning(&needle).len(),
        list.len(),
        "one ssh master per host: {:?}",
        processes_mentioning(&needle)
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "exec ended while the gate was open"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(LIMIT)
        .expect("gridq exits after Ctrl-C")
        .expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("exec: interrupted"),
        "{}",
        show(&out)
    );
    wait_until(
        "no ssh master left",
        Duration::from_secs(10),
        || match processes_mentioning(&needle).as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        },
    );
    let leftovers: Vec<_> = std::fs::read_dir(&control)
        .expect("control dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left in TMPDIR: {leftovers:?}");
    std::fs::remove_file(&gate).expect("open the gate");
}
