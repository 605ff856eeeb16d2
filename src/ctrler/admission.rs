//! Checks on an operator's Join, Leave and Servers command made where it comes in, before it is
//! proposed, beyond those the state machine makes when it applies ([`super::state::check_join`]).
//!
//! Why here and not in the state machine: a check added to `apply` would refuse, on a replica that
//! replays its log with a newer build, an entry its peers applied under an older one, and the
//! replicas would part ways. A check at the door only refuses what has not been logged. These read
//! the latest configuration as this replica has applied it, which may be a little behind: they
//! catch an operator's mistakes, they do not guard an invariant.

use super::addresses::{peer_address, validate_entry};
use super::state::{CtrlerCommand, Gid, ShardCtrler, MAX_SERVERS_PER_GROUP};
use crate::proto::ctrler::command::Op;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Refuse a Join or Leave that names a gid twice. Read from the request as sent: converted, a
/// Join's groups are a map, where a second entry silently replaces the first.
pub fn check_names(op: &Op) -> Result<(), String> {
    let (what, gids): (&str, Vec<Gid>) = match op {
        Op::Join(join) => ("join", join.groups.iter().map(|g| g.gid).collect()),
        Op::Leave(leave) => ("leave", leave.gids.clone()),
        _ => return Ok(()),
    };
    let mut seen = BTreeSet::new();
    match gids.into_iter().find(|&gid| !seen.insert(gid)) {
        Some(gid) => Err(format!("group {gid} is named twice in the {what}")),
        None => Ok(()),
    }
}

/// Refuse, in a Join or a Servers command, a server address not of the form `PEER` or
/// `PEER@CLIENT`, one server twice in a group, or a server another group holds: listed in the
/// latest configuration, or by a group that left and still hands its shards over from it (pulls
/// addressed to one group would reach the other, whose certificate then fails the check for ever);
/// a Join of a gid still handing off at other servers than it had (its new owners would ask
/// those); a conditional server list longer than a group may be.
///
/// Unless `force`, also refuse a Leave of a group that was given shards but never reported taking
/// them (see [`ShardCtrler::never_took_its_shards`]): they would stay frozen at their previous
/// owners, waiting for a group that is gone, and the configurations since its join would be kept
/// for ever.
pub fn check_command(
    command: &CtrlerCommand,
    ctrler: &ShardCtrler,
    force: bool,
) -> Result<(), String> {
    match command {
        CtrlerCommand::Join { groups, .. } => {
            let mut claimed = claimed_servers(ctrler, None);
            for (&gid, servers) in groups {
                if ctrler.latest().groups.contains_key(&gid) {
                    // Refused by the state machine, in its words ("already joined").
                    continue;
                }
                check_servers(gid, servers, &mut claimed)?;
                let handing_off = ctrler.handing_off().find(|&(g, _, _)| g == gid);
                if let Some((_, left, had)) = handing_off {
                    let mut had_peers: Vec<&str> = had.iter().map(|e| peer_address(e)).collect();
                    let mut peers: Vec<&str> = servers.iter().map(|e| peer_address(e)).collect();
                    had_peers.sort_unstable();
                    peers.sort_unstable();
                    if had_peers != peers {
                        return Err(format!(
                            "group {gid} left in configuration {left} and still hands its shards \
                             over from {}: the groups taking them would ask the new servers \
                             instead. Join it again at those servers, wait until it has passed \
                             configuration {left}, or use another gid",
                            had.join(",")
                        ));
                    }
                }
            }
            Ok(())
        }
        CtrlerCommand::Servers {
            gid,
            servers,
            expected,
        } => {
            let expected = expected.as_ref().map_or(0, Vec::len);
            if expected > MAX_SERVERS_PER_GROUP {
                return Err(format!(
                    "the expected list names {expected} servers, more than {MAX_SERVERS_PER_GROUP}"
                ));
            }
            check_servers(*gid, servers, &mut claimed_servers(ctrler, Some(*gid)))
        }
        CtrlerCommand::Leave(gids) if !force => {
            for &gid in gids {
                if let Some(joined) = ctrler.never_took_its_shards(gid) {
                    return Err(format!(
                        "group {gid} has not reported reaching configuration {joined}, where it \
                         joined: the shards given to it wait for it, frozen at their previous \
                         owners, and would stay so after it left. Start it (or correct its \
                         addresses with `kvctl ctrler servers`), let it catch up, then remove it \
                         (or, if it is gone for good, leave it with --force)"
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The peer address of every server another group holds (but `except`) → that group: those of
/// the latest configuration, and those of groups still handing off.
fn claimed_servers(ctrler: &ShardCtrler, except: Option<Gid>) -> HashMap<String, Gid> {
    let latest = ctrler
        .latest()
        .groups
        .iter()
        .map(|(&gid, servers)| (gid, servers.clone()));
    let leaving = ctrler.handing_off().map(|(gid, _, servers)| (gid, servers));
    latest
        .chain(leaving)
        .filter(|&(gid, _)| Some(gid) != except)
        .flat_map(|(gid, servers)| {
            servers
                .iter()
                .map(|entry| (peer_address(entry).to_string(), gid))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Check group `gid`'s `servers` against `claimed`, then claim them for it.
fn check_servers(
    gid: Gid,
    servers: &[String],
    claimed: &mut HashMap<String, Gid>,
) -> Result<(), String> {
    let mut own = HashSet::new();
    for entry in servers {
        validate_entry(entry).map_err(|e| format!("group {gid}: {e}"))?;
        let peer = peer_address(entry);
        if !own.insert(peer) {
            return Err(format!("group {gid} lists server {peer} twice"));
        }
        match claimed.get(peer) {
            Some(&owner) if owner != gid => {
                return Err(format!(
                    "server {peer} of group {gid} is already group {owner}'s"
                ))
            }
            _ => {}
        }
    }
    for peer in own {
        claimed.insert(peer.to_string(), gid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctrler::CtrlerCommand;
    use crate::proto::ctrler as pb;
    use crate::rsm::StateMachine as _;

    /// What the service checks for `op` as it arrives, with `force` as given.
    fn check(op: &Op, ctrler: &ShardCtrler, force: bool) -> Result<(), String> {
        check_names(op)?;
        let command = pb::Command {
            op: Some(op.clone()),
        };
        let command = CtrlerCommand::try_from(command).map_err(|e| e.to_string())?;
        check_command(&command, ctrler, force)
    }

    fn check_request(op: &Op, ctrler: &ShardCtrler) -> Result<(), String> {
        check(op, ctrler, false)
    }

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
        // A member joining again is the state machine's to refuse, in its words.
        assert_eq!(check_request(&join(&[(1, &["g1a:7201"])]), &ctrler), Ok(()));
        let mut joined = ctrler.clone();
        let why = joined
            .apply(CtrlerCommand::Join {
                groups: [(1, vec!["g1a:7201".to_string()])].into(),
                shards: 0,
            })
            .expect_err("joined twice");
        assert!(why.contains("already joined"), "{why}");
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
        assert_eq!(check(&leave(&[2]), &ctrler, true), Ok(()), "forced");
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

    /// A gid that left and still hands its shards over is asked for them at the servers it had:
    /// joined again elsewhere, its new owners' pulls would go to the new servers and wait for ever.
    #[test]
    fn a_group_still_handing_off_joins_again_only_at_its_servers() {
        let mut ctrler = with_groups(&[1, 2]);
        ctrler.apply(CtrlerCommand::Leave(vec![2])).expect("leave");
        let why = check_request(&join(&[(2, &["new:1"])]), &ctrler).expect_err("elsewhere");
        assert!(why.contains("left in configuration 3"), "{why}");
        let same = join(&[(2, &["g2a:7201@127.0.0.1:17202"])]);
        assert_eq!(check_request(&same, &ctrler), Ok(()));
        // Peers are what pullers use: a new advertised client address is no move.
        let readvertised = join(&[(2, &["g2a:7201@10.0.0.2:7202"])]);
        assert_eq!(check_request(&readvertised, &ctrler), Ok(()));
        // Its servers are still its own: another gid may not take them.
        let why = check_request(&join(&[(9, &["g2a:7201"])]), &ctrler).expect_err("taken");
        assert!(why.contains("already group 2's"), "{why}");
        // Once it has passed its leave it is forgotten, and the gid is free.
        let progress = CtrlerCommand::Progress {
            gid: 2,
            num: 3,
            keep: 100,
        };
        ctrler.apply(progress).expect("progress");
        assert_eq!(check_request(&join(&[(2, &["new:1"])]), &ctrler), Ok(()));
        // A conditional server list names at most as many servers as a group may have.
        let long = Op::Servers(pb::Servers {
            group: Some(pb::Group {
                gid: 1,
                servers: vec!["g1a:7201".into()],
            }),
            expected: vec!["x:1".into(); MAX_SERVERS_PER_GROUP + 1],
        });
        let why = check_request(&long, &ctrler).expect_err("too long");
        assert!(why.contains("expected list"), "{why}");
    }
}
