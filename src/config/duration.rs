//! Go `time.Duration`: parsing like `time.ParseDuration` and formatting like
//! `Duration.String()`, so durations in flags, config files and `--write-config-to` output
//! read and print exactly as upstream kube-proxy's do.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A signed duration in nanoseconds, with Go's textual form (`1h0m0s`, `500ms`, `0s`).
///
/// It is signed because configuration may contain negative values that validation must be
/// able to see and reject with a message naming the field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(i64);

/// Why a string is not a Go duration; the message matches Go's (`time: invalid duration "x"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(pub String);

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// 1<<63, the largest magnitude a negative duration may have.
const LIMIT: u64 = 1 << 63;

impl GoDuration {
    /// The zero duration.
    pub const ZERO: GoDuration = GoDuration(0);

    /// From nanoseconds.
    pub const fn from_nanos(n: i64) -> Self {
        GoDuration(n)
    }

    /// From whole seconds (saturating).
    pub const fn from_secs(s: i64) -> Self {
        GoDuration(s.saturating_mul(NANOS_PER_SEC as i64))
    }

    /// From whole milliseconds (saturating).
    pub const fn from_millis(ms: i64) -> Self {
        GoDuration(ms.saturating_mul(1_000_000))
    }

    /// The value in nanoseconds.
    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// Whether the duration is below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Whether the duration is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// As a std duration; `None` when negative.
    pub fn to_std(self) -> Option<std::time::Duration> {
        u64::try_from(self.0)
            .ok()
            .map(std::time::Duration::from_nanos)
    }

    /// From a std duration, saturating at Go's maximum (about 292 years).
    pub fn from_std(d: std::time::Duration) -> Self {
        GoDuration(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Parses like Go's `time.ParseDuration`: a possibly signed sequence of decimal numbers,
    /// each with optional fraction and a unit suffix (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`);
    /// the bare string `0` is also accepted.
    pub fn parse(orig: &str) -> Result<Self, DurationError> {
        let invalid = || DurationError(format!("time: invalid duration {orig:?}"));
        let mut s = orig.as_bytes();
        let mut neg = false;
        if let Some(&c) = s.first()
            && (c == b'-' || c == b'+')
        {
            neg = c == b'-';
            s = &s[1..];
        }
        if s == b"0" {
            return Ok(GoDuration::ZERO);
        }
        if s.is_empty() {
            return Err(invalid());
        }
        let mut total: u64 = 0;
        while !s.is_empty() {
            if !(s[0] == b'.' || s[0].is_ascii_digit()) {
                return Err(invalid());
            }
            // Integer part.
            let before = s.len();
            let mut v: u64 = 0;
            let mut i = 0;
            while i < s.len() && s[i].is_ascii_digit() {
                if v > LIMIT / 10 {
                    return Err(invalid());
                }
                v = v * 10 + u64::from(s[i] - b'0');
                if v > LIMIT {
                    return Err(invalid());
                }
                i += 1;
            }
            s = &s[i..];
            let pre = before != s.len();
            // Fraction.
            let mut post = false;
            let mut frac: u64 = 0;
            let mut scale = 1.0f64;
            if s.first() == Some(&b'.') {
                s = &s[1..];
                let before = s.len();
                let mut overflow = false;
                let mut i = 0;
                while i < s.len() && s[i].is_ascii_digit() {
                    if !overflow {
                        if frac > (LIMIT - 1) / 10 {
                            overflow = true;
                        } else {
                            let y = frac * 10 + u64::from(s[i] - b'0');
                            if y > LIMIT {
                                overflow = true;
                            } else {
                                frac = y;
                                scale *= 10.0;
                            }
                        }
                    }
                    i += 1;
                }
                s = &s[i..];
                post = before != s.len();
            }
            if !pre && !post {
                return Err(invalid());
            }
            // Unit.
            let mut i = 0;
            while i < s.len() && !(s[i] == b'.' || s[i].is_ascii_digit()) {
                i += 1;
            }
            if i == 0 {
                return Err(DurationError(format!(
                    "time: missing unit in duration {orig:?}"
                )));
            }
            let unit_text = &s[..i];
            s = &s[i..];
            let unit: u64 = match unit_text {
                b"ns" => 1,
                // "us", U+00B5 micro sign, U+03BC Greek small mu.
                b"us" | b"\xC2\xB5s" | b"\xCE\xBCs" => 1_000,
                b"ms" => 1_000_000,
                b"s" => NANOS_PER_SEC,
                b"m" => 60 * NANOS_PER_SEC,
                b"h" => 3600 * NANOS_PER_SEC,
                _ => {
                    return Err(DurationError(format!(
                        "time: unknown unit {:?} in duration {orig:?}",
                        String::from_utf8_lossy(unit_text)
                    )));
                }
            };
            if v > LIMIT / unit {
                return Err(invalid());
            }
            v *= unit;
            if frac > 0 {
                // Float precision is what Go uses here too, so results match bit for bit.
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                let extra = (frac as f64 * (unit as f64 / scale)) as u64;
                v = v.checked_add(extra).ok_or_else(invalid)?;
                if v > LIMIT {
                    return Err(invalid());
                }
            }
            total = total.checked_add(v).ok_or_else(invalid)?;
            if total > LIMIT {
                return Err(invalid());
            }
        }
        if neg {
            // total <= 1<<63, so this is exact (1<<63 maps to i64::MIN).
            return Ok(GoDuration(0i64.wrapping_sub_unsigned(total)));
        }
        i64::try_from(total).map(GoDuration).map_err(|_| invalid())
    }
}

/// Formats `v / 10^prec` as the fraction text (".123", trailing zeros dropped, nothing when
/// the fraction is zero) and returns the integer part.
fn fmt_frac(mut v: u64, prec: u32) -> (String, u64) {
    let mut digits = Vec::new();
    let mut print = false;
    for _ in 0..prec {
        let d = v % 10;
        print = print || d != 0;
        if print {
            digits.push(char::from(b'0' + u8::try_from(d).unwrap_or(0)));
        }
        v /= 10;
    }
    let mut out = String::new();
    if print {
        out.push('.');
        out.extend(digits.iter().rev());
    }
    (out, v)
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let u = self.0.unsigned_abs();
        let body = if u < NANOS_PER_SEC {
            let (prec, unit) = match u {
                0 => return f.write_str("0s"),
                1..=999 => (0, "ns"),
                1_000..=999_999 => (3, "\u{b5}s"),
                _ => (6, "ms"),
            };
            let (frac, int) = fmt_frac(u, prec);
            format!("{int}{frac}{unit}")
        } else {
            let (frac, secs) = fmt_frac(u, 9);
            let mut out = format!("{}{frac}s", secs % 60);
            let mins = secs / 60;
            if mins > 0 {
                out = format!("{}m{out}", mins % 60);
                let hours = mins / 60;
                if hours > 0 {
                    out = format!("{hours}h{out}");
                }
            }
            out
        };
        if neg {
            f.write_str("-")?;
        }
        f.write_str(&body)
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GoDuration::parse(s)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Go duration string such as \"30s\" or \"1h0m0s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GoDuration, E> {
                GoDuration::parse(v).map_err(E::custom)
            }
            // logging.flushFrequency also accepts a plain number of nanoseconds.
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GoDuration, E> {
                Ok(GoDuration(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GoDuration, E> {
                i64::try_from(v)
                    .map(GoDuration)
                    .map_err(|_| E::custom("duration out of range"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    #[test]
    fn formats_like_go_duration_string() {
        // Cases from Go's time package tests (TestDurationString) plus kube-proxy defaults.
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (NS, "1ns"),
            (1100 * NS, "1.1\u{b5}s"),
            (2200 * US, "2.2ms"),
            (3300 * MS, "3.3s"),
            (4 * M + 5 * S, "4m5s"),
            (4 * M + 5001 * MS, "4m5.001s"),
            (5 * H + 6 * M + 7001 * MS, "5h6m7.001s"),
            (8 * M + NS, "8m0.000000001s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
            (30 * S, "30s"),
            (M, "1m0s"),
            (H, "1h0m0s"),
            (24 * H, "24h0m0s"),
            (15 * M, "15m0s"),
            (500 * MS, "500ms"),
            (1500 * MS, "1.5s"),
            (250 * MS, "250ms"),
            (-S, "-1s"),
            (90 * S, "1m30s"),
        ];
        for &(nanos, want) in cases {
            assert_eq!(GoDuration(nanos).to_string(), want, "{nanos}ns");
        }
    }

    #[test]
    fn parses_like_go_parse_duration() {
        // Cases from Go's TestParseDuration.
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("52763797000ns", 52_763_797_000 * NS),
            ("0.3333333333333333333h", 20 * M),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-2562047h47m16.854775808s", i64::MIN),
            ("0.100000000000000000000h", 6 * M),
            (
                "0.830103483285477580700h",
                49 * M + 48 * S + 372_539_827 * NS,
            ),
            ("1m30s", 90 * S),
            ("1h0m0s", H),
            ("500ms", 500 * MS),
        ];
        for &(text, want) in cases {
            assert_eq!(
                GoDuration::parse(text).map(|d| d.0),
                Ok(want),
                "parsing {text:?}"
            );
        }
    }

    #[test]
    fn rejects_what_go_rejects_with_go_messages() {
        for bad in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "1.5",
            "9223372036854775810ns",
            "9223372036854775808ns",
            "-9223372036854775809ns",
            "9223372036854775.808us",
            "3000000h",
            "1s ",
            " 1s",
            "1 s",
        ] {
            assert!(
                GoDuration::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert_eq!(
            GoDuration::parse("abc").unwrap_err().to_string(),
            "time: invalid duration \"abc\""
        );
        assert_eq!(
            GoDuration::parse("3").unwrap_err().to_string(),
            "time: missing unit in duration \"3\""
        );
        assert_eq!(
            GoDuration::parse("1d").unwrap_err().to_string(),
            "time: unknown unit \"d\" in duration \"1d\""
        );
    }

    #[test]
    fn format_parse_round_trip_and_std_conversion() {
        for nanos in [
            0,
            1,
            999,
            1_000,
            1_500_000,
            30 * S,
            90 * S,
            24 * H + 1,
            -7 * S,
        ] {
            let d = GoDuration(nanos);
            assert_eq!(GoDuration::parse(&d.to_string()), Ok(d), "{d}");
        }
        assert_eq!(
            GoDuration::from_secs(30).to_std(),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(GoDuration::from_secs(-1).to_std(), None);
        assert_eq!(
            GoDuration::from_std(std::time::Duration::from_millis(1500)).to_string(),
            "1.5s"
        );
    }

    #[test]
    fn serde_uses_go_strings() {
        let d: GoDuration = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(d, GoDuration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
        let n: GoDuration = serde_json::from_str("5000000000").unwrap();
        assert_eq!(n, GoDuration::from_secs(5));
        assert!(serde_json::from_str::<GoDuration>("\"5 seconds\"").is_err());
    }
}
