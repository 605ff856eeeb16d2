//! `kvctl` against a sharded cluster: data commands routed through the controllers ([`AnyClerk`]) and
//! `kvctl status --ctrlers ...`, which shows every shard group server by server.
//!
//! Why status also lists groups that recently left: a departing group still holds frozen copies of the
//! shards it gave away until their new owners confirm having them; an operator waiting to shut it down
//! needs to see that count reach 0, yet the latest configuration no longer names the group.

use super::status::{collect, NodeReport};
use crate::ctrler::addresses::{client_addresses, AddressView};
use crate::ctrler::{Config, CtrlerClerk, Gid};
use crate::kv::KvOps;
use crate::kv::{Clerk, KvCommand};
use crate::proto::kv as kvpb;
use crate::rsm::client::{ClerkConfig, ClerkError};
use crate::shardkv::ShardClerk;
use std::collections::BTreeMap;
use std::time::Duration;

/// A clerk of a plain KV cluster (`--cluster`) or of a sharded one (`--ctrlers`), with the same calls,
/// so `kvctl get/put/...` behave and exit the same way against either.
pub enum AnyClerk {
    /// A KV cluster.
    Kv(Box<Clerk>),
    /// A sharded cluster, through its controllers.
    Sharded(Box<ShardClerk>),
}

impl AnyClerk {
    /// The value of `key`, `None` if absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, ClerkError> {
        match self {
            AnyClerk::Kv(c) => c.get(key).await,
            AnyClerk::Sharded(c) => c.get(key).await,
        }
    }
}

/// Every mutation (put, append, delete, cas) through whichever clerk this is.
impl KvOps for AnyClerk {
    async fn mutate(&mut self, command: KvCommand) -> Result<kvpb::Outcome, ClerkError> {
        match self {
            AnyClerk::Kv(c) => c.mutate(command).await,
            AnyClerk::Sharded(c) => c.mutate(command).await,
        }
    }
}

/// How many configurations back `status` looks for groups that left.
pub const LOOKBACK: u64 = 10;

/// One group as `status` shows it.
pub struct GroupReport {
    /// The group id.
    pub gid: Gid,
    /// Its servers, as the configurations list them.
    pub servers: Vec<String>,
    /// Whether the latest configuration names it (false: it left recently).
    pub member: bool,
    /// Shards the latest configuration assigns it.
    pub assigned: Vec<u64>,
    /// Each server's answer.
    pub nodes: Vec<NodeReport>,
}

/// The sharded cluster's status.
pub struct ShardReport {
    /// The latest configuration.
    pub config: Config,
    /// The groups of the latest configuration, then those that left in the last [`LOOKBACK`] ones.
    pub groups: Vec<GroupReport>,
}

/// Read the latest configuration (and the few before it, for groups that left), then ask every server
/// of every group for its status, concurrently, each within `timeout`, at the addresses `view` picks.
pub async fn collect_sharded(
    ctrlers: &[String],
    config: ClerkConfig,
    timeout: Duration,
    view: AddressView,
) -> Result<ShardReport, ClerkError> {
    let security = config.security.clone();
    let mut clerk = CtrlerClerk::new(ctrlers, config)?;
    let latest = clerk.query(None).await?;
    let mut servers: BTreeMap<Gid, Vec<String>> = latest
        .groups
        .iter()
        .map(|(&gid, group)| (gid, client_addresses(group, view)))
        .collect();
    for num in latest.num.saturating_sub(LOOKBACK).max(1)..latest.num {
        let older = clerk.query(Some(num)).await?;
        for (&gid, group) in &older.groups {
            servers
                .entry(gid)
                .or_insert_with(|| client_addresses(group, view));
        }
    }
    let asks = servers.into_iter().map(|(gid, servers)| {
        let (latest, security) = (&latest, &security);
        async move {
            let nodes = collect(&servers, timeout, security).await;
            GroupReport {
                gid,
                member: latest.groups.contains_key(&gid),
                assigned: (0..latest.shards.len() as u64)
                    .filter(|&s| latest.shards[s as usize] == gid)
                    .collect(),
                servers,
                nodes,
            }
        }
    });
    let mut groups = futures::future::join_all(asks).await;
    // Members first, then departed groups, each by gid.
    groups.sort_by_key(|g| (!g.member, g.gid));
    Ok(ShardReport {
        config: latest,
        groups,
    })
}

fn list(shards: &[u64]) -> String {
    if shards.is_empty() {
        return "-".into();
    }
    shards
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The shard columns after [`super::status::RAFT_HEADERS`].
const SHARD_HEADERS: [&str; 6] = [
    "CONFIG",
    "SERVING",
    "PULLING",
    "OUTGOING",
    "CONFIRMING",
    "KEYS",
];

/// Text: the configuration, then per group a header line and a table of its servers.
pub fn render_sharded_table(report: &ShardReport) -> String {
    let mut out = format!(
        "config {} ({} shards, {} groups)\n",
        report.config.num,
        report.config.shards.len(),
        report.config.groups.len()
    );
    for group in &report.groups {
        out.push('\n');
        if group.member {
            out.push_str(&format!(
                "group {}: assigned shards {}\n",
                group.gid,
                list(&group.assigned)
            ));
        } else {
            out.push_str(&format!(
                "group {}: left (not in configuration {})\n",
                group.gid, report.config.num
            ));
        }
        let rows: Vec<Vec<String>> = group
            .nodes
            .iter()
            .map(|r| match &r.status {
                Ok(s) => [
                    super::status::raft_columns(&r.address, s),
                    vec![
                        s.config_num.to_string(),
                        list(&s.serving_shards),
                        list(&s.pulling_shards),
                        s.outgoing_shards.to_string(),
                        s.confirming_shards.to_string(),
                        s.keys.to_string(),
                    ],
                ]
                .concat(),
                Err(e) => vec![r.address.clone(), "-".into(), format!("DOWN ({e})")],
            })
            .collect();
        out.push_str(&super::status::table(
            &[&super::status::RAFT_HEADERS[..], &SHARD_HEADERS[..]].concat(),
            &rows,
        ));
    }
    out
}

/// The same as JSON, for scripts.
pub fn render_sharded_json(report: &ShardReport) -> String {
    let groups: Vec<serde_json::Value> = report
        .groups
        .iter()
        .map(|g| {
            let nodes: Vec<serde_json::Value> = g
                .nodes
                .iter()
                .map(|r| match &r.status {
                    Ok(s) => serde_json::json!({
                        "address": r.address,
                        "up": true,
                        "id": s.id,
                        "role": s.role,
                        "term": s.term,
                        "leader": s.leader,
                        "commit_index": s.commit_index,
                        "applied_index": s.applied_index,
                        "config_num": s.config_num,
                        "serving_shards": s.serving_shards,
                        "pulling_shards": s.pulling_shards,
                        "outgoing_shards": s.outgoing_shards,
                        "confirming_shards": s.confirming_shards,
                        "keys": s.keys,
                    }),
                    Err(e) => serde_json::json!({ "address": r.address, "up": false, "error": e }),
                })
                .collect();
            serde_json::json!({
                "gid": g.gid,
                "member": g.member,
                "servers": g.servers,
                "assigned_shards": g.assigned,
                "nodes": nodes,
            })
        })
        .collect();
    serde_json::json!({
        "config": {
            "num": report.config.num,
            "shards": report.config.shards,
        },
        "groups": groups,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kv::StatusResponse;

    #[test]
    fn renders_groups_and_departed_groups() {
        let config = Config {
            num: 3,
            shards: vec![2, 2],
            groups: [(2, vec!["b:1".to_string()])].into_iter().collect(),
        };
        let report = ShardReport {
            config,
            groups: vec![
                GroupReport {
                    gid: 2,
                    servers: vec!["b:1".into()],
                    member: true,
                    assigned: vec![0, 1],
                    nodes: vec![NodeReport {
                        address: "b:1".into(),
                        status: Ok(StatusResponse {
                            id: 1,
                            role: "leader".into(),
                            gid: 2,
                            config_num: 3,
                            serving_shards: vec![0],
                            pulling_shards: vec![1],
                            outgoing_shards: 4,
                            confirming_shards: 5,
                            ..Default::default()
                        }),
                    }],
                },
                GroupReport {
                    gid: 1,
                    servers: vec!["a:1".into()],
                    member: false,
                    assigned: vec![],
                    nodes: vec![NodeReport {
                        address: "a:1".into(),
                        status: Err("connection refused".into()),
                    }],
                },
            ],
        };
        let text = render_sharded_table(&report);
        assert!(text.contains("group 2: assigned shards 0,1"), "{text}");
        assert!(text.contains("group 1: left"), "{text}");
        assert!(text.contains("DOWN (connection refused)"), "{text}");
        let row = text.lines().find(|l| l.starts_with("b:1")).expect("row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        // ADDRESS ID ROLE TERM LEADER COMMIT APPLIED CONFIG SERVING PULLING OUTGOING CONFIRMING KEYS
        assert_eq!(cells[2], "leader");
        assert_eq!(&cells[7..12], &["3", "0", "1", "4", "5"]);
        let json: serde_json::Value =
            serde_json::from_str(&render_sharded_json(&report)).expect("json");
        assert_eq!(json["groups"][0]["nodes"][0]["pulling_shards"][0], 1);
        assert_eq!(json["groups"][0]["nodes"][0]["confirming_shards"], 5);
        assert_eq!(json["groups"][1]["member"], false);
    }
}
