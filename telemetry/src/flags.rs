//! Parsers for flag values shared by the binaries.

use std::time::Duration;

/// Parses durations such as `30s`, `24h`, `87600h`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration such as 500ms, 30s, 10m, 24h or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(err()),
        };
        total = unit
            .checked_mul(u32::try_from(n).map_err(|_| err())?)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(err)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "h", "10", "10x", "-1s", "1.5h", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
