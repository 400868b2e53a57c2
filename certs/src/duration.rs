//! Durations as admins write them on the command line: `365d`, `8760h`, `90m`, `30s`.

use std::time::Duration;

use crate::CertError;

/// Parses `<number><unit>` with unit `d` (days), `h`, `m` or `s`; a bare number is seconds.
/// Whitespace around the text is ignored. Zero is rejected: a certificate valid for no time
/// is always a mistake.
pub fn parse_duration(text: &str) -> Result<Duration, CertError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        CertError::Invalid(format!(
            "duration {text:?}: write a number and a unit, like 365d, 12h, 30m or 45s"
        ))
    };
    let value: u64 = number.parse().map_err(|_| bad())?;
    let unit_secs: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(bad()),
    };
    let secs = value
        .checked_mul(unit_secs)
        .ok_or_else(|| CertError::Invalid(format!("duration {text:?} is too long")))?;
    if secs == 0 {
        return Err(CertError::Invalid(format!(
            "duration {text:?} must be longer than zero"
        )));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        assert_eq!(
            parse_duration(" 12h ").unwrap(),
            Duration::from_secs(12 * 3_600)
        );
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "d", "1y", "-1d", "0d", "1.5d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
