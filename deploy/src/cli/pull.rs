//! `gridq pull SWEEP [JOB...]`: brings the jobs' output directories (`GRIDQ_OUTPUT`, on each
//! job's host under the project: `.gridq/out/SWEEP/JOB_ID/`) to this machine, as
//! `DEST/SWEEP/JOB_ID/...` with `DEST/SWEEP/results.csv` beside them.
//!
//! # Where the outputs are
//! - **A deployed cluster** (its cluster file, as the other cluster commands find it): the
//!   master's API says, per job, which attempt holds the outputs (the one that succeeded, else
//!   the latest that ran), on which host, and how many files it listed. Jobs are grouped by
//!   host and each host's are fetched by one rsync over the SSH session gridq already holds
//!   (rsync's `-e` points at its control socket, as the project sync does: no second login),
//!   every host at once. rsync's quick check makes a second pull send nothing new. A host that
//!   cannot be reached, or whose rsync fails, is reported with its jobs; the others still
//!   come. Outputs of a worker on this machine (`-w local`) are copied from the project.
//! - **`gridq run --local`** (its state directory, `.gridq` by default): the store is opened
//!   read-only (no master needs to run) and the outputs are already on this machine, in the
//!   project the sweep ran in: copied with `--dest` (again only what is new or changed: size or
//!   modification time), or listed without it.
//!
//! Jobs that never ran, and jobs whose listing says they left nothing, are skipped. The exit
//! status is 0 when every job's outputs that should be there came, 1 when some are missing (a
//! host down, a directory gone), 2 for bad input.
//!
//! `--include GLOB` (repeatable) takes only the files that match one of the globs, in
//! gitignore syntax relative to the job's directory: `*.txt` at any depth, `ckpt/*.pt` from
//! the job's directory, `logs/` a whole directory. For rsync each glob becomes a filter rule
//! with the same meaning (`/*/` anchors it at the job's directory). Only regular files are
//! copied, as the job's listing names them; links are not.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use gridq_common::{JobId, SweepId};
use gridq_master::store::{JobState, Store};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use super::Failure;
use super::cluster::ClusterSel;
use super::services::runtime;
use crate::cluster::config::{CLUSTER_FILE, HostRef};
use crate::cluster::{self as lib, Fleet, MasterApi};
use crate::ssh::{HostSession, SshOptions};

/// Where outputs lie below a project directory (the worker's `gridq_worker::outputs`).
const OUTPUT_ROOT: &str = ".gridq/out";

/// Jobs asked of the master per page.
const PAGE: u64 = 5_000;

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// The sweep.
    sweep: String,
    /// Only these jobs: ids, or unique prefixes of at least 4 hex digits.
    jobs: Vec<String>,
    /// Only jobs in this state (repeatable): pending, queued, running, retrying, succeeded,
    /// failed, timed_out, canceled.
    #[arg(long, value_name = "S", value_parser = parse_state)]
    state: Vec<JobState>,
    /// Where the outputs go: DIR/SWEEP/JOB_ID/..., and DIR/SWEEP/results.csv (default: the
    /// current directory for a cluster; in local mode, without it, where they are is printed).
    #[arg(long, value_name = "DIR")]
    dest: Option<PathBuf>,
    /// Only files matching this glob (gitignore syntax, relative to the job's directory:
    /// `*.txt`, `ckpt/*.pt`, `logs/`); repeatable.
    #[arg(long = "include", value_name = "GLOB")]
    include: Vec<String>,
    /// Read the local state directory of `gridq run --local`, even where a cluster file is.
    #[arg(long, conflicts_with = "config")]
    local: bool,
    /// The state directory of `gridq run --local`.
    #[arg(
        long,
        env = "GRIDQ_STATE_DIR",
        default_value = ".gridq",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    #[command(flatten)]
    sel: ClusterSel,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse()
}

/// One job's outputs, as the store or the master says.
#[derive(Debug, Clone)]
struct Found {
    id: JobId,
    /// The host of the attempt that holds them; `None`: no attempt ran.
    host: Option<String>,
    /// Files and bytes listed; `None`: no listing came.
    files: Option<u64>,
    bytes: Option<u64>,
    truncated: bool,
    /// The directory as the worker saw it.
    dir: Option<String>,
}

impl Found {
    /// Whether there is something to fetch (or may be: no listing came).
    fn wanted(&self) -> bool {
        self.host.is_some() && (self.truncated || self.files != Some(0))
    }

    /// Whether the listing promised files (so their absence is an error).
    fn promised(&self) -> bool {
        self.truncated || self.files.is_some_and(|n| n > 0)
    }
}

/// How one host (or this machine) went.
#[derive(Debug, Default, Serialize)]
struct HostReport {
    host: String,
    /// Jobs whose outputs were asked of it.
    jobs: usize,
    /// Files copied (new or changed) and their bytes.
    files: u64,
    bytes: u64,
    /// Why nothing (or not everything) came.
    error: Option<String>,
    /// Jobs whose outputs did not come.
    missing: Vec<String>,
}

/// What a pull did.
#[derive(Debug, Serialize)]
struct Report {
    sweep: String,
    /// `DEST/SWEEP`, when something was copied.
    dest: Option<PathBuf>,
    results_csv: Option<PathBuf>,
    hosts: Vec<HostReport>,
    /// Jobs selected.
    jobs: usize,
    /// Of those: never ran, or left nothing.
    never_ran: usize,
    empty: usize,
    /// Jobs named on the command line that are not in the sweep.
    unknown: Vec<String>,
    ok: bool,
}

pub(crate) fn run(args: &PullArgs) -> Result<(), Failure> {
    SweepId::new(&args.sweep).map_err(|e| Failure::Usage(e.to_string()))?;
    for p in &args.jobs {
        if p.len() < 4 || p.len() > JobId::HEX_LEN || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Failure::Usage(format!(
                "`{p}` is not a job id: expected 4 to 32 hexadecimal digits"
            )));
        }
    }
    let include = Include::new(&args.include)?;
    let cluster_file = args.sel.path();
    let store = args.state_dir.join(gridq_master::state_dir::DB_FILE);
    let report = if args.local {
        local(args, &store, &include)?
    } else if args.sel.config.is_some() || cluster_file.exists() {
        if !cluster_file.exists() {
            return Err(Failure::Usage(format!(
                "--config: no cluster file at {}",
                cluster_file.display()
            )));
        }
        cluster(args, &cluster_file, &include)?
    } else if store.exists() {
        local(args, &store, &include)?
    } else {
        return Err(Failure::Usage(format!(
            "nothing to pull from: no cluster file at {} (deploy first, or pass --config FILE) and no local state at {} (run `gridq run SWEEP --local` here first, or pass --state-dir DIR)",
            cluster_file.display(),
            store.display()
        )));
    };
    let Some(report) = report else {
        return Ok(());
    };
    if args.sel.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_summary(&report);
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::Silent(1))
    }
}

fn print_summary(r: &Report) {
    let files: u64 = r.hosts.iter().map(|h| h.files).sum();
    let bytes: u64 = r.hosts.iter().map(|h| h.bytes).sum();
    let fetched: usize = r.hosts.iter().map(|h| h.jobs).sum();
    if let Some(dest) = &r.dest {
        println!(
            "sweep {}: outputs of {fetched} job{} in {}: {files} file{} ({}) new or changed",
            r.sweep,
            plural(fetched),
            dest.display(),
            plural_u(files),
            gridq_common::human::bytes(bytes)
        );
    }
    if let Some(csv) = &r.results_csv {
        println!("results: {}", csv.display());
    }
    if r.empty + r.never_ran > 0 {
        println!(
            "{} job{} left no files; {} never ran",
            r.empty,
            plural(r.empty),
            r.never_ran
        );
    }
    for h in &r.hosts {
        if let Some(e) = &h.error {
            eprintln!("error: [{}] {e}", h.host);
        }
        if !h.missing.is_empty() {
            eprintln!(
                "error: [{}] outputs missing for {} job{}: {}",
                h.host,
                h.missing.len(),
                plural(h.missing.len()),
                shown(&h.missing)
            );
        }
    }
    for j in &r.unknown {
        eprintln!("error: no job `{j}` in sweep {}", r.sweep);
    }
}

fn shown(ids: &[String]) -> String {
    let mut s = ids.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if ids.len() > 10 {
        s.push_str(&format!(", and {} more", ids.len() - 10));
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn plural_u(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The jobs named on the command line (by prefix), or all; and the prefixes that name none.
fn select(all: Vec<Found>, prefixes: &[String]) -> (Vec<Found>, Vec<String>) {
    if prefixes.is_empty() {
        return (all, Vec::new());
    }
    let lower: Vec<String> = prefixes.iter().map(|p| p.to_ascii_lowercase()).collect();
    let unknown = lower
        .iter()
        .filter(|p| !all.iter().any(|j| j.id.to_string().starts_with(p.as_str())))
        .cloned()
        .collect();
    let chosen = all
        .into_iter()
        .filter(|j| {
            let id = j.id.to_string();
            lower.iter().any(|p| id.starts_with(p.as_str()))
        })
        .collect();
    (chosen, unknown)
}

// ---------------------------------------------------------------- local mode

fn local(args: &PullArgs, db: &Path, include: &Include) -> Result<Option<Report>, Failure> {
    if !db.exists() {
        return Err(Failure::Usage(format!(
            "no local state at {}: run `gridq run SWEEP --local` here first, or pass --state-dir DIR",
            db.display()
        )));
    }
    let reader =
        Store::read_only(db).with_context(|| format!("opening {} read-only", db.display()))?;
    let view = reader.view();
    let sweep = SweepId::new(&args.sweep).map_err(|e| Failure::Usage(e.to_string()))?;
    let Some(record) = view
        .sweep_record(&sweep)
        .with_context(|| format!("reading {}", db.display()))?
    else {
        return Err(Failure::Usage(format!(
            "no sweep named `{}` in {}",
            args.sweep,
            db.display()
        )));
    };
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = view
            .job_outputs_after(&sweep, &args.state, after, PAGE)
            .with_context(|| format!("reading {}", db.display()))?;
        all.extend(page.into_iter().map(|j| {
            Found {
                id: j.id,
                host: j.host,
                files: j.outputs.as_ref().map(|o| o.files.len() as u64),
                bytes: j
                    .outputs
                    .as_ref()
                    .map(gridq_common::wire::OutputListing::bytes),
                truncated: j.outputs.as_ref().is_some_and(|o| o.truncated),
                dir: j.outputs.map(|o| o.dir),
            }
        }));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let (jobs, unknown) = select(all, &args.jobs);
    // Where a job without a listing would have its directory: beside one that has one.
    let root: Option<PathBuf> = jobs
        .iter()
        .find_map(|j| j.dir.as_deref().and_then(|d| Path::new(d).parent()))
        .map(Path::to_path_buf);
    let source = |j: &Found| -> Option<PathBuf> {
        j.dir
            .as_ref()
            .map(PathBuf::from)
            .or_else(|| root.as_ref().map(|r| r.join(j.id.to_string())))
    };
    let never_ran = jobs.iter().filter(|j| j.host.is_none()).count();
    let empty = jobs
        .iter()
        .filter(|j| j.host.is_some() && !j.wanted())
        .count();
    let wanted: Vec<&Found> = jobs.iter().filter(|j| j.wanted()).collect();

    let Some(dest) = &args.dest else {
        // Where they are.
        let listed: Vec<serde_json::Value> = wanted
            .iter()
            .filter_map(|j| {
                let dir = source(j)?;
                dir.is_dir().then(|| {
                    serde_json::json!({
                        "id": j.id, "dir": dir, "files": j.files, "bytes": j.bytes,
                        "truncated": j.truncated,
                    })
                })
            })
            .collect();
        if args.sel.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "sweep": args.sweep, "root": root, "jobs": listed,
                }))
                .unwrap_or_default()
            );
        } else {
            match &root {
                Some(r) => println!(
                    "sweep {}: outputs of {} job{} in {} (copy them with --dest DIR)",
                    args.sweep,
                    listed.len(),
                    plural(listed.len()),
                    r.display()
                ),
                None => println!("sweep {}: no job left outputs", args.sweep),
            }
            for j in &listed {
                println!(
                    "  {}  {} file{}  {}",
                    j["id"].as_str().unwrap_or_default(),
                    j["files"].as_u64().unwrap_or(0),
                    plural_u(j["files"].as_u64().unwrap_or(0)),
                    gridq_common::human::bytes(j["bytes"].as_u64().unwrap_or(0)),
                );
            }
        }
        return if unknown.is_empty() {
            Ok(None)
        } else {
            for j in &unknown {
                eprintln!("error: no job `{j}` in sweep {}", args.sweep);
            }
            Err(Failure::Silent(1))
        };
    };

    let base = dest.join(&args.sweep);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let mut host = HostReport {
        host: "local".into(),
        jobs: wanted.len(),
        ..HostReport::default()
    };
    for j in &wanted {
        let Some(src) = source(j).filter(|s| s.is_dir()) else {
            if j.promised() {
                host.missing.push(j.id.to_string());
            }
            continue;
        };
        match copy_tree(&src, &base.join(j.id.to_string()), include) {
            Ok((files, bytes)) => {
                host.files += files;
                host.bytes += bytes;
            }
            Err(e) => {
                host.error = Some(format!("copying {}: {e}", src.display()));
                host.missing.push(j.id.to_string());
            }
        }
    }
    // The results, from the store (as `gridq run` wrote them at the end).
    let csv = local_results_csv(&reader, &sweep, &record.param_names)
        .with_context(|| format!("reading the results from {}", db.display()))?;
    let csv_path = base.join("results.csv");
    write_if_changed(&csv_path, csv.as_bytes())?;
    let ok = host.error.is_none() && host.missing.is_empty() && unknown.is_empty();
    Ok(Some(Report {
        sweep: args.sweep.clone(),
        dest: Some(base),
        results_csv: Some(csv_path),
        hosts: vec![host],
        jobs: jobs.len(),
        never_ran,
        empty,
        unknown,
        ok,
    }))
}

fn local_results_csv(
    reader: &gridq_master::store::Reader,
    sweep: &SweepId,
    params: &[String],
) -> anyhow::Result<String> {
    let view = reader.view();
    let keys = view.result_keys(sweep)?;
    let mut export = gridq_master::http::api::ResultsExport::new(true, params, keys);
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let jobs = view.jobs_after(sweep, after, PAGE)?;
        out.extend(export.rows(&jobs).map_err(anyhow::Error::msg)?);
        match jobs.last() {
            Some(last) if jobs.len() as u64 == PAGE => after = Some((last.index, last.id)),
            _ => break,
        }
    }
    if out.is_empty() {
        out = export.rows(&[]).map_err(anyhow::Error::msg)?;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Writes `bytes` to `path` (through a temporary file and a rename) unless it holds them.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copies the regular files under `src` that `include` takes into `dst`, skipping those whose
/// copy there has the same size and modification time; links are not followed. Returns the
/// files copied and their bytes.
fn copy_tree(src: &Path, dst: &Path, include: &Include) -> io::Result<(u64, u64)> {
    let mut copied = (0, 0);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(src.join(&rel))?.collect::<io::Result<_>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let rel = rel.join(e.file_name());
            let kind = e.file_type()?;
            if kind.is_dir() {
                stack.push(rel);
                continue;
            }
            if !kind.is_file() || !include.takes(&rel) {
                continue;
            }
            let from = src.join(&rel);
            let to = dst.join(&rel);
            let meta = std::fs::symlink_metadata(&from)?;
            let modified = meta.modified()?;
            if let Ok(old) = std::fs::symlink_metadata(&to) {
                if old.is_file() && old.len() == meta.len() && old.modified().ok() == Some(modified)
                {
                    continue;
                }
            }
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // A link left at the target is replaced, never written through.
            if std::fs::symlink_metadata(&to).is_ok_and(|m| !m.is_file()) {
                let _ = std::fs::remove_file(&to);
            }
            let bytes = std::fs::copy(&from, &to)?;
            std::fs::File::options()
                .write(true)
                .open(&to)?
                .set_modified(modified)?;
            copied.0 += 1;
            copied.1 += bytes;
        }
    }
    Ok(copied)
}

// ---------------------------------------------------------------- include globs

/// The `--include` globs: a gitignore matcher for local copies, and rsync filter rules with
/// the same meaning.
#[derive(Debug)]
struct Include {
    matcher: Option<Gitignore>,
    rules: Vec<String>,
}

impl Include {
    fn new(globs: &[String]) -> Result<Self, Failure> {
        if globs.is_empty() {
            return Ok(Self {
                matcher: None,
                rules: Vec::new(),
            });
        }
        let mut builder = GitignoreBuilder::new("");
        let mut rules = vec!["--include=*/".to_owned()];
        for g in globs {
            if g.is_empty() || g.starts_with('!') || g.contains('\n') {
                return Err(Failure::Usage(format!(
                    "--include `{g}`: expected a glob such as `*.txt` or `ckpt/*.pt`"
                )));
            }
            builder
                .add_line(None, g)
                .map_err(|e| Failure::Usage(format!("--include `{g}`: {e}")))?;
            rules.push(format!("--include={}", rsync_rule(g)));
        }
        rules.push("--exclude=*".to_owned());
        rules.push("--prune-empty-dirs".to_owned());
        let matcher = builder
            .build()
            .map_err(|e| Failure::Usage(format!("--include: {e}")))?;
        Ok(Self {
            matcher: Some(matcher),
            rules,
        })
    }

    /// Whether the file at `rel` (relative to the job's directory) is taken.
    fn takes(&self, rel: &Path) -> bool {
        self.matcher
            .as_ref()
            .is_none_or(|m| m.matched_path_or_any_parents(rel, false).is_ignore())
    }
}

/// The rsync filter pattern of a gitignore glob, for a transfer whose root holds the jobs'
/// directories: a glob with a `/` before its end is anchored at the job's directory (`/*/`),
/// one without matches at any depth, and a trailing `/` takes the whole directory (`***`).
fn rsync_rule(glob: &str) -> String {
    let anchored = glob.starts_with('/') || glob.trim_end_matches('/').contains('/');
    let mut body = glob.trim_start_matches('/').to_owned();
    if body.ends_with('/') {
        body.push_str("***");
    }
    if anchored { format!("/*/{body}") } else { body }
}

// ---------------------------------------------------------------- cluster mode

fn cluster(args: &PullArgs, file: &Path, include: &Include) -> Result<Option<Report>, Failure> {
    let cluster = super::cluster::load_cluster(file)?;
    let ssh = lib::ssh_options(
        &cluster,
        &SshOptions {
            connect_timeout: args.sel.connect_timeout,
            ..SshOptions::default()
        },
    );
    let dest = args.dest.clone().unwrap_or_else(|| PathBuf::from("."));
    let base = dest.join(&args.sweep);
    runtime()?.block_on(async {
        let fleet = Fleet::connect(&cluster, &ssh, &lib::quiet()).await?;
        let outcome = pull_cluster(args, &fleet, &base, include).await;
        fleet.close().await;
        outcome.map(Some)
    })
}

/// A reqwest error's HTTP status, when it has one.
fn status_of(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<reqwest::Error>()
        .and_then(reqwest::Error::status)
        .map(|s| s.as_u16())
}

async fn pull_cluster(
    args: &PullArgs,
    fleet: &Fleet,
    base: &Path,
    include: &Include,
) -> Result<Report, Failure> {
    let cluster = &fleet.cluster;
    let api = MasterApi::open(fleet, Instant::now() + Duration::from_secs(10), None)
        .await
        .context("reaching the cluster's master")?;
    let name = gridq_common::rabbit_node::percent_encode(&args.sweep);
    if let Err(e) = api.get(&format!("/sweeps/{name}")).await {
        return Err(if status_of(&e) == Some(404) {
            Failure::Usage(format!(
                "no sweep named `{}` on the cluster's master",
                args.sweep
            ))
        } else {
            Failure::Other(e.context("asking the master for the sweep"))
        });
    }
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = format!("/sweeps/{name}/outputs?limit={PAGE}");
        for s in &args.state {
            q.push_str(&format!("&state={}", s.as_str()));
        }
        if let Some(a) = &after {
            q.push_str(&format!(
                "&after={}",
                gridq_common::rabbit_node::percent_encode(a)
            ));
        }
        let page = api
            .get(&q)
            .await
            .context("asking the master where the outputs are")?;
        for j in page["jobs"].as_array().into_iter().flatten() {
            let Some(id) = j["id"].as_str().and_then(|s| s.parse::<JobId>().ok()) else {
                continue;
            };
            all.push(Found {
                id,
                host: j["host"].as_str().map(str::to_owned),
                files: j["files"].as_u64(),
                bytes: j["bytes"].as_u64(),
                truncated: j["truncated"].as_bool().unwrap_or(false),
                dir: j["dir"].as_str().map(str::to_owned),
            });
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let (jobs, unknown) = select(all, &args.jobs);
    let never_ran = jobs.iter().filter(|j| j.host.is_none()).count();
    let empty = jobs
        .iter()
        .filter(|j| j.host.is_some() && !j.wanted())
        .count();

    // The worker places by the host name their workers report.
    let places: BTreeMap<String, HostRef> = cluster
        .file
        .workers
        .iter()
        .map(|w| (lib::worker_host_name(cluster, w.host), w.host))
        .collect();
    let mut by_place: BTreeMap<String, (Option<HostRef>, Vec<&Found>)> = BTreeMap::new();
    for j in jobs.iter().filter(|j| j.wanted()) {
        let host = j.host.clone().unwrap_or_default();
        by_place
            .entry(host.clone())
            .or_insert_with(|| (place_of(&places, &host), Vec::new()))
            .1
            .push(j);
    }
    std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let tasks = by_place.iter().map(|(host, (place, jobs))| async move {
        let mut report = HostReport {
            host: host.clone(),
            jobs: jobs.len(),
            ..HostReport::default()
        };
        let Some(place) = place else {
            report.error = Some(format!(
                "the workers on `{host}` are not in the cluster file {}",
                CLUSTER_FILE
            ));
            report.missing = jobs.iter().map(|j| j.id.to_string()).collect();
            return report;
        };
        report.host = fleet.label(*place);
        let Some(conn) = fleet.conn(*place) else {
            report.error = Some(format!(
                "unreachable: {}",
                fleet.error(*place).unwrap_or("not connected")
            ));
            report.missing = jobs.iter().map(|j| j.id.to_string()).collect();
            return report;
        };
        match &conn.session {
            Some(session) => {
                fetch_remote(
                    session,
                    &cluster.file.remote_path,
                    &args.sweep,
                    jobs,
                    base,
                    include,
                    &mut report,
                )
                .await;
            }
            None => {
                let root = cluster.project.join(OUTPUT_ROOT).join(&args.sweep);
                for j in jobs {
                    let src = root.join(j.id.to_string());
                    if !src.is_dir() {
                        if j.promised() {
                            report.missing.push(j.id.to_string());
                        }
                        continue;
                    }
                    match copy_tree(&src, &base.join(j.id.to_string()), include) {
                        Ok((f, b)) => {
                            report.files += f;
                            report.bytes += b;
                        }
                        Err(e) => {
                            report.error = Some(format!("copying {}: {e}", src.display()));
                            report.missing.push(j.id.to_string());
                        }
                    }
                }
            }
        }
        report
    });
    let hosts: Vec<HostReport> = futures_util::future::join_all(tasks).await;
    // Per host as it went; failures are said once, in the summary.
    for h in hosts.iter().filter(|h| h.error.is_none() && !args.sel.json) {
        eprintln!(
            "[{}] {} job{}: {} file{} ({}) received",
            h.host,
            h.jobs,
            plural(h.jobs),
            h.files,
            plural_u(h.files),
            gridq_common::human::bytes(h.bytes)
        );
    }
    // The results, from the master's export.
    let csv = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .context("an HTTP client")?
        .get(format!(
            "{}/api/v1/sweeps/{name}/results?format=csv",
            api.url
        ))
        .bearer_auth(&api.token)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("asking the master for the results")?
        .bytes()
        .await
        .context("reading the results")?;
    let csv_path = base.join("results.csv");
    write_if_changed(&csv_path, &csv)?;
    let ok = unknown.is_empty()
        && hosts
            .iter()
            .all(|h| h.error.is_none() && h.missing.is_empty());
    Ok(Report {
        sweep: args.sweep.clone(),
        dest: Some(base.to_path_buf()),
        results_csv: Some(csv_path),
        hosts,
        jobs: jobs.len(),
        never_ran,
        empty,
        unknown,
        ok,
    })
}

/// The worker place whose workers report `host`: by name, or, for a host recorded from a
/// worker's id before its report came (a lost attempt), by the name after the broker user
/// that starts the id (`gridq-worker-2.ADDR`).
fn place_of(places: &BTreeMap<String, HostRef>, host: &str) -> Option<HostRef> {
    places.get(host).copied().or_else(|| {
        places
            .iter()
            .find(|(name, _)| host.ends_with(&format!(".{name}")))
            .map(|(_, place)| *place)
    })
}

/// What one rsync received.
#[derive(Debug, Default, PartialEq, Eq)]
struct Received {
    files: u64,
    bytes: u64,
    /// Job directories the host did not have.
    absent: BTreeSet<String>,
}

/// Fetches the jobs' directories from the host into `base` with one rsync.
async fn fetch_remote(
    session: &HostSession,
    remote_project: &str,
    sweep: &str,
    jobs: &[&Found],
    base: &Path,
    include: &Include,
    report: &mut HostReport,
) {
    let all_missing = |report: &mut HostReport| {
        report.missing = jobs.iter().map(|j| j.id.to_string()).collect();
    };
    let project = match crate::sync::remote_abs_path(session, remote_project).await {
        Ok(p) => p,
        Err(e) => {
            report.error = Some(e.to_string());
            all_missing(report);
            return;
        }
    };
    let remote = format!("{project}/{OUTPUT_ROOT}/{sweep}");
    let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    match rsync_from(session, &remote, &ids, base, include).await {
        Ok(got) => {
            report.files = got.files;
            report.bytes = got.bytes;
            // A directory the host does not have: missing when its listing promised files.
            report.missing = jobs
                .iter()
                .filter(|j| j.promised() && got.absent.contains(&j.id.to_string()))
                .map(|j| j.id.to_string())
                .collect();
        }
        Err(e) => {
            report.error = Some(e);
            all_missing(report);
        }
    }
}

/// `rsync` from `remote` (a directory on the session's host) into `base`: the directories
/// named `ids`, recursively, through the session's control socket.
async fn rsync_from(
    session: &HostSession,
    remote: &str,
    ids: &[String],
    base: &Path,
    include: &Include,
) -> Result<Received, String> {
    let (rsh, source) = crate::sync::rsync_remote(session, remote).map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new("rsync");
    cmd.args([
        // Recursive (not implied with --files-from), permissions and times kept, links not
        // copied (the listing names regular files only).
        "-rpt",
        "--protect-args",
        "--from0",
        "--files-from=-",
        "--out-format=%i %l %n",
        "-e",
        &rsh,
    ])
    .args(&include.rules)
    .arg("--")
    .arg(&source)
    .arg(base.as_os_str())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start rsync on this machine: {e} (is rsync installed?)"))?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err("rsync's standard streams are not piped".into());
    };
    let write = async {
        for id in ids {
            if stdin.write_all(id.as_bytes()).await.is_err()
                || stdin.write_all(b"\0").await.is_err()
            {
                break;
            }
        }
        let _ = stdin.shutdown().await;
        drop(stdin);
    };
    let count = async {
        let mut got = Received::default();
        let mut lines = tokio::io::BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(lines.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
            if let Some(bytes) = received(&line) {
                got.files += 1;
                got.bytes += bytes;
            }
            line.clear();
        }
        got
    };
    let errors = async {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    };
    let ((), mut got, errors) = tokio::join!(write, count, errors);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for rsync: {e}"))?;
    let (absent, other) = absent_dirs(&errors);
    got.absent = absent;
    match status.code() {
        Some(0 | 24) => Ok(got),
        // Some sources were missing, and nothing else went wrong.
        Some(23) if other.is_empty() => Ok(got),
        code => {
            let hint = match code {
                Some(255) => "; the ssh connection failed: is the host still reachable?",
                Some(23) => "; some files could not be read on the host or written here",
                _ => "",
            };
            let detail = if other.is_empty() {
                errors
                    .lines()
                    .last()
                    .unwrap_or("no error output")
                    .to_owned()
            } else {
                other.join(" / ")
            };
            Err(format!(
                "rsync failed (exit {}): {detail}{hint}",
                code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string())
            ))
        }
    }
}

/// From a line of `--out-format=%i %l %n`: the size of a file received, `None` for anything
/// else (a directory, a message).
fn received(line: &[u8]) -> Option<u64> {
    match crate::sync::itemized(line)? {
        (b'>', b'f', len) => Some(len),
        _ => None,
    }
}

/// rsync's error lines split into the job directories it could not find on the host
/// (`link_stat ".../JOB" failed: No such file or directory`) and every other error.
fn absent_dirs(stderr: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut absent = BTreeSet::new();
    let mut other = Vec::new();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("rsync error: some files/attrs were not transferred") {
            continue;
        }
        let missing = line
            .split_once("link_stat \"")
            .and_then(|(_, rest)| rest.split_once("\" failed: No such file or directory"))
            .map(|(path, _)| path.trim_end_matches('/'));
        match missing {
            Some(path) => {
                let name = Path::new(path)
                    .file_name()
                    .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
                    .unwrap_or_default();
                absent.insert(name);
            }
            None => other.push(line.to_owned()),
        }
    }
    (absent, other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_globs_mean_the_same_locally_and_for_rsync() {
        let inc = Include::new(&["*.txt".into(), "ckpt/*.pt".into(), "logs/".into()]).unwrap();
        for (path, taken) in [
            ("out.txt", true),
            ("a/b/out.txt", true),
            ("ckpt/x.pt", true),
            ("a/ckpt/x.pt", false),
            ("logs/1/err", true),
            ("model.bin", false),
        ] {
            assert_eq!(inc.takes(Path::new(path)), taken, "{path}");
        }
        assert_eq!(
            inc.rules,
            [
                "--include=*/",
                "--include=*.txt",
                "--include=/*/ckpt/*.pt",
                "--include=logs/***",
                "--exclude=*",
                "--prune-empty-dirs"
            ]
        );
        assert!(Include::new(&[]).unwrap().takes(Path::new("any/thing")));
        assert!(Include::new(&["!x".into()]).is_err());
    }

    #[test]
    fn rsync_lines_and_errors_are_read() {
        assert_eq!(received(b">f+++++++++ 12 0a0b/out.txt\n"), Some(12));
        assert_eq!(received(b"cd+++++++++ 4096 0a0b/\n"), None);
        assert_eq!(received(b">f..t...... 3 0a0b/x\n"), Some(3));
        let (absent, other) = absent_dirs(
            "rsync: [sender] link_stat \"/home/u/gridq/p/.gridq/out/s/0a0b\" failed: No such file or directory (2)\n\
             rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1338) [Receiver=3.2.7]\n",
        );
        assert_eq!(absent, BTreeSet::from(["0a0b".to_owned()]));
        assert!(other.is_empty(), "{other:?}");
        let (_, other) =
            absent_dirs("rsync: write failed on \"/x\": No space left on device (28)\n");
        assert_eq!(other.len(), 1);
    }

    #[test]
    fn hosts_are_matched_by_the_name_their_workers_report() {
        let places = BTreeMap::from([
            ("127.0.0.2".to_owned(), HostRef::Index(1)),
            ("local".to_owned(), HostRef::Local),
        ]);
        assert_eq!(place_of(&places, "127.0.0.2"), Some(HostRef::Index(1)));
        assert_eq!(
            place_of(&places, "gridq-worker-1.127.0.0.2"),
            Some(HostRef::Index(1))
        );
        assert_eq!(place_of(&places, "local"), Some(HostRef::Local));
        assert_eq!(place_of(&places, "127.0.0.9"), None);
    }

    #[test]
    fn a_copy_takes_only_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.txt"), b"aaa").unwrap();
        std::fs::write(src.join("sub/b.bin"), b"bb").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let dst = tmp.path().join("dst");
        let all = Include::new(&[]).unwrap();
        assert_eq!(copy_tree(&src, &dst, &all).unwrap(), (2, 5));
        assert_eq!(std::fs::read(dst.join("sub/b.bin")).unwrap(), b"bb");
        assert!(!dst.join("link").exists());
        assert_eq!(copy_tree(&src, &dst, &all).unwrap(), (0, 0));
        std::fs::write(src.join("a.txt"), b"changed").unwrap();
        assert_eq!(copy_tree(&src, &dst, &all).unwrap(), (1, 7));
        let only_txt = Include::new(&["*.txt".into()]).unwrap();
        let dst2 = tmp.path().join("dst2");
        assert_eq!(copy_tree(&src, &dst2, &only_txt).unwrap(), (1, 7));
        assert!(!dst2.join("sub").exists());
    }
}
