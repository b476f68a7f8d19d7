//! `vmsnap check`: a Nagios/Icinga plugin in the manner of `sanoid --monitor-snapshots`. One
//! line, perfdata after `|`, exit 0 OK / 1 WARNING / 2 CRITICAL / 3 UNKNOWN.
//!
//! A domain is critical when the newest snapshot of a counted period is older than its
//! `*_crit` age (or there is none), when its newest snapshot fell back to crash-consistent
//! although it has a guest agent, or when the daemon's last attempt failed; warning past the
//! `*_warn` age. Replication: the newest snapshot each target has (the source's cursor bookmark
//! for it) older than `replicate_warn` / `replicate_crit` (by default the most frequent counted
//! period's ages), or none at all while the domain has snapshots. The findings are a pure
//! function ([`evaluate`]) of the snapshots, the replicas, the status file and the time.

use crate::config::policy::Period;
use crate::config::DomainConfig;
use crate::daemon::status::Attempt;
use crate::retention::catalog::Entry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub state: State,
    pub text: String,
}

/// What one replication target has of a domain: the creation time of the newest snapshot it
/// received on every dataset (`None`: nothing yet, or a dataset it has nothing of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub target: String,
    pub newest: Option<i64>,
}

/// One domain's findings and perfdata.
pub fn evaluate(
    dom: &DomainConfig,
    entries: &[Entry],
    replicas: &[Replica],
    last: Option<&Attempt>,
    now: i64,
) -> (Vec<Finding>, Vec<String>) {
    let p = &dom.policy;
    let mut findings = Vec::new();
    let mut perf = Vec::new();
    let mut add = |state, text: String| findings.push(Finding { state, text: format!("{}: {text}", dom.name) });
    for period in Period::ALL.into_iter().filter(|&x| p.keep.get(x) > 0) {
        let (warn, crit) = (p.warn_after.get(period), p.crit_after.get(period));
        let newest = entries.iter().filter(|e| e.snap.periods.contains(&period)).map(|e| e.snap.created).max();
        let Some(created) = newest else {
            if crit > 0 {
                add(State::Critical, format!("no {} snapshot", period.as_str()));
            }
            continue;
        };
        let age = (now - created).max(0) as u64;
        perf.push(format!("{}_{}_age={age}s;{warn};{crit}", dom.name, period.as_str()));
        if crit > 0 && age > crit {
            add(State::Critical, format!("newest {} snapshot is {} old", period.as_str(), human(age)));
        } else if warn > 0 && age > warn {
            add(State::Warning, format!("newest {} snapshot is {} old", period.as_str(), human(age)));
        }
    }
    let newest = entries.iter().max_by_key(|e| e.snap.created);
    if let Some(e) = newest {
        if e.consistency.as_deref() == Some("crash") && dom.qga.is_some() {
            add(State::Critical, format!("newest snapshot {} fell back to crash-consistent (is the guest agent running?)", e.snap.name));
        }
    }
    // Backups proven by `vmsnap verify`: a failed verification is critical; with `verify_warn`,
    // no successful one within that age warns.
    let verified: Vec<(&Entry, i64, bool)> = entries
        .iter()
        .filter_map(|e| {
            let v = e.verified.as_deref()?;
            let (t, rest) = v.split_once(' ')?;
            Some((e, t.parse().ok()?, rest.starts_with("ok")))
        })
        .collect();
    for (e, _, _) in verified.iter().filter(|(_, _, ok)| !ok) {
        let why: String = e.verified.as_deref().unwrap_or_default().chars().take(200).collect();
        add(State::Critical, format!("verification of {} failed ({why})", e.snap.name));
    }
    if p.verify_warn > 0 {
        match verified.iter().filter(|(_, _, ok)| *ok).map(|(_, t, _)| *t).max() {
            Some(t) => {
                let age = (now - t).max(0) as u64;
                perf.push(format!("{}_verified_age={age}s;{}", dom.name, p.verify_warn));
                if age > p.verify_warn {
                    add(State::Warning, format!("last successful verification is {} old", human(age)));
                }
            }
            None => add(State::Warning, "no snapshot was verified yet (`vmsnap verify`)".into()),
        }
    }
    let (rwarn, rcrit) = p.replication_limits();
    for r in replicas {
        match r.newest {
            Some(t) => {
                let lag = (now - t).max(0) as u64;
                perf.push(format!("{}_{}_replication_lag={lag}s;{rwarn};{rcrit}", dom.name, r.target));
                if rcrit > 0 && lag > rcrit {
                    add(State::Critical, format!("newest snapshot on target {} is {} old", r.target, human(lag)));
                } else if rwarn > 0 && lag > rwarn {
                    add(State::Warning, format!("newest snapshot on target {} is {} old", r.target, human(lag)));
                }
            }
            None if newest.is_some() && rcrit > 0 => {
                add(State::Critical, format!("nothing replicated to target {} yet (`vmsnap replicate`)", r.target));
            }
            None => {}
        }
    }
    if let Some(a) = last.filter(|a| !a.ok) {
        if newest.is_none_or(|e| e.snap.created <= a.at) {
            add(State::Critical, format!("last snapshot attempt failed: {}", a.error.as_deref().unwrap_or("unknown error")));
        }
    }
    (findings, perf)
}

/// The plugin's line: worst state, the findings (or a summary), perfdata.
pub fn line(findings: &[Finding], perf: &[String], domains: usize) -> (State, String) {
    let state = findings.iter().map(|f| f.state).max().unwrap_or(State::Ok);
    let text = if findings.is_empty() {
        format!("{domains} domain(s) have fresh snapshots")
    } else {
        let mut worst: Vec<&Finding> = findings.iter().collect();
        worst.sort_by_key(|f| std::cmp::Reverse(f.state));
        worst.iter().map(|f| f.text.as_str()).collect::<Vec<_>>().join("; ")
    };
    let perf = if perf.is_empty() { String::new() } else { format!(" | {}", perf.join(" ")) };
    (state, format!("VMSNAP {} - {text}{perf}", state.as_str()))
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{:.1}d", s as f64 / 86_400.0),
        s if s >= 3600 => format!("{:.1}h", s as f64 / 3600.0),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::{PerPeriod, Policy};
    use crate::config::QuiescePolicy;
    use crate::retention::Snap;
    use std::path::PathBuf;

    fn dom(qga: bool) -> DomainConfig {
        DomainConfig {
            name: "web".into(),
            uuid: None,
            qmp: "/run/web.qmp".into(),
            qga: qga.then(|| PathBuf::from("/run/web.qga")),
            disks: vec![],
            nvram: None,
            xml: None,
            start: Vec::new(),
            quiesce: QuiescePolicy::BestEffort,
            policy: Policy { keep: PerPeriod([0, 24, 0, 0, 0, 0]), ..Policy::default() },
        }
    }

    fn entry(name: &str, created: i64, consistency: &str) -> Entry {
        Entry {
            snap: Snap { name: name.into(), created, periods: [Period::Hourly].into(), holds: vec![], ram_dump: None },
            datasets: vec![],
            consistency: Some(consistency.into()),
            verified: None,
        }
    }

    #[test]
    fn ages_against_warn_and_crit() {
        let now = 100_000;
        let (f, perf) = evaluate(&dom(true), &[entry("a", now - 600, "app")], &[], None, now);
        assert!(f.is_empty());
        assert_eq!(perf, ["web_hourly_age=600s;5400;21600"]);
        let (f, _) = evaluate(&dom(true), &[entry("a", now - 6000, "app")], &[], None, now);
        assert_eq!(f[0].state, State::Warning);
        let (f, _) = evaluate(&dom(true), &[entry("a", now - 30_000, "app")], &[], None, now);
        assert_eq!(f[0].state, State::Critical);
        let (f, _) = evaluate(&dom(true), &[], &[], None, now);
        assert_eq!((f[0].state, f[0].text.as_str()), (State::Critical, "web: no hourly snapshot"));
    }

    #[test]
    fn crash_fallback_and_failed_attempt_are_critical() {
        let now = 100_000;
        let (f, _) = evaluate(&dom(true), &[entry("a", now - 60, "crash")], &[], None, now);
        assert!(f[0].state == State::Critical && f[0].text.contains("crash-consistent"), "{f:?}");
        // Without an agent configured, crash-consistent is all there can be.
        assert!(evaluate(&dom(false), &[entry("a", now - 60, "crash")], &[], None, now).0.is_empty());
        let failed = Attempt { at: now - 30, ok: false, snapshot: None, consistency: None, error: Some("agent gone".into()) };
        let (f, _) = evaluate(&dom(true), &[entry("a", now - 60, "app")], &[], Some(&failed), now);
        assert!(f[0].text.contains("agent gone"));
        // A success after the failure clears it.
        assert!(evaluate(&dom(true), &[entry("a", now - 10, "app")], &[], Some(&failed), now).0.is_empty());
        let (state, text) = line(&f, &["x=1s;2;3".into()], 1);
        assert_eq!(state, State::Critical);
        assert!(text.starts_with("VMSNAP CRITICAL - web: last snapshot attempt failed") && text.ends_with(" | x=1s;2;3"), "{text}");
        assert_eq!(line(&[], &[], 2), (State::Ok, "VMSNAP OK - 2 domain(s) have fresh snapshots".into()));
    }

    #[test]
    fn replication_lag_by_target() {
        let now = 100_000;
        let d = dom(true);
        let snaps = [entry("a", now - 60, "app")];
        let r = |target: &str, newest: Option<i64>| Replica { target: target.into(), newest };
        // Defaults: the hourly ages (90 min, 6 h).
        let (f, perf) = evaluate(&d, &snaps, &[r("off", Some(now - 600))], None, now);
        assert!(f.is_empty(), "{f:?}");
        assert!(perf.contains(&"web_off_replication_lag=600s;5400;21600".to_owned()), "{perf:?}");
        let (f, _) = evaluate(&d, &snaps, &[r("off", Some(now - 7200)), r("usb", Some(now - 30_000))], None, now);
        assert_eq!((f[0].state, f[0].text.as_str()), (State::Warning, "web: newest snapshot on target off is 2.0h old"));
        assert_eq!((f[1].state, f[1].text.as_str()), (State::Critical, "web: newest snapshot on target usb is 8.3h old"));
        let (f, _) = evaluate(&d, &snaps, &[r("off", None)], None, now);
        assert!(f[0].state == State::Critical && f[0].text.contains("nothing replicated to target off"), "{f:?}");
        // Nothing to replicate yet: the snapshot finding says it.
        let (f, _) = evaluate(&d, &[], &[r("off", None)], None, now);
        assert_eq!(f.len(), 1, "{f:?}");
        let mut quiet = dom(true);
        quiet.policy.replicate_warn = Some(0);
        quiet.policy.replicate_crit = Some(86_400);
        assert!(evaluate(&quiet, &snaps, &[r("off", Some(now - 30_000))], None, now).0.is_empty());
    }

    #[test]
    fn verification_failed_is_critical_and_stale_warns() {
        let now = 100_000;
        let verified = |v: &str| Entry { verified: Some(v.into()), ..entry("a", now - 60, "ram") };
        let mut d = dom(true);
        // verify_warn unset: no verification is fine, a failed one is not.
        assert!(evaluate(&d, &[entry("a", now - 60, "ram")], &[], None, now).0.is_empty());
        let (f, _) = evaluate(&d, &[verified(&format!("{} failed: RAM dump x: its sha256 is 00", now - 5))], &[], None, now);
        assert!(f[0].state == State::Critical && f[0].text.contains("verification of a failed") && f[0].text.contains("sha256"), "{f:?}");
        d.policy.verify_warn = 86_400;
        let (f, _) = evaluate(&d, &[entry("a", now - 60, "ram")], &[], None, now);
        assert!(f[0].state == State::Warning && f[0].text.contains("no snapshot was verified"), "{f:?}");
        let (f, perf) = evaluate(&d, &[verified(&format!("{} ok: RAM dump sha256", now - 3600))], &[], None, now);
        assert!(f.is_empty(), "{f:?}");
        assert!(perf.contains(&"web_verified_age=3600s;86400".to_owned()), "{perf:?}");
        let (f, _) = evaluate(&d, &[verified(&format!("{} ok: RAM dump sha256", now - 90_000))], &[], None, now);
        assert!(f[0].state == State::Warning && f[0].text.contains("last successful verification is 1.0d old"), "{f:?}");
    }
}
