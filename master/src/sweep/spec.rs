//! Loading a sweep file into a validated [`Sweep`].
//!
//! The file is parsed once, into a tree, and read in two ways:
//! - the event-level reader in [`super::yaml`] builds the tree; it rejects syntax errors,
//!   duplicate keys and foreign tags, and keeps the source text, style and position of every
//!   scalar: `parameters`, `exclude`, `env`, `command` and `timeout` are read from the tree
//!   directly;
//! - the typed options (`name`, `max_jobs`, `retries`, ...) are deserialized from the same tree
//!   (by [`super::de`]) into a `deny_unknown_fields` struct, so an unknown key or a wrong type is
//!   an error with its line and column.
//!
//! A mapping without a `parameters` key is a bare mlframework `parameters.yml`: every top-level
//! key is a parameter and the command comes from the caller (`--command`).
//!
//! # Bounds
//! A file holds at most [`MAX_SWEEP_BYTES`], checked before anything is parsed (and, for files,
//! before more than that is read), and at most [`MAX_WARNINGS`] warnings are kept, so a hostile
//! file costs memory in proportion to its size and never one diagnostic per value.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::de::{self, DeError};
use super::error::{Diagnostic, Reporter, Result, SweepError};
use super::expand::{Axis, ExcludeBox, Values, interval_value};
use super::value::{self, Bound, Interval, Resolved};
use super::yaml::{self, Kind, Node, Pos, Style, Tag};
use super::{ArgStyle, CommandElem, JobOptions, Param, Piece, Sweep, Value, ValueKind};

/// The default cap on the number of jobs one sweep may produce.
pub const DEFAULT_MAX_JOBS: u64 = 100_000;

/// The largest sweep file gridq reads or parses: 8 MiB. Real sweeps are a few kilobytes; the cap
/// bounds the memory and time one file (or one submission) can make gridq spend.
pub const MAX_SWEEP_BYTES: usize = 8 << 20;

/// Warnings kept per load; the rest are counted in one final line.
pub const MAX_WARNINGS: usize = 100;

/// Intervals up to this many elements are prepared at load time, like lists.
const MATERIALIZE_INTERVAL: u64 = 4096;
/// The most points a linspace or geomspace may have (their rounded points are checked for
/// collisions one by one).
const MAX_ROUNDED_POINTS: u64 = 1_000_000;

/// Options that come from outside the file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The command line to run (`--command`); it overrides the file's `command`.
    pub command: Option<String>,
}

/// A loaded sweep and the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    pub sweep: Sweep,
    pub warnings: Vec<Diagnostic>,
}

/// The typed top-level options, read by serde. The blocks that need source text are read from
/// the event tree and only skipped here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOptions {
    name: Option<String>,
    #[serde(rename = "command")]
    _command: Option<IgnoredAny>,
    #[serde(rename = "parameters")]
    _parameters: IgnoredAny,
    #[serde(default)]
    zip: Vec<Vec<String>>,
    #[serde(rename = "exclude")]
    _exclude: Option<IgnoredAny>,
    max_jobs: Option<u64>,
    repeat: Option<u32>,
    arg_style: Option<ArgStyle>,
    retries: Option<u32>,
    #[serde(rename = "timeout")]
    _timeout: Option<IgnoredAny>,
    gpus: Option<u32>,
    queue: Option<String>,
    #[serde(rename = "env")]
    _env: Option<IgnoredAny>,
    workdir: Option<String>,
    same_code: Option<bool>,
}

/// Reads and loads a sweep file.
///
/// # Errors
/// [`SweepError::Io`] when the file cannot be read, [`SweepError::Invalid`] when it is larger than
/// [`MAX_SWEEP_BYTES`] or, with the line and column, when its content is not a valid sweep.
pub fn load_path(path: &Path, options: &LoadOptions) -> Result<Loaded> {
    let text = read_sweep_file(path)?;
    let default_name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".into());
    load_str(&text, &path.display().to_string(), &default_name, options)
}

/// Reads a sweep file as text, refusing one larger than [`MAX_SWEEP_BYTES`] without reading more
/// than one byte past the cap (a named pipe or `/dev/zero` included).
///
/// # Errors
/// [`SweepError::Io`] when the file cannot be read or is not UTF-8, [`SweepError::Invalid`] when
/// it is too large.
pub fn read_sweep_file(path: &Path) -> Result<String> {
    let shown = path.display().to_string();
    let io = |source| SweepError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let cap = MAX_SWEEP_BYTES as u64;
    let declared = file.metadata().map(|m| m.len()).unwrap_or(0);
    if declared > cap {
        return Err(too_large(&shown, Some(declared)));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    file.take(cap + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() > MAX_SWEEP_BYTES {
        // A file that grew, or a pipe: its real size is unknown.
        return Err(too_large(&shown, None));
    }
    String::from_utf8(bytes).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}

fn too_large(source: &str, size: Option<u64>) -> SweepError {
    let mib = MAX_SWEEP_BYTES >> 20;
    let message = match size {
        Some(size) => format!("{size} bytes, more than the {mib} MiB a sweep file may hold"),
        None => format!("more than the {mib} MiB a sweep file may hold"),
    };
    SweepError::Invalid(Box::new(Diagnostic {
        source: source.to_owned(),
        pos: None,
        param: None,
        message,
    }))
}

/// Loads a sweep from text. `source` names it in messages; `default_name` is the sweep's name
/// when the text gives none. One leading byte-order mark is ignored.
///
/// # Errors
/// [`SweepError::Invalid`] when the text is larger than [`MAX_SWEEP_BYTES`] (checked before
/// parsing), is not a valid sweep, or gives no name and `default_name` is not a valid one.
pub fn load_str(
    text: &str,
    source: &str,
    default_name: &str,
    options: &LoadOptions,
) -> Result<Loaded> {
    if text.len() > MAX_SWEEP_BYTES {
        return Err(too_large(source, Some(text.len() as u64)));
    }
    // Editors on Windows may start a file with a UTF-8 byte-order mark. It is not content:
    // without it the file parses exactly like the same file saved without one, positions included.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rep = Reporter {
        source: source.to_owned(),
    };
    let mut loader = Loader {
        rep: rep.clone(),
        warnings: Vec::new(),
        warnings_dropped: 0,
    };
    let root = yaml::parse(text)
        .map_err(|e| rep.error(e.pos, None, e.message))?
        .ok_or_else(|| {
            rep.error(
                Pos { line: 1, col: 1 },
                None,
                "the file is empty: expected a mapping of sweep options (with `parameters:`) or of parameters",
            )
        })?;
    let Some(top) = root.as_map() else {
        return Err(rep.error(
            root.pos,
            None,
            format!("the top level must be a mapping, found {}", root.describe()),
        ));
    };
    let sweep = match find(top, "parameters") {
        Some(params_node) => loader.full_file(&root, top, params_node, default_name, options)?,
        None => loader.bare_file(&root, top, default_name, options)?,
    };
    if loader.warnings_dropped > 0 {
        let more = rep.diag(
            None,
            None,
            format!(
                "and {} more warnings like these (only the first {MAX_WARNINGS} are listed)",
                loader.warnings_dropped
            ),
        );
        loader.warnings.push(more);
    }
    Ok(Loaded {
        sweep,
        warnings: loader.warnings,
    })
}

fn find<'n>(map: &'n [(Node, Node)], key: &str) -> Option<&'n Node> {
    map.iter()
        .find(|(k, _)| k.as_scalar().is_some_and(|(t, _)| t == key))
        .map(|(_, v)| v)
}

fn key_text(key: &Node) -> &str {
    // Keys are always scalars: the YAML reader refuses anything else.
    key.as_scalar().map_or("", |(t, _)| t)
}

struct Loader {
    rep: Reporter,
    /// The first [`MAX_WARNINGS`] warnings.
    warnings: Vec<Diagnostic>,
    /// How many more there were.
    warnings_dropped: u64,
}

/// The parts every sweep has, whichever kind of file it came from.
struct Parts<'n> {
    name: String,
    command: CommandSource<'n>,
    params_node: &'n [(Node, Node)],
    zip: Vec<Vec<String>>,
    zip_pos: Option<Pos>,
    exclude: Option<&'n Node>,
    max_jobs: u64,
    /// A bare parameters file: its limit can only be raised from outside (`--max-jobs`).
    bare: bool,
    repeat: u32,
    arg_style: ArgStyle,
    options: JobOptions,
}

enum CommandSource<'n> {
    Cli(&'n str),
    File(&'n Node),
    Missing(Pos),
}

impl Loader {
    /// Keeps a warning, or only counts it past [`MAX_WARNINGS`]; the message is built only when
    /// it is kept, since a hostile file can cause millions.
    fn warn(&mut self, pos: Pos, param: Option<&str>, message: impl FnOnce() -> String) {
        if self.warnings.len() < MAX_WARNINGS {
            let d = self.rep.diag(Some(pos), param, message());
            self.warnings.push(d);
        } else {
            self.warnings_dropped += 1;
        }
    }

    fn full_file(
        &mut self,
        root: &Node,
        top: &[(Node, Node)],
        params_node: &Node,
        default_name: &str,
        options: &LoadOptions,
    ) -> Result<Sweep> {
        let typed: FileOptions = de::from_node(root).map_err(|e| self.de_error(&e))?;
        let Some(params) = params_node.as_map() else {
            return Err(self.rep.error(
                params_node.pos,
                None,
                format!(
                    "`parameters` must be a mapping of parameter names to values, found {}",
                    describe_value(params_node)
                ),
            ));
        };
        let command = match (&options.command, find(top, "command")) {
            (Some(cli), _) => CommandSource::Cli(cli),
            (None, Some(node)) => CommandSource::File(node),
            (None, None) => CommandSource::Missing(Pos { line: 1, col: 1 }),
        };
        let zip_pos = find(top, "zip").map(|n| n.pos);
        let max_jobs = match typed.max_jobs {
            Some(0) => {
                let pos = find(top, "max_jobs").map_or(Pos::default(), |n| n.pos);
                return Err(self.rep.error(pos, None, "`max_jobs` must be at least 1"));
            }
            Some(n) => n,
            None => DEFAULT_MAX_JOBS,
        };
        let repeat = match typed.repeat {
            Some(0) => {
                let pos = find(top, "repeat").map_or(Pos::default(), |n| n.pos);
                return Err(self.rep.error(pos, None, "`repeat` must be at least 1"));
            }
            Some(n) => n,
            None => 1,
        };
        let name = match typed.name {
            Some(name) => {
                let pos = find(top, "name").map_or(Pos::default(), |n| n.pos);
                self.check_sweep_name(&name, pos)?;
                name
            }
            None => {
                self.check_default_name(default_name, false)?;
                default_name.to_owned()
            }
        };
        let job_options = JobOptions {
            retries: typed.retries.unwrap_or(0),
            timeout: find(top, "timeout").map(|n| self.timeout(n)).transpose()?,
            gpus: typed.gpus.unwrap_or(0),
            queue: match typed.queue {
                Some(q) => {
                    let pos = find(top, "queue").map_or(Pos::default(), |n| n.pos);
                    Some(self.check_queue(q, pos)?)
                }
                None => None,
            },
            env: find(top, "env")
                .map(|n| self.env(n))
                .transpose()?
                .unwrap_or_default(),
            workdir: match typed.workdir {
                Some(w) if w.is_empty() || w.contains('\0') => {
                    let pos = find(top, "workdir").map_or(Pos::default(), |n| n.pos);
                    return Err(self
                        .rep
                        .error(pos, None, "`workdir` must be a non-empty path"));
                }
                other => other,
            },
            same_code: typed.same_code.unwrap_or(false),
        };
        self.build(Parts {
            name,
            command,
            params_node: params,
            zip: typed.zip,
            zip_pos,
            exclude: find(top, "exclude"),
            max_jobs,
            bare: false,
            repeat,
            arg_style: typed.arg_style.unwrap_or_default(),
            options: job_options,
        })
    }

    fn bare_file(
        &mut self,
        root: &Node,
        top: &[(Node, Node)],
        default_name: &str,
        options: &LoadOptions,
    ) -> Result<Sweep> {
        self.check_default_name(default_name, true)?;
        let command = match &options.command {
            Some(cli) => CommandSource::Cli(cli),
            None => CommandSource::Missing(root.pos),
        };
        self.build(Parts {
            name: default_name.to_owned(),
            command,
            params_node: top,
            zip: Vec::new(),
            zip_pos: None,
            exclude: None,
            max_jobs: DEFAULT_MAX_JOBS,
            bare: true,
            repeat: 1,
            arg_style: ArgStyle::default(),
            options: JobOptions::default(),
        })
    }

    fn de_error(&self, e: &DeError) -> SweepError {
        SweepError::Invalid(Box::new(self.rep.diag(e.pos(), None, e.to_string())))
    }

    fn check_sweep_name(&self, name: &str, pos: Pos) -> Result<()> {
        if valid_sweep_name(name) {
            Ok(())
        } else {
            Err(self.rep.error(
                pos,
                None,
                format!("`name` {SWEEP_NAME_RULE}, found `{}`", shorten(name)),
            ))
        }
    }

    /// A sweep without `name:` is named after its file; that name goes into paths too.
    fn check_default_name(&self, name: &str, bare: bool) -> Result<()> {
        if valid_sweep_name(name) {
            return Ok(());
        }
        let fix = if bare {
            "rename the file"
        } else {
            "add `name:` to the file, or rename it"
        };
        Err(SweepError::Invalid(Box::new(self.rep.diag(
            None,
            None,
            format!(
                "the sweep is named after its file, and `{}` is not a valid name: a name {SWEEP_NAME_RULE}; {fix}",
                shorten(name)
            ),
        ))))
    }

    fn check_queue(&self, queue: String, pos: Pos) -> Result<String> {
        let ok = !queue.is_empty()
            && queue.len() <= 128
            && queue
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if ok {
            Ok(queue)
        } else {
            Err(self.rep.error(
                pos,
                None,
                format!("`queue` must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`, found `{queue}`"),
            ))
        }
    }

    fn timeout(&self, node: &Node) -> Result<Duration> {
        let bad = || {
            self.rep.error(
                node.pos,
                None,
                format!(
                    "`timeout` must be a duration such as `90s`, `30m` or `2h 30m`, or a number of seconds, found {}",
                    describe_value(node)
                ),
            )
        };
        let (text, style) = node.as_scalar().ok_or_else(bad)?;
        let duration = match (style, value::resolve_plain(text)) {
            (Style::Plain, Resolved::Int) => Duration::from_secs(text.parse().map_err(|_| bad())?),
            (Style::Plain, Resolved::Float) => {
                let secs: f64 = text.parse().map_err(|_| bad())?;
                Duration::try_from_secs_f64(secs).map_err(|_| bad())?
            }
            _ => humantime::parse_duration(text).map_err(|_| bad())?,
        };
        if duration.is_zero() {
            return Err(self
                .rep
                .error(node.pos, None, "`timeout` must be greater than 0"));
        }
        Ok(duration)
    }

    fn env(&mut self, node: &Node) -> Result<Vec<(String, String)>> {
        let Some(entries) = node.as_map() else {
            return Err(self.rep.error(
                node.pos,
                None,
                format!(
                    "`env` must be a mapping of variable names to values, found {}",
                    describe_value(node)
                ),
            ));
        };
        let mut env = BTreeMap::new();
        for (k, v) in entries {
            let name = key_text(k);
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(self.rep.error(
                    k.pos,
                    None,
                    format!("`env`: `{name}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"),
                ));
            }
            if name.starts_with("GRIDQ_") {
                return Err(self.rep.error(
                    k.pos,
                    None,
                    format!("`env`: `{name}` is reserved: gridq sets the GRIDQ_* variables itself"),
                ));
            }
            let value = match v.as_scalar() {
                Some((text, Style::Plain)) if yaml::is_null(text) => {
                    return Err(self.rep.error(
                        v.pos,
                        None,
                        format!("`env`: `{name}` has no value"),
                    ));
                }
                Some((text, _)) => text.to_owned(),
                None => {
                    return Err(self.rep.error(
                        v.pos,
                        None,
                        format!(
                            "`env`: `{name}` must be a scalar, found {}",
                            describe_value(v)
                        ),
                    ));
                }
            };
            if value.contains('\0') {
                return Err(self.rep.error(
                    v.pos,
                    None,
                    format!("`env`: `{name}` contains a NUL byte"),
                ));
            }
            env.insert(name.to_owned(), value);
        }
        Ok(env.into_iter().collect())
    }

    fn build(&mut self, parts: Parts<'_>) -> Result<Sweep> {
        // Parameters, in file order.
        if parts.params_node.is_empty() {
            let pos = Pos { line: 1, col: 1 };
            return Err(self
                .rep
                .error(pos, None, "no parameters: the sweep needs at least one"));
        }
        let mut params = Vec::with_capacity(parts.params_node.len());
        let mut raw_values = Vec::with_capacity(parts.params_node.len());
        let mut env_names: HashMap<String, usize> = HashMap::new();
        for (k, v) in parts.params_node {
            let name = key_text(k);
            self.check_param_name(name, k.pos)?;
            let var = param_env_var(name);
            if let Some(&first) = env_names.get(&var) {
                let first: &Param = &params[first];
                return Err(self.rep.error(
                    k.pos,
                    Some(name),
                    format!(
                        "its environment variable `{var}` is also that of parameter `{}` (line {}); rename one of them",
                        first.name, first.pos.line
                    ),
                ));
            }
            env_names.insert(var, params.len());
            raw_values.push(self.values(name, v)?);
            params.push(Param {
                name: name.to_owned(),
                pos: k.pos,
                placeholder: false,
                axis: 0,
            });
        }

        // The command, whose placeholders decide which parameters are appended.
        let (command, missing_command) = match &parts.command {
            CommandSource::Missing(pos) => (
                vec![CommandElem::Args],
                Some(Box::new(self.rep.diag(
                    Some(*pos),
                    None,
                    "no command: add `command:` to the file, or pass --command \"python train.py\"",
                ))),
            ),
            source => (self.command(source, &params)?, None),
        };
        for elem in &command {
            if let CommandElem::Template(pieces) = elem {
                for piece in pieces {
                    if let Piece::Param(i) = piece {
                        params[*i].placeholder = true;
                    }
                }
            }
        }

        // Values become prepared, deduplicated value sets.
        let mut values = Vec::with_capacity(params.len());
        for (param, raw) in params.iter().zip(raw_values) {
            values.push(self.prepare(param, raw, parts.arg_style)?);
        }

        // Axes: every parameter is its own axis unless it belongs to a zip group.
        let axes = self.axes(&mut params, &mut values, &parts.zip, parts.zip_pos)?;

        let exclude = match parts.exclude {
            Some(node) => self.exclude(node, &params, &values, &axes)?,
            None => Vec::new(),
        };

        let collision_prone = command.iter().any(|e| match e {
            CommandElem::Template(pieces) => {
                let mut seen: Option<usize> = None;
                pieces.iter().any(|p| match p {
                    Piece::Param(i) => seen.replace(*i).is_some_and(|prev| prev != *i),
                    Piece::Lit(_) => false,
                })
            }
            _ => false,
        }) || (parts.arg_style == ArgStyle::Space
            && params
                .iter()
                .zip(&values)
                .any(|(p, v)| !p.placeholder && v.mixes_bools()));

        let sweep = Sweep {
            name: parts.name,
            source: self.rep.source.clone(),
            command,
            missing_command,
            arg_style: parts.arg_style,
            params,
            values,
            axes,
            exclude,
            max_jobs: parts.max_jobs,
            bare: parts.bare,
            repeat: parts.repeat,
            options: parts.options,
            collision_prone,
            code: None,
        };
        Ok(sweep)
    }

    fn check_param_name(&self, name: &str, pos: Pos) -> Result<()> {
        let problem = if name.is_empty() {
            Some("is empty")
        } else if name.chars().any(char::is_whitespace) {
            Some("contains whitespace")
        } else if name.contains('=') {
            Some("contains `=`")
        } else if name.starts_with('-') {
            Some("starts with `-` (gridq adds the dashes itself)")
        } else if name.contains(['{', '}', '\0']) {
            Some("contains `{`, `}` or a NUL byte")
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.rep.error(
                pos,
                Some(name),
                format!(
                    "invalid parameter name: it {p}; expected a name such as `lr` or `model.depth`"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Reads one parameter's value node into raw values.
    fn values<'n>(&mut self, name: &str, node: &'n Node) -> Result<RawValues<'n>> {
        if node.tag == Some(Tag::PythonTuple) {
            return self
                .tuple(name, node, "!!python/tuple")
                .map(|interval| RawValues::Interval {
                    interval,
                    pos: node.pos,
                });
        }
        match &node.kind {
            Kind::Scalar { .. } => Ok(RawValues::List(vec![self.scalar(name, node)?])),
            Kind::Seq(items) => {
                if items.is_empty() {
                    return Err(self.rep.error(
                        node.pos,
                        Some(name),
                        "empty list: expected at least one value",
                    ));
                }
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    match &item.kind {
                        Kind::Scalar { .. } if item.tag.is_none() => {
                            list.push(self.scalar(name, item)?);
                        }
                        _ => {
                            return Err(self.rep.error(
                                item.pos,
                                Some(name),
                                format!(
                                    "list elements must be scalars, found {}",
                                    describe_value(item)
                                ),
                            ));
                        }
                    }
                }
                Ok(RawValues::List(list))
            }
            Kind::Map(entries) => {
                let keys: Vec<&str> = entries.iter().map(|(k, _)| key_text(k)).collect();
                let expected = "expected a scalar, a list, `!!python/tuple [start, end, step]` or a mapping with one of `range`, `linspace`, `geomspace`";
                let [(k, v)] = entries.as_slice() else {
                    return Err(self.rep.error(
                        node.pos,
                        Some(name),
                        format!("{expected}, found a mapping with keys {}", keys.join(", ")),
                    ));
                };
                match key_text(k) {
                    "range" => self
                        .tuple(name, v, "range")
                        .map(|interval| RawValues::Interval {
                            interval,
                            pos: v.pos,
                        }),
                    form @ ("linspace" | "geomspace") => {
                        self.spaced(name, v, form)
                            .map(|interval| RawValues::Interval {
                                interval,
                                pos: v.pos,
                            })
                    }
                    other => Err(self.rep.error(
                        k.pos,
                        Some(name),
                        format!("{expected}, found a mapping with key `{other}`"),
                    )),
                }
            }
        }
    }

    fn scalar<'n>(&mut self, name: &str, node: &'n Node) -> Result<RawValue<'n>> {
        let Some((text, style)) = node.as_scalar() else {
            return Err(self.rep.error(
                node.pos,
                Some(name),
                format!("expected a scalar, found {}", describe_value(node)),
            ));
        };
        let kind = match style {
            Style::Quoted => ValueKind::Str,
            Style::Plain => match value::resolve_plain(text) {
                Resolved::Null => {
                    return Err(self.rep.error(
                        node.pos,
                        Some(name),
                        "null value: expected a value (write \"\" for an empty string, or remove the parameter)",
                    ));
                }
                Resolved::Bool(b) => ValueKind::Bool(b),
                Resolved::Int => ValueKind::Int,
                Resolved::Float => ValueKind::Float,
                Resolved::Str => {
                    if value::is_yaml11_bool(text) {
                        self.warn(
                            node.pos,
                            Some(name),
                            || format!(
                                "`{text}` is the string \"{text}\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning"
                            ),
                        );
                    }
                    ValueKind::Str
                }
            },
        };
        if text.contains('\0') {
            return Err(self.rep.error(
                node.pos,
                Some(name),
                "the value contains a NUL byte, which no program can receive as an argument",
            ));
        }
        if let ValueKind::Int | ValueKind::Float = kind {
            if let Some(problem) = value::non_finite(text) {
                return Err(self.rep.error(
                    node.pos,
                    Some(name),
                    format!(
                        "`{}` {problem}; quote it to pass the text as a string",
                        shorten(text)
                    ),
                ));
            }
        }
        Ok(RawValue {
            kind,
            text,
            pos: node.pos,
        })
    }

    /// `!!python/tuple [start, end, step]` or `range: [start, end, step]`.
    fn tuple(&self, name: &str, node: &Node, form: &str) -> Result<Interval> {
        let Kind::Seq(items) = &node.kind else {
            return Err(self.rep.error(
                node.pos,
                Some(name),
                format!(
                    "`{form}` expects a list [start, end] or [start, end, step], found {}",
                    describe_value(node)
                ),
            ));
        };
        if !(2..=3).contains(&items.len()) {
            return Err(self.rep.error(
                node.pos,
                Some(name),
                format!(
                    "`{form}` expects [start, end] or [start, end, step], found {} element{}",
                    items.len(),
                    if items.len() == 1 { "" } else { "s" }
                ),
            ));
        }
        let start = self.bound(name, &items[0], form, "start")?;
        let end = self.bound(name, &items[1], form, "end")?;
        let step = match items.get(2) {
            Some(node) => self.bound(name, node, form, "step")?,
            None => Bound {
                value: 1.into(),
                is_int: true,
            },
        };
        let at = items.get(2).map_or(node.pos, |n| {
            if step.value.is_zero() {
                n.pos
            } else {
                node.pos
            }
        });
        Interval::range(start, end, step)
            .map_err(|m| self.rep.error(at, Some(name), format!("`{form}`: {m}")))
    }

    /// `linspace: [start, stop, num]` or `geomspace: [start, stop, num]`.
    fn spaced(&self, name: &str, node: &Node, form: &str) -> Result<Interval> {
        let items = match &node.kind {
            Kind::Seq(items) if items.len() == 3 && node.tag.is_none() => items,
            _ => {
                return Err(self.rep.error(
                    node.pos,
                    Some(name),
                    format!(
                        "`{form}` expects a list [start, stop, num], found {}",
                        describe_value(node)
                    ),
                ));
            }
        };
        let start = self.bound(name, &items[0], form, "start")?;
        let stop = self.bound(name, &items[1], form, "stop")?;
        let num = match items[2].as_scalar() {
            Some((t, Style::Plain)) if value::resolve_plain(t) == Resolved::Int => {
                t.parse::<u64>().ok()
            }
            _ => None,
        }
        .ok_or_else(|| {
            self.rep.error(
                items[2].pos,
                Some(name),
                format!(
                    "`{form}`: num must be a non-negative integer, found {}",
                    describe_value(&items[2])
                ),
            )
        })?;
        let result = if form == "linspace" {
            Interval::linspace(start, stop, num)
        } else {
            Interval::geomspace(start, stop, num)
        };
        result.map_err(|m| {
            self.rep
                .error(node.pos, Some(name), format!("`{form}`: {m}"))
        })
    }

    fn bound(&self, name: &str, node: &Node, form: &str, what: &str) -> Result<Bound> {
        let err = || {
            self.rep.error(
                node.pos,
                Some(name),
                format!(
                    "`{form}`: {what} must be a number, found {}",
                    describe_value(node)
                ),
            )
        };
        let (text, style) = node.as_scalar().ok_or_else(err)?;
        if style != Style::Plain {
            return Err(err());
        }
        let is_int = match value::resolve_plain(text) {
            Resolved::Int => true,
            Resolved::Float => false,
            _ => return Err(err()),
        };
        let value = value::parse_decimal(text).ok_or_else(|| {
            self.rep.error(
                node.pos,
                Some(name),
                format!("`{form}`: {what} `{text}` is not a finite number gridq can compute with exactly"),
            )
        })?;
        Ok(Bound { value, is_int })
    }

    /// Turns raw values into the parameter's prepared value set, dropping values that render
    /// like an earlier one (with a warning that names them).
    fn prepare(&mut self, param: &Param, raw: RawValues<'_>, style: ArgStyle) -> Result<Values> {
        match raw {
            // Small intervals are prepared once, like lists; large ones are computed lazily so
            // memory stays bounded.
            RawValues::Interval { interval, pos } if interval.len() <= MATERIALIZE_INTERVAL => {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                let mut dropped = Vec::new();
                for i in 0..interval.len() {
                    let v = interval_value(&interval, i, &param.name, style, param.placeholder);
                    if seen.insert(v.render_key(param.placeholder)) {
                        out.push(Arc::new(v));
                    } else {
                        dropped.push(v.text.to_string());
                    }
                }
                if let Some(first) = dropped.first() {
                    self.warn(
                        pos,
                        Some(&param.name),
                        || format!(
                            "`{}` yields {} value{} that render{} the same as an earlier one (e.g. `{first}`); each is expanded once",
                            interval.form(),
                            dropped.len(),
                            if dropped.len() == 1 { "" } else { "s" },
                            if dropped.len() == 1 { "s" } else { "" },
                        ),
                    );
                }
                Ok(Values::List(out))
            }
            RawValues::Interval { interval, .. } if interval.distinct_by_construction() => {
                Ok(Values::Interval(interval))
            }
            RawValues::Interval { interval, pos } => {
                // Rounded points are monotonic, so collisions are neighbours.
                if interval.len() > MAX_ROUNDED_POINTS {
                    return Err(self.rep.error(
                        pos,
                        Some(&param.name),
                        format!(
                            "`{}` with more than {MAX_ROUNDED_POINTS} points is not supported",
                            interval.form()
                        ),
                    ));
                }
                let mut prev = interval.render_at(0);
                for i in 1..interval.len() {
                    let text = interval.render_at(i);
                    if text == prev {
                        return Err(self.rep.error(
                            pos,
                            Some(&param.name),
                            format!(
                                "`{}` points collide after rounding to 15 significant digits (`{text}` twice); use fewer points",
                                interval.form()
                            ),
                        ));
                    }
                    prev = text;
                }
                Ok(Values::Interval(interval))
            }
            RawValues::List(list) => {
                let mut seen: HashMap<Vec<Arc<str>>, Pos> = HashMap::new();
                let mut out = Vec::with_capacity(list.len());
                for raw in list {
                    let v = Value::new(
                        &param.name,
                        raw.kind,
                        raw.text.into(),
                        style,
                        param.placeholder,
                    );
                    let key = v.render_key(param.placeholder);
                    if let Some(first) = seen.get(&key) {
                        self.warn(
                            raw.pos,
                            Some(&param.name),
                            || format!(
                                "value `{}` renders the same as the value at line {}, column {}; it is expanded once",
                                v.text, first.line, first.col
                            ),
                        );
                        continue;
                    }
                    seen.insert(key, raw.pos);
                    out.push(Arc::new(v));
                }
                out.shrink_to_fit();
                Ok(Values::List(out))
            }
        }
    }

    fn command(&self, source: &CommandSource<'_>, params: &[Param]) -> Result<Vec<CommandElem>> {
        let (words, rep, pos): (Vec<String>, Reporter, Option<Pos>) = match source {
            CommandSource::Missing(pos) => {
                return Err(self.rep.error(*pos, None, "no command"));
            }
            CommandSource::Cli(text) => {
                let rep = Reporter {
                    source: "--command".into(),
                };
                let words = shell_words::split(text).map_err(|e| {
                    SweepError::Invalid(Box::new(rep.diag(
                        None,
                        None,
                        format!("cannot split the command: {e}"),
                    )))
                })?;
                (words, rep, None)
            }
            CommandSource::File(node) => {
                let words = match &node.kind {
                    Kind::Scalar { text, .. } if node.tag.is_none() => shell_words::split(text)
                        .map_err(|e| {
                            self.rep.error(
                                node.pos,
                                None,
                                format!("`command`: cannot split it: {e}"),
                            )
                        })?,
                    Kind::Seq(items) => items
                        .iter()
                        .map(|item| match item.as_scalar() {
                            Some((t, Style::Plain)) if yaml::is_null(t) => {
                                Err(self.rep.error(item.pos, None, "`command`: null element"))
                            }
                            Some((t, _)) => Ok(t.to_owned()),
                            None => Err(self.rep.error(
                                item.pos,
                                None,
                                format!(
                                    "`command`: elements must be strings, found {}",
                                    describe_value(item)
                                ),
                            )),
                        })
                        .collect::<Result<_>>()?,
                    _ => {
                        return Err(self.rep.error(
                            node.pos,
                            None,
                            format!(
                                "`command` must be a string or a list of strings, found {}",
                                describe_value(node)
                            ),
                        ));
                    }
                };
                (words, self.rep.clone(), Some(node.pos))
            }
        };
        let fail = |message: String| SweepError::Invalid(Box::new(rep.diag(pos, None, message)));
        if words.is_empty() {
            return Err(fail("`command` is empty".into()));
        }
        if words.iter().any(|w| w.contains('\0')) {
            return Err(fail("`command` contains a NUL byte".into()));
        }
        let index: HashMap<&str, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut elems = Vec::with_capacity(words.len() + 1);
        let mut has_args = false;
        for word in &words {
            if word == "{args}" {
                if has_args {
                    return Err(fail(
                        "`{args}` appears more than once in the command".into(),
                    ));
                }
                has_args = true;
                elems.push(CommandElem::Args);
                continue;
            }
            let pieces = parse_template(word, &index).map_err(|m| fail(m.describe(params)))?;
            elems.push(match pieces.as_slice() {
                [] => CommandElem::Lit(Arc::from("")),
                [Piece::Lit(text)] => CommandElem::Lit(text.clone()),
                _ => CommandElem::Template(pieces),
            });
        }
        if !has_args {
            elems.push(CommandElem::Args);
        }
        Ok(elems)
    }

    fn axes(
        &self,
        params: &mut [Param],
        values: &mut [Values],
        zip: &[Vec<String>],
        zip_pos: Option<Pos>,
    ) -> Result<Vec<Axis>> {
        let pos = zip_pos.unwrap_or_default();
        let index: HashMap<&str, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut group_of: Vec<Option<usize>> = vec![None; params.len()];
        for (g, group) in zip.iter().enumerate() {
            if group.len() < 2 {
                return Err(self.rep.error(
                    pos,
                    None,
                    format!("`zip` group {} must name at least two parameters", g + 1),
                ));
            }
            let mut len = None;
            for name in group {
                let Some(&i) = index.get(name.as_str()) else {
                    return Err(self.rep.error(
                        pos,
                        Some(name),
                        format!("`zip` group {} names an unknown parameter", g + 1),
                    ));
                };
                if group_of[i].is_some() {
                    return Err(self.rep.error(
                        pos,
                        Some(name),
                        "the parameter is in more than one `zip` group (or twice in one)",
                    ));
                }
                group_of[i] = Some(g);
                let n = values[i].len();
                match len {
                    None => len = Some((name, n)),
                    Some((first, m)) if m != n => {
                        return Err(self.rep.error(
                            pos,
                            Some(name),
                            format!("`zip` group {} needs lists of equal length: `{first}` has {m} values, `{name}` has {n}", g + 1),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // Axes in file order; a zip group sits where its first member is.
        let mut axes: Vec<Axis> = Vec::new();
        let mut group_axis: HashMap<usize, usize> = HashMap::new();
        for i in 0..params.len() {
            let axis = match group_of[i] {
                Some(g) => match group_axis.get(&g) {
                    Some(&a) => {
                        axes[a].members.push(i);
                        a
                    }
                    None => {
                        group_axis.insert(g, axes.len());
                        axes.push(Axis {
                            members: vec![i],
                            len: values[i].len(),
                        });
                        axes.len() - 1
                    }
                },
                None => {
                    axes.push(Axis {
                        members: vec![i],
                        len: values[i].len(),
                    });
                    axes.len() - 1
                }
            };
            params[i].axis = axis;
        }
        // Zipped lists advance together, so duplicates are whole tuples: drop repeated tuples.
        for axis in &mut axes {
            if axis.members.len() > 1 {
                self.dedup_zip(axis, params, values);
            }
        }
        Ok(axes)
    }

    fn dedup_zip(&self, axis: &mut Axis, params: &[Param], values: &mut [Values]) {
        let lists: Option<Vec<&Vec<Arc<Value>>>> = axis
            .members
            .iter()
            .map(|&m| match &values[m] {
                Values::List(l) => Some(l),
                Values::Interval(_) => None,
            })
            .collect();
        let Some(lists) = lists else { return };
        let mut seen = std::collections::HashSet::new();
        let keep: Vec<bool> = (0..lists[0].len())
            .map(|i| {
                let key: Vec<Vec<Arc<str>>> = axis
                    .members
                    .iter()
                    .zip(&lists)
                    .map(|(&m, l)| l[i].render_key(params[m].placeholder))
                    .collect();
                seen.insert(key)
            })
            .collect();
        if keep.iter().all(|k| *k) {
            return;
        }
        for &m in &axis.members {
            if let Values::List(l) = &mut values[m] {
                let mut it = keep.iter();
                l.retain(|_| it.next().copied().unwrap_or(true));
            }
        }
        axis.len = keep.iter().filter(|k| **k).count() as u64;
    }

    fn exclude(
        &mut self,
        node: &Node,
        params: &[Param],
        values: &[Values],
        axes: &[Axis],
    ) -> Result<Vec<ExcludeBox>> {
        let Kind::Seq(entries) = &node.kind else {
            return Err(self.rep.error(
                node.pos,
                None,
                format!("`exclude` must be a list of partial assignments such as `- {{lr: 0.1, epochs: 5}}`, found {}", describe_value(node)),
            ));
        };
        let index: HashMap<&str, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut boxes = Vec::new();
        for (n, entry) in entries.iter().enumerate() {
            let Some(map) = entry.as_map().filter(|m| !m.is_empty()) else {
                return Err(self.rep.error(
                    entry.pos,
                    None,
                    format!("`exclude` entry {} must be a non-empty mapping of parameters to values, found {}", n + 1, describe_value(entry)),
                ));
            };
            let mut constraints: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
            let mut matches_nothing = false;
            for (k, v) in map {
                let name = key_text(k);
                let Some(&p) = index.get(name) else {
                    return Err(self.rep.error(
                        k.pos,
                        Some(name),
                        format!("`exclude` entry {} names an unknown parameter", n + 1),
                    ));
                };
                let wanted: Vec<&Node> = match &v.kind {
                    Kind::Seq(items) if v.tag.is_none() && !items.is_empty() => {
                        items.iter().collect()
                    }
                    Kind::Scalar { .. } if v.tag.is_none() => vec![v],
                    _ => {
                        return Err(self.rep.error(
                            v.pos,
                            Some(name),
                            format!(
                                "`exclude` values must be scalars or lists of scalars, found {}",
                                describe_value(v)
                            ),
                        ));
                    }
                };
                let mut hits = Vec::new();
                for w in wanted {
                    let raw = self.scalar(name, w)?;
                    let found = values[p].find(&raw.kind, raw.text);
                    if found.is_empty() {
                        self.warn(w.pos, Some(name), || {
                            format!(
                                "`exclude` entry {}: `{}` matches no value of this parameter",
                                n + 1,
                                raw.text
                            )
                        });
                    }
                    hits.extend(found);
                }
                hits.sort_unstable();
                hits.dedup();
                let axis = params[p].axis;
                let set = match constraints.remove(&axis) {
                    Some(prev) => prev
                        .into_iter()
                        .filter(|i| hits.binary_search(i).is_ok())
                        .collect(),
                    None => hits,
                };
                matches_nothing |= set.is_empty();
                constraints.insert(axis, set);
            }
            if !matches_nothing {
                debug_assert!(constraints.keys().all(|&a| a < axes.len()));
                boxes.push(ExcludeBox {
                    constraints: constraints.into_iter().collect(),
                });
            }
        }
        Ok(boxes)
    }
}

/// A value as read from the file, before rendering; its text is borrowed from the YAML tree.
struct RawValue<'n> {
    kind: ValueKind,
    text: &'n str,
    pos: Pos,
}

enum RawValues<'n> {
    List(Vec<RawValue<'n>>),
    Interval { interval: Interval, pos: Pos },
}

/// The environment variable a parameter's value is exported as: `model.lr` is
/// `GRIDQ_PARAM_MODEL_LR`. The worker derives it the same way (`gridq_worker::agent::env_name`).
fn param_env_var(param: &str) -> String {
    let mut var = String::with_capacity("GRIDQ_PARAM_".len() + param.len());
    var.push_str("GRIDQ_PARAM_");
    var.extend(param.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    var
}

/// What a sweep name must be, as said in messages.
const SWEEP_NAME_RULE: &str =
    "must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit";

/// Sweep names become directory and file names: besides the characters `SweepId` allows, the
/// first must be a letter or digit, which rules out `.`, `..`, hidden names and names that read
/// as options.
fn valid_sweep_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The first 64 characters of `text`, for messages about text that may be huge.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn describe_value(node: &Node) -> String {
    match node.as_scalar() {
        Some((t, Style::Plain)) if yaml::is_null(t) => "null".into(),
        Some((t, _)) => {
            let shown: String = t.chars().take(40).collect();
            format!("`{shown}`")
        }
        None => node.describe().into(),
    }
}

/// A placeholder problem, described once the parameter list is known.
enum TemplateError {
    Unknown(String),
    ArgsInside,
}

impl TemplateError {
    fn describe(&self, params: &[Param]) -> String {
        match self {
            Self::Unknown(name) => {
                let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).take(20).collect();
                format!(
                    "placeholder `{{{name}}}` names no parameter; expected one of: {} (or `{{args}}`; write `{{{{` for a literal brace)",
                    names.join(", ")
                )
            }
            Self::ArgsInside => "`{args}` must be a whole command element, not part of one".into(),
        }
    }
}

fn is_placeholder_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':')
}

/// Splits one command element into literal text and `{name}` placeholders. `{{` and `}}` are
/// literal braces; braces around anything that is not a name (JSON, say) stay literal.
fn parse_template(word: &str, index: &HashMap<&str, usize>) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = word;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") || rest.starts_with("}}") {
            lit.push(c);
            rest = &rest[2..];
            continue;
        }
        if c == '{' {
            let inner_len = rest[1..]
                .find(|ch: char| !is_placeholder_char(ch))
                .unwrap_or(rest.len() - 1);
            let inner = &rest[1..1 + inner_len];
            let first_ok = inner.chars().next().is_some_and(|ch| ch != '-');
            if first_ok && rest[1 + inner_len..].starts_with('}') {
                if inner == "args" {
                    return Err(TemplateError::ArgsInside);
                }
                let Some(&i) = index.get(inner) else {
                    return Err(TemplateError::Unknown(inner.to_owned()));
                };
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(Arc::from(std::mem::take(&mut lit))));
                }
                pieces.push(Piece::Param(i));
                rest = &rest[2 + inner_len..];
                continue;
            }
        }
        lit.push(c);
        rest = &rest[c.len_utf8()..];
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(Arc::from(lit)));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(result: Result<impl std::fmt::Debug>) -> String {
        result.expect_err("an error").to_string()
    }

    #[test]
    fn a_file_over_the_cap_is_refused_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: 50 MB that take no disk and must not be read.
        file.set_len(52_428_800).unwrap();
        assert_eq!(
            error_of(read_sweep_file(&path)),
            format!(
                "{}: 52428800 bytes, more than the 8 MiB a sweep file may hold",
                path.display()
            )
        );
        file.set_len(MAX_SWEEP_BYTES as u64 + 1).unwrap();
        assert_eq!(
            error_of(load_path(&path, &LoadOptions::default())),
            format!(
                "{}: 8388609 bytes, more than the 8 MiB a sweep file may hold",
                path.display()
            )
        );
        std::fs::write(&path, "command: run\nparameters:\n  lr: [1, 2]\n").unwrap();
        let loaded = load_path(&path, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.sweep.count().jobs, 2);
        assert_eq!(loaded.sweep.name(), "big");
    }

    #[cfg(unix)]
    #[test]
    fn an_endless_file_is_read_only_up_to_the_cap() {
        // A character device has no size: without the cap this would read forever.
        let path = Path::new("/dev/zero");
        assert_eq!(
            error_of(read_sweep_file(path)),
            "/dev/zero: more than the 8 MiB a sweep file may hold"
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.yaml");
        std::fs::write(&path, b"lr: [caf\xe9]\n").unwrap();
        let err = read_sweep_file(&path).unwrap_err();
        assert!(matches!(err, SweepError::Io { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: stream did not contain valid UTF-8", path.display())
        );
    }

    #[test]
    fn warnings_past_the_cap_are_counted_not_kept() {
        let mut loader = Loader {
            rep: Reporter {
                source: "s.yaml".into(),
            },
            warnings: Vec::new(),
            warnings_dropped: 0,
        };
        for line in 1..=250 {
            loader.warn(Pos { line, col: 1 }, Some("a"), || "w".into());
        }
        assert_eq!(loader.warnings.len(), MAX_WARNINGS);
        assert_eq!(loader.warnings[99].pos, Some(Pos { line: 100, col: 1 }));
        assert_eq!(loader.warnings_dropped, 150);
    }

    #[test]
    fn env_var_names_follow_the_worker() {
        // The worker's rule (`gridq_worker::agent::env_name`): ASCII letters and digits in upper
        // case, everything else `_`, one character for one character.
        assert_eq!(param_env_var("model.lr"), "GRIDQ_PARAM_MODEL_LR");
        assert_eq!(param_env_var("batch-size"), "GRIDQ_PARAM_BATCH_SIZE");
        assert_eq!(param_env_var("A/B"), "GRIDQ_PARAM_A_B");
        assert_eq!(param_env_var("ü"), "GRIDQ_PARAM__");
    }

    #[test]
    fn sweep_names() {
        for ok in ["a", "0", "train-1.a_b", "x..y", "a-"] {
            assert!(valid_sweep_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "-x", "_x", "a/b", "a\0", "a b", "é"] {
            assert!(!valid_sweep_name(bad), "{bad:?}");
        }
        assert!(valid_sweep_name(&"a".repeat(128)));
        assert!(!valid_sweep_name(&"a".repeat(129)));
    }

    #[test]
    fn a_byte_order_mark_keeps_positions() {
        let text = "command: run\nparameters:\n  lr: [1, yes]\n";
        let marked = format!("\u{feff}{text}");
        let loaded = load_str(&marked, "s.yaml", "s", &LoadOptions::default()).unwrap();
        assert_eq!(
            loaded.warnings[0].pos,
            Some(Pos { line: 3, col: 11 }),
            "{:?}",
            loaded.warnings
        );
        let err = load_str("\u{feff}lr: [1", "s.yaml", "s", &LoadOptions::default()).unwrap_err();
        let plain = load_str("lr: [1", "s.yaml", "s", &LoadOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), plain.to_string());
    }
}
