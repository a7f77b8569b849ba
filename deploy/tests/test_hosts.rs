//! The SSH test hosts that `gridq deploy`'s end-to-end tests run against: each is a distinct
//! host for its own user, reaches this machine's Docker engine over SSH the way deploy will
//! (`docker system dial-stdio`), takes only its key, and checks host keys; the nodocker host is
//! refused by the engine.

mod hosts;

use std::collections::BTreeSet;
use std::time::Duration;

use hosts::{TestHost, hosts, local_docker};

const LIMIT: Duration = Duration::from_secs(60);

fn stdout(h: &TestHost, argv: &[&str]) -> String {
    let out = h.run(argv, b"", LIMIT);
    assert!(
        out.status.success(),
        "{argv:?} on {} failed ({}): {}",
        h.target(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

#[test]
fn three_distinct_hosts_each_log_in_as_their_own_user() {
    let all = hosts();
    assert_eq!(all.docker.len(), 3, "{:?}", all.docker);
    let addrs: BTreeSet<&str> = all
        .docker
        .iter()
        .chain([&all.nodocker])
        .map(|h| h.addr.as_str())
        .collect();
    assert_eq!(addrs.len(), 4, "every host has its own address: {addrs:?}");
    for h in all.docker.iter().chain([&all.nodocker]) {
        assert_eq!(stdout(h, &["id", "-un"]), h.user, "on {}", h.target());
        let home = stdout(h, &["sh", "-c", "echo \"$HOME\""]);
        assert_eq!(home, format!("/home/{}", h.user), "on {}", h.target());
    }
}

#[test]
fn argv_reaches_the_remote_program_unchanged() {
    let h = &hosts().docker[0];
    let args = [
        "two words",
        "$(id -u)",
        "it's",
        "; rm -rf /tmp/nothing",
        "",
        "line\nbreak",
        "*",
        "ünïcode",
    ];
    let mut argv = vec!["printf", "[%s]\\n"];
    argv.extend(args);
    let expected: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    let out = h.run(&argv, b"", LIMIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn docker_hosts_reach_this_machines_engine() {
    let local = local_docker(["version", "--format", "{{.Server.Version}}"]);
    assert!(!local.is_empty());
    for h in &hosts().docker {
        let remote = stdout(h, &["docker", "version", "--format", "{{.Server.Version}}"]);
        assert_eq!(remote, local, "engine version seen from {}", h.target());
    }
}

#[test]
fn the_nodocker_host_is_refused_by_the_engine() {
    let h = &hosts().nodocker;
    let out = h.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        b"",
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{} can use Docker: {out:?} (is /var/run/docker.sock world-accessible?)",
        h.target()
    );
    assert!(
        stderr.to_lowercase().contains("permission denied"),
        "stderr: {stderr}"
    );
}

/// What bollard sends over `docker system dial-stdio`: HTTP to the engine's API.
const PING: &[u8] = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n";

#[test]
fn dial_stdio_carries_the_engine_api_over_ssh() {
    for h in &hosts().docker {
        let out = h.run(["docker", "system", "dial-stdio"], PING, LIMIT);
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.ends_with("\r\n\r\nOK"),
            "{}: {reply:?}; stderr {}",
            h.target(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            reply.contains("\r\nApi-Version: "),
            "{}: {reply:?}",
            h.target()
        );
    }
    let h = &hosts().nodocker;
    let out = h.run(["docker", "system", "dial-stdio"], PING, LIMIT);
    assert!(
        !out.stdout.starts_with(b"HTTP/1.1 200"),
        "{} reached the engine",
        h.target()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
}

#[test]
fn hosts_take_only_their_own_user_and_only_keys() {
    let all = hosts();
    let (h1, h2) = (&all.docker[0], &all.docker[1]);
    // The client key is authorized for every test user; AllowUsers keeps h2's user off h1.
    let mut wrong_user = h1.clone();
    wrong_user.user = h2.user.clone();
    let out = wrong_user.run(["true"], b"", LIMIT);
    assert!(!out.status.success(), "{} let {} in", h1.addr, h2.user);
    // No password or keyboard-interactive logins are offered.
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(h1.ssh_options())
        .args(["-o", "PubkeyAuthentication=no", "--", &h1.addr, "true"]);
    let out = hosts::output_within(cmd, b"", LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Permission denied (publickey)"),
        "stderr: {stderr}"
    );
}

#[test]
fn host_keys_are_checked_and_differ_per_host() {
    let all = hosts();
    let (h1, h2) = (&all.docker[0], &all.docker[1]);
    let text = std::fs::read_to_string(&h1.known_hosts).expect("known_hosts");
    let key_of = |h: &TestHost| {
        let pattern = format!("[{}]:{} ", h.addr, h.port);
        text.lines()
            .find_map(|l| l.strip_prefix(&pattern))
            .unwrap_or_else(|| panic!("no {pattern} in known_hosts"))
            .to_owned()
    };
    assert_ne!(key_of(h1), key_of(h2), "h1 and h2 share a host key");
    // A known_hosts that gives h1's address h2's key: ssh must refuse to connect.
    let dir = tempfile::tempdir().expect("tempdir");
    let forged = dir.path().join("known_hosts");
    std::fs::write(
        &forged,
        format!("[{}]:{} {}\n", h1.addr, h1.port, key_of(h2)),
    )
    .expect("write known_hosts");
    let mut impostor = h1.clone();
    impostor.known_hosts = forged;
    let out = impostor.run(["true"], b"", LIMIT);
    assert!(!out.status.success(), "ssh accepted a wrong host key");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{out:?}"
    );
}

#[test]
fn the_ssh_config_names_every_host() {
    let all = hosts();
    for h in all.docker.iter().chain([&all.nodocker]) {
        let mut cmd = std::process::Command::new("ssh");
        cmd.arg("-F")
            .arg(&all.ssh_config)
            .args([&h.name, "id", "-un"]);
        let out = hosts::output_within(cmd, b"", LIMIT);
        assert!(out.status.success(), "ssh -F ... {}: {out:?}", h.name);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), h.user);
    }
}
