//! Human-readable sizes, rates and durations, as operators write them in config files and
//! on the command line: `4TiB`, `10gbit`, `1.25GB/s`, `5ms`.
//!
//! Pure parsing and formatting; no IO. Rates are always returned in **bytes per second**,
//! whatever unit the text used, because every budget inside strait is counted in bytes.

use std::fmt;
use std::time::Duration;

/// Text that is not a valid size, rate or duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    /// The text holds no number (empty, or starts with a unit).
    #[error("{text:?}: expected a number followed by an optional unit")]
    NoNumber {
        /// The text as given.
        text: String,
    },
    /// The number is followed by a unit this parser does not know.
    #[error("{text:?}: unknown unit {unit:?} (expected one of {expected})")]
    UnknownUnit {
        /// The text as given.
        text: String,
        /// The unit part that was not understood.
        unit: String,
        /// The units that would have been accepted.
        expected: &'static str,
    },
    /// The value is negative, not finite, or does not fit in 64 bits.
    #[error("{text:?}: value out of range")]
    OutOfRange {
        /// The text as given.
        text: String,
    },
}

fn split_number(text: &str) -> Result<(f64, &str), UnitError> {
    let t = text.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let num: String = num.chars().filter(|&c| c != '_').collect();
    let value: f64 = num.parse().map_err(|_| UnitError::NoNumber {
        text: text.to_string(),
    })?;
    if !value.is_finite() || value < 0.0 {
        return Err(UnitError::OutOfRange {
            text: text.to_string(),
        });
    }
    Ok((value, unit.trim()))
}

fn to_u64(value: f64, text: &str) -> Result<u64, UnitError> {
    if value >= u64::MAX as f64 {
        return Err(UnitError::OutOfRange {
            text: text.to_string(),
        });
    }
    Ok(value.round() as u64)
}

fn byte_multiplier(unit: &str) -> Option<f64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "pib" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

/// Parses a byte count: `4096`, `64KiB`, `128MiB`, `4TiB`, `500GB` (SI units are powers of
/// 1000, binary units powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    let (value, unit) = split_number(text)?;
    let mult = byte_multiplier(unit).ok_or_else(|| UnitError::UnknownUnit {
        text: text.to_string(),
        unit: unit.to_string(),
        expected: "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
    })?;
    to_u64(value * mult, text)
}

/// Parses a rate and returns it in bytes per second.
///
/// Bit rates as network people write them (`100mbit`, `10Gbit/s`, `1gbps`) and byte rates
/// as storage people write them (`1.25GB/s`, `500MiB/s`, or a bare number of bytes/s).
pub fn parse_rate(text: &str) -> Result<u64, UnitError> {
    let (value, unit) = split_number(text)?;
    let lower = unit.to_ascii_lowercase();
    let unit_part = lower
        .strip_suffix("/s")
        .or_else(|| lower.strip_suffix("ps").filter(|u| u.ends_with('b')))
        .unwrap_or(&lower);
    let bits = |prefix: &str| -> Option<f64> {
        Some(match prefix {
            "" => 1.0,
            "k" => 1e3,
            "m" => 1e6,
            "g" => 1e9,
            "t" => 1e12,
            _ => return None,
        })
    };
    let bytes_per_s = if let Some(prefix) = unit_part.strip_suffix("bit") {
        bits(prefix).map(|m| value * m / 8.0)
    } else if lower.ends_with("bps") && unit.ends_with("bps") {
        // `gbps`, `mbps`: lower-case b after the prefix means bits, as network people use it.
        bits(lower.trim_end_matches("bps")).map(|m| value * m / 8.0)
    } else {
        byte_multiplier(unit_part).map(|m| value * m)
    };
    let bytes_per_s = bytes_per_s.ok_or_else(|| UnitError::UnknownUnit {
        text: text.to_string(),
        unit: unit.to_string(),
        expected: "bit, kbit, mbit, gbit (also /s or bps), B/s, KB/s, MB/s, GB/s, MiB/s, GiB/s",
    })?;
    to_u64(bytes_per_s, text)
}

/// Parses a duration: `250us`, `5ms`, `1.5s`, `2m`. A bare number is refused, because a
/// round-trip time in the wrong unit is a thousand-fold error.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (value, unit) = split_number(text)?;
    let secs = match unit.to_ascii_lowercase().as_str() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => {
            return Err(UnitError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
                expected: "ns, us, ms, s, min, h, d",
            });
        }
    };
    Duration::try_from_secs_f64(value * secs).map_err(|_| UnitError::OutOfRange {
        text: text.to_string(),
    })
}

/// Formats a byte count with a binary unit, e.g. `128.0 MiB`.
pub fn fmt_bytes(bytes: u64) -> impl fmt::Display {
    Human(
        bytes as f64,
        &["B", "KiB", "MiB", "GiB", "TiB", "PiB"],
        1024.0,
    )
}

/// Formats a rate given in bytes per second as bits per second, e.g. `100.0 Mbit/s`.
pub fn fmt_rate(bytes_per_s: u64) -> impl fmt::Display {
    Human(
        bytes_per_s as f64 * 8.0,
        &["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"],
        1000.0,
    )
}

struct Human(f64, &'static [&'static str], f64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Human(mut v, units, step) = *self;
        let mut i = 0;
        while v >= step && i + 1 < units.len() {
            v /= step;
            i += 1;
        }
        if i == 0 {
            write!(f, "{v} {}", units[0])
        } else {
            write!(f, "{v:.1} {}", units[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("128 MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("4TiB"), Ok(4 << 40));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("1_000"), Ok(1000));
        assert!(matches!(
            parse_bytes("4 furlongs"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_bytes("GiB"),
            Err(UnitError::NoNumber { .. })
        ));
        assert!(matches!(
            parse_bytes("-1"),
            Err(UnitError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_bytes("99999999PiB"),
            Err(UnitError::OutOfRange { .. })
        ));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("10Gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_rate("1gbps"), Ok(125_000_000));
        assert_eq!(parse_rate("1.25GB/s"), Ok(1_250_000_000));
        assert_eq!(parse_rate("1GBps"), Ok(1_000_000_000));
        assert_eq!(parse_rate("500MiB/s"), Ok(500 << 20));
        assert_eq!(parse_rate("12500000"), Ok(12_500_000));
        assert!(matches!(
            parse_rate("10 parsecs"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert!(matches!(
            parse_duration("5"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(512).to_string(), "512 B");
        assert_eq!(fmt_bytes(128 << 20).to_string(), "128.0 MiB");
        assert_eq!(fmt_rate(12_500_000).to_string(), "100.0 Mbit/s");
    }
}
