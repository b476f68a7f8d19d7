//! When a domain's next snapshot is due: pure functions of the policy, the newest snapshot of
//! each period, and the time (in any time zone; the daemon uses local time, as sanoid does).
//!
//! A period is due when its newest snapshot is older than the period's most recent preferred
//! time (`daily_hour:daily_min` today or yesterday, …). After downtime that asks for one
//! snapshot per period, not one per missed slot; when the clock jumps back, a snapshot "from
//! the future" is newer than any preferred time, so nothing is taken twice.

use crate::config::policy::{PerPeriod, Period, Policy};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike};
use std::collections::BTreeSet;

/// The most recent preferred time of `period` at or before `now`.
pub fn last_preferred<Tz: TimeZone>(period: Period, policy: &Policy, now: &DateTime<Tz>) -> DateTime<Tz> {
    let p = &policy.preferred;
    let tz = now.timezone();
    let date = now.date_naive();
    let at = |d: NaiveDate, h: u32, m: u32| -> DateTime<Tz> {
        // A preferred time inside a DST gap moves to the next hour.
        tz.with_ymd_and_hms(d.year(), d.month(), d.day(), h, m, 0)
            .earliest()
            .or_else(|| tz.with_ymd_and_hms(d.year(), d.month(), d.day(), (h + 1).min(23), m, 0).earliest())
            .unwrap_or_else(|| now.clone())
    };
    let not_after = |t: DateTime<Tz>, back: &dyn Fn(DateTime<Tz>) -> DateTime<Tz>| if t > *now { back(t) } else { t };
    match period {
        Period::Frequently => {
            let fp = policy.frequent_period.max(1);
            let minutes = (now.hour() * 60 + now.minute()) / fp * fp;
            at(date, minutes / 60, minutes % 60)
        }
        Period::Hourly => not_after(at(date, now.hour(), p.hourly_min), &|t| t - Duration::hours(1)),
        Period::Daily => {
            not_after(at(date, p.daily_hour, p.daily_min), &|t| at(t.date_naive() - Duration::days(1), p.daily_hour, p.daily_min))
        }
        Period::Weekly => {
            let back_days = (i64::from(now.weekday().num_days_from_sunday()) - i64::from(p.weekly_wday)).rem_euclid(7);
            let t = at(date - Duration::days(back_days), p.weekly_hour, p.weekly_min);
            not_after(t, &|t| at(t.date_naive() - Duration::days(7), p.weekly_hour, p.weekly_min))
        }
        Period::Monthly => {
            let this = month_day(now.year(), now.month(), p.monthly_mday);
            let t = at(this, p.monthly_hour, p.monthly_min);
            not_after(t, &|_| {
                let (y, m) = if now.month() == 1 { (now.year() - 1, 12) } else { (now.year(), now.month() - 1) };
                at(month_day(y, m, p.monthly_mday), p.monthly_hour, p.monthly_min)
            })
        }
        Period::Yearly => {
            let t = at(month_day(now.year(), p.yearly_mon, p.yearly_mday), p.yearly_hour, p.yearly_min);
            not_after(t, &|_| at(month_day(now.year() - 1, p.yearly_mon, p.yearly_mday), p.yearly_hour, p.yearly_min))
        }
    }
}

/// `mday` of that month, or its last day when the month is shorter.
fn month_day(year: i32, month: u32, mday: u32) -> NaiveDate {
    (1..=mday).rev().find_map(|d| NaiveDate::from_ymd_opt(year, month, d)).unwrap_or_default()
}

/// The periods due now: counted in the policy (`hourly > 0`, …) and whose newest snapshot
/// (unix seconds, `None` when there is none) is older than their last preferred time.
pub fn due<Tz: TimeZone>(policy: &Policy, newest: &PerPeriod<Option<i64>>, now: &DateTime<Tz>) -> BTreeSet<Period> {
    if !policy.autosnap {
        return BTreeSet::new();
    }
    Period::ALL
        .into_iter()
        .filter(|&p| policy.keep.get(p) > 0)
        .filter(|&p| newest.get(p).is_none_or(|t| t < last_preferred(p, policy, now).timestamp()))
        .collect()
}

/// When `due` will next say something: the earliest next preferred time of a counted period
/// after `now`. The daemon sleeps until then (or a minute, whichever is sooner).
pub fn next_preferred<Tz: TimeZone>(policy: &Policy, now: &DateTime<Tz>) -> Option<DateTime<Tz>> {
    Period::ALL
        .into_iter()
        .filter(|&p| policy.keep.get(p) > 0)
        .map(|p| {
            let step = match p {
                Period::Frequently => Duration::minutes(i64::from(policy.frequent_period.max(1))),
                Period::Hourly => Duration::hours(1),
                Period::Daily => Duration::days(1),
                Period::Weekly => Duration::days(7),
                Period::Monthly => Duration::days(31),
                Period::Yearly => Duration::days(366),
            };
            // The last preferred time one step ahead is the next one (or later, never earlier).
            last_preferred(p, policy, &(now.clone() + step))
        })
        .filter(|t| t > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn preferred_times_like_sanoid() {
        let p = Policy { frequent_period: 15, ..Policy::default() };
        let now = t("2026-11-26T10:37:12Z"); // a Thursday
        assert_eq!(last_preferred(Period::Frequently, &p, &now), t("2026-11-26T10:30:00Z"));
        assert_eq!(last_preferred(Period::Hourly, &p, &now), t("2026-11-26T10:00:00Z"));
        // daily 23:59: not yet today, so yesterday's.
        assert_eq!(last_preferred(Period::Daily, &p, &now), t("2026-11-25T23:59:00Z"));
        // weekly Monday 23:30.
        assert_eq!(last_preferred(Period::Weekly, &p, &now), t("2026-11-23T23:30:00Z"));
        assert_eq!(last_preferred(Period::Monthly, &p, &now), t("2026-11-01T00:00:00Z"));
        assert_eq!(last_preferred(Period::Yearly, &p, &now), t("2026-01-01T00:00:00Z"));
        let mut p31 = p.clone();
        p31.preferred.monthly_mday = 31;
        assert_eq!(last_preferred(Period::Monthly, &p31, &t("2026-03-15T00:00:00Z")), t("2026-02-28T00:00:00Z"));
    }

    #[test]
    fn due_after_downtime_once_and_not_twice() {
        let p = Policy { keep: PerPeriod([0, 24, 7, 0, 0, 0]), ..Policy::default() };
        let now = t("2026-11-26T10:37:00Z");
        // Down for three days: one hourly and one daily are due, not 72 + 3.
        let three_days_ago = Some(t("2026-11-23T10:00:00Z").timestamp());
        assert_eq!(
            due(&p, &PerPeriod([None, three_days_ago, three_days_ago, None, None, None]), &now),
            BTreeSet::from([Period::Hourly, Period::Daily])
        );
        // Right after taking them: nothing.
        let just = Some(now.timestamp());
        assert!(due(&p, &PerPeriod([None, just, just, None, None, None]), &now).is_empty());
        // The clock jumped back an hour: the snapshot "from the future" still counts.
        let back = now - Duration::hours(1);
        assert!(due(&p, &PerPeriod([None, just, just, None, None, None]), &back).is_empty());
        // Periods with a count of 0 are never due; autosnap off means nothing is.
        assert!(!due(&p, &PerPeriod([None; 6]), &now).contains(&Period::Monthly));
        assert!(due(&Policy { autosnap: false, ..p }, &PerPeriod([None; 6]), &now).is_empty());
    }

    #[test]
    fn next_preferred_is_the_next_slot() {
        let p = Policy { keep: PerPeriod([4, 24, 0, 0, 0, 0]), frequent_period: 1, ..Policy::default() };
        assert_eq!(next_preferred(&p, &t("2026-11-26T10:37:12Z")), Some(t("2026-11-26T10:38:00Z")));
        let p = Policy { keep: PerPeriod([0, 24, 0, 0, 0, 0]), ..Policy::default() };
        assert_eq!(next_preferred(&p, &t("2026-11-26T10:37:12Z")), Some(t("2026-11-26T11:00:00Z")));
    }
}
