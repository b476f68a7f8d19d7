//! The user documentation stays whole: every chapter of `docs/` is in the book's table of
//! contents, every relative link in the README and the manual leads to a file that exists, the
//! README stays short, and neither speaks of the work's own bookkeeping (issue numbers, stops).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown file under `dir`.
fn markdown(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(markdown(&p));
        } else if p.extension().is_some_and(|x| x == "md") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The targets of `[text](target)` links in `text`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(j) = after.find(')') else { break };
        out.push(after[..j].to_owned());
        rest = &after[j..];
    }
    out
}

#[test]
fn every_chapter_is_in_the_summary_and_every_relative_link_resolves() {
    let docs = root().join("docs");
    let summary = std::fs::read_to_string(docs.join("SUMMARY.md")).unwrap();
    let listed: Vec<String> = links(&summary);
    let mut files = markdown(&docs);
    files.push(root().join("README.md"));
    let mut broken = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&docs).map(|p| p.to_string_lossy().into_owned());
        if let Ok(rel) = &rel {
            if rel != "SUMMARY.md" && !listed.contains(rel) {
                broken.push(format!("docs/{rel} is not in docs/SUMMARY.md"));
            }
        }
        let text = std::fs::read_to_string(f).unwrap();
        for l in links(&text) {
            if l.starts_with("http://") || l.starts_with("https://") || l.starts_with('#') || l.starts_with("mailto:") {
                continue;
            }
            let path = l.split('#').next().unwrap_or_default();
            if !f.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: link to {l} leads nowhere", f.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_readme_is_short_and_user_docs_keep_no_work_log() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.lines().count() <= 150, "README.md has {} lines (at most 150)", readme.lines().count());
    let mut files = markdown(&root().join("docs"));
    files.retain(|f| !f.components().any(|c| c.as_os_str() == "development"));
    files.push(root().join("README.md"));
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap().to_lowercase();
        for word in ["issue ", "stop "] {
            for (i, _) in text.match_indices(word) {
                let next = text[i + word.len()..].chars().next().unwrap_or(' ');
                assert!(
                    !next.is_ascii_digit(),
                    "{}: \"{}\" (work bookkeeping belongs in closing notes)",
                    f.display(),
                    &text[i..(i + 12).min(text.len())]
                );
            }
        }
    }
}

#[test]
fn every_method_property_and_signal_of_the_bus_interfaces_is_in_the_manual() {
    let xml = std::fs::read_to_string(root().join("dist/dbus/io.github.vmsnap.Agent1.xml")).unwrap();
    let manual = std::fs::read_to_string(root().join("docs/libvirt-dbus.md")).unwrap();
    let (mut missing, mut checked) = (Vec::new(), 0);
    // vmsnap's own interfaces; the freedesktop ones (Properties, Peer, Introspectable) are D-Bus's.
    for part in xml.split("<interface name=\"").skip(1).filter(|p| p.starts_with("io.github.vmsnap.")) {
        let (iface, body) = part.split_once('"').unwrap();
        let body = body.split("</interface>").next().unwrap();
        for kind in ["method", "property", "signal"] {
            for item in body.split(&format!("<{kind} name=\"")).skip(1) {
                let name = item.split('"').next().unwrap();
                checked += 1;
                if !manual.contains(&format!("`{name}")) {
                    missing.push(format!("{iface} {kind} {name}"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} names read from the introspection XML");
    assert!(missing.is_empty(), "not in docs/libvirt-dbus.md:\n{}", missing.join("\n"));
}

#[test]
fn every_prometheus_metric_is_in_the_monitoring_chapter() {
    let code = std::fs::read_to_string(root().join("src/daemon/metrics.rs")).unwrap();
    let manual = std::fs::read_to_string(root().join("docs/monitoring.md")).unwrap();
    let names: Vec<&str> = code
        .split('"')
        .filter(|s| s.starts_with("vmsnap_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .filter(|s| ["_total", "_seconds", "_milliseconds"].iter().any(|end| s.ends_with(end)))
        .collect();
    assert!(names.len() >= 8, "only {names:?} found in src/daemon/metrics.rs");
    let missing: Vec<&&str> = names.iter().filter(|n| !manual.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "metrics not in docs/monitoring.md: {missing:?}");
}

#[test]
fn the_readmes_configuration_loads() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(!blocks.is_empty(), "the README shows no configuration");
    for b in blocks {
        vmsnap::config::Config::parse(b, Path::new("README.md")).unwrap_or_else(|e| panic!("{e}\n{b}"));
    }
}
