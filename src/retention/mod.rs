//! Which snapshots a policy keeps: a pure function of the snapshot list, the policy and the time.
//!
//! The rule is sanoid's, per period: walking a period's snapshots oldest first, one goes when
//! it is older than N periods *and* more than N of that period remain (creation time from ZFS,
//! not from the name). On top of it vmsnap never destroys a held snapshot, the newest snapshot,
//! or one that is not a scheduled (`…_hourly`-style) snapshot. A snapshot that serves several
//! periods (vmsnap takes one snapshot when an hourly and a daily fall due together) goes only
//! when every one of its periods lets it go. A domain's snapshot is one group across all of its
//! datasets: one decision for the name.

pub mod catalog;
pub mod prune;
pub(crate) mod schedule;

use crate::config::policy::{Period, Policy};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One snapshot of a domain (all its datasets), as retention sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snap {
    /// The part after `@`, shared by every dataset of the domain.
    pub name: String,
    /// Creation time (unix seconds) from ZFS; the oldest across the datasets.
    pub created: i64,
    /// The periods this snapshot serves.
    pub periods: BTreeSet<Period>,
    /// Hold tags on any of its datasets' snapshots (a replication anchor is one).
    pub holds: Vec<String>,
    /// The RAM dump it references, if any.
    pub ram_dump: Option<String>,
}

/// Why a snapshot is kept or destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Rule {
    /// A `zfs hold` is on it.
    Held { tag: String },
    /// The domain's newest snapshot is never destroyed.
    Newest,
    /// Not a scheduled snapshot (a manual one, or another tool's): retention leaves it alone.
    NotScheduled,
    /// `autoprune = false`.
    AutopruneOff,
    /// One of the newest `count` of this period.
    WithinCount { period: Period, count: u32 },
    /// Younger than `count` periods.
    Young { period: Period, count: u32 },
    /// Older than `count` periods and more than `count` of them: every period it serves lets it go.
    Expired { period: Period, count: u32 },
}

/// The plan for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub name: String,
    pub keep: bool,
    #[serde(flatten)]
    pub rule: Rule,
    /// A kept snapshot whose RAM dump goes (`ram_keep`): the disk snapshot stays.
    pub drop_ram: bool,
}

/// Decides keep/destroy for each snapshot, in the order given.
pub fn plan(snaps: &[Snap], policy: &Policy, now: i64) -> Vec<Decision> {
    let order = |a: &&Snap, b: &&Snap| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name));
    let newest = snaps.iter().max_by(order).map(|s| s.name.as_str());
    // Per period: sanoid's walk, recording each snapshot's verdict for that period.
    let mut verdicts: BTreeMap<&str, Vec<Rule>> = BTreeMap::new();
    for period in Period::ALL {
        let mut of_period: Vec<&Snap> = snaps.iter().filter(|s| s.periods.contains(&period)).collect();
        of_period.sort_by(order);
        let count = policy.keep.get(period);
        let max_age = now as f64 - f64::from(count) * period.seconds(policy.frequent_period);
        let mut remaining = of_period.len();
        for s in of_period {
            let old = (s.created as f64) < max_age;
            let rule = if old && remaining > count as usize {
                remaining -= 1;
                Rule::Expired { period, count }
            } else if old {
                Rule::WithinCount { period, count }
            } else {
                Rule::Young { period, count }
            };
            verdicts.entry(s.name.as_str()).or_default().push(rule);
        }
    }
    let mut decisions: Vec<Decision> = snaps
        .iter()
        .map(|s| {
            let rule = if let Some(tag) = s.holds.first() {
                Rule::Held { tag: tag.clone() }
            } else if Some(s.name.as_str()) == newest {
                Rule::Newest
            } else if s.periods.is_empty() {
                Rule::NotScheduled
            } else if !policy.autoprune {
                Rule::AutopruneOff
            } else {
                let v = verdicts.remove(s.name.as_str()).unwrap_or_default();
                // Kept by the first period that keeps it; else expired by the longest period.
                v.iter().find(|r| !matches!(r, Rule::Expired { .. })).or_else(|| v.last()).cloned().unwrap_or(Rule::NotScheduled)
            };
            Decision { name: s.name.clone(), keep: !matches!(rule, Rule::Expired { .. }), rule, drop_ram: false }
        })
        .collect();
    if let Some(n) = policy.ram_keep {
        // RAM dumps of the newest n kept snapshots that have one stay; older kept ones lose theirs.
        let mut with_ram: Vec<(&Snap, usize)> =
            snaps.iter().enumerate().filter(|(i, s)| s.ram_dump.is_some() && decisions[*i].keep).map(|(i, s)| (s, i)).collect();
        with_ram.sort_by(|a, b| order(&b.0, &a.0));
        for (_, i) in with_ram.into_iter().skip(n as usize) {
            decisions[i].drop_ram = true;
        }
    }
    decisions
}

/// The periods a snapshot serves: vmsnap's `vmsnap:periods` property when set, else the
/// sanoid-style suffix of an `autosnap_…_hourly` name.
pub fn periods_of(name: &str, property: Option<&str>) -> BTreeSet<Period> {
    if let Some(p) = property.filter(|p| !p.is_empty() && *p != "-") {
        return p.split(',').filter_map(|s| Period::parse(s.trim())).collect();
    }
    if !name.starts_with("autosnap") {
        return BTreeSet::new();
    }
    name.rsplit_once('_').and_then(|(_, suffix)| Period::parse(suffix)).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::PerPeriod;
    use proptest::prelude::*;

    const H: i64 = 3600;

    fn snap(name: &str, created: i64, periods: &[Period]) -> Snap {
        Snap { name: name.into(), created, periods: periods.iter().copied().collect(), holds: vec![], ram_dump: None }
    }

    fn policy(hourly: u32, daily: u32) -> Policy {
        Policy { keep: PerPeriod([0, hourly, daily, 0, 0, 0]), ..Policy::default() }
    }

    fn destroyed(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| !d.keep).map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn older_than_n_periods_and_more_than_n() {
        let now = 100 * H;
        let snaps: Vec<Snap> = (0..6).map(|i| snap(&format!("h{i}"), now - (5 - i) * H - 60, &[Period::Hourly])).collect();
        // hourly=3: h0 (5h old), h1 (4h), h2 (3h+1m) are older than 3 hours and more than 3 exist.
        let d = plan(&snaps, &policy(3, 0), now);
        assert_eq!(destroyed(&d), ["h0", "h1", "h2"]);
        // hourly=10: none older than 10 hours.
        assert!(destroyed(&plan(&snaps, &policy(10, 0), now)).is_empty());
    }

    #[test]
    fn never_fewer_than_n_even_when_all_are_old() {
        let snaps: Vec<Snap> = (0..4).map(|i| snap(&format!("h{i}"), i * H, &[Period::Hourly])).collect();
        let d = plan(&snaps, &policy(2, 0), 1000 * H);
        assert_eq!(destroyed(&d), ["h0", "h1"]);
        assert_eq!(d[2].rule, Rule::WithinCount { period: Period::Hourly, count: 2 });
    }

    #[test]
    fn held_newest_and_manual_snapshots_stay() {
        let mut snaps = vec![
            snap("a_hourly", 0, &[Period::Hourly]),
            snap("autosnap_x_manual", H, &[]),
            snap("c_hourly", 2 * H, &[Period::Hourly]),
            snap("d_hourly", 3 * H, &[Period::Hourly]),
        ];
        snaps[0].holds = vec!["vmsnap-repl".into()];
        let d = plan(&snaps, &policy(0, 0), 1000 * H);
        assert_eq!(destroyed(&d), ["c_hourly"]);
        assert_eq!(d[0].rule, Rule::Held { tag: "vmsnap-repl".into() });
        assert_eq!(d[1].rule, Rule::NotScheduled);
        assert_eq!(d[3].rule, Rule::Newest);
    }

    #[test]
    fn a_snapshot_of_several_periods_goes_only_when_all_let_it_go() {
        let snaps =
            vec![snap("hd", 0, &[Period::Hourly, Period::Daily]), snap("h1", H, &[Period::Hourly]), snap("h2", 2 * H, &[Period::Hourly])];
        let d = plan(&snaps, &policy(1, 5), 1000 * H);
        assert!(d[0].keep, "the daily keeps it: {:?}", d[0]);
        assert_eq!(d[0].rule, Rule::WithinCount { period: Period::Daily, count: 5 });
        assert_eq!(destroyed(&d), ["h1"]);
    }

    #[test]
    fn ram_keep_drops_older_dumps_of_kept_snapshots() {
        let mut snaps: Vec<Snap> = (0..4).map(|i| snap(&format!("d{i}"), i * 86_400, &[Period::Daily])).collect();
        for s in &mut snaps {
            s.ram_dump = Some(format!("/ram/{}.ram", s.name));
        }
        let p = Policy { ram_keep: Some(2), ..policy(0, 10) };
        let d = plan(&snaps, &p, 4 * 86_400);
        assert_eq!(d.iter().map(|d| (d.keep, d.drop_ram)).collect::<Vec<_>>(), [(true, true), (true, true), (true, false), (true, false)]);
    }

    #[test]
    fn periods_from_property_or_name() {
        assert_eq!(periods_of("autosnap_2026-11-26_10:00:00_hourly", None), BTreeSet::from([Period::Hourly]));
        assert_eq!(periods_of("autosnap_2026-11-26_10:00:00_manual", None), BTreeSet::new());
        assert_eq!(periods_of("backup_daily", None), BTreeSet::new());
        assert_eq!(periods_of("autosnap_x_daily", Some("daily,hourly")), BTreeSet::from([Period::Daily, Period::Hourly]));
    }

    fn arb_snaps() -> impl Strategy<Value = Vec<Snap>> {
        prop::collection::vec((0i64..2000, prop::collection::btree_set(0usize..6, 0..3), any::<bool>(), prop::bool::weighted(0.1)), 0..40)
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (hours, ps, ram, held))| Snap {
                        name: format!("s{i:02}"),
                        created: hours * H,
                        periods: ps.into_iter().map(|p| Period::ALL[p]).collect(),
                        holds: if held { vec!["hold".into()] } else { vec![] },
                        ram_dump: ram.then(|| format!("/ram/s{i}")),
                    })
                    .collect()
            })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (prop::array::uniform6(0u32..6), 1u32..120, any::<bool>(), prop::option::of(0u32..4)).prop_map(|(keep, fp, autoprune, ram_keep)| {
            Policy { keep: PerPeriod(keep), frequent_period: fp, autoprune, ram_keep, ..Policy::default() }
        })
    }

    proptest! {
        #[test]
        fn never_destroys_what_must_stay(snaps in arb_snaps(), policy in arb_policy(), now in 0i64..3000 * H) {
            let d = plan(&snaps, &policy, now);
            let newest = snaps.iter().max_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name))).map(|s| s.name.clone());
            for (s, d) in snaps.iter().zip(&d) {
                if !s.holds.is_empty() || Some(&s.name) == newest.as_ref() || s.periods.is_empty() || !policy.autoprune {
                    prop_assert!(d.keep, "{:?} destroyed", s);
                }
                // Among the newest N of a period it serves: kept.
                for p in &s.periods {
                    let n = policy.keep.get(*p) as usize;
                    let newer = snaps.iter().filter(|o| o.periods.contains(p) && (o.created, &o.name) > (s.created, &s.name)).count();
                    prop_assert!(newer >= n || d.keep, "{:?} is among the newest {} {:?} but destroyed", s, n, p);
                }
                prop_assert!(d.keep || !d.drop_ram, "only a kept snapshot drops its RAM");
            }
        }

        #[test]
        fn idempotent(snaps in arb_snaps(), policy in arb_policy(), now in 0i64..3000 * H) {
            let d = plan(&snaps, &policy, now);
            let rest: Vec<Snap> = snaps.iter().zip(&d).filter(|(_, d)| d.keep).map(|(s, _)| s.clone()).collect();
            let again = plan(&rest, &policy, now);
            prop_assert!(again.iter().all(|d| d.keep), "a second plan destroys more: {:?}", destroyed(&again));
        }

        #[test]
        fn stable_under_shuffle(snaps in arb_snaps(), policy in arb_policy(), now in 0i64..3000 * H, seed in any::<u64>()) {
            let mut shuffled = snaps.clone();
            let mut rng = fastrand::Rng::with_seed(seed);
            rng.shuffle(&mut shuffled);
            let by_name = |d: Vec<Decision>| d.into_iter().map(|d| (d.name.clone(), d)).collect::<BTreeMap<_, _>>();
            prop_assert_eq!(by_name(plan(&snaps, &policy, now)), by_name(plan(&shuffled, &policy, now)));
        }
    }
}
