//! Fetch a daemon's Prometheus page the way a scraper does (plain HTTP/1.0, no client library).

use std::io::{Read, Write};

/// The whole HTTP response (status line, headers, body) of `GET /metrics` at `addr`.
pub fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

/// Which daemon exports a metric family, by the name's prefix: every Raft node (`ds824_raft_`,
/// `ds824_request`, `ds824_snapshots`), shard group nodes (`ds824_shard`), the MapReduce coordinator
/// (`mr_`).
pub const EXPORTERS: [(&str, &[&str]); 3] = [
    (
        "raft node",
        &["ds824_raft_", "ds824_request", "ds824_snapshots"],
    ),
    ("shard node", &["ds824_shard"]),
    ("mr coordinator", &["mr_"]),
];

/// Every metric name the Grafana dashboard in `deploy/grafana/ds824.json` queries.
pub fn dashboard_metrics() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/ds824.json");
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ds824_") || word.starts_with("mr_") {
                    names.insert(word.to_string());
                }
            }
        }
    }
    assert!(!names.is_empty(), "the dashboard queries no metric");
    names.into_iter().collect()
}

/// Assert that the scraped `body` of a `exporter` (one of [`EXPORTERS`]) exports every metric of the
/// dashboard that it should, and that every metric the dashboard queries has an exporter.
pub fn assert_dashboard_metrics_exported(exporter: &str, body: &str) {
    let exported: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    for name in dashboard_metrics() {
        let Some((owner, _)) = EXPORTERS
            .iter()
            .find(|(_, prefixes)| prefixes.iter().any(|p| name.starts_with(p)))
        else {
            panic!("the dashboard queries {name}, which no daemon exports");
        };
        if *owner == exporter {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which a {exporter} does not export:\n{body}"
            );
        }
    }
}
