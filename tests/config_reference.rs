//! `dist/vmsnap.toml.example` is the configuration reference: it loads as it is, and every key
//! the parser accepts is in it, in the table it belongs to (set to its default, or in a comment
//! when it has none). The parser's own list of keys comes from its refusal of an unknown one.

use std::path::Path;
use vmsnap::config::Config;

const EXAMPLE: &str = include_str!("../dist/vmsnap.toml.example");

/// The keys the parser accepts in the table where `probe` puts the unknown key `zz_not_a_key`.
fn accepted(probe: &str) -> Vec<String> {
    let err = Config::parse(probe, Path::new("/probe.toml")).expect_err("an unknown key is refused").to_string();
    let list = err.split("expected one of").nth(1).unwrap_or_else(|| panic!("no key list in: {err}"));
    list.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The lines of the example's sections whose header starts with `prefix` ("" for the top).
fn section(prefix: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut current = "";
    for line in EXAMPLE.lines() {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[]") {
            current = t.trim_start_matches('[').split(']').next().unwrap_or_default();
            continue;
        }
        let inside = if prefix.is_empty() { current.is_empty() } else { current.starts_with(prefix) && !current.ends_with(".policy") };
        if inside {
            out.push(t);
        }
    }
    out
}

fn documented(lines: &[&str], key: &str) -> bool {
    lines.iter().any(|l| {
        let l = l.trim_start_matches('#').trim_start();
        l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

#[test]
fn the_reference_loads_as_it_is() {
    let cfg = Config::parse(EXAMPLE, Path::new("dist/vmsnap.toml.example")).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.domains.contains_key("web") && cfg.targets.contains_key("offsite") && cfg.targets.contains_key("usb"));
    // Its values are the defaults: what the defaults alone give.
    let bare = Config::parse("[domain.web]\nqmp = \"/run/vmsnap/web.qmp\"\n", Path::new("/bare.toml")).unwrap();
    assert_eq!(cfg.domains["web"].policy, bare.domains["web"].policy, "a policy key in the reference is not at its default");
    assert_eq!(
        (&cfg.state_dir, &cfg.overlay_dir, &cfg.ram_dir, &cfg.ram_key),
        (&bare.state_dir, &bare.overlay_dir, &bare.ram_dir, &bare.ram_key)
    );
}

#[test]
fn every_key_the_parser_accepts_is_in_the_reference() {
    let tables = [
        ("top level", "zz_not_a_key = 1\n", ""),
        ("[template.NAME]", "[template.t]\nzz_not_a_key = 1\n", "template."),
        ("[domain.NAME]", "[domain.d]\nqmp = \"/x\"\nzz_not_a_key = 1\n", "domain."),
        ("[target.NAME]", "[target.t]\nhost = \"h\"\nzz_not_a_key = 1\n", "target."),
    ];
    let mut missing = Vec::new();
    let policy_keys = accepted(tables[1].1);
    for (what, probe, prefix) in tables {
        let keys = accepted(probe);
        assert!(keys.len() > 3, "{what}: the parser's list is {keys:?}");
        let mut lines = section(prefix);
        if prefix == "domain." {
            // A domain takes every policy key: they are documented once, under the template.
            lines.extend(section("template."));
        }
        for k in keys {
            // Tables, not keys: each has its own section.
            if ["template", "domain", "target", "policy"].contains(&k.as_str()) {
                continue;
            }
            if !documented(&lines, &k) {
                missing.push(format!("{what}: {k}"));
            }
        }
    }
    assert!(policy_keys.contains(&"hourly".to_owned()));
    assert!(missing.is_empty(), "keys the parser accepts that dist/vmsnap.toml.example does not document:\n{}", missing.join("\n"));
}
