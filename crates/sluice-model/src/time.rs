//! Time: the clock (`now_ms`), and `createdAt` parsing: unix seconds, unix milliseconds, or an RFC 3339 string, all normalised to
//! unix milliseconds.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Numbers below this are read as seconds, at or above it as milliseconds. 10^11 seconds is the
/// year 5138; 10^11 milliseconds is March 1973, so no realistic timestamp is ambiguous.
const SECONDS_CUTOFF: f64 = 1e11;

/// The latest time sluice stores: the last millisecond of 64-bit unix nanoseconds
/// (2262-04-11T23:47:16.854Z), which is where the search indexes' dates end.
pub const MAX_MS: i64 = i64::MAX / 1_000_000;

/// Parses a JSON `createdAt` into unix milliseconds (1970 to 2262-04-11, [`MAX_MS`]), or says
/// what is wrong with it.
pub fn parse_timestamp_ms(value: &Value) -> Result<i64, String> {
    match value {
        Value::Number(n) => {
            let f = n
                .as_f64()
                .ok_or_else(|| format!("createdAt {n} is not a usable number"))?;
            if !f.is_finite() || f < 0.0 {
                return Err(format!(
                    "createdAt {n} must be a non-negative unix timestamp"
                ));
            }
            let ms = if f < SECONDS_CUTOFF { f * 1000.0 } else { f };
            if ms > MAX_MS as f64 {
                return Err(format!(
                    "createdAt {n} is after 2262-04-11, the latest time sluice stores"
                ));
            }
            Ok(ms as i64)
        }
        Value::String(s) => {
            let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
                format!("createdAt {s:?} is not an RFC 3339 timestamp ({e}); expected e.g. \"2024-05-01T12:00:00Z\" or unix seconds/ms")
            })?;
            let ms = t.unix_timestamp_nanos() / 1_000_000;
            if ms < 0 {
                return Err(format!("createdAt {s:?} is before 1970"));
            }
            if ms > i128::from(MAX_MS) {
                return Err(format!(
                    "createdAt {s:?} is after 2262-04-11, the latest time sluice stores"
                ));
            }
            Ok(ms as i64)
        }
        other => Err(format!(
            "createdAt must be unix seconds, unix milliseconds or an RFC 3339 string, not {}",
            json_type_name(other)
        )),
    }
}

/// The current time in unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix milliseconds as RFC 3339 (UTC, whole seconds), or the number if out of range.
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seconds_milliseconds_and_rfc3339_agree() {
        let expected = 1_700_000_000_000;
        assert_eq!(parse_timestamp_ms(&json!(1_700_000_000)), Ok(expected));
        assert_eq!(
            parse_timestamp_ms(&json!(1_700_000_000_000_i64)),
            Ok(expected)
        );
        assert_eq!(
            parse_timestamp_ms(&json!(1_700_000_000.5)),
            Ok(expected + 500)
        );
        assert_eq!(
            parse_timestamp_ms(&json!("2023-11-14T22:13:20Z")),
            Ok(expected)
        );
        assert_eq!(
            parse_timestamp_ms(&json!("2023-11-15T00:13:20+02:00")),
            Ok(expected)
        );
    }

    #[test]
    fn times_outside_what_the_indexes_store_are_refused() {
        // Found by schemathesis: year 15 reached the embedded index, whose nanosecond dates
        // overflowed, and its writer panicked.
        for value in [
            json!("0015-07-16T03:22:27+15:41"),
            json!("1969-12-31T23:59:59Z"),
            json!("2262-04-12T00:00:00Z"),
            json!("9999-12-31T23:59:59Z"),
            json!(9_300_000_000_000_i64),
            json!(2.5e14),
        ] {
            let error = parse_timestamp_ms(&value).expect_err("refused");
            assert!(
                error.contains("1970") || error.contains("2262"),
                "{value}: {error}"
            );
        }
        assert_eq!(
            parse_timestamp_ms(&json!("2262-04-11T23:47:16.854Z")),
            Ok(MAX_MS)
        );
        assert_eq!(parse_timestamp_ms(&json!("1970-01-01T00:00:00Z")), Ok(0));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(
            parse_timestamp_ms(&json!("yesterday"))
                .expect_err("must be refused")
                .contains("RFC 3339")
        );
        assert!(
            parse_timestamp_ms(&json!(-5))
                .expect_err("must be refused")
                .contains("non-negative")
        );
        assert!(
            parse_timestamp_ms(&json!(true))
                .expect_err("must be refused")
                .contains("boolean")
        );
    }
}
