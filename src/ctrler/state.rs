//! The shard controller's state machine: the list of every configuration, changed by Join, Leave and
//! Move, read by Query.
//!
//! **Bounded state.** Every configuration is kept (shard groups walk the history one configuration at a
//! time), so what each one costs matters:
//! - in memory, consecutive configurations share their group map ([`Groups`], an `Arc`), and every map
//!   shares each group's server list ([`Servers`]): a Move costs the shard assignment (O(shards)), a
//!   Join or Leave one pointer per group;
//! - in a snapshot, configuration n is written as its change from n-1 ([`pb::Change`]): each group's
//!   servers once per join, not once per configuration;
//! - in the session table, a command's output is the number of the configuration it made
//!   ([`CtrlerAnswer::Created`]), not the configuration; the service reads the configuration from the
//!   state when it replies;
//! - a Join is refused beyond [`MAX_GROUPS`], [`MAX_SERVERS_PER_GROUP`], [`MAX_ADDRESS_BYTES`] and
//!   [`MAX_CONFIG_SERVER_BYTES`], with the same message on every replica.

use super::rebalance::rebalance;
use crate::proto::ctrler as pb;
use crate::rsm::{RsmError, StateMachine};
use bytes::Bytes;
use prost::Message as _;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

/// A replica group id. 0 means "no group".
pub type Gid = u64;

/// The number of shards 6.824 uses; a controller cluster can be created with another count.
pub const DEFAULT_SHARDS: usize = 10;

/// Most groups a configuration may hold: more than any sensible shard count uses (a group without a
/// shard only waits), and few enough that a Join's rebalancing and the copy of the group map that a
/// Join or Leave makes stay cheap.
pub const MAX_GROUPS: usize = 4096;

/// Most servers one group may list: a Raft group of more than a handful of voters is slower, not safer,
/// and every clerk tries the servers of a group in turn.
pub const MAX_SERVERS_PER_GROUP: usize = 64;

/// Longest server address, in bytes (a host name is at most 253, plus a port; the rest is slack). The
/// service refuses longer ones with `INVALID_ARGUMENT` before proposing.
pub const MAX_ADDRESS_BYTES: usize = 1024;

/// Most bytes of server addresses in one configuration (all groups together). A configuration travels
/// whole in a `Query` reply (the replicas' messages are limited to 4 MiB) and in a shard group's log
/// entry, so it must stay well under that; 2 MiB leaves room for the shard assignment and the framing.
pub const MAX_CONFIG_SERVER_BYTES: usize = 2 << 20;

/// The servers of one group, in the order they were given. Shared (not copied) by every configuration
/// the group is a member of.
pub type Servers = Arc<[String]>;

/// The groups of a configuration: gid → servers. Cloning shares the map, so configurations that differ
/// only in their shard assignment (a Move) share one; reading it is reading a `BTreeMap` (`Deref`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Groups(Arc<BTreeMap<Gid, Servers>>);

impl Groups {
    /// Whether both are the same shared map, so equal without comparing them: the snapshot encoder
    /// skips the comparison for a Move, and tests check that a Move does not copy the map.
    pub fn shares_with(&self, other: &Groups) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Bytes of all server addresses, what [`MAX_CONFIG_SERVER_BYTES`] bounds.
    pub fn address_bytes(&self) -> usize {
        self.0.values().map(|servers| address_bytes(servers)).sum()
    }

    /// The map to change; copied first (one pointer per group) if another configuration shares it.
    fn make_mut(&mut self) -> &mut BTreeMap<Gid, Servers> {
        Arc::make_mut(&mut self.0)
    }
}

impl Deref for Groups {
    type Target = BTreeMap<Gid, Servers>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Groups {
    type Item = (&'a Gid, &'a Servers);
    type IntoIter = std::collections::btree_map::Iter<'a, Gid, Servers>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// As a map of gid to server list (`kvctl ctrler query --json`).
impl serde::Serialize for Groups {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(gid, servers)| (gid, &servers[..])))
    }
}

impl FromIterator<(Gid, Vec<String>)> for Groups {
    fn from_iter<I: IntoIterator<Item = (Gid, Vec<String>)>>(iter: I) -> Self {
        Groups(Arc::new(
            iter.into_iter()
                .map(|(gid, servers)| (gid, Servers::from(servers)))
                .collect(),
        ))
    }
}

impl From<BTreeMap<Gid, Vec<String>>> for Groups {
    fn from(groups: BTreeMap<Gid, Vec<String>>) -> Self {
        groups.into_iter().collect()
    }
}

fn address_bytes(servers: &[String]) -> usize {
    servers.iter().map(String::len).sum()
}

/// Configuration `num`: who serves each shard, and the servers of every group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Configurations are numbered from 0 (no groups, every shard unassigned).
    pub num: u64,
    /// `shards[i]` is the group serving shard `i` (0: nobody).
    pub shards: Vec<Gid>,
    /// Servers of every group, in the order they were given (shared with the configurations around it).
    pub groups: Groups,
}

/// A change to the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlerCommand {
    /// Add groups (gid → servers).
    Join(BTreeMap<Gid, Vec<String>>),
    /// Remove groups; their shards go to the others.
    Leave(Vec<Gid>),
    /// Give `shard` to `gid`.
    Move {
        /// The shard.
        shard: u64,
        /// The group that gets it.
        gid: Gid,
    },
}

/// A read: configuration `num`, or the latest for `None` or a number not reached yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlerQuery(pub Option<u64>);

/// What the controller answers. Commands answer with a number so that the session table, which keeps
/// every client's last output, holds a few bytes per client rather than a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlerAnswer {
    /// A command made configuration `num` (read it with [`ShardCtrler::config`]: configurations are
    /// never dropped, so it is there on every replica that applied the command).
    Created(u64),
    /// The configuration a query asked for (or, restored from a session table of the older format, the
    /// one a command made).
    Config(Config),
}

/// An answer, or why a command was refused (the same refusal on every replica).
pub type CtrlerOutput = Result<CtrlerAnswer, String>;

/// Check what a Join can be judged on alone, whatever the configuration: at least one group, at most
/// [`MAX_GROUPS`], and each group valid (see [`check_group`]). The state machine applies the same checks
/// (and those that depend on the configuration), so the service may refuse early with the very words
/// the log would produce.
pub fn check_join(groups: &BTreeMap<Gid, Vec<String>>) -> Result<(), String> {
    if groups.is_empty() {
        return Err("join names no group".into());
    }
    if groups.len() > MAX_GROUPS {
        return Err(format!(
            "the join names {} groups, more than {MAX_GROUPS}",
            groups.len()
        ));
    }
    groups
        .iter()
        .try_for_each(|(&gid, servers)| check_group(gid, servers))
}

/// One joining group: not gid 0, 1 to [`MAX_SERVERS_PER_GROUP`] servers, each address 1 to
/// [`MAX_ADDRESS_BYTES`] bytes.
pub fn check_group(gid: Gid, servers: &[String]) -> Result<(), String> {
    if gid == 0 {
        return Err("gid 0 is reserved".into());
    }
    if servers.is_empty() {
        return Err(format!("group {gid} has no servers"));
    }
    if servers.len() > MAX_SERVERS_PER_GROUP {
        return Err(format!(
            "group {gid} names {} servers, more than {MAX_SERVERS_PER_GROUP}",
            servers.len()
        ));
    }
    if let Some(bad) = servers
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_ADDRESS_BYTES)
    {
        return Err(format!(
            "group {gid} has a server address of {} bytes (1 to {MAX_ADDRESS_BYTES} allowed)",
            bad.len()
        ));
    }
    Ok(())
}

/// The controller's replicated state.
#[derive(Clone, Debug)]
pub struct ShardCtrler {
    /// Every configuration, `configs[n].num == n`; never empty (configuration 0 is always there).
    configs: Vec<Config>,
}

impl Default for ShardCtrler {
    fn default() -> Self {
        Self::new(DEFAULT_SHARDS)
    }
}

impl ShardCtrler {
    /// A controller with `shards` shards and only configuration 0.
    pub fn new(shards: usize) -> Self {
        ShardCtrler {
            configs: vec![Config {
                num: 0,
                shards: vec![0; shards],
                groups: Groups::default(),
            }],
        }
    }

    /// The latest configuration.
    pub fn latest(&self) -> &Config {
        // There is always configuration 0.
        &self.configs[self.configs.len() - 1]
    }

    /// Configuration `num`, if it was made.
    pub fn config(&self, num: u64) -> Option<&Config> {
        usize::try_from(num).ok().and_then(|n| self.configs.get(n))
    }

    /// What a query for `num` reads: configuration `num`, or the latest for `None` or a number not
    /// reached yet.
    pub fn config_or_latest(&self, num: Option<u64>) -> &Config {
        num.and_then(|n| self.config(n))
            .unwrap_or_else(|| self.latest())
    }

    /// The next configuration, before its change: the latest's assignment and (shared) groups.
    fn next_config(&self) -> Config {
        let mut next = self.latest().clone();
        next.num += 1;
        next
    }

    /// Keep `next` as the latest configuration and answer with its number.
    fn push(&mut self, next: Config) -> CtrlerOutput {
        let num = next.num;
        self.configs.push(next);
        Ok(CtrlerAnswer::Created(num))
    }

    fn join(&mut self, groups: BTreeMap<Gid, Vec<String>>) -> CtrlerOutput {
        check_join(&groups)?;
        let latest = self.latest();
        if let Some(gid) = groups.keys().find(|gid| latest.groups.contains_key(gid)) {
            return Err(format!("group {gid} has already joined"));
        }
        let count = latest.groups.len() + groups.len();
        if count > MAX_GROUPS {
            return Err(format!(
                "the configuration would have {count} groups, more than {MAX_GROUPS}"
            ));
        }
        let bytes = latest.groups.address_bytes()
            + groups.values().map(|s| address_bytes(s)).sum::<usize>();
        if bytes > MAX_CONFIG_SERVER_BYTES {
            return Err(format!(
                "the configuration's server addresses would take {bytes} bytes, more than {MAX_CONFIG_SERVER_BYTES}"
            ));
        }
        let mut next = self.next_config();
        let map = next.groups.make_mut();
        for (gid, servers) in groups {
            map.insert(gid, Servers::from(servers));
        }
        let gids: Vec<Gid> = map.keys().copied().collect();
        rebalance(&mut next.shards, &gids);
        self.push(next)
    }

    fn leave(&mut self, gids: Vec<Gid>) -> CtrlerOutput {
        if gids.is_empty() {
            return Err("leave names no group".into());
        }
        let mut next = self.next_config();
        let map = next.groups.make_mut();
        for gid in gids {
            if map.remove(&gid).is_none() {
                return Err(format!("group {gid} is not a member"));
            }
        }
        let remaining: Vec<Gid> = map.keys().copied().collect();
        rebalance(&mut next.shards, &remaining);
        self.push(next)
    }

    fn move_shard(&mut self, shard: u64, gid: Gid) -> CtrlerOutput {
        // The group map is shared with the latest configuration, not copied.
        let mut next = self.next_config();
        let count = next.shards.len();
        let Some(slot) = usize::try_from(shard)
            .ok()
            .and_then(|s| next.shards.get_mut(s))
        else {
            return Err(format!("shard {shard} does not exist (there are {count})"));
        };
        if !next.groups.contains_key(&gid) {
            return Err(format!("group {gid} is not a member"));
        }
        *slot = gid;
        self.push(next)
    }

    /// The snapshot's `history`: each configuration as its change from the one before.
    fn history(&self) -> Vec<pb::Change> {
        let empty = Groups::default();
        let mut before = &empty;
        self.configs
            .iter()
            .map(|config| {
                let change = change(before, config);
                before = &config.groups;
                change
            })
            .collect()
    }

    /// Rebuild the configurations from a snapshot's `history`, sharing what consecutive ones share.
    fn from_history(history: Vec<pb::Change>) -> Result<Vec<Config>, RsmError> {
        let mut groups = Groups::default();
        let mut configs = Vec::with_capacity(history.len());
        for (num, change) in (0u64..).zip(history) {
            if !change.left.is_empty() || !change.joined.is_empty() {
                let map = groups.make_mut();
                for gid in change.left {
                    if map.remove(&gid).is_none() {
                        return Err(RsmError::Decode {
                            what: "controller state",
                            detail: format!(
                                "configuration {num}: group {gid} leaves but is not a member"
                            ),
                        });
                    }
                }
                for group in change.joined {
                    map.insert(group.gid, Servers::from(group.servers));
                }
            }
            configs.push(Config {
                num,
                shards: change.shards,
                groups: groups.clone(),
            });
        }
        Ok(configs)
    }

    /// Rebuild the configurations from a snapshot of the older format (each one in full), sharing
    /// group maps and server lists between consecutive configurations where they are equal.
    fn from_full(full: Vec<pb::Config>) -> Vec<Config> {
        let mut configs: Vec<Config> = Vec::with_capacity(full.len());
        for config in full {
            let before = configs.last().map(|c| c.groups.clone()).unwrap_or_default();
            let map: BTreeMap<Gid, Servers> = config
                .groups
                .into_iter()
                .map(|g| {
                    let servers = match before.get(&g.gid) {
                        Some(same) if **same == *g.servers => same.clone(),
                        _ => Servers::from(g.servers),
                    };
                    (g.gid, servers)
                })
                .collect();
            let groups = if *before == map {
                before
            } else {
                Groups(Arc::new(map))
            };
            configs.push(Config {
                num: config.num,
                shards: config.shards,
                groups,
            });
        }
        configs
    }
}

/// How `config` differs from a configuration with groups `before`. Depends only on the values (never on
/// what happens to be shared), and lists both sides in gid order, so every replica writes the same bytes.
fn change(before: &Groups, config: &Config) -> pb::Change {
    let mut change = pb::Change {
        shards: config.shards.clone(),
        ..pb::Change::default()
    };
    if config.groups.shares_with(before) {
        return change;
    }
    change.left = before
        .keys()
        .filter(|gid| !config.groups.contains_key(gid))
        .copied()
        .collect();
    change.joined = config
        .groups
        .iter()
        .filter(|(gid, servers)| {
            before
                .get(gid)
                .is_none_or(|old| !Arc::ptr_eq(old, servers) && old != *servers)
        })
        .map(|(&gid, servers)| pb::Group {
            gid,
            servers: servers.to_vec(),
        })
        .collect();
    change
}

impl StateMachine for ShardCtrler {
    type Command = CtrlerCommand;
    type Query = CtrlerQuery;
    type Output = CtrlerOutput;

    fn apply(&mut self, command: CtrlerCommand) -> CtrlerOutput {
        match command {
            CtrlerCommand::Join(groups) => self.join(groups),
            CtrlerCommand::Leave(gids) => self.leave(gids),
            CtrlerCommand::Move { shard, gid } => self.move_shard(shard, gid),
        }
    }

    fn query(&self, query: &CtrlerQuery) -> CtrlerOutput {
        Ok(CtrlerAnswer::Config(self.config_or_latest(query.0).clone()))
    }

    fn snapshot(&self) -> Bytes {
        let state = pb::State {
            shards: self.latest().shards.len() as u64,
            configs: Vec::new(),
            history: self.history(),
        };
        Bytes::from(state.encode_to_vec())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        let state = pb::State::decode(data).map_err(|e| decode_error("controller state", e))?;
        let configs = if !state.history.is_empty() {
            Self::from_history(state.history)?
        } else {
            Self::from_full(state.configs)
        };
        if configs.is_empty() {
            return Err(RsmError::Decode {
                what: "controller state",
                detail: "no configurations".into(),
            });
        }
        self.configs = configs;
        Ok(())
    }

    fn encode_command(command: &CtrlerCommand) -> Bytes {
        use pb::command::Op;
        let op = match command {
            CtrlerCommand::Join(groups) => Op::Join(pb::Join {
                groups: groups_to_proto(groups),
            }),
            CtrlerCommand::Leave(gids) => Op::Leave(pb::Leave { gids: gids.clone() }),
            CtrlerCommand::Move { shard, gid } => Op::Move(pb::Move {
                shard: *shard,
                gid: *gid,
            }),
        };
        Bytes::from(pb::Command { op: Some(op) }.encode_to_vec())
    }

    fn decode_command(data: &[u8]) -> Result<CtrlerCommand, RsmError> {
        let command =
            pb::Command::decode(data).map_err(|e| decode_error("controller command", e))?;
        CtrlerCommand::try_from(command)
    }

    fn encode_output(output: &CtrlerOutput) -> Bytes {
        let outcome = match output {
            Ok(CtrlerAnswer::Created(num)) => pb::Outcome {
                created: Some(*num),
                ..pb::Outcome::default()
            },
            Ok(CtrlerAnswer::Config(config)) => pb::Outcome {
                config: Some(config_to_proto(config)),
                ..pb::Outcome::default()
            },
            Err(error) => pb::Outcome {
                error: error.clone(),
                ..pb::Outcome::default()
            },
        };
        Bytes::from(outcome.encode_to_vec())
    }

    fn decode_output(data: &[u8]) -> Result<CtrlerOutput, RsmError> {
        let outcome =
            pb::Outcome::decode(data).map_err(|e| decode_error("controller outcome", e))?;
        Ok(match (outcome.created, outcome.config) {
            _ if !outcome.error.is_empty() => Err(outcome.error),
            (Some(num), _) => Ok(CtrlerAnswer::Created(num)),
            (None, Some(config)) => Ok(CtrlerAnswer::Config(config_from_proto(config))),
            (None, None) => Err(outcome.error),
        })
    }
}

fn decode_error(what: &'static str, e: prost::DecodeError) -> RsmError {
    RsmError::Decode {
        what,
        detail: e.to_string(),
    }
}

fn groups_to_proto<S: AsRef<[String]>>(groups: &BTreeMap<Gid, S>) -> Vec<pb::Group> {
    groups
        .iter()
        .map(|(&gid, servers)| pb::Group {
            gid,
            servers: servers.as_ref().to_vec(),
        })
        .collect()
}

/// Encode a configuration for the wire.
pub fn config_to_proto(config: &Config) -> pb::Config {
    pb::Config {
        num: config.num,
        shards: config.shards.clone(),
        groups: groups_to_proto(&*config.groups),
    }
}

/// Decode a configuration from the wire.
pub fn config_from_proto(config: pb::Config) -> Config {
    Config {
        num: config.num,
        shards: config.shards,
        groups: config
            .groups
            .into_iter()
            .map(|g| (g.gid, g.servers))
            .collect(),
    }
}

/// A controller command from its protobuf: the log entry's decoding and the `Command` RPC's request both
/// go through here, so what the service accepts is exactly what the log can hold.
impl TryFrom<pb::Command> for CtrlerCommand {
    type Error = RsmError;

    fn try_from(command: pb::Command) -> Result<Self, RsmError> {
        use pb::command::Op;
        Ok(
            match command.op.ok_or_else(|| RsmError::Decode {
                what: "controller command",
                detail: "no operation".into(),
            })? {
                Op::Join(join) => CtrlerCommand::Join(
                    join.groups
                        .into_iter()
                        .map(|g| (g.gid, g.servers))
                        .collect(),
                ),
                Op::Leave(leave) => CtrlerCommand::Leave(leave.gids),
                Op::Move(m) => CtrlerCommand::Move {
                    shard: m.shard,
                    gid: m.gid,
                },
            },
        )
    }
}

#[cfg(test)]
mod tests;
