//! Benchmark: retention planning over 100k synthetic snapshots, vmsnap against Debian's sanoid
//! (`sanoid --prune-snapshots --readonly` on a `zfs` stand-in printing the same listing).
//!
//! `cargo bench --bench planning` (host lane; needs the rig's unpacked sanoid). vmsnap's time
//! includes parsing the listing text, as sanoid's does; sanoid's includes starting perl, which
//! is part of what a sanoid run costs. Both figures come from this run.

use std::time::Instant;
use vmsnap::config::policy::{PerPeriod, Period, Policy};
use vmsnap::retention::{self, periods_of, Snap};
use vmsnap_testkit::rig::sanoid::{Sanoid, SanoidSection};
use vmsnap_testkit::rig::Rig;

const DATASET: &str = "tank/vms/web";

fn main() {
    let n: usize = std::env::var("VMSNAP_BENCH_SNAPSHOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let now = chrono::Utc::now().timestamp();
    let mut rng = fastrand::Rng::with_seed(7);
    let kinds = ["frequently", "hourly", "daily", "weekly", "monthly"];
    let listing: String = (0..n)
        .map(|i| {
            let kind = kinds[rng.usize(0..kinds.len())];
            format!("{DATASET}@autosnap_{i:07}_{kind}\tcreation\t{}\t-\n", now - 60 * (n - i) as i64 - 30)
        })
        .collect();
    let policy = Policy { keep: PerPeriod([96, 48, 90, 12, 6, 0]), ..Policy::default() };

    let ours = |text: &str| {
        let snaps: Vec<Snap> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (full, _, created) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
                let name = full.split_once('@')?.1;
                Some(Snap { name: name.to_owned(), created, periods: periods_of(name, None), holds: vec![], ram_dump: None })
            })
            .collect();
        retention::plan(&snaps, &policy, now).iter().filter(|d| !d.keep).count()
    };
    let mut times = Vec::new();
    let mut destroyed = 0;
    for _ in 0..5 {
        let t = Instant::now();
        destroyed = ours(&listing);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let vmsnap_s = times[times.len() / 2];

    let rig = Rig::locate().expect("the rig (scripts/rig/rig.sh)");
    let sanoid = Sanoid::locate(&rig).expect("sanoid unpacked by scripts/rig/rig.sh");
    let keys: Vec<(String, String)> = Period::ALL
        .iter()
        .map(|p| (p.as_str().to_owned(), policy.keep.get(*p).to_string()))
        .chain([("autosnap".to_owned(), "no".to_owned()), ("frequent_period".to_owned(), "15".to_owned())])
        .collect();
    let sections = [SanoidSection { dataset: DATASET, keys }];
    // sanoid grows faster than linearly here (100k snapshots took about 7.5 min a run on this
    // machine): one run for large listings unless VMSNAP_BENCH_SANOID_RUNS says otherwise.
    let runs: usize = std::env::var("VMSNAP_BENCH_SANOID_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(if n > 20_000 { 1 } else { 3 });
    let mut stimes = Vec::new();
    let mut theirs = 0;
    for _ in 0..runs {
        let t = Instant::now();
        theirs = sanoid.would_prune(&listing, &sections).expect("sanoid").len();
        stimes.push(t.elapsed().as_secs_f64());
    }
    stimes.sort_by(f64::total_cmp);
    let sanoid_s = stimes[stimes.len() / 2];
    println!("\nretention planning over {n} snapshots (medians: vmsnap of 5 runs, sanoid of {runs})");
    println!("  vmsnap (parse + plan, in process)      {:>10.1} ms  destroys {destroyed}", vmsnap_s * 1e3);
    println!("  sanoid --prune-snapshots --readonly   {:>10.1} ms  destroys {theirs}", sanoid_s * 1e3);
    println!("  ratio vmsnap/sanoid: {:.4}  (sanoid/vmsnap: {:.1}x)", vmsnap_s / sanoid_s, sanoid_s / vmsnap_s);
}
