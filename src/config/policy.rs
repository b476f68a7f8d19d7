//! Snapshot policy: how many snapshots of each period to keep, when they are due, which of them
//! carry RAM, and the scripts around them. The keys and defaults are sanoid's (a sanoid user
//! reads the same words); vmsnap adds RAM cadence (`ram`, `ram_keep`, `ram_mode`) and `strategy`.
//!
//! This module owns the resolved [`Policy`] and the raw, all-optional [`RawPolicy`] that
//! templates and domains write; [`crate::config`] resolves inheritance (built-in defaults →
//! `[template.default]` → `use_template` → the domain's own keys).

use crate::model::{RamCompress, RamMode, Strategy};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::model::Period;

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        s.parse().ok()
    }

    /// The period's length in seconds as sanoid prunes by it (a month is 31 days, a year 365.25).
    pub fn seconds(self, frequent_period_min: u32) -> f64 {
        match self {
            Period::Frequently => 60.0 * f64::from(frequent_period_min),
            Period::Hourly => 3600.0,
            Period::Daily => 86_400.0,
            Period::Weekly => 7.0 * 86_400.0,
            Period::Monthly => 31.0 * 86_400.0,
            Period::Yearly => 365.25 * 86_400.0,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One number per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerPeriod<T>(pub [T; 6]);

impl<T: Copy> PerPeriod<T> {
    pub fn get(&self, p: Period) -> T {
        self.0[p.index()]
    }
    pub fn set(&mut self, p: Period, v: T) {
        self.0[p.index()] = v;
    }
}

/// When, within its period, a snapshot is preferably taken (sanoid's `daily_hour` …), in local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreferredTimes {
    pub hourly_min: u32,
    pub daily_hour: u32,
    pub daily_min: u32,
    /// 0 = Sunday.
    pub weekly_wday: u32,
    pub weekly_hour: u32,
    pub weekly_min: u32,
    pub monthly_mday: u32,
    pub monthly_hour: u32,
    pub monthly_min: u32,
    pub yearly_mon: u32,
    pub yearly_mday: u32,
    pub yearly_hour: u32,
    pub yearly_min: u32,
}

/// Commands run around snapshots and pruning, with sanoid's environment variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scripts {
    pub pre_snapshot: Option<PathBuf>,
    pub post_snapshot: Option<PathBuf>,
    pub pre_pruning: Option<PathBuf>,
    pub pruning: Option<PathBuf>,
    pub timeout: Duration,
    /// Run the post script even when the pre script failed.
    pub force_post: bool,
    /// Skip the snapshot when the pre script fails.
    pub no_inconsistent_snapshot: bool,
}

/// A domain's resolved policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How many snapshots of each period to keep.
    pub keep: PerPeriod<u32>,
    /// Minutes per `frequently` snapshot.
    pub frequent_period: u32,
    pub autosnap: bool,
    pub autoprune: bool,
    pub preferred: PreferredTimes,
    /// Snapshots of these periods also save the RAM.
    pub ram_with: BTreeSet<Period>,
    /// Keep RAM dumps only for the newest N snapshots that have one (the disk snapshots stay).
    pub ram_keep: Option<u32>,
    pub ram_mode: RamMode,
    /// Freeze the guest (when it has an agent) around the pause of a RAM snapshot, so its disks
    /// stay app-consistent once the dump is gone; a guest resumed from such a dump wakes frozen
    /// and is thawed by whoever resumes it (or `vmsnap recover`).
    pub ram_quiesce: bool,
    /// How the RAM dump's stream is compressed as vmsnap writes it (`zstd`: libvirt's format 5).
    pub ram_compress: RamCompress,
    /// zstd's level (1..=19; 3 is zstd's default).
    pub ram_compress_level: i32,
    /// How fast QEMU may write the RAM dump.
    pub ram_bandwidth: RamBandwidth,
    pub strategy: Strategy,
    /// Replication targets (`[target.NAME]`) the domain's snapshots go to.
    pub replicate_to: Vec<String>,
    pub scripts: Scripts,
    /// `vmsnap check`: age of the newest snapshot of a period that warns / goes critical (0 = never).
    pub warn_after: PerPeriod<u64>,
    pub crit_after: PerPeriod<u64>,
    /// `vmsnap check` warns when no `vmsnap verify` succeeded within this age (seconds; 0 = never).
    pub verify_warn: u64,
    /// The daemon runs `vmsnap verify` of the domain when none was run within this age
    /// (seconds; 0 = never).
    pub verify_every: u64,
    /// `vmsnap check`: age of the newest snapshot a replication target has that warns / goes
    /// critical (seconds; 0 = never). `None`: those of the most frequent counted period.
    pub replicate_warn: Option<u64>,
    pub replicate_crit: Option<u64>,
}

impl Default for Policy {
    /// sanoid.defaults.conf's values; no RAM.
    fn default() -> Self {
        let h = 3600;
        Policy {
            keep: PerPeriod([0, 48, 90, 0, 6, 0]),
            frequent_period: 15,
            autosnap: true,
            autoprune: true,
            preferred: PreferredTimes {
                hourly_min: 0,
                daily_hour: 23,
                daily_min: 59,
                weekly_wday: 1,
                weekly_hour: 23,
                weekly_min: 30,
                monthly_mday: 1,
                monthly_hour: 0,
                monthly_min: 0,
                yearly_mon: 1,
                yearly_mday: 1,
                yearly_hour: 0,
                yearly_min: 0,
            },
            ram_with: BTreeSet::new(),
            ram_keep: None,
            ram_mode: RamMode::Background,
            ram_quiesce: true,
            ram_compress: RamCompress::None,
            ram_compress_level: 3,
            ram_bandwidth: RamBandwidth::Unlimited,
            strategy: Strategy::Overlay,
            replicate_to: Vec::new(),
            scripts: Scripts { timeout: Duration::from_secs(5), ..Scripts::default() },
            warn_after: PerPeriod([0, 90 * 60, 28 * h, 0, 32 * 24 * h, 0]),
            crit_after: PerPeriod([0, 360 * 60, 32 * h, 0, 40 * 24 * h, 0]),
            verify_warn: 0,
            verify_every: 0,
            replicate_warn: None,
            replicate_crit: None,
        }
    }
}

/// Defines a config section struct: its own fields, then every policy key (all optional), and
/// `policy()` to take the policy keys out. The key list is written once, here.
macro_rules! policy_section {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $fty:ty,)* }) => {
        policy_section! { @emit $(#[$m])* $name { $($(#[$fm])* $field : $fty,)* };
            use_template: Option<$crate::config::policy::OneOrMany>,
            frequently: Option<u32>, hourly: Option<u32>, daily: Option<u32>,
            weekly: Option<u32>, monthly: Option<u32>, yearly: Option<u32>,
            frequent_period: Option<u32>, autosnap: Option<bool>, autoprune: Option<bool>,
            hourly_min: Option<u32>, daily_hour: Option<u32>, daily_min: Option<u32>,
            weekly_wday: Option<u32>, weekly_hour: Option<u32>, weekly_min: Option<u32>,
            monthly_mday: Option<u32>, monthly_hour: Option<u32>, monthly_min: Option<u32>,
            yearly_mon: Option<u32>, yearly_mday: Option<u32>, yearly_hour: Option<u32>, yearly_min: Option<u32>,
            ram: Option<Vec<String>>, ram_keep: Option<u32>, ram_mode: Option<String>, ram_quiesce: Option<bool>, strategy: Option<String>,
            ram_compress: Option<String>, ram_compress_level: Option<i32>, ram_bandwidth: Option<$crate::config::policy::TextOrNumber>,
            replicate_to: Option<Vec<String>>,
            pre_snapshot_script: Option<PathBuf>, post_snapshot_script: Option<PathBuf>,
            pre_pruning_script: Option<PathBuf>, pruning_script: Option<PathBuf>,
            script_timeout: Option<u64>, force_post_snapshot_script: Option<bool>, no_inconsistent_snapshot: Option<bool>,
            frequently_warn: Option<String>, frequently_crit: Option<String>,
            hourly_warn: Option<String>, hourly_crit: Option<String>,
            daily_warn: Option<String>, daily_crit: Option<String>,
            weekly_warn: Option<String>, weekly_crit: Option<String>,
            monthly_warn: Option<String>, monthly_crit: Option<String>,
            yearly_warn: Option<String>, yearly_crit: Option<String>,
            verify_warn: Option<String>, verify_every: Option<String>, replicate_warn: Option<String>, replicate_crit: Option<String>,
        }
    };
    (@emit $(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $fty:ty,)* }; $($key:ident : $kty:ty,)*) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $field: $fty,)*
            $(pub $key: $kty,)*
        }
        impl $name {
            /// The policy keys this section sets.
            pub fn policy(&self) -> RawPolicy {
                RawPolicy { $($key: self.$key.clone(),)* }
            }
        }
    };
}
pub(crate) use policy_section;

policy_section! {
    /// What a template or a domain section may say about policy: every key optional.
    RawPolicy {}
}

/// How fast QEMU may write a RAM dump (`ram_bandwidth`): QEMU's own default (128 MiB/s) would
/// cap every dump, and with it how long a precopy dump keeps the guest frozen and a background
/// one slows the guest's writes. So by default the limit is lifted for the dump and put back
/// after it (as libvirt does for `virsh save` and snapshots with memory); `keep` leaves whatever
/// QEMU has, a number is MiB/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamBandwidth {
    Unlimited,
    Keep,
    MibPerSec(u64),
}

impl RamBandwidth {
    /// What to set QEMU's `max-bandwidth` to (bytes/s) for the dump; `None`: leave it.
    pub fn bytes(self) -> Option<u64> {
        match self {
            // libvirt's "unlimited": the largest whole MiB/s that fits an i64 of bytes.
            RamBandwidth::Unlimited => Some((i64::MAX as u64 >> 20) << 20),
            RamBandwidth::Keep => None,
            RamBandwidth::MibPerSec(m) => Some(m << 20),
        }
    }

    fn parse(v: &TextOrNumber) -> Result<Self, String> {
        match v {
            TextOrNumber::Text(t) if t == "unlimited" => Ok(RamBandwidth::Unlimited),
            TextOrNumber::Text(t) if t == "keep" => Ok(RamBandwidth::Keep),
            TextOrNumber::Number(n) if (1..=1 << 30).contains(n) => Ok(RamBandwidth::MibPerSec(*n as u64)),
            TextOrNumber::Number(n) => Err(format!("{n} MiB/s is out of range 1..=1073741824")),
            TextOrNumber::Text(t) => Err(format!("{t:?} is neither \"unlimited\", \"keep\" nor a number of MiB/s")),
        }
    }
}

/// A key that takes a word or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TextOrNumber {
    Text(String),
    Number(i64),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A policy key with a bad value: the key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKey {
    pub key: &'static str,
    pub why: String,
}

fn bad(key: &'static str, why: impl Into<String>) -> BadKey {
    BadKey { key, why: why.into() }
}

impl RawPolicy {
    /// Lays this section's keys over `base`, checking each value.
    pub fn apply(&self, base: &mut Policy) -> Result<(), BadKey> {
        let counts = [self.frequently, self.hourly, self.daily, self.weekly, self.monthly, self.yearly];
        for (p, v) in Period::ALL.into_iter().zip(counts) {
            if let Some(v) = v {
                base.keep.set(p, v);
            }
        }
        if let Some(v) = self.frequent_period {
            if v == 0 || v > 1440 {
                return Err(bad("frequent_period", format!("{v} minutes: use 1..=1440")));
            }
            base.frequent_period = v;
        }
        set(&mut base.autosnap, self.autosnap);
        set(&mut base.autoprune, self.autoprune);
        let t = &mut base.preferred;
        let ranged: [(&'static str, Option<u32>, &mut u32, u32, u32); 13] = [
            ("hourly_min", self.hourly_min, &mut t.hourly_min, 0, 59),
            ("daily_hour", self.daily_hour, &mut t.daily_hour, 0, 23),
            ("daily_min", self.daily_min, &mut t.daily_min, 0, 59),
            ("weekly_wday", self.weekly_wday, &mut t.weekly_wday, 0, 6),
            ("weekly_hour", self.weekly_hour, &mut t.weekly_hour, 0, 23),
            ("weekly_min", self.weekly_min, &mut t.weekly_min, 0, 59),
            ("monthly_mday", self.monthly_mday, &mut t.monthly_mday, 1, 31),
            ("monthly_hour", self.monthly_hour, &mut t.monthly_hour, 0, 23),
            ("monthly_min", self.monthly_min, &mut t.monthly_min, 0, 59),
            ("yearly_mon", self.yearly_mon, &mut t.yearly_mon, 1, 12),
            ("yearly_mday", self.yearly_mday, &mut t.yearly_mday, 1, 31),
            ("yearly_hour", self.yearly_hour, &mut t.yearly_hour, 0, 23),
            ("yearly_min", self.yearly_min, &mut t.yearly_min, 0, 59),
        ];
        for (key, v, slot, lo, hi) in ranged {
            if let Some(v) = v {
                if !(lo..=hi).contains(&v) {
                    return Err(bad(key, format!("{v} is out of range {lo}..={hi}")));
                }
                *slot = v;
            }
        }
        if let Some(names) = &self.ram {
            let mut with = BTreeSet::new();
            for n in names {
                with.insert(
                    Period::parse(n)
                        .ok_or_else(|| bad("ram", format!("{n:?} is not a period (frequently, hourly, daily, weekly, monthly, yearly)")))?,
                );
            }
            base.ram_with = with;
        }
        if let Some(n) = self.ram_keep {
            base.ram_keep = Some(n);
        }
        if let Some(m) = &self.ram_mode {
            base.ram_mode = m.parse::<RamMode>().map_err(|e| bad("ram_mode", e.to_string()))?;
        }
        if let Some(q) = self.ram_quiesce {
            base.ram_quiesce = q;
        }
        if let Some(c) = &self.ram_compress {
            base.ram_compress = c.parse::<RamCompress>().map_err(|e| bad("ram_compress", e.to_string()))?;
        }
        if let Some(l) = self.ram_compress_level {
            if !(1..=19).contains(&l) {
                return Err(bad("ram_compress_level", format!("{l} is out of range 1..=19")));
            }
            base.ram_compress_level = l;
        }
        if let Some(b) = &self.ram_bandwidth {
            base.ram_bandwidth = RamBandwidth::parse(b).map_err(|e| bad("ram_bandwidth", e))?;
        }
        if let Some(t) = &self.replicate_to {
            base.replicate_to = t.clone();
        }
        if let Some(s) = &self.strategy {
            base.strategy = s.parse::<Strategy>().map_err(|e| bad("strategy", e.to_string()))?;
        }
        let scripts = [
            ("pre_snapshot_script", &self.pre_snapshot_script, &mut base.scripts.pre_snapshot),
            ("post_snapshot_script", &self.post_snapshot_script, &mut base.scripts.post_snapshot),
            ("pre_pruning_script", &self.pre_pruning_script, &mut base.scripts.pre_pruning),
            ("pruning_script", &self.pruning_script, &mut base.scripts.pruning),
        ];
        for (key, v, slot) in scripts {
            if let Some(p) = v {
                if !p.is_absolute() {
                    return Err(bad(key, format!("{} is not an absolute path", p.display())));
                }
                *slot = Some(p.clone());
            }
        }
        if let Some(s) = self.script_timeout {
            base.scripts.timeout = Duration::from_secs(s);
        }
        set(&mut base.scripts.force_post, self.force_post_snapshot_script);
        set(&mut base.scripts.no_inconsistent_snapshot, self.no_inconsistent_snapshot);
        let limits = [
            (Period::Frequently, "frequently_warn", &self.frequently_warn, "frequently_crit", &self.frequently_crit),
            (Period::Hourly, "hourly_warn", &self.hourly_warn, "hourly_crit", &self.hourly_crit),
            (Period::Daily, "daily_warn", &self.daily_warn, "daily_crit", &self.daily_crit),
            (Period::Weekly, "weekly_warn", &self.weekly_warn, "weekly_crit", &self.weekly_crit),
            (Period::Monthly, "monthly_warn", &self.monthly_warn, "monthly_crit", &self.monthly_crit),
            (Period::Yearly, "yearly_warn", &self.yearly_warn, "yearly_crit", &self.yearly_crit),
        ];
        for (key, v, slot) in [
            ("replicate_warn", &self.replicate_warn, &mut base.replicate_warn),
            ("replicate_crit", &self.replicate_crit, &mut base.replicate_crit),
        ] {
            if let Some(v) = v {
                *slot = Some(parse_age(v).ok_or_else(|| bad(key, format!("{v:?}: use a number with s, m, h, d or w")))?);
            }
        }
        if let Some(v) = &self.verify_warn {
            base.verify_warn = parse_age(v).ok_or_else(|| bad("verify_warn", format!("{v:?}: use a number with s, m, h, d or w")))?;
        }
        if let Some(v) = &self.verify_every {
            base.verify_every = parse_age(v).ok_or_else(|| bad("verify_every", format!("{v:?}: use a number with s, m, h, d or w")))?;
        }
        for (p, wk, w, ck, c) in limits {
            if let Some(w) = w {
                base.warn_after.set(p, parse_age(w).ok_or_else(|| bad(wk, format!("{w:?}: use a number with s, m, h, d or w")))?);
            }
            if let Some(c) = c {
                base.crit_after.set(p, parse_age(c).ok_or_else(|| bad(ck, format!("{c:?}: use a number with s, m, h, d or w")))?);
            }
        }
        Ok(())
    }
}

/// A replication target's retention, as its `vmsnap serve --keep` (or a local target's `keep`)
/// spells it: `hourly=48,daily=30,…` over sanoid's defaults; keys are the period counts,
/// `frequent_period` and `ram_keep`. A target only prunes, so nothing else belongs here.
pub fn parse_keep(spec: &str) -> Result<Policy, BadKey> {
    let mut raw = RawPolicy::default();
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(bad("keep", format!("{item:?}: use key=value, e.g. hourly=48,daily=30")));
        };
        let n: u32 = value.trim().parse().map_err(|_| bad("keep", format!("{item:?}: {value:?} is not a count")))?;
        let slot = match key.trim() {
            "frequently" => &mut raw.frequently,
            "hourly" => &mut raw.hourly,
            "daily" => &mut raw.daily,
            "weekly" => &mut raw.weekly,
            "monthly" => &mut raw.monthly,
            "yearly" => &mut raw.yearly,
            "frequent_period" => &mut raw.frequent_period,
            "ram_keep" => &mut raw.ram_keep,
            other => {
                return Err(bad(
                    "keep",
                    format!(
                        "{other:?} is not a retention key (frequently, hourly, daily, weekly, monthly, yearly, frequent_period, ram_keep)"
                    ),
                ))
            }
        };
        *slot = Some(n);
    }
    let mut policy = Policy::default();
    raw.apply(&mut policy)?;
    Ok(policy)
}

/// The `--keep` spelling of a policy's retention (what a local target's `vmsnap serve` is given).
pub fn keep_spec(p: &Policy) -> String {
    let mut parts: Vec<String> = Period::ALL.iter().map(|&per| format!("{}={}", per.as_str(), p.keep.get(per))).collect();
    parts.push(format!("frequent_period={}", p.frequent_period));
    if let Some(n) = p.ram_keep {
        parts.push(format!("ram_keep={n}"));
    }
    parts.join(",")
}

fn set<T: Copy>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

impl Policy {
    /// `vmsnap check`'s replication ages (warn, crit): the configured ones, else those of the
    /// most frequent period the policy counts (a replica should be as fresh as the snapshots).
    pub fn replication_limits(&self) -> (u64, u64) {
        let most_frequent = Period::ALL.into_iter().find(|&p| self.keep.get(p) > 0);
        let (w, c) = most_frequent.map_or((0, 0), |p| (self.warn_after.get(p), self.crit_after.get(p)));
        (self.replicate_warn.unwrap_or(w), self.replicate_crit.unwrap_or(c))
    }
}

/// sanoid's ages: `90m`, `28h`, `32d`, `2w`, a bare number of seconds; `0` means never.
pub fn parse_age(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    // An age too large to count in seconds is not an age.
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targets_keep_reads_over_sanoids_defaults_and_round_trips() {
        let p = parse_keep("hourly=4, daily=2,ram_keep=1").unwrap();
        assert_eq!((p.keep.get(Period::Hourly), p.keep.get(Period::Daily), p.keep.get(Period::Monthly)), (4, 2, 6));
        assert_eq!(p.ram_keep, Some(1));
        let spec = keep_spec(&p);
        assert_eq!(spec, "frequently=0,hourly=4,daily=2,weekly=0,monthly=6,yearly=0,frequent_period=15,ram_keep=1");
        assert_eq!(parse_keep(&spec).unwrap(), p);
        for (bad, says) in
            [("hourly", "key=value"), ("hourly=-1", "not a count"), ("ram=1", "not a retention key"), ("frequent_period=0", "1..=1440")]
        {
            let e = parse_keep(bad).unwrap_err();
            assert!(e.why.contains(says), "{bad}: {}", e.why);
        }
    }

    fn raw(text: &str) -> RawPolicy {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_are_sanoids() {
        let p = Policy::default();
        assert_eq!(p.keep.get(Period::Hourly), 48);
        assert_eq!(p.keep.get(Period::Daily), 90);
        assert_eq!(p.keep.get(Period::Monthly), 6);
        assert_eq!(p.warn_after.get(Period::Hourly), 5400);
        assert!(p.autosnap && p.autoprune && p.ram_with.is_empty());
    }

    #[test]
    fn a_section_overrides_only_what_it_says() {
        let mut p = Policy::default();
        raw("hourly = 36\nram = [\"daily\"]\nram_keep = 3\nstrategy = \"direct\"\ndaily_warn = \"30h\"").apply(&mut p).unwrap();
        assert_eq!(p.keep.get(Period::Hourly), 36);
        assert_eq!(p.keep.get(Period::Daily), 90);
        assert_eq!(p.ram_with, BTreeSet::from([Period::Daily]));
        assert_eq!(p.ram_keep, Some(3));
        assert_eq!(p.strategy, Strategy::Direct);
        assert_eq!(p.warn_after.get(Period::Daily), 30 * 3600);
    }

    #[test]
    fn ram_bandwidth_lifts_the_limit_by_default_keeps_it_or_sets_mib() {
        assert_eq!(Policy::default().ram_bandwidth, RamBandwidth::Unlimited);
        assert!(RamBandwidth::Unlimited.bytes().unwrap() >= 1 << 62);
        let mut p = Policy::default();
        raw("ram_bandwidth = \"keep\"").apply(&mut p).unwrap();
        assert_eq!((p.ram_bandwidth, p.ram_bandwidth.bytes()), (RamBandwidth::Keep, None));
        raw("ram_bandwidth = 200").apply(&mut p).unwrap();
        assert_eq!(p.ram_bandwidth.bytes(), Some(200 << 20));
        for bad in ["ram_bandwidth = \"fast\"", "ram_bandwidth = 0", "ram_bandwidth = -5"] {
            let e = raw(bad).apply(&mut Policy::default()).unwrap_err();
            assert_eq!(e.key, "ram_bandwidth", "{bad}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut p = Policy::default();
        assert_eq!(raw("daily_hour = 24").apply(&mut p).unwrap_err().key, "daily_hour");
        assert_eq!(raw("ram = [\"hourlie\"]").apply(&mut p).unwrap_err().key, "ram");
        assert_eq!(raw("ram_mode = \"fast\"").apply(&mut p).unwrap_err().key, "ram_mode");
        assert_eq!(raw("pre_snapshot_script = \"x.sh\"").apply(&mut p).unwrap_err().key, "pre_snapshot_script");
        assert_eq!(raw("hourly_crit = \"soon\"").apply(&mut p).unwrap_err().key, "hourly_crit");
        assert_eq!(raw("frequent_period = 0").apply(&mut p).unwrap_err().key, "frequent_period");
        assert!(toml::from_str::<RawPolicy>("hourlyy = 3").unwrap_err().to_string().contains("hourlyy"));
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("90m"), Some(5400));
        assert_eq!(parse_age("32d"), Some(32 * 86_400));
        assert_eq!(parse_age("18446744073709551615w"), None);
        assert_eq!(parse_age("99999999999999999999999d"), None);
        assert_eq!(parse_age("0"), Some(0));
        assert_eq!(parse_age("1y"), None);
    }
}
