//! A target's resume token, decoded and checked before the source runs `zfs send -t` on it.
//!
//! The token is the target's word: a checksummed, compressed nvlist whose fields decide what
//! `zfs send -t` sends — which snapshot (`toname`/`toguid`, looked up anywhere on the pool),
//! from which base (`fromguid`) and whether raw (`rawok`). A compromised target could name
//! another dataset's snapshot, or leave out `rawok` to get an encrypted dataset's plaintext.
//! So the source decodes it with its own `zfs send -nvt` and sends only when it names a
//! snapshot of the very dataset being replicated, by that snapshot's GUID, from one of that
//! dataset's own snapshots or bookmarks, raw for an encrypted dataset (and `-w` is passed
//! anyway); otherwise the partial receive is aborted and the dataset planned again.

use crate::zfs::Dataset;
use std::collections::BTreeMap;

/// What a token asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub toname: String,
    pub toguid: u64,
    pub fromguid: Option<u64>,
    pub rawok: bool,
}

/// Parses the `resume token contents:` nvlist `zfs send -nv -t TOKEN` prints (`\tkey = value`
/// lines, numbers in hex; a boolean flag as its bare name or `= 1`).
pub fn parse(text: &str) -> Result<Token, String> {
    let start = text.find("resume token contents:").ok_or("zfs did not print the token's contents")?;
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for line in text[start..].lines().skip(1) {
        let Some(body) = line.strip_prefix('\t') else {
            if line.starts_with("nvlist version") {
                continue;
            }
            break;
        };
        match body.split_once(" = ") {
            Some((k, v)) => fields.insert(k.trim(), v.trim()),
            None => fields.insert(body.trim(), "1"),
        };
    }
    let num = |k: &str| -> Result<Option<u64>, String> {
        fields
            .get(k)
            .map(|v| {
                let digits = v.strip_prefix("0x").ok_or_else(|| format!("{k} = {v}: not a hex number"))?;
                u64::from_str_radix(digits, 16).map_err(|_| format!("{k} = {v}: not a hex number"))
            })
            .transpose()
    };
    Ok(Token {
        toname: fields.get("toname").ok_or("the token names no snapshot (toname)")?.to_string(),
        toguid: num("toguid")?.ok_or("the token has no toguid")?,
        fromguid: num("fromguid")?.filter(|g| *g != 0),
        rawok: fields.get("rawok").is_some_and(|v| *v != "0"),
    })
}

/// Checks `token` against the dataset being sent: `snapshots` and `bookmarks` are its own
/// (name, GUID) pairs on this host; `encrypted` whether it is.
pub fn check(token: &Token, ds: &Dataset, snapshots: &[(String, u64)], bookmarks: &[u64], encrypted: bool) -> Result<(), String> {
    let Some((dataset, snap)) = token.toname.split_once('@') else {
        return Err(format!("it names {:?}, not a snapshot", abridge(&token.toname)));
    };
    if dataset != ds.as_str() {
        return Err(format!("it names {}, a snapshot of another dataset than {ds}", abridge(&token.toname)));
    }
    match snapshots.iter().find(|(name, _)| name == snap) {
        Some((_, guid)) if *guid == token.toguid => {}
        Some((_, guid)) => return Err(format!("it gives {} guid {}, which is {guid} here", abridge(&token.toname), token.toguid)),
        None => return Err(format!("{} does not exist here", abridge(&token.toname))),
    }
    if let Some(from) = token.fromguid {
        if !snapshots.iter().any(|(_, g)| *g == from) && !bookmarks.contains(&from) {
            return Err(format!("its base (guid {from}) is no snapshot or bookmark of {ds}"));
        }
    }
    if encrypted && !token.rawok {
        return Err(format!("{ds} is encrypted and the token asks for a stream that is not raw"));
    }
    Ok(())
}

fn abridge(s: &str) -> String {
    super::protocol::shown(s, 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    // What `zfs send -n -v -t` printed for tokens of real interrupted receives (OpenZFS 2.3,
    // recorded by scripts/record-fixtures).
    const FULL: &str = include_str!("../../protocol-fixtures/zfs/send-nvt-full.txt");
    const INCREMENTAL: &str = include_str!("../../protocol-fixtures/zfs/send-nvt-incremental.txt");
    const RAW: &str = include_str!("../../protocol-fixtures/zfs/send-nvt-raw-encrypted.txt");
    const OLD: (&str, u64) = ("autosnap_2026-12-01_00:00:00_daily", 0x56a4_00a1_2b04_b6b8);
    const NEW: (&str, u64) = ("autosnap_2026-12-02_00:00:00_daily", 0xf9ac_5aae_4b85_38d3);

    fn ds() -> Dataset {
        Dataset::new("tokens/web").unwrap()
    }

    fn snaps() -> Vec<(String, u64)> {
        [OLD, NEW].iter().map(|(n, g)| (n.to_string(), *g)).collect()
    }

    #[test]
    fn parses_what_zfs_prints() {
        let full = parse(FULL).unwrap();
        assert_eq!(full, Token { toname: format!("tokens/web@{}", NEW.0), toguid: NEW.1, fromguid: None, rawok: false });
        let incremental = parse(INCREMENTAL).unwrap();
        assert_eq!((incremental.toguid, incremental.fromguid, incremental.rawok), (NEW.1, Some(OLD.1), false));
        let raw = parse(RAW).unwrap();
        assert_eq!((raw.toname.as_str(), raw.fromguid, raw.rawok), ("tokens/secret@autosnap_2026-12-02_00:00:00_daily", None, true));
        let bare = parse("resume token contents:\nnvlist version: 0\n\ttoguid = 0x5\n\ttoname = a/b@c\n\trawok\n").unwrap();
        assert!(bare.rawok && bare.fromguid.is_none());
        assert!(parse("cannot resume send: token is corrupt").is_err());
        assert!(parse("resume token contents:\n\ttoname = a@b\n\ttoguid = 12\n").unwrap_err().contains("hex"));
    }

    #[test]
    fn only_this_datasets_snapshot_by_its_guid_from_its_own_base_raw_when_encrypted() {
        let snaps = snaps();
        let t = parse(INCREMENTAL).unwrap();
        assert_eq!(check(&t, &ds(), &snaps, &[], false), Ok(()));
        let other = Token { toname: format!("tokens/db@{}", NEW.0), ..t.clone() };
        assert!(check(&other, &ds(), &snaps, &[], false).unwrap_err().contains("another dataset"));
        let secret = parse(RAW).unwrap();
        assert!(check(&secret, &ds(), &snaps, &[], false).unwrap_err().contains("another dataset"));
        let child = Token { toname: "tokens/web/child@a".into(), ..t.clone() };
        assert!(check(&child, &ds(), &snaps, &[], false).is_err());
        let wrong_guid = Token { toguid: 7, ..t.clone() };
        assert!(check(&wrong_guid, &ds(), &snaps, &[], false).unwrap_err().contains("guid 7"));
        let foreign_base = Token { fromguid: Some(99), ..t.clone() };
        assert!(check(&foreign_base, &ds(), &snaps, &[], false).unwrap_err().contains("base"));
        assert_eq!(check(&foreign_base, &ds(), &snaps, &[99], false), Ok(()));
        assert!(check(&t, &ds(), &snaps, &[], true).unwrap_err().contains("not raw"));
        let raw = Token { rawok: true, ..t.clone() };
        assert_eq!(check(&raw, &ds(), &snaps, &[], true), Ok(()));
        let hostile = Token { toname: "tokens/web@\u{1b}[2Jgone".into(), ..t };
        assert!(!check(&hostile, &ds(), &snaps, &[], false).unwrap_err().contains('\u{1b}'));
    }
}
