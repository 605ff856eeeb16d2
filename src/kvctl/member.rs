//! `kvctl member ...` and `kvctl transfer-leader`: a Raft group's membership and leadership, for the
//! KV store, the controllers or one shard group (whichever [`Target`] names), through the
//! `RaftAdmin` service every replica serves on its client port.
//!
//! Every change goes to the leader, found by asking the servers given (and following the leader
//! they name); a busy group ("a change is still uncommitted", "the learner has not caught up") is
//! retried until the command's deadline, so a script can chain `add`, `promote` and `remove`.

use super::backup::Target;
use crate::proto::raft as pb;
use crate::proto::raft::raft_admin_client::RaftAdminClient;
use crate::rsm::client::ClerkConfig;
use anyhow::{anyhow, bail, Context};
use std::time::{Duration, Instant};
use tonic::Code;

/// One membership operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Show the configuration, each member's role and how far behind the leader it is.
    List {
        /// JSON instead of a table.
        json: bool,
    },
    /// Add node `id` at peer address `address`: as a learner, then (unless `learner_only`) wait until
    /// it caught up and promote it.
    Add {
        /// The new node's id.
        id: u64,
        /// Its peer address (`host:port`).
        address: String,
        /// Stop once it is a learner.
        learner_only: bool,
    },
    /// Promote learner `id` to voter (waits until it caught up).
    Promote(u64),
    /// Remove member `id`.
    Remove(u64),
    /// Hand leadership to voter `id`.
    TransferLeader(u64),
}

/// A learner this close to the leader's last index is promoted (the leader's own limit is one
/// message's worth of entries).
const PROMOTE_LAG: u64 = 64;

/// Carry out `op` against `target`, printing what it did; errors say why not.
pub async fn run(target: &Target, config: &ClerkConfig, op: Op) -> anyhow::Result<()> {
    let deadline = Instant::now() + config.call_timeout.max(Duration::from_secs(1));
    match op {
        Op::List { json } => {
            let members = leader_view(target, config, deadline).await?;
            if json {
                crate::outln!("{}", render_json(&members));
            } else {
                crate::out!("{}", render_table(&members));
            }
        }
        Op::Add {
            id,
            address,
            learner_only,
        } => {
            let add = pb::change_members_request::Change::AddLearner(pb::Member {
                id,
                address: address.clone(),
                learner: true,
            });
            match change(target, config, add, deadline).await {
                Ok(_) => crate::outln!("added node {id} at {address} as a learner"),
                // Already a learner: an earlier run added it; go on to promote it.
                Err(e) if e.to_string().contains("already a member") => {
                    let members = leader_view(target, config, deadline).await?;
                    let known = members.members.iter().find(|m| m.id == id);
                    match known {
                        Some(m) if m.learner && m.address == address => {
                            crate::outln!("node {id} is already a learner at {address}")
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
            if !learner_only {
                promote_when_caught_up(target, config, id, deadline).await?;
            }
        }
        Op::Promote(id) => promote_when_caught_up(target, config, id, deadline).await?,
        Op::Remove(id) => {
            let remove = pb::change_members_request::Change::Remove(id);
            let members = change(target, config, remove, deadline).await?;
            crate::outln!("removed node {id}; voters now: {}", voters(&members));
        }
        Op::TransferLeader(id) => {
            let (mut client, _) = leader_client(target, config, deadline).await?;
            let transfer = client.transfer_leader(pb::TransferLeaderRequest { target: id });
            // A leader that froze after answering `Members` must not hang the command.
            let reply = tokio::time::timeout_at(deadline.into(), transfer)
                .await
                .map_err(|_| anyhow!("the leader did not answer before the deadline"))?
                .map_err(|s| anyhow!("{}", s.message()))?
                .into_inner();
            crate::outln!("node {} leads (term {})", reply.leader, reply.term);
        }
    }
    Ok(())
}

fn voters(members: &pb::MembersResponse) -> String {
    let ids: Vec<String> = members
        .members
        .iter()
        .filter(|m| !m.learner)
        .map(|m| m.id.to_string())
        .collect();
    ids.join(",")
}

/// Wait until learner `id` is within [`PROMOTE_LAG`] entries of the leader (showing how far it has
/// to go), then promote it.
async fn promote_when_caught_up(
    target: &Target,
    config: &ClerkConfig,
    id: u64,
    deadline: Instant,
) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("node {msg}: {pos}/{len} entries")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(id.to_string());
    loop {
        let members = leader_view(target, config, deadline).await?;
        let Some(member) = members.members.iter().find(|m| m.id == id) else {
            bar.finish_and_clear();
            bail!("node {id} is not a member (add it first: kvctl member add {id}=PEER_ADDRESS)");
        };
        if !member.learner {
            bar.finish_and_clear();
            crate::outln!("node {id} is a voter");
            return Ok(());
        }
        bar.set_length(members.last_index);
        bar.set_position(member.match_index);
        let lag = members.last_index.saturating_sub(member.match_index);
        if member.match_index > 0 && lag <= PROMOTE_LAG {
            break;
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            bail!(
                "node {id} has not caught up (it holds {} of {} entries); raise --timeout-ms or check that it runs and is reachable",
                member.match_index,
                members.last_index
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let promote = pb::change_members_request::Change::Promote(id);
    let members = change(target, config, promote, deadline).await?;
    crate::outln!("promoted node {id}; voters now: {}", voters(&members));
    Ok(())
}

/// Make one change on the leader, retrying while the group is busy, until `deadline`.
async fn change(
    target: &Target,
    config: &ClerkConfig,
    change: pb::change_members_request::Change,
    deadline: Instant,
) -> anyhow::Result<pb::MembersResponse> {
    let mut attempts = 0;
    loop {
        let (mut client, members) = leader_client(target, config, deadline).await?;
        // An earlier attempt may have committed after all (its answer said "did not commit in
        // time"): then the change is done, not refused as already made.
        if attempts > 0 && satisfied(&members, &change) {
            return Ok(members);
        }
        attempts += 1;
        let request = pb::ChangeMembersRequest {
            change: Some(change.clone()),
        };
        // A leader that froze after answering `Members` must not hang the command.
        let answer = tokio::time::timeout_at(deadline.into(), client.change_members(request))
            .await
            .map_err(|_| anyhow!("the leader did not answer before the deadline"))?;
        match answer {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::FailedPrecondition)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => bail!("{}", status.message()),
        }
    }
}

/// Whether `members` already shows `change` made.
fn satisfied(members: &pb::MembersResponse, change: &pb::change_members_request::Change) -> bool {
    use pb::change_members_request::Change;
    let find = |id: u64| members.members.iter().find(|m| m.id == id);
    match change {
        Change::AddLearner(new) => find(new.id).is_some_and(|m| m.address == new.address),
        Change::Promote(id) => find(*id).is_some_and(|m| !m.learner),
        Change::Remove(id) => find(*id).is_none(),
    }
}

/// The leader's view of the membership, asked for at most `within` (for `kvctl status`).
pub async fn leader_members(
    target: &Target,
    config: &ClerkConfig,
    within: Duration,
) -> anyhow::Result<pb::MembersResponse> {
    leader_view(target, config, Instant::now() + within).await
}

/// The leader's view of the membership (progress included).
async fn leader_view(
    target: &Target,
    config: &ClerkConfig,
    deadline: Instant,
) -> anyhow::Result<pb::MembersResponse> {
    Ok(leader_client(target, config, deadline).await?.1)
}

/// A client of the leader and its answer to `Members`: ask the servers given in turn, following the
/// leader a follower names among the members' addresses, until one says it leads.
async fn leader_client(
    target: &Target,
    config: &ClerkConfig,
    deadline: Instant,
) -> anyhow::Result<(
    RaftAdminClient<crate::security::ClientChannel>,
    pb::MembersResponse,
)> {
    let mut last_error = anyhow!("no server given");
    let mut servers = target.servers.clone();
    loop {
        for index in 0.. {
            let Some(server) = servers.get(index).cloned() else {
                break;
            };
            let server = &server;
            let channel = crate::rsm::client::channel_to(server, config, Some(&target.role))
                .with_context(|| format!("server {server}"))?;
            let mut client = RaftAdminClient::new(channel);
            let call = client.members(pb::MembersRequest {});
            match tokio::time::timeout(Duration::from_secs(2), call).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    if reply.leader != 0 && reply.leader == reply.id {
                        return Ok((client, reply));
                    }
                    // Follow the leader it names, once.
                    if !reply.leader_address.is_empty() && !servers.contains(&reply.leader_address)
                    {
                        servers.push(reply.leader_address.clone());
                    }
                    last_error = anyhow!(
                        "{server} (node {}) does not lead{}",
                        reply.id,
                        match reply.leader {
                            0 => " and knows no leader".to_string(),
                            id => format!("; node {id} does (give its client address too)"),
                        }
                    );
                }
                Ok(Err(status)) if status.code() == Code::PermissionDenied => {
                    bail!("{server}: {}", status.message())
                }
                Ok(Err(status)) => last_error = anyhow!("{server}: {}", status.message()),
                Err(_) => last_error = anyhow!("{server}: no answer within 2 s"),
            }
        }
        if Instant::now() >= deadline {
            return Err(last_error.context("no leader found"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The membership as a table: one line per member with its role and lag behind the leader.
pub fn render_table(members: &pb::MembersResponse) -> String {
    let mut out = format!(
        "leader {} term {} commit {} last index {}\n{:<6} {:<8} {:<24} {:>10} {:>8}\n",
        members.leader,
        members.term,
        members.commit,
        members.last_index,
        "ID",
        "ROLE",
        "PEER ADDRESS",
        "MATCH",
        "LAG"
    );
    for m in &members.members {
        let role = match (m.learner, m.id == members.leader) {
            (true, _) => "learner",
            (false, true) => "leader",
            (false, false) => "voter",
        };
        let (matched, lag) = if members.progress_known {
            (
                m.match_index.to_string(),
                members.last_index.saturating_sub(m.match_index).to_string(),
            )
        } else {
            ("?".into(), "?".into())
        };
        out.push_str(&format!(
            "{:<6} {:<8} {:<24} {:>10} {:>8}\n",
            m.id, role, m.address, matched, lag
        ));
    }
    out
}

/// The membership as JSON (for scripts).
pub fn render_json(members: &pb::MembersResponse) -> String {
    let list: Vec<serde_json::Value> = members
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id,
                "address": m.address,
                "learner": m.learner,
                "match_index": members.progress_known.then_some(m.match_index),
                "lag": members
                    .progress_known
                    .then(|| members.last_index.saturating_sub(m.match_index)),
            })
        })
        .collect();
    serde_json::json!({
        "leader": members.leader,
        "term": members.term,
        "commit": members.commit,
        "last_index": members.last_index,
        "members": list,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_roles_and_lag() {
        let members = pb::MembersResponse {
            id: 1,
            leader: 1,
            term: 3,
            commit: 90,
            last_index: 100,
            progress_known: true,
            leader_address: String::new(),
            cluster: String::new(),
            restored: String::new(),
            members: vec![
                pb::MemberStatus {
                    id: 1,
                    address: "a:1".into(),
                    learner: false,
                    match_index: 100,
                },
                pb::MemberStatus {
                    id: 4,
                    address: "d:4".into(),
                    learner: true,
                    match_index: 40,
                },
            ],
        };
        let table = render_table(&members);
        assert!(table.contains("leader"), "{table}");
        let learner_line = table.lines().find(|l| l.starts_with('4')).expect("line");
        assert!(learner_line.contains("learner") && learner_line.ends_with("60"));
        let json: serde_json::Value = serde_json::from_str(&render_json(&members)).expect("json");
        assert_eq!(json["members"][1]["lag"], 60);
    }
}
