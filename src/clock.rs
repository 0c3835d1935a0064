//! Clock and calendar arithmetic, on the `time` crate: the one home for it (cron schedules,
//! certificate validity, status times).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime};

/// The Julian day number of 1970-01-01.
const EPOCH_JULIAN_DAY: i64 = 2_440_588;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whole seconds since the Unix epoch, rounded down (also before 1970).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let s = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() > 0 {
                -s - 1
            } else {
                -s
            }
        }
    }
}

pub fn from_unix_seconds(secs: i64) -> Option<SystemTime> {
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

fn date(year: i64, month: u32, day: u32) -> Option<Date> {
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?).ok()
}

/// Days since 1970-01-01 of a (proleptic Gregorian) date; `None` for no such date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    Some(i64::from(date(year, month, day)?.to_julian_day()) - EPOCH_JULIAN_DAY)
}

fn julian(days: i64) -> Option<Date> {
    let jd = i32::try_from(days.checked_add(EPOCH_JULIAN_DAY)?).ok()?;
    Date::from_julian_day(jd).ok()
}

/// (year, month, day) of a day counted from 1970-01-01.
pub fn civil_from_days(days: i64) -> Option<(i64, u32, u32)> {
    let d = julian(days)?;
    Some((
        i64::from(d.year()),
        u32::from(u8::from(d.month())),
        u32::from(d.day()),
    ))
}

/// Weekday of a day counted from 1970-01-01, Sunday = 0.
pub fn weekday(days: i64) -> Option<u32> {
    Some(u32::from(julian(days)?.weekday().number_days_from_sunday()))
}

/// A UTC calendar time; a leap second (:60) counts as :59.
pub fn utc(year: i64, month: u32, day: u32, hour: u8, min: u8, sec: u8) -> Option<SystemTime> {
    let t = time::Time::from_hms(hour, min, sec.min(59)).ok()?;
    Some(
        PrimitiveDateTime::new(date(year, month, day)?, t)
            .assume_utc()
            .into(),
    )
}

/// `HH:MM:SS` UTC of a unix time (no time-zone database on small devices).
pub fn time_of_day(unix: u64) -> String {
    let s = unix % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// RFC 3339 (UTC) for logs and messages.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{} s after the epoch", unix_seconds(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_weekdays_and_times() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(days_from_civil(1969, 12, 31), Some(-1));
        assert_eq!(days_from_civil(2023, 2, 29), None);
        assert_eq!(civil_from_days(11_017), Some((2000, 3, 1)));
        assert_eq!(weekday(0), Some(4), "1970-01-01 was a Thursday");
        assert_eq!(utc(1970, 1, 1, 0, 0, 60), from_unix_seconds(59));
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_millis(1)), -1);
        assert_eq!(time_of_day(86_400 + 3661), "01:01:01");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
