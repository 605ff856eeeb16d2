//! Checks on an operator's Join, Leave and Servers command made where it comes in, before it is
//! proposed, beyond those the state machine makes when it applies ([`super::state::check_join`]).
//!
//! Why here and not in the state machine: a check added to `apply` would refuse, on a replica that
//! replays its log with a newer build, an entry its peers applied under an older one, and the
//! replicas would part ways. A check at the door only refuses what has not been logged. These read
//! the latest configuration as this replica has applied it, which may be a little behind: they
//! catch an operator's mistakes, they do not guard an invariant.

use super::addresses::{peer_address, validate_entry};
use super::state::{Config, Gid, ShardCtrler};
use crate::proto::ctrler::command::Op;
use std::collections::{BTreeSet, HashMap};

/// Refuse a command that names a gid twice, a server address not of the form `PEER` or
/// `PEER@CLIENT`, one server twice in a group, or a server another group of `latest` already lists
/// (pulls addressed to one group would reach the other, whose certificate then fails the check
/// for ever). The message says which.
///
/// And refuse a Leave of a group that was given shards but never reported taking them (see
/// [`ShardCtrler::never_took_its_shards`]): they would stay frozen at their previous owners, waiting
/// for a group that is gone, and the configurations since its join would be kept for ever.
pub fn check_request(op: &Op, ctrler: &ShardCtrler) -> Result<(), String> {
    let latest = ctrler.latest();
    match op {
        Op::Join(join) => {
            let mut claimed = claimed_servers(latest, None);
            let mut gids = BTreeSet::new();
            for group in &join.groups {
                if !gids.insert(group.gid) {
                    return Err(format!("group {} is named twice in the join", group.gid));
                }
                check_servers(group.gid, &group.servers, &mut claimed)?;
            }
            Ok(())
        }
        Op::Servers(servers) => match &servers.group {
            Some(group) => {
                let mut claimed = claimed_servers(latest, Some(group.gid));
                check_servers(group.gid, &group.servers, &mut claimed)
            }
            None => Ok(()),
        },
        Op::Leave(leave) => {
            let mut gids = BTreeSet::new();
            if let Some(gid) = leave.gids.iter().find(|&&gid| !gids.insert(gid)) {
                return Err(format!("group {gid} is named twice in the leave"));
            }
            for &gid in &leave.gids {
                if let Some(joined) = ctrler.never_took_its_shards(gid) {
                    return Err(format!(
                        "group {gid} has not reported reaching configuration {joined}, where it \
                         joined: the shards given to it wait for it, frozen at their previous \
                         owners, and would stay so after it left. Start it (or correct its \
                         addresses with `kvctl ctrler servers`), let it catch up, then remove it"
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The peer address of every server of `latest`'s groups (but `except`) → its group.
fn claimed_servers(latest: &Config, except: Option<Gid>) -> HashMap<String, Gid> {
    latest
        .groups
        .iter()
        .filter(|(&gid, _)| Some(gid) != except)
        .flat_map(|(&gid, servers)| {
            servers
                .iter()
                .map(move |entry| (peer_address(entry).to_string(), gid))
        })
        .collect()
}

/// Check group `gid`'s `servers` and claim them.
fn check_servers(
    gid: Gid,
    servers: &[String],
    claimed: &mut HashMap<String, Gid>,
) -> Result<(), String> {
    for entry in servers {
        validate_entry(entry).map_err(|e| format!("group {gid}: {e}"))?;
        let peer = peer_address(entry);
        match claimed.insert(peer.to_string(), gid) {
            Some(owner) if owner == gid => {
                return Err(format!("group {gid} lists server {peer} twice"))
            }
            Some(owner) => {
                return Err(format!(
                    "server {peer} of group {gid} is already group {owner}'s"
                ))
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctrler::CtrlerCommand;
    use crate::proto::ctrler as pb;
    use crate::rsm::StateMachine as _;

    fn join(groups: &[(Gid, &[&str])]) -> Op {
        Op::Join(pb::Join {
            groups: groups
                .iter()
                .map(|(gid, servers)| pb::Group {
                    gid: *gid,
                    servers: servers.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            shards: 0,
        })
    }

    fn servers(gid: Gid, list: &[&str]) -> Op {
        Op::Servers(pb::Servers {
            group: Some(pb::Group {
                gid,
                servers: list.iter().map(|s| s.to_string()).collect(),
            }),
            expected: Vec::new(),
        })
    }

    fn leave(gids: &[Gid]) -> Op {
        Op::Leave(pb::Leave {
            gids: gids.to_vec(),
        })
    }

    /// A controller where `groups` joined one at a time, each at server `g<gid>a:7201`.
    fn with_groups(groups: &[Gid]) -> ShardCtrler {
        let mut ctrler = ShardCtrler::new(10);
        for &gid in groups {
            let command = CtrlerCommand::Join {
                groups: [(gid, vec![format!("g{gid}a:7201@127.0.0.1:1720{gid}")])].into(),
                shards: 0,
            };
            ctrler.apply(command).expect("join");
        }
        ctrler
    }

    #[test]
    fn an_operators_mistakes_are_refused_with_what_is_wrong() {
        let ctrler = with_groups(&[1]);
        for (op, says) in [
            (
                join(&[(2, &["a:1"]), (2, &["b:1"])]),
                "group 2 is named twice",
            ),
            (join(&[(2, &["a:1", "a:1@x:1"])]), "lists server a:1 twice"),
            (join(&[(2, &["a:1"]), (3, &["a:1"])]), "already group 2's"),
            (join(&[(2, &["g1a:7201"])]), "already group 1's"),
            (join(&[(2, &["a 1"])]), "empty or has spaces"),
            (join(&[(2, &["a:1@b:1@c:1"])]), "one @ at most"),
            (leave(&[1, 3, 1]), "group 1 is named twice in the leave"),
        ] {
            let why = check_request(&op, &ctrler).expect_err(says);
            assert!(why.contains(says), "{why:?} does not say {says:?}");
        }
        let fine = join(&[(2, &["a:1", "b:1@c:1"]), (3, &["d:1"])]);
        assert_eq!(check_request(&fine, &ctrler), Ok(()));
        // A group's new list may keep its own servers, not take another's.
        let ctrler = with_groups(&[1, 2]);
        let own = servers(1, &["g1a:7201", "g1b:7201"]);
        assert_eq!(check_request(&own, &ctrler), Ok(()));
        let why = check_request(&servers(1, &["g2a:7201"]), &ctrler).expect_err("another's");
        assert!(why.contains("already group 2's"), "{why}");
    }

    /// A group given shards that never said it reached its join (never started, or its addresses
    /// lead nowhere) may not leave: its shards would wait for it for ever.
    #[test]
    fn a_group_that_never_took_its_shards_may_not_leave() {
        let mut ctrler = with_groups(&[1, 2]);
        let why = check_request(&leave(&[2]), &ctrler).expect_err("group 2 never reported");
        assert!(
            why.contains("has not reported reaching configuration 2"),
            "{why}"
        );
        let progress = |gid: Gid, num: u64| CtrlerCommand::Progress {
            gid,
            num,
            keep: 100,
        };
        ctrler.apply(progress(2, 2)).expect("progress");
        assert_eq!(check_request(&leave(&[2]), &ctrler), Ok(()));
        // Group 1 reported nothing, but joined when it was alone: configuration 0 is before it.
        let why = check_request(&leave(&[1]), &ctrler).expect_err("group 1 never reported");
        assert!(why.contains("configuration 1"), "{why}");
        // A group given no shard (more groups than shards) leaves at once.
        let crowded = with_groups(&(1..=11).collect::<Vec<_>>());
        let never_given = |gid: &Gid| {
            (0..=crowded.latest().num)
                .filter_map(|num| crowded.config(num))
                .all(|config| !config.shards.contains(gid))
        };
        let idle = (1..=11)
            .find(never_given)
            .expect("a group never given a shard");
        assert_eq!(check_request(&leave(&[idle]), &crowded), Ok(()));
    }
}
