//! Go-compatible formatting: floats as `strconv.FormatFloat(f, 'g', -1, 64)` (what the
//! Prometheus text encoder writes), times as Go's `time.Time` JSON (RFC 3339 with trimmed
//! nanoseconds), strings as `%q`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// A float the way client_golang's text encoder writes it (`writeFloat`): special cases for
/// 0, ±1, NaN and ±Inf, otherwise `strconv.FormatFloat(f, 'g', -1, 64)`.
pub(crate) fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v == 0.0 {
        return "0".into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, e.g. "-1.712345678123e9".
    let sci = format!("{v:e}");
    let (sign, rest) = match sci.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", sci.as_str()),
    };
    let (mantissa, exp) = rest.split_once('e').unwrap_or((rest, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let nd = digits.len() as i32;
    let mut out = String::from(sign);
    // Go: for the shortest representation, %e is used when exp < -4 || exp >= 6.
    if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if nd > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else {
        let dp = exp + 1; // position of the decimal point relative to the digits
        if dp <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-dp) as usize));
            out.push_str(&digits);
        } else if dp >= nd {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (dp - nd) as usize));
        } else {
            out.push_str(&digits[..dp as usize]);
            out.push('.');
            out.push_str(&digits[dp as usize..]);
        }
    }
    out
}

/// Go's `time.Time` JSON form for a UTC time (`RFC3339Nano`: fractional seconds with trailing
/// zeros removed, no fraction at all on whole seconds). `None` is Go's zero time,
/// `0001-01-01T00:00:00Z`. Times before 1970 are clamped to the epoch (never produced here).
pub(crate) fn rfc3339_nano(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".into();
    };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Go's `%q` for the strings we quote (Kubernetes object names): `"` and `\` escaped, common
/// control characters as `\n`, `\t`, `\r`, other control characters as `\xNN`.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn floats_match_go_strconv_g() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0"),
            (1.0, "1"),
            (-1.0, "-1"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (16.384, "16.384"),
            (300.0, "300"),
            (5.0, "5"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (1_000_000.0, "1e+06"),
            (1712345678.123, "1.712345678123e+09"),
            (-0.5, "-0.5"),
            (2.5e-7, "2.5e-07"),
            (1e21, "1e+21"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ];
        for (v, want) in cases {
            assert_eq!(go_float(*v), *want, "formatting {v}");
        }
    }

    #[test]
    fn times_match_go_rfc3339nano() {
        assert_eq!(rfc3339_nano(None), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339_nano(Some(UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        // 2024-02-29T23:59:59.1Z: a leap day, trailing zeros of the fraction trimmed.
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 100_000_000);
        assert_eq!(rfc3339_nano(Some(t)), "2024-02-29T23:59:59.1Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_200, 123_456_789);
        assert_eq!(rfc3339_nano(Some(t)), "2024-03-01T00:00:00.123456789Z");
        let t = UNIX_EPOCH + Duration::new(4_102_444_800, 1_000);
        assert_eq!(rfc3339_nano(Some(t)), "2100-01-01T00:00:00.000001Z");
    }

    #[test]
    fn quoting_matches_go_percent_q() {
        assert_eq!(go_quote("kube-system"), "\"kube-system\"");
        assert_eq!(go_quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\x01\"");
    }
}
