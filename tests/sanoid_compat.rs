//! vmsnap's retention planner against Debian's real sanoid, side by side: the same snapshot
//! listings and policies, the same keep/destroy decisions. sanoid runs `--prune-snapshots
//! --readonly` on a `zfs` stand-in that prints the listing (see `vmsnap_testkit::rig::sanoid`).
//!
//! The one intended difference: vmsnap never destroys a domain's newest snapshot; sanoid
//! does when its period's count is 0. The comparison says so explicitly.

use std::collections::{BTreeMap, BTreeSet};
use vmsnap::config::policy::{PerPeriod, Period, Policy};
use vmsnap::retention::{self, periods_of, Snap};
use vmsnap_testkit::rig::sanoid::{Sanoid, SanoidSection};
use vmsnap_testkit::rig::Rig;

const DATASET: &str = "tank/vms/web";

/// A random history and policy (no two snapshots created in the same second); creation times sit 30 s off every minute so that the second
/// or two between vmsnap's `now` and sanoid's own cannot move a snapshot across a boundary.
fn scenario(rng: &mut fastrand::Rng, now: i64) -> (Vec<Snap>, Policy) {
    let mut snaps = Vec::new();
    let kinds = [Period::Frequently, Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly, Period::Yearly];
    let scale = [15 * 60, 3600, 86_400, 7 * 86_400, 31 * 86_400, 366 * 86_400];
    for i in 0..rng.usize(0..60) {
        let k = rng.usize(0..kinds.len());
        let minutes = rng.i64(0..(scale[k] * 12 / 60));
        let created = now - minutes * 60 - 30;
        // Two snapshots of one period never share a creation second in practice; sanoid orders
        // such a tie by hash order, so the generator leaves ties out.
        if snaps.iter().any(|s: &Snap| s.created == created) {
            continue;
        }
        let name = format!("autosnap_s{i:03}_{}", kinds[k].as_str());
        snaps.push(Snap {
            name,
            created,
            periods: periods_of(&format!("autosnap_x_{}", kinds[k].as_str()), None),
            holds: vec![],
            ram_dump: None,
        });
    }
    let keep = PerPeriod([rng.u32(0..6), rng.u32(0..8), rng.u32(0..8), rng.u32(0..4), rng.u32(0..4), rng.u32(0..3)]);
    let frequent_period = [5, 10, 15, 30][rng.usize(0..4)];
    (snaps, Policy { keep, frequent_period, ..Policy::default() })
}

fn sections(policy: &Policy) -> Vec<SanoidSection<'static>> {
    let mut keys: Vec<(String, String)> = Period::ALL.iter().map(|p| (p.as_str().to_owned(), policy.keep.get(*p).to_string())).collect();
    keys.push(("frequent_period".into(), policy.frequent_period.to_string()));
    keys.push(("autosnap".into(), "no".into()));
    keys.push(("autoprune".into(), "yes".into()));
    vec![SanoidSection { dataset: DATASET, keys }]
}

#[test]
fn the_same_decisions_as_sanoid() {
    let rig = Rig::locate().expect("the rig (scripts/rig/rig.sh)");
    let sanoid = Sanoid::locate(&rig).expect("sanoid unpacked by scripts/rig/rig.sh");
    let mut rng = fastrand::Rng::with_seed(20261126);
    let (mut compared, mut destroyed_total) = (0, 0);
    for round in 0..25 {
        let now = chrono::Utc::now().timestamp();
        let (snaps, policy) = scenario(&mut rng, now);
        let listing: String = snaps.iter().map(|s| format!("{DATASET}@{}\tcreation\t{}\t-\n", s.name, s.created)).collect();
        let theirs: BTreeSet<String> = sanoid.would_prune(&listing, &sections(&policy)).expect("sanoid");
        let plan = retention::plan(&snaps, &policy, now);
        let ours: BTreeSet<String> = plan.iter().filter(|d| !d.keep).map(|d| format!("{DATASET}@{}", d.name)).collect();
        let newest = snaps
            .iter()
            .max_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)))
            .map(|s| format!("{DATASET}@{}", s.name));
        let mut expected = theirs.clone();
        if let Some(n) = &newest {
            expected.remove(n);
        }
        let rules: BTreeMap<&str, &retention::Rule> = plan.iter().map(|d| (d.name.as_str(), &d.rule)).collect();
        let only_ours: Vec<_> = ours.difference(&expected).collect();
        let only_theirs: Vec<_> = expected.difference(&ours).collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty(),
            "round {round}: only vmsnap destroys {only_ours:?}, only sanoid destroys {only_theirs:?}\npolicy {:?} frequent_period {}\nlisting:\n{listing}\nvmsnap's rules: {rules:#?}",
            policy.keep,
            policy.frequent_period
        );
        compared += snaps.len();
        destroyed_total += ours.len();
    }
    eprintln!("METRIC sanoid_compat: {compared} snapshots in 25 histories, {destroyed_total} destroyed, same decisions");
    assert!(destroyed_total > 0, "the histories must exercise pruning");
}
