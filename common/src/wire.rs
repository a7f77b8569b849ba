//! Messages that cross the broker, named by direction, and their envelope.
//!
//! Every message is a JSON body with two AMQP headers: `gridq-schema` (the schema version, an
//! integer) and `gridq-kind` (what the body is). A consumer checks both headers before it looks
//! at the body, so a message from a newer gridq, or no gridq at all, is refused with a reason
//! (and dead-lettered by the caller) instead of being half-understood. Fields added later carry
//! `#[serde(default)]`, so an older body still decodes.
//!
//! - [`JobMessage`]: master → workers, on a job queue (kind `job`); [`JobBatch`]: several of
//!   them in one message (kind `jobs`). [`decode_jobs`] reads either.
//! - [`FromWorker`]: workers → master, on the events queue (kinds `claim`, `output`,
//!   `finished`, `release`, `heartbeat`, `stopped`).
//! - [`ToWorker`]: master → one worker, on that worker's own queue (kinds `verdicts`,
//!   `cancel`, `drain`).
//!
//! Claims, verdicts and results carry lists: a worker claims every delivery it received
//! together in one message and reports the results that are ready together, and the master
//! answers each worker's claims of one transaction in one message.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::code::CodeVersion;
use crate::{JobId, SweepId, WorkerId};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 2;
/// Header carrying the schema version.
pub const HEADER_SCHEMA: &str = "gridq-schema";
/// Header carrying the message kind.
pub const HEADER_KIND: &str = "gridq-kind";
/// Header a consumer adds when it dead-letters a message it cannot use.
pub const HEADER_DEAD_REASON: &str = "gridq-dead-reason";

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// One job attempt to run. Master → workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub sweep: SweepId,
    pub job: JobId,
    /// 1 for the first run; each new attempt (retry, lost worker) adds one.
    pub attempt: u32,
    pub argv: Vec<String>,
    /// The job's own environment (the sweep's `env`, `GRIDQ_REPEAT`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Parameter name and rendered value, exported as `GRIDQ_PARAM_<NAME>`.
    #[serde(default)]
    pub params: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub gpus: u32,
}

/// Several job attempts in one message. Master → workers, on a job queue (kind `jobs`).
///
/// A worker claims and runs each attempt on its own, exactly as if it had come alone, and acks
/// the message once every attempt in it has started, been denied or been given back. The
/// broker's work is per message, not per byte (a quorum queue enqueues, delivers and settles
/// each message through its Raft log), so a batch costs it about what one job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobBatch {
    pub jobs: Vec<JobMessage>,
}

/// A reference to one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub sweep: SweepId,
    pub job: JobId,
    pub attempt: u32,
}

/// Workers → master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromWorker {
    /// A worker holds deliveries of these attempts and asks to run them.
    Claim(Claims),
    /// Output lines of a running attempt.
    Output(OutputBatch),
    /// Attempts ended.
    Finished(Results),
    /// Granted attempts the worker gives back unstarted (it has no free slot for them): they
    /// go back to the queue as the same attempt.
    Release(Release),
    /// The worker is alive; what it runs and what it has.
    Heartbeat(Box<Heartbeat>),
    /// The worker stopped cleanly.
    Stopped(Stopped),
}

impl FromWorker {
    /// The workers the message speaks for (a batch of results may name several).
    pub fn workers(&self) -> Vec<&WorkerId> {
        match self {
            FromWorker::Claim(c) => vec![&c.worker],
            FromWorker::Output(o) => vec![&o.worker],
            FromWorker::Finished(r) => r.results.iter().map(|f| &f.worker).collect(),
            FromWorker::Release(r) => vec![&r.worker],
            FromWorker::Heartbeat(h) => vec![&h.worker],
            FromWorker::Stopped(s) => vec![&s.worker],
        }
    }
}

/// Requests to run delivered attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub worker: WorkerId,
    pub claims: Vec<Claim>,
    /// The tree hash of the code the worker's project holds now (its `.gridq/code.json`), so
    /// the master can keep a sweep bound to its code (`same_code`) off other code.
    #[serde(default)]
    pub code: Option<String>,
}

/// A request to run one delivered attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    #[serde(flatten)]
    pub attempt: AttemptRef,
    /// Echoed in the verdict, so the worker can match it to the delivery it holds.
    pub token: u64,
}

/// The master's answer to one claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    #[serde(flatten)]
    pub attempt: AttemptRef,
    pub token: u64,
    /// Why not (canceled, already running or done elsewhere, superseded); `None`: granted,
    /// the master recorded the lease.
    #[serde(default)]
    pub deny: Option<String>,
}

/// Results that were ready together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub results: Vec<Finished>,
}

/// Granted attempts given back unstarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub worker: WorkerId,
    pub attempts: Vec<AttemptRef>,
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: Stream,
    pub line: String,
    pub ts_ms: u64,
}

/// A batch of output lines, numbered from `first_seq` so the master can store them idempotently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputBatch {
    pub worker: WorkerId,
    #[serde(flatten)]
    pub attempt: AttemptRef,
    pub first_seq: u64,
    pub lines: Vec<LogLine>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, or a signal the worker did not send.
    Failed,
    /// The sweep's `timeout` was exceeded.
    TimedOut,
    /// Killed because the job or sweep was canceled.
    Canceled,
    /// The worker stopped and gave the attempt back without a verdict.
    HandedBack,
    /// The program could not be started (not found, bad workdir, ...).
    SpawnFailed,
}

/// The end of one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub worker: WorkerId,
    pub host: String,
    #[serde(flatten)]
    pub attempt: AttemptRef,
    pub outcome: Outcome,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// The JSON object the job wrote to `GRIDQ_RESULT`.
    #[serde(default)]
    pub result: Option<serde_json::Map<String, serde_json::Value>>,
    /// Why a result file was ignored, or why the job could not start.
    #[serde(default)]
    pub reason: Option<String>,
    /// GPUs the attempt was pinned to.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Output lines sent for this attempt (so the master knows when the log is complete).
    #[serde(default)]
    pub lines: u64,
    /// The version of the project's code the attempt ran (`<project>/.gridq/code.json` when
    /// it started); `None` when the project has none, or from an older worker.
    #[serde(default)]
    pub code: Option<CodeVersion>,
    /// What the job left in its output directory (`GRIDQ_OUTPUT`) when the attempt ended;
    /// `None` when it had none (it could not start), or from an older worker.
    #[serde(default)]
    pub outputs: Option<OutputListing>,
}

/// The files in a job's output directory (`GRIDQ_OUTPUT`), as the worker found them when an
/// attempt ended. The directory belongs to the job, not to one attempt: a later attempt on the
/// same host finds what an earlier one left there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputListing {
    /// The directory, an absolute path as the worker saw it (inside its container, for a
    /// deployed worker).
    pub dir: String,
    /// Regular files under it (links are not followed), by name relative to it, sorted; at
    /// most [`OutputListing::MAX_FILES`].
    #[serde(default)]
    pub files: Vec<OutputFile>,
    /// There were more files than are listed.
    #[serde(default)]
    pub truncated: bool,
}

impl OutputListing {
    /// The most files a listing names.
    pub const MAX_FILES: usize = 1000;
    /// The most bytes of names a listing carries (then it is truncated).
    pub const MAX_NAME_BYTES: usize = 128 * 1024;

    /// The listed files' total size in bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// One file of an [`OutputListing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the output directory, `/`-separated (bytes that are not UTF-8 replaced).
    pub name: String,
    /// In bytes.
    pub size: u64,
}

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStat {
    pub index: u32,
    pub name: String,
    pub utilization: f64,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
}

/// A worker's periodic sign of life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker: WorkerId,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub slots: u32,
    pub queues: Vec<String>,
    pub running: Vec<AttemptRef>,
    pub cpus: u32,
    #[serde(default)]
    pub load1: f64,
    #[serde(default)]
    pub mem_total_mb: u64,
    #[serde(default)]
    pub mem_used_mb: u64,
    #[serde(default)]
    pub gpus: Vec<GpuStat>,
    #[serde(default)]
    pub draining: bool,
    /// It reads job messages that carry several jobs (kind `jobs`).
    #[serde(default)]
    pub reads_batches: bool,
    /// Its recent jobs were short, so it holds jobs ahead: several jobs per message suit it.
    #[serde(default)]
    pub short_jobs: bool,
    pub ts_ms: u64,
    /// Seconds between heartbeats, so the master can judge when one is missed.
    pub interval_ms: u64,
    /// The tree hash of the code the worker's project holds now (see [`Claims::code`]).
    #[serde(default)]
    pub code: Option<String>,
}

/// A worker's clean stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    pub worker: WorkerId,
    pub reason: String,
    /// Attempts it stopped without finishing; the master runs them again without counting a
    /// failure.
    #[serde(default)]
    pub handed_back: Vec<AttemptRef>,
}

/// Master → one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToWorker {
    /// The answers to claims.
    Verdicts { verdicts: Vec<Verdict> },
    /// Kill this running attempt (sent by older masters; read for a rolling update).
    Cancel {
        #[serde(flatten)]
        attempt: AttemptRef,
    },
    /// Kill these attempts where they run, and drop those held but not started. A cancel's
    /// attempts on one worker come in one message, so the worker applies them all before a
    /// slot that killing one of them frees can start another.
    Cancels { attempts: Vec<AttemptRef> },
    /// Stop taking jobs and exit once the running ones are done.
    Drain,
}

/// A message type with a kind header.
pub trait Kind {
    /// The `gridq-kind` header value of this message.
    fn kind(&self) -> &'static str;
    /// Every kind this type decodes.
    const KINDS: &'static [&'static str];
}

impl Kind for JobMessage {
    fn kind(&self) -> &'static str {
        "job"
    }
    const KINDS: &'static [&'static str] = &["job"];
}

impl Kind for JobBatch {
    fn kind(&self) -> &'static str {
        "jobs"
    }
    const KINDS: &'static [&'static str] = &["jobs"];
}

impl Kind for FromWorker {
    fn kind(&self) -> &'static str {
        match self {
            Self::Claim(_) => "claim",
            Self::Output(_) => "output",
            Self::Finished(_) => "finished",
            Self::Release(_) => "release",
            Self::Heartbeat(_) => "heartbeat",
            Self::Stopped(_) => "stopped",
        }
    }
    const KINDS: &'static [&'static str] = &[
        "claim",
        "output",
        "finished",
        "release",
        "heartbeat",
        "stopped",
    ];
}

impl Kind for ToWorker {
    fn kind(&self) -> &'static str {
        match self {
            Self::Verdicts { .. } => "verdicts",
            Self::Cancel { .. } => "cancel",
            Self::Cancels { .. } => "cancels",
            Self::Drain => "drain",
        }
    }
    const KINDS: &'static [&'static str] = &["verdicts", "cancel", "cancels", "drain"];
}

/// Why a message was refused. Never worth retrying: the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing header `{HEADER_SCHEMA}`")]
    MissingSchema,
    #[error("unknown schema version {found} (this gridq reads version {SCHEMA_VERSION})")]
    UnknownSchema { found: String },
    #[error("missing header `{HEADER_KIND}`")]
    MissingKind,
    #[error("unexpected message kind `{found}` (expected one of: {expected})")]
    UnexpectedKind { found: String, expected: String },
    #[error("invalid `{kind}` body: {message}")]
    Body { kind: String, message: String },
}

/// The body and properties of a message ready to publish.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Encodes a message with its headers, as a persistent JSON message.
pub fn encode<T: Serialize + Kind>(message: &T) -> Encoded {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_SCHEMA),
        AMQPValue::LongUInt(SCHEMA_VERSION),
    );
    headers.insert(
        ShortString::from(HEADER_KIND),
        AMQPValue::LongString(message.kind().into()),
    );
    // Serializing these types cannot fail: no maps with non-string keys, no custom errors.
    let body = serde_json::to_vec(message).unwrap_or_default();
    Encoded {
        body,
        properties: BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers),
    }
}

/// Reads the kind header, after checking the schema version.
pub fn kind_of(properties: &BasicProperties) -> Result<String, DecodeError> {
    let headers = properties.headers().as_ref();
    let schema = headers
        .and_then(|h| h.inner().get(HEADER_SCHEMA))
        .ok_or(DecodeError::MissingSchema)?;
    let version = match schema {
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        _ => None,
    };
    if version != Some(u64::from(SCHEMA_VERSION)) {
        return Err(DecodeError::UnknownSchema {
            found: version.map_or_else(|| format!("{schema:?}"), |v| v.to_string()),
        });
    }
    let kind = headers
        .and_then(|h| h.inner().get(HEADER_KIND))
        .ok_or(DecodeError::MissingKind)?;
    match kind {
        AMQPValue::LongString(s) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Ok(s.as_str().to_owned()),
        other => Ok(format!("{other:?}")),
    }
}

/// Decodes a message: headers first, then the body, whose own kind must match the header.
pub fn decode<T: DeserializeOwned + Kind>(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<T, DecodeError> {
    let kind = kind_of(properties)?;
    if !T::KINDS.contains(&kind.as_str()) {
        return Err(DecodeError::UnexpectedKind {
            found: kind.chars().take(64).collect(),
            expected: T::KINDS.join(", "),
        });
    }
    let message: T = serde_json::from_slice(body).map_err(|e| DecodeError::Body {
        kind: kind.clone(),
        message: e.to_string(),
    })?;
    if message.kind() != kind {
        return Err(DecodeError::Body {
            message: format!("the body is a `{}` message", message.kind()),
            kind,
        });
    }
    Ok(message)
}

/// Decodes a message of a job queue, `job` or `jobs`, into the attempts it carries (at least
/// one).
pub fn decode_jobs(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Vec<JobMessage>, DecodeError> {
    match kind_of(properties)?.as_str() {
        "job" => decode::<JobMessage>(properties, body).map(|job| vec![job]),
        "jobs" => {
            let batch = decode::<JobBatch>(properties, body)?;
            if batch.jobs.is_empty() {
                return Err(DecodeError::Body {
                    kind: "jobs".into(),
                    message: "the batch carries no jobs".into(),
                });
            }
            Ok(batch.jobs)
        }
        other => Err(DecodeError::UnexpectedKind {
            found: other.chars().take(64).collect(),
            expected: "job, jobs".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt() -> AttemptRef {
        AttemptRef {
            sweep: SweepId::new("s").unwrap(),
            job: JobId::from_bytes([7; 16]),
            attempt: 1,
        }
    }

    #[test]
    fn round_trip_with_headers() {
        let msg = FromWorker::Claim(Claims {
            worker: WorkerId::new("w1").unwrap(),
            claims: vec![Claim {
                attempt: attempt(),
                token: 9,
            }],
            code: Some("ab".repeat(32)),
        });
        let enc = encode(&msg);
        assert_eq!(kind_of(&enc.properties).unwrap(), "claim");
        assert_eq!(
            decode::<FromWorker>(&enc.properties, &enc.body).unwrap(),
            msg
        );
        let json: serde_json::Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(json["kind"], "claim");
        assert_eq!(json["claims"][0]["job"], "07".repeat(16));
    }

    #[test]
    fn refuses_unknown_schema_kind_and_bad_bodies() {
        let enc = encode(&ToWorker::Drain);
        let mut props = enc.properties.clone();
        let mut headers = props.headers().clone().unwrap();
        headers.insert(HEADER_SCHEMA.into(), AMQPValue::LongUInt(9));
        props = props.with_headers(headers);
        assert_eq!(
            decode::<ToWorker>(&props, &enc.body)
                .unwrap_err()
                .to_string(),
            "unknown schema version 9 (this gridq reads version 2)"
        );
        assert_eq!(
            decode::<FromWorker>(&enc.properties, &enc.body)
                .unwrap_err()
                .to_string(),
            "unexpected message kind `drain` (expected one of: claim, output, finished, release, heartbeat, stopped)"
        );
        assert_eq!(
            decode::<ToWorker>(&BasicProperties::default(), b"{}").unwrap_err(),
            DecodeError::MissingSchema
        );
        let err = decode::<ToWorker>(&enc.properties, b"not json").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid `drain` body: "),
            "{err}"
        );
        // A body whose own kind disagrees with the header is refused.
        let verdicts = encode(&ToWorker::Verdicts {
            verdicts: vec![Verdict {
                attempt: attempt(),
                token: 1,
                deny: None,
            }],
        });
        let err = decode::<ToWorker>(&enc.properties, &verdicts.body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `drain` body: the body is a `verdicts` message"
        );
    }

    #[test]
    fn cancels_carry_every_attempt_and_the_single_cancel_still_decodes() {
        let other = AttemptRef {
            attempt: 2,
            ..attempt()
        };
        let enc = encode(&ToWorker::Cancels {
            attempts: vec![attempt(), other.clone()],
        });
        assert_eq!(kind_of(&enc.properties).unwrap(), "cancels");
        assert_eq!(
            decode::<ToWorker>(&enc.properties, &enc.body).unwrap(),
            ToWorker::Cancels {
                attempts: vec![attempt(), other]
            }
        );
        // What an older master sends.
        let single = encode(&ToWorker::Cancel { attempt: attempt() });
        assert_eq!(
            decode::<ToWorker>(&single.properties, &single.body).unwrap(),
            ToWorker::Cancel { attempt: attempt() }
        );
    }

    #[test]
    fn later_fields_default() {
        let body = br#"{"sweep":"s","job":"07070707070707070707070707070707","attempt":1,"argv":["true"]}"#;
        let enc = encode(&JobMessage {
            sweep: SweepId::new("s").unwrap(),
            job: JobId::from_bytes([7; 16]),
            attempt: 1,
            argv: vec!["true".into()],
            env: vec![],
            params: vec![],
            workdir: None,
            timeout_ms: None,
            gpus: 0,
        });
        let job: JobMessage = decode(&enc.properties, body).unwrap();
        assert_eq!(job.argv, ["true"]);
        assert_eq!(job.timeout_ms, None);
        // A heartbeat of an older worker: it takes no batches.
        let hb = br#"{"kind":"heartbeat","worker":"w1","host":"h","pid":1,"version":"0.1.0","slots":2,"queues":["default"],"running":[],"cpus":2,"ts_ms":1,"interval_ms":5000}"#;
        let enc = encode(&ToWorker::Drain);
        let mut props = enc.properties.clone();
        let mut headers = props.headers().clone().unwrap();
        headers.insert(
            HEADER_KIND.into(),
            AMQPValue::LongString("heartbeat".into()),
        );
        props = props.with_headers(headers);
        let FromWorker::Heartbeat(hb) = decode::<FromWorker>(&props, hb).unwrap() else {
            panic!("not a heartbeat")
        };
        assert!(!hb.reads_batches && !hb.short_jobs);
    }

    #[test]
    fn a_finished_report_carries_code_and_outputs_and_an_older_one_still_decodes() {
        let headers = |kind: &str| {
            let enc = encode(&ToWorker::Drain);
            let mut headers = enc.properties.headers().clone().unwrap();
            headers.insert(HEADER_KIND.into(), AMQPValue::LongString(kind.into()));
            enc.properties.with_headers(headers)
        };
        // What a worker without these fields sends.
        let old = br#"{"kind":"finished","results":[{"worker":"w1","host":"h","sweep":"s","job":"07070707070707070707070707070707","attempt":1,"outcome":"succeeded","started_ms":1,"finished_ms":2}]}"#;
        let FromWorker::Finished(r) = decode::<FromWorker>(&headers("finished"), old).unwrap()
        else {
            panic!("not finished")
        };
        assert_eq!((&r.results[0].code, &r.results[0].outputs), (&None, &None));

        let mut finished = r.results[0].clone();
        finished.code = Some(CodeVersion {
            tree: "ab".repeat(32),
            commit: Some("cd".repeat(20)),
            dirty: Some(true),
        });
        finished.outputs = Some(OutputListing {
            dir: "/p/.gridq/out/s/07".into(),
            files: vec![OutputFile {
                name: "sub/out.txt".into(),
                size: 12,
            }],
            truncated: false,
        });
        let msg = FromWorker::Finished(Results {
            results: vec![finished],
        });
        let enc = encode(&msg);
        assert_eq!(
            decode::<FromWorker>(&enc.properties, &enc.body).unwrap(),
            msg
        );
        let json: serde_json::Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(
            json["results"][0]["outputs"]["files"][0]["name"],
            "sub/out.txt"
        );
        assert_eq!(json["results"][0]["code"]["dirty"], true);
    }

    fn job(n: u8) -> JobMessage {
        JobMessage {
            sweep: SweepId::new("s").unwrap(),
            job: JobId::from_bytes([n; 16]),
            attempt: 1,
            argv: vec!["true".into(), format!("--n={n}")],
            env: vec![],
            params: vec![("n".into(), n.to_string())],
            workdir: None,
            timeout_ms: None,
            gpus: 0,
        }
    }

    #[test]
    fn a_job_queue_message_carries_one_job_or_a_batch_and_nothing_else() {
        let one = encode(&job(1));
        assert_eq!(decode_jobs(&one.properties, &one.body).unwrap(), [job(1)]);
        let batch = encode(&JobBatch {
            jobs: vec![job(1), job(2), job(3)],
        });
        assert_eq!(kind_of(&batch.properties).unwrap(), "jobs");
        assert_eq!(
            decode_jobs(&batch.properties, &batch.body).unwrap(),
            [job(1), job(2), job(3)]
        );
        let empty = encode(&JobBatch { jobs: vec![] });
        assert_eq!(
            decode_jobs(&empty.properties, &empty.body)
                .unwrap_err()
                .to_string(),
            "invalid `jobs` body: the batch carries no jobs"
        );
        let other = encode(&ToWorker::Drain);
        assert_eq!(
            decode_jobs(&other.properties, &other.body)
                .unwrap_err()
                .to_string(),
            "unexpected message kind `drain` (expected one of: job, jobs)"
        );
        // A batch body under the single job's kind is refused, not half-read.
        assert!(decode_jobs(&one.properties, &batch.body).is_err());
    }
}
