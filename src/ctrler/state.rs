//! The shard controller's state machine: the list of every configuration, changed by Join, Leave and
//! Move, read by Query.

use super::rebalance::rebalance;
use crate::proto::ctrler as pb;
use crate::rsm::{RsmError, StateMachine};
use bytes::Bytes;
use prost::Message as _;
use std::collections::BTreeMap;

/// A replica group id. 0 means "no group".
pub type Gid = u64;

/// The number of shards 6.824 uses; a controller cluster can be created with another count.
pub const DEFAULT_SHARDS: usize = 10;

/// Configuration `num`: who serves each shard, and the servers of every group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Configurations are numbered from 0 (no groups, every shard unassigned).
    pub num: u64,
    /// `shards[i]` is the group serving shard `i` (0: nobody).
    pub shards: Vec<Gid>,
    /// Servers of every group, in the order they were given.
    pub groups: BTreeMap<Gid, Vec<String>>,
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

/// A configuration, or why a command was refused (the same refusal on every replica).
pub type CtrlerOutput = Result<Config, String>;

/// The controller's replicated state.
#[derive(Clone, Debug)]
pub struct ShardCtrler {
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
                groups: BTreeMap::new(),
            }],
        }
    }

    /// The latest configuration.
    pub fn latest(&self) -> &Config {
        // There is always configuration 0.
        &self.configs[self.configs.len() - 1]
    }

    fn next_config(&self) -> Config {
        let mut next = self.latest().clone();
        next.num += 1;
        next
    }

    fn join(&mut self, groups: BTreeMap<Gid, Vec<String>>) -> CtrlerOutput {
        if groups.is_empty() {
            return Err("join names no group".into());
        }
        let mut next = self.next_config();
        for (gid, servers) in groups {
            if gid == 0 {
                return Err("gid 0 is reserved".into());
            }
            if servers.is_empty() {
                return Err(format!("group {gid} has no servers"));
            }
            if next.groups.contains_key(&gid) {
                return Err(format!("group {gid} has already joined"));
            }
            next.groups.insert(gid, servers);
        }
        let gids: Vec<Gid> = next.groups.keys().copied().collect();
        rebalance(&mut next.shards, &gids);
        self.configs.push(next.clone());
        Ok(next)
    }

    fn leave(&mut self, gids: Vec<Gid>) -> CtrlerOutput {
        if gids.is_empty() {
            return Err("leave names no group".into());
        }
        let mut next = self.next_config();
        for gid in gids {
            if next.groups.remove(&gid).is_none() {
                return Err(format!("group {gid} is not a member"));
            }
        }
        let remaining: Vec<Gid> = next.groups.keys().copied().collect();
        rebalance(&mut next.shards, &remaining);
        self.configs.push(next.clone());
        Ok(next)
    }

    fn move_shard(&mut self, shard: u64, gid: Gid) -> CtrlerOutput {
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
        self.configs.push(next.clone());
        Ok(next)
    }
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
        let config = query
            .0
            .and_then(|num| usize::try_from(num).ok())
            .and_then(|num| self.configs.get(num))
            .unwrap_or_else(|| self.latest());
        Ok(config.clone())
    }

    fn snapshot(&self) -> Bytes {
        let state = pb::State {
            shards: self.latest().shards.len() as u64,
            configs: self.configs.iter().map(config_to_proto).collect(),
        };
        Bytes::from(state.encode_to_vec())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        let state = pb::State::decode(data).map_err(|e| decode_error("controller state", e))?;
        if state.configs.is_empty() {
            return Err(RsmError::Decode {
                what: "controller state",
                detail: "no configurations".into(),
            });
        }
        self.configs = state.configs.into_iter().map(config_from_proto).collect();
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
            Ok(config) => pb::Outcome {
                error: String::new(),
                config: Some(config_to_proto(config)),
            },
            Err(error) => pb::Outcome {
                error: error.clone(),
                config: None,
            },
        };
        Bytes::from(outcome.encode_to_vec())
    }

    fn decode_output(data: &[u8]) -> Result<CtrlerOutput, RsmError> {
        let outcome =
            pb::Outcome::decode(data).map_err(|e| decode_error("controller outcome", e))?;
        Ok(match outcome.config {
            Some(config) if outcome.error.is_empty() => Ok(config_from_proto(config)),
            _ => Err(outcome.error),
        })
    }
}

fn decode_error(what: &'static str, e: prost::DecodeError) -> RsmError {
    RsmError::Decode {
        what,
        detail: e.to_string(),
    }
}

fn groups_to_proto(groups: &BTreeMap<Gid, Vec<String>>) -> Vec<pb::Group> {
    groups
        .iter()
        .map(|(&gid, servers)| pb::Group {
            gid,
            servers: servers.clone(),
        })
        .collect()
}

/// Encode a configuration for the wire.
pub fn config_to_proto(config: &Config) -> pb::Config {
    pb::Config {
        num: config.num,
        shards: config.shards.clone(),
        groups: groups_to_proto(&config.groups),
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
