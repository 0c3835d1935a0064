//! Quantities as Kubernetes writes them (memory `64Mi`, cpu `250m`) and durations (`500ms`, `1s`).

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{input}' is not a valid {what}: {why}")]
pub struct UnitError {
    pub input: String,
    pub what: &'static str,
    pub why: &'static str,
}

fn err(input: &str, what: &'static str, why: &'static str) -> UnitError {
    UnitError {
        input: input.to_string(),
        what,
        why,
    }
}

/// Splits `"64Mi"` into (`64`, `Mi`), accepting a decimal number.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// A Kubernetes decimal exponent (`e6`, `E-3`), as in `129e6`: Kubernetes' own example of a
/// memory quantity. `None` when `suffix` is not one (`E` alone is the exa suffix).
fn decimal_exponent(suffix: &str) -> Option<i32> {
    let digits = suffix.strip_prefix(['e', 'E'])?;
    let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Anything past ±30 over- or underflows every quantity the agent reads.
    digits.parse::<i32>().ok().map(|e| e.clamp(-30, 30))
}

/// The number of a quantity: `(value, suffix)` with a decimal exponent already applied.
fn quantity<'a>(input: &str, s: &'a str, what: &'static str) -> Result<(f64, &'a str), UnitError> {
    let (num, suffix) = split_number(s);
    if num.is_empty() {
        return Err(err(input, what, "it does not start with a number"));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| err(input, what, "the number is malformed"))?;
    Ok(match decimal_exponent(suffix) {
        Some(e) => (value * 10f64.powi(e), ""),
        None => (value, suffix),
    })
}

/// Memory in bytes from a Kubernetes quantity: `128974848`, `129e6`, `129M`, `123Mi`, `1.5Gi`.
pub fn parse_memory(input: &str) -> Result<u64, UnitError> {
    const WHAT: &str = "memory quantity (e.g. 64Mi, 1Gi, 500M, 129e6)";
    let (value, suffix) = quantity(input, input.trim(), WHAT)?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        "m" => return Err(err(input, WHAT, "millibytes make no sense for memory")),
        _ => {
            return Err(err(
                input,
                WHAT,
                "unknown unit (use Ki, Mi, Gi, Ti, k, M, G, T, or an exponent like e6)",
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(err(input, WHAT, "it is too large"));
    }
    Ok(bytes.round() as u64)
}

/// CPU in millicores from a Kubernetes quantity: `250m`, `0.5`, `2`, `5e-1`.
pub fn parse_cpu(input: &str) -> Result<u64, UnitError> {
    const WHAT: &str = "cpu quantity (e.g. 250m, 0.5, 2)";
    let (value, suffix) = quantity(input, input.trim(), WHAT)?;
    let millis = match suffix {
        "m" => value,
        "" => value * 1000.0,
        _ => {
            return Err(err(
                input,
                WHAT,
                "unknown unit (use m for millicores, or none for cores)",
            ))
        }
    };
    if !millis.is_finite() || millis > 1e12 {
        return Err(err(input, WHAT, "it is too large"));
    }
    Ok(millis.round() as u64)
}

/// A duration: `250ms`, `1s`, `1.5s`, `2m`, `1h`, compounds like `1m30s` or `1h15m` (as Go
/// and systemd write them), or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    const WHAT: &str = "duration (e.g. 500ms, 1s, 2m, 1m30s, 1h)";
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(err(input, WHAT, "it does not start with a number"));
    }
    let mut secs = 0.0;
    let mut parts = 0;
    while !rest.is_empty() {
        let (num, after) = split_number(rest);
        if num.is_empty() {
            return Err(err(input, WHAT, "it does not start with a number"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| err(input, WHAT, "the number is malformed"))?;
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, tail) = after.split_at(unit_len);
        let scale = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            // A bare number means seconds, but only on its own: `1m30` is a typo.
            "" if parts == 0 && tail.is_empty() => 1.0,
            "" => return Err(err(input, WHAT, "every part of a compound needs its unit")),
            _ => return Err(err(input, WHAT, "unknown unit (use ms, s, m, h)")),
        };
        secs += value * scale;
        parts += 1;
        rest = tail;
    }
    if !secs.is_finite() || secs > 1e9 {
        return Err(err(input, WHAT, "it is too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Human-readable bytes for tables (`64Mi`, `1.5Gi`).
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        const KI: f64 = 1024.0;
        if b >= KI * KI * KI {
            write!(f, "{:.1}Gi", b / (KI * KI * KI))
        } else if b >= KI * KI {
            write!(f, "{:.1}Mi", b / (KI * KI))
        } else if b >= KI {
            write!(f, "{:.0}Ki", b / KI)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory("500M"), Ok(500_000_000));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("64MB").is_err());
        assert!(parse_memory("Mi").is_err());
        assert!(parse_memory("100m").is_err());
        assert!(parse_memory("").is_err());
    }

    #[test]
    fn quantities_with_decimal_exponents() {
        // Kubernetes' own example: 129e6 = 129M = 129000000 bytes.
        assert_eq!(parse_memory("129e6"), Ok(129_000_000));
        assert_eq!(parse_memory("129E6"), Ok(129_000_000));
        assert_eq!(parse_memory("1.5e3"), Ok(1500));
        assert_eq!(parse_memory("1E"), Ok(1_000_000_000_000_000_000));
        assert_eq!(parse_cpu("5e-1"), Ok(500));
        assert_eq!(parse_cpu("2e0"), Ok(2000));
        assert!(parse_memory("129e").is_err());
        assert!(parse_memory("129e6Mi").is_err());
        assert!(parse_memory("1e400").is_err(), "too large, not infinite");
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert!(parse_cpu("2 cores").is_err());
        assert!(parse_cpu("50%").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn compound_durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h15m"), Ok(Duration::from_secs(4500)));
        assert_eq!(parse_duration("2s500ms"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("1m30").is_err(), "a part without its unit");
        assert!(parse_duration("30s1x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn bytes_display() {
        assert_eq!(Bytes(64 << 20).to_string(), "64.0Mi");
        assert_eq!(Bytes(512).to_string(), "512");
    }
}
