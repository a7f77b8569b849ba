//! The master's embedded store: sweeps, jobs, attempts, results, logs, workers, dead letters.
//!
//! SQLite in WAL mode with `synchronous=NORMAL`: a commit survives a crash of the master
//! process (what a restart needs); a power cut may lose the last commits, which the broker
//! then redelivers because their messages were not acked yet. One connection writes (the
//! master core, in batches of one transaction); the HTTP API reads through its own connections.
//!
//! # Job states
//! `pending` (stored, not yet confirmed by the broker) → `queued` (confirmed) → `running`
//! (granted to a worker) → `succeeded` | `failed` | `timed_out` | `canceled`; a failed attempt
//! with retries left waits in `retrying` until its backoff ends, then is `pending` again.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use gridq_common::code::CodeVersion;
use gridq_common::wire::{AttemptRef, Finished, LogLine, Outcome, OutputListing, Stream};
use gridq_common::{JobId, SweepId, WorkerId};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

mod query;
pub use query::{COUNT_CAP, JobQuery, MatchCount, SortKey};

/// Store errors. SQLite errors are not retried: the master stops and a restart resumes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A read ran past its time limit and was stopped (see [`Reader::within`]).
    #[error("the query ran longer than {0:?} and was stopped")]
    TooSlow(std::time::Duration),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        Self::Pending,
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the job is done (no further attempt will run on its own).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Canceled
        )
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                format!(
                    "unknown state `{s}`; expected one of: {}",
                    Self::ALL.map(JobState::as_str).join(", ")
                )
            })
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the master needs to (re)publish one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub sweep: SweepId,
    pub job: JobId,
    pub attempt: u32,
    pub queue: String,
}

/// Where a walk over the pending jobs is: a sweep, an expansion index and a row id.
pub type PendingPlace = (SweepId, u64, i64);

/// A new job, as expanded from a sweep.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub index: u64,
    pub argv: Vec<String>,
    pub params_json: String,
    pub env: Vec<(String, String)>,
    /// The parameter values typed for sorting, in `params` order.
    pub sort_values: Vec<SortValue>,
}

/// A value as the monitor sorts and filters it: numbers as numbers, everything else as text.
#[derive(Debug, Clone, PartialEq)]
pub enum SortValue {
    Num(f64),
    Text(String),
}

impl SortValue {
    /// Numbers (finite) stay numbers; strings are their text; other JSON is its JSON text.
    pub fn of(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Number(n) => n.as_f64().filter(|f| f.is_finite()).map(Self::Num),
            serde_json::Value::String(s) => Some(Self::Text(s.clone())),
            serde_json::Value::Null => None,
            other => Some(Self::Text(other.to_string())),
        }
    }
}

impl rusqlite::ToSql for SortValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Self::Num(f) => f.to_sql(),
            Self::Text(s) => s.to_sql(),
        }
    }
}

/// A sweep as submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    pub name: SweepId,
    pub source: String,
    pub yaml: String,
    pub param_names: Vec<String>,
    pub retries: u32,
    pub timeout_ms: Option<u64>,
    pub gpus: u32,
    pub queue: String,
    pub workdir: Option<String>,
    /// The project's code version at submission, when the client sent it.
    #[serde(default)]
    pub code: Option<gridq_common::code::CodeVersion>,
    /// Jobs start only on workers whose project holds `code` (`same_code`).
    #[serde(default)]
    pub same_code: bool,
}

/// What a submission did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitSummary {
    /// Jobs in the sweep file.
    pub total: u64,
    /// Jobs stored for the first time.
    pub added: u64,
    /// Jobs that ran again (failed, canceled or timed out before; or all with `rerun`).
    pub rerun: u64,
    /// Jobs skipped because they already succeeded.
    pub skipped: u64,
    /// Jobs left alone because they are still queued or running.
    pub in_flight: u64,
}

impl SubmitSummary {
    /// Adds the counts of another part of the same submission.
    pub fn add(&mut self, other: &Self) {
        self.total += other.total;
        self.added += other.added;
        self.rerun += other.rerun;
        self.skipped += other.skipped;
        self.in_flight += other.in_flight;
    }
}

/// The master's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimVerdict {
    Grant,
    Deny(String),
}

/// What finishing an attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishEffect {
    /// The attempt was current: the job is now in this state.
    Applied(JobState),
    /// It will run again after a backoff (ms since the epoch).
    Retry { at_ms: u64 },
    /// The attempt was handed back: publish the next attempt now.
    Requeue(Publish),
    /// Not the current attempt (late, or already recorded): stored as a duplicate.
    Duplicate,
}

/// A running attempt whose worker was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostEffect {
    Requeue(Publish),
    Failed(AttemptRef),
}

/// One row of the jobs listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRow {
    pub sweep: SweepId,
    pub id: JobId,
    pub index: u64,
    pub state: JobState,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub worker: Option<String>,
    pub host: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
    pub result: Option<serde_json::Map<String, serde_json::Value>>,
    /// The code version of the job's latest attempt that reported one.
    #[serde(default)]
    pub code: Option<CodeVersion>,
}

/// One attempt of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRow {
    pub attempt: u32,
    pub worker: Option<String>,
    pub host: Option<String>,
    pub gpus: Vec<u32>,
    pub state: String,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
    /// The version of the project's code it ran, as its worker reported it.
    #[serde(default)]
    pub code: Option<CodeVersion>,
    /// What the job left in its output directory when this attempt ended.
    #[serde(default)]
    pub outputs: Option<OutputListing>,
}

impl AttemptRow {
    /// The attempt whose host holds a job's outputs: the one that succeeded, else the latest
    /// that ran somewhere (the output directory belongs to the job, on the host its attempt
    /// ran on).
    pub fn output_holder(attempts: &[AttemptRow]) -> Option<&AttemptRow> {
        attempts
            .iter()
            .rev()
            .find(|a| a.state == "succeeded" && a.host.is_some())
            .or_else(|| attempts.iter().rev().find(|a| a.host.is_some()))
    }
}

/// The compact form of a code version that the results CSV, `gridq jobs` and the monitor show:
/// the tree hash's first 12 characters (after any `algorithm:` prefix), then `@` and the
/// commit's first 12 when there is one, then `+dirty` when the tree differed from it. For
/// example `3f2a9c1e0b7d@a1b2c3d4e5f6+dirty`.
pub fn code_label(code: &CodeVersion) -> String {
    fn short(s: &str) -> &str {
        let s = s.rsplit_once(':').map_or(s, |(_, h)| h);
        s.char_indices().nth(12).map_or(s, |(i, _)| &s[..i])
    }
    let mut label = short(&code.tree).to_owned();
    if let Some(commit) = &code.commit {
        label.push('@');
        label.push_str(short(commit));
        if code.dirty == Some(true) {
            label.push_str("+dirty");
        }
    }
    label
}

/// A place in a sweep's jobs in expansion order: an index and the id that breaks its ties.
pub type JobCursor = (u64, JobId);

/// Where one job's outputs are: the attempt that holds them ([`AttemptRow::output_holder`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobOutputs {
    pub id: JobId,
    pub index: u64,
    pub state: JobState,
    /// The holding attempt and where it ran; `None` when no attempt ran yet.
    pub attempt: Option<u32>,
    pub host: Option<String>,
    pub worker: Option<String>,
    /// What it listed; `None` when no list came.
    pub outputs: Option<OutputListing>,
}

/// A sweep with its progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepSummary {
    pub name: SweepId,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub total: u64,
    pub counts: std::collections::BTreeMap<String, u64>,
    pub canceled: bool,
    /// When its last job finished (ms since the epoch).
    #[serde(default)]
    pub last_finished_ms: Option<u64>,
    /// The project's code version at submission, when the client sent it.
    #[serde(default)]
    pub code: Option<gridq_common::code::CodeVersion>,
    /// Its jobs start only on workers whose project holds `code`.
    #[serde(default)]
    pub same_code: bool,
}

impl SweepSummary {
    /// Jobs in a final state.
    pub fn done(&self) -> u64 {
        ["succeeded", "failed", "timed_out", "canceled"]
            .iter()
            .map(|s| self.counts.get(*s).copied().unwrap_or(0))
            .sum()
    }
}

/// A message that was dead-lettered, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub queue: String,
    pub kind: Option<String>,
    pub reason: String,
    pub body: String,
    pub received_ms: u64,
}

/// A worker as the master last saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub state: String,
    pub reason: Option<String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub info: serde_json::Value,
    /// Attempts it finished (in any way).
    #[serde(default)]
    pub processed: u64,
    /// Of those, failed, timed out or lost.
    #[serde(default)]
    pub failed: u64,
}

impl WorkerRow {
    /// Online or draining: it still sends heartbeats and may hold jobs.
    pub fn is_online(&self) -> bool {
        self.state == "online" || self.state == "draining"
    }

    /// Jobs running there, as its last heartbeat listed them.
    pub fn running_jobs(&self) -> usize {
        self.info
            .get("running")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len)
    }
}

/// The jobs, in the order they were stored (a rowid table), found by sweep and id through
/// `jobs_key`. A sweep's jobs are stored, published, claimed and finished roughly in expansion
/// order, so each of those writes lands on the pages the jobs just before it wrote, instead of
/// a random page per job (the job id is a hash): stores made when the table was keyed by
/// sweep and id are rebuilt once ([`rekey_jobs`]).
const JOBS_TABLE: &str = r"
CREATE TABLE IF NOT EXISTS jobs(
    sweep TEXT NOT NULL,
    id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    argv_json TEXT NOT NULL,
    params_json TEXT NOT NULL,
    env_json TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    host TEXT,
    started_ms INTEGER,
    finished_ms INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    retry_at_ms INTEGER,
    updated_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs(sweep, id);
";

/// The columns of the jobs table, in order.
const JOBS_COLUMNS: &str = "sweep, id, idx, argv_json, params_json, env_json, state, attempt, failures, lost, worker, host, started_ms, finished_ms, exit_code, signal, reason, retry_at_ms, updated_ms";

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS sweeps(
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    yaml TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    canceled INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    code_json TEXT,
    same_code INTEGER NOT NULL DEFAULT 0
);
-- The state indexes end in the expansion order: jobs change state roughly in that order, so
-- each change removes an entry near the head of its old state's run and appends one to its new
-- state's, on pages that the jobs just before it touched, instead of two random pages per
-- index (the job id is a hash). (They replace `jobs_by_state` and `jobs_by_sweep_state`.)
DROP INDEX IF EXISTS jobs_by_state;
DROP INDEX IF EXISTS jobs_by_sweep_state;
CREATE INDEX IF NOT EXISTS jobs_state_order ON jobs(state, sweep, idx);
CREATE INDEX IF NOT EXISTS jobs_sweep_state_order ON jobs(sweep, state, idx);
CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs(worker) WHERE state = 'running';
-- The monitor's listings: expansion order, time of finishing and duration within a sweep.
CREATE INDEX IF NOT EXISTS jobs_by_sweep_idx ON jobs(sweep, idx);
CREATE INDEX IF NOT EXISTS jobs_by_id ON jobs(id);
-- Partial: only finished jobs have entries, so submitting and claiming never touch them.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(sweep, finished_ms) WHERE finished_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_duration ON jobs(sweep, finished_ms - started_ms) WHERE finished_ms IS NOT NULL;
-- The same within one state (failed jobs by finish time, succeeded ones by duration).
CREATE INDEX IF NOT EXISTS jobs_state_finished ON jobs(sweep, state, finished_ms) WHERE finished_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state_duration ON jobs(sweep, state, finished_ms - started_ms) WHERE finished_ms IS NOT NULL;
-- Each job's parameter values (key `p:<name>`) and numeric result metrics (`m:<name>`),
-- typed so numbers sort as numbers: the monitor sorts and filters a sweep's jobs by any
-- parameter or metric through this index, also at a million jobs.
CREATE TABLE IF NOT EXISTS job_values(
    sweep TEXT NOT NULL,
    key TEXT NOT NULL,
    v NOT NULL,
    job TEXT NOT NULL,
    PRIMARY KEY(sweep, key, v, job)
) WITHOUT ROWID;
-- One job's value of a key (joins from a filtered set of jobs to the sort key).
CREATE INDEX IF NOT EXISTS job_values_by_job ON job_values(sweep, job, key);
-- Job counts by sweep and state, kept by triggers so progress never scans the jobs.
CREATE TABLE IF NOT EXISTS sweep_counts(
    sweep TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY(sweep, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO sweep_counts(sweep, state, n) VALUES (NEW.sweep, NEW.state, 1)
        ON CONFLICT(sweep, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
    UPDATE sweep_counts SET n = n - 1 WHERE sweep = OLD.sweep AND state = OLD.state;
    INSERT INTO sweep_counts(sweep, state, n) VALUES (NEW.sweep, NEW.state, 1)
        ON CONFLICT(sweep, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE sweep_counts SET n = n - 1 WHERE sweep = OLD.sweep AND state = OLD.state;
END;
CREATE TABLE IF NOT EXISTS attempts(
    sweep TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    host TEXT,
    gpus_json TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    code_json TEXT,
    outputs_json TEXT,
    PRIMARY KEY(sweep, job, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results(
    sweep TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    result_json TEXT,
    stored_ms INTEGER NOT NULL,
    PRIMARY KEY(sweep, job)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS duplicate_results(
    id INTEGER PRIMARY KEY,
    sweep TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS logs(
    sweep TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY(sweep, job, attempt, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers(
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    info_json TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
-- Attempts each worker finished, and how many of those failed, kept by a trigger.
CREATE TABLE IF NOT EXISTS worker_counts(
    worker TEXT PRIMARY KEY,
    processed INTEGER NOT NULL,
    failed INTEGER NOT NULL
) WITHOUT ROWID;
-- Recreated on every open, so stores made by older versions get this definition. No `IN`
-- lists of more than two constants: SQLite builds a temporary B-tree (a page cache of its own)
-- for each such list every time the trigger fires, three per finished job.
DROP TRIGGER IF EXISTS attempts_count_worker;
CREATE TRIGGER attempts_count_worker AFTER UPDATE OF state ON attempts
WHEN NEW.worker IS NOT NULL AND OLD.state != NEW.state
     AND (NEW.state = 'succeeded' OR NEW.state = 'failed' OR NEW.state = 'timed_out'
          OR NEW.state = 'canceled' OR NEW.state = 'lost') BEGIN
    INSERT INTO worker_counts(worker, processed, failed)
        VALUES (NEW.worker, 1, NEW.state = 'failed' OR NEW.state = 'timed_out' OR NEW.state = 'lost')
        ON CONFLICT(worker) DO UPDATE SET processed = processed + 1,
            failed = failed + (NEW.state = 'failed' OR NEW.state = 'timed_out' OR NEW.state = 'lost');
END;
CREATE TABLE IF NOT EXISTS dead_letters(
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    body TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
";

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // 64 MiB of page cache: the hot job rows stay in memory.
    conn.pragma_update(None, "cache_size", -65_536)?;
    // Checkpoint the WAL every 10,000 pages (about 40 MiB) instead of 1,000: the pages every
    // job touches (index roots, the counts) are copied back once per checkpoint, and with
    // SQLite's default the checkpoints were a third of the master's CPU under load.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    Ok(conn)
}

/// Rebuilds a jobs table of the older layout (`WITHOUT ROWID`, keyed by sweep and id) as
/// [`JOBS_TABLE`], rows in expansion order, in one transaction. Its indexes and triggers go
/// with the old table; [`SCHEMA`] creates them again. Rows are copied as they are, so the
/// counts the triggers keep stay right.
fn rekey_jobs(conn: &mut Connection) -> Result<()> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'jobs'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if !sql.is_some_and(|sql| sql.contains("WITHOUT ROWID")) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let tx = conn.transaction()?;
    tx.execute_batch(
        "DROP TRIGGER IF EXISTS jobs_count_insert;
         DROP TRIGGER IF EXISTS jobs_count_update;
         DROP TRIGGER IF EXISTS jobs_count_delete;
         ALTER TABLE jobs RENAME TO jobs_keyed_by_id;",
    )?;
    tx.execute_batch(JOBS_TABLE)?;
    tx.execute_batch(&format!(
        "INSERT INTO jobs({JOBS_COLUMNS}) SELECT {JOBS_COLUMNS} FROM jobs_keyed_by_id ORDER BY sweep, idx;
         DROP TABLE jobs_keyed_by_id;"
    ))?;
    let jobs: i64 = tx.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
    tx.commit()?;
    tracing::info!(
        jobs,
        took_ms = started.elapsed().as_millis(),
        "rebuilt the jobs table in expansion order (a store made by an older gridq)"
    );
    Ok(())
}

/// Columns added to existing tables after their first release: `(table, column, declaration)`.
/// `CREATE TABLE IF NOT EXISTS` leaves an existing table as it is, so [`add_columns`] adds
/// those a store made by an older gridq lacks.
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    // The code version an attempt ran (issue 17), JSON.
    ("attempts", "code_json", "TEXT"),
    // What the job left in its output directory when the attempt ended, JSON.
    ("attempts", "outputs_json", "TEXT"),
    // The sweep's code version at submission, JSON, and whether its jobs are bound to it
    // (issue 17): read at each claim, so kept out of `spec_json`'s large text.
    ("sweeps", "code_json", "TEXT"),
    ("sweeps", "same_code", "INTEGER NOT NULL DEFAULT 0"),
];

/// Adds the [`ADDED_COLUMNS`] a table lacks (`ALTER TABLE ... ADD COLUMN`: only the schema
/// changes, no row is rewritten), in one transaction.
fn add_columns(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    for (table, column, decl) in ADDED_COLUMNS {
        let has: bool = tx
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            tracing::info!(
                table,
                column,
                "added a column (a store made by an older gridq)"
            );
        }
    }
    tx.commit()?;
    Ok(())
}

/// The writing side of the store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

/// A read-only view (the HTTP API's).
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| u64::try_from(x).unwrap_or(0))
}

fn parse_id(s: &str) -> Result<JobId> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

fn parse_sweep(s: &str) -> Result<SweepId> {
    SweepId::new(s).map_err(|e| StoreError::Corrupt(format!("{e}")))
}

/// Runs a query selecting `worker, sweep, id, attempt` and parses its rows.
fn attempts_with_worker(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<(String, AttemptRef)>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(args, |r| {
        Ok((
            r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, u32>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (worker, sweep, id, attempt) = row?;
        out.push((
            worker,
            AttemptRef {
                sweep: parse_sweep(&sweep)?,
                job: parse_id(&id)?,
                attempt,
            },
        ));
    }
    Ok(out)
}

/// An attempt's code version as stored, or NULL.
fn code_json(f: &Finished) -> Option<String> {
    f.code.as_ref().and_then(|c| serde_json::to_string(c).ok())
}

/// An attempt's output listing as stored, or NULL.
fn outputs_json(f: &Finished) -> Option<String> {
    f.outputs
        .as_ref()
        .and_then(|o| serde_json::to_string(o).ok())
}

/// A stored JSON column that the master wrote from a worker's report: one it cannot read
/// (written by another version) reads as absent rather than failing the whole listing.
fn parse_reported<T: serde::de::DeserializeOwned>(s: Option<String>) -> Option<T> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{e}")))
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or the schema cannot be created.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = open_connection(path)?;
        rekey_jobs(&mut conn)?;
        conn.execute_batch(JOBS_TABLE)?;
        conn.execute_batch(SCHEMA)?;
        add_columns(&mut conn)?;
        let store = Self { conn };
        store.refresh_statistics()?;
        Ok(store)
    }

    /// Refreshes the query planner's statistics of the parameter and metric values (sampled,
    /// so it stays fast at millions of rows): the monitor's filtered listings pick their
    /// index from them. Only that table: statistics on the jobs table, taken while a sweep is
    /// young, steer the core's own queries to worse plans (measured: 0.5 ms more per job).
    ///
    /// # Errors
    /// SQLite's.
    pub fn refresh_statistics(&self) -> Result<()> {
        self.conn.execute_batch(
            "PRAGMA analysis_limit = 1000; ANALYZE job_values;
             DELETE FROM sqlite_stat1 WHERE tbl != 'job_values'; ANALYZE sqlite_schema;",
        )?;
        Ok(())
    }

    /// A reader on the same file.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn reader(path: &Path) -> Result<Reader> {
        let conn = open_connection(path)?;
        // Readers come several to a master: 16 MiB of page cache each.
        conn.pragma_update(None, "cache_size", -16_384)?;
        Ok(Reader { conn })
    }

    /// A reader that can only read, for tools that look at the store of a master that is not
    /// running (`gridq pull` after `gridq run --local`): it changes nothing in the file, not
    /// even its schema. A store of an older gridq, whose tables lack later columns, reads as
    /// if those were empty.
    ///
    /// # Errors
    /// When the file is missing or cannot be opened.
    pub fn read_only(path: &Path) -> Result<Reader> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut has = true;
        for (table, column, _) in ADDED_COLUMNS {
            has &= conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists([column])?;
        }
        if !has {
            return Err(StoreError::Corrupt(format!(
                "{} was made by an older gridq; open it once with `gridq master` (or `gridq run`) to update it",
                path.display()
            )));
        }
        Ok(Reader { conn })
    }

    /// Runs `f` in one transaction.
    ///
    /// # Errors
    /// `f`'s error or the commit's; on error nothing is written.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction()?;
        let out = f(&Tx { tx: &tx })?;
        tx.commit()?;
        Ok(out)
    }

    /// Up to `limit` jobs stored but not confirmed, in sweep and expansion order, after
    /// `after` (a sweep, an expansion index and a row id, which breaks ties of the index): a
    /// cursor to walk them all in steps. Each comes with its place, the cursor's next value.
    ///
    /// # Errors
    /// SQLite's.
    pub fn pending_after(
        &self,
        after: Option<&PendingPlace>,
        limit: u64,
    ) -> Result<Vec<(PendingPlace, Publish)>> {
        let (sweep, idx, rowid) = after.map_or((String::new(), -1, -1), |(s, i, r)| {
            (s.as_str().to_owned(), to_i64(*i), *r)
        });
        // Each sweep's queue is read once: its stored spec (the whole YAML with it) was copied
        // and parsed for every pending job.
        let mut stmt = self.conn.prepare_cached(
            "SELECT sweep, id, attempt, idx, rowid FROM jobs
             WHERE state = 'pending' AND (sweep, idx, rowid) > (?1, ?2, ?3)
             ORDER BY sweep, idx, rowid LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![sweep, idx, rowid, to_i64(limit)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut records = SweepRecords::new(self.read());
        let mut out = Vec::new();
        for row in rows {
            let (sweep, id, attempt, idx, rowid) = row?;
            let sweep = parse_sweep(&sweep)?;
            // A job row always has its sweep (the sweep goes with its jobs).
            let Some(queue) = records.get(&sweep)?.map(|r| r.queue.clone()) else {
                continue;
            };
            out.push((
                (sweep.clone(), u64::try_from(idx).unwrap_or(0), rowid),
                Publish {
                    sweep,
                    job: parse_id(&id)?,
                    attempt,
                    queue,
                },
            ));
        }
        Ok(out)
    }

    /// Running attempts, by worker (to rebuild leases after a restart).
    ///
    /// # Errors
    /// SQLite's.
    pub fn running(&self) -> Result<Vec<(String, AttemptRef)>> {
        attempts_with_worker(
            &self.conn,
            "SELECT worker, sweep, id, attempt FROM jobs WHERE state = 'running'",
            [],
        )
    }

    /// Retries whose backoff has ended at `now_ms`.
    ///
    /// # Errors
    /// SQLite's.
    pub fn due_retries(&self, now_ms: u64) -> Result<Vec<AttemptRef>> {
        let rows = attempts_with_worker(
            &self.conn,
            "SELECT worker, sweep, id, attempt FROM jobs WHERE state = 'retrying' AND retry_at_ms <= ?1",
            [to_i64(now_ms)],
        )?;
        Ok(rows.into_iter().map(|(_, a)| a).collect())
    }

    /// Reads with the writer's connection (used by the core for its own decisions).
    pub fn read(&self) -> ReadView<'_> {
        ReadView { conn: &self.conn }
    }
}

/// Queries, on any connection.
#[derive(Debug, Clone, Copy)]
pub struct ReadView<'c> {
    conn: &'c Connection,
}

impl Reader {
    pub fn view(&self) -> ReadView<'_> {
        ReadView { conn: &self.conn }
    }

    /// Runs `f`, stopping its queries once they have run for `limit` in all
    /// ([`StoreError::TooSlow`]): no reader holds the store for long.
    ///
    /// # Errors
    /// `f`'s, or [`StoreError::TooSlow`].
    pub fn within<T>(
        &self,
        limit: std::time::Duration,
        f: impl FnOnce(&Self) -> Result<T>,
    ) -> Result<T> {
        let deadline = std::time::Instant::now() + limit;
        // Called every 1,000 virtual machine steps (a few microseconds); a nonzero answer
        // interrupts the statement.
        self.conn
            .progress_handler(1_000, Some(move || std::time::Instant::now() > deadline));
        let out = f(self);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        out.map_err(|e| match e {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::OperationInterrupted =>
            {
                StoreError::TooSlow(limit)
            }
            e => e,
        })
    }
}

/// Sweeps' settings, each read once for a run of jobs: they hold the sweep's whole YAML, and the
/// jobs of a run mostly belong to one sweep.
struct SweepRecords<'c> {
    view: ReadView<'c>,
    read: HashMap<String, Option<SweepRecord>>,
}

impl<'c> SweepRecords<'c> {
    fn new(view: ReadView<'c>) -> Self {
        Self {
            view,
            read: HashMap::new(),
        }
    }

    /// The sweep's settings; `None` when there is no such sweep.
    fn get(&mut self, sweep: &SweepId) -> Result<Option<&SweepRecord>> {
        if !self.read.contains_key(sweep.as_str()) {
            let record = self.view.sweep_record(sweep)?;
            self.read.insert(sweep.as_str().to_owned(), record);
        }
        Ok(self.read.get(sweep.as_str()).and_then(Option::as_ref))
    }
}

/// One write transaction.
#[derive(Debug)]
pub struct Tx<'t> {
    tx: &'t Transaction<'t>,
}

impl Tx<'_> {
    pub fn view(&self) -> ReadView<'_> {
        ReadView { conn: self.tx }
    }

    /// Stores a sweep and its jobs. New jobs are `pending`; jobs that succeeded before are
    /// skipped unless `rerun`; failed, timed-out and canceled ones get a new attempt; queued and
    /// running ones are left alone. Returns what to publish.
    ///
    /// # Errors
    /// SQLite's.
    pub fn submit(
        &self,
        sweep: &SweepRecord,
        jobs: impl IntoIterator<Item = NewJob>,
        rerun: bool,
        now_ms: u64,
    ) -> Result<(SubmitSummary, Vec<Publish>)> {
        self.put_sweep(sweep, now_ms)?;
        self.add_jobs(sweep, jobs, rerun, now_ms)
    }

    /// Stores a sweep's settings (a new sweep, or new settings for an existing one, which is
    /// no longer canceled). Its jobs follow with [`Tx::add_jobs`], in as many steps as needed.
    ///
    /// # Errors
    /// SQLite's.
    pub fn put_sweep(&self, sweep: &SweepRecord, now_ms: u64) -> Result<()> {
        let spec_json =
            serde_json::to_string(sweep).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let code_json = sweep
            .code
            .as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_default());
        self.tx.execute(
            "INSERT INTO sweeps(name, source, yaml, spec_json, canceled, created_ms, updated_ms, code_json, same_code)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5, ?6, ?7)
             ON CONFLICT(name) DO UPDATE SET source = ?2, yaml = ?3, spec_json = ?4, canceled = 0, updated_ms = ?5,
             code_json = ?6, same_code = ?7",
            params![sweep.name.as_str(), sweep.source, sweep.yaml, spec_json, to_i64(now_ms), code_json, sweep.same_code],
        )?;
        Ok(())
    }

    /// Stores jobs of a sweep stored by [`Tx::put_sweep`] (see [`Tx::submit`] for what
    /// happens to each). Returns their part of the summary and what to publish.
    ///
    /// # Errors
    /// SQLite's.
    pub fn add_jobs(
        &self,
        sweep: &SweepRecord,
        jobs: impl IntoIterator<Item = NewJob>,
        rerun: bool,
        now_ms: u64,
    ) -> Result<(SubmitSummary, Vec<Publish>)> {
        let mut existing = self
            .tx
            .prepare_cached("SELECT state, attempt FROM jobs WHERE sweep = ?1 AND id = ?2")?;
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO jobs(sweep, id, idx, argv_json, params_json, env_json, state, attempt, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 1, ?7)",
        )?;
        let mut again = self.tx.prepare_cached(
            "UPDATE jobs SET state = 'pending', attempt = attempt + 1, failures = 0, lost = 0, worker = NULL,
             host = NULL, started_ms = NULL, finished_ms = NULL, exit_code = NULL, signal = NULL,
             reason = NULL, retry_at_ms = NULL, idx = ?3, updated_ms = ?4
             WHERE sweep = ?1 AND id = ?2",
        )?;
        let mut value = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO job_values(sweep, key, v, job) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let keys: Vec<String> = sweep.param_names.iter().map(|p| format!("p:{p}")).collect();
        let mut summary = SubmitSummary::default();
        let mut publish = Vec::new();
        let name = sweep.name.as_str();
        for job in jobs {
            summary.total += 1;
            let id = job.id.to_string();
            let found: Option<(String, u32)> = existing
                .query_row(params![name, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let attempt = match found {
                None => {
                    insert.execute(params![
                        name,
                        id,
                        to_i64(job.index),
                        serde_json::to_string(&job.argv).unwrap_or_default(),
                        job.params_json,
                        serde_json::to_string(&job.env).unwrap_or_default(),
                        to_i64(now_ms)
                    ])?;
                    for (key, v) in keys.iter().zip(&job.sort_values) {
                        value.execute(params![name, key, v, id])?;
                    }
                    summary.added += 1;
                    1
                }
                Some((state, attempt)) => {
                    let state = JobState::from_str(&state).map_err(StoreError::Corrupt)?;
                    let run_again = match state {
                        JobState::Succeeded => rerun,
                        JobState::Failed | JobState::TimedOut | JobState::Canceled => true,
                        JobState::Pending
                        | JobState::Queued
                        | JobState::Running
                        | JobState::Retrying => false,
                    };
                    if !run_again {
                        if state == JobState::Succeeded {
                            summary.skipped += 1;
                        } else {
                            summary.in_flight += 1;
                        }
                        continue;
                    }
                    again.execute(params![name, id, to_i64(job.index), to_i64(now_ms)])?;
                    summary.rerun += 1;
                    attempt + 1
                }
            };
            publish.push(Publish {
                sweep: sweep.name.clone(),
                job: job.id,
                attempt,
                queue: sweep.queue.clone(),
            });
        }
        Ok((summary, publish))
    }

    /// Marks attempts confirmed by the broker as `queued` (only those still `pending` at the
    /// same attempt).
    ///
    /// # Errors
    /// SQLite's.
    pub fn confirmed(&self, published: &[Publish], now_ms: u64) -> Result<()> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE jobs SET state = 'queued', updated_ms = ?4 WHERE sweep = ?1 AND id = ?2 AND attempt = ?3 AND state = 'pending'",
        )?;
        for p in published {
            stmt.execute(params![
                p.sweep.as_str(),
                p.job.to_string(),
                p.attempt,
                to_i64(now_ms)
            ])?;
        }
        Ok(())
    }

    /// Decides a claim, recording the lease when granted. Idempotent for the same worker.
    ///
    /// # Errors
    /// SQLite's.
    pub fn claim(
        &self,
        a: &AttemptRef,
        worker: &WorkerId,
        host: &str,
        now_ms: u64,
    ) -> Result<ClaimVerdict> {
        let row: Option<(String, u32, Option<String>)> = self
            .tx
            .prepare_cached("SELECT state, attempt, worker FROM jobs WHERE sweep = ?1 AND id = ?2")?
            .query_row(params![a.sweep.as_str(), a.job.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((state, attempt, holder)) = row else {
            return Ok(ClaimVerdict::Deny("unknown job".into()));
        };
        let state = JobState::from_str(&state).map_err(StoreError::Corrupt)?;
        if a.attempt != attempt {
            return Ok(ClaimVerdict::Deny(format!(
                "attempt {} is superseded by attempt {attempt}",
                a.attempt
            )));
        }
        match state {
            JobState::Pending | JobState::Queued => {}
            JobState::Running if holder.as_deref() == Some(worker.as_str()) => {
                return Ok(ClaimVerdict::Grant);
            }
            JobState::Running => {
                return Ok(ClaimVerdict::Deny(format!(
                    "already running on {}",
                    holder.unwrap_or_default()
                )));
            }
            JobState::Canceled => return Ok(ClaimVerdict::Deny("canceled".into())),
            other => return Ok(ClaimVerdict::Deny(format!("already {other}"))),
        }
        self.tx.prepare_cached(
            "UPDATE jobs SET state = 'running', worker = ?3, host = ?4, started_ms = ?5, finished_ms = NULL,
             exit_code = NULL, signal = NULL, reason = NULL, updated_ms = ?5 WHERE sweep = ?1 AND id = ?2",
        )?
        .execute(params![a.sweep.as_str(), a.job.to_string(), worker.as_str(), host, to_i64(now_ms)])?;
        self.tx.prepare_cached(
            "INSERT OR REPLACE INTO attempts(sweep, job, attempt, worker, host, state, started_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
        )?
        .execute(params![a.sweep.as_str(), a.job.to_string(), a.attempt, worker.as_str(), host, to_i64(now_ms)])?;
        Ok(ClaimVerdict::Grant)
    }

    /// The code tree a sweep's jobs are bound to (`same_code`) and the sweep's queue; `None`
    /// for an unbound (or unknown) sweep.
    ///
    /// # Errors
    /// SQLite's.
    pub fn code_binding(&self, sweep: &SweepId) -> Result<Option<(String, String)>> {
        let row: Option<(bool, Option<String>)> = self
            .tx
            .prepare_cached("SELECT same_code, code_json FROM sweeps WHERE name = ?1")?
            .query_row(params![sweep.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((true, code)) = row else {
            return Ok(None);
        };
        let code: gridq_common::code::CodeVersion = parse_json(code.as_deref().unwrap_or(""))?;
        let queue = self
            .view()
            .sweep_record(sweep)?
            .map(|r| r.queue)
            .unwrap_or_default();
        Ok(Some((code.tree, queue)))
    }

    /// A claim of a job bound to other code than its worker's (see [`Tx::code_binding`]),
    /// for a job still waiting to start (`pending` or `queued`, attempt `a`): with
    /// `Some(delay)` it waits `delay_ms` in `retrying` (then goes out again as the next
    /// attempt, for a worker that holds its code), with `None` it fails with `reason`; neither
    /// counts as a failure or records an attempt. `false` when the job is not waiting (the
    /// ordinary claim answers it).
    ///
    /// # Errors
    /// SQLite's.
    pub fn wrong_code(
        &self,
        a: &AttemptRef,
        delay_ms: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let (sweep, id) = (a.sweep.as_str(), a.job.to_string());
        let n = match delay_ms {
            Some(delay) => self
                .tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'retrying', retry_at_ms = ?4, reason = ?5, worker = NULL, host = NULL,
                     started_ms = NULL, updated_ms = ?6
                     WHERE sweep = ?1 AND id = ?2 AND attempt = ?3 AND state IN ('pending', 'queued')",
                )?
                .execute(params![sweep, id, a.attempt, to_i64(now_ms.saturating_add(delay)), reason, to_i64(now_ms)])?,
            None => {
                let n = self
                    .tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'failed', finished_ms = ?4, reason = ?5, worker = NULL, host = NULL,
                         started_ms = NULL, exit_code = NULL, signal = NULL, retry_at_ms = NULL, updated_ms = ?4
                         WHERE sweep = ?1 AND id = ?2 AND attempt = ?3 AND state IN ('pending', 'queued')",
                    )?
                    .execute(params![sweep, id, a.attempt, to_i64(now_ms), reason])?;
                if n > 0 {
                    self.tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO results(sweep, job, attempt, result_json, stored_ms) VALUES (?1, ?2, ?3, NULL, ?4)",
                        )?
                        .execute(params![sweep, id, a.attempt, to_i64(now_ms)])?;
                }
                n
            }
        };
        Ok(n > 0)
    }

    /// A granted attempt its worker gives back unstarted: the lease ends and the same attempt
    /// is queued again (`pending` until the broker confirms it), with no attempt recorded.
    /// `Ok(None)` when the worker no longer holds it (a repeat, or a cancel came first).
    ///
    /// # Errors
    /// SQLite's.
    pub fn release(&self, a: &AttemptRef, worker: &str, now_ms: u64) -> Result<Option<Publish>> {
        let (sweep, id) = (a.sweep.as_str(), a.job.to_string());
        let n = self
            .tx
            .prepare_cached(
                "UPDATE jobs SET state = 'pending', worker = NULL, host = NULL, started_ms = NULL, updated_ms = ?5
                 WHERE sweep = ?1 AND id = ?2 AND attempt = ?3 AND state = 'running' AND worker = ?4",
            )?
            .execute(params![sweep, id, a.attempt, worker, to_i64(now_ms)])?;
        if n == 0 {
            return Ok(None);
        }
        self.tx
            .prepare_cached("DELETE FROM attempts WHERE sweep = ?1 AND job = ?2 AND attempt = ?3")?
            .execute(params![sweep, id, a.attempt])?;
        let Some(spec) = self.view().sweep_record(&a.sweep)? else {
            return Err(StoreError::Corrupt(format!(
                "job {} has no sweep `{sweep}`",
                a.job
            )));
        };
        Ok(Some(Publish {
            sweep: a.sweep.clone(),
            job: a.job,
            attempt: a.attempt,
            queue: spec.queue,
        }))
    }

    /// Records the end of an attempt.
    ///
    /// # Errors
    /// SQLite's.
    pub fn finish(
        &self,
        f: &Finished,
        max_retry_backoff_ms: u64,
        now_ms: u64,
    ) -> Result<FinishEffect> {
        let a = &f.attempt;
        let row: Option<(String, u32, u32, Option<String>)> = self
            .tx
            .prepare_cached(
                "SELECT j.state, j.attempt, j.failures, j.worker FROM jobs j JOIN sweeps s ON s.name = j.sweep
                 WHERE j.sweep = ?1 AND j.id = ?2",
            )?
            .query_row(params![a.sweep.as_str(), a.job.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((state, attempt, failures, holder)) = row else {
            self.duplicate(f, now_ms)?;
            return Ok(FinishEffect::Duplicate);
        };
        let state = JobState::from_str(&state).map_err(StoreError::Corrupt)?;
        let current = a.attempt == attempt
            && (state == JobState::Running && holder.as_deref() == Some(f.worker.as_str())
                || state == JobState::Canceled && f.outcome == Outcome::Canceled);
        if !current {
            self.duplicate(f, now_ms)?;
            return Ok(FinishEffect::Duplicate);
        }
        // The sweep's settings (queue, retries) only where the outcome needs them: not for a
        // success, the common case (they hold the sweep's whole YAML).
        let spec = || -> Result<SweepRecord> {
            self.view().sweep_record(&a.sweep)?.ok_or_else(|| {
                StoreError::Corrupt(format!("sweep {} is gone under its job", a.sweep))
            })
        };
        let result_json = f
            .result
            .as_ref()
            .map(|r| serde_json::Value::Object(r.clone()).to_string());
        let (attempt_state, effect) = match f.outcome {
            Outcome::Succeeded => ("succeeded", FinishEffect::Applied(JobState::Succeeded)),
            Outcome::Canceled => ("canceled", FinishEffect::Applied(JobState::Canceled)),
            Outcome::HandedBack => (
                "handed_back",
                FinishEffect::Requeue(Publish {
                    sweep: a.sweep.clone(),
                    job: a.job,
                    attempt: attempt + 1,
                    queue: spec()?.queue,
                }),
            ),
            Outcome::Failed | Outcome::TimedOut | Outcome::SpawnFailed => {
                let name = if f.outcome == Outcome::TimedOut {
                    "timed_out"
                } else {
                    "failed"
                };
                if f.outcome != Outcome::SpawnFailed && failures < spec()?.retries {
                    // Exponential backoff: 1 s, 2 s, 4 s, ... capped.
                    let backoff = 1000u64
                        .saturating_mul(1 << failures.min(20))
                        .min(max_retry_backoff_ms);
                    (
                        name,
                        FinishEffect::Retry {
                            at_ms: now_ms + backoff,
                        },
                    )
                } else if f.outcome == Outcome::TimedOut {
                    (name, FinishEffect::Applied(JobState::TimedOut))
                } else {
                    (name, FinishEffect::Applied(JobState::Failed))
                }
            }
        };
        // The host is the one the worker reports (deploy sets it to the host's address): the
        // claim only knew the worker's id, which may start with its broker user, and the
        // job's outputs are on the host the worker is on.
        self.tx.prepare_cached(
            "UPDATE attempts SET state = ?4, finished_ms = ?5, exit_code = ?6, signal = ?7, reason = ?8, gpus_json = ?9,
             started_ms = COALESCE(started_ms, ?10), code_json = ?11, outputs_json = ?12,
             host = COALESCE(NULLIF(?13, ''), host)
             WHERE sweep = ?1 AND job = ?2 AND attempt = ?3",
        )?
        .execute(params![
            a.sweep.as_str(),
            a.job.to_string(),
            a.attempt,
            attempt_state,
            to_i64(f.finished_ms),
            f.exit_code,
            f.signal,
            f.reason,
            serde_json::to_string(&f.gpus).unwrap_or_else(|_| "[]".into()),
            to_i64(f.started_ms),
            code_json(f),
            outputs_json(f),
            f.host
        ])?;
        match &effect {
            FinishEffect::Applied(new_state) => {
                self.tx.prepare_cached(
                    "UPDATE jobs SET state = ?3, finished_ms = ?4, exit_code = ?5, signal = ?6, reason = ?7,
                     started_ms = COALESCE(started_ms, ?8), updated_ms = ?9, host = COALESCE(NULLIF(?10, ''), host)
                     WHERE sweep = ?1 AND id = ?2",
                )?
                .execute(params![
                    a.sweep.as_str(),
                    a.job.to_string(),
                    new_state.as_str(),
                    to_i64(f.finished_ms),
                    f.exit_code,
                    f.signal,
                    f.reason,
                    to_i64(f.started_ms),
                    to_i64(now_ms),
                    f.host
                ])?;
                if *new_state != JobState::Canceled {
                    self.replace_metrics(a, f.result.as_ref())?;
                    self.tx.prepare_cached(
                        "INSERT OR REPLACE INTO results(sweep, job, attempt, result_json, stored_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![a.sweep.as_str(), a.job.to_string(), a.attempt, result_json, to_i64(now_ms)])?;
                }
            }
            FinishEffect::Retry { at_ms } => {
                self.tx.prepare_cached(
                    "UPDATE jobs SET state = 'retrying', failures = failures + 1, retry_at_ms = ?3, finished_ms = ?4,
                     exit_code = ?5, signal = ?6, reason = ?7, worker = NULL, updated_ms = ?8 WHERE sweep = ?1 AND id = ?2",
                )?
                .execute(params![
                    a.sweep.as_str(),
                    a.job.to_string(),
                    to_i64(*at_ms),
                    to_i64(f.finished_ms),
                    f.exit_code,
                    f.signal,
                    f.reason,
                    to_i64(now_ms)
                ])?;
            }
            FinishEffect::Requeue(p) => self.requeue(p, "handed back by its worker", now_ms)?,
            FinishEffect::Duplicate => {}
        }
        Ok(effect)
    }

    /// Replaces the job's sortable metrics (its result's top-level finite numbers) with those of
    /// `result`, removing the previous result's.
    fn replace_metrics(
        &self,
        a: &AttemptRef,
        result: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<()> {
        let id = a.job.to_string();
        let previous: Option<Option<String>> = self
            .tx
            .prepare_cached("SELECT result_json FROM results WHERE sweep = ?1 AND job = ?2")?
            .query_row(params![a.sweep.as_str(), id], |r| r.get(0))
            .optional()?;
        let metrics = |m: &serde_json::Map<String, serde_json::Value>| -> Vec<(String, f64)> {
            m.iter()
                .filter_map(|(k, v)| {
                    v.as_f64()
                        .filter(|f| f.is_finite())
                        .map(|f| (format!("m:{k}"), f))
                })
                .collect()
        };
        if let Some(Some(old)) = previous
            && let Ok(old) =
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&old)
        {
            let mut delete = self.tx.prepare_cached(
                "DELETE FROM job_values WHERE sweep = ?1 AND key = ?2 AND v = ?3 AND job = ?4",
            )?;
            for (key, v) in metrics(&old) {
                delete.execute(params![a.sweep.as_str(), key, v, id])?;
            }
        }
        if let Some(result) = result {
            let mut insert = self.tx.prepare_cached(
                "INSERT OR IGNORE INTO job_values(sweep, key, v, job) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (key, v) in metrics(result) {
                insert.execute(params![a.sweep.as_str(), key, v, id])?;
            }
        }
        Ok(())
    }

    fn requeue(&self, p: &Publish, reason: &str, now_ms: u64) -> Result<()> {
        self.tx.prepare_cached(
            "UPDATE jobs SET state = 'pending', attempt = ?3, worker = NULL, host = NULL, reason = ?4, retry_at_ms = NULL,
             updated_ms = ?5 WHERE sweep = ?1 AND id = ?2",
        )?
        .execute(params![p.sweep.as_str(), p.job.to_string(), p.attempt, reason, to_i64(now_ms)])?;
        Ok(())
    }

    fn duplicate(&self, f: &Finished, now_ms: u64) -> Result<()> {
        self.tx.prepare_cached(
            "INSERT INTO duplicate_results(sweep, job, attempt, worker, payload_json, received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            f.attempt.sweep.as_str(),
            f.attempt.job.to_string(),
            f.attempt.attempt,
            f.worker.as_str(),
            serde_json::to_string(f).unwrap_or_default(),
            to_i64(now_ms)
        ])?;
        // A late report of an attempt that ran (a worker thought lost): its outputs are on
        // that worker's host all the same, so the attempt keeps their listing and code
        // version (its first report's, never a later one's).
        if f.code.is_some() || f.outputs.is_some() {
            self.tx
                .prepare_cached(
                    "UPDATE attempts SET code_json = COALESCE(code_json, ?5), outputs_json = COALESCE(outputs_json, ?6),
                     host = COALESCE(NULLIF(?7, ''), host)
                     WHERE sweep = ?1 AND job = ?2 AND attempt = ?3 AND worker = ?4 AND outputs_json IS NULL",
                )?
                .execute(params![
                    f.attempt.sweep.as_str(),
                    f.attempt.job.to_string(),
                    f.attempt.attempt,
                    f.worker.as_str(),
                    code_json(f),
                    outputs_json(f),
                    f.host
                ])?;
        }
        Ok(())
    }

    /// A retry whose backoff ended: the next attempt, `pending`.
    ///
    /// # Errors
    /// SQLite's.
    pub fn retry_due(&self, a: &AttemptRef, now_ms: u64) -> Result<Option<Publish>> {
        let spec: Option<(String, u32)> = self
            .tx
            .prepare_cached(
                "SELECT s.spec_json, j.attempt FROM jobs j JOIN sweeps s ON s.name = j.sweep
                 WHERE j.sweep = ?1 AND j.id = ?2 AND j.state = 'retrying' AND j.attempt = ?3",
            )?
            .query_row(
                params![a.sweep.as_str(), a.job.to_string(), a.attempt],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((spec, attempt)) = spec else {
            return Ok(None);
        };
        let spec: SweepRecord = parse_json(&spec)?;
        let p = Publish {
            sweep: a.sweep.clone(),
            job: a.job,
            attempt: attempt + 1,
            queue: spec.queue,
        };
        self.requeue(&p, "retry", now_ms)?;
        Ok(Some(p))
    }

    /// The worker holding these attempts is gone: each runs again, unless it has now lost
    /// `max_lost` workers, in which case it fails with the reason.
    ///
    /// # Errors
    /// SQLite's.
    pub fn worker_lost(
        &self,
        worker: &str,
        why: &str,
        max_lost: u32,
        now_ms: u64,
    ) -> Result<Vec<LostEffect>> {
        let held = self.running_of("worker = ?1", params![worker])?;
        let mut out = Vec::new();
        for (_, a) in held {
            out.extend(self.lose_attempt(&a, worker, why, max_lost, now_ms)?);
        }
        self.tx
            .prepare_cached("UPDATE workers SET state = 'lost', reason = ?2 WHERE id = ?1 AND state != 'stopped'")?
            .execute(params![worker, why])?;
        Ok(out)
    }

    fn lose_attempt(
        &self,
        a: &AttemptRef,
        worker: &str,
        why: &str,
        max_lost: u32,
        now_ms: u64,
    ) -> Result<Option<LostEffect>> {
        let row: Option<(u32, String)> = self
            .tx
            .prepare_cached(
                "SELECT j.lost, s.spec_json FROM jobs j JOIN sweeps s ON s.name = j.sweep
                 WHERE j.sweep = ?1 AND j.id = ?2 AND j.attempt = ?3 AND j.state = 'running'",
            )?
            .query_row(
                params![a.sweep.as_str(), a.job.to_string(), a.attempt],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((lost, spec)) = row else {
            return Ok(None);
        };
        let spec: SweepRecord = parse_json(&spec)?;
        let reason = format!("worker {worker} lost ({why})");
        let (sweep, id) = (a.sweep.as_str(), a.job.to_string());
        self.tx
            .prepare_cached(
                "UPDATE attempts SET state = 'lost', finished_ms = ?4, reason = ?5 WHERE sweep = ?1 AND job = ?2 AND attempt = ?3",
            )?
            .execute(params![sweep, id, a.attempt, to_i64(now_ms), reason])?;
        if lost + 1 >= max_lost {
            let reason = format!(
                "its worker was lost {} times while running it (last: {reason}); it may be killing its worker (out of memory?)",
                lost + 1
            );
            self.tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'failed', lost = lost + 1, finished_ms = ?3, reason = ?4, updated_ms = ?3
                     WHERE sweep = ?1 AND id = ?2",
                )?
                .execute(params![sweep, id, to_i64(now_ms), reason])?;
            self.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO results(sweep, job, attempt, result_json, stored_ms) VALUES (?1, ?2, ?3, NULL, ?4)",
                )?
                .execute(params![sweep, id, a.attempt, to_i64(now_ms)])?;
            return Ok(Some(LostEffect::Failed(a.clone())));
        }
        self.tx
            .prepare_cached("UPDATE jobs SET lost = lost + 1 WHERE sweep = ?1 AND id = ?2")?
            .execute(params![sweep, id])?;
        let p = Publish {
            sweep: a.sweep.clone(),
            job: a.job,
            attempt: a.attempt + 1,
            queue: spec.queue,
        };
        self.requeue(&p, &reason, now_ms)?;
        Ok(Some(LostEffect::Requeue(p)))
    }

    /// Attempts the store says `worker` runs, granted before `granted_before_ms`, that its
    /// heartbeat does not list: the worker does not have them (it restarted under the same id,
    /// or lost them), so they run again like a lost worker's.
    ///
    /// # Errors
    /// SQLite's.
    pub fn reconcile(
        &self,
        worker: &str,
        listed: &[AttemptRef],
        granted_before_ms: u64,
        max_lost: u32,
        now_ms: u64,
    ) -> Result<Vec<LostEffect>> {
        let held = self.running_of(
            "worker = ?1 AND started_ms < ?2",
            params![worker, to_i64(granted_before_ms)],
        )?;
        let missing: Vec<AttemptRef> = held
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| !listed.contains(a))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for a in missing {
            out.extend(self.lose_attempt(
                &a,
                worker,
                "its worker no longer runs it",
                max_lost,
                now_ms,
            )?);
        }
        Ok(out)
    }

    /// A job message the broker dead-lettered: if it is the current attempt and was never
    /// granted, the job fails with the reason.
    ///
    /// # Errors
    /// SQLite's.
    pub fn job_dead_lettered(&self, a: &AttemptRef, reason: &str, now_ms: u64) -> Result<bool> {
        let n = self
            .tx
            .prepare_cached(
                "UPDATE jobs SET state = 'failed', reason = ?4, finished_ms = ?5, updated_ms = ?5
             WHERE sweep = ?1 AND id = ?2 AND attempt = ?3 AND state IN ('pending', 'queued')",
            )?
            .execute(params![
                a.sweep.as_str(),
                a.job.to_string(),
                a.attempt,
                reason,
                to_i64(now_ms)
            ])?;
        if n > 0 {
            self.tx.prepare_cached(
                "INSERT OR REPLACE INTO results(sweep, job, attempt, result_json, stored_ms) VALUES (?1, ?2, ?3, NULL, ?4)",
            )?
            .execute(params![a.sweep.as_str(), a.job.to_string(), a.attempt, to_i64(now_ms)])?;
        }
        Ok(n > 0)
    }

    /// Records a dead-lettered message.
    ///
    /// # Errors
    /// SQLite's.
    pub fn dead_letter(
        &self,
        queue: &str,
        kind: Option<&str>,
        reason: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<()> {
        let shown: String = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
        self.tx.prepare_cached(
            "INSERT INTO dead_letters(queue, kind, reason, body, received_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![queue, kind, reason, shown, to_i64(now_ms)])?;
        Ok(())
    }

    /// Cancels a whole sweep. Returns the running attempts to kill, with their workers.
    ///
    /// # Errors
    /// SQLite's.
    pub fn cancel_sweep(
        &self,
        sweep: &SweepId,
        now_ms: u64,
    ) -> Result<(u64, Vec<(String, AttemptRef)>)> {
        self.cancel_sweep_because(sweep, "canceled", now_ms)
    }

    /// [`Tx::cancel_sweep`] with the reason its jobs show.
    ///
    /// # Errors
    /// SQLite's.
    pub fn cancel_sweep_because(
        &self,
        sweep: &SweepId,
        reason: &str,
        now_ms: u64,
    ) -> Result<(u64, Vec<(String, AttemptRef)>)> {
        self.tx
            .prepare_cached("UPDATE sweeps SET canceled = 1, updated_ms = ?2 WHERE name = ?1")?
            .execute(params![sweep.as_str(), to_i64(now_ms)])?;
        let running = self.running_of("sweep = ?1", params![sweep.as_str()])?;
        let n = self
            .tx
            .prepare_cached(
                "UPDATE jobs SET state = 'canceled', reason = ?3, finished_ms = ?2, updated_ms = ?2
             WHERE sweep = ?1 AND state IN ('pending', 'queued', 'running', 'retrying')",
            )?
            .execute(params![sweep.as_str(), to_i64(now_ms), reason])?;
        self.cancel_attempts(&running, now_ms)?;
        Ok((n as u64, running))
    }

    /// Cancels one job. `Ok(None)` when it had already finished (nothing changes).
    ///
    /// # Errors
    /// SQLite's.
    pub fn cancel_job(
        &self,
        sweep: &SweepId,
        job: &JobId,
        now_ms: u64,
    ) -> Result<Option<Vec<(String, AttemptRef)>>> {
        let running = self.running_of(
            "sweep = ?1 AND id = ?2",
            params![sweep.as_str(), job.to_string()],
        )?;
        let n = self.tx.prepare_cached(
            "UPDATE jobs SET state = 'canceled', reason = 'canceled', finished_ms = ?3, updated_ms = ?3
             WHERE sweep = ?1 AND id = ?2 AND state IN ('pending', 'queued', 'running', 'retrying')",
        )?
        .execute(params![sweep.as_str(), job.to_string(), to_i64(now_ms)])?;
        self.cancel_attempts(&running, now_ms)?;
        Ok((n > 0).then_some(running))
    }

    /// Leased attempts of canceled jobs end `canceled` now: a worker holding one that has not
    /// started drops it and reports nothing. One that runs is killed, and its report then
    /// fills in how it ended.
    fn cancel_attempts(&self, leased: &[(String, AttemptRef)], now_ms: u64) -> Result<()> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE attempts SET state = 'canceled', reason = 'canceled', finished_ms = ?4
             WHERE sweep = ?1 AND job = ?2 AND attempt = ?3 AND state = 'running'",
        )?;
        for (_, a) in leased {
            stmt.execute(params![
                a.sweep.as_str(),
                a.job.to_string(),
                a.attempt,
                to_i64(now_ms)
            ])?;
        }
        Ok(())
    }

    fn running_of(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<(String, AttemptRef)>> {
        let sql = format!(
            "SELECT worker, sweep, id, attempt FROM jobs WHERE state = 'running' AND {filter}"
        );
        attempts_with_worker(self.tx, &sql, args)
    }

    /// Retries the failed (and timed-out) jobs of a sweep: a new attempt each.
    ///
    /// # Errors
    /// SQLite's.
    pub fn retry_failed(&self, sweep: &SweepId, now_ms: u64) -> Result<Vec<Publish>> {
        self.retry_where(sweep, None, now_ms)
    }

    /// Runs one failed, timed-out or canceled job again as a new attempt of the same job id.
    /// `Ok(None)` when the job is in another state (nothing changes).
    ///
    /// # Errors
    /// SQLite's.
    pub fn retry_job(&self, sweep: &SweepId, job: &JobId, now_ms: u64) -> Result<Option<Publish>> {
        Ok(self.retry_where(sweep, Some(job), now_ms)?.pop())
    }

    fn retry_where(
        &self,
        sweep: &SweepId,
        job: Option<&JobId>,
        now_ms: u64,
    ) -> Result<Vec<Publish>> {
        let Some(spec) = self.view().sweep_record(sweep)? else {
            return Ok(Vec::new());
        };
        let rows: Vec<(String, u32)> = {
            let mut stmt = self.tx.prepare_cached(
                "SELECT id, attempt FROM jobs WHERE sweep = ?1 AND
                 (?2 IS NULL AND state IN ('failed', 'timed_out')
                  OR id = ?2 AND state IN ('failed', 'timed_out', 'canceled'))",
            )?;
            let rows = stmt
                .query_map(params![sweep.as_str(), job.map(ToString::to_string)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (id, attempt) in rows {
            let p = Publish {
                sweep: sweep.clone(),
                job: parse_id(&id)?,
                attempt: attempt + 1,
                queue: spec.queue.clone(),
            };
            self.tx
                .prepare_cached(
                    "UPDATE jobs SET failures = 0, lost = 0 WHERE sweep = ?1 AND id = ?2",
                )?
                .execute(params![sweep.as_str(), id])?;
            self.requeue(&p, "retried by the user", now_ms)?;
            out.push(p);
        }
        Ok(out)
    }

    /// Stores output lines (idempotent per sequence number).
    ///
    /// # Errors
    /// SQLite's.
    pub fn output(&self, a: &AttemptRef, first_seq: u64, lines: &[LogLine]) -> Result<()> {
        let mut stmt = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO logs(sweep, job, attempt, seq, stream, line, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let job = a.job.to_string();
        for (i, l) in lines.iter().enumerate() {
            let stream = match l.stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            stmt.execute(params![
                a.sweep.as_str(),
                job,
                a.attempt,
                to_i64(first_seq + i as u64),
                stream,
                l.line,
                to_i64(l.ts_ms)
            ])?;
        }
        Ok(())
    }

    /// Records a heartbeat (or a clean stop, with `state = "stopped"`).
    ///
    /// # Errors
    /// SQLite's.
    pub fn worker_seen(
        &self,
        id: &str,
        host: &str,
        state: &str,
        reason: Option<&str>,
        info: &serde_json::Value,
        now_ms: u64,
    ) -> Result<()> {
        self.tx.prepare_cached(
            "INSERT INTO workers(id, host, state, reason, info_json, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT(id) DO UPDATE SET host = ?2, state = ?3, reason = ?4,
             info_json = CASE WHEN ?5 = 'null' THEN info_json ELSE ?5 END, last_seen_ms = ?6",
        )?
        .execute(params![id, host, state, reason, info.to_string(), to_i64(now_ms)])?;
        Ok(())
    }
}

/// Collects the rows of a query that selected [`JOB_COLUMNS`] through [`job_row`].
fn job_rows(
    rows: impl Iterator<Item = rusqlite::Result<(JobRowRaw, Option<String>)>>,
) -> Result<Vec<JobRow>> {
    rows.map(|row| {
        let (raw, result) = row?;
        raw.into_row(result)
    })
    .collect()
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(JobRowRaw, Option<String>)> {
    Ok((
        JobRowRaw {
            sweep: r.get(0)?,
            id: r.get(1)?,
            index: r.get(2)?,
            state: r.get(3)?,
            attempt: r.get(4)?,
            argv: r.get(5)?,
            params: r.get(6)?,
            worker: r.get(7)?,
            host: r.get(8)?,
            started_ms: r.get(9)?,
            finished_ms: r.get(10)?,
            exit_code: r.get(11)?,
            signal: r.get(12)?,
            reason: r.get(13)?,
            code: r.get(15)?,
        },
        r.get(14)?,
    ))
}

struct JobRowRaw {
    sweep: String,
    id: String,
    index: i64,
    state: String,
    attempt: u32,
    argv: String,
    params: String,
    worker: Option<String>,
    host: Option<String>,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<String>,
    code: Option<String>,
}

impl JobRowRaw {
    fn into_row(self, result: Option<String>) -> Result<JobRow> {
        Ok(JobRow {
            sweep: parse_sweep(&self.sweep)?,
            id: parse_id(&self.id)?,
            index: u64::try_from(self.index).unwrap_or(0),
            state: JobState::from_str(&self.state).map_err(StoreError::Corrupt)?,
            attempt: self.attempt,
            argv: parse_json(&self.argv)?,
            params: parse_json(&self.params)?,
            worker: self.worker,
            host: self.host,
            started_ms: opt_u64(self.started_ms),
            finished_ms: opt_u64(self.finished_ms),
            exit_code: self.exit_code,
            signal: self.signal,
            reason: self.reason,
            result: result.map(|r| parse_json(&r)).transpose()?,
            code: parse_reported(self.code),
        })
    }
}

/// The columns of a [`JobRow`]. The code version is the latest attempt's that has one (a
/// backwards step on the attempts' primary key).
const JOB_COLUMNS: &str =
    "j.sweep, j.id, j.idx, j.state, j.attempt, j.argv_json, j.params_json, j.worker, j.host,
    j.started_ms, j.finished_ms, j.exit_code, j.signal, j.reason, r.result_json,
    (SELECT a.code_json FROM attempts a WHERE a.sweep = j.sweep AND a.job = j.id
     AND a.code_json IS NOT NULL ORDER BY a.attempt DESC LIMIT 1)";

impl ReadView<'_> {
    /// Every sweep with its counts by state, newest first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn sweeps(&self) -> Result<Vec<SweepSummary>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, created_ms, updated_ms, canceled, code_json, same_code FROM sweeps ORDER BY created_ms DESC, name")?;
        type Row = (String, i64, i64, bool, Option<String>, bool);
        let rows: Vec<Row> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, created, updated, canceled, code, same_code) in rows {
            let id = parse_sweep(&name)?;
            let counts = self.counts(&id)?;
            out.push(SweepSummary {
                total: counts.values().sum(),
                last_finished_ms: self.last_finished(&id)?,
                name: id,
                created_ms: opt_u64(Some(created)).unwrap_or(0),
                updated_ms: opt_u64(Some(updated)).unwrap_or(0),
                counts,
                canceled,
                code: code.as_deref().map(parse_json).transpose()?,
                same_code,
            });
        }
        Ok(out)
    }

    /// One sweep's summary.
    ///
    /// # Errors
    /// SQLite's.
    pub fn sweep(&self, name: &SweepId) -> Result<Option<SweepSummary>> {
        let row: Option<(i64, i64, bool, Option<String>, bool)> = self
            .conn
            .prepare_cached("SELECT created_ms, updated_ms, canceled, code_json, same_code FROM sweeps WHERE name = ?1")?
            .query_row([name.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?;
        let Some((created, updated, canceled, code, same_code)) = row else {
            return Ok(None);
        };
        let counts = self.counts(name)?;
        Ok(Some(SweepSummary {
            total: counts.values().sum(),
            last_finished_ms: self.last_finished(name)?,
            name: name.clone(),
            created_ms: opt_u64(Some(created)).unwrap_or(0),
            updated_ms: opt_u64(Some(updated)).unwrap_or(0),
            counts,
            canceled,
            code: code.as_deref().map(parse_json).transpose()?,
            same_code,
        }))
    }

    /// When the sweep's last job finished (one probe of the finish-time index).
    fn last_finished(&self, sweep: &SweepId) -> Result<Option<u64>> {
        let ms: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT max(finished_ms) FROM jobs WHERE sweep = ?1 AND finished_ms IS NOT NULL",
            )?
            .query_row([sweep.as_str()], |r| r.get(0))?;
        Ok(opt_u64(ms))
    }

    /// Job counts by state for a sweep.
    ///
    /// # Errors
    /// SQLite's.
    pub fn counts(&self, sweep: &SweepId) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, n FROM sweep_counts WHERE sweep = ?1 AND n > 0")?;
        let rows = stmt.query_map([sweep.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (state, n) = row?;
            out.insert(state, u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    /// The jobs of a sweep (optionally in one state), in expansion order.
    ///
    /// # Errors
    /// SQLite's.
    pub fn jobs(
        &self,
        sweep: Option<&SweepId>,
        state: Option<JobState>,
        limit: u64,
        offset: u64,
    ) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
             WHERE (?1 IS NULL OR j.sweep = ?1) AND (?2 IS NULL OR j.state = ?2)
             ORDER BY j.sweep, j.idx LIMIT ?3 OFFSET ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![
                sweep.map(SweepId::as_str),
                state.map(JobState::as_str),
                to_i64(limit),
                to_i64(offset)
            ],
            job_row,
        )?;
        let out = job_rows(rows)?;
        Ok(out)
    }

    /// Jobs whose id starts with `prefix` (for `gridq logs <id prefix>`), at most `limit`.
    ///
    /// # Errors
    /// SQLite's.
    pub fn find_jobs(&self, prefix: &str, limit: u64) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
             WHERE j.id >= ?1 AND j.id < ?1 || 'g' ORDER BY j.sweep, j.idx LIMIT ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![prefix.to_ascii_lowercase(), to_i64(limit)], job_row)?;
        let out = job_rows(rows)?;
        Ok(out)
    }

    /// One job.
    ///
    /// # Errors
    /// SQLite's.
    pub fn job(&self, sweep: &SweepId, id: &JobId) -> Result<Option<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
             WHERE j.sweep = ?1 AND j.id = ?2"
        );
        let found = self
            .conn
            .prepare_cached(&sql)?
            .query_row(params![sweep.as_str(), id.to_string()], job_row)
            .optional()?;
        found.map(|(raw, result)| raw.into_row(result)).transpose()
    }

    /// A job's attempts, oldest first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn attempts(&self, sweep: &SweepId, id: &JobId) -> Result<Vec<AttemptRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT attempt, worker, host, gpus_json, state, started_ms, finished_ms, exit_code, signal, reason,
             code_json, outputs_json
             FROM attempts WHERE sweep = ?1 AND job = ?2 ORDER BY attempt",
        )?;
        let rows = stmt.query_map(params![sweep.as_str(), id.to_string()], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<i32>>(7)?,
                r.get::<_, Option<i32>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
                r.get::<_, Option<String>>(11)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                attempt,
                worker,
                host,
                gpus,
                state,
                started,
                finished,
                exit_code,
                signal,
                reason,
                code,
                outputs,
            ) = row?;
            out.push(AttemptRow {
                attempt,
                worker,
                host,
                gpus: parse_json(&gpus)?,
                state,
                started_ms: opt_u64(started),
                finished_ms: opt_u64(finished),
                exit_code,
                signal,
                reason,
                code: parse_reported(code),
                outputs: parse_reported(outputs),
            });
        }
        Ok(out)
    }

    /// Where the outputs of a sweep's jobs are, in expansion order after the `(index, id)`
    /// cursor: at most `limit` jobs are looked at, of which those in `states` (any, when
    /// empty) are returned, with the cursor of the next page (`None` after the last).
    ///
    /// # Errors
    /// SQLite's.
    pub fn job_outputs_after(
        &self,
        sweep: &SweepId,
        states: &[JobState],
        after: Option<JobCursor>,
        limit: u64,
    ) -> Result<(Vec<JobOutputs>, Option<JobCursor>)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, idx, state FROM jobs
             WHERE sweep = ?1 AND (?2 IS NULL OR (idx, id) > (?2, ?3)) ORDER BY idx, id LIMIT ?4",
        )?;
        let rows: Vec<(String, i64, String)> = stmt
            .query_map(
                params![
                    sweep.as_str(),
                    after.map(|(i, _)| to_i64(i)),
                    after.map(|(_, id)| id.to_string()),
                    to_i64(limit)
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?
            .collect::<Result<_, _>>()?;
        let mut next = None;
        let mut out = Vec::new();
        for (id, idx, state) in &rows {
            let id = parse_id(id)?;
            let index = u64::try_from(*idx).unwrap_or(0);
            next = Some((index, id));
            let state = JobState::from_str(state).map_err(StoreError::Corrupt)?;
            if !states.is_empty() && !states.contains(&state) {
                continue;
            }
            let attempts = self.attempts(sweep, &id)?;
            let holder = AttemptRow::output_holder(&attempts);
            out.push(JobOutputs {
                id,
                index,
                state,
                attempt: holder.map(|a| a.attempt),
                host: holder.and_then(|a| a.host.clone()),
                worker: holder.and_then(|a| a.worker.clone()),
                outputs: holder.and_then(|a| a.outputs.clone()),
            });
        }
        if (rows.len() as u64) < limit {
            next = None;
        }
        Ok((out, next))
    }

    /// Log lines of a job (all attempts, or one), from `after_seq` on.
    ///
    /// # Errors
    /// SQLite's.
    pub fn logs(
        &self,
        sweep: &SweepId,
        id: &JobId,
        attempt: Option<u32>,
        limit: u64,
    ) -> Result<Vec<(u32, u64, LogLine)>> {
        self.logs_after(sweep, id, attempt, (0, 0), limit)
    }

    /// Output lines after the `(attempt, seq)` cursor, in order, at most `limit`.
    ///
    /// # Errors
    /// SQLite's.
    pub fn logs_after(
        &self,
        sweep: &SweepId,
        id: &JobId,
        attempt: Option<u32>,
        after: (u32, u64),
        limit: u64,
    ) -> Result<Vec<(u32, u64, LogLine)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT attempt, seq, stream, line, ts_ms FROM logs WHERE sweep = ?1 AND job = ?2 AND (?3 IS NULL OR attempt = ?3)
             AND (attempt, seq) > (?5, ?6) ORDER BY attempt, seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![
                sweep.as_str(),
                id.to_string(),
                attempt,
                to_i64(limit),
                after.0,
                to_i64(after.1)
            ],
            |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (attempt, seq, stream, line, ts) = row?;
            out.push((
                attempt,
                opt_u64(Some(seq)).unwrap_or(0),
                LogLine {
                    stream: if stream == "stderr" {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    },
                    line,
                    ts_ms: opt_u64(Some(ts)).unwrap_or(0),
                },
            ));
        }
        Ok(out)
    }

    /// Number of duplicate results received for a job.
    ///
    /// # Errors
    /// SQLite's.
    pub fn duplicates(&self, sweep: &SweepId, id: &JobId) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM duplicate_results WHERE sweep = ?1 AND job = ?2",
            params![sweep.as_str(), id.to_string()],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Rows in the results table for a sweep (one per finished job).
    ///
    /// # Errors
    /// SQLite's.
    pub fn result_rows(&self, sweep: &SweepId) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM results WHERE sweep = ?1",
            [sweep.as_str()],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The sweep as stored.
    ///
    /// # Errors
    /// SQLite's.
    pub fn sweep_record(&self, name: &SweepId) -> Result<Option<SweepRecord>> {
        let spec: Option<String> = self
            .conn
            .prepare_cached("SELECT spec_json FROM sweeps WHERE name = ?1")?
            .query_row([name.as_str()], |r| r.get(0))
            .optional()?;
        spec.map(|s| parse_json(&s)).transpose()
    }

    /// The messages to publish for these attempts (an attempt whose job is gone has none).
    /// Each sweep's settings are read once per call: a submission publishes thousands of jobs
    /// of one sweep.
    ///
    /// # Errors
    /// SQLite's.
    pub fn job_messages(
        &self,
        publish: &[Publish],
    ) -> Result<Vec<(Publish, gridq_common::wire::JobMessage)>> {
        let mut records = SweepRecords::new(*self);
        let mut job = self.conn.prepare_cached(
            "SELECT argv_json, env_json, params_json FROM jobs WHERE sweep = ?1 AND id = ?2",
        )?;
        let mut out = Vec::with_capacity(publish.len());
        for p in publish {
            let row: Option<(String, String, String)> = job
                .query_row(params![p.sweep.as_str(), p.job.to_string()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let Some((argv, env, params_json)) = row else {
                continue;
            };
            let Some(spec) = records.get(&p.sweep)? else {
                continue;
            };
            let params: serde_json::Map<String, serde_json::Value> = parse_json(&params_json)?;
            let message = gridq_common::wire::JobMessage {
                sweep: p.sweep.clone(),
                job: p.job,
                attempt: p.attempt,
                argv: parse_json(&argv)?,
                env: parse_json(&env)?,
                params: params
                    .into_iter()
                    .map(|(k, v)| {
                        let text = match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (k, text)
                    })
                    .collect(),
                workdir: spec.workdir.clone(),
                timeout_ms: spec.timeout_ms,
                gpus: spec.gpus,
            };
            out.push((p.clone(), message));
        }
        Ok(out)
    }

    /// Workers, most recently seen first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT w.id, w.host, w.state, w.reason, w.info_json, w.first_seen_ms, w.last_seen_ms,
             COALESCE(c.processed, 0), COALESCE(c.failed, 0)
             FROM workers w LEFT JOIN worker_counts c ON c.worker = w.id ORDER BY w.last_seen_ms DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, host, state, reason, info, first, last, processed, failed) = row?;
            out.push(WorkerRow {
                id,
                host,
                state,
                reason,
                info: parse_json(&info)?,
                first_seen_ms: opt_u64(Some(first)).unwrap_or(0),
                last_seen_ms: opt_u64(Some(last)).unwrap_or(0),
                processed: opt_u64(Some(processed)).unwrap_or(0),
                failed: opt_u64(Some(failed)).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Dead-lettered messages, newest first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn dead_letters(&self, limit: u64) -> Result<Vec<DeadLetter>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT queue, kind, reason, body, received_ms FROM dead_letters ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([to_i64(limit)], |r| {
            Ok(DeadLetter {
                queue: r.get(0)?,
                kind: r.get(1)?,
                reason: r.get(2)?,
                body: r.get(3)?,
                received_ms: opt_u64(Some(r.get::<_, i64>(4)?)).unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SweepRecord {
        SweepRecord {
            name: SweepId::new(name).unwrap(),
            source: "s.yaml".into(),
            yaml: String::new(),
            param_names: vec!["x".into()],
            retries: 0,
            timeout_ms: None,
            gpus: 0,
            queue: "default".into(),
            workdir: None,
            code: None,
            same_code: false,
        }
    }

    fn job(i: u8) -> NewJob {
        NewJob {
            id: JobId::from_bytes([i; 16]),
            index: u64::from(i),
            argv: vec!["true".into()],
            params_json: format!("{{\"x\":{i}}}"),
            env: vec![],
            sort_values: vec![SortValue::Num(f64::from(i))],
        }
    }

    fn finished(worker: &WorkerId, attempt: AttemptRef, outcome: Outcome) -> Finished {
        Finished {
            worker: worker.clone(),
            host: "h".into(),
            attempt,
            outcome,
            exit_code: Some(i32::from(outcome != Outcome::Succeeded)),
            signal: None,
            started_ms: 2,
            finished_ms: 3,
            result: None,
            reason: None,
            gpus: vec![],
            lines: 0,
            code: None,
            outputs: None,
        }
    }

    /// The trigger-maintained counts always equal a GROUP BY over the jobs.
    fn check_counts(store: &Store, sweep: &SweepId) {
        let mut direct = std::collections::BTreeMap::new();
        let mut stmt = store
            .conn
            .prepare("SELECT state, COUNT(*) FROM jobs WHERE sweep = ?1 GROUP BY state")
            .unwrap();
        for row in stmt
            .query_map([sweep.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .unwrap()
        {
            let (state, n) = row.unwrap();
            direct.insert(state, n as u64);
        }
        assert_eq!(store.read().counts(sweep).unwrap(), direct);
    }

    #[test]
    fn counts_follow_every_transition() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let sweep = SweepId::new("s").unwrap();
        let worker = WorkerId::new("w").unwrap();
        let (summary, publish) = store
            .transaction(|tx| tx.submit(&record("s"), (0..5).map(job), false, 1))
            .unwrap();
        assert_eq!((summary.added, publish.len()), (5, 5));
        check_counts(&store, &sweep);
        store.transaction(|tx| tx.confirmed(&publish, 2)).unwrap();
        check_counts(&store, &sweep);
        let a = |i: u8| AttemptRef {
            sweep: sweep.clone(),
            job: JobId::from_bytes([i; 16]),
            attempt: 1,
        };
        assert_eq!(
            store
                .transaction(|tx| tx.claim(&a(0), &worker, "h", 3))
                .unwrap(),
            ClaimVerdict::Grant
        );
        assert_eq!(
            store
                .transaction(|tx| tx.claim(&a(1), &worker, "h", 3))
                .unwrap(),
            ClaimVerdict::Grant
        );
        // A second worker cannot take a running job; the same worker gets its grant again.
        let other = WorkerId::new("v").unwrap();
        assert_eq!(
            store
                .transaction(|tx| tx.claim(&a(0), &other, "h", 3))
                .unwrap(),
            ClaimVerdict::Deny("already running on w".into())
        );
        assert_eq!(
            store
                .transaction(|tx| tx.claim(&a(0), &worker, "h", 3))
                .unwrap(),
            ClaimVerdict::Grant
        );
        check_counts(&store, &sweep);
        let finished = Finished {
            worker: worker.clone(),
            host: "h".into(),
            attempt: a(0),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_ms: 3,
            finished_ms: 4,
            result: None,
            reason: None,
            gpus: vec![],
            lines: 0,
            code: None,
            outputs: None,
        };
        assert_eq!(
            store
                .transaction(|tx| tx.finish(&finished, 1000, 5))
                .unwrap(),
            FinishEffect::Applied(JobState::Succeeded)
        );
        // The same report again is a duplicate and changes nothing.
        assert_eq!(
            store
                .transaction(|tx| tx.finish(&finished, 1000, 6))
                .unwrap(),
            FinishEffect::Duplicate
        );
        assert_eq!(store.read().duplicates(&sweep, &a(0).job).unwrap(), 1);
        check_counts(&store, &sweep);
        let lost = store
            .transaction(|tx| tx.worker_lost("w", "test", 3, 7))
            .unwrap();
        assert_eq!(lost.len(), 1);
        check_counts(&store, &sweep);
        let (n, _) = store.transaction(|tx| tx.cancel_sweep(&sweep, 8)).unwrap();
        assert_eq!(n, 4);
        check_counts(&store, &sweep);
        let counts = store.read().counts(&sweep).unwrap();
        assert_eq!(counts.get("succeeded"), Some(&1));
        assert_eq!(counts.get("canceled"), Some(&4));
        // Cancelling a finished job changes nothing.
        assert_eq!(
            store
                .transaction(|tx| tx.cancel_job(&sweep, &a(0).job, 9))
                .unwrap(),
            None
        );
    }

    fn finish_all(store: &mut Store, sweep: &str, n: u8, at: u64, loss: impl Fn(u8) -> f64) {
        let id = SweepId::new(sweep).unwrap();
        let worker = WorkerId::new("w").unwrap();
        store
            .transaction(|tx| {
                for i in 0..n {
                    let a = AttemptRef {
                        sweep: id.clone(),
                        job: JobId::from_bytes([i; 16]),
                        attempt: 1,
                    };
                    tx.claim(&a, &worker, "h", at)?;
                    let mut result = serde_json::Map::new();
                    result.insert("loss".into(), serde_json::json!(loss(i)));
                    tx.finish(
                        &Finished {
                            worker: worker.clone(),
                            host: "h".into(),
                            attempt: a,
                            outcome: Outcome::Succeeded,
                            exit_code: Some(0),
                            signal: None,
                            started_ms: at,
                            finished_ms: at + 1,
                            result: Some(result),
                            reason: None,
                            gpus: vec![],
                            lines: 0,
                            code: None,
                            outputs: None,
                        },
                        1000,
                        at + 1,
                    )?;
                }
                Ok(())
            })
            .unwrap();
    }

    /// Retention deletes finished sweeps older than the cutoff, everything of them, and
    /// nothing of a sweep still running or touched since.
    #[test]
    fn job_messages_carry_each_sweeps_settings_and_skip_unknown_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let mut fast = record("fast");
        fast.timeout_ms = Some(5_000);
        fast.workdir = Some("exp/a".into());
        let mut gpu = record("gpu");
        gpu.gpus = 2;
        let mut with_env = job(7);
        with_env.argv = vec!["python".into(), "train.py".into(), "--x=7".into()];
        with_env.env = vec![("SEED".into(), "1".into())];
        with_env.params_json = r#"{"x":7,"name":"a b"}"#.into();
        let (_, mut publish) = store
            .transaction(|tx| tx.submit(&fast, [with_env, job(1)], false, 1))
            .unwrap();
        let (_, more) = store
            .transaction(|tx| tx.submit(&gpu, [job(2)], false, 1))
            .unwrap();
        publish.extend(more);
        publish.insert(
            1,
            Publish {
                sweep: SweepId::new("fast").unwrap(),
                job: JobId::from_bytes([9; 16]),
                attempt: 1,
                queue: "default".into(),
            },
        );
        let messages = store.read().job_messages(&publish).unwrap();
        let jobs: Vec<(String, JobId)> = messages
            .iter()
            .map(|(p, m)| {
                assert_eq!(
                    (p.sweep.clone(), p.job, p.attempt),
                    (m.sweep.clone(), m.job, m.attempt)
                );
                (m.sweep.to_string(), m.job)
            })
            .collect();
        let id = |i: u8| JobId::from_bytes([i; 16]);
        assert_eq!(
            jobs,
            [
                ("fast".into(), id(7)),
                ("fast".into(), id(1)),
                ("gpu".into(), id(2))
            ]
        );
        let first = &messages[0].1;
        assert_eq!(first.argv, ["python", "train.py", "--x=7"]);
        assert_eq!(first.env, [("SEED".to_owned(), "1".to_owned())]);
        assert_eq!(
            first.params,
            [
                ("name".to_owned(), "a b".to_owned()),
                ("x".to_owned(), "7".to_owned())
            ]
        );
        assert_eq!(
            (first.workdir.as_deref(), first.timeout_ms, first.gpus),
            (Some("exp/a"), Some(5_000), 0)
        );
        let last = &messages[2].1;
        assert_eq!(
            (last.workdir.as_deref(), last.timeout_ms, last.gpus),
            (None, None, 2)
        );
    }

    #[test]
    fn a_store_with_jobs_keyed_by_id_is_rebuilt_in_expansion_order_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let sweep = SweepId::new("s").unwrap();
        let a = |i: u8| AttemptRef {
            sweep: sweep.clone(),
            job: JobId::from_bytes([i; 16]),
            attempt: 1,
        };
        let w = WorkerId::new("w").unwrap();
        let mut store = Store::open(&path).unwrap();
        // Expansion order differs from id order: job 5 first.
        store
            .transaction(|tx| tx.submit(&record("s"), [5, 1, 3, 0, 2, 4].map(job), false, 1))
            .unwrap();
        store
            .transaction(|tx| {
                tx.claim(&a(1), &w, "h", 2)?;
                tx.claim(&a(3), &w, "h", 2)?;
                tx.finish(&finished(&w, a(3), Outcome::Succeeded), 1000, 3)
            })
            .unwrap();
        let rows = |store: &Store| -> Vec<String> {
            let mut stmt = store
                .conn
                .prepare(&format!(
                    "SELECT json_array({JOBS_COLUMNS}) FROM jobs ORDER BY sweep, id"
                ))
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let before = rows(&store);
        let counts_before = store.read().counts(&sweep).unwrap();
        drop(store);

        // The older layout: the same rows in a table keyed by sweep and id, with the old
        // indexes and triggers (made by opening it as it was).
        let conn = Connection::open(&path).unwrap();
        let old_table = JOBS_TABLE
            .replace(
                "updated_ms INTEGER NOT NULL\n)",
                "updated_ms INTEGER NOT NULL,\n    PRIMARY KEY(sweep, id)\n) WITHOUT ROWID",
            )
            .replace(
                "CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs(sweep, id);",
                "",
            )
            .replace("TABLE IF NOT EXISTS jobs(", "TABLE jobs(");
        assert!(old_table.contains("WITHOUT ROWID"), "{old_table}");
        conn.execute_batch(&format!(
            "DROP TRIGGER jobs_count_insert; DROP TRIGGER jobs_count_update; DROP TRIGGER jobs_count_delete;
             ALTER TABLE jobs RENAME TO jobs_new_layout;
             {old_table}
             INSERT INTO jobs({JOBS_COLUMNS}) SELECT {JOBS_COLUMNS} FROM jobs_new_layout;
             DROP TABLE jobs_new_layout;
             {SCHEMA}"
        ))
        .unwrap();
        drop(conn);

        let mut store = Store::open(&path).unwrap();
        let sql: String = store
            .conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'jobs'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
        assert_eq!(rows(&store), before);
        assert_eq!(store.read().counts(&sweep).unwrap(), counts_before);
        // Stored in expansion order.
        let order: Vec<i64> = store
            .conn
            .prepare("SELECT idx FROM jobs ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
        // Its indexes and triggers are back, and the store works on.
        let mut names: Vec<String> = store
            .conn
            .prepare("SELECT name FROM sqlite_schema WHERE tbl_name = 'jobs' AND type IN ('index', 'trigger') ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        names.retain(|n| !n.starts_with("sqlite_autoindex"));
        assert_eq!(
            names,
            [
                "jobs_by_id",
                "jobs_by_sweep_idx",
                "jobs_by_worker",
                "jobs_count_delete",
                "jobs_count_insert",
                "jobs_count_update",
                "jobs_duration",
                "jobs_finished",
                "jobs_key",
                "jobs_state_duration",
                "jobs_state_finished",
                "jobs_state_order",
                "jobs_sweep_state_order"
            ]
        );
        store
            .transaction(|tx| tx.finish(&finished(&w, a(1), Outcome::Succeeded), 1000, 4))
            .unwrap();
        check_counts(&store, &sweep);
        assert_eq!(
            store.read().counts(&sweep).unwrap().get("succeeded"),
            Some(&2)
        );
        let err = store
            .conn
            .execute(
                "INSERT INTO jobs(sweep, id, idx, argv_json, params_json, env_json, state, attempt, updated_ms)
                 SELECT sweep, id, 9, argv_json, params_json, env_json, state, attempt, updated_ms FROM jobs LIMIT 1",
                [],
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("UNIQUE constraint failed"),
            "{err}"
        );
        // Opening again changes nothing.
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.read().counts(&sweep).unwrap().get("succeeded"),
            Some(&2)
        );
    }

    #[test]
    fn worker_counts_count_ended_attempts_and_failures_also_in_a_reopened_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // Opened twice: the second open recreates the trigger on an existing store.
        drop(Store::open(&path).unwrap());
        let mut store = Store::open(&path).unwrap();
        let sweep = SweepId::new("s").unwrap();
        let (w, v) = (WorkerId::new("w").unwrap(), WorkerId::new("v").unwrap());
        store
            .transaction(|tx| tx.submit(&record("s"), (0..6).map(job), false, 1))
            .unwrap();
        let a = |i: u8| AttemptRef {
            sweep: sweep.clone(),
            job: JobId::from_bytes([i; 16]),
            attempt: 1,
        };
        let report = |worker: &WorkerId, i: u8, outcome: Outcome| finished(worker, a(i), outcome);
        store
            .transaction(|tx| {
                for i in 0..5 {
                    tx.claim(&a(i), &w, "h", 2)?;
                }
                tx.claim(&a(5), &v, "h", 2)?;
                tx.finish(&report(&w, 0, Outcome::Succeeded), 1000, 3)?;
                tx.finish(&report(&w, 1, Outcome::Failed), 1000, 3)?;
                tx.finish(&report(&w, 2, Outcome::TimedOut), 1000, 3)?;
                // Handed back: not an ended attempt of this worker's.
                tx.finish(&report(&w, 3, Outcome::HandedBack), 1000, 3)?;
                Ok(())
            })
            .unwrap();
        let counts = |store: &Store| -> Vec<(String, u64, u64)> {
            let mut c: Vec<_> = store
                .read()
                .workers()
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.processed, r.failed))
                .collect();
            c.sort();
            c
        };
        store
            .transaction(|tx| {
                let info = serde_json::json!({});
                tx.worker_seen("w", "h", "online", None, &info, 3)?;
                tx.worker_seen("v", "h", "online", None, &info, 3)
            })
            .unwrap();
        assert_eq!(counts(&store), [("v".into(), 0, 0), ("w".into(), 3, 2)]);
        // Lost counts as a failure; canceled as processed, not failed.
        store
            .transaction(|tx| tx.worker_lost("w", "test", 3, 4))
            .unwrap();
        store.transaction(|tx| tx.cancel_sweep(&sweep, 5)).unwrap();
        assert_eq!(counts(&store), [("v".into(), 1, 0), ("w".into(), 4, 3)]);
    }

    #[test]
    fn retention_purges_only_old_finished_sweeps() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        for name in ["old", "busy", "recent"] {
            store
                .transaction(|tx| tx.submit(&record(name), (0..3).map(job), false, 10))
                .unwrap();
        }
        finish_all(&mut store, "old", 3, 20, f64::from);
        finish_all(&mut store, "busy", 2, 20, f64::from);
        finish_all(&mut store, "recent", 3, 2_000, f64::from);
        let purged = store
            .transaction(|tx| tx.purge_finished_sweeps(1_000))
            .unwrap();
        assert_eq!(purged, vec!["old".to_owned()]);
        let left: Vec<String> = store
            .read()
            .sweeps()
            .unwrap()
            .into_iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(left.len(), 2);
        assert!(!left.contains(&"old".to_owned()));
        for table in [
            "jobs",
            "attempts",
            "results",
            "logs",
            "job_values",
            "sweep_counts",
        ] {
            let n: i64 = store
                .conn
                .query_row(
                    &format!("SELECT count(*) FROM {table} WHERE sweep = 'old'"),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 0, "{table}");
        }
        // Idempotent.
        assert!(
            store
                .transaction(|tx| tx.purge_finished_sweeps(1_000))
                .unwrap()
                .is_empty()
        );
    }

    /// A state filter most jobs pass is applied after the candidates are chosen, and the
    /// pages are the same as with the filter in place, to the last one.
    #[test]
    fn a_late_state_filter_gives_the_same_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        store
            .transaction(|tx| tx.submit(&record("a"), (0..200).map(job), false, 1))
            .unwrap();
        finish_all(&mut store, "a", 150, 5, f64::from);
        for (offset, descending, want) in [
            (0, false, (0..50).collect::<Vec<u8>>()),
            (100, false, (100..150).collect()),
            (140, false, (140..150).collect()),
            (0, true, (100..150).rev().collect()),
            (120, true, (0..30).rev().collect()),
        ] {
            let q = JobQuery {
                sweep: SweepId::new("a").unwrap(),
                states: vec![JobState::Succeeded],
                params: vec![],
                text: None,
                sort: SortKey::Metric("loss".into()),
                descending,
                limit: 50,
                offset,
            };
            let (rows, count) = store.read().query_jobs(&q).unwrap();
            let got: Vec<u8> = rows.iter().map(|r| r.id.as_bytes()[0]).collect();
            assert_eq!(got, want, "offset {offset}, descending {descending}");
            assert!(rows.iter().all(|r| r.state == JobState::Succeeded));
            assert_eq!(count.count, 150);
        }
    }

    /// A read past its time limit is stopped, and the reader works again afterwards.
    #[test]
    fn a_read_past_its_time_limit_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _store = Store::open(&path).unwrap();
        let reader = Store::reader(&path).unwrap();
        let limit = std::time::Duration::from_millis(200);
        let started = std::time::Instant::now();
        let slow = reader.within(limit, |r| {
            Ok(r.conn.query_row(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
                [],
                |row| row.get::<_, i64>(0),
            )?)
        });
        assert!(
            matches!(slow, Err(StoreError::TooSlow(l)) if l == limit),
            "{slow:?}"
        );
        // Stopped near the limit (generously bounded: only that it stops at all matters).
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        let fast = reader.within(limit, |r| {
            Ok(r.conn
                .query_row("SELECT 42", [], |row| row.get::<_, i64>(0))?)
        });
        assert_eq!(fast.unwrap(), 42);
        // Outside `within`, nothing is stopped.
        assert_eq!(
            reader
                .conn
                .query_row("SELECT count(*) FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) SELECT i FROM n)", [], |row| row.get::<_, i64>(0))
                .unwrap(),
            100_000
        );
    }

    /// Every listing the monitor offers for one state or none reads its page straight off an
    /// index: no step scans a table, and none sorts the sweep's jobs (a sort of a million jobs
    /// took seconds per page); only a parameter filter's matches are sorted.
    #[test]
    fn every_listing_reads_its_page_off_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        for name in ["a", "b"] {
            store
                .transaction(|tx| tx.submit(&record(name), (0..200).map(job), false, 1))
                .unwrap();
            // Three quarters finish: a state filter is then not redundant.
            finish_all(&mut store, name, 150, 5, f64::from);
        }
        store.refresh_statistics().unwrap();
        let sorts = [
            SortKey::Index,
            SortKey::State,
            SortKey::Finished,
            SortKey::Duration,
            SortKey::Param("x".into()),
            SortKey::Metric("loss".into()),
        ];
        for sort in sorts {
            for states in [vec![], vec![JobState::Succeeded], vec![JobState::Queued]] {
                for descending in [false, true] {
                    for params in [vec![], vec![("x".to_owned(), "7".to_owned())]] {
                        // A parameter filter starts from its matches and sorts them: work
                        // bounded by the matches, whatever the order.
                        let sorts_matches = !params.is_empty();
                        let q = JobQuery {
                            sweep: SweepId::new("a").unwrap(),
                            states: states.clone(),
                            params,
                            text: None,
                            sort: sort.clone(),
                            descending,
                            limit: 50,
                            offset: 0,
                        };
                        let plan = store.read().explain_jobs(&q).unwrap();
                        assert!(
                            !plan
                                .iter()
                                // (`SCAN p` reads the chosen page, 50 rows.)
                                .any(|l| (l.starts_with("SCAN ") && l != "SCAN p")
                                    || (l.contains("TEMP B-TREE") && !sorts_matches)),
                            "{q:?}:\n{}",
                            plan.join("\n")
                        );
                    }
                }
            }
        }
    }

    /// A new result replaces the job's sortable metrics; sorting reads them as numbers.
    #[test]
    fn metrics_follow_the_latest_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        store
            .transaction(|tx| tx.submit(&record("m"), (0..4).map(job), false, 1))
            .unwrap();
        finish_all(&mut store, "m", 4, 5, |i| {
            [10.0, 2.0, 33.0, 4.0][usize::from(i)]
        });
        let q = JobQuery {
            sweep: SweepId::new("m").unwrap(),
            states: vec![],
            params: vec![],
            text: None,
            sort: SortKey::Metric("loss".into()),
            descending: false,
            limit: 10,
            offset: 0,
        };
        let order = |store: &Store| -> Vec<u64> {
            let (rows, count) = store.read().query_jobs(&q).unwrap();
            assert_eq!(count.count, rows.len() as u64);
            rows.iter().map(|r| r.index).collect()
        };
        assert_eq!(order(&store), vec![1, 3, 0, 2]);
        // Job 2 runs again (rerun) with a smaller loss: its old metric is gone.
        store
            .transaction(|tx| tx.submit(&record("m"), (0..4).map(job), true, 50))
            .unwrap();
        let id = SweepId::new("m").unwrap();
        let worker = WorkerId::new("w").unwrap();
        store
            .transaction(|tx| {
                let a = AttemptRef {
                    sweep: id.clone(),
                    job: JobId::from_bytes([2; 16]),
                    attempt: 2,
                };
                tx.claim(&a, &worker, "h", 60)?;
                let mut result = serde_json::Map::new();
                result.insert("loss".into(), serde_json::json!(0.5));
                tx.finish(
                    &Finished {
                        worker: worker.clone(),
                        host: "h".into(),
                        attempt: a,
                        outcome: Outcome::Succeeded,
                        exit_code: Some(0),
                        signal: None,
                        started_ms: 60,
                        finished_ms: 61,
                        result: Some(result),
                        reason: None,
                        gpus: vec![],
                        lines: 0,
                        code: None,
                        outputs: None,
                    },
                    1000,
                    61,
                )
            })
            .unwrap();
        assert_eq!(order(&store), vec![2, 1, 3, 0]);
        assert_eq!(
            store.read().metric_names(&id).unwrap(),
            vec!["loss".to_owned()]
        );
    }

    #[test]
    fn pending_lists_unconfirmed_attempts_with_their_sweeps_queue_in_expansion_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let mut gpu = record("gpu");
        gpu.queue = "gpu".into();
        let (_, a) = store
            .transaction(|tx| tx.submit(&record("cpu"), (1..=3).map(job), false, 1))
            .unwrap();
        let (_, b) = store
            .transaction(|tx| tx.submit(&gpu, [job(5), job(4)], false, 1))
            .unwrap();
        // The second job of `cpu` is confirmed on the broker: no longer pending.
        store.transaction(|tx| tx.confirmed(&a[1..2], 2)).unwrap();
        let listed: Vec<(String, u8, u32, String)> = store
            .pending_after(None, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, p)| (p.sweep.to_string(), p.job.as_bytes()[0], p.attempt, p.queue))
            .collect();
        assert_eq!(
            listed,
            [
                ("cpu".into(), 1, 1, "default".into()),
                ("cpu".into(), 3, 1, "default".into()),
                ("gpu".into(), 4, 1, "gpu".into()),
                ("gpu".into(), 5, 1, "gpu".into()),
            ]
        );
        assert_eq!(b.len(), 2);
    }

    fn listing(dir: &str, files: &[(&str, u64)]) -> OutputListing {
        OutputListing {
            dir: dir.into(),
            files: files
                .iter()
                .map(|(n, size)| gridq_common::wire::OutputFile {
                    name: (*n).into(),
                    size: *size,
                })
                .collect(),
            truncated: false,
        }
    }

    fn code(tree: &str) -> CodeVersion {
        CodeVersion {
            tree: tree.into(),
            commit: Some("0123456789abcdef0123".into()),
            dirty: Some(true),
        }
    }

    #[test]
    fn the_code_label_is_short_and_says_commit_and_dirtiness() {
        assert_eq!(
            code_label(&code("blake3:3f2a9c1e0b7d55aa")),
            "3f2a9c1e0b7d@0123456789ab+dirty"
        );
        let clean = CodeVersion {
            tree: "abc".into(),
            commit: Some("def".into()),
            dirty: Some(false),
        };
        assert_eq!(code_label(&clean), "abc@def");
        let no_git = CodeVersion {
            tree: "3f2a9c1e0b7d55aa".into(),
            commit: None,
            dirty: None,
        };
        assert_eq!(code_label(&no_git), "3f2a9c1e0b7d");
    }

    /// An attempt's code version and output listing are stored with its end; the job's
    /// outputs are on the host of the attempt that succeeded, else of the latest that ran; a
    /// late report of a lost attempt still records what that attempt left.
    #[test]
    fn attempts_keep_their_code_and_outputs_and_the_output_host_is_the_successful_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let sweep = SweepId::new("s").unwrap();
        let mut rec = record("s");
        rec.retries = 3;
        let (_, publish) = store
            .transaction(|tx| tx.submit(&rec, (0..2).map(job), false, 1))
            .unwrap();
        store.transaction(|tx| tx.confirmed(&publish, 2)).unwrap();
        let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
        let a = |i: u8, n: u32| AttemptRef {
            sweep: sweep.clone(),
            job: JobId::from_bytes([i; 16]),
            attempt: n,
        };
        // Job 0: attempt 1 fails on h1, attempt 2 succeeds on h2.
        store
            .transaction(|tx| tx.claim(&a(0, 1), &w1, "h1", 3))
            .unwrap();
        let mut failed = finished(&w1, a(0, 1), Outcome::Failed);
        failed.host = "h1".into();
        failed.code = Some(code("aaaa"));
        failed.outputs = Some(listing("/p/.gridq/out/s/00", &[("partial.txt", 1)]));
        assert!(matches!(
            store.transaction(|tx| tx.finish(&failed, 1000, 4)).unwrap(),
            FinishEffect::Retry { .. }
        ));
        store
            .transaction(|tx| tx.retry_due(&a(0, 1), 10_000))
            .unwrap()
            .unwrap();
        store
            .transaction(|tx| tx.confirmed(&[store_publish(&sweep, 0, 2)], 10_001))
            .unwrap();
        assert_eq!(
            store
                .transaction(|tx| tx.claim(&a(0, 2), &w2, "user.h2", 10_002))
                .unwrap(),
            ClaimVerdict::Grant
        );
        let mut ok = finished(&w2, a(0, 2), Outcome::Succeeded);
        ok.host = "h2".into();
        ok.code = Some(code("bbbb"));
        ok.outputs = Some(listing("/p/.gridq/out/s/00", &[("out.txt", 5), ("m/x", 7)]));
        store
            .transaction(|tx| tx.finish(&ok, 1000, 10_003))
            .unwrap();
        let view = store.read();
        let attempts = view.attempts(&sweep, &a(0, 1).job).unwrap();
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].code, Some(code("aaaa")));
        assert_eq!(attempts[1].outputs, ok.outputs);
        let holder = AttemptRow::output_holder(&attempts).unwrap();
        assert_eq!((holder.attempt, holder.host.as_deref()), (2, Some("h2")));
        // The job row (listings, the CSV) carries the latest attempt's code.
        let row = view.job(&sweep, &a(0, 1).job).unwrap().unwrap();
        assert_eq!(row.code, Some(code("bbbb")));
        // The host is the one the worker reported, not the one its id suggested at the claim.
        assert_eq!(row.host.as_deref(), Some("h2"));

        // Job 1: its worker is lost, then its late report comes: a duplicate, whose listing
        // the lost attempt keeps.
        store
            .transaction(|tx| tx.claim(&a(1, 1), &w1, "h1", 3))
            .unwrap();
        store
            .transaction(|tx| tx.worker_lost("w1", "test", 3, 20_000))
            .unwrap();
        let mut late = finished(&w1, a(1, 1), Outcome::Succeeded);
        late.host = "h1".into();
        late.outputs = Some(listing("/p/.gridq/out/s/01", &[("late.txt", 2)]));
        assert_eq!(
            store
                .transaction(|tx| tx.finish(&late, 1000, 20_001))
                .unwrap(),
            FinishEffect::Duplicate
        );
        let (all, next) = store
            .read()
            .job_outputs_after(&sweep, &[], None, 10)
            .unwrap();
        assert_eq!(next, None);
        assert_eq!(all.len(), 2);
        assert_eq!(
            (
                all[0].attempt,
                all[0].host.as_deref(),
                all[0].outputs.as_ref().map(|o| o.files.len())
            ),
            (Some(2), Some("h2"), Some(2))
        );
        assert_eq!(
            (
                all[1].attempt,
                all[1].host.as_deref(),
                all[1].outputs.as_ref().map(|o| o.files[0].name.as_str())
            ),
            (Some(1), Some("h1"), Some("late.txt"))
        );
        // Paged, and filtered by state.
        let (page, next) = store
            .read()
            .job_outputs_after(&sweep, &[], None, 1)
            .unwrap();
        assert_eq!((page.len(), next), (1, Some((0, a(0, 1).job))));
        let (page, next) = store
            .read()
            .job_outputs_after(&sweep, &[], next, 1)
            .unwrap();
        assert_eq!((page[0].id, next), (a(1, 1).job, Some((1, a(1, 1).job))));
        let (page, next) = store
            .read()
            .job_outputs_after(&sweep, &[], next, 1)
            .unwrap();
        assert_eq!((page.len(), next), (0, None));
        let (succeeded, _) = store
            .read()
            .job_outputs_after(&sweep, &[JobState::Succeeded], None, 10)
            .unwrap();
        assert_eq!(succeeded.len(), 1);
    }

    fn store_publish(sweep: &SweepId, i: u8, attempt: u32) -> Publish {
        Publish {
            sweep: sweep.clone(),
            job: JobId::from_bytes([i; 16]),
            attempt,
            queue: "default".into(),
        }
    }

    /// A sweep bound to its code names its tree; a job refused for other code waits in
    /// `retrying` and goes out again as its next attempt, or fails with the reason; neither
    /// records an attempt, and only a waiting job is touched.
    #[test]
    fn a_job_refused_for_other_code_waits_or_fails_without_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let mut bound = record("s");
        bound.code = Some(code("abcd"));
        bound.same_code = true;
        let (_, publish) = store
            .transaction(|tx| tx.submit(&bound, (0..2).map(job), false, 1))
            .unwrap();
        store.transaction(|tx| tx.confirmed(&publish, 2)).unwrap();
        let sweep = SweepId::new("s").unwrap();
        let (a, b) = (publish[0].clone(), publish[1].clone());
        let at = |p: &Publish| AttemptRef {
            sweep: sweep.clone(),
            job: p.job,
            attempt: p.attempt,
        };
        store
            .transaction(|tx| {
                assert_eq!(
                    tx.code_binding(&sweep)?,
                    Some(("abcd".to_owned(), "default".to_owned()))
                );
                assert!(tx.wrong_code(&at(&a), Some(500), "wait", 10)?);
                assert!(tx.wrong_code(&at(&b), None, "code mismatch: gone", 10)?);
                // Neither waits any more: a repeat changes nothing.
                assert!(!tx.wrong_code(&at(&b), Some(500), "wait", 11)?);
                Ok(())
            })
            .unwrap();
        let row = |id: &JobId| store.read().job(&sweep, id).unwrap().unwrap();
        let waiting = row(&a.job);
        assert_eq!(
            (waiting.state, waiting.reason.as_deref()),
            (JobState::Retrying, Some("wait"))
        );
        let failed = row(&b.job);
        assert_eq!(
            (failed.state, failed.reason.as_deref(), failed.worker),
            (JobState::Failed, Some("code mismatch: gone"), None)
        );
        assert!(store.due_retries(509).unwrap().is_empty());
        assert_eq!(store.due_retries(510).unwrap(), [at(&a)]);
        let again = store.transaction(|tx| tx.retry_due(&at(&a), 510)).unwrap();
        assert_eq!(again.map(|p| p.attempt), Some(a.attempt + 1));
        for p in [&a, &b] {
            assert!(store.read().attempts(&sweep, &p.job).unwrap().is_empty());
        }
    }

    /// A store made before attempts had `code_json` and `outputs_json` gains them when it is
    /// opened, keeps its rows, and records both from then on; a read-only open of it before
    /// that says what to do.
    #[test]
    fn a_store_of_the_older_schema_gains_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let old_schema = SCHEMA.replace("    code_json TEXT,\n    outputs_json TEXT,\n", "");
        assert_ne!(old_schema, SCHEMA);
        let old_sweeps = SCHEMA.replace(
            ",\n    code_json TEXT,\n    same_code INTEGER NOT NULL DEFAULT 0\n);",
            "\n);",
        );
        assert_ne!(old_sweeps, SCHEMA);
        {
            let mut store = Store::open(&path).unwrap();
            let (_, publish) = store
                .transaction(|tx| tx.submit(&record("s"), (0..1).map(job), false, 1))
                .unwrap();
            store.transaction(|tx| tx.confirmed(&publish, 2)).unwrap();
            let a = AttemptRef {
                sweep: SweepId::new("s").unwrap(),
                job: JobId::from_bytes([0; 16]),
                attempt: 1,
            };
            store
                .transaction(|tx| tx.claim(&a, &WorkerId::new("w").unwrap(), "h", 3))
                .unwrap();
            // Back to the old table: the same rows without the two columns.
            store
                .conn
                .execute_batch(&format!(
                    "ALTER TABLE attempts RENAME TO attempts_new;
                     {}
                     INSERT INTO attempts SELECT sweep, job, attempt, worker, host, gpus_json, state,
                         started_ms, finished_ms, exit_code, signal, reason FROM attempts_new;
                     DROP TABLE attempts_new;",
                    old_schema
                        .split(";\n")
                        .find(|stmt| stmt.contains("CREATE TABLE IF NOT EXISTS attempts("))
                        .unwrap()
                        .to_owned()
                        + ";"
                ))
                .unwrap();
            // And the old sweeps table, without the sweep's code columns.
            store
                .conn
                .execute_batch(&format!(
                    "ALTER TABLE sweeps RENAME TO sweeps_new;
                     {}
                     INSERT INTO sweeps SELECT name, source, yaml, spec_json, canceled, created_ms,
                         updated_ms FROM sweeps_new;
                     DROP TABLE sweeps_new;",
                    old_sweeps
                        .split(";\n")
                        .find(|stmt| stmt.contains("CREATE TABLE IF NOT EXISTS sweeps("))
                        .unwrap()
                        .to_owned()
                        + ";"
                ))
                .unwrap();
        }
        let columns = |conn: &Connection| -> Vec<String> {
            conn.prepare("SELECT name FROM pragma_table_info('attempts')")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert!(!columns(&Connection::open(&path).unwrap()).contains(&"code_json".to_owned()));
        let err = Store::read_only(&path).unwrap_err().to_string();
        assert!(err.contains("made by an older gridq"), "{err}");

        let mut store = Store::open(&path).unwrap();
        let cols = columns(&store.conn);
        assert!(
            cols.ends_with(&["code_json".to_owned(), "outputs_json".to_owned()]),
            "{cols:?}"
        );
        let sweep = SweepId::new("s").unwrap();
        let a = AttemptRef {
            sweep: sweep.clone(),
            job: JobId::from_bytes([0; 16]),
            attempt: 1,
        };
        let before = store.read().attempts(&sweep, &a.job).unwrap();
        assert_eq!(
            (before.len(), &before[0].code, &before[0].outputs),
            (1, &None, &None)
        );
        let mut f = finished(&WorkerId::new("w").unwrap(), a.clone(), Outcome::Succeeded);
        f.code = Some(code("cccc"));
        f.outputs = Some(listing("/d", &[("a", 1)]));
        store.transaction(|tx| tx.finish(&f, 1000, 5)).unwrap();
        drop(store);
        // Opening again changes nothing more; a read-only reader sees what was recorded.
        drop(Store::open(&path).unwrap());
        let reader = Store::read_only(&path).unwrap();
        let after = reader.view().attempts(&sweep, &a.job).unwrap();
        assert_eq!((&after[0].code, &after[0].outputs), (&f.code, &f.outputs));
        // The old sweep reads as unbound, with no code at submission.
        let summary = reader.view().sweep(&sweep).unwrap().unwrap();
        assert_eq!((summary.code, summary.same_code), (None, false));
        let mut store = Store::open(&path).unwrap();
        assert_eq!(
            store.transaction(|tx| tx.code_binding(&sweep)).unwrap(),
            None
        );
    }
}
