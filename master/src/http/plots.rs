//! Server-rendered SVG plots for the sweep page: a metric against one parameter, parallel
//! coordinates over all parameters, and a histogram of job durations.
//!
//! Each function is pure and returns one self-contained `<svg>` element that the monitor embeds
//! inline in its HTML: no script, no external resources, and no `id` attributes, because several
//! plots share one document. Parameter names, metric names and categorical values come from users'
//! sweep files and job results, so every piece of text goes through `Esc`. Output is bounded: at
//! most `MAX_DRAWN` marks, picked with an even stride so that a reload shows the same subset.
//! The classes `axis`, `tick`, `label`, `pt`, `pc`, `bar`, `note` and `legend` let the page's CSS
//! restyle the plots; the presentation attributes written here are only defaults (CSS rules win).

use std::collections::HashMap;
use std::fmt::{self, Write as _};

use serde_json::Value;

/// The most points or lines one plot draws.
const MAX_DRAWN: usize = 5_000;
/// The most bars of the duration histogram.
const MAX_BINS: usize = 40;
/// About how many ticks a numeric axis gets.
const TARGET_TICKS: f64 = 6.0;
/// Size of the scatter and histogram canvas, in viewBox units.
const W: f64 = 640.0;
const H: f64 = 360.0;
/// The plot area of the scatter and histogram; the margins hold tick labels and axis titles.
const PLOT: Frame = Frame {
    left: 64.0,
    top: 24.0,
    right: W - 16.0,
    bottom: H - 52.0,
};
/// Size of the parallel-coordinates canvas: wider, since it holds one axis per parameter.
const PC_W: f64 = 960.0;
const PC_H: f64 = 400.0;
/// Default colours, for when no page CSS applies.
const INK: &str = "#444";
const TEXT: &str = "#222";
/// Viridis at five evenly spaced points: perceptually ordered and readable for colour-blind people.
const VIRIDIS: [[f64; 3]; 5] = [
    [68.0, 1.0, 84.0],
    [59.0, 82.0, 139.0],
    [33.0, 145.0, 140.0],
    [94.0, 201.0, 98.0],
    [253.0, 231.0, 37.0],
];
/// Stands in for a parameter value missing from a short row.
static NULL: Value = Value::Null;

/// A scatter of `metric` (y) against one parameter (x), one `<circle class="pt">` per job with a
/// hover title `param=value, metric=value`.
///
/// The x axis is logarithmic when every value is a positive number and they span a factor of 100
/// or more, linear when every value is a number, and categorical otherwise (categories in
/// first-seen order, points jittered within their band so duplicates stay visible). Jobs whose
/// metric is not finite are skipped and counted in a note; of more than 5,000 jobs an evenly
/// strided subset is drawn.
pub fn scatter(param: &str, metric: &str, points: &[(Value, f64)]) -> String {
    let title = format!("{metric} against {param}");
    let valid: Vec<&(Value, f64)> = points.iter().filter(|p| p.1.is_finite()).collect();
    let skipped = points.len() - valid.len();
    if valid.is_empty() {
        return no_data(&title, skipped_note(skipped, "metric"));
    }
    let drawn = stride(&valid);
    let xs: Vec<&Value> = drawn.iter().map(|p| &p.0).collect();
    let x = Scale::for_values(&xs);
    let (lo, hi) = min_max(drawn.iter().map(|p| p.1));
    let y = Scale::linear(lo, hi, false);

    let frame = PLOT;
    let data = frame.inset(8.0, 8.0);
    let mut svg = Svg::open(W, H, &title, "scatter");
    svg.x_axis(&x, &frame, &data, param);
    svg.y_axis(&y, &frame, &data, metric);
    let bands = x.categories();
    for (i, (value, m)) in drawn.iter().enumerate() {
        let mut fx = x.frac(value);
        if bands > 0 {
            fx += jitter(i) * 0.6 / bands as f64;
        }
        let tip = format!(
            "{param}={}, {metric}={}",
            value_label(value),
            fmt_sig(*m, 6)
        );
        svg.push(format_args!(
            r##"<circle class="pt" cx="{:.1}" cy="{:.1}" r="3" fill="#3b528b" fill-opacity="0.7"><title>{}</title></circle>"##,
            data.x(fx),
            data.y(y.frac_num(*m)),
            Esc(&tip),
        ));
    }
    let notes = [
        skipped_note(skipped, "metric"),
        shown_note(drawn.len(), valid.len()),
    ];
    svg.note(W - 8.0, "end", &notes);
    svg.finish()
}

/// Parallel coordinates: one vertical axis per parameter, plus `metric` as the last axis, and one
/// `<polyline class="pc">` per job coloured by its metric on a viridis gradient (shown in a small
/// legend).
///
/// Each parameter axis follows the same rules as the x axis of [`scatter`]; a row shorter than
/// `params` counts its missing values as `null`. Jobs whose metric is not finite are skipped and
/// counted in a note; of more than 5,000 jobs an evenly strided subset is drawn.
pub fn parallel_coordinates(params: &[String], metric: &str, rows: &[(Vec<Value>, f64)]) -> String {
    let title = match params {
        [] => format!("{metric} per job"),
        _ => format!("{metric} across parameters {}", params.join(", ")),
    };
    let valid: Vec<&(Vec<Value>, f64)> = rows.iter().filter(|r| r.1.is_finite()).collect();
    let skipped = rows.len() - valid.len();
    if valid.is_empty() {
        return no_data(&title, skipped_note(skipped, "metric"));
    }
    let drawn = stride(&valid);
    let mut scales: Vec<Scale> = (0..params.len())
        .map(|j| {
            let column: Vec<&Value> = drawn.iter().map(|r| r.0.get(j).unwrap_or(&NULL)).collect();
            Scale::for_values(&column)
        })
        .collect();
    let (lo, hi) = min_max(drawn.iter().map(|r| r.1));
    scales.push(Scale::linear(lo, hi, false));
    let names: Vec<&str> = params.iter().map(String::as_str).chain([metric]).collect();

    let frame = Frame {
        left: 84.0,
        top: 44.0,
        right: PC_W - 150.0,
        bottom: PC_H - 20.0,
    };
    let data = frame.inset(0.0, 8.0);
    let spacing = if scales.len() > 1 {
        frame.width() / (scales.len() - 1) as f64
    } else {
        frame.width()
    };
    let axis_x = |k: usize| {
        if scales.len() > 1 {
            frame.left + spacing * k as f64
        } else {
            frame.left + frame.width() / 2.0
        }
    };
    let mut svg = Svg::open(PC_W, PC_H, &title, "parallel");
    // Lines first, so the axes and their labels stay readable on top.
    for (values, m) in &drawn {
        let colour = viridis(lerp_frac(lo, hi, *m));
        let mut points = String::new();
        let mut tip = String::new();
        for (k, (scale, name)) in scales.iter().zip(&names).enumerate() {
            let (frac, label) = match params.get(k) {
                Some(_) => {
                    let value = values.get(k).unwrap_or(&NULL);
                    (scale.frac(value), value_label(value))
                }
                None => (scale.frac_num(*m), fmt_sig(*m, 6)),
            };
            let sep = if k == 0 { "" } else { " " };
            let _ = write!(points, "{sep}{:.1},{:.1}", axis_x(k), data.y(frac));
            let sep = if k == 0 { "" } else { ", " };
            let _ = write!(tip, "{sep}{name}={label}");
        }
        svg.push(format_args!(
            r#"<polyline class="pc" points="{points}" fill="none" stroke="{colour}" stroke-opacity="0.5"><title>{}</title></polyline>"#,
            Esc(&tip),
        ));
    }
    for (k, (scale, name)) in scales.iter().zip(&names).enumerate() {
        let x = axis_x(k);
        svg.push(format_args!(
            r#"<g class="axis y" data-scale="{}">"#,
            scale.kind()
        ));
        svg.line("axis", x, frame.top, x, frame.bottom);
        svg.v_ticks(scale, x, &data, label_chars(spacing).min(12));
        svg.text(
            x,
            frame.top - 8.0,
            "label axis-title",
            "middle",
            name,
            label_chars(spacing),
        );
        svg.push(format_args!("</g>"));
    }
    svg.legend(lo, hi, metric, &frame);
    let notes = [
        skipped_note(skipped, "metric"),
        shown_note(drawn.len(), valid.len()),
    ];
    svg.note(8.0, "start", &notes);
    svg.finish()
}

/// A histogram of job durations in seconds, one `<rect class="bar">` per bin with a hover title
/// `a–b s: n jobs`.
///
/// Every finite duration is binned; the bin count follows the Freedman–Diaconis rule (the square
/// root rule when the quartiles coincide), between 1 and 40, and equal durations share one bar.
/// Durations that are not finite are skipped and counted in a note.
pub fn durations(seconds: &[f64]) -> String {
    let title = "job durations in seconds";
    let mut values: Vec<f64> = seconds.iter().copied().filter(|s| s.is_finite()).collect();
    let skipped = seconds.len() - values.len();
    if values.is_empty() {
        return no_data(title, skipped_note(skipped, "duration"));
    }
    values.sort_by(f64::total_cmp);
    let hist = Histogram::new(&values);
    let x = Scale::linear(hist.lo, hist.hi, false);
    let top = hist.counts.iter().copied().max().unwrap_or(0);
    let y = Scale::linear(0.0, top as f64, true);

    let frame = PLOT;
    let data = frame.inset(8.0, 0.0);
    let mut svg = Svg::open(W, H, title, "durations");
    svg.x_axis(&x, &frame, &data, "duration (s)");
    svg.y_axis(&y, &frame, &data, "jobs");
    for (i, n) in hist.counts.iter().enumerate() {
        let (a, b) = (hist.edge(i), hist.edge(i + 1));
        let (xa, xb) = (data.x(x.frac_num(a)), data.x(x.frac_num(b)));
        let width = xb - xa;
        let yt = data.y(y.frac_num(*n as f64));
        let jobs = if *n == 1 { "job" } else { "jobs" };
        let tip = format!("{}–{} s: {n} {jobs}", fmt_num(a), fmt_num(b));
        svg.push(format_args!(
            r##"<rect class="bar" x="{:.1}" y="{yt:.1}" width="{:.1}" height="{:.1}" fill="#21918c"><title>{}</title></rect>"##,
            xa + width * 0.05,
            width * 0.9,
            data.bottom - yt,
            Esc(&tip),
        ));
    }
    svg.note(W - 8.0, "end", &[skipped_note(skipped, "duration")]);
    svg.finish()
}

/// The small plot shown before any job has reported.
fn no_data(title: &str, note: Option<String>) -> String {
    let mut svg = Svg::open(W, 80.0, title, "empty");
    svg.push(format_args!(
        r##"<text class="note" x="{:.1}" y="40" text-anchor="middle" fill="#666">no data yet</text>"##,
        W / 2.0
    ));
    if let Some(note) = note {
        svg.push(format_args!(
            r##"<text class="note" x="{:.1}" y="60" text-anchor="middle" fill="#666" font-size="10">{}</text>"##,
            W / 2.0,
            Esc(&note)
        ));
    }
    svg.finish()
}

fn skipped_note(skipped: usize, what: &str) -> Option<String> {
    (skipped > 0).then(|| format!("{} skipped: {what} not finite", count(skipped)))
}

fn shown_note(drawn: usize, total: usize) -> Option<String> {
    (drawn < total).then(|| format!("showing {} of {}", count(drawn), count(total)))
}

/// At most [`MAX_DRAWN`] items, evenly strided so the subset is the same on every render.
fn stride<T: Copy>(items: &[T]) -> Vec<T> {
    if items.len() <= MAX_DRAWN {
        return items.to_vec();
    }
    // u128: `i * len` must not overflow, however many items there are.
    let len = items.len() as u128;
    (0..MAX_DRAWN as u128)
        .filter_map(|i| items.get((i * len / MAX_DRAWN as u128) as usize).copied())
        .collect()
}

/// A deterministic offset in [-0.5, 0.5) for the `i`th point (a splitmix64 step).
fn jitter(i: usize) -> f64 {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// Where `x` lies between `lo` and `hi`, clamped to [0, 1]. Works even when `hi - lo` overflows.
fn lerp_frac(lo: f64, hi: f64, x: f64) -> f64 {
    let span = hi - lo;
    let t = if span.is_finite() && span > 0.0 {
        (x - lo) / span
    } else {
        (x * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)
    };
    if t.is_nan() { 0.5 } else { t.clamp(0.0, 1.0) }
}

/// A value as a label: strings without their quotes, everything else as JSON.
fn value_label(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The plot area, in viewBox units.
#[derive(Debug, Clone, Copy)]
struct Frame {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Frame {
    fn inset(self, dx: f64, dy: f64) -> Frame {
        Frame {
            left: self.left + dx,
            top: self.top + dy,
            right: self.right - dx,
            bottom: self.bottom - dy,
        }
    }
    fn width(&self) -> f64 {
        self.right - self.left
    }
    fn x(&self, frac: f64) -> f64 {
        self.left + frac * self.width()
    }
    fn y(&self, frac: f64) -> f64 {
        self.bottom - frac * (self.bottom - self.top)
    }
}

/// How the values along one axis map onto [0, 1], and where its ticks go.
#[derive(Debug)]
enum Scale {
    /// A linear domain rounded out to whole tick steps. `step_exp` is the power of ten of the
    /// step, which says how many digits the tick labels need; `None` when no sensible step
    /// exists (subnormal or overflowing spans) and the ticks are just the two ends.
    Linear {
        lo: f64,
        hi: f64,
        ticks: Vec<f64>,
        step_exp: Option<i32>,
    },
    /// A domain in log10 units, rounded out to whole decades.
    Log { lo: f64, hi: f64 },
    /// Categories in first-seen order, indexed by their JSON text (so `"true"` and `true` differ).
    Category {
        index: HashMap<String, usize>,
        labels: Vec<String>,
    },
}

impl Scale {
    fn for_values(values: &[&Value]) -> Scale {
        let numbers: Option<Vec<f64>> = values
            .iter()
            .map(|v| v.as_f64().filter(|x| x.is_finite()))
            .collect();
        match numbers {
            Some(numbers) if !numbers.is_empty() => {
                let (lo, hi) = min_max(numbers.into_iter());
                if lo > 0.0 && hi / lo >= 100.0 {
                    Scale::log(lo, hi)
                } else {
                    Scale::linear(lo, hi, false)
                }
            }
            _ => Scale::category(values),
        }
    }

    /// A linear scale with ticks at 1, 2 or 5 × 10^k; `integer` keeps the step at 1 or more.
    fn linear(lo: f64, hi: f64, integer: bool) -> Scale {
        let (lo, hi) = if lo < hi {
            (lo, hi)
        } else {
            // One distinct value: centre it in a small range around it.
            let d = if lo == 0.0 {
                1.0
            } else {
                (lo.abs() * 0.1).max(f64::MIN_POSITIVE)
            };
            ((lo - d).max(-f64::MAX), (hi + d).min(f64::MAX))
        };
        let ends = Scale::Linear {
            lo,
            hi,
            ticks: vec![lo, hi],
            step_exp: None,
        };
        // Halves, so that the span of (-MAX, MAX) does not overflow.
        let Some((step, step_exp)) =
            nice_step((hi * 0.5 - lo * 0.5) / (TARGET_TICKS / 2.0), integer)
        else {
            return ends;
        };
        let (nice_lo, nice_hi) = (
            (lo / step + 1e-9).floor() * step,
            (hi / step - 1e-9).ceil() * step,
        );
        let (lo, hi) = if nice_lo.is_finite() && nice_hi.is_finite() && nice_lo < nice_hi {
            (nice_lo, nice_hi)
        } else {
            (lo, hi)
        };
        let (first, last) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
        if !(first.is_finite() && last.is_finite() && first <= last && last - first <= 50.0) {
            return ends;
        }
        let ticks = (0..=(last - first) as usize)
            .map(|i| (first + i as f64) * step)
            .filter(|t| t.is_finite())
            .collect();
        Scale::Linear {
            lo,
            hi,
            ticks,
            step_exp: Some(step_exp),
        }
    }

    fn log(lo: f64, hi: f64) -> Scale {
        // log10 of an exact power of ten can land a hair off the integer.
        let snap = |e: f64| {
            if (e - e.round()).abs() < 1e-9 {
                e.round()
            } else {
                e
            }
        };
        Scale::Log {
            lo: snap(lo.log10()).floor(),
            hi: snap(hi.log10()).ceil(),
        }
    }

    fn category(values: &[&Value]) -> Scale {
        let mut index = HashMap::new();
        let mut labels = Vec::new();
        for value in values {
            index.entry(value.to_string()).or_insert_with(|| {
                labels.push(value_label(value));
                labels.len() - 1
            });
        }
        Scale::Category { index, labels }
    }

    /// The value of `data-scale` on the axis group.
    fn kind(&self) -> &'static str {
        match self {
            Scale::Linear { .. } => "linear",
            Scale::Log { .. } => "log",
            Scale::Category { .. } => "category",
        }
    }

    /// The number of categories, or 0 for a numeric scale.
    fn categories(&self) -> usize {
        match self {
            Scale::Category { labels, .. } => labels.len(),
            _ => 0,
        }
    }

    fn frac_num(&self, x: f64) -> f64 {
        match self {
            Scale::Linear { lo, hi, .. } => lerp_frac(*lo, *hi, x),
            Scale::Log { lo, hi } if x > 0.0 => lerp_frac(*lo, *hi, x.log10()),
            Scale::Log { .. } => 0.0,
            Scale::Category { .. } => 0.5,
        }
    }

    fn frac(&self, value: &Value) -> f64 {
        match self {
            Scale::Category { index, labels } => index
                .get(&value.to_string())
                .map_or(0.5, |&i| (i as f64 + 0.5) / labels.len() as f64),
            _ => value.as_f64().map_or(0.5, |x| self.frac_num(x)),
        }
    }

    /// Tick positions (as fractions) and labels; at most about `max_labels` for categories.
    fn ticks(&self, max_labels: usize) -> Vec<(f64, String)> {
        match self {
            Scale::Linear {
                lo,
                hi,
                ticks,
                step_exp,
            } => ticks
                .iter()
                .map(|&t| (lerp_frac(*lo, *hi, t), tick_label(t, *step_exp)))
                .collect(),
            Scale::Log { lo, hi } => {
                // The exponents are whole and within ±330, so the casts are exact.
                let (a, b) = (*lo as i32, *hi as i32);
                let decades = (b - a + 1).max(1) as usize;
                (a..=b)
                    .step_by(decades.div_ceil(8))
                    .map(|e| (lerp_frac(*lo, *hi, f64::from(e)), pow10_label(e)))
                    .collect()
            }
            Scale::Category { labels, .. } => {
                let n = labels.len();
                labels
                    .iter()
                    .enumerate()
                    .step_by(n.div_ceil(max_labels.max(1)).max(1))
                    .map(|(i, label)| ((i as f64 + 0.5) / n as f64, label.clone()))
                    .collect()
            }
        }
    }
}

/// The tick step for about `rough` per tick, rounded to 1, 2 or 5 × 10^k, with k.
fn nice_step(rough: f64, integer: bool) -> Option<(f64, i32)> {
    if !(rough.is_finite() && rough > 0.0) {
        return None;
    }
    let exp = rough.log10().floor() as i32;
    let base = 10f64.powi(exp);
    if !(base.is_finite() && base > 0.0) {
        return None;
    }
    let m = rough / base;
    let (step, exp) = match m {
        m if m <= 1.0 => (base, exp),
        m if m <= 2.0 => (2.0 * base, exp),
        m if m <= 5.0 => (5.0 * base, exp),
        _ => (10.0 * base, exp + 1),
    };
    if integer && step < 1.0 {
        return Some((1.0, 0));
    }
    step.is_finite().then_some((step, exp))
}

/// A linear tick label with just the digits its step needs.
fn tick_label(v: f64, step_exp: Option<i32>) -> String {
    match step_exp {
        _ if v == 0.0 => "0".to_owned(),
        Some(e) => {
            let magnitude = v.abs().log10().floor() as i32;
            fmt_sig(v, (magnitude - e + 1).clamp(1, 15) as usize)
        }
        None => fmt_num(v),
    }
}

/// 10^e as a label: `0.001` or `1000` when short, else `1e-4`.
fn pow10_label(e: i32) -> String {
    if (-3..=4).contains(&e) {
        fmt_sig(10f64.powi(e), 1)
    } else {
        format!("1e{e}")
    }
}

/// A number with at most four significant digits.
fn fmt_num(v: f64) -> String {
    fmt_sig(v, 4)
}

/// A number with at most `sig` significant digits, trailing zeros dropped: plain notation from
/// 0.001 up to 99999, `1.5e-7` style outside that. Never prints `NaN`.
fn fmt_sig(v: f64, sig: usize) -> String {
    if v.is_nan() {
        return "?".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "∞" } else { "-∞" }.to_owned();
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    // Let the standard library round, then move the decimal point ourselves.
    let sci = format!("{:.*e}", sig.max(1) - 1, v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let sign = if v < 0.0 { "-" } else { "" };
    if (-3..5).contains(&exp) {
        if exp < 0 {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{sign}{digits}{}", "0".repeat(int_len - digits.len()))
            } else {
                let (int, frac) = digits.split_at(int_len);
                format!("{sign}{int}.{frac}")
            }
        }
    } else {
        let (head, tail) = digits.split_at(1);
        let dot = if tail.is_empty() { "" } else { "." };
        format!("{sign}{head}{dot}{tail}e{exp}")
    }
}

/// A count with thousands separators: `12,000`.
fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The content of a `<text>`: at most `max` characters of the string, escaped; when cut, it ends
/// in `…` and a `<title>` child carries the whole string for a hover tooltip.
#[derive(Debug, Clone, Copy)]
struct Clipped<'a>(&'a str, usize);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Clipped(s, max) = *self;
        match s.char_indices().nth(max) {
            None => write!(f, "{}", Esc(s)),
            Some(_) => {
                let keep = s
                    .char_indices()
                    .nth(max.saturating_sub(1))
                    .map_or(s.len(), |(i, _)| i);
                write!(f, "{}…<title>{}</title>", Esc(&s[..keep]), Esc(s))
            }
        }
    }
}

/// How many characters of 11px text fit in `px`.
fn label_chars(px: f64) -> usize {
    ((px / 6.5) as usize).clamp(3, 24)
}

/// The viridis colour at `t` in [0, 1].
fn viridis(t: f64) -> String {
    let pos = if t.is_nan() { 0.5 } else { t.clamp(0.0, 1.0) } * 4.0;
    let i = (pos.floor() as usize).min(3);
    let f = pos - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let c = |k: usize| (a[k] + (b[k] - a[k]) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", c(0), c(1), c(2))
}

/// Text escaped for both XML text and attribute values. Characters XML 1.0 cannot carry at all
/// (most control characters) become U+FFFD; tabs and line breaks become character references so
/// attribute values keep them.
#[derive(Debug, Clone, Copy)]
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                '\t' => f.write_str("&#9;")?,
                '\n' => f.write_str("&#10;")?,
                '\r' => f.write_str("&#13;")?,
                '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'.. => {
                    f.write_char(c)?
                }
                _ => f.write_char('\u{FFFD}')?,
            }
        }
        Ok(())
    }
}

/// Bins over every finite duration, sorted ascending.
#[derive(Debug)]
struct Histogram {
    lo: f64,
    hi: f64,
    counts: Vec<usize>,
}

impl Histogram {
    fn new(sorted: &[f64]) -> Histogram {
        let (min, max) = (
            sorted.first().copied().unwrap_or(0.0),
            sorted.last().copied().unwrap_or(0.0),
        );
        let (lo, hi, bins) = if min < max {
            (min, max, bin_count(sorted, max - min))
        } else {
            // All equal: one bar, widened so it has a width.
            let d = (min.abs() * 0.05).max(0.5);
            ((min - d).max(-f64::MAX), (max + d).min(f64::MAX), 1)
        };
        let mut counts = vec![0; bins];
        for &v in sorted {
            let i = ((lerp_frac(lo, hi, v) * bins as f64) as usize).min(bins - 1);
            counts[i] += 1;
        }
        Histogram { lo, hi, counts }
    }

    /// The left edge of bin `i` (the right edge of the last bin for `i == len`).
    fn edge(&self, i: usize) -> f64 {
        let n = self.counts.len();
        if i >= n {
            return self.hi;
        }
        let t = i as f64 / n as f64;
        let span = self.hi - self.lo;
        let edge = if span.is_finite() {
            self.lo + span * t
        } else {
            self.lo * (1.0 - t) + self.hi * t
        };
        edge.clamp(-f64::MAX, f64::MAX)
    }
}

/// Freedman–Diaconis bin count, or the square-root rule when the quartiles coincide (or their
/// difference overflows), kept within [1, MAX_BINS].
fn bin_count(sorted: &[f64], span: f64) -> usize {
    let n = sorted.len();
    let quantile = |p: f64| {
        let i = ((n.saturating_sub(1)) as f64 * p).round() as usize;
        sorted.get(i).copied().unwrap_or(0.0)
    };
    let width = 2.0 * (quantile(0.75) - quantile(0.25)) / (n as f64).cbrt();
    let bins = if width > 0.0 && width.is_finite() && span.is_finite() {
        (span / width).ceil()
    } else {
        (n as f64).sqrt().ceil()
    };
    // `as` saturates and maps NaN to 0.
    (bins as usize).clamp(1, MAX_BINS)
}

/// Markup under construction. Writing to a `String` cannot fail, so [`Svg::push`] drops the
/// `fmt::Result` in one place.
#[derive(Debug)]
struct Svg(String);

impl Svg {
    fn open(width: f64, height: f64, title: &str, kind: &str) -> Svg {
        let mut svg = Svg(String::new());
        svg.push(format_args!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot plot-{kind}" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{t}" font-family="sans-serif" font-size="11"><title>{t}</title>"#,
            t = Esc(title),
        ));
        svg
    }

    fn push(&mut self, args: fmt::Arguments<'_>) {
        let _ = self.0.write_fmt(args);
    }

    fn finish(mut self) -> String {
        self.0.push_str("</svg>");
        self.0
    }

    fn line(&mut self, class: &str, x1: f64, y1: f64, x2: f64, y2: f64) {
        self.push(format_args!(
            r#"<line class="{class}" x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{INK}"/>"#
        ));
    }

    /// A text of at most `max` characters (see [`Clipped`]), with a white halo so that it stays
    /// readable over lines.
    fn text(&mut self, x: f64, y: f64, class: &str, anchor: &str, body: &str, max: usize) {
        self.push(format_args!(
            r##"<text class="{class}" x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" fill="{TEXT}" stroke="#fff" stroke-width="3" stroke-linejoin="round" paint-order="stroke">{}</text>"##,
            Clipped(body, max),
        ));
    }

    /// The note line (skipped and thinned-out marks), if there is anything to say.
    fn note(&mut self, x: f64, anchor: &str, notes: &[Option<String>]) {
        let text: Vec<&str> = notes.iter().flatten().map(String::as_str).collect();
        if text.is_empty() {
            return;
        }
        self.push(format_args!(
            r##"<text class="note" x="{x:.1}" y="14" text-anchor="{anchor}" fill="#666" font-style="italic">{}</text>"##,
            Esc(&text.join("; ")),
        ));
    }

    /// A horizontal axis along the bottom of `frame`, with ticks placed within `data`.
    fn x_axis(&mut self, scale: &Scale, frame: &Frame, data: &Frame, title: &str) {
        self.push(format_args!(
            r#"<g class="axis x" data-scale="{}">"#,
            scale.kind()
        ));
        self.line("axis", frame.left, frame.bottom, frame.right, frame.bottom);
        let ticks = scale.ticks(12);
        let chars = label_chars(data.width() / ticks.len().max(1) as f64);
        for (frac, label) in ticks {
            let x = data.x(frac);
            self.push(format_args!(r#"<g class="tick">"#));
            self.line("tick", x, frame.bottom, x, frame.bottom + 5.0);
            self.text(x, frame.bottom + 17.0, "label", "middle", &label, chars);
            self.push(format_args!("</g>"));
        }
        let middle = frame.left + frame.width() / 2.0;
        self.text(
            middle,
            frame.bottom + 38.0,
            "label axis-title",
            "middle",
            title,
            80,
        );
        self.push(format_args!("</g>"));
    }

    /// A vertical axis along the left of `frame`, with its title turned on its side.
    fn y_axis(&mut self, scale: &Scale, frame: &Frame, data: &Frame, title: &str) {
        self.push(format_args!(
            r#"<g class="axis y" data-scale="{}">"#,
            scale.kind()
        ));
        self.line("axis", frame.left, frame.top, frame.left, frame.bottom);
        self.v_ticks(scale, frame.left, data, 9);
        self.push(format_args!(
            r#"<text class="label axis-title" transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle" fill="{TEXT}">{}</text>"#,
            (frame.top + frame.bottom) / 2.0,
            Clipped(title, 40),
        ));
        self.push(format_args!("</g>"));
    }

    /// Ticks and labels on the left of a vertical axis at `x`, placed within `data`.
    fn v_ticks(&mut self, scale: &Scale, x: f64, data: &Frame, chars: usize) {
        for (frac, label) in scale.ticks(15) {
            let y = data.y(frac);
            self.push(format_args!(r#"<g class="tick">"#));
            self.line("tick", x - 5.0, y, x, y);
            self.text(x - 7.0, y + 3.5, "label", "end", &label, chars);
            self.push(format_args!("</g>"));
        }
    }

    /// The colour scale of the parallel coordinates, to the right of `frame`.
    fn legend(&mut self, lo: f64, hi: f64, metric: &str, frame: &Frame) {
        const STEPS: usize = 24;
        let x = PC_W - 70.0;
        let height = (frame.bottom - frame.top) / STEPS as f64;
        self.push(format_args!(r#"<g class="legend">"#));
        self.text(x + 7.0, 24.0, "label", "middle", metric, 14);
        for i in 0..STEPS {
            // The top of the bar is the highest metric.
            let t = 1.0 - (i as f64 + 0.5) / STEPS as f64;
            self.push(format_args!(
                r#"<rect x="{x:.1}" y="{:.1}" width="14" height="{:.1}" fill="{}"/>"#,
                frame.top + height * i as f64,
                height + 0.5,
                viridis(t),
            ));
        }
        self.text(
            x + 18.0,
            frame.top + 8.0,
            "label",
            "start",
            &fmt_num(hi),
            12,
        );
        self.text(x + 18.0, frame.bottom, "label", "start", &fmt_num(lo), 12);
        self.push(format_args!("</g>"));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use roxmltree::{Document, Node};
    use serde_json::{Value, json};

    use super::*;

    const HOSTILE: &str = r#"<script>alert(1)</script>"&"#;

    fn parse(svg: &str) -> Document<'_> {
        match Document::parse(svg) {
            Ok(doc) => doc,
            Err(err) => panic!("not well-formed XML ({err}):\n{svg}"),
        }
    }

    fn has_class(node: &Node<'_, '_>, class: &str) -> bool {
        node.attribute("class")
            .is_some_and(|c| c.split_whitespace().any(|c| c == class))
    }

    fn find<'a, 'i>(doc: &'a Document<'i>, tag: &str, class: &str) -> Vec<Node<'a, 'i>> {
        doc.descendants()
            .filter(|n| n.has_tag_name(tag) && has_class(n, class))
            .collect()
    }

    fn num(node: &Node<'_, '_>, name: &str) -> f64 {
        let raw = node.attribute(name).unwrap_or_else(|| panic!("no {name}"));
        raw.parse()
            .unwrap_or_else(|_| panic!("{name}={raw:?} is not a number"))
    }

    /// The text of `node`'s `<title>` child.
    fn tip(node: &Node<'_, '_>) -> String {
        node.children()
            .find(|c| c.has_tag_name("title"))
            .and_then(|t| t.text())
            .unwrap_or_default()
            .to_owned()
    }

    fn note(doc: &Document<'_>) -> String {
        find(doc, "text", "note")
            .iter()
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The `data-scale` and tick labels of each axis group, in document order.
    fn axes(doc: &Document<'_>) -> Vec<(String, Vec<String>)> {
        find(doc, "g", "axis")
            .iter()
            .map(|g| {
                let labels = g
                    .descendants()
                    .filter(|n| n.has_tag_name("g") && has_class(n, "tick"))
                    .filter_map(|t| t.descendants().find(|n| n.has_tag_name("text")))
                    .map(|t| t.text().unwrap_or_default().to_owned())
                    .collect();
                (g.attribute("data-scale").unwrap_or("").to_owned(), labels)
            })
            .collect()
    }

    fn view_box(doc: &Document<'_>) -> (f64, f64) {
        let parts: Vec<f64> = doc
            .root_element()
            .attribute("viewBox")
            .expect("viewBox")
            .split_whitespace()
            .map(|p| p.parse().expect("viewBox number"))
            .collect();
        assert_eq!(parts[..2], [0.0, 0.0]);
        (parts[2], parts[3])
    }

    /// The rectangle between the x axis line and the y axis line: (left, top, right, bottom).
    fn plot_area(doc: &Document<'_>) -> (f64, f64, f64, f64) {
        let line = |axis: &str| {
            find(doc, "g", axis)
                .first()
                .and_then(|g| g.children().find(|n| has_class(n, "axis")))
                .expect("axis line")
        };
        let (x, y) = (line("x"), line("y"));
        (num(&x, "x1"), num(&y, "y1"), num(&x, "x2"), num(&y, "y2"))
    }

    /// Every coordinate in the document is finite and inside the viewBox.
    fn assert_inside_view_box(doc: &Document<'_>) {
        let (w, h) = view_box(doc);
        let inside = |x: f64, y: f64| {
            assert!(
                x.is_finite() && y.is_finite(),
                "non-finite coordinate {x},{y}"
            );
            assert!(
                (-0.5..=w + 0.5).contains(&x) && (-0.5..=h + 0.5).contains(&y),
                "{x},{y} outside 0 0 {w} {h}"
            );
        };
        for n in doc.descendants().filter(Node::is_element) {
            match n.tag_name().name() {
                "circle" => inside(num(&n, "cx"), num(&n, "cy")),
                "line" => {
                    inside(num(&n, "x1"), num(&n, "y1"));
                    inside(num(&n, "x2"), num(&n, "y2"));
                }
                "rect" => {
                    let (x, y) = (num(&n, "x"), num(&n, "y"));
                    let (rw, rh) = (num(&n, "width"), num(&n, "height"));
                    assert!(rw >= 0.0 && rh >= 0.0, "negative rect size {rw}x{rh}");
                    inside(x, y);
                    inside(x + rw, y + rh);
                }
                "text" if n.attribute("x").is_some() => inside(num(&n, "x"), num(&n, "y")),
                "polyline" => {
                    for pair in n.attribute("points").expect("points").split(' ') {
                        let (x, y) = pair.split_once(',').expect("x,y");
                        inside(x.parse().expect("x"), y.parse().expect("y"));
                    }
                }
                _ => {}
            }
        }
    }

    fn numbers(xs: &[f64], metric: f64) -> Vec<(Value, f64)> {
        xs.iter().map(|&x| (json!(x), metric)).collect()
    }

    fn x_axis(svg: &str) -> (String, Vec<String>) {
        axes(&parse(svg)).swap_remove(0)
    }

    /// Tick labels are evenly spaced at 1, 2 or 5 × 10^k.
    fn assert_nice(labels: &[String]) {
        let values: Vec<f64> = labels
            .iter()
            .map(|l| l.parse().unwrap_or_else(|_| panic!("tick {l:?}")))
            .collect();
        assert!(values.len() >= 2, "{labels:?}");
        let step = values[1] - values[0];
        for pair in values.windows(2) {
            assert!(
                ((pair[1] - pair[0]) / step - 1.0).abs() < 1e-6,
                "{labels:?}"
            );
        }
        let mantissa = step / 10f64.powf(step.log10().floor());
        assert!(
            [1.0, 2.0, 5.0, 10.0]
                .iter()
                .any(|m| (mantissa - m).abs() < 1e-6),
            "step {step} in {labels:?}"
        );
    }

    #[test]
    fn scatter_draws_one_circle_per_point_with_tooltips_inside_the_plot() {
        let points = vec![(json!(0.1), 1.0), (json!(0.2), 0.5), (json!(0.3), 0.25)];
        let svg = scatter("lr", "loss", &points);
        let doc = parse(&svg);
        let root = doc.root_element();
        assert_eq!(root.attribute("width"), Some("100%"));
        assert_eq!(root.attribute("role"), Some("img"));
        assert_eq!(root.attribute("aria-label"), Some("loss against lr"));
        assert_eq!(view_box(&doc), (640.0, 360.0));

        let circles = find(&doc, "circle", "pt");
        let tips: Vec<String> = circles.iter().map(tip).collect();
        assert_eq!(
            tips,
            ["lr=0.1, loss=1", "lr=0.2, loss=0.5", "lr=0.3, loss=0.25"]
        );
        let (left, top, right, bottom) = plot_area(&doc);
        for c in &circles {
            let (cx, cy) = (num(c, "cx"), num(c, "cy"));
            assert!((left..=right).contains(&cx) && (top..=bottom).contains(&cy));
        }
        // Larger lr to the right, larger loss higher up.
        assert!(num(&circles[0], "cx") < num(&circles[1], "cx"));
        assert!(num(&circles[1], "cx") < num(&circles[2], "cx"));
        assert!(num(&circles[0], "cy") < num(&circles[1], "cy"));
        assert_eq!(note(&doc), "", "nothing skipped, nothing thinned");
        assert_inside_view_box(&doc);
    }

    #[test]
    fn hostile_text_is_escaped_everywhere() {
        let metric = "]]>'<b>&amp;";
        let points = vec![(json!(HOSTILE), 1.0), (json!("x\u{0}y\u{1b}"), 2.0)];
        let svg = scatter(HOSTILE, metric, &points);
        let params = vec![HOSTILE.to_owned(), "b".to_owned()];
        let rows = vec![(vec![json!(HOSTILE), json!(1)], 1.0)];
        let pc = parallel_coordinates(&params, metric, &rows);
        for svg in [&svg, &pc] {
            assert!(!svg.contains("<script"), "{svg}");
            assert!(!svg.contains("<b>"), "{svg}");
            assert!(!svg.contains("]]>"), "{svg}");
            let doc = parse(svg);
            let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
            assert!(
                texts.contains(&HOSTILE),
                "no exact {HOSTILE:?} in {texts:?}"
            );
            assert!(texts.contains(&metric), "no exact {metric:?} in {texts:?}");
            let label = doc.root_element().attribute("aria-label").expect("label");
            assert!(label.contains(HOSTILE) && label.contains(metric), "{label}");
            assert_inside_view_box(&doc);
        }
        let doc = parse(&svg);
        let tips: Vec<String> = find(&doc, "circle", "pt").iter().map(tip).collect();
        assert_eq!(
            tips,
            [
                format!("{HOSTILE}={HOSTILE}, {metric}=1"),
                // Characters XML cannot carry at all are replaced, not dropped silently.
                format!("{HOSTILE}=x\u{FFFD}y\u{FFFD}, {metric}=2"),
            ]
        );
        let (kind, labels) = x_axis(&svg);
        assert_eq!(kind, "category");
        assert_eq!(labels[1], "x\u{FFFD}y\u{FFFD}");
    }

    #[test]
    fn escaping_keeps_tabs_and_line_breaks_in_attributes() {
        let name = "a\tb\nc\r\"d'";
        let svg = scatter(name, "m", &[(json!(1), 1.0)]);
        let doc = parse(&svg);
        let label = doc.root_element().attribute("aria-label").expect("label");
        assert_eq!(label, format!("m against {name}"));
    }

    #[test]
    fn learning_rates_get_a_log_axis_labelled_in_powers_of_ten() {
        let svg = scatter("lr", "loss", &numbers(&[1e-4, 1e-3, 1e-2, 1e-1], 1.0));
        assert_eq!(
            x_axis(&svg),
            (
                "log".to_owned(),
                vec!["1e-4".into(), "0.001".into(), "0.01".into(), "0.1".into()]
            )
        );
        // Decades are evenly spaced.
        let doc = parse(&svg);
        let xs: Vec<f64> = find(&doc, "circle", "pt")
            .iter()
            .map(|c| num(c, "cx"))
            .collect();
        let gap = xs[1] - xs[0];
        assert!(gap > 50.0);
        for pair in xs.windows(2) {
            assert!((pair[1] - pair[0] - gap).abs() < 0.2, "{xs:?}");
        }
        assert_inside_view_box(&doc);
    }

    #[test]
    fn small_ranges_zero_and_negative_values_get_nice_linear_axes() {
        let (kind, labels) = x_axis(&scatter("n", "m", &numbers(&[1.0, 2.0, 3.0], 1.0)));
        assert_eq!(kind, "linear");
        assert_eq!(labels, ["1", "1.5", "2", "2.5", "3"]);
        for xs in [
            &[0.0, 1000.0][..],
            &[-1.0, 1000.0],
            &[1.0, 50.0],
            &[0.0, 0.37],
            &[-20.0, 130.0],
            &[1e6, 1e6 + 3.0],
            &[3e-9, 7e-9],
            &[42.0],
        ] {
            let (kind, labels) = x_axis(&scatter("n", "m", &numbers(xs, 1.0)));
            assert_eq!(kind, "linear", "{xs:?}");
            assert_nice(&labels);
        }
    }

    #[test]
    fn strings_bools_and_mixed_values_get_categories_in_first_seen_order() {
        let values = [json!("sgd"), json!("adam"), json!("sgd"), json!("rmsprop")];
        let points: Vec<(Value, f64)> = values.iter().map(|v| (v.clone(), 1.0)).collect();
        let svg = scatter("optimizer", "loss", &points);
        assert_eq!(
            x_axis(&svg),
            (
                "category".to_owned(),
                vec!["sgd".into(), "adam".into(), "rmsprop".into()]
            )
        );
        // Both "sgd" points stay in the first of three bands, jittered apart.
        let doc = parse(&svg);
        let (left, _, right, _) = plot_area(&doc);
        let xs: Vec<f64> = find(&doc, "circle", "pt")
            .iter()
            .map(|c| num(c, "cx"))
            .collect();
        let band = (right - left) / 3.0;
        assert!(xs[0] < left + band && xs[2] < left + band, "{xs:?}");
        assert!(
            (xs[0] - xs[2]).abs() > 0.1,
            "duplicates not jittered: {xs:?}"
        );

        let bools = [(json!(true), 1.0), (json!(false), 2.0), (json!(true), 3.0)];
        assert_eq!(
            x_axis(&scatter("flag", "loss", &bools)),
            ("category".to_owned(), vec!["true".into(), "false".into()])
        );
        let mixed = [
            (json!(1), 1.0),
            (json!("a"), 2.0),
            (Value::Null, 3.0),
            (json!("1"), 4.0),
        ];
        assert_eq!(
            x_axis(&scatter("p", "loss", &mixed)),
            (
                "category".to_owned(),
                vec!["1".into(), "a".into(), "null".into(), "1".into()]
            )
        );
    }

    #[test]
    fn non_finite_metrics_are_skipped_and_counted() {
        let points = vec![
            (json!(1), 0.5),
            (json!(2), f64::NAN),
            (json!(3), f64::INFINITY),
        ];
        let svg = scatter("p", "loss", &points);
        let doc = parse(&svg);
        assert_eq!(find(&doc, "circle", "pt").len(), 1);
        assert_eq!(note(&doc), "2 skipped: metric not finite");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");

        let rows = vec![(vec![json!(1)], 0.5), (vec![json!(2)], f64::NAN)];
        let doc_pc = parallel_coordinates(&["p".to_owned()], "loss", &rows);
        let doc = parse(&doc_pc);
        assert_eq!(find(&doc, "polyline", "pc").len(), 1);
        assert_eq!(note(&doc), "1 skipped: metric not finite");

        let hist = durations(&[1.0, f64::NAN, 2.0, f64::NEG_INFINITY]);
        let doc = parse(&hist);
        assert_eq!(note(&doc), "2 skipped: duration not finite");
    }

    #[test]
    fn more_than_5000_marks_are_thinned_with_a_note() {
        let points: Vec<(Value, f64)> = (0..12_000).map(|i| (json!(i), f64::from(i))).collect();
        let svg = scatter("i", "m", &points);
        let doc = parse(&svg);
        assert_eq!(find(&doc, "circle", "pt").len(), 5_000);
        assert_eq!(note(&doc), "showing 5,000 of 12,000");
        // The subset spans the whole input, deterministically.
        assert_eq!(svg, scatter("i", "m", &points));
        let tips: Vec<String> = find(&doc, "circle", "pt").iter().map(tip).collect();
        assert_eq!(tips[0], "i=0, m=0");
        assert!(tips[4_999].starts_with("i=1199"), "{}", tips[4_999]);

        let rows: Vec<(Vec<Value>, f64)> = (0..12_000)
            .map(|i| {
                (
                    vec![json!(i % 7), json!(format!("c{}", i % 3))],
                    f64::from(i),
                )
            })
            .collect();
        let params = ["a".to_owned(), "b".to_owned()];
        let doc_pc = parallel_coordinates(&params, "m", &rows);
        let doc = parse(&doc_pc);
        assert_eq!(find(&doc, "polyline", "pc").len(), 5_000);
        assert_eq!(note(&doc), "showing 5,000 of 12,000");
    }

    /// (count, title) of each bar.
    fn bars(doc: &Document<'_>) -> Vec<(usize, String)> {
        find(doc, "rect", "bar")
            .iter()
            .map(|b| {
                let title = tip(b);
                let n = title
                    .rsplit_once(": ")
                    .and_then(|(_, n)| n.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bar title {title:?}"));
                (n, title)
            })
            .collect()
    }

    #[test]
    fn histogram_bins_every_duration() {
        let seconds: Vec<f64> = (0..1_000)
            .map(|i| f64::from(i % 97) * 1.5 + f64::from(i / 100))
            .collect();
        let doc_svg = durations(&seconds);
        let doc = parse(&doc_svg);
        let bars = bars(&doc);
        assert!((2..=40).contains(&bars.len()), "{} bars", bars.len());
        assert_eq!(bars.iter().map(|b| b.0).sum::<usize>(), seconds.len());
        assert!(bars[0].1.starts_with("0–"), "{}", bars[0].1);
        assert!(bars[0].1.contains(" s: "), "{}", bars[0].1);
        assert_eq!(x_axis(&doc_svg).0, "linear");
        assert_inside_view_box(&doc);
        // The tallest bar holds the most jobs.
        let rects = find(&doc, "rect", "bar");
        let tallest = (0..rects.len())
            .max_by(|&a, &b| num(&rects[a], "height").total_cmp(&num(&rects[b], "height")))
            .expect("bars");
        assert_eq!(bars[tallest].0, bars.iter().map(|b| b.0).max().unwrap_or(0));

        // Many values: still at most 40 bins, still every value counted.
        let many: Vec<f64> = (0..100_000).map(|i| f64::from(i).sqrt()).collect();
        let doc_svg = durations(&many);
        let bars = self::bars(&parse(&doc_svg));
        assert!(bars.len() <= 40);
        assert_eq!(bars.iter().map(|b| b.0).sum::<usize>(), many.len());
    }

    #[test]
    fn equal_durations_share_one_bar() {
        let svg = durations(&[5.0; 7]);
        let doc = parse(&svg);
        assert_eq!(bars(&doc), [(7, "4.5–5.5 s: 7 jobs".to_owned())]);
        assert_inside_view_box(&doc);
        let one = durations(&[12.0]);
        assert_eq!(bars(&parse(&one)), [(1, "11.4–12.6 s: 1 job".to_owned())]);
    }

    #[test]
    fn empty_or_all_skipped_input_says_no_data_yet() {
        let params = ["p".to_owned()];
        for svg in [
            scatter("p", "m", &[]),
            parallel_coordinates(&params, "m", &[]),
            durations(&[]),
        ] {
            let doc = parse(&svg);
            assert_eq!(note(&doc), "no data yet");
            assert_eq!(view_box(&doc), (640.0, 80.0));
            assert!(find(&doc, "circle", "pt").is_empty());
        }
        let svg = scatter("p", "m", &[(json!(1), f64::NAN)]);
        let doc = parse(&svg);
        assert_eq!(note(&doc), "no data yet; 1 skipped: metric not finite");
        let svg = durations(&[f64::INFINITY]);
        assert!(note(&parse(&svg)).starts_with("no data yet"));
    }

    #[test]
    fn parallel_coordinates_draw_one_coloured_line_per_job() {
        let params = ["lr".to_owned(), "optimizer".to_owned(), "layers".to_owned()];
        let rows = vec![
            (vec![json!(1e-4), json!("sgd"), json!(2)], 0.9),
            (vec![json!(1e-2), json!("adam"), json!(4)], 0.1),
            (vec![json!(1e-1), json!("sgd"), json!(3)], 0.5),
            // Short row: the missing layers count as null, which makes that axis categorical.
            (vec![json!(1e-3), json!("adam")], 0.3),
        ];
        let svg = parallel_coordinates(&params, "loss", &rows);
        let doc = parse(&svg);
        assert_eq!(view_box(&doc), (960.0, 400.0));
        let kinds: Vec<String> = axes(&doc).into_iter().map(|a| a.0).collect();
        assert_eq!(kinds, ["log", "category", "category", "linear"]);
        assert_eq!(axes(&doc)[1].1, ["sgd", "adam"]);
        assert_eq!(axes(&doc)[2].1, ["2", "4", "3", "null"]);

        let axis_xs: Vec<String> = find(&doc, "g", "axis")
            .iter()
            .filter_map(|g| g.children().find(|n| has_class(n, "axis")))
            .map(|l| format!("{:.1}", num(&l, "x1")))
            .collect();
        let lines = find(&doc, "polyline", "pc");
        assert_eq!(lines.len(), 4);
        for line in &lines {
            let xs: Vec<String> = line
                .attribute("points")
                .expect("points")
                .split(' ')
                .map(|p| p.split(',').next().unwrap_or("").to_owned())
                .collect();
            assert_eq!(xs, axis_xs, "one vertex per axis, in order");
        }
        assert_eq!(
            tip(&lines[0]),
            "lr=0.0001, optimizer=sgd, layers=2, loss=0.9"
        );
        // Highest metric at the top of the gradient, lowest at the bottom.
        assert_eq!(lines[0].attribute("stroke"), Some("#fde725"));
        assert_eq!(lines[1].attribute("stroke"), Some("#440154"));
        let legend = find(&doc, "g", "legend");
        assert_eq!(legend.len(), 1);
        let swatches = legend[0]
            .children()
            .filter(|n| n.has_tag_name("rect"))
            .count();
        assert!(swatches > 10);
        assert_inside_view_box(&doc);
    }

    #[test]
    fn parallel_coordinates_without_parameters_still_render() {
        let svg = parallel_coordinates(&[], "loss", &[(vec![], 1.0), (vec![json!(3)], 2.0)]);
        let doc = parse(&svg);
        assert_eq!(find(&doc, "polyline", "pc").len(), 2);
        assert_eq!(axes(&doc).len(), 1);
        assert_inside_view_box(&doc);
    }

    #[test]
    fn extreme_values_render_inside_the_view_box() {
        let extremes = [-f64::MAX, f64::MAX, 5e-324, -0.0];
        for xs in [
            &extremes[..],
            &[5e-324, 1e-323],
            &[f64::MAX],
            &[1e-300, 1e300],
        ] {
            let points: Vec<(Value, f64)> = xs.iter().map(|&x| (json!(x), x)).collect();
            let doc_svg = scatter("x", "x", &points);
            let doc = parse(&doc_svg);
            assert_eq!(find(&doc, "circle", "pt").len(), xs.len());
            assert_inside_view_box(&doc);

            let rows: Vec<(Vec<Value>, f64)> = xs.iter().map(|&x| (vec![json!(x)], x)).collect();
            let doc_svg = parallel_coordinates(&["x".to_owned()], "x", &rows);
            assert_inside_view_box(&parse(&doc_svg));

            let doc_svg = durations(xs);
            let doc = parse(&doc_svg);
            assert_eq!(bars(&doc).iter().map(|b| b.0).sum::<usize>(), xs.len());
            assert_inside_view_box(&doc);
        }
    }

    #[test]
    fn numbers_are_compact_and_never_nan() {
        let cases = [
            (0.001, "0.001"),
            (1e-4, "1e-4"),
            (0.5, "0.5"),
            (1.0, "1"),
            (100.0, "100"),
            (12_345.678, "12350"),
            (123_456.0, "1.235e5"),
            (99_999.5, "1e5"),
            (-2.5e-7, "-2.5e-7"),
            (-0.0, "0"),
            (f64::NAN, "?"),
            (f64::NEG_INFINITY, "-∞"),
        ];
        for (v, want) in cases {
            assert_eq!(fmt_num(v), want, "{v}");
        }
        assert_eq!(tick_label(0.1 + 0.2, Some(-1)), "0.3");
        assert_eq!(tick_label(10_002.0, Some(0)), "10002");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            number_value(),
            any::<String>().prop_map(Value::String),
            Just(json!(["nested", {"a": "<b>"}])),
        ]
    }

    fn number_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>(),
            -1e3..1e3f64,
            1e-6..1.0f64,
            Just(f64::MAX),
            Just(5e-324),
        ]
        .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number))
    }

    fn any_metric() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            -1e3..1e3f64,
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MAX),
            Just(-f64::MAX),
            Just(5e-324),
            Just(0.0),
        ]
    }

    /// A column of parameter values: all numbers (numeric axes) or anything (category axes).
    fn column(len: usize) -> impl Strategy<Value = Vec<Value>> {
        prop_oneof![
            prop::collection::vec(number_value(), len),
            prop::collection::vec(any_value(), len),
        ]
    }

    proptest! {
        #[test]
        fn random_input_never_panics_and_stays_well_formed(
            param in any::<String>(),
            metric in any::<String>(),
            (xs, metrics) in (0..40usize).prop_flat_map(|n| {
                (column(n), prop::collection::vec(any_metric(), n))
            }),
            params in prop::collection::vec(any::<String>(), 0..4),
            extra in column(8),
        ) {
            let points: Vec<(Value, f64)> = xs.iter().cloned().zip(metrics.iter().copied()).collect();
            let svg = scatter(&param, &metric, &points);
            let doc = parse(&svg);
            let drawn = points.iter().filter(|p| p.1.is_finite()).count();
            prop_assert_eq!(find(&doc, "circle", "pt").len(), drawn);
            assert_inside_view_box(&doc);

            // Rows of uneven length: each takes a few values from `xs` and `extra`.
            let rows: Vec<(Vec<Value>, f64)> = points
                .iter()
                .enumerate()
                .map(|(i, (x, m))| {
                    let mut row = vec![x.clone()];
                    row.extend(extra.iter().skip(i % 3).take(i % 4).cloned());
                    (row, *m)
                })
                .collect();
            let svg = parallel_coordinates(&params, &metric, &rows);
            let doc = parse(&svg);
            prop_assert_eq!(find(&doc, "polyline", "pc").len(), drawn);
            assert_inside_view_box(&doc);

            let svg = durations(&metrics);
            let doc = parse(&svg);
            let binned: usize = bars(&doc).iter().map(|b| b.0).sum();
            prop_assert_eq!(binned, drawn);
            prop_assert!(bars(&doc).len() <= 40);
            assert_inside_view_box(&doc);
        }
    }
}
