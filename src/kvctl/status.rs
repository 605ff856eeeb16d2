//! `kvctl status`: ask every node for its status concurrently and render a table (or JSON).
//!
//! Every node is asked directly, without retries, because the point is to see which nodes are down,
//! lagging or confused about the leader.

use crate::kv::clerk::node_status;
use crate::proto::kv::StatusResponse;
use std::time::Duration;

/// One node's answer.
pub struct NodeReport {
    /// The address asked.
    pub address: String,
    /// Its status, or why there is none.
    pub status: Result<StatusResponse, String>,
}

/// Ask every address, concurrently, each within `timeout`.
pub async fn collect(
    addresses: &[String],
    timeout: Duration,
    security: &crate::security::Security,
) -> Vec<NodeReport> {
    let asks = addresses.iter().map(|address| async move {
        NodeReport {
            address: address.clone(),
            status: node_status(address, timeout, security)
                .await
                .map_err(|e| e.to_string()),
        }
    });
    futures::future::join_all(asks).await
}

/// The headers of [`raft_columns`], which every status table starts with.
pub const RAFT_HEADERS: [&str; 7] = [
    "ADDRESS", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED",
];

/// The rest of `kvctl status`'s headers.
const LOG_HEADERS: [&str; 7] = [
    "FIRST",
    "LAST",
    "SNAP-IDX",
    "LOG-BYTES",
    "SNAP-BYTES",
    "KEYS",
    "SESSIONS",
];

/// The columns every status table starts with: address, id, role, term, leader, commit and applied
/// index.
pub fn raft_columns(address: &str, s: &StatusResponse) -> Vec<String> {
    vec![
        address.to_string(),
        s.id.to_string(),
        s.role.clone(),
        s.term.to_string(),
        if s.leader == 0 {
            "-".into()
        } else {
            s.leader.to_string()
        },
        s.commit_index.to_string(),
        s.applied_index.to_string(),
    ]
}

/// A fixed-width table, one row per node; unreachable nodes show the error instead of numbers.
pub fn render_table(reports: &[NodeReport]) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| match &r.status {
            Ok(s) => [
                raft_columns(&r.address, s),
                vec![
                    s.first_index.to_string(),
                    s.last_index.to_string(),
                    s.snapshot_index.to_string(),
                    s.raft_state_bytes.to_string(),
                    s.snapshot_bytes.to_string(),
                    s.keys.to_string(),
                    s.sessions.to_string(),
                ],
            ]
            .concat(),
            Err(e) => vec![r.address.clone(), "-".into(), format!("DOWN ({e})")],
        })
        .collect();
    let mut out = table(&[&RAFT_HEADERS[..], &LOG_HEADERS[..]].concat(), &rows);
    for note in notes(reports) {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

/// A fixed-width table under `headers`, one line per row. A shorter row (a down node: its address,
/// then the error) widens only the first column, so a long error does not push the others apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        if row.len() == headers.len() {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        } else if let Some(first) = row.first() {
            widths[0] = widths[0].max(first.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    out
}

/// Entries a follower may trail the highest commit index by before `status` remarks on it (under load
/// a follower is always a few entries behind).
const LAG_WORTH_A_NOTE: u64 = 10;

/// What an operator would otherwise have to work out from the numbers: no leader, or a node that has
/// not heard from the leader or trails it (just restarted, or cut off).
pub fn notes(reports: &[NodeReport]) -> Vec<String> {
    let up: Vec<&StatusResponse> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .collect();
    if up.is_empty() {
        return Vec::new();
    }
    let mut notes = Vec::new();
    let leading = up.iter().any(|s| s.role == "leader");
    if !leading {
        notes.push(
            "no node leads: an election is under way (it takes 1 to 1.5 s) or no majority is up; \
             ask again in a few seconds"
                .to_string(),
        );
    }
    let commit = up.iter().map(|s| s.commit_index).max().unwrap_or(0);
    for s in &up {
        let behind = commit.saturating_sub(s.applied_index);
        if leading && s.leader == 0 {
            notes.push(format!(
                "node {} has not heard from the leader yet (just started, or cut off from it); \
                 it learns the leader and catches up with the next heartbeat",
                s.id
            ));
        } else if behind > LAG_WORTH_A_NOTE {
            notes.push(format!(
                "node {} is {behind} entries behind the commit index: catching up from the leader \
                 (from a snapshot if it is far behind)",
                s.id
            ));
        }
    }
    notes
}

/// The same information as JSON (an array of objects), for scripts.
pub fn render_json(reports: &[NodeReport]) -> String {
    let nodes: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| match &r.status {
            Ok(s) => serde_json::json!({
                "address": r.address,
                "up": true,
                "id": s.id,
                "role": s.role,
                "term": s.term,
                "leader": s.leader,
                "leader_address": s.leader_address,
                "commit_index": s.commit_index,
                "applied_index": s.applied_index,
                "first_index": s.first_index,
                "last_index": s.last_index,
                "snapshot_index": s.snapshot_index,
                "raft_state_bytes": s.raft_state_bytes,
                "snapshot_bytes": s.snapshot_bytes,
                "keys": s.keys,
                "sessions": s.sessions,
                "restored_snapshot_index": s.restored_snapshot_index,
                "entries_applied_since_start": s.entries_applied_since_start,
                "stages": s.stages.iter().map(|stage| serde_json::json!({
                    "name": stage.name,
                    "count": stage.count,
                    "micros": stage.micros,
                })).collect::<Vec<_>>(),
                "persisted_entries": s.persisted_entries,
            }),
            Err(e) => serde_json::json!({ "address": r.address, "up": false, "error": e }),
        })
        .collect();
    serde_json::Value::Array(nodes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_node() {
        let reports = vec![
            NodeReport {
                address: "a:1".into(),
                status: Ok(StatusResponse {
                    id: 1,
                    role: "leader".into(),
                    term: 3,
                    leader: 1,
                    ..Default::default()
                }),
            },
            NodeReport {
                address: "b:2".into(),
                status: Err("connection refused".into()),
            },
        ];
        let table = render_table(&reports);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].contains("leader"));
        assert!(lines[2].contains("DOWN (connection refused)"));
        let json: serde_json::Value = serde_json::from_str(&render_json(&reports)).expect("json");
        assert_eq!(json[1]["up"], false);
    }

    fn up(id: u64, role: &str, leader: u64, commit: u64, applied: u64) -> NodeReport {
        NodeReport {
            address: format!("n{id}:1"),
            status: Ok(StatusResponse {
                id,
                role: role.into(),
                leader,
                commit_index: commit,
                applied_index: applied,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_restarted_node_and_a_missing_leader_are_explained() {
        let steady = [up(1, "leader", 1, 500, 500), up(2, "follower", 1, 498, 497)];
        assert!(notes(&steady).is_empty(), "{:?}", notes(&steady));
        let restarted = [up(1, "leader", 1, 500, 500), up(2, "follower", 0, 200, 200)];
        let table = render_table(&restarted);
        assert!(
            table.contains("note: node 2 has not heard from the leader yet"),
            "{table}"
        );
        let lagging = [up(1, "leader", 1, 500, 500), up(2, "follower", 1, 500, 300)];
        assert!(notes(&lagging)[0].contains("node 2 is 200 entries behind"));
        let electing = [up(1, "candidate", 0, 5, 5), up(2, "follower", 0, 5, 5)];
        assert!(notes(&electing)[0].starts_with("no node leads"));
        assert_eq!(notes(&electing).len(), 1);
    }
}
