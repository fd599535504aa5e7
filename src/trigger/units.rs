//! Durations and byte sizes as people write them in config files: `90s`, `1h30m`, `1MiB`.
//!
//! Trigger settings (jitter, `@every`, replay windows, retention, body limits) are all
//! written by hand in TOML, so they read as text with units rather than bare integers
//! whose unit the reader has to guess. A bare number is refused with a hint to add a unit.

use std::time::Duration;

/// Parses `90s`, `5m`, `1h30m`, `2d`, `250ms`. Units: `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: write e.g. 30s, 5m, 1h30m".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} has no unit: write e.g. {s}s (ms, s, m, h and d are understood)"
        ));
    }
    let mut total_ms: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "{s:?} is not a duration: expected a number before {rest:?} (e.g. 30s, 1h30m)"
            ));
        }
        let value: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        let ms_per_unit: u128 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "{s:?}: the number {value} has no unit (ms, s, m, h or d)"
                ));
            }
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (ms, s, m, h and d are understood)"
                ));
            }
        };
        rest = rest[unit_len..].trim_start();
        total_ms = total_ms
            .checked_add(value * ms_per_unit)
            .ok_or_else(|| format!("{s:?}: too long"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("{s:?}: too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way [`parse_duration`] reads it (`1h30m`, `250ms`, `0s`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

/// Parses `512`, `64KiB`, `1MiB`, `1MB`, `2GiB` into bytes. A bare number is bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "{s:?} is not a size: write e.g. 1MiB, 512KiB, 4096"
        ));
    }
    let value: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("{s:?}: number too large"))?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Serde helpers: a duration written as text (`"5m"`).
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// For `Option<Duration>` fields (use with `#[serde(default)]`).
    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(s) => super::super::parse_duration(&s)
                    .map(Some)
                    .map_err(serde::de::Error::custom),
                None => Ok(None),
            }
        }

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&super::super::format_duration(*d)),
                None => s.serialize_none(),
            }
        }
    }
}

/// Serde helper: a byte size written as text (`"1MiB"`) or as an integer (bytes).
pub mod serde_byte_size {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(n),
            Raw::Text(s) => super::parse_byte_size(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_combine_units_and_round_trip_through_format() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration(" 2d ").unwrap(),
            Duration::from_secs(172_800)
        );
        for text in ["1h30m", "250ms", "2d3h4m5s6ms", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn a_duration_without_a_unit_or_with_an_unknown_one_says_what_to_write() {
        assert!(parse_duration("90").unwrap_err().contains("write e.g. 90s"));
        assert!(
            parse_duration("5 minutes")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration("1h30").unwrap_err().contains("has no unit"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(
            parse_duration("m5")
                .unwrap_err()
                .contains("expected a number")
        );
    }

    #[test]
    fn byte_sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        assert_eq!(parse_byte_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_byte_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("1MB").unwrap(), 1_000_000);
        assert!(
            parse_byte_size("1 parsec")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_byte_size("MiB").is_err());
    }
}
