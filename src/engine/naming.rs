//! Snapshot names and labels (the `vmsnap:*` properties are [`crate::model::prop`]).
//!
//! Names are sanoid's: `autosnap_YYYY-MM-DD_HH:MM:SS_<label>` in UTC, so sanoid-style tools and
//! vmsnap's own retention read them alike.

use std::time::{SystemTime, UNIX_EPOCH};

/// Checks a label before anything is touched: 1 to 64 letters, digits, '-', '_' or '.' (the
/// snapshot name, the overlay and dump file names all carry it).
///
/// # Errors
/// A sentence naming the label and the rule.
pub fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > 64 || !label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        let shown: String = label.chars().take(80).collect();
        return Err(format!("label {shown:?}: use 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(())
}

/// `autosnap_YYYY-MM-DD_HH:MM:SS_<label>` for `at`, in UTC.
pub fn snapshot_name(at: SystemTime, label: &str) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("autosnap_{y:04}-{m:02}-{d:02}_{:02}:{:02}:{:02}_{label}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sanoid_style_names_in_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_710_600); // 2026-11-26T16:30:00Z
        assert_eq!(snapshot_name(t, "manual"), "autosnap_2026-11-26_16:30:00_manual");
        assert_eq!(snapshot_name(UNIX_EPOCH, "hourly"), "autosnap_1970-01-01_00:00:00_hourly");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29T00:00:00Z
        assert_eq!(snapshot_name(leap, "daily"), "autosnap_2000-02-29_00:00:00_daily");
    }
}
