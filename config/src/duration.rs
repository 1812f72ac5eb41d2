//! Durations as operators write them on command lines (`24h`, `90m`, `30s`), and as Gateway API
//! resources write them (GEP-2257: `1h30m`, `500ms`).

use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 24h, 90m or 30s"))?;
    let secs = match unit {
        "h" => n * 3600,
        "m" => n * 60,
        "s" | "" => n,
        _ => return Err(format!("{s:?}: unit must be h, m or s")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// A GEP-2257 duration: one to four `<1-5 digits><unit>` parts, units `h`, `m`, `s`, `ms`.
/// `0s` is a valid duration (Gateway API reads it as "no timeout").
pub fn gateway_duration(s: &str) -> Option<Duration> {
    let (mut rest, mut total, mut parts) = (s, Duration::ZERO, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        parts += 1;
        if digits == 0 || digits > 5 || parts > 4 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = [("ms", 2), ("h", 1), ("m", 1), ("s", 1)].into_iter().find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[len..];
        total += match unit {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            _ => Duration::from_millis(n),
        };
    }
    (parts > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unit"));
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn gateway_durations() {
        let ms = Duration::from_millis;
        for (ok, want) in
            [("10s", ms(10_000)), ("500ms", ms(500)), ("1h30m", ms(5_400_000)), ("0s", ms(0)), ("1m1s1ms", ms(61_001))]
        {
            assert_eq!(gateway_duration(ok), Some(want), "{ok}");
        }
        for bad in ["", "10", "1.5s", "10d", "s", "123456s", "1h1h1h1h1h", "-1s"] {
            assert_eq!(gateway_duration(bad), None, "{bad}");
        }
    }
}
