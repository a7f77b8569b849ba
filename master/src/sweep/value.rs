//! Parameter values: core-schema scalar resolution, exact decimal numbers and intervals.
//!
//! # The number rule
//! A scalar is rendered exactly as written (`1e-5` stays `1e-5`); gridq never re-prints a
//! number it was given. Numbers that gridq computes (interval elements) are computed in exact
//! decimal arithmetic, never in binary floating point:
//!
//! - `range` / `!!python/tuple [start, end, step]`: element *i* is `start + i*step`, exactly, for
//!   every *i* with the element strictly before `end` (numpy.arange's interval, without its
//!   floating-point error). `[0.1, 0.5, 0.1]` is `0.1, 0.2, 0.3, 0.4`.
//! - `linspace: [start, stop, num]`: element *i* is `start + (stop-start)*i/(num-1)`, computed in
//!   decimal and rounded to 15 significant digits; the last element is `stop` itself.
//! - `geomspace: [start, stop, num]`: element *i* is `start*(stop/start)^(i/(num-1))`, rounded to
//!   15 significant digits (the digits a binary double always holds); both ends are exact.
//!
//! A range renders as integers when start, end and step are all integers; linspace and
//! geomspace render as integers when start and stop are integers and every element is a whole
//! number. Otherwise every element renders as the shortest decimal with at least one digit after
//! the point (`0.3`, `1.0`).

use std::str::FromStr;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

/// What a plain (unquoted) scalar resolves to under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolved {
    Null,
    Bool(bool),
    Int,
    Float,
    Str,
}

/// Resolves a plain scalar by the YAML 1.2 core schema. Quoted scalars are always strings.
pub(crate) fn resolve_plain(text: &str) -> Resolved {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "true" | "True" | "TRUE" => return Resolved::Bool(true),
        "false" | "False" | "FALSE" => return Resolved::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return Resolved::Float,
        _ => {}
    }
    if is_core_int(text) {
        Resolved::Int
    } else if is_core_float(text) {
        Resolved::Float
    } else {
        Resolved::Str
    }
}

/// YAML 1.1 booleans that YAML 1.2 reads as strings; gridq warns about them.
pub(crate) fn is_yaml11_bool(text: &str) -> bool {
    matches!(
        text.to_ascii_lowercase().as_str(),
        "yes" | "no" | "on" | "off" | "y" | "n"
    )
}

fn is_core_int(t: &str) -> bool {
    if let Some(hex) = t.strip_prefix("0x") {
        return !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    if let Some(oct) = t.strip_prefix("0o") {
        return !oct.is_empty() && oct.bytes().all(|b| (b'0'..=b'7').contains(&b));
    }
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(t: &str) -> bool {
    let b = t.strip_prefix(['-', '+']).unwrap_or(t).as_bytes();
    let mut i = 0;
    let int_digits = count_digits(&b[i..]);
    i += int_digits;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = count_digits(&b[i..]);
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let exp = count_digits(&b[i..]);
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == b.len()
}

fn count_digits(b: &[u8]) -> usize {
    b.iter().take_while(|c| c.is_ascii_digit()).count()
}

/// Why a core-schema int or float has no finite binary double, the number type of JSON and of
/// most programs that read the value: `1e400` overflows, `.inf` and `.nan` are not numbers.
/// `None` when it is finite; hexadecimal and octal integers always count as finite.
pub(crate) fn non_finite(text: &str) -> Option<&'static str> {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    if matches!(body, ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN") {
        return Some("is not a finite number");
    }
    if body.starts_with("0x") || body.starts_with("0o") {
        return None;
    }
    match body.parse::<f64>() {
        Ok(v) if !v.is_finite() => Some("is out of range for a number"),
        _ => None,
    }
}

/// Parses a core-schema int or float into an exact decimal. `None` for infinities, NaN and
/// numbers outside the 96-bit decimal range.
pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    let (neg, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let value = if let Some(hex) = body.strip_prefix("0x") {
        Decimal::try_from_i128_with_scale(i128::from_str_radix(hex, 16).ok()?, 0).ok()?
    } else if let Some(oct) = body.strip_prefix("0o") {
        Decimal::try_from_i128_with_scale(i128::from_str_radix(oct, 8).ok()?, 0).ok()?
    } else if body.contains(['e', 'E']) {
        let (mantissa, exp) = body.split_once(['e', 'E'])?;
        let mantissa = Decimal::from_str(&fix_decimal_text(mantissa)).ok()?;
        let exp: i64 = exp.parse().ok()?;
        scale_by_pow10(mantissa, exp)?
    } else {
        Decimal::from_str(&fix_decimal_text(body)).ok()?
    };
    Some(if neg { -value } else { value })
}

/// `.5` -> `0.5`, `5.` -> `5`: forms YAML allows and `Decimal::from_str` may not.
fn fix_decimal_text(t: &str) -> String {
    let mut s = String::with_capacity(t.len() + 1);
    if t.starts_with('.') {
        s.push('0');
    }
    s.push_str(t.strip_suffix('.').unwrap_or(t));
    s
}

fn scale_by_pow10(mut value: Decimal, exp: i64) -> Option<Decimal> {
    if exp.unsigned_abs() > 60 {
        return (value.is_zero()).then_some(Decimal::ZERO);
    }
    let ten = Decimal::TEN;
    for _ in 0..exp.unsigned_abs() {
        value = if exp > 0 {
            value.checked_mul(ten)?
        } else {
            // Exact while the scale stays within 28 digits.
            if value.scale() >= 28 {
                return None;
            }
            let mut v = value;
            v.set_scale(value.scale() + 1).ok()?;
            v
        };
    }
    Some(value)
}

/// Writes a computed decimal: an integer as such, otherwise the shortest decimal with at least
/// one digit after the point.
pub(crate) fn render_decimal(value: Decimal, as_integer: bool) -> String {
    let v = value.normalize();
    if v.is_zero() {
        return if as_integer { "0".into() } else { "0.0".into() };
    }
    let s = v.to_string();
    if as_integer || s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// A computed sequence of numbers, produced lazily by index.
#[derive(Debug, Clone)]
pub(crate) struct Interval {
    kind: IntervalKind,
    len: u64,
    /// Render every element as an integer.
    integer: bool,
}

#[derive(Debug, Clone)]
enum IntervalKind {
    Range {
        start: Decimal,
        step: Decimal,
    },
    Linspace {
        start: Decimal,
        stop: Decimal,
    },
    Geomspace {
        start: f64,
        stop: f64,
        start_dec: Decimal,
        stop_dec: Decimal,
    },
}

/// A bound of an interval: its exact value and whether it was written as an integer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    pub(crate) value: Decimal,
    pub(crate) is_int: bool,
}

/// Significant digits kept for linspace and geomspace elements.
const SIG_DIGITS: u32 = 15;
/// Above this many elements, geomspace does not scan its elements to decide integer rendering.
const GEOM_SCAN_LIMIT: u64 = 1_000_000;

impl Interval {
    /// numpy.arange semantics in exact decimal: `[start, end)` by `step`.
    pub(crate) fn range(start: Bound, end: Bound, step: Bound) -> Result<Self, String> {
        if step.value.is_zero() {
            return Err("step must not be 0".into());
        }
        let len = arange_len(start.value, end.value, step.value)
            .ok_or_else(|| "interval is too large: its bounds or element count exceed what gridq computes exactly".to_string())?;
        if len == 0 {
            return Err(format!(
                "interval [{}, {}) with step {} yields no values",
                start.value, end.value, step.value
            ));
        }
        // Every element lies between start and the last one, so if the last one computes
        // without overflow, all do.
        let last = Decimal::from(len - 1)
            .checked_mul(step.value)
            .and_then(|offset| start.value.checked_add(offset));
        if last.is_none() {
            return Err("interval bounds are too large to compute exactly".into());
        }
        Ok(Self {
            kind: IntervalKind::Range {
                start: start.value,
                step: step.value,
            },
            len,
            integer: start.is_int && end.is_int && step.is_int,
        })
    }

    pub(crate) fn linspace(start: Bound, stop: Bound, num: u64) -> Result<Self, String> {
        if num == 0 {
            return Err("linspace with num 0 yields no values".into());
        }
        let too_large = || "linspace bounds are too large to compute exactly".to_string();
        let span = stop.value.checked_sub(start.value).ok_or_else(too_large)?;
        // Element i is (start*(num-1-i) + stop*i) / (num-1): both terms, and their sum, stay
        // within twice the larger bound times num-1.
        Decimal::from(num - 1)
            .checked_mul(start.value.abs().max(stop.value.abs()))
            .and_then(|m| m.checked_mul(Decimal::TWO))
            .ok_or_else(too_large)?;
        let integer =
            start.is_int && stop.is_int && (num == 1 || (span % Decimal::from(num - 1)).is_zero());
        Ok(Self {
            kind: IntervalKind::Linspace {
                start: start.value,
                stop: stop.value,
            },
            len: num,
            integer,
        })
    }

    pub(crate) fn geomspace(start: Bound, stop: Bound, num: u64) -> Result<Self, String> {
        if num == 0 {
            return Err("geomspace with num 0 yields no values".into());
        }
        if start.value.is_zero() || stop.value.is_zero() {
            return Err("geomspace bounds must not be 0".into());
        }
        if start.value.is_sign_negative() != stop.value.is_sign_negative() {
            return Err("geomspace bounds must have the same sign".into());
        }
        let (Some(s), Some(e)) = (start.value.to_f64(), stop.value.to_f64()) else {
            return Err("geomspace bounds are out of range".into());
        };
        let mut interval = Self {
            kind: IntervalKind::Geomspace {
                start: s,
                stop: e,
                start_dec: start.value,
                stop_dec: stop.value,
            },
            len: num,
            integer: false,
        };
        if start.is_int && stop.is_int && num <= GEOM_SCAN_LIMIT {
            interval.integer = (0..num).all(|i| interval.decimal_at(i).fract().is_zero());
        }
        Ok(interval)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The form's name, for messages.
    pub(crate) fn form(&self) -> &'static str {
        match self.kind {
            IntervalKind::Range { .. } => "range",
            IntervalKind::Linspace { .. } => "linspace",
            IntervalKind::Geomspace { .. } => "geomspace",
        }
    }

    /// Whether every element is distinct by construction (exact ranges are; rounded linspace
    /// and geomspace points may collide).
    pub(crate) fn distinct_by_construction(&self) -> bool {
        matches!(self.kind, IntervalKind::Range { .. })
    }

    /// The exact value of element `i` (`i < len`).
    pub(crate) fn decimal_at(&self, i: u64) -> Decimal {
        match &self.kind {
            IntervalKind::Range { start, step } => *start + *step * Decimal::from(i),
            IntervalKind::Linspace { start, stop } => {
                if i + 1 == self.len && self.len > 1 {
                    return *stop;
                }
                if i == 0 || self.len == 1 {
                    return *start;
                }
                // Weighted so that exact points (0 in [-1, 2]) come out exact.
                let n = self.len - 1;
                let sum = *start * Decimal::from(n - i) + *stop * Decimal::from(i);
                round_sig(sum / Decimal::from(n))
            }
            IntervalKind::Geomspace {
                start,
                stop,
                start_dec,
                stop_dec,
            } => {
                if i + 1 == self.len && self.len > 1 {
                    return *stop_dec;
                }
                if i == 0 || self.len == 1 {
                    return *start_dec;
                }
                let t = i as f64 / (self.len - 1) as f64;
                let v = if *start < 0.0 {
                    -((-start).ln() * (1.0 - t) + (-stop).ln() * t).exp()
                } else {
                    (start.ln() * (1.0 - t) + stop.ln() * t).exp()
                };
                let text = format!("{:.*e}", (SIG_DIGITS - 1) as usize, v);
                parse_decimal(&text).map_or(*start_dec, |d| d.normalize())
            }
        }
    }

    /// The rendered text of element `i`.
    pub(crate) fn render_at(&self, i: u64) -> String {
        render_decimal(self.decimal_at(i), self.integer)
    }

    /// The index of `value` in this interval, if it is an element.
    pub(crate) fn index_of(&self, value: Decimal) -> Option<u64> {
        match &self.kind {
            IntervalKind::Range { start, step } => {
                let offset = value.checked_sub(*start)?.checked_div(*step)?;
                if !offset.fract().is_zero() || offset.is_sign_negative() && !offset.is_zero() {
                    return None;
                }
                let i = offset.to_u64()?;
                (i < self.len).then_some(i)
            }
            _ => (0..self.len.min(GEOM_SCAN_LIMIT)).find(|&i| self.decimal_at(i) == value),
        }
    }
}

fn round_sig(v: Decimal) -> Decimal {
    v.round_sf_with_strategy(SIG_DIGITS, RoundingStrategy::MidpointNearestEven)
        .unwrap_or(v)
        .normalize()
}

/// `max(0, ceil((end - start) / step))`, computed exactly on integer mantissas; `None` when it
/// does not fit the arithmetic or a u64.
fn arange_len(start: Decimal, end: Decimal, step: Decimal) -> Option<u64> {
    let scale = start.scale().max(end.scale()).max(step.scale());
    let as_int = |d: Decimal| -> Option<i128> {
        let factor = 10i128.checked_pow(scale - d.scale())?;
        d.mantissa().checked_mul(factor)
    };
    let diff = as_int(end)?.checked_sub(as_int(start)?)?;
    let step = as_int(step)?;
    let q = diff / step;
    let r = diff % step;
    // Round the quotient up when there is a remainder with the quotient's sign.
    let ceil = if r != 0 && ((r > 0) == (step > 0)) {
        q + 1
    } else {
        q
    };
    u64::try_from(ceil.max(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bound {
        Bound {
            value: parse_decimal(text).unwrap(),
            is_int: resolve_plain(text) == Resolved::Int,
        }
    }

    fn all(i: &Interval) -> Vec<String> {
        (0..i.len()).map(|k| i.render_at(k)).collect()
    }

    #[test]
    fn core_schema() {
        for t in ["1", "-1", "+7", "0x1F", "0o17", "007"] {
            assert_eq!(resolve_plain(t), Resolved::Int, "{t}");
        }
        for t in [
            "1.0", "1e-5", "1.0e-5", ".5", "5.", "-2.5E+3", ".inf", "-.Inf", ".nan", "0.10",
        ] {
            assert_eq!(resolve_plain(t), Resolved::Float, "{t}");
        }
        for t in [
            "yes", "no", "on", "off", "1e", "e5", "0x", "1_000", "1.2.3", "abc", "- 1", ".",
        ] {
            assert_eq!(resolve_plain(t), Resolved::Str, "{t}");
        }
        assert_eq!(resolve_plain("true"), Resolved::Bool(true));
        assert_eq!(resolve_plain("FALSE"), Resolved::Bool(false));
        assert_eq!(resolve_plain("~"), Resolved::Null);
        assert!(is_yaml11_bool("Yes") && is_yaml11_bool("off") && !is_yaml11_bool("true"));
    }

    #[test]
    fn numbers_without_a_finite_double_are_found() {
        for t in [
            "1",
            "-1",
            "0x1F",
            "0o17",
            "1.0",
            "1e-5",
            ".5",
            "5.",
            "1.e5",
            "-2.5E+3",
            "1e308",
            "1e-400",
            "0x1234567890abcdef1234567890abcdef1234567890",
        ] {
            assert_eq!(non_finite(t), None, "{t}");
        }
        for t in ["1e400", "-1e400", "+1E999", "1.8e308"] {
            assert_eq!(non_finite(t), Some("is out of range for a number"), "{t}");
        }
        let huge_int = "9".repeat(400);
        assert_eq!(resolve_plain(&huge_int), Resolved::Int);
        assert_eq!(non_finite(&huge_int), Some("is out of range for a number"));
        for t in [".inf", "-.Inf", "+.INF", ".nan", ".NaN", ".NAN"] {
            assert_eq!(non_finite(t), Some("is not a finite number"), "{t}");
        }
    }

    #[test]
    fn parses_numbers_exactly() {
        assert_eq!(parse_decimal("1e-5").unwrap().to_string(), "0.00001");
        assert_eq!(
            parse_decimal("-2.5E+3").unwrap().normalize().to_string(),
            "-2500"
        );
        assert_eq!(parse_decimal(".5").unwrap().to_string(), "0.5");
        assert_eq!(parse_decimal("5.").unwrap().to_string(), "5");
        assert_eq!(parse_decimal("0x1F").unwrap().to_string(), "31");
        assert_eq!(parse_decimal("-0o17").unwrap().to_string(), "-15");
        assert_eq!(parse_decimal("1e400"), None);
        assert_eq!(parse_decimal("0xFFFFFFFFFFFFFFFFFFFFFFFFFF"), None);
        assert_eq!(parse_decimal(".inf"), None);
    }

    #[test]
    fn decimal_range_has_no_float_error() {
        let r = Interval::range(b("0.1"), b("0.5"), b("0.1")).unwrap();
        assert_eq!(all(&r), ["0.1", "0.2", "0.3", "0.4"]);
        let r = Interval::range(b("0"), b("1"), b("0.1")).unwrap();
        assert_eq!(r.len(), 10);
        assert_eq!(r.render_at(3), "0.3");
        assert_eq!(r.render_at(0), "0.0");
    }

    #[test]
    fn integer_range_and_negative_steps() {
        assert_eq!(
            all(&Interval::range(b("5"), b("20"), b("5")).unwrap()),
            ["5", "10", "15"]
        );
        assert_eq!(
            all(&Interval::range(b("5"), b("0"), b("-2")).unwrap()),
            ["5", "3", "1"]
        );
        assert_eq!(
            all(&Interval::range(b("1"), b("3"), b("1.0")).unwrap()),
            ["1.0", "2.0"]
        );
        assert!(Interval::range(b("0"), b("5"), b("0")).is_err());
        assert!(
            Interval::range(b("5"), b("0"), b("1"))
                .unwrap_err()
                .contains("yields no values")
        );
        assert!(Interval::range(b("0"), b("0"), b("1")).is_err());
        // Bounds at the edge of the decimal range are refused, never a panic.
        let e = Interval::range(b("-7e28"), b("7e28"), b("1e27")).unwrap_err();
        assert_eq!(e, "interval bounds are too large to compute exactly");
        assert!(Interval::range(b("0"), b("1e20"), b("1e-8")).is_err());
        assert!(Interval::linspace(b("-7e28"), b("7e28"), 3).is_err());
        let r = Interval::range(b("-7e28"), b("-6e28"), b("1e27")).unwrap();
        assert_eq!(r.index_of(parse_decimal("7e28").unwrap()), None);
    }

    #[test]
    fn linspace_and_geomspace() {
        assert_eq!(
            all(&Interval::linspace(b("0"), b("1"), 5).unwrap()),
            ["0.0", "0.25", "0.5", "0.75", "1.0"]
        );
        assert_eq!(
            all(&Interval::linspace(b("0"), b("10"), 6).unwrap()),
            ["0", "2", "4", "6", "8", "10"]
        );
        assert_eq!(
            all(&Interval::linspace(b("0"), b("1"), 4).unwrap()),
            ["0.0", "0.333333333333333", "0.666666666666667", "1.0"]
        );
        assert_eq!(
            all(&Interval::linspace(b("0"), b("1"), 11).unwrap())[3],
            "0.3"
        );
        assert_eq!(
            all(&Interval::geomspace(b("16"), b("256"), 5).unwrap()),
            ["16", "32", "64", "128", "256"]
        );
        assert_eq!(
            all(&Interval::geomspace(b("1e-4"), b("1e-1"), 4).unwrap()),
            ["0.0001", "0.001", "0.01", "0.1"]
        );
        assert_eq!(
            all(&Interval::geomspace(b("-1"), b("-100"), 3).unwrap()),
            ["-1", "-10", "-100"]
        );
        assert!(Interval::geomspace(b("0"), b("1"), 3).is_err());
        assert!(Interval::geomspace(b("-1"), b("1"), 3).is_err());
        assert!(Interval::linspace(b("0"), b("1"), 0).is_err());
    }

    #[test]
    fn index_of_elements() {
        let r = Interval::range(b("0.1"), b("0.5"), b("0.1")).unwrap();
        assert_eq!(r.index_of(parse_decimal("0.30").unwrap()), Some(2));
        assert_eq!(r.index_of(parse_decimal("0.5").unwrap()), None);
        assert_eq!(r.index_of(parse_decimal("0.25").unwrap()), None);
        assert_eq!(r.index_of(parse_decimal("0").unwrap()), None);
        let g = Interval::geomspace(b("1"), b("100"), 3).unwrap();
        assert_eq!(g.index_of(parse_decimal("10").unwrap()), Some(1));
    }
}
