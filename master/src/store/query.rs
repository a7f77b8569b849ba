//! The monitor's job listing: one page of a sweep's jobs, filtered and sorted by the database.
//!
//! Every sort key has an index, so the first pages of a listing cost the same at a thousand
//! jobs as at a million: expansion order and state use the jobs table's indexes, finish time and
//! duration their own, and parameters and metrics the typed `job_values` index. User values are
//! always bound parameters; the SQL text only ever holds fixed fragments.

use gridq_common::SweepId;
use rusqlite::OptionalExtension;
use rusqlite::types::Value;
use serde::{Deserialize, Serialize};

use super::{JOB_COLUMNS, JobRow, JobState, ReadView, Result, job_row, job_rows, to_i64};

/// What a listing is sorted by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortKey {
    /// Expansion order.
    Index,
    State,
    /// Finish time; jobs not finished are not listed.
    Finished,
    /// Run time of the last attempt; jobs not finished are not listed.
    Duration,
    /// A parameter's value (numbers as numbers).
    Param(String),
    /// A numeric result metric; jobs without it are not listed.
    Metric(String),
}

impl SortKey {
    /// Parses `index`, `state`, `finished`, `duration`, `param:<name>` or `metric:<name>`.
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "" | "index" => Ok(Self::Index),
            "state" => Ok(Self::State),
            "finished" => Ok(Self::Finished),
            "duration" => Ok(Self::Duration),
            _ => {
                if let Some(p) = s.strip_prefix("param:").filter(|p| !p.is_empty()) {
                    Ok(Self::Param(p.to_owned()))
                } else if let Some(m) = s.strip_prefix("metric:").filter(|m| !m.is_empty()) {
                    Ok(Self::Metric(m.to_owned()))
                } else {
                    Err(format!(
                        "unknown sort key `{s}`: expected index, state, finished, duration, param:<name> or metric:<name>"
                    ))
                }
            }
        }
    }

    /// The form [`SortKey::parse`] reads.
    pub fn as_param(&self) -> String {
        match self {
            Self::Index => "index".into(),
            Self::State => "state".into(),
            Self::Finished => "finished".into(),
            Self::Duration => "duration".into(),
            Self::Param(p) => format!("param:{p}"),
            Self::Metric(m) => format!("metric:{m}"),
        }
    }
}

/// One page of one sweep's jobs.
#[derive(Debug, Clone)]
pub struct JobQuery {
    pub sweep: SweepId,
    /// Only jobs in one of these states (all when empty).
    pub states: Vec<JobState>,
    /// Only jobs whose parameter `name` has the value `value` (as text; `0.01` matches the number).
    pub params: Vec<(String, String)>,
    /// Only jobs whose id starts with, or whose command line contains, this text.
    pub text: Option<String>,
    pub sort: SortKey,
    pub descending: bool,
    pub limit: u64,
    pub offset: u64,
}

/// How many jobs match a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchCount {
    pub count: u64,
    /// The count stopped at [`COUNT_CAP`]: there are at least that many.
    pub at_least: bool,
}

/// A page's SQL and arguments, and the parts the count reuses.
struct Planned {
    sql: String,
    page_args: Vec<Value>,
    from: String,
    filters: String,
    args: Vec<Value>,
    /// The state filter is applied after the candidates are chosen.
    late: bool,
}

/// Counting matches stops here when the count needs a scan (text or parameter filters).
pub const COUNT_CAP: u64 = 1_000;

impl ReadView<'_> {
    /// The SQL of a page of jobs, with its arguments.
    fn plan_jobs(&self, q: &JobQuery, late: bool) -> Result<Planned> {
        let mut args: Vec<Value> = vec![Value::Text(q.sweep.as_str().to_owned())];
        let mut from = String::from("jobs j");
        let mut filters = String::from("j.sweep = ?1");
        let by_value = matches!(q.sort, SortKey::Param(_) | SortKey::Metric(_));
        if matches!(q.sort, SortKey::Finished | SortKey::Duration) {
            // What the partial finish-time indexes hold.
            filters.push_str(" AND j.finished_ms IS NOT NULL");
        }
        let order = match &q.sort {
            SortKey::Index => "j.idx".to_owned(),
            SortKey::State => "j.state".to_owned(),
            SortKey::Finished => "j.finished_ms".to_owned(),
            SortKey::Duration => "j.finished_ms - j.started_ms".to_owned(),
            SortKey::Param(name) | SortKey::Metric(name) => {
                let prefix = if matches!(q.sort, SortKey::Param(_)) {
                    "p:"
                } else {
                    "m:"
                };
                args.push(Value::Text(format!("{prefix}{name}")));
                from = "job_values s".to_owned();
                filters = format!("s.sweep = ?1 AND s.key = ?{}", args.len());
                "s.v".to_owned()
            }
        };
        // Parameter filters join their index entries, so the database can start from the
        // most selective one: the work is bounded by the matches, however the metric
        // correlates with the parameters (walking the sort index instead can scan everything).
        let anchor = if by_value { "s.job" } else { "j.id" };
        for (i, (name, value)) in q.params.iter().enumerate() {
            args.push(Value::Text(format!("p:{name}")));
            let key = args.len();
            let (text, number) = value_args(&mut args, value);
            from.push_str(&format!(
                " JOIN job_values f{i} ON f{i}.sweep = ?1 AND f{i}.key = ?{key} AND f{i}.v IN (?{text}{number}) AND f{i}.job = {anchor}"
            ));
        }
        // Sorted by a value, the jobs table is only needed for a state or text filter (its
        // state index covers the first); the page's rows are read after the page is chosen.
        // A state filter that every job of the sweep passes (say `succeeded` on a finished
        // sweep) is dropped: the counts kept by triggers tell, and it saves a lookup per match.
        let counts = self.counts(&q.sweep)?;
        let redundant = counts
            .keys()
            .all(|s| q.states.iter().any(|x| x.as_str() == s));
        let state_filter = !q.states.is_empty() && !redundant;
        let has_text = !q.text.as_deref().unwrap_or("").is_empty();
        // A state filter that most of the sweep passes, on a page chosen by value, is applied
        // after the page's candidates are chosen (twice the page and more, by value alone):
        // probing the jobs table for every match cost most of the time. When the candidates
        // do not fill the page, `query_jobs` asks again with the filter in place.
        let total: u64 = counts.values().sum();
        let passing: u64 = counts
            .iter()
            .filter(|(s, _)| q.states.iter().any(|x| x.as_str() == *s))
            .map(|(_, n)| n)
            .sum();
        let late = late && by_value && state_filter && !has_text && passing * 2 >= total;
        let from_by_value = from.clone();
        if by_value && ((state_filter && !late) || has_text) {
            // Always probed per match (CROSS JOIN fixes the order): without statistics on
            // the jobs table the planner could otherwise walk every job in the state.
            from.push_str(" CROSS JOIN jobs j ON j.sweep = ?1 AND j.id = s.job");
        }
        let mut late_filter = String::new();
        if state_filter {
            let mut marks = Vec::new();
            for s in &q.states {
                args.push(Value::Text(s.as_str().to_owned()));
                marks.push(format!("?{}", args.len()));
            }
            let state_in = format!("j.state IN ({})", marks.join(", "));
            if late {
                late_filter = format!("WHERE {state_in}");
            } else {
                filters.push_str(&format!(" AND {state_in}"));
            }
        }
        if let Some(text) = q.text.as_deref().filter(|t| !t.is_empty()) {
            let lower = text.to_ascii_lowercase();
            let is_hex = lower.bytes().all(|b| b.is_ascii_hexdigit());
            args.push(Value::Text(format!("%{}%", like_escape(text))));
            let like = args.len();
            if is_hex {
                args.push(Value::Text(lower));
                let prefix = args.len();
                filters.push_str(&format!(
                    " AND (j.argv_json LIKE ?{like} ESCAPE '\\' OR substr(j.id, 1, length(?{prefix})) = ?{prefix})"
                ));
            } else {
                filters.push_str(&format!(" AND j.argv_json LIKE ?{like} ESCAPE '\\'"));
            }
        }
        let direction = if q.descending { "DESC" } else { "ASC" };
        // Ties break in the same direction by what ends each sort index, so the database
        // reads the page straight off the index instead of sorting every match: the job id
        // in the value index, expansion order in the state index, the row id (which every
        // index of the jobs table ends with) in the finish-time ones. A tie-break the index
        // does not hold makes SQLite sort all the sweep's jobs for each page (seconds at a
        // million jobs); `explain_jobs` shows the plan and the tests check it.
        let tie = match q.sort {
            SortKey::Index => format!(", j.rowid {direction}"),
            SortKey::Param(_) | SortKey::Metric(_) => format!(", s.job {direction}"),
            SortKey::State => format!(", j.idx {direction}, j.rowid {direction}"),
            SortKey::Finished | SortKey::Duration => format!(", j.rowid {direction}"),
        };
        let n = args.len();
        let sql = if late {
            // Candidates by value alone, then the state filter and the page.
            format!(
                "SELECT {JOB_COLUMNS} FROM (SELECT s.job AS id, s.v AS v FROM {from}
                 WHERE {filters} ORDER BY {order} {direction}{tie} LIMIT ?{}) p
                 JOIN jobs j ON j.sweep = ?1 AND j.id = p.id
                 LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
                 {late_filter}
                 ORDER BY p.v {direction}, p.id {direction} LIMIT ?{} OFFSET ?{}",
                n + 1,
                n + 2,
                n + 3
            )
        } else if by_value {
            // Choose the page from the value index alone, then read its rows.
            format!(
                "SELECT {JOB_COLUMNS} FROM (SELECT s.job AS id, s.v AS v FROM {from}
                 WHERE {filters} ORDER BY {order} {direction}{tie} LIMIT ?{} OFFSET ?{}) p
                 JOIN jobs j ON j.sweep = ?1 AND j.id = p.id
                 LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
                 ORDER BY p.v {direction}, p.id {direction}",
                n + 1,
                n + 2
            )
        } else {
            format!(
                "SELECT {JOB_COLUMNS} FROM {from} LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
                 WHERE {filters} ORDER BY {order} {direction}{tie} LIMIT ?{} OFFSET ?{}",
                n + 1,
                n + 2
            )
        };
        let mut page_args = args.clone();
        if late {
            let candidates = q.offset.saturating_add(q.limit).saturating_mul(2) + 64;
            page_args.push(Value::Integer(to_i64(candidates)));
        }
        page_args.push(Value::Integer(to_i64(q.limit)));
        page_args.push(Value::Integer(to_i64(q.offset)));
        // The count needs the state filter in place.
        let (from, filters) = if late {
            (
                format!("{from_by_value} CROSS JOIN jobs j ON j.sweep = ?1 AND j.id = s.job"),
                format!("{filters} AND {}", late_filter.trim_start_matches("WHERE ")),
            )
        } else {
            (from, filters)
        };
        Ok(Planned {
            sql,
            page_args,
            from,
            filters,
            args,
            late,
        })
    }

    /// One page of jobs, and how many match in all.
    ///
    /// # Errors
    /// SQLite's.
    pub fn query_jobs(&self, q: &JobQuery) -> Result<(Vec<JobRow>, MatchCount)> {
        let mut p = self.plan_jobs(q, true)?;
        let mut jobs = self.page(&p)?;
        if p.late && (jobs.len() as u64) < q.limit {
            // The candidates ran out before the page was full: ask with the filter in place.
            p = self.plan_jobs(q, false)?;
            jobs = self.page(&p)?;
        }
        let count = self.count_matches(q, &p.from, &p.filters, p.args)?;
        Ok((jobs, count))
    }

    fn page(&self, p: &Planned) -> Result<Vec<JobRow>> {
        let mut stmt = self.conn.prepare_cached(&p.sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(p.page_args.iter()), job_row)?;
        job_rows(rows)
    }

    /// SQLite's query plan for the page of [`ReadView::query_jobs`], one line per step
    /// (`SEARCH j USING INDEX ...`, `USE TEMP B-TREE FOR ORDER BY`, ...).
    ///
    /// # Errors
    /// SQLite's.
    pub fn explain_jobs(&self, q: &JobQuery) -> Result<Vec<String>> {
        let p = self.plan_jobs(q, true)?;
        let mut stmt = self
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", p.sql))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(p.page_args), |r| {
            r.get::<_, String>(3)
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    fn count_matches(
        &self,
        q: &JobQuery,
        from: &str,
        filters: &str,
        mut args: Vec<Value>,
    ) -> Result<MatchCount> {
        let scan_needed = !q.params.is_empty()
            || q.text.as_deref().is_some_and(|t| !t.is_empty())
            || matches!(
                q.sort,
                SortKey::Metric(_) | SortKey::Finished | SortKey::Duration
            );
        if !scan_needed {
            // Counts by state are kept by triggers (every job has every parameter).
            let counts = self.counts(&q.sweep)?;
            let count = counts
                .iter()
                .filter(|(s, _)| q.states.is_empty() || q.states.iter().any(|x| x.as_str() == *s))
                .map(|(_, n)| n)
                .sum();
            return Ok(MatchCount {
                count,
                at_least: false,
            });
        }
        let n = args.len();
        args.push(Value::Integer(to_i64(COUNT_CAP + 1)));
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {from} WHERE {filters} LIMIT ?{})",
            n + 1
        );
        let count: i64 = self
            .conn
            .prepare_cached(&sql)?
            .query_row(rusqlite::params_from_iter(args), |r| r.get(0))?;
        let count = u64::try_from(count).unwrap_or(0);
        Ok(MatchCount {
            count: count.min(COUNT_CAP),
            at_least: count > COUNT_CAP,
        })
    }

    /// The metric names a sweep's results have (those stored as sortable numbers), sorted.
    ///
    /// # Errors
    /// SQLite's.
    pub fn metric_names(&self, sweep: &SweepId) -> Result<Vec<String>> {
        // Walks the distinct keys by skipping through the index, one probe per key.
        let mut out = Vec::new();
        let mut after = String::from("m:");
        let mut stmt = self.conn.prepare_cached(
            "SELECT key FROM job_values WHERE sweep = ?1 AND key > ?2 AND key < 'm;' ORDER BY key LIMIT 1",
        )?;
        while out.len() < 200 {
            let next: Option<String> = stmt
                .query_row(rusqlite::params![sweep.as_str(), after], |r| r.get(0))
                .ok();
            let Some(key) = next else { break };
            out.push(key.trim_start_matches("m:").to_owned());
            after = format!("{key}\u{10FFFF}");
        }
        Ok(out)
    }

    /// `(parameter values, metric)` of about `limit` finished jobs that have `metric`, for the
    /// plots: all of them when there are no more, else a uniform sample, plus the jobs with
    /// the lowest and the highest value.
    ///
    /// Job ids are hashes, so the jobs whose id is below a bound are a uniform sample of the
    /// sweep, read off the by-job index in a few milliseconds whatever the sweep's size (a
    /// sample strided over the metric's order walked every value: a second at a million).
    ///
    /// # Errors
    /// SQLite's.
    pub fn plot_rows(
        &self,
        sweep: &SweepId,
        metric: &str,
        limit: u64,
    ) -> Result<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
        let key = format!("m:{metric}");
        // Metrics come from results, which succeeded jobs have (counts kept by triggers).
        let total: u64 = self.counts(sweep)?.get("succeeded").copied().unwrap_or(0);
        let fraction = if total == 0 {
            1.0
        } else {
            #[allow(clippy::cast_precision_loss)]
            let f = limit as f64 / total as f64;
            f
        };
        // The first 8 hex digits of the ids below the bound: `fraction` of all ids.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bound = if fraction >= 1.0 {
            "g".to_owned()
        } else {
            format!("{:08x}", (fraction * f64::from(u32::MAX)) as u32)
        };
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut push = |params: String, v: f64, job: String| -> Result<()> {
            if seen.insert(job) {
                out.push((super::parse_json(&params)?, v));
            }
            Ok(())
        };
        for extreme in ["ASC", "DESC"] {
            let row: Option<(String, f64, String)> = self
                .conn
                .prepare_cached(&format!(
                    "SELECT j.params_json, s.v, s.job FROM (SELECT job, v FROM job_values
                     WHERE sweep = ?1 AND key = ?2 ORDER BY v {extreme}, job {extreme} LIMIT 1) s
                     CROSS JOIN jobs j ON j.sweep = ?1 AND j.id = s.job"
                ))?
                .query_row(rusqlite::params![sweep.as_str(), key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            if let Some((params, v, job)) = row {
                push(params, v, job)?;
            }
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT j.params_json, s.v, s.job FROM job_values s INDEXED BY job_values_by_job
             CROSS JOIN jobs j ON j.sweep = ?1 AND j.id = s.job
             WHERE s.sweep = ?1 AND s.job < ?3 AND s.key = ?2 LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            rusqlite::params![sweep.as_str(), key, bound, to_i64(limit)],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            },
        )?;
        for row in rows {
            let (params, v, job) = row?;
            push(params, v, job)?;
        }
        Ok(out)
    }

    /// Durations in seconds of up to `limit` of a sweep's finished jobs (the most recent).
    ///
    /// # Errors
    /// SQLite's.
    pub fn durations(&self, sweep: &SweepId, limit: u64) -> Result<Vec<f64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT finished_ms - started_ms FROM jobs WHERE sweep = ?1 AND finished_ms IS NOT NULL
             AND started_ms IS NOT NULL ORDER BY finished_ms DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(rusqlite::params![sweep.as_str(), to_i64(limit)], |r| {
            r.get::<_, i64>(0)
        })?;
        let mut out = Vec::new();
        for row in rows {
            #[allow(clippy::cast_precision_loss)]
            out.push(row?.max(0) as f64 / 1000.0);
        }
        Ok(out)
    }
}

impl ReadView<'_> {
    /// Calls `f` with the duration in seconds of every finished job (to rebuild the histogram
    /// at start).
    ///
    /// # Errors
    /// SQLite's.
    pub fn for_each_duration(&self, mut f: impl FnMut(f64)) -> Result<()> {
        let mut stmt = self.conn.prepare(
            "SELECT finished_ms - started_ms FROM jobs WHERE finished_ms IS NOT NULL AND started_ms IS NOT NULL",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let ms: i64 = row.get(0)?;
            #[allow(clippy::cast_precision_loss)]
            f(ms.max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// A sweep's jobs in expansion order after the `(index, id)` cursor (from the start when
    /// `None`), at most `limit` (the results export's batches).
    ///
    /// # Errors
    /// SQLite's.
    pub fn jobs_after(
        &self,
        sweep: &SweepId,
        after: Option<(u64, gridq_common::JobId)>,
        limit: u64,
    ) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
             WHERE j.sweep = ?1 AND (?2 IS NULL OR (j.idx, j.id) > (?2, ?3)) ORDER BY j.idx, j.id LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            rusqlite::params![
                sweep.as_str(),
                after.map(|(i, _)| to_i64(i)),
                after.map(|(_, id)| id.to_string()),
                to_i64(limit)
            ],
            job_row,
        )?;
        let out = job_rows(rows)?;
        Ok(out)
    }

    /// Every top-level key of a sweep's results, sorted.
    ///
    /// # Errors
    /// SQLite's.
    pub fn result_keys(&self, sweep: &SweepId) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT k.key FROM results r, json_each(r.result_json) k
             WHERE r.sweep = ?1 AND json_valid(r.result_json) AND json_type(r.result_json) = 'object'
             ORDER BY k.key",
        )?;
        let rows = stmt.query_map([sweep.as_str()], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Jobs by state over every sweep.
    ///
    /// # Errors
    /// SQLite's.
    pub fn state_totals(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT state, sum(n) FROM sweep_counts GROUP BY state HAVING sum(n) > 0 ORDER BY state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (s, n) = row?;
            out.push((s, u64::try_from(n).unwrap_or(0)));
        }
        Ok(out)
    }

    /// The broker queues gridq uses: every sweep's job queue, the events and dead-letter queues.
    ///
    /// # Errors
    /// SQLite's.
    pub fn sweep_queues(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT json_extract(spec_json, '$.queue') FROM sweeps")?;
        let rows = stmt.query_map([], |r| r.get::<_, Option<String>>(0))?;
        let mut out = std::collections::BTreeSet::from([
            gridq_common::topology::jobs_queue(gridq_common::topology::DEFAULT_QUEUE),
            gridq_common::topology::EVENTS_QUEUE.to_owned(),
            gridq_common::topology::DEAD_QUEUE.to_owned(),
        ]);
        for row in rows {
            if let Some(q) = row? {
                out.insert(gridq_common::topology::jobs_queue(&q));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The most recently finished failed or timed-out jobs, over every sweep.
    ///
    /// # Errors
    /// SQLite's.
    pub fn recent_failures(&self, limit: u64) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j LEFT JOIN results r ON r.sweep = j.sweep AND r.job = j.id
             WHERE j.state IN ('failed', 'timed_out') ORDER BY j.finished_ms DESC LIMIT ?1"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([to_i64(limit)], job_row)?;
        let out = job_rows(rows)?;
        Ok(out)
    }
}

/// Binds a filter value as text and, when it reads as a number, as a number too; returns the
/// text placeholder's number and the number's placeholder (`, ?m`, or nothing).
fn value_args(args: &mut Vec<Value>, value: &str) -> (usize, String) {
    args.push(Value::Text(value.to_owned()));
    let text = args.len();
    let number = match value.trim().parse::<f64>() {
        Ok(f) if f.is_finite() => {
            args.push(Value::Real(f));
            format!(", ?{}", args.len())
        }
        _ => String::new(),
    };
    (text, number)
}

/// Escapes `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` pattern.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl super::Tx<'_> {
    /// Deletes the sweeps whose jobs are all final and that nothing touched since `cutoff_ms`,
    /// with their jobs, attempts, results, logs and values. Returns their names.
    ///
    /// # Errors
    /// SQLite's.
    pub fn purge_finished_sweeps(&self, cutoff_ms: u64) -> Result<Vec<String>> {
        let names: Vec<String> = {
            let mut stmt = self.tx.prepare(
                "SELECT s.name FROM sweeps s WHERE s.updated_ms < ?1 AND NOT EXISTS (
                     SELECT 1 FROM sweep_counts c WHERE c.sweep = s.name AND c.n > 0
                     AND c.state IN ('pending', 'queued', 'running', 'retrying'))
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.sweep = s.name AND j.updated_ms >= ?1)",
            )?;
            let rows = stmt.query_map([to_i64(cutoff_ms)], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for name in &names {
            for table in [
                "DELETE FROM jobs WHERE sweep = ?1",
                "DELETE FROM attempts WHERE sweep = ?1",
                "DELETE FROM results WHERE sweep = ?1",
                "DELETE FROM duplicate_results WHERE sweep = ?1",
                "DELETE FROM logs WHERE sweep = ?1",
                "DELETE FROM job_values WHERE sweep = ?1",
                "DELETE FROM sweep_counts WHERE sweep = ?1",
                "DELETE FROM sweeps WHERE name = ?1",
            ] {
                self.tx.execute(table, [name])?;
            }
        }
        Ok(names)
    }
}
