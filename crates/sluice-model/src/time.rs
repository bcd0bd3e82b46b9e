//! Time: the clock (`now_ms`), and `createdAt` parsing: unix seconds, unix milliseconds, or an RFC 3339 string, all normalised to
//! unix milliseconds.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Numbers below this are read as seconds, at or above it as milliseconds. 10^11 seconds is the
/// year 5138; 10^11 milliseconds is March 1973, so no realistic timestamp is ambiguous.
const SECONDS_CUTOFF: f64 = 1e11;

/// Parses a JSON `createdAt` into unix milliseconds, or says what is wrong with it.
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
            if ms > 253_402_300_799_999.0 {
                return Err(format!("createdAt {n} is after the year 9999"));
            }
            Ok(ms as i64)
        }
        Value::String(s) => {
            let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
                format!("createdAt {s:?} is not an RFC 3339 timestamp ({e}); expected e.g. \"2024-05-01T12:00:00Z\" or unix seconds/ms")
            })?;
            Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
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
