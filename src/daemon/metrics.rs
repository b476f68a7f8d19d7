//! Prometheus metrics in the text exposition format, written atomically to a file for
//! node_exporter's textfile collector (`metrics_file` in the config): snapshots taken and failed
//! per domain, freeze and pause histograms, the last success time. An HTTP endpoint is not
//! provided: the textfile collector needs no open port.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Histogram bucket bounds in milliseconds.
const BUCKETS_MS: [f64; 10] = [10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10_000.0, 30_000.0];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, ms: f64) {
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += ms;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainMetrics {
    pub taken: BTreeMap<String, u64>,
    pub failed: u64,
    pub pruned: u64,
    pub last_success: Option<i64>,
    pub last_failure: Option<i64>,
    pub freeze_ms: Histogram,
    pub pause_ms: Histogram,
    /// By replication target.
    pub replication: BTreeMap<String, ReplicationMetrics>,
}

/// One domain's replication to one target, as the daemon's jobs did it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicationMetrics {
    /// Stream and RAM dump bytes sent.
    pub bytes: u64,
    pub failed: u64,
    pub last_success: Option<i64>,
}

/// Every domain's counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub domains: BTreeMap<String, DomainMetrics>,
}

impl Metrics {
    pub fn domain(&mut self, name: &str) -> &mut DomainMetrics {
        self.domains.entry(name.to_owned()).or_default()
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        };
        let d = &self.domains;
        family(
            "vmsnap_snapshots_taken_total",
            "counter",
            "Snapshots taken, by consistency.",
            d.iter()
                .flat_map(|(n, m)| {
                    m.taken
                        .iter()
                        .map(move |(c, v)| format!("vmsnap_snapshots_taken_total{{domain=\"{}\",consistency=\"{c}\"}} {v}", esc(n)))
                })
                .collect(),
        );
        family(
            "vmsnap_snapshots_failed_total",
            "counter",
            "Snapshots that failed.",
            d.iter().map(|(n, m)| format!("vmsnap_snapshots_failed_total{{domain=\"{}\"}} {}", esc(n), m.failed)).collect(),
        );
        family(
            "vmsnap_snapshots_pruned_total",
            "counter",
            "Snapshots destroyed by retention.",
            d.iter().map(|(n, m)| format!("vmsnap_snapshots_pruned_total{{domain=\"{}\"}} {}", esc(n), m.pruned)).collect(),
        );
        family(
            "vmsnap_last_success_timestamp_seconds",
            "gauge",
            "When the last snapshot succeeded.",
            d.iter()
                .filter_map(|(n, m)| m.last_success.map(|t| format!("vmsnap_last_success_timestamp_seconds{{domain=\"{}\"}} {t}", esc(n))))
                .collect(),
        );
        family(
            "vmsnap_last_failure_timestamp_seconds",
            "gauge",
            "When the last snapshot failed.",
            d.iter()
                .filter_map(|(n, m)| m.last_failure.map(|t| format!("vmsnap_last_failure_timestamp_seconds{{domain=\"{}\"}} {t}", esc(n))))
                .collect(),
        );
        let per_target = |f: &dyn Fn(&ReplicationMetrics) -> Option<String>, name: &str| -> Vec<String> {
            d.iter()
                .flat_map(|(n, m)| {
                    m.replication
                        .iter()
                        .filter_map(move |(t, r)| f(r).map(|v| format!("{name}{{domain=\"{}\",target=\"{}\"}} {v}", esc(n), esc(t))))
                })
                .collect()
        };
        family(
            "vmsnap_replication_bytes_total",
            "counter",
            "Bytes sent to a replication target (streams and RAM dumps).",
            per_target(&|r| Some(r.bytes.to_string()), "vmsnap_replication_bytes_total"),
        );
        family(
            "vmsnap_replication_failed_total",
            "counter",
            "Replications to a target that failed.",
            per_target(&|r| Some(r.failed.to_string()), "vmsnap_replication_failed_total"),
        );
        family(
            "vmsnap_replication_last_success_timestamp_seconds",
            "gauge",
            "When the last replication to a target succeeded (time() minus this is the lag).",
            per_target(&|r| r.last_success.map(|t| t.to_string()), "vmsnap_replication_last_success_timestamp_seconds"),
        );
        for (name, help, pick) in [
            (
                "vmsnap_freeze_milliseconds",
                "Guest filesystems frozen, per snapshot.",
                (|m: &DomainMetrics| &m.freeze_ms) as fn(&DomainMetrics) -> &Histogram,
            ),
            ("vmsnap_pause_milliseconds", "VM paused, per snapshot.", |m: &DomainMetrics| &m.pause_ms),
        ] {
            let mut lines = Vec::new();
            for (n, m) in d {
                let h = pick(m);
                for (b, c) in BUCKETS_MS.iter().zip(h.counts) {
                    lines.push(format!("{name}_bucket{{domain=\"{}\",le=\"{b}\"}} {c}", esc(n)));
                }
                lines.push(format!("{name}_bucket{{domain=\"{}\",le=\"+Inf\"}} {}", esc(n), h.count));
                lines.push(format!("{name}_sum{{domain=\"{}\"}} {}", esc(n), h.sum));
                lines.push(format!("{name}_count{{domain=\"{}\"}} {}", esc(n), h.count));
            }
            family(name, "histogram", help, lines);
        }
        out
    }

    /// Writes [`Metrics::render`] to `path` atomically (temp file + rename), mode 0644.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::fsutil::write_atomic(path, self.render().as_bytes(), 0o644).map_err(std::io::Error::other)
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_text() {
        let mut m = Metrics::default();
        let d = m.domain("web");
        *d.taken.entry("app".into()).or_default() += 2;
        d.failed = 1;
        d.last_success = Some(1_795_710_600);
        d.freeze_ms.observe(40.0);
        d.freeze_ms.observe(700.0);
        let off = d.replication.entry("off\"site".into()).or_default();
        off.bytes = 4096;
        off.last_success = Some(1_795_710_700);
        d.replication.entry("usb".into()).or_default().failed = 2;
        let text = m.render();
        assert!(text.contains("vmsnap_replication_bytes_total{domain=\"web\",target=\"off\\\"site\"} 4096\n"), "{text}");
        assert!(text.contains("vmsnap_replication_failed_total{domain=\"web\",target=\"usb\"} 2\n"), "{text}");
        assert!(text.contains("vmsnap_replication_last_success_timestamp_seconds{domain=\"web\",target=\"off\\\"site\"} 1795710700\n"));
        assert!(!text.contains("vmsnap_replication_last_success_timestamp_seconds{domain=\"web\",target=\"usb\"}"), "{text}");
        assert!(text.contains("vmsnap_snapshots_taken_total{domain=\"web\",consistency=\"app\"} 2\n"), "{text}");
        assert!(text.contains("vmsnap_snapshots_failed_total{domain=\"web\"} 1\n"));
        assert!(text.contains("vmsnap_last_success_timestamp_seconds{domain=\"web\"} 1795710600\n"));
        assert!(text.contains("vmsnap_freeze_milliseconds_bucket{domain=\"web\",le=\"50\"} 1\n"), "{text}");
        assert!(text.contains("vmsnap_freeze_milliseconds_bucket{domain=\"web\",le=\"1000\"} 2\n"));
        assert!(text.contains("vmsnap_freeze_milliseconds_bucket{domain=\"web\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("vmsnap_freeze_milliseconds_sum{domain=\"web\"} 740\n"));
        assert!(text.contains("# TYPE vmsnap_pause_milliseconds histogram\n"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmsnap.prom");
        m.write(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }
}
