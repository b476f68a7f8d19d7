//! What to send to bring one target dataset up to date: pure, from the source's snapshots (and
//! its cursor bookmark) and the target's [`Listing`]. Never a forced receive: a target that
//! changed, or holds snapshots the source does not have after the common one, is *diverged* and
//! nothing is sent.

use super::protocol::Listing;

/// A source snapshot (any, not only vmsnap's: `-I` carries them all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSnap {
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
}

/// The bookmark the source keeps per target at the newest snapshot that target has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub bookmark: String,
    pub guid: u64,
    pub createtxg: u64,
}

/// The newest snapshot the source and a diverged target both have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Common {
    pub name: String,
    pub guid: u64,
}

/// Where an incremental starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `-I ds@name`: every snapshot in between travels too.
    Snapshot(String),
    /// `-i ds#name`: the snapshot itself was pruned on the source.
    Bookmark(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `zfs send -t TOKEN`: the rest of an interrupted receive.
    Resume {
        token: String,
    },
    /// The first time: `zfs send ds@to`.
    Full {
        to: String,
    },
    Incremental {
        from: Base,
        to: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    UpToDate,
    Send(Vec<Step>),
    /// Why nothing may be sent (the snapshots named with their GUIDs), and the newest snapshot
    /// both sides have, when there is one (what `--rollback-target` goes back to).
    Diverged(String, Option<Common>),
}

/// The most snapshots one stream carries. A receive commits each snapshot in a transaction group
/// of its own (0.1–0.3 s each on a slow pool), and the stream of a thousand small snapshots fits
/// in the pipes: the target would then work for minutes after the last byte moved, past any idle
/// deadline (`idle_timeout_s`), and a failure would cost the whole range. In pieces, each
/// receive ends within seconds and what it received stays.
pub const MAX_SNAPSHOTS_PER_STREAM: usize = 100;

/// `source`: every snapshot of the dataset, oldest first; `newest`: the one to bring the target
/// to (the newest vmsnap snapshot of the domain). Incrementals carry at most
/// [`MAX_SNAPSHOTS_PER_STREAM`] snapshots each.
pub fn plan(source: &[SourceSnap], newest: Option<&str>, cursor: Option<&Cursor>, target: &Listing) -> Plan {
    match plan_whole(source, newest, cursor, target) {
        Plan::Send(steps) => Plan::Send(in_pieces(source, steps)),
        other => other,
    }
}

/// Each incremental from a snapshot split into ones of at most [`MAX_SNAPSHOTS_PER_STREAM`]
/// snapshots, from the source's own snapshots in between.
fn in_pieces(source: &[SourceSnap], steps: Vec<Step>) -> Vec<Step> {
    let at = |name: &str| source.iter().position(|s| s.name == name);
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Incremental { from: Base::Snapshot(from), to } => {
                let (Some(mut i), Some(j)) = (at(&from), at(&to)) else {
                    out.push(Step::Incremental { from: Base::Snapshot(from), to });
                    continue;
                };
                while j > i + MAX_SNAPSHOTS_PER_STREAM {
                    let next = i + MAX_SNAPSHOTS_PER_STREAM;
                    out.push(Step::Incremental { from: Base::Snapshot(source[i].name.clone()), to: source[next].name.clone() });
                    i = next;
                }
                out.push(Step::Incremental { from: Base::Snapshot(source[i].name.clone()), to });
            }
            other => out.push(other),
        }
    }
    out
}

/// A target's snapshots for a message: the first few by name and GUID, then how many more (a
/// target may list thousands).
fn named(snapshots: &[super::protocol::TargetSnapshot]) -> String {
    const SHOWN: usize = 5;
    let mut out: Vec<String> = snapshots.iter().take(SHOWN).map(|t| format!("{} (guid {})", t.name, t.guid)).collect();
    if snapshots.len() > SHOWN {
        out.push(format!("and {} more", snapshots.len() - SHOWN));
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

fn plan_whole(source: &[SourceSnap], newest: Option<&str>, cursor: Option<&Cursor>, target: &Listing) -> Plan {
    if let Some(token) = &target.resume_token {
        return Plan::Send(vec![Step::Resume { token: token.clone() }]);
    }
    let Some(newest) = newest.and_then(|n| source.iter().position(|s| s.name == n)) else { return Plan::UpToDate };
    if !target.exists {
        let first = &source[0].name;
        let mut steps = vec![Step::Full { to: first.clone() }];
        if newest > 0 {
            steps.push(Step::Incremental { from: Base::Snapshot(first.clone()), to: source[newest].name.clone() });
        }
        return Plan::Send(steps);
    }
    let known = |guid: u64| source.iter().position(|s| s.guid == guid);
    let common = target.snapshots.iter().rposition(|t| known(t.guid).is_some() || cursor.is_some_and(|c| c.guid == t.guid));
    let Some(common) = common else {
        return Plan::Diverged(
            format!("the target has no snapshot in common with the source (it has: {})", named(&target.snapshots)),
            None,
        );
    };
    let newer = &target.snapshots[common + 1..];
    let base = &target.snapshots[common];
    let back_to = || Some(Common { name: base.name.clone(), guid: base.guid });
    if !newer.is_empty() {
        return Plan::Diverged(
            format!(
                "the target has snapshots after the common one {} (guid {}) that the source does not: {}",
                base.name,
                base.guid,
                named(newer)
            ),
            back_to(),
        );
    }
    if target.written > 0 {
        return Plan::Diverged(
            format!(
                "the target dataset was changed ({} bytes written) since its newest snapshot {} (guid {})",
                target.written, base.name, base.guid
            ),
            back_to(),
        );
    }
    match known(base.guid) {
        Some(i) if i >= newest => Plan::UpToDate,
        Some(i) => Plan::Send(vec![Step::Incremental { from: Base::Snapshot(source[i].name.clone()), to: source[newest].name.clone() }]),
        None => {
            let c = cursor.expect("the common snapshot matched the cursor");
            let Some(first) = source.iter().position(|s| s.createtxg > c.createtxg) else { return Plan::UpToDate };
            if first > newest {
                return Plan::UpToDate;
            }
            let mut steps = vec![Step::Incremental { from: Base::Bookmark(c.bookmark.clone()), to: source[first].name.clone() }];
            if newest > first {
                steps.push(Step::Incremental { from: Base::Snapshot(source[first].name.clone()), to: source[newest].name.clone() });
            }
            Plan::Send(steps)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::TargetSnapshot;
    use super::*;

    fn src(n: &[(&str, u64)]) -> Vec<SourceSnap> {
        n.iter()
            .enumerate()
            .map(|(i, (name, guid))| SourceSnap { name: (*name).into(), guid: *guid, createtxg: 10 * (i as u64 + 1) })
            .collect()
    }

    fn tgt(n: &[(&str, u64)]) -> Listing {
        Listing {
            exists: true,
            snapshots: n
                .iter()
                .map(|(name, guid)| TargetSnapshot { name: (*name).into(), guid: *guid, createtxg: 0, props: Default::default() })
                .collect(),
            resume_token: None,
            written: 0,
            more: false,
        }
    }

    #[test]
    fn first_time_full_then_every_snapshot_after() {
        let s = src(&[("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(
            plan(&s, Some("c"), None, &Listing::default()),
            Plan::Send(vec![Step::Full { to: "a".into() }, Step::Incremental { from: Base::Snapshot("a".into()), to: "c".into() }])
        );
        assert_eq!(plan(&s, Some("a"), None, &Listing::default()), Plan::Send(vec![Step::Full { to: "a".into() }]));
        assert_eq!(plan(&s, None, None, &Listing::default()), Plan::UpToDate);
    }

    #[test]
    fn incrementals_from_the_newest_common_snapshot() {
        let s = src(&[("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(
            plan(&s, Some("c"), None, &tgt(&[("a", 1)])),
            Plan::Send(vec![Step::Incremental { from: Base::Snapshot("a".into()), to: "c".into() }])
        );
        assert_eq!(plan(&s, Some("c"), None, &tgt(&[("a", 1), ("c", 3)])), Plan::UpToDate);
        // The target pruned its older ones: still fine.
        assert_eq!(
            plan(&s, Some("c"), None, &tgt(&[("b", 2)])),
            Plan::Send(vec![Step::Incremental { from: Base::Snapshot("b".into()), to: "c".into() }])
        );
    }

    #[test]
    fn a_pruned_base_goes_through_the_cursor_bookmark() {
        // The source pruned `a`; its bookmark has a's guid.
        let s: Vec<SourceSnap> = src(&[("x", 9), ("b", 2), ("c", 3)]).into_iter().skip(1).collect();
        let cursor = Cursor { bookmark: "vmsnap-off-10".into(), guid: 1, createtxg: 10 };
        assert_eq!(
            plan(&s, Some("c"), Some(&cursor), &tgt(&[("a", 1)])),
            Plan::Send(vec![
                Step::Incremental { from: Base::Bookmark("vmsnap-off-10".into()), to: "b".into() },
                Step::Incremental { from: Base::Snapshot("b".into()), to: "c".into() },
            ])
        );
    }

    #[test]
    fn diverged_targets_are_never_sent_to() {
        let s = src(&[("a", 1), ("b", 2)]);
        let Plan::Diverged(why, common) = plan(&s, Some("b"), None, &tgt(&[("a", 1), ("mine", 77)])) else { panic!() };
        assert_eq!(common, Some(Common { name: "a".into(), guid: 1 }));
        assert!(why.contains("mine (guid 77)") && why.contains("a (guid 1)"), "{why}");
        let mut changed = tgt(&[("a", 1)]);
        changed.written = 4096;
        assert!(matches!(plan(&s, Some("b"), None, &changed), Plan::Diverged(w, Some(_)) if w.contains("4096 bytes")));
        assert!(matches!(plan(&s, Some("b"), None, &tgt(&[("z", 5)])), Plan::Diverged(w, None) if w.contains("no snapshot in common")));
        assert!(matches!(plan(&s, Some("b"), None, &tgt(&[])), Plan::Diverged(_, None)));
    }

    #[test]
    fn an_interrupted_receive_resumes_first() {
        let mut t = tgt(&[("a", 1)]);
        t.resume_token = Some("1-abc".into());
        assert_eq!(plan(&src(&[("a", 1), ("b", 2)]), Some("b"), None, &t), Plan::Send(vec![Step::Resume { token: "1-abc".into() }]));
    }

    #[test]
    fn long_ranges_go_in_pieces_of_at_most_a_hundred_snapshots() {
        let names: Vec<String> = (0..250).map(|i| format!("s{i:03}")).collect();
        let source: Vec<SourceSnap> = names
            .iter()
            .enumerate()
            .map(|(i, n)| SourceSnap { name: n.clone(), guid: 1000 + i as u64, createtxg: 10 + i as u64 })
            .collect();
        let fresh = Listing { exists: false, ..Default::default() };
        let Plan::Send(steps) = plan(&source, Some("s249"), None, &fresh) else { panic!("nothing to send") };
        let inc = |a: &str, b: &str| Step::Incremental { from: Base::Snapshot(a.into()), to: b.into() };
        assert_eq!(steps, vec![Step::Full { to: "s000".into() }, inc("s000", "s100"), inc("s100", "s200"), inc("s200", "s249")]);
        // A short range stays one stream.
        let Plan::Send(steps) = plan(&source[..50], Some("s049"), None, &fresh) else { panic!("nothing to send") };
        assert_eq!(steps, vec![Step::Full { to: "s000".into() }, inc("s000", "s049")]);
    }

    #[test]
    fn a_target_listing_thousands_of_strangers_is_named_in_a_few_words() {
        let source = src(&[("a", 1)]);
        let strangers: Vec<TargetSnapshot> = (0..5000)
            .map(|i| TargetSnapshot { name: format!("s{i}"), guid: 900_000 + i, createtxg: 10 + i, props: Default::default() })
            .collect();
        let target = Listing { exists: true, snapshots: strangers, ..Default::default() };
        let Plan::Diverged(why, None) = plan(&source, Some("a"), None, &target) else { panic!("not diverged") };
        assert!(why.contains("s0 (guid 900000)") && why.ends_with("and 4995 more)") && why.len() < 400, "{why}");
    }
}
