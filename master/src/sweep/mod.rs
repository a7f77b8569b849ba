//! The sweep language: a YAML file that expands into the Cartesian product of jobs.
//!
//! # Layout
//! - [`yaml`]: an event-level YAML reader that keeps tags, scalar text and positions.
//! - [`de`]: a serde deserializer over that tree, for the typed options.
//! - [`value`]: core-schema scalars, exact decimals and intervals (range, linspace, geomspace).
//! - [`spec`]: loading and validating a file into a [`Sweep`].
//! - [`expand`]: the lazy job iterator, counting, exclusion and job identity.
//! - [`error`]: diagnostics with file, line, column and parameter.
//!
//! ```
//! use gridq_master::sweep::{load_str, LoadOptions};
//!
//! let yaml = "command: python train.py\nparameters:\n  lr: [0.1, 1e-5]\n  epochs: !!python/tuple [5, 20, 5]\n";
//! let loaded = load_str(yaml, "sweep.yaml", "demo", &LoadOptions::default()).unwrap();
//! let jobs: Vec<_> = loaded.sweep.expand().unwrap().collect();
//! assert_eq!(jobs.len(), 6);
//! assert_eq!(jobs[5].argv_strings(), ["python", "train.py", "--lr=1e-5", "--epochs=15"]);
//! ```

mod de;
mod error;
mod expand;
mod spec;
mod value;
mod yaml;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

pub use error::{Diagnostic, Result, SweepError};
pub use expand::{Count, Job, JobRecord, Jobs};
pub use spec::{
    DEFAULT_MAX_JOBS, LoadOptions, Loaded, MAX_SWEEP_BYTES, MAX_WARNINGS, load_path, load_str,
    read_sweep_file,
};
pub use yaml::Pos;

use expand::{Axis, ExcludeBox, Values};

/// How a parameter becomes command-line arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgStyle {
    /// `--name=value`, one argv element (mlframework's documented form).
    #[default]
    Equals,
    /// `--name value`, two argv elements (what mlframework's train task built).
    Space,
    /// `name=value` (Hydra overrides). Booleans render as `name=true` / `name=false`.
    Hydra,
}

/// The per-job options a sweep file sets for all of its jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// Extra attempts after a non-zero exit.
    pub retries: u32,
    /// Wall-clock limit of one attempt.
    pub timeout: Option<Duration>,
    /// GPUs each job needs.
    pub gpus: u32,
    /// The queue the jobs are routed to (the default queue when `None`).
    pub queue: Option<String>,
    /// Extra environment of every job, sorted by name.
    pub env: Vec<(String, String)>,
    /// Working directory, relative to the project directory unless absolute.
    pub workdir: Option<String>,
    /// `same_code: true`: a job starts only on a worker whose project holds the code version
    /// the sweep was submitted with (see [`Sweep::set_code`]).
    pub same_code: bool,
}

/// A validated sweep, ready to count and expand.
#[derive(Debug)]
pub struct Sweep {
    name: String,
    source: String,
    command: Vec<CommandElem>,
    /// Set when neither the file nor the caller gave a command: counting works, expanding fails.
    missing_command: Option<Box<Diagnostic>>,
    arg_style: ArgStyle,
    params: Vec<Param>,
    values: Vec<Values>,
    axes: Vec<Axis>,
    exclude: Vec<ExcludeBox>,
    max_jobs: u64,
    /// A bare parameters file (no `parameters:` key), which cannot say `max_jobs` itself.
    bare: bool,
    repeat: u32,
    options: JobOptions,
    /// Whether two different combinations can render the same argv (see [`expand`]).
    collision_prone: bool,
    /// The project's code version at submission, as the client computed it.
    code: Option<gridq_common::code::CodeVersion>,
}

impl Sweep {
    /// The sweep's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the sweep came from, as named in messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Parameter names in file order; [`Job::params`] follows the same order.
    pub fn param_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The argument style.
    pub fn arg_style(&self) -> ArgStyle {
        self.arg_style
    }

    /// The job count limit: the file's `max_jobs` ([`DEFAULT_MAX_JOBS`] without one), or
    /// what [`Sweep::set_max_jobs`] made it.
    pub fn max_jobs(&self) -> u64 {
        self.max_jobs
    }

    /// Sets the job count limit from outside the file (`--max-jobs`), in place of the file's
    /// `max_jobs`: the way to allow a bare parameters file more than [`DEFAULT_MAX_JOBS`] jobs.
    /// A master's own cap still applies on submission.
    pub fn set_max_jobs(&mut self, limit: std::num::NonZeroU64) {
        self.max_jobs = limit.get();
    }

    /// Whether the sweep came from a bare parameters file (every top-level key a parameter).
    pub fn is_bare(&self) -> bool {
        self.bare
    }

    /// How many times each job runs (each repetition is its own job).
    pub fn repeat(&self) -> u32 {
        self.repeat
    }

    /// The per-job options.
    pub fn options(&self) -> &JobOptions {
        &self.options
    }

    /// The project's code version at submission (`gridq submit` computes it), if given.
    pub fn code(&self) -> Option<&gridq_common::code::CodeVersion> {
        self.code.as_ref()
    }

    /// Sets the code version at submission.
    pub fn set_code(&mut self, code: Option<gridq_common::code::CodeVersion>) {
        self.code = code;
    }

    /// Binds the sweep to its code at submission (`gridq submit --same-code`), as the file's
    /// `same_code: true` does.
    pub fn set_same_code(&mut self) {
        self.options.same_code = true;
    }
}

/// One parameter of a sweep.
#[derive(Debug, Clone)]
struct Param {
    name: String,
    pos: Pos,
    /// Used by a `{name}` placeholder, and so not appended.
    placeholder: bool,
    /// The product axis it belongs to.
    axis: usize,
}

/// One element of the command template.
#[derive(Debug, Clone)]
enum CommandElem {
    Lit(Arc<str>),
    Template(Vec<Piece>),
    /// Where the appended flags go.
    Args,
}

#[derive(Debug, Clone)]
enum Piece {
    Lit(Arc<str>),
    Param(usize),
}

/// What a value is under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Bool(bool),
    Int,
    Float,
    Str,
}

/// One value of one parameter, prepared for rendering.
#[derive(Debug)]
pub struct Value {
    kind: ValueKind,
    /// The text as written in the file (or as computed, for interval elements).
    text: Arc<str>,
    /// The value as a JSON fragment: numbers stay numbers, bools stay bools.
    json: Box<RawValue>,
    /// The argv elements it appends (empty for `false`, or when used by a placeholder).
    elems: Vec<Arc<str>>,
}

impl Value {
    fn new(
        param: &str,
        kind: ValueKind,
        text: Arc<str>,
        style: ArgStyle,
        placeholder: bool,
    ) -> Self {
        let json = json_fragment(kind, &text);
        let elems = if placeholder {
            Vec::new()
        } else {
            match (kind, style) {
                (ValueKind::Bool(true), ArgStyle::Equals | ArgStyle::Space) => {
                    vec![Arc::from(format!("--{param}"))]
                }
                (ValueKind::Bool(false), ArgStyle::Equals | ArgStyle::Space) => Vec::new(),
                (_, ArgStyle::Equals) => vec![Arc::from(format!("--{param}={text}"))],
                (_, ArgStyle::Space) => vec![Arc::from(format!("--{param}")), text.clone()],
                (_, ArgStyle::Hydra) => vec![Arc::from(format!("{param}={text}"))],
            }
        };
        Self {
            kind,
            text,
            json,
            elems,
        }
    }

    /// The kind of value.
    pub fn kind(&self) -> ValueKind {
        self.kind
    }

    /// The value's text, as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value as JSON.
    pub fn json(&self) -> &RawValue {
        &self.json
    }

    /// What the value contributes to argv: two values with equal keys are the same job.
    fn render_key(&self, placeholder: bool) -> Vec<Arc<str>> {
        if placeholder {
            vec![self.text.clone()]
        } else {
            self.elems.clone()
        }
    }
}

/// The JSON form of a scalar: numbers as JSON numbers (keeping the written text when it is valid
/// JSON), bools as bools, everything else as a string.
fn json_fragment(kind: ValueKind, text: &str) -> Box<RawValue> {
    let number = match kind {
        ValueKind::Bool(b) => Some(if b {
            "true".to_owned()
        } else {
            "false".to_owned()
        }),
        ValueKind::Int | ValueKind::Float => {
            if serde_json::from_str::<&RawValue>(text).is_ok() && !text.starts_with('+') {
                Some(text.to_owned())
            } else {
                value::parse_decimal(text).map(|d| {
                    let s = d.normalize().to_string();
                    if kind == ValueKind::Float && !s.contains('.') {
                        format!("{s}.0")
                    } else {
                        s
                    }
                })
            }
        }
        ValueKind::Str => None,
    };
    let text = match number {
        Some(n) => n,
        None => serde_json::to_string(text).unwrap_or_else(|_| "null".into()),
    };
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("`null` is valid JSON"))
}
