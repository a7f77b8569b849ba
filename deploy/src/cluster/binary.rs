//! gridq on the hosts: one static binary, placed once per content, mounted read-only into
//! containers of images that are not gridq's.
//!
//! Workers run in the project's own image (its CUDA and Python packages), unchanged, and the
//! master in a tiny runtime image; neither image holds gridq. Instead:
//!
//! - [`Binary::locate`] picks the binary to deploy: `--gridq-binary` (`gridq_binary:` in the
//!   cluster file), else the running `gridq` itself. It must be statically linked (no program
//!   interpreter in its ELF headers): a dynamically linked one would need the image's libc to
//!   match the build machine's, which is exactly what cannot be assumed of a team's image.
//!   `scripts/release.sh` builds a static one.
//! - [`place_binary`] puts it at `REMOTE_PATH/.gridq/bin/gridq-HASH` on each host, HASH being
//!   the first 16 hex digits of its BLAKE3 hash, unless a file of that name is already there:
//!   a redeploy sends nothing, an upgrade sends the new binary once, and the project's image
//!   is never sent again for a gridq upgrade. The upload streams over the SSH session into a
//!   temporary name, then `chmod` and `mv` (one fixed `sh -c` script, the paths as its
//!   arguments), so a broken transfer never leaves a half file under the final name.
//!   `.gridq/` is never synced nor deleted by a sync.
//! - [`runtime_image`] makes the master's image on each master host: an empty base with
//!   `/etc/passwd` and `/etc/group` (the `gridq` user, uid 10001), this machine's CA bundle,
//!   `/tmp` and the state directory. It is imported from a tarball made here (a few hundred
//!   kilobytes; `docker import`, no registry, no root on this machine) and tagged by its
//!   content, so it too is made once per host.
//!
//! Every container gets the binary at [`MOUNTED`] and starts as `gridq init -- gridq ...`:
//! the binary is its own init (see `cli/init.rs`), reaping orphans and passing signals on.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt as _;

use super::PlaceConn;
use crate::docker::DockerHost;

/// Where the binary is mounted in every container.
pub const MOUNTED: &str = "/gridq/gridq";

/// The uid (and gid) of the master's user in the runtime image.
pub const RUNTIME_UID: u64 = 10001;

/// The master's state directory in the runtime image (a volume is mounted there).
pub const RUNTIME_STATE: &str = "/var/lib/gridq";

/// How long one upload may take.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(900);

/// The entrypoint of every gridq container: the binary as init, running itself.
pub fn entrypoint() -> Vec<String> {
    vec![
        MOUNTED.to_owned(),
        "init".to_owned(),
        "--".to_owned(),
        MOUNTED.to_owned(),
    ]
}

/// The static gridq binary that deploy places on the hosts.
#[derive(Debug, Clone)]
pub struct Binary {
    /// Where it is on this machine.
    pub path: PathBuf,
    /// First 16 hex digits of its BLAKE3 hash.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
}

impl Binary {
    /// The binary to deploy: `configured`, or the running executable.
    ///
    /// # Errors
    /// It cannot be read, or it is not statically linked (the message says how to get one).
    pub fn locate(configured: Option<&Path>) -> anyhow::Result<Self> {
        let (path, how) = match configured {
            Some(p) => (p.to_path_buf(), "--gridq-binary"),
            None => (
                std::env::current_exe().context("finding the running gridq")?,
                "the running gridq",
            ),
        };
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("{how}: {}", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut head = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("{how}: reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            if head.len() < 64 * 1024 {
                head.extend_from_slice(&buf[..n.min(64 * 1024 - head.len())]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        match elf_kind(&head) {
            Some(Linkage::Static) => {}
            Some(Linkage::Dynamic) => anyhow::bail!(
                "{how} ({}) is dynamically linked, so it would need the worker image's libc to match this machine's; deploy a static one: build it with scripts/release.sh (its last line is the path) and pass --gridq-binary PATH, or run deploy with the release tarball's gridq",
                path.display()
            ),
            None => anyhow::bail!(
                "{how} ({}) is not an x86_64 Linux executable",
                path.display()
            ),
        }
        Ok(Self {
            path,
            hash: hasher.finalize().to_hex()[..16].to_owned(),
            size,
        })
    }

    /// The file name on the hosts.
    pub fn file_name(&self) -> String {
        format!("gridq-{}", self.hash)
    }
}

/// How an ELF executable is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linkage {
    Static,
    Dynamic,
}

/// Reads the program headers of a 64-bit little-endian x86_64 ELF file (from its first
/// bytes): dynamic when one of them is a program interpreter (`PT_INTERP`).
fn elf_kind(head: &[u8]) -> Option<Linkage> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    // Magic, 64-bit, little endian, x86_64.
    if head.get(..4)? != b"\x7fELF" || head[4] != 2 || head[5] != 1 || u16_at(18)? != 62 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return Some(Linkage::Dynamic);
        }
    }
    Some(Linkage::Static)
}

/// Puts `binary` at `dir/gridq-HASH` of a place (`dir` absolute there) unless it is there;
/// returns its path there and the bytes sent (0 when it was there).
///
/// # Errors
/// The check, the upload or the local copy failed (the message names the place).
pub async fn place_binary(
    conn: &PlaceConn,
    dir: &str,
    binary: &Binary,
) -> anyhow::Result<(String, u64)> {
    let target = format!("{dir}/{}", binary.file_name());
    let Some(session) = &conn.session else {
        // This machine: a copy under the project, for the same layout everywhere.
        let path = PathBuf::from(&target);
        if path.is_file() {
            return Ok((target, 0));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        let tmp = PathBuf::from(format!("{target}.tmp.{}", std::process::id()));
        std::fs::copy(&binary.path, &tmp)
            .with_context(|| format!("copying {} to {dir}", binary.path.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
        return Ok((target, binary.size));
    };
    let there = session
        .run(&["test", "-x", &target], Some(Duration::from_secs(60)))
        .await?;
    if there.success() {
        return Ok((target, 0));
    }
    let bytes = tokio::fs::read(&binary.path)
        .await
        .with_context(|| format!("reading {}", binary.path.display()))?;
    // A fixed script; the directory and the name are its arguments, never pasted into it.
    const UPLOAD: &str = "set -e; mkdir -p -- \"$1\"; t=\"$1/.$2.tmp.$$\"; \
                          trap 'rm -f -- \"$t\"' EXIT; cat >\"$t\"; chmod 0755 \"$t\"; \
                          mv -f -- \"$t\" \"$1/$2\"; trap - EXIT";
    let name = binary.file_name();
    let out = session
        .run_with_input(
            &["sh", "-c", UPLOAD, "gridq-upload", dir, &name],
            &bytes,
            Some(UPLOAD_DEADLINE),
        )
        .await?;
    if !out.success() {
        anyhow::bail!(
            "putting gridq at {target} failed (exit {}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((target, bytes.len() as u64))
}

/// The runtime image's tarball: deterministic (fixed times and owners), so its hash names it.
fn runtime_tar() -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, uid: u64, contents: Option<&[u8]>| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(0);
        match contents {
            Some(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.len() as u64);
                tar.append_data(&mut h, path, c)
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty())
            }
        }
    };
    for dir in [
        "etc",
        "etc/ssl",
        "etc/ssl/certs",
        "run",
        "gridq",
        "var",
        "var/lib",
    ] {
        add(dir, 0o755, 0, None)?;
    }
    add("tmp", 0o1777, 0, None)?;
    add("var/lib/gridq", 0o700, RUNTIME_UID, None)?;
    add(
        "etc/passwd",
        0o644,
        0,
        Some(
            format!(
                "root:x:0:0:root:/root:/sbin/nologin\n\
                 gridq:x:{RUNTIME_UID}:{RUNTIME_UID}:gridq:{RUNTIME_STATE}:/sbin/nologin\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
            )
            .as_bytes(),
        ),
    )?;
    add(
        "etc/group",
        0o644,
        0,
        Some(format!("root:x:0:\ngridq:x:{RUNTIME_UID}:\nnogroup:x:65534:\n").as_bytes()),
    )?;
    // The CA bundle of this machine, when it has one (the master itself needs none: the
    // broker's CA comes with its credentials, and public roots are built into gridq).
    if let Ok(bundle) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
        add("etc/ssl/certs/ca-certificates.crt", 0o644, 0, Some(&bundle))?;
    }
    tar.into_inner()
}

/// The master's runtime image on a place's engine, made there if missing.
#[derive(Debug, Clone)]
pub struct RuntimeImage {
    /// `gridq-runtime:HASH`.
    pub reference: String,
    /// Its ID there.
    pub id: String,
    /// Bytes sent to make it (0 when it was there).
    pub sent: u64,
}

/// Makes sure a place's engine has the master's runtime image.
///
/// # Errors
/// The import failed.
pub async fn runtime_image(docker: &DockerHost) -> anyhow::Result<RuntimeImage> {
    let tar = runtime_tar().context("making the runtime image")?;
    let tag = blake3::hash(&tar).to_hex()[..12].to_owned();
    let reference = format!("gridq-runtime:{tag}");
    if let Some(id) = docker.image_id(&reference).await? {
        return Ok(RuntimeImage {
            reference,
            id,
            sent: 0,
        });
    }
    let size = tar.len() as u64;
    let options = CreateImageOptions {
        from_src: Some("-".to_owned()),
        repo: Some("gridq-runtime".to_owned()),
        tag: Some(tag),
        changes: vec![
            "LABEL gridq.image=1".to_owned(),
            format!("USER {RUNTIME_UID}:{RUNTIME_UID}"),
            "ENV PATH=/gridq:/usr/local/bin:/usr/bin:/bin".to_owned(),
        ],
        ..Default::default()
    };
    let mut stream =
        docker
            .docker()
            .create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        item.with_context(|| format!("{}: importing {reference}", docker.label()))?;
    }
    let id = docker
        .image_id(&reference)
        .await?
        .with_context(|| format!("{}: {reference} missing after its import", docker.label()))?;
    Ok(RuntimeImage {
        reference,
        id,
        sent: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_binary_is_seen_as_dynamic_and_a_static_header_as_static() {
        let exe = std::env::current_exe().unwrap();
        let head = std::fs::read(&exe).unwrap();
        // Test binaries are linked like the host's programs: dynamically.
        assert_eq!(
            elf_kind(&head[..65536.min(head.len())]),
            Some(Linkage::Dynamic)
        );
        let err = Binary::locate(Some(&exe)).unwrap_err().to_string();
        assert!(err.contains("is dynamically linked"), "{err}");
        assert!(err.contains("scripts/release.sh"), "{err}");
        // The same headers with the interpreter entry turned into a no-op (PT_NULL): static.
        let mut patched = head[..65536.min(head.len())].to_vec();
        let phoff = u64::from_le_bytes(patched[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes(patched[54..56].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes(patched[56..58].try_into().unwrap()) as usize;
        for i in 0..phnum {
            let o = phoff + i * phentsize;
            if u32::from_le_bytes(patched[o..o + 4].try_into().unwrap()) == 3 {
                patched[o..o + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert_eq!(elf_kind(&patched), Some(Linkage::Static));
        assert_eq!(elf_kind(b"#!/bin/sh\necho hi\n"), None);
    }

    #[test]
    fn the_runtime_tarball_is_the_same_every_time() {
        let a = runtime_tar().unwrap();
        let b = runtime_tar().unwrap();
        assert_eq!(a, b);
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        for needed in [
            "etc/passwd",
            "etc/group",
            "tmp",
            "var/lib/gridq",
            "gridq",
            "run",
        ] {
            assert!(
                names.iter().any(|n| n.trim_end_matches('/') == needed),
                "{needed} missing from {names:?}"
            );
        }
    }
}
