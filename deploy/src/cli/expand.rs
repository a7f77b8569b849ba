//! `gridq expand`: print the jobs a sweep file expands to.
//!
//! `--limit N` prints the first N jobs of a sweep of any size: they are computed one by one
//! and the rest never are, so the sweep's job limit (`max_jobs`, `--max-jobs`) is not checked
//! and a grid of a billion jobs lists its first five at once. Without it, the whole sweep is
//! counted and checked against the limit first, as `run` and `submit` do.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::num::NonZeroU64;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use gridq_master::sweep::{self, Job, LoadOptions, Sweep, SweepError};

use super::Failure;

#[derive(Debug, Args)]
pub(crate) struct ExpandArgs {
    /// The sweep file (gridq format, or a bare mlframework parameters.yml).
    sweep: PathBuf,
    /// The command to run; required for bare parameters files, overrides the file's `command`.
    #[arg(long, short = 'c')]
    command: Option<String>,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Produce only the first N jobs, whatever the sweep's size (the rest are not computed,
    /// and the job limit is not checked).
    #[arg(long, short = 'n', value_name = "N")]
    limit: Option<u64>,
    /// The most jobs the sweep may expand to, in place of its `max_jobs` (default 100,000):
    /// the way to raise the limit of a bare parameters file.
    #[arg(long, value_name = "N", value_parser = parse_max_jobs)]
    max_jobs: Option<NonZeroU64>,
}

/// `--max-jobs N`: at least 1 (shared by `expand`, `run` and `submit`).
pub(crate) fn parse_max_jobs(text: &str) -> Result<NonZeroU64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) => NonZeroU64::new(n).ok_or_else(|| "must be at least 1".to_owned()),
        Err(_) => Err(format!("`{text}` is not a number of jobs")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One line per job: the id, then the argv quoted for a shell. The count goes to stderr.
    Text,
    /// One JSON object per line: {"id", "index", "params", "argv"}.
    Json,
    /// The number of jobs alone; expands nothing, so it works above max_jobs.
    Count,
}

pub(crate) fn run(args: &ExpandArgs) -> Result<(), Failure> {
    let options = LoadOptions {
        command: args.command.clone(),
    };
    let mut loaded = sweep::load_path(&args.sweep, &options).map_err(usage)?;
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    if let Some(n) = args.max_jobs {
        loaded.sweep.set_max_jobs(n);
    }
    let sweep = &loaded.sweep;
    if args.format == Format::Count {
        let count = sweep.count();
        if count.upper_bound {
            eprintln!(
                "warning: {}: this sweep can render duplicate combinations and is too large to expand for an exact count; {} is an upper bound",
                sweep.source(),
                count.jobs
            );
        }
        let jobs = args
            .limit
            .map_or(count.jobs, |n| count.jobs.min(u128::from(n)));
        return write_ignoring_broken_pipe(|out| writeln!(out, "{jobs}"));
    }
    // With a limit, the first jobs stream out without the rest being counted or checked.
    let mut jobs = match args.limit {
        Some(_) => sweep.expand_unchecked(),
        None => sweep.expand(),
    }
    .map_err(usage)?;
    let limit = args
        .limit
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut produced = 0u64;
    write_ignoring_broken_pipe(|out| {
        let mut line = Vec::with_capacity(512);
        for job in jobs.by_ref().take(limit) {
            line.clear();
            match args.format {
                Format::Json => write_json(&mut line, &job, sweep)?,
                Format::Text | Format::Count => write_text(&mut line, &job),
            }
            out.write_all(&line)?;
            produced += 1;
        }
        Ok(())
    })?;
    if jobs.duplicates() > 0 {
        eprintln!(
            "warning: {}: {} combinations rendered the same argv as an earlier job and were expanded once, e.g. {}",
            sweep.source(),
            jobs.duplicates(),
            jobs.duplicate_examples()
                .first()
                .map(shell_words::join)
                .unwrap_or_default()
        );
    }
    if args.format == Format::Text {
        eprintln!("{produced} job{}", if produced == 1 { "" } else { "s" });
    }
    Ok(())
}

fn usage(e: SweepError) -> Failure {
    Failure::Usage(e.to_string())
}

fn write_json(line: &mut Vec<u8>, job: &Job, sweep: &Sweep) -> io::Result<()> {
    serde_json::to_writer(&mut *line, &job.record(sweep))?;
    line.push(b'\n');
    Ok(())
}

fn write_text(line: &mut Vec<u8>, job: &Job) {
    let mut hex = [0u8; 32];
    job.id.encode_hex(&mut hex);
    line.extend_from_slice(&hex);
    line.push(b' ');
    for arg in &job.argv {
        line.push(b' ');
        line.extend_from_slice(quote_arg(arg).as_bytes());
    }
    line.push(b'\n');
}

/// Quotes one argument for a shell. Arguments holding control characters (a newline, say) use
/// `$'...'` quoting (POSIX.1-2024, bash, zsh, ksh), so that every job stays on one line.
fn quote_arg(arg: &str) -> Cow<'_, str> {
    if !arg.chars().any(char::is_control) {
        return shell_words::quote(arg);
    }
    let mut quoted = String::with_capacity(arg.len() + 8);
    quoted.push_str("$'");
    for c in arg.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("\\'"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    quoted.push_str(&format!("\\x{byte:02x}"));
                }
            }
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    Cow::Owned(quoted)
}

/// Runs `f` against a buffered stdout; a closed pipe (`gridq expand | head`) ends quietly.
fn write_ignoring_broken_pipe(
    f: impl FnOnce(&mut BufWriter<io::StdoutLock<'static>>) -> io::Result<()>,
) -> Result<(), Failure> {
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Other(
            anyhow::Error::new(e).context("cannot write to stdout"),
        )),
    }
}
