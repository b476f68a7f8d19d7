//! What a source may ask a replication target (`vmsnap serve`), and what it answers.
//!
//! One request per connection: the first line of the connection's input is the request as JSON
//! (at most [`MAX_REQUEST`] bytes); a `recv` or `ram-put` request is followed by its bytes (a
//! `zfs send` stream, a RAM dump from an offset). The answer is one JSON line on the output. No
//! part of a request ever reaches a shell or a command line unchecked: datasets are validated
//! ZFS names *relative to the server's root*, properties only `vmsnap:*`, domains and snapshot
//! names vmsnap's own alphabet. No verb names what to destroy: [`Request::Prune`] asks the
//! target to apply *its own* retention now, and [`Request::Rollback`] is refused unless the
//! target's own command line allows it (and then only vmsnap's snapshots go).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest request line the server reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The most requests one batch holds: the target answers a batch once it served all of them
/// (a `props` request runs `zfs` three times there), and nothing moves meanwhile, so a batch must
/// end well within the idle deadline (`idle_timeout_s`) on a slow target.
pub const MAX_BATCH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The target's view of one replicated dataset: its snapshots created after txg `after`
    /// (all when absent), a page at a time ([`Listing::more`]).
    List {
        dataset: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// `zfs receive -s -u` of the stream that follows into the dataset.
    Recv { dataset: String },
    /// `zfs receive -A`: drops a partial receive whose resume token is of no use.
    Abort { dataset: String },
    /// Sets `vmsnap:*` properties on a received snapshot (`dataset@snapshot`) and reads them back.
    Props { dataset: String, snapshot: String, props: BTreeMap<String, String> },
    /// How much of a RAM dump the target has.
    RamStat { domain: String, snapshot: String },
    /// The dump's bytes from `offset` up to `size` follow (the target reads no more); the
    /// target checks the whole file against `sha256`. A `sealed` dump ([`crate::ramcrypt`]:
    /// the target holds ciphertext only) comes with `sha256` empty: the target checks it is one
    /// and answers the sha256 of its copy ([`RamState::sha256`]); the dump's own integrity is
    /// proven when it is opened, with the key the target never has.
    RamPut {
        domain: String,
        snapshot: String,
        sha256: String,
        offset: u64,
        size: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sealed: bool,
    },
    /// Applies the target's own retention to the domain's replicas (its policy, its clock).
    Prune { domain: String },
    /// Rolls the dataset back to its snapshot `to_guid` (the one in common with the source),
    /// destroying newer vmsnap-made snapshots, if the target allows sources to ask.
    Rollback { dataset: String, to_guid: u64 },
    /// Reads the target's whole copy of a RAM dump again and compares its sha256 (`vmsnap
    /// verify --target`: cheap storage rots).
    RamCheck { domain: String, snapshot: String, sha256: String },
    /// Sends a snapshot back (`vmsnap restore --from`): the reply line, then `zfs send` of
    /// `dataset@snapshot` (incremental from `@from` when given; raw when encrypted).
    Send { dataset: String, snapshot: String, from: Option<String> },
    /// Sends the target's copy of a RAM dump back from `offset`: the reply line ([`RamState`]
    /// with the whole size in `partial`), then the bytes.
    RamGet { domain: String, snapshot: String, offset: u64 },
    /// The datasets (relative to the root) that hold replicas of `domain`'s snapshots: what a
    /// source that lost its own datasets brings back.
    Datasets { domain: String },
    /// Several requests that carry no stream (no `recv`, `ram-put`, `send`, `ram-get` or
    /// `batch`), served in order; the value is the list of their [`Reply`]s. One connection
    /// instead of one each: every connection starts `vmsnap serve` through ssh.
    Batch { requests: Vec<Request> },
}

impl Request {
    /// The request's verb, as on the wire (for logs).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::List { .. } => "list",
            Request::Datasets { .. } => "datasets",
            Request::Recv { .. } => "recv",
            Request::Abort { .. } => "abort",
            Request::Props { .. } => "props",
            Request::RamStat { .. } => "ram-stat",
            Request::RamPut { .. } => "ram-put",
            Request::Prune { .. } => "prune",
            Request::Rollback { .. } => "rollback",
            Request::RamCheck { .. } => "ram-check",
            Request::Send { .. } => "send",
            Request::RamGet { .. } => "ram-get",
            Request::Batch { .. } => "batch",
        }
    }

    /// Whether it may be in a [`Request::Batch`] (it carries no stream either way).
    pub fn batchable(&self) -> bool {
        !matches!(self, Request::Recv { .. } | Request::RamPut { .. } | Request::Batch { .. }) && !self.streams_back()
    }

    /// `requests` in batches whose lines stay under [`MAX_REQUEST`] and that hold at most
    /// [`MAX_BATCH`] requests, in order.
    pub fn batches(requests: Vec<Request>) -> Vec<Vec<Request>> {
        let mut out: Vec<Vec<Request>> = Vec::new();
        let mut size = 0;
        for r in requests {
            let len = serde_json::to_string(&r).map(|l| l.len() + 1).unwrap_or(MAX_REQUEST);
            match out.last_mut() {
                Some(last) if size + len < MAX_REQUEST - 256 && last.len() < MAX_BATCH => last.push(r),
                _ => {
                    size = 0;
                    out.push(vec![r]);
                }
            }
            size += len;
        }
        out
    }

    /// Whether the target answers with a reply line followed by a stream.
    pub fn streams_back(&self) -> bool {
        matches!(self, Request::Send { .. } | Request::RamGet { .. })
    }
}

/// The target's answer to [`Request::RamCheck`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamCheck {
    /// Bytes read.
    pub bytes: u64,
    /// The copy's sha256 equals the one asked about.
    pub matches: bool,
}

/// The target's answer to [`Request::Prune`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneOutcome {
    /// The target's `--keep`; `None`: it has no policy and keeps everything.
    pub policy: Option<String>,
    /// The target's clock (unix seconds) the decisions were made at.
    pub now: i64,
    /// Snapshot names destroyed on every dataset of the domain.
    pub destroyed: Vec<String>,
    /// Kept snapshots whose RAM dump went (`ram_keep`).
    pub ram_dropped: Vec<String>,
    /// The target's dump files deleted.
    pub ram_deleted: Vec<String>,
    /// Snapshots of the domain kept.
    pub kept: usize,
}

/// The target's answer to [`Request::Rollback`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOutcome {
    /// The snapshot the dataset is at now.
    pub to: String,
    pub destroyed: Vec<String>,
    pub ram_deleted: Vec<String>,
}

/// A snapshot the target holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSnapshot {
    /// The part after `@`.
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
    /// Its `vmsnap:*` properties.
    pub props: BTreeMap<String, String>,
}

/// The target's answer to [`Request::List`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub exists: bool,
    /// Oldest first.
    pub snapshots: Vec<TargetSnapshot>,
    /// `receive_resume_token` of an interrupted receive.
    pub resume_token: Option<String>,
    /// Bytes written to the dataset since its newest snapshot (a changed target).
    pub written: u64,
    /// The snapshots go on in another page: ask again `after` the last one's createtxg.
    #[serde(default)]
    pub more: bool,
}

/// A listing answer stays under this many bytes of snapshots (an answer is read up to 1 MiB):
/// a dataset with thousands of snapshots is listed in pages.
pub const PAGE_BYTES: usize = 256 << 10;

/// The most snapshots of one dataset a source takes from a target's listing (a target that
/// pages on for ever is refused).
pub const MAX_LISTED: usize = 100_000;

impl Listing {
    /// The snapshots created after txg `after` that fit [`PAGE_BYTES`], oldest first; `more`
    /// when some are left. A page never ends between two snapshots of the same txg (the next
    /// page starts after the last one's txg), so it may hold more than that for one txg.
    pub fn page(mut self, after: Option<u64>) -> Listing {
        let all = std::mem::take(&mut self.snapshots);
        let mut rest = all.into_iter().filter(|s| after.is_none_or(|a| s.createtxg > a)).peekable();
        let mut size = 0;
        while let Some(s) = rest.next_if(|s| {
            let len = serde_json::to_string(s).map_or(PAGE_BYTES, |t| t.len() + 1);
            // A page holds at least one txg, however large.
            let fits = size + len <= PAGE_BYTES || self.snapshots.last().is_none_or(|l: &TargetSnapshot| l.createtxg == s.createtxg);
            if fits {
                size += len;
            }
            fits
        }) {
            self.snapshots.push(s);
        }
        self.more = rest.peek().is_some();
        self
    }
}

/// The target's answer to [`Request::RamStat`] and [`Request::RamPut`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamState {
    /// Bytes of an unfinished upload.
    pub partial: u64,
    /// The dump is there, whole and checked.
    pub complete: bool,
    /// Where the target keeps it (recorded in the target snapshot's `vmsnap:ram-dump`).
    pub path: Option<String>,
    /// The complete copy is a sealed dump ([`crate::ramcrypt`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
    /// A sealed upload's answer: the sha256 of the copy as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Every answer: `ok` and the verb's value, or the error in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub value: serde_json::Value,
}

impl Reply {
    pub fn ok(value: impl Serialize) -> Self {
        Self { ok: true, error: None, value: serde_json::to_value(value).unwrap_or_default() }
    }
    pub fn err(why: impl Into<String>) -> Self {
        Self { ok: false, error: Some(why.into()), value: serde_json::Value::Null }
    }
}

/// A snapshot name as vmsnap makes them and a target accepts: letters, digits, `_-.:`.
pub fn valid_snapshot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        && !s.starts_with('-')
}

/// A sha256 in hex.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// A peer's text as this host shows it (terminal, log, error): each control character (escape
/// sequences, carriage returns, line breaks) a space, trimmed, at most `max` characters.
pub fn shown(s: &str, max: usize) -> String {
    let clean: String = s.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match clean.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &clean[..i]),
        None => clean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_text_is_shown_without_control_characters_and_abridged() {
        assert_eq!(shown("  cannot receive:\n\u{1b}[2Jgone\r  ", 500), "cannot receive:  [2Jgone");
        assert_eq!(shown(&"x".repeat(600), 500).chars().count(), 501);
    }

    #[test]
    fn requests_read_back_and_unknown_fields_are_refused() {
        let r =
            Request::RamPut { domain: "web".into(), snapshot: "autosnap_x".into(), sha256: "ab".into(), offset: 7, size: 9, sealed: false };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"verb":"ram-put","domain":"web","snapshot":"autosnap_x","sha256":"ab","offset":7,"size":9}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"verb":"destroy","dataset":"x"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"list","dataset":"x","force":true}"#).is_err());
    }

    #[test]
    fn verbs_are_the_wire_tags_and_batches_stay_under_the_limit() {
        let all = [
            Request::List { dataset: "d".into(), after: None },
            Request::Recv { dataset: "d".into() },
            Request::Abort { dataset: "d".into() },
            Request::Props { dataset: "d".into(), snapshot: "s".into(), props: BTreeMap::new() },
            Request::RamStat { domain: "w".into(), snapshot: "s".into() },
            Request::RamPut { domain: "w".into(), snapshot: "s".into(), sha256: "x".into(), offset: 0, size: 0, sealed: false },
            Request::Prune { domain: "w".into() },
            Request::Rollback { dataset: "d".into(), to_guid: 1 },
            Request::RamCheck { domain: "w".into(), snapshot: "s".into(), sha256: "x".into() },
            Request::Send { dataset: "d".into(), snapshot: "s".into(), from: None },
            Request::RamGet { domain: "w".into(), snapshot: "s".into(), offset: 0 },
            Request::Datasets { domain: "w".into() },
            Request::Batch { requests: Vec::new() },
        ];
        for r in &all {
            let v = serde_json::to_value(r).unwrap();
            assert_eq!(v["verb"], r.verb(), "{r:?}");
        }
        let batchable: Vec<&str> = all.iter().filter(|r| r.batchable()).map(Request::verb).collect();
        assert_eq!(batchable, ["list", "abort", "props", "ram-stat", "prune", "rollback", "ram-check", "datasets"]);

        // 300 requests of about 1 KiB: several batches, each line under the limit, order kept.
        let big: BTreeMap<String, String> = [("vmsnap:xml".to_owned(), "x".repeat(1000))].into();
        let reqs: Vec<Request> =
            (0..300).map(|i| Request::Props { dataset: "d".into(), snapshot: format!("s{i}"), props: big.clone() }).collect();
        let batches = Request::batches(reqs.clone());
        assert!(batches.len() > 1);
        for b in &batches {
            let line = serde_json::to_string(&Request::Batch { requests: b.clone() }).unwrap();
            assert!(line.len() < MAX_REQUEST, "{}", line.len());
        }
        assert_eq!(batches.concat(), reqs);
        assert!(Request::batches(Vec::new()).is_empty());
        // Small requests: the count bounds a batch (the target answers once all are served).
        let small: Vec<Request> = (0..200).map(|i| Request::RamStat { domain: "w".into(), snapshot: format!("s{i}") }).collect();
        let sizes: Vec<usize> = Request::batches(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_BATCH, MAX_BATCH, MAX_BATCH, 200 - 3 * MAX_BATCH]);
    }

    #[test]
    fn names() {
        assert!(valid_snapshot_name("autosnap_2026-11-29_10:00:00_hourly"));
        for bad in ["", "-x", "a b", "a/b", "a@b", "a#b", "a\nb"] {
            assert!(!valid_snapshot_name(bad), "{bad:?}");
        }
        assert!(valid_sha256(&"a".repeat(64)));
        assert!(!valid_sha256(&"A".repeat(64)) && !valid_sha256("abc"));
    }

    /// 5,000 RAM snapshots (each with a dump's properties) listed page by page as a source asks:
    /// every answer under the 1 MiB a source reads, all of them once, oldest first; the
    /// snapshots of one txg never split across pages.
    #[test]
    fn a_long_listing_comes_in_pages_under_the_answer_limit() {
        let props: BTreeMap<String, String> = [
            ("vmsnap:domain", "web".to_owned()),
            ("vmsnap:consistency", "ram".to_owned()),
            ("vmsnap:ram-dump", format!("/srv/vmsnap-ram/web/{}.ram", "autosnap_2026-12-04_00:00:00_hourly")),
            ("vmsnap:ram-sha256", "a".repeat(64)),
            ("vmsnap:ram-format", "libvirt-save".to_owned()),
            ("vmsnap:replica", "complete".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let snapshots: Vec<TargetSnapshot> = (0..5000u64)
            .map(|i| TargetSnapshot {
                name: format!("autosnap_{i:05}_hourly"),
                guid: 1_000_000 + i,
                // Snapshots 10 and 11, and 2000 to 2009, were taken in one txg each.
                createtxg: match i {
                    11 => 10,
                    2000..=2009 => 2000,
                    _ => i,
                },
                props: props.clone(),
            })
            .collect();
        let whole = Listing { exists: true, snapshots, resume_token: None, written: 0, more: false };
        let mut got: Vec<TargetSnapshot> = Vec::new();
        let (mut after, mut pages) = (None, 0);
        loop {
            let page = whole.clone().page(after);
            let answer = serde_json::to_string(&Reply::ok(&page)).unwrap();
            assert!(answer.len() < 1 << 20, "page {pages}: {} bytes", answer.len());
            pages += 1;
            if let (Some(last), false) = (page.snapshots.last(), page.more) {
                assert_eq!(last.name, "autosnap_04999_hourly");
            }
            if let Some(last) = page.snapshots.last() {
                assert!(!whole.snapshots.iter().any(|s| s.createtxg == last.createtxg && !page.snapshots.contains(s) && !got.contains(s)));
            }
            got.extend(page.snapshots.iter().cloned());
            if !page.more {
                break;
            }
            after = page.snapshots.last().map(|s| s.createtxg);
        }
        assert!(pages > 3, "{pages} pages");
        assert_eq!(got, whole.snapshots);
        // A short listing is one page, as before.
        let short = Listing { snapshots: whole.snapshots[..3].to_vec(), ..whole.clone() }.page(None);
        assert!(!short.more && short.snapshots.len() == 3);
        // After the newest: nothing, and no more.
        let none = whole.clone().page(Some(4999));
        assert!(none.snapshots.is_empty() && !none.more && none.exists);
    }
}
