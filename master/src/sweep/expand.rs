//! Expansion: counting jobs, the lazy job iterator, exclusion and job identity.
//!
//! # Order
//! Jobs come in the order of the Cartesian product of the parameters in file order: the first
//! parameter varies slowest, the last fastest (itertools' `multi_cartesian_product` order). A zip
//! group is one axis, placed where its first member is. With `repeat: N` the N repetitions of a
//! job follow each other.
//!
//! # Memory
//! Nothing is materialised: the iterator holds one index per axis and the current value of each
//! parameter. List values are prepared once at load; interval elements are computed when their
//! axis moves. Counting a plain product is arithmetic; with `exclude`, the excluded combinations
//! are counted by splitting the exclusion boxes axis by axis, never by enumeration.
//!
//! # Identity
//! A job id is the first 16 bytes of the BLAKE3 hash of:
//! the version tag `gq1`, then the argv as a count followed by each element as its byte length
//! and its UTF-8 bytes, then the environment in the same form (a count, then name and value of
//! each variable, sorted by name). Counts and lengths are unsigned LEB128, so the encoding is
//! unambiguous and short: most jobs hash in two BLAKE3 blocks. The environment is the sweep's `env`, plus
//! `GRIDQ_REPEAT=r` for repetition r > 0, so the first repetition keeps the id the job has
//! without `repeat`. Nothing else (sweep name, host, date) enters the hash: the same sweep gives
//! the same ids anywhere, any day.
//!
//! # Duplicates
//! Values that render identically within one parameter (or one zip tuple) are dropped at load,
//! with a warning. Across parameters, different combinations can only render the same argv when
//! one command element holds placeholders of two parameters (`{a}{b}`), or with `arg_style:
//! space` when a parameter mixes booleans with other values. Only such sweeps pay for a set of
//! seen ids during expansion, and their count is found by expanding.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use gridq_common::JobId;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use super::error::{Reporter, Result};
use super::value::{self, Interval};
use super::{ArgStyle, CommandElem, Piece, Sweep, Value, ValueKind};

/// Expanding a collision-prone sweep to count it is refused above this many combinations.
const MAX_COUNT_BY_EXPANSION: u128 = 50_000_000;
/// How many duplicate combinations are remembered for the warning.
const DUPLICATE_EXAMPLES: usize = 5;

/// The values of one parameter.
#[derive(Debug)]
pub(crate) enum Values {
    List(Vec<Arc<Value>>),
    Interval(Interval),
}

impl Values {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::List(l) => l.len() as u64,
            Self::Interval(i) => i.len(),
        }
    }

    /// Whether the list holds booleans beside other values.
    pub(crate) fn mixes_bools(&self) -> bool {
        match self {
            Self::List(l) => {
                let bools = l
                    .iter()
                    .filter(|v| matches!(v.kind, ValueKind::Bool(_)))
                    .count();
                bools > 0 && bools < l.len()
            }
            Self::Interval(_) => false,
        }
    }

    /// The indices of the values an `exclude` entry's value matches: the same text, the same
    /// number (`0.1` matches `0.10`), or the same boolean.
    pub(crate) fn find(&self, kind: &ValueKind, text: &str) -> Vec<u64> {
        let number = match kind {
            ValueKind::Int | ValueKind::Float | ValueKind::Str => value::parse_decimal(text),
            ValueKind::Bool(_) => None,
        };
        let numeric = matches!(kind, ValueKind::Int | ValueKind::Float);
        match self {
            Self::List(list) => list
                .iter()
                .enumerate()
                .filter(|(_, v)| {
                    *v.text == *text
                        || (numeric
                            && matches!(v.kind, ValueKind::Int | ValueKind::Float)
                            && number.is_some()
                            && value::parse_decimal(&v.text) == number)
                        || (matches!(kind, ValueKind::Bool(_)) && v.kind == *kind)
                })
                .map(|(i, _)| i as u64)
                .collect(),
            Self::Interval(interval) => number
                .and_then(|n| interval.index_of(n))
                .into_iter()
                .collect(),
        }
    }

    fn get(&self, i: u64, param: &str, sweep: &Sweep, placeholder: bool) -> Arc<Value> {
        match self {
            Self::List(l) => l[usize::try_from(i).unwrap_or(usize::MAX)].clone(),
            Self::Interval(interval) => Arc::new(interval_value(
                interval,
                i,
                param,
                sweep.arg_style,
                placeholder,
            )),
        }
    }
}

/// Element `i` of an interval as a prepared value.
pub(crate) fn interval_value(
    interval: &Interval,
    i: u64,
    param: &str,
    style: ArgStyle,
    placeholder: bool,
) -> Value {
    let text = interval.render_at(i);
    let kind = if text.contains('.') {
        ValueKind::Float
    } else {
        ValueKind::Int
    };
    Value::new(param, kind, text.into(), style, placeholder)
}

/// One axis of the product: a parameter, or a zip group whose members advance together.
#[derive(Debug)]
pub(crate) struct Axis {
    pub(crate) members: Vec<usize>,
    pub(crate) len: u64,
}

/// One `exclude` entry: a combination is skipped when, on every constrained axis, its index is
/// in the entry's set.
#[derive(Debug)]
pub(crate) struct ExcludeBox {
    /// (axis, sorted indices) pairs, one per constrained axis.
    pub(crate) constraints: Vec<(usize, Vec<u64>)>,
}

impl ExcludeBox {
    fn contains(&self, idx: &[u64]) -> bool {
        self.constraints
            .iter()
            .all(|(axis, set)| set.binary_search(&idx[*axis]).is_ok())
    }

    fn constraint(&self, axis: usize) -> Option<&[u64]> {
        self.constraints
            .iter()
            .find(|(a, _)| *a == axis)
            .map(|(_, s)| s.as_slice())
    }
}

/// A job count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The number of jobs (repetitions included).
    pub jobs: u128,
    /// True when `jobs` is an upper bound: the sweep can render duplicate combinations and was
    /// too large to expand for an exact count.
    pub upper_bound: bool,
}

impl Sweep {
    /// The number of combinations of the plain product, before exclusion.
    fn product(&self) -> Option<u128> {
        self.axes
            .iter()
            .try_fold(1u128, |acc, a| acc.checked_mul(u128::from(a.len)))
    }

    /// Counts the jobs without expanding them (for most sweeps: see the module docs).
    pub fn count(&self) -> Count {
        let Some(product) = self.product() else {
            return Count {
                jobs: u128::MAX,
                upper_bound: true,
            };
        };
        let lens: Vec<u64> = self.axes.iter().map(|a| a.len).collect();
        let boxes: Vec<&ExcludeBox> = self.exclude.iter().collect();
        let combos = product.saturating_sub(union_count(&lens, 0, &boxes));
        let repeat = u128::from(self.repeat);
        if !self.collision_prone {
            return Count {
                jobs: combos.saturating_mul(repeat),
                upper_bound: false,
            };
        }
        if combos > MAX_COUNT_BY_EXPANSION {
            return Count {
                jobs: combos.saturating_mul(repeat),
                upper_bound: true,
            };
        }
        let mut jobs = Jobs::new(self);
        let mut n = 0u128;
        while jobs.next_combination().is_some() {
            n += 1;
        }
        Count {
            jobs: n * repeat,
            upper_bound: false,
        }
    }

    /// Starts the lazy expansion, after checking the job count against `max_jobs`.
    ///
    /// # Errors
    /// When the command is missing, or the sweep would produce more than `max_jobs` jobs; the
    /// message gives the count and how to raise the limit (`--max-jobs N` for a bare file,
    /// that or `max_jobs: N` in the file for a full one).
    pub fn expand(&self) -> Result<Jobs<'_>> {
        let jobs = self.expand_unchecked()?;
        self.check_max_jobs()?;
        Ok(jobs)
    }

    /// Starts the lazy expansion without counting the jobs or checking `max_jobs`: for reading
    /// the first jobs of a sweep of any size (`gridq expand --limit N` takes N of them; the
    /// rest are never computed). Never use it to store or submit a sweep.
    ///
    /// # Errors
    /// When the command is missing.
    pub fn expand_unchecked(&self) -> Result<Jobs<'_>> {
        if let Some(missing) = &self.missing_command {
            return Err(super::SweepError::Invalid(missing.clone()));
        }
        Ok(Jobs::new(self))
    }

    /// Checks the job count against `max_jobs`.
    fn check_max_jobs(&self) -> Result<()> {
        let count = self.count();
        if count.jobs > u128::from(self.max_jobs) {
            let rep = Reporter {
                source: self.source.clone(),
            };
            let jobs = if count.jobs == u128::MAX {
                "more than 3.4e38".to_string()
            } else if count.upper_bound {
                format!("up to {}", count.jobs)
            } else {
                count.jobs.to_string()
            };
            let suggestion = if count.jobs < u128::from(u64::MAX) {
                count.jobs.to_string()
            } else {
                "N".into()
            };
            let max = self.max_jobs;
            // A bare parameters file has no place for `max_jobs:` (it would be a parameter).
            let message = if self.bare {
                format!(
                    "this sweep would produce {jobs} jobs, more than the limit of {max}; pass `--max-jobs {suggestion}` to allow it (a bare parameters file cannot set `max_jobs`: it would be a parameter), or narrow the parameters"
                )
            } else {
                format!(
                    "this sweep would produce {jobs} jobs, more than max_jobs ({max}); add `max_jobs: {suggestion}` to the sweep file or pass `--max-jobs {suggestion}` to allow it, or narrow the parameters"
                )
            };
            return Err(super::SweepError::Invalid(Box::new(rep.diag(
                self.params.first().map(|p| p.pos),
                None,
                message,
            ))));
        }
        Ok(())
    }
}

/// The number of combinations over axes `k..` that fall in at least one box, computed by
/// splitting the values of axis `k` into classes that the same boxes contain.
fn union_count(lens: &[u64], k: usize, boxes: &[&ExcludeBox]) -> u128 {
    if boxes.is_empty() {
        return 0;
    }
    let rest: u128 = lens[k..].iter().map(|&l| u128::from(l)).product();
    if k == lens.len()
        || boxes
            .iter()
            .any(|b| b.constraints.iter().all(|(a, _)| *a < k))
    {
        return rest;
    }
    let free: Vec<&ExcludeBox> = boxes
        .iter()
        .copied()
        .filter(|b| b.constraint(k).is_none())
        .collect();
    // For each index named on axis k, the constrained boxes that contain it.
    let mut by_index: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (bi, b) in boxes.iter().enumerate() {
        if let Some(set) = b.constraint(k) {
            for &i in set {
                by_index.entry(i).or_default().push(bi);
            }
        }
    }
    let mut classes: BTreeMap<Vec<usize>, u64> = BTreeMap::new();
    for members in by_index.values() {
        *classes.entry(members.clone()).or_default() += 1;
    }
    let named = by_index.len() as u64;
    let mut total = u128::from(lens[k] - named.min(lens[k]))
        * if free.is_empty() {
            0
        } else {
            union_count(lens, k + 1, &free)
        };
    for (members, n) in classes {
        let mut sub = free.clone();
        sub.extend(members.iter().map(|&bi| boxes[bi]));
        total += u128::from(n) * union_count(lens, k + 1, &sub);
    }
    total
}

/// One expanded job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Position in the expansion, from 0, counting only jobs that are produced.
    pub index: u64,
    /// The content-addressed id.
    pub id: JobId,
    /// The repetition, from 0 (always 0 without `repeat`).
    pub repeat: u32,
    /// The program and its arguments.
    pub argv: Vec<Arc<str>>,
    /// The value of each parameter, in the order of [`Sweep::param_names`].
    pub params: Vec<Arc<Value>>,
}

impl Job {
    /// The argv as owned strings.
    pub fn argv_strings(&self) -> Vec<String> {
        self.argv.iter().map(|s| s.to_string()).collect()
    }

    /// The job's own environment: the sweep's `env`, plus `GRIDQ_REPEAT` when the sweep repeats.
    pub fn env(&self, sweep: &Sweep) -> Vec<(String, String)> {
        let mut env = sweep.options.env.clone();
        if sweep.repeat > 1 {
            env.push(("GRIDQ_REPEAT".into(), self.repeat.to_string()));
            env.sort();
        }
        env
    }

    /// A serializable view: `{"id", "index", "params": {...}, "argv": [...]}`.
    pub fn record<'a>(&'a self, sweep: &'a Sweep) -> JobRecord<'a> {
        JobRecord { job: self, sweep }
    }
}

/// A job with its sweep, serialized as one JSON object with parameters by name.
#[derive(Debug, Clone, Copy)]
pub struct JobRecord<'a> {
    job: &'a Job,
    sweep: &'a Sweep,
}

impl Serialize for JobRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        struct Params<'a>(&'a JobRecord<'a>);
        impl Serialize for Params<'_> {
            fn serialize<S: Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.job.params.len()))?;
                for (name, value) in self.0.sweep.param_names().zip(&self.0.job.params) {
                    map.serialize_entry(name, value.json())?;
                }
                map.end()
            }
        }
        let with_repeat = self.sweep.repeat > 1;
        let mut s = serializer.serialize_struct("Job", if with_repeat { 5 } else { 4 })?;
        s.serialize_field("id", &self.job.id)?;
        s.serialize_field("index", &self.job.index)?;
        if with_repeat {
            s.serialize_field("repeat", &self.job.repeat)?;
        }
        s.serialize_field("params", &Params(self))?;
        s.serialize_field("argv", &self.job.argv)?;
        s.end()
    }
}

/// The lazy job iterator. Memory does not grow with the number of jobs (except for the seen-id
/// set of collision-prone sweeps, see the module docs).
#[derive(Debug)]
pub struct Jobs<'s> {
    sweep: &'s Sweep,
    /// Current index on each axis; `None` before the first combination.
    idx: Option<Vec<u64>>,
    done: bool,
    /// Current value of each parameter.
    values: Vec<Arc<Value>>,
    /// The current combination's argv and repetition-0 id, while repetitions remain.
    current: Option<(Vec<Arc<str>>, u32)>,
    next_index: u64,
    seen: Option<HashSet<JobId>>,
    duplicates: u64,
    duplicate_examples: Vec<Vec<String>>,
    scratch: Vec<u8>,
    env_bytes: Vec<u8>,
    env_len: usize,
}

impl<'s> Jobs<'s> {
    fn new(sweep: &'s Sweep) -> Self {
        let mut env_bytes = Vec::new();
        for (k, v) in &sweep.options.env {
            push_field(&mut env_bytes, k.as_bytes());
            push_field(&mut env_bytes, v.as_bytes());
        }
        Self {
            sweep,
            idx: None,
            done: sweep.axes.iter().any(|a| a.len == 0),
            values: Vec::with_capacity(sweep.params.len()),
            current: None,
            next_index: 0,
            seen: sweep.collision_prone.then(HashSet::new),
            duplicates: 0,
            duplicate_examples: Vec::new(),
            scratch: Vec::with_capacity(256),
            env_bytes,
            env_len: sweep.options.env.len(),
        }
    }

    /// Combinations skipped because they rendered like an earlier job (collision-prone sweeps).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The argv of the first few such duplicates.
    pub fn duplicate_examples(&self) -> &[Vec<String>] {
        &self.duplicate_examples
    }

    /// Moves to the next combination that is not excluded; returns the lowest axis that moved.
    fn advance(&mut self) -> Option<usize> {
        loop {
            if self.done {
                return None;
            }
            let lowest = match &mut self.idx {
                None => {
                    self.idx = Some(vec![0; self.sweep.axes.len()]);
                    0
                }
                Some(idx) => {
                    let mut k = idx.len();
                    loop {
                        if k == 0 {
                            self.done = true;
                            return None;
                        }
                        k -= 1;
                        idx[k] += 1;
                        if idx[k] < self.sweep.axes[k].len {
                            break;
                        }
                        idx[k] = 0;
                    }
                    k
                }
            };
            self.refresh_values(lowest);
            let idx = self.idx.as_deref().unwrap_or_default();
            if !self.sweep.exclude.iter().any(|b| b.contains(idx)) {
                return Some(lowest);
            }
        }
    }

    /// Recomputes the current value of parameters on axes `from..`.
    fn refresh_values(&mut self, from: usize) {
        let sweep = self.sweep;
        let Some(idx) = self.idx.as_deref() else {
            return;
        };
        if self.values.is_empty() {
            for p in &sweep.params {
                let v =
                    sweep.values[self.values.len()].get(idx[p.axis], &p.name, sweep, p.placeholder);
                self.values.push(v);
            }
            return;
        }
        for (axis_no, axis) in sweep.axes.iter().enumerate().skip(from) {
            for &m in &axis.members {
                let p = &sweep.params[m];
                self.values[m] = sweep.values[m].get(idx[axis_no], &p.name, sweep, p.placeholder);
            }
        }
    }

    fn render_argv(&self) -> Vec<Arc<str>> {
        let sweep = self.sweep;
        let mut argv = Vec::with_capacity(sweep.command.len() + 2 * sweep.params.len());
        for elem in &sweep.command {
            match elem {
                CommandElem::Lit(s) => argv.push(s.clone()),
                CommandElem::Template(pieces) => {
                    let mut s = String::new();
                    for piece in pieces {
                        match piece {
                            Piece::Lit(l) => s.push_str(l),
                            Piece::Param(i) => s.push_str(&self.values[*i].text),
                        }
                    }
                    argv.push(Arc::from(s));
                }
                CommandElem::Args => {
                    for (p, v) in sweep.params.iter().zip(&self.values) {
                        if !p.placeholder {
                            argv.extend(v.elems.iter().cloned());
                        }
                    }
                }
            }
        }
        argv
    }

    fn hash(&mut self, argv: &[Arc<str>], repeat: u32) -> JobId {
        let buf = &mut self.scratch;
        buf.clear();
        buf.extend_from_slice(b"gq1");
        push_len(buf, argv.len());
        for a in argv {
            push_field(buf, a.as_bytes());
        }
        if repeat == 0 {
            push_len(buf, self.env_len);
            buf.extend_from_slice(&self.env_bytes);
        } else {
            // GRIDQ_REPEAT sorts after any user variable (GRIDQ_* names are reserved), but
            // sorting keeps the encoding canonical whatever the names.
            let mut env: Vec<(&[u8], Vec<u8>)> = self
                .sweep
                .options
                .env
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes().to_vec()))
                .collect();
            env.push((b"GRIDQ_REPEAT", repeat.to_string().into_bytes()));
            env.sort();
            push_len(buf, env.len());
            for (k, v) in &env {
                push_field(buf, k);
                push_field(buf, v);
            }
        }
        let hash = blake3::hash(buf);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        JobId::from_bytes(id)
    }

    /// The next distinct combination: its argv and repetition-0 id.
    fn next_combination(&mut self) -> Option<(Vec<Arc<str>>, JobId)> {
        loop {
            self.advance()?;
            let argv = self.render_argv();
            let id = self.hash(&argv, 0);
            if let Some(seen) = &mut self.seen {
                if !seen.insert(id) {
                    self.duplicates += 1;
                    if self.duplicate_examples.len() < DUPLICATE_EXAMPLES {
                        self.duplicate_examples
                            .push(argv.iter().map(|s| s.to_string()).collect());
                    }
                    continue;
                }
            }
            return Some((argv, id));
        }
    }

    fn emit(&mut self, argv: Vec<Arc<str>>, id: JobId, repeat: u32) -> Job {
        let job = Job {
            index: self.next_index,
            id,
            repeat,
            argv,
            params: self.values.clone(),
        };
        self.next_index += 1;
        job
    }
}

impl Iterator for Jobs<'_> {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        if let Some((argv, r)) = self.current.take() {
            let id = self.hash(&argv, r);
            if r + 1 < self.sweep.repeat {
                self.current = Some((argv.clone(), r + 1));
            }
            return Some(self.emit(argv, id, r));
        }
        let (argv, id) = self.next_combination()?;
        if self.sweep.repeat > 1 {
            self.current = Some((argv.clone(), 1));
        }
        Some(self.emit(argv, id, 0))
    }
}

fn push_field(buf: &mut Vec<u8>, bytes: &[u8]) {
    push_len(buf, bytes.len());
    buf.extend_from_slice(bytes);
}

/// Unsigned LEB128: seven bits a byte, low bits first, high bit set on all but the last byte.
fn push_len(buf: &mut Vec<u8>, len: usize) {
    let mut n = len as u64;
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_leb128() {
        let mut buf = Vec::new();
        for n in [0usize, 1, 127, 128, 300, 16_384] {
            push_len(&mut buf, n);
        }
        assert_eq!(
            buf,
            [0x00, 0x01, 0x7f, 0x80, 0x01, 0xac, 0x02, 0x80, 0x80, 0x01]
        );
    }
}
