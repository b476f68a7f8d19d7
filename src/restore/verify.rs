//! `vmsnap verify`: proves what can be proven without starting anything. Each snapshot of a
//! domain is found on every dataset it was taken on; each RAM dump is read whole, its header
//! parsed and its bytes hashed against the sha256 the snapshot recorded (and its size against the
//! recorded size). The outcome is written on the snapshots themselves (`vmsnap:verified`), so
//! `vmsnap list` and a later check can show when a backup was last proven.
//!
//! Starting a copy (`--boot`) is [`super::boot`]'s; the target's copies are
//! [`crate::replicate::verify`]'s.

use super::dump;
use crate::model::prop;
use crate::zfs::{PropName, Zfs, ZfsError};
use serde::Serialize;

/// One snapshot's verification.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub domain: String,
    pub snapshot: String,
    pub datasets: usize,
    pub ok: bool,
    /// What was checked, or why it failed.
    pub detail: String,
}

/// Verifies every snapshot of `only` (or of every domain), oldest name first; `progress` hears
/// which one is being read. Records the outcome on each snapshot.
pub async fn verify(zfs: &Zfs, only: Option<&str>, progress: impl Fn(&str)) -> Result<Vec<Verified>, ZfsError> {
    let mut out = Vec::new();
    for (domain, snaps) in super::units(zfs).await? {
        if only.is_some_and(|o| o != domain) {
            continue;
        }
        for (name, (members, props)) in snaps {
            let get = |p: &PropName| props.get(p).cloned();
            let (ok, detail) = match get(&prop::RAM_DUMP) {
                Some(path) => {
                    progress(&format!("{domain} {name}: reading RAM dump {path}"));
                    let (path, want) = (std::path::PathBuf::from(path), get(&prop::RAM_SHA256));
                    let res = tokio::task::spawn_blocking(move || dump::check(&path, want.as_deref(), |_| {}))
                        .await
                        .expect("the dump check does not panic");
                    match res {
                        Ok(c) if get(&prop::RAM_SIZE).is_some_and(|s| s != c.bytes.to_string()) => (
                            false,
                            format!(
                                "the RAM dump has {} bytes, the snapshot recorded {}",
                                c.bytes,
                                get(&prop::RAM_SIZE).unwrap_or_default()
                            ),
                        ),
                        Ok(c) => (true, format!("RAM dump sha256 and header ({}, {}, {} MiB)", c.format, c.compress, c.bytes >> 20)),
                        Err(e) => (false, e.why),
                    }
                }
                None => (true, "disks only: nothing to read (the RAM dump was pruned or never taken)".to_owned()),
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let word: String = format!("{now} {}: {detail}", if ok { "ok" } else { "failed" }).chars().take(1000).collect();
            for m in &members {
                zfs.set_property(&m.to_string(), &prop::VERIFIED, &word).await?;
            }
            out.push(Verified { domain: domain.clone(), snapshot: name, datasets: members.len(), ok, detail });
        }
    }
    Ok(out)
}
