//! Cron schedules for workloads (`workload.cron`, device-worker-ng extension, PROTOCOL.md §7).
//!
//! The protocol carries the spec as a bare string (`EdgeWorkload.spec.cron`), with no field
//! count or dialect stated; the Go rewrite handed it to a Go cron library. This module accepts
//! the common ground:
//!
//! - five fields `minute hour day-of-month month day-of-week`, each a `,` list of `*`, `n`,
//!   `a-b`, with an optional `/step` (`*/15`, `0-30/10`, and `5/15` meaning `5-max/15`);
//!   months `JAN`–`DEC` and weekdays `SUN`–`SAT` by name (any case); day-of-week `0`–`7`
//!   with both `0` and `7` Sunday; `?` is accepted as `*` in the two day fields;
//! - `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`;
//! - `@every <duration>` (`30s`, `5m`, `1h`: whole seconds), aligned to the Unix epoch so that
//!   the schedule, like a five-field one, depends on the wall clock only and a restart of the
//!   agent does not shift it.
//!
//! Day matching follows Vixie cron: when both day fields are restricted, a day matches if
//! **either** matches (`0 0 1 * MON` = the 1st and every Monday); when either field starts
//! with `*` (including `*/2`), both must match.
//!
//! Times are **UTC**: small devices often have no time-zone database, and a schedule that moves
//! with DST changes would run twice or not at all once a year. A spec that can never fire
//! (`0 0 30 FEB *`) is rejected at parse time, so [`Schedule::next_after`] only returns `None`
//! past the year 9999.
//!
//! Whether a run is still going when the next one is due is the controller's business; this
//! module only says when runs are due.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

/// A parse error: `offset` is the byte offset in the spec, `column` the 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}{}: {message}", .field.map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct CronError {
    pub offset: usize,
    pub column: usize,
    /// The field the error is in, when it is in one.
    pub field: Option<&'static str>,
    pub message: String,
}

/// A parsed cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    source: String,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Fields(Fields),
    /// Every that many seconds, counted from the Unix epoch.
    Every(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    minutes: u64,
    hours: u64,
    /// Bits 1..=31.
    days_of_month: u64,
    /// Bits 1..=12.
    months: u64,
    /// Bits 0..=6, Sunday = 0.
    days_of_week: u64,
    /// The field started with `*` (Vixie's DOM_STAR / DOW_STAR).
    dom_star: bool,
    dow_star: bool,
}

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// `?` allowed as `*`.
    question: bool,
}

const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    question: false,
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    question: false,
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
    question: true,
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    // index + min = value
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    question: false,
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    question: true,
};

impl Schedule {
    pub fn parse(spec: &str) -> Result<Schedule, CronError> {
        let words = split_words(spec);
        let err = |offset: usize, field: Option<&'static str>, message: String| CronError {
            offset,
            column: spec[..offset].chars().count() + 1,
            field,
            message,
        };
        let Some(&(first_at, first)) = words.first() else {
            return Err(err(
                spec.len(),
                None,
                "empty schedule: expected five fields (minute hour day-of-month month day-of-week) or @hourly, @daily, @weekly, @monthly, @yearly, @every <duration>".to_string(),
            ));
        };
        let kind = if let Some(name) = first.strip_prefix('@') {
            let expected_words = if name.eq_ignore_ascii_case("every") {
                2
            } else {
                1
            };
            if words.len() > expected_words {
                let (at, w) = words[expected_words];
                return Err(err(at, None, format!("unexpected '{w}' after '{first}'")));
            }
            let fields = |s: &str| parse_fields(&split_words(s), s);
            match name.to_ascii_lowercase().as_str() {
                "yearly" | "annually" => fields("0 0 1 1 *")?,
                "monthly" => fields("0 0 1 * *")?,
                "weekly" => fields("0 0 * * 0")?,
                "daily" | "midnight" => fields("0 0 * * *")?,
                "hourly" => fields("0 * * * *")?,
                "every" => {
                    let Some(&(at, text)) = words.get(1) else {
                        return Err(err(spec.len(), None, "expected a duration after '@every' (e.g. 30s, 5m, 1h)".to_string()));
                    };
                    let d = crate::units::parse_duration(text)
                        .map_err(|e| err(at, None, e.to_string()))?;
                    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
                        return Err(err(
                            at,
                            None,
                            format!("'{text}' is not a whole, positive number of seconds"),
                        ));
                    }
                    Kind::Every(d.as_secs())
                }
                _ => {
                    return Err(err(
                        first_at,
                        None,
                        format!("unknown '{first}' (use @hourly, @daily, @weekly, @monthly, @yearly or @every <duration>)"),
                    ))
                }
            }
        } else {
            parse_fields(&words, spec)?
        };
        Ok(Schedule {
            source: spec.trim().to_string(),
            kind,
        })
    }

    /// The spec as written (trimmed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first time strictly after `t` at which the schedule fires (UTC, whole minutes for
    /// five-field specs); `None` only past the year 9999.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let secs = unix_seconds(t);
        match &self.kind {
            Kind::Every(period) => {
                let period = i64::try_from(*period).ok()?;
                let next = secs
                    .div_euclid(period)
                    .checked_add(1)?
                    .checked_mul(period)?;
                from_unix_seconds(next)
            }
            Kind::Fields(f) => from_unix_seconds(f.next_after(secs)?),
        }
    }

    /// Whether the schedule fires in the minute (five fields) or at the second (`@every`) of `t`.
    pub fn matches(&self, t: SystemTime) -> bool {
        let secs = unix_seconds(t);
        match &self.kind {
            Kind::Every(period) => secs.rem_euclid(*period as i64) == 0,
            Kind::Fields(f) => {
                let day = secs.div_euclid(86_400);
                let minute_of_day = secs.rem_euclid(86_400) / 60;
                let (_, month, dom) = civil_from_days(day);
                f.months & bit(month) != 0
                    && f.day_matches(dom, weekday(day))
                    && f.hours & bit((minute_of_day / 60) as u32) != 0
                    && f.minutes & bit((minute_of_day % 60) as u32) != 0
            }
        }
    }
}

impl FromStr for Schedule {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Schedule, CronError> {
        Schedule::parse(s)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Words separated by ASCII whitespace, with their byte offsets.
fn split_words(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        match (c.is_ascii_whitespace(), start) {
            (true, Some(st)) => {
                out.push((st, &s[st..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((st, &s[st..]));
    }
    out
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

fn parse_fields(words: &[(usize, &str)], spec: &str) -> Result<Kind, CronError> {
    let err = |offset: usize, field: Option<&'static str>, message: String| CronError {
        offset,
        column: spec[..offset].chars().count() + 1,
        field,
        message,
    };
    if words.len() != 5 {
        let (at, hint) = match words.len() {
            6 => (words[5].0, "; a seconds or year field is not supported"),
            n if n > 5 => (words[5].0, ""),
            _ => (spec.len(), ""),
        };
        return Err(err(
            at,
            None,
            format!(
                "expected five fields (minute hour day-of-month month day-of-week), found {}{hint}",
                words.len()
            ),
        ));
    }
    let specs = [&MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK];
    let mut sets = [0u64; 5];
    for (i, ((at, text), fs)) in words.iter().zip(specs).enumerate() {
        sets[i] = parse_field(text, fs).map_err(|(off, msg)| err(at + off, Some(fs.name), msg))?;
    }
    let star = |w: &str| w.starts_with('*') || w.starts_with('?');
    let mut days_of_week = sets[4];
    if days_of_week & bit(7) != 0 {
        days_of_week = (days_of_week & !bit(7)) | bit(0);
    }
    let fields = Fields {
        minutes: sets[0],
        hours: sets[1],
        days_of_month: sets[2],
        months: sets[3],
        days_of_week,
        dom_star: star(words[2].1),
        dow_star: star(words[4].1),
    };
    // With the weekday unrestricted only the days of month count: some must exist in some
    // selected month (Feb 29 counts: it exists in leap years).
    if fields.dow_star {
        let possible = (1..=12u32)
            .filter(|m| fields.months & bit(*m) != 0)
            .any(|m| (1..=max_days(m)).any(|d| fields.days_of_month & bit(d) != 0));
        if !possible {
            return Err(err(
                words[2].0,
                Some(DAY_OF_MONTH.name),
                "no selected day of month exists in the selected months, so the schedule never fires"
                    .to_string(),
            ));
        }
    }
    Ok(Kind::Fields(fields))
}

/// Parses one field into a bit set; errors carry the byte offset within the field.
fn parse_field(text: &str, fs: &FieldSpec) -> Result<u64, (usize, String)> {
    let mut set = 0u64;
    let mut offset = 0;
    for item in text.split(',') {
        if item.is_empty() {
            return Err((offset, "empty list item".to_string()));
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some((s, offset + r.len() + 1))),
            None => (item, None),
        };
        let full = (fs.min, if fs.max == 7 { 6 } else { fs.max });
        let (lo, hi) = if range == "*" || (fs.question && range == "?") {
            full
        } else if let Some((a, b)) = range.split_once('-') {
            let lo = value(a, fs).map_err(|m| (offset, m))?;
            let hi = value(b, fs).map_err(|m| (offset + a.len() + 1, m))?;
            if lo > hi {
                return Err((
                    offset,
                    format!("range {range} runs backwards (ranges do not wrap around)"),
                ));
            }
            (lo, hi)
        } else {
            let v = value(range, fs).map_err(|m| (offset, m))?;
            // `5/15` means from 5 to the end, as in most crons.
            (v, if step.is_some() { full.1 } else { v })
        };
        let step = match step {
            None => 1,
            Some((s, at)) => {
                let n: u32 = s
                    .parse()
                    .ok()
                    .filter(|n| (1..=fs.max.max(1)).contains(n))
                    .ok_or_else(|| {
                        (
                            at,
                            format!("step '{s}' is not a number from 1 to {}", fs.max),
                        )
                    })?;
                n
            }
        };
        let mut v = lo;
        while v <= hi {
            set |= bit(v);
            v += step;
        }
        offset += item.len() + 1;
    }
    Ok(set)
}

fn value(text: &str, fs: &FieldSpec) -> Result<u32, String> {
    if let Some(i) = fs.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(i as u32 + fs.min);
    }
    let what = if fs.names.is_empty() {
        format!("a number from {} to {}", fs.min, fs.max)
    } else {
        format!(
            "a number from {} to {} or a name {}-{}",
            fs.min,
            fs.max,
            fs.names[0],
            fs.names[fs.names.len() - 1]
        )
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected {what}, found '{text}'"));
    }
    match text.parse::<u32>() {
        Ok(v) if (fs.min..=fs.max).contains(&v) => Ok(v),
        _ => Err(format!("{text} is out of range: expected {what}")),
    }
}

impl Fields {
    fn day_matches(&self, dom: u32, dow: u32) -> bool {
        let dom_ok = self.days_of_month & bit(dom) != 0;
        let dow_ok = self.days_of_week & bit(dow) != 0;
        if self.dom_star || self.dow_star {
            dom_ok && dow_ok
        } else {
            dom_ok || dow_ok
        }
    }

    /// The first matching minute strictly after `secs` (Unix seconds, UTC).
    fn next_after(&self, secs: i64) -> Option<i64> {
        let start = secs.div_euclid(60).checked_add(1)?.checked_mul(60)?;
        let mut day = start.div_euclid(86_400);
        let mut from_minute = (start.rem_euclid(86_400) / 60) as u32;
        // Parse-time validation guarantees a match within 8 years (Feb 29 across a
        // non-leap century year); each iteration advances at least a day, or a month.
        for _ in 0..(9 * 366) {
            let (year, month, dom) = civil_from_days(day);
            if year > 9999 {
                return None;
            }
            if self.months & bit(month) == 0 {
                let (y, m) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                day = days_from_civil(y, m, 1);
                from_minute = 0;
                continue;
            }
            if self.day_matches(dom, weekday(day)) {
                if let Some(m) = self.first_minute_from(from_minute) {
                    return Some(day * 86_400 + i64::from(m) * 60);
                }
            }
            day += 1;
            from_minute = 0;
        }
        None
    }

    /// The first matching minute of a day at or after `from` (minute of the day).
    fn first_minute_from(&self, from: u32) -> Option<u32> {
        (from / 60..24)
            .filter(|h| self.hours & bit(*h) != 0)
            .find_map(|h| {
                let first = if h == from / 60 { from % 60 } else { 0 };
                (first..60)
                    .find(|m| self.minutes & bit(*m) != 0)
                    .map(|m| h * 60 + m)
            })
    }
}

fn max_days(month: u32) -> u32 {
    match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

use crate::clock::{from_unix_seconds, unix_seconds};

/// Weekday of a day counted from 1970-01-01 (Sunday = 0); days out of the calendar's range
/// match nothing.
fn weekday(day: i64) -> u32 {
    crate::clock::weekday(day).unwrap_or(u32::MAX)
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    crate::clock::civil_from_days(days).unwrap_or((i64::MAX, 0, 0))
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    crate::clock::days_from_civil(year, month, day).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    fn at(s: &str) -> SystemTime {
        OffsetDateTime::parse(s, &Rfc3339)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .into()
    }

    fn show(t: SystemTime) -> String {
        OffsetDateTime::from(t).format(&Rfc3339).unwrap()
    }

    fn next(spec: &str, from: &str) -> String {
        let s = Schedule::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        show(s.next_after(at(from)).unwrap())
    }

    /// Successive runs from `from`.
    fn runs(spec: &str, from: &str, n: usize) -> Vec<String> {
        let s = Schedule::parse(spec).unwrap();
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                assert!(s.matches(t), "{spec} at {}", show(t));
                show(t)
            })
            .collect()
    }

    #[test]
    fn next_runs_table() {
        let cases: &[(&str, &str, &str)] = &[
            ("* * * * *", "2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"),
            (
                "* * * * *",
                "2024-01-01T00:00:59.999Z",
                "2024-01-01T00:01:00Z",
            ),
            (
                "*/15 * * * *",
                "2024-01-01T00:14:00Z",
                "2024-01-01T00:15:00Z",
            ),
            (
                "*/15 * * * *",
                "2024-01-01T00:15:00Z",
                "2024-01-01T00:30:00Z",
            ),
            (
                "*/15 * * * *",
                "2024-01-01T23:59:00Z",
                "2024-01-02T00:00:00Z",
            ),
            (
                "5/20 * * * *",
                "2024-01-01T00:46:00Z",
                "2024-01-01T01:05:00Z",
            ),
            (
                "0-30/10 * * * *",
                "2024-01-01T00:31:00Z",
                "2024-01-01T01:00:00Z",
            ),
            ("0 12 * * *", "2024-01-01T12:00:00Z", "2024-01-02T12:00:00Z"),
            ("30 2 * * *", "2024-01-01T02:29:59Z", "2024-01-01T02:30:00Z"),
            // month ends
            ("0 0 31 * *", "2024-04-01T00:00:00Z", "2024-05-31T00:00:00Z"),
            ("0 0 30 * *", "2024-01-31T00:00:00Z", "2024-03-30T00:00:00Z"),
            ("0 0 1 * *", "2024-12-31T23:59:00Z", "2025-01-01T00:00:00Z"),
            (
                "59 23 31 DEC *",
                "2024-06-01T00:00:00Z",
                "2024-12-31T23:59:00Z",
            ),
            // leap years: Feb 29 waits for one; 2100 is not a leap year
            ("0 0 29 2 *", "2024-03-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            (
                "0 0 29 FEB *",
                "2023-01-01T00:00:00Z",
                "2024-02-29T00:00:00Z",
            ),
            ("0 0 29 2 *", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
            ("0 0 29 2 *", "2000-01-01T00:00:00Z", "2000-02-29T00:00:00Z"),
            // day of week: 0 and 7 are Sunday; 2024-01-07 is a Sunday
            ("0 9 * * 0", "2024-01-01T00:00:00Z", "2024-01-07T09:00:00Z"),
            ("0 9 * * 7", "2024-01-01T00:00:00Z", "2024-01-07T09:00:00Z"),
            (
                "0 9 * * sun",
                "2024-01-01T00:00:00Z",
                "2024-01-07T09:00:00Z",
            ),
            (
                "0 9 * * MON-FRI",
                "2024-01-05T09:00:00Z",
                "2024-01-08T09:00:00Z",
            ),
            (
                "0 9 * * 5-7",
                "2024-01-07T09:00:00Z",
                "2024-01-12T09:00:00Z",
            ),
            (
                "0 9 * * 1,3",
                "2024-01-01T09:00:00Z",
                "2024-01-03T09:00:00Z",
            ),
            // day of month OR day of week when both are restricted (Vixie)
            (
                "0 0 13 * FRI",
                "2024-01-01T00:00:00Z",
                "2024-01-05T00:00:00Z",
            ),
            (
                "0 0 13 * FRI",
                "2024-01-12T00:00:00Z",
                "2024-01-13T00:00:00Z",
            ),
            // ... AND when one starts with '*' (even */n)
            (
                "0 0 */2 * FRI",
                "2024-01-01T00:00:00Z",
                "2024-01-05T00:00:00Z",
            ),
            (
                "0 0 */2 * FRI",
                "2024-01-05T00:00:00Z",
                "2024-01-19T00:00:00Z",
            ),
            (
                "0 0 ? * FRI",
                "2024-01-01T00:00:00Z",
                "2024-01-05T00:00:00Z",
            ),
            // months by name, lists, steps
            (
                "0 0 1 jan,Jul *",
                "2024-01-01T00:00:00Z",
                "2024-07-01T00:00:00Z",
            ),
            (
                "0 0 1 */3 *",
                "2024-01-01T00:00:00Z",
                "2024-04-01T00:00:00Z",
            ),
            (
                "0 0 1 MAR-MAY/2 *",
                "2024-03-01T00:00:00Z",
                "2024-05-01T00:00:00Z",
            ),
            // macros
            ("@hourly", "2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z"),
            ("@daily", "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"),
            ("@midnight", "2024-01-01T13:00:00Z", "2024-01-02T00:00:00Z"),
            ("@weekly", "2024-01-01T00:00:00Z", "2024-01-07T00:00:00Z"),
            ("@monthly", "2024-01-15T00:00:00Z", "2024-02-01T00:00:00Z"),
            ("@yearly", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            ("@ANNUALLY", "2024-06-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            ("@every 30s", "2024-01-01T00:00:00Z", "2024-01-01T00:00:30Z"),
            (
                "@every 30s",
                "2024-01-01T00:00:29.5Z",
                "2024-01-01T00:00:30Z",
            ),
            ("@every 1h", "2024-01-01T00:30:00Z", "2024-01-01T01:00:00Z"),
            ("@every 7m", "1970-01-01T00:00:00Z", "1970-01-01T00:07:00Z"),
            // before 1970 and far ahead
            ("0 0 1 1 *", "1969-06-01T00:00:00Z", "1970-01-01T00:00:00Z"),
            ("* * * * *", "1969-12-31T23:59:30Z", "1970-01-01T00:00:00Z"),
            ("0 0 1 1 *", "9998-06-01T00:00:00Z", "9999-01-01T00:00:00Z"),
            // whitespace
            (
                "  0\t12   *  * *  ",
                "2024-01-01T00:00:00Z",
                "2024-01-01T12:00:00Z",
            ),
        ];
        for (spec, from, want) in cases {
            assert_eq!(next(spec, from), *want, "{spec} after {from}");
        }
    }

    #[test]
    fn successive_runs() {
        assert_eq!(
            runs("0 0 31 * *", "2024-01-01T00:00:00Z", 7),
            [
                "2024-01-31T00:00:00Z",
                "2024-03-31T00:00:00Z",
                "2024-05-31T00:00:00Z",
                "2024-07-31T00:00:00Z",
                "2024-08-31T00:00:00Z",
                "2024-10-31T00:00:00Z",
                "2024-12-31T00:00:00Z",
            ]
        );
        assert_eq!(
            runs("0 0 28-31 2 *", "2023-01-01T00:00:00Z", 3),
            [
                "2023-02-28T00:00:00Z",
                "2024-02-28T00:00:00Z",
                "2024-02-29T00:00:00Z"
            ]
        );
        assert_eq!(
            runs("*/20 23 * * *", "2024-02-28T23:30:00Z", 3),
            [
                "2024-02-28T23:40:00Z",
                "2024-02-29T23:00:00Z",
                "2024-02-29T23:20:00Z"
            ]
        );
        assert_eq!(runs("@every 45s", "2024-01-01T00:00:00Z", 2).len(), 2);
    }

    #[test]
    fn never_past_year_9999() {
        let s = Schedule::parse("0 0 1 1 *").unwrap();
        assert_eq!(s.next_after(at("9999-06-01T00:00:00Z")), None);
    }

    #[test]
    fn matches_the_minute() {
        let s = Schedule::parse("30 8 * * MON").unwrap();
        assert!(s.matches(at("2024-01-01T08:30:59Z")));
        assert!(!s.matches(at("2024-01-01T08:31:00Z")));
        assert!(!s.matches(at("2024-01-02T08:30:00Z")));
        let e = Schedule::parse("@every 10s").unwrap();
        assert!(e.matches(at("2024-01-01T08:30:20Z")));
        assert!(!e.matches(at("2024-01-01T08:30:21Z")));
    }

    /// (spec, byte offset, fragment of the message)
    #[test]
    fn errors_table() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "empty schedule"),
            ("   ", 3, "empty schedule"),
            ("* * * *", 7, "expected five fields"),
            (
                "0 * * * * *",
                10,
                "found 6; a seconds or year field is not supported",
            ),
            ("0 * * * * * *", 10, "found 7"),
            (
                "60 * * * *",
                0,
                "(minute): 60 is out of range: expected a number from 0 to 59",
            ),
            ("0 24 * * *", 2, "(hour): 24 is out of range"),
            ("0 0 0 * *", 4, "(day of month): 0 is out of range"),
            ("0 0 32 * *", 4, "(day of month)"),
            ("0 0 * 13 *", 6, "(month): 13 is out of range"),
            ("0 0 * * 8", 8, "(day of week): 8 is out of range"),
            (
                "0 0 * FOO *",
                6,
                "expected a number from 1 to 12 or a name JAN-DEC, found 'FOO'",
            ),
            ("0 0 * * MONDAY", 8, "or a name SUN-SAT, found 'MONDAY'"),
            ("0 0 * JAN *x", 10, "found '*x'"),
            ("*/0 * * * *", 2, "step '0' is not a number from 1 to 59"),
            ("*/60 * * * *", 2, "step '60'"),
            ("0 */x * * *", 4, "step 'x'"),
            ("0 0 1,,2 * *", 6, "empty list item"),
            ("0 0 1, * *", 6, "empty list item"),
            ("5-1 * * * *", 0, "runs backwards"),
            ("0 0 * * FRI-MON", 8, "runs backwards"),
            ("1-x * * * *", 2, "found 'x'"),
            ("0 0 1-5,7-99 * *", 10, "99 is out of range"),
            ("-5 * * * *", 0, "found ''"),
            ("0 0 30 FEB *", 4, "never fires"),
            ("0 0 31 4,6,9,11 *", 4, "never fires"),
            ("@reboot", 0, "unknown '@reboot'"),
            ("@daily 5", 7, "unexpected '5' after '@daily'"),
            ("@every", 6, "expected a duration"),
            ("@every 0s", 7, "whole, positive"),
            ("@every 1.5s", 7, "whole, positive"),
            ("@every 500ms", 7, "whole, positive"),
            ("@every soon", 7, "not a valid duration"),
            ("@every 1s 2s", 10, "unexpected '2s'"),
            ("é * * * *", 0, "(minute)"),
            ("0 0 * * \u{2603}", 8, "found '\u{2603}'"),
            ("0\u{3000}0 * * * *", 0, "(minute)"),
        ];
        for (spec, offset, fragment) in cases {
            let err = Schedule::parse(spec).expect_err(spec);
            let msg = err.to_string();
            assert_eq!(err.offset, *offset, "{spec:?}: {msg}");
            assert!(
                msg.contains(fragment),
                "{spec:?}: {msg:?} lacks {fragment:?}"
            );
            assert_eq!(err.column, spec[..err.offset].chars().count() + 1);
        }
        assert_eq!(
            Schedule::parse("0 0 * 13 *").unwrap_err().to_string(),
            "at column 7 (month): 13 is out of range: expected a number from 1 to 12 or a name JAN-DEC"
        );
    }

    #[test]
    fn impossible_day_of_month_with_a_weekday_runs_on_the_weekday() {
        // dom names a day February lacks, but dow is restricted too (OR rule): February Mondays.
        assert_eq!(
            next("0 0 30 2 MON", "2024-01-01T00:00:00Z"),
            "2024-02-05T00:00:00Z"
        );
        let s: Schedule = "0 0 1 * *".parse().unwrap();
        assert_eq!(s.to_string(), "0 0 1 * *");
        assert_eq!(s.source(), "0 0 1 * *");
    }
}
