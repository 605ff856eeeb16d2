//! The shard controller's state machine: the list of every configuration, changed by Join, Leave and
//! Move, read by Query.
//!
//! **Bounded history.** Shard groups walk the history one configuration at a time, so a configuration is
//! kept while some group may still ask for it: each group's leader reports the configuration its group
//! has reached ([`CtrlerCommand::Progress`]), and the controller drops every configuration older than
//! the oldest one any group may still need ([`ShardCtrler::floor`]), except the `keep` most recent ones.
//! A group that has never reported needs the configuration before the one it joined in (it owns nothing
//! before, and can jump there, see [`crate::shardkv`]); a group that left is forgotten once it has
//! passed the configuration that removed it. A query for a dropped configuration is answered
//! [`CtrlerAnswer::Compacted`] with the oldest kept.
//!
//! What each kept configuration costs matters too:
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
use std::collections::{BTreeMap, VecDeque};
use std::ops::Deref;
use std::sync::Arc;

/// A replica group id. 0 means "no group".
pub type Gid = u64;

/// The number of shards 6.824 uses; a controller cluster can be created with another count.
pub const DEFAULT_SHARDS: usize = 10;

/// Most shards a controller cluster may be created with. Every configuration holds one gid per
/// shard, travels whole in a `Query` reply and a shard group's log entry beside up to
/// [`MAX_CONFIG_SERVER_BYTES`] of addresses, and the controller's bookkeeping walks shards ×
/// configurations kept: 65,536 × 10 bytes is 640 KiB, well inside the 4 MiB a reply may take.
pub const MAX_SHARDS: usize = 1 << 16;

// The largest configuration fits a reply: its addresses, their framing (3 bytes each at most, and
// every group may list MAX_SERVERS_PER_GROUP), 16 bytes per group and 10 per shard.
const _: () = assert!(
    MAX_CONFIG_SERVER_BYTES
        + 3 * MAX_GROUPS * MAX_SERVERS_PER_GROUP
        + 16 * MAX_GROUPS
        + 10 * MAX_SHARDS
        + (64 << 10)
        < crate::limits::MAX_CLIENT_MESSAGE_BYTES
);

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
    Join {
        /// The joining groups.
        groups: BTreeMap<Gid, Vec<String>>,
        /// The shard count of the controller that proposed it (its `--shards`), stamped by the
        /// proposing service; 0 for unstated (a client's command, or one logged before the stamp
        /// existed). The first configuration change fixes the count from it, so every replica builds
        /// the same configurations whatever its own flag says; see [`ShardCtrler::join`].
        shards: u64,
    },
    /// Remove groups; their shards go to the others.
    Leave(Vec<Gid>),
    /// Give `shard` to `gid`.
    Move {
        /// The shard.
        shard: u64,
        /// The group that gets it.
        gid: Gid,
    },
    /// Group `gid`'s servers are now `servers` (its Raft membership changed); the shards stay where
    /// they are. The same list again changes nothing and answers with the latest configuration.
    Servers {
        /// A joined group.
        gid: Gid,
        /// Its servers, as a Join names them.
        servers: Vec<String>,
        /// Refused unless these are its servers now (`None`: whatever they are).
        expected: Option<Vec<String>>,
    },
    /// Group `gid` has reached configuration `num`: configurations it can no longer ask for may go.
    Progress {
        /// The reporting group (the service checks the caller's certificate names it).
        gid: Gid,
        /// The configuration the group is at.
        num: u64,
        /// Most recent configurations kept regardless ([`DEFAULT_KEEP_CONFIGS`]); stamped by the
        /// proposing service from its own flag, so all replicas drop the same ones.
        keep: u64,
    },
}

/// How a refused conditional [`CtrlerCommand::Servers`] begins, so a client can tell it from other
/// refusals and read the list again.
pub const SERVERS_CHANGED: &str = "conflict:";

/// Configurations kept whatever the groups report, unless the leader's `--keep-configs` says otherwise:
/// enough for an operator to look back a while (`kvctl ctrler query N`).
pub const DEFAULT_KEEP_CONFIGS: u64 = 100;

/// A read: configuration `num`, or the latest for `None` or a number not reached yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlerQuery(pub Option<u64>);

/// What the controller answers. Commands answer with a number so that the session table, which keeps
/// every client's last output, holds a few bytes per client rather than a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlerAnswer {
    /// A command made configuration `num` (read it with [`ShardCtrler::config`]; a configuration
    /// is dropped only once every group has passed it, long after the command that made it answered).
    Created(u64),
    /// The configuration a query asked for (or, restored from a session table of the older format, the
    /// one a command made).
    Config(Config),
    /// A progress report was recorded; `oldest` is the oldest configuration kept afterwards.
    Recorded {
        /// The oldest configuration kept.
        oldest: u64,
    },
    /// The configuration a query asked for was dropped; `oldest` is the oldest kept. A group that owns
    /// nothing may jump there ([`crate::shardkv`]); anybody else learns the history is gone.
    Compacted {
        /// The oldest configuration kept.
        oldest: u64,
    },
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

/// One joining group: not gid 0 (a shard nobody owns) nor [`Gid::MAX`] (a shard group's mark for a
/// copy any group may take), 1 to [`MAX_SERVERS_PER_GROUP`] servers, each address 1 to
/// [`MAX_ADDRESS_BYTES`] bytes.
pub fn check_group(gid: Gid, servers: &[String]) -> Result<(), String> {
    if gid == 0 || gid == Gid::MAX {
        return Err(format!("gid {gid} is reserved"));
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

/// What the controller knows of one group's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    /// The oldest configuration the group may still ask for: the one it reported, or for a group that
    /// has not reported since it joined, the one before it joined in (it owns nothing before that, so it
    /// can jump there from wherever it is).
    needs: u64,
    /// The configuration that removed the group, if it has left.
    left: Option<u64>,
}

impl Member {
    /// A group that has left and passed the configuration that removed it asks for nothing old: it owns
    /// nothing in any configuration after, so it jumps over dropped ones.
    fn done(&self) -> bool {
        self.left.is_some_and(|left| self.needs >= left)
    }
}

/// The controller's replicated state.
#[derive(Clone, Debug)]
pub struct ShardCtrler {
    /// The configurations kept, oldest first, `configs[i].num == first + i`; never empty.
    configs: VecDeque<Config>,
    /// What each group may still ask for; groups that left and are done are forgotten.
    members: BTreeMap<Gid, Member>,
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
            configs: VecDeque::from([Config {
                num: 0,
                shards: vec![0; shards],
                groups: Groups::default(),
            }]),
            members: BTreeMap::new(),
        }
    }

    /// Make the shard count `shards` (a Join's stamp; 0: unstated) the cluster's if no configuration
    /// change has fixed it yet, or refuse a Join proposed by a controller started with another count.
    ///
    /// Why: `--shards` is every controller's own flag, and `key → shard` is a hash modulo the count.
    /// A replica started with another count that replays the log from the start would build other
    /// configurations than its peers; a group given configurations of another count would look for
    /// every stored key in the wrong shard. Taking the count from the log makes the first Join's
    /// proposer decide it once for all replicas; later Joins from a controller that disagrees are
    /// refused with what to fix, the same way on every replica.
    fn fix_shard_count(&mut self, shards: u64) -> Result<(), String> {
        let current = self.latest().shards.len() as u64;
        if shards == 0 || shards == current {
            return Ok(());
        }
        if self.latest().num == 0 {
            if shards > MAX_SHARDS as u64 {
                return Err(format!(
                    "{shards} shards asked, at most {MAX_SHARDS} allowed"
                ));
            }
            *self = ShardCtrler::new(shards as usize);
            return Ok(());
        }
        Err(format!(
            "the controller that took this join runs with --shards {shards}, but the cluster's \
             configurations have {current} shards (fixed by its first join): restart it with \
             --shards {current}"
        ))
    }

    /// The configuration group `gid` joined in, if it has given the group shards and the group has
    /// not reported reaching it since: the group never ran, or runs somewhere its addresses do not
    /// lead. The shards it was given wait for it, frozen at their previous owners, and a Leave would
    /// not release them (see [`super::admission`]).
    pub fn never_took_its_shards(&self, gid: Gid) -> Option<u64> {
        let member = self.members.get(&gid)?;
        if member.left.is_some() || self.config(member.needs)?.groups.contains_key(&gid) {
            return None;
        }
        let joined = member.needs + 1;
        let given = (joined..=self.latest().num)
            .filter_map(|num| self.config(num))
            .any(|config| config.shards.contains(&gid));
        given.then_some(joined)
    }

    /// The groups that left and still hand off what they held: each gid, the configuration that
    /// removed it and the servers it had then. Their new owners pull from those servers under their
    /// gid, so those servers are still theirs (see [`super::admission`]).
    pub fn handing_off(&self) -> impl Iterator<Item = (Gid, u64, Servers)> + '_ {
        self.members.iter().filter_map(|(&gid, member)| {
            let left = member.left?;
            let before = self.config(left.checked_sub(1)?)?;
            Some((gid, left, before.groups.get(&gid)?.clone()))
        })
    }

    /// The latest configuration.
    pub fn latest(&self) -> &Config {
        // The latest configuration is never dropped.
        &self.configs[self.configs.len() - 1]
    }

    /// The oldest configuration kept.
    pub fn oldest(&self) -> u64 {
        self.configs[0].num
    }

    /// Configuration `num`, if it was made and is still kept.
    pub fn config(&self, num: u64) -> Option<&Config> {
        let index = num.checked_sub(self.oldest())?;
        usize::try_from(index)
            .ok()
            .and_then(|i| self.configs.get(i))
    }

    /// What a query for `num` reads: configuration `num`, or the latest for `None` or a number not
    /// reached yet; `Err(oldest kept)` for a configuration that was dropped.
    pub fn config_or_latest(&self, num: Option<u64>) -> Result<&Config, u64> {
        match num {
            Some(n) if n < self.oldest() => Err(self.oldest()),
            _ => Ok(num
                .and_then(|n| self.config(n))
                .unwrap_or_else(|| self.latest())),
        }
    }

    /// The number of configurations kept (what [`CtrlerCommand::Progress`] bounds).
    pub fn kept(&self) -> usize {
        self.configs.len()
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
        self.configs.push_back(next);
        Ok(CtrlerAnswer::Created(num))
    }

    /// Record that group `gid` has reached configuration `num`, then drop what no group needs.
    fn progress(&mut self, gid: Gid, num: u64, keep: u64) -> CtrlerOutput {
        let latest = self.latest().num;
        if num > latest {
            return Err(format!(
                "group {gid} reports configuration {num}, but the latest is {latest}"
            ));
        }
        // A group forgotten after leaving (or never known) has nothing to report: it needs nothing.
        if let Some(member) = self.members.get_mut(&gid) {
            member.needs = member.needs.max(num);
            if member.done() {
                self.members.remove(&gid);
            }
        }
        let floor = self.floor(keep);
        while self.oldest() < floor {
            self.configs.pop_front();
        }
        Ok(CtrlerAnswer::Recorded {
            oldest: self.oldest(),
        })
    }

    /// The oldest configuration that must be kept: the `keep` most recent, every one a group may still
    /// ask for, and for a shard nobody owns around that point, back to the configuration that last gave
    /// it an owner (the group that adopts the shard walks back to it to find the frozen copy).
    pub fn floor(&self, keep: u64) -> u64 {
        let oldest = self.oldest();
        let mut floor = self.latest().num.saturating_sub(keep);
        for member in self.members.values() {
            floor = floor.min(member.needs);
        }
        let unowned = |num: u64, shard: usize| {
            self.config(num)
                .is_some_and(|c| c.shards.get(shard).is_some_and(|&g| g == 0))
        };
        let shards = self.latest().shards.len();
        loop {
            let mut lowered = false;
            for shard in 0..shards {
                if floor <= oldest {
                    return oldest;
                }
                // A group gaining a shard in `floor` from nobody walks back from `floor - 1` (but
                // nobody does in configuration 1: every shard starts empty there).
                if unowned(floor, shard) || (floor >= 2 && unowned(floor - 1, shard)) {
                    let mut owner = floor - 1;
                    while owner > oldest && unowned(owner, shard) {
                        owner -= 1;
                    }
                    floor = owner;
                    lowered = true;
                }
            }
            if !lowered {
                return floor.max(oldest);
            }
        }
    }

    /// Add `groups`, proposed by a controller with `shards` shards (0: unstated).
    fn join(&mut self, groups: BTreeMap<Gid, Vec<String>>, shards: u64) -> CtrlerOutput {
        check_join(&groups)?;
        self.fix_shard_count(shards)?;
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
            // A group still handing off what it had before it left keeps needing that; a new one
            // owns nothing before `next` and can start from the configuration before it.
            let needs = next.num - 1;
            self.members
                .entry(gid)
                .and_modify(|member| member.left = None)
                .or_insert(Member { needs, left: None });
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
        for &gid in &gids {
            if map.remove(&gid).is_none() {
                return Err(format!("group {gid} is not a member"));
            }
        }
        for gid in gids {
            let needs = self.members.get(&gid).map_or(next.num - 1, |m| m.needs);
            self.members.insert(
                gid,
                Member {
                    needs,
                    left: Some(next.num),
                },
            );
        }
        let remaining: Vec<Gid> = map.keys().copied().collect();
        rebalance(&mut next.shards, &remaining);
        self.push(next)
    }

    fn set_servers(
        &mut self,
        gid: Gid,
        servers: Vec<String>,
        expected: Option<Vec<String>>,
    ) -> CtrlerOutput {
        check_group(gid, &servers)?;
        let latest = self.latest();
        let Some(old) = latest.groups.get(&gid) else {
            return Err(format!("group {gid} is not a member"));
        };
        if **old == *servers {
            return Ok(CtrlerAnswer::Created(latest.num));
        }
        if expected.is_some_and(|e| **old != *e) {
            return Err(format!(
                "{SERVERS_CHANGED} group {gid}'s servers changed meanwhile (now {})",
                old.join(",")
            ));
        }
        let bytes = latest.groups.address_bytes() - address_bytes(old) + address_bytes(&servers);
        if bytes > MAX_CONFIG_SERVER_BYTES {
            return Err(format!(
                "the configuration's server addresses would take {bytes} bytes, more than {MAX_CONFIG_SERVER_BYTES}"
            ));
        }
        let mut next = self.next_config();
        next.groups.make_mut().insert(gid, Servers::from(servers));
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

    /// Rebuild the configurations from a snapshot's `history` (the first is configuration `first`),
    /// sharing what consecutive ones share.
    fn from_history(history: Vec<pb::Change>, first: u64) -> Result<Vec<Config>, RsmError> {
        let mut groups = Groups::default();
        let mut configs = Vec::with_capacity(history.len());
        for (num, change) in (first..).zip(history) {
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

    /// What a snapshot written before progress reports were kept implies of each group: it needs what it
    /// needed when it last joined (nothing older than the configuration before), and nothing is known of
    /// how far it got, so nothing it might ask for is dropped until it reports.
    fn members_from_history(configs: &[Config]) -> BTreeMap<Gid, Member> {
        let mut members = BTreeMap::new();
        let mut before: Option<&Config> = None;
        for config in configs {
            for &gid in config.groups.keys() {
                if before.is_none_or(|b| !b.groups.contains_key(&gid)) {
                    let needs = config.num.saturating_sub(1);
                    members
                        .entry(gid)
                        .and_modify(|m: &mut Member| m.left = None)
                        .or_insert(Member { needs, left: None });
                }
            }
            if let Some(before) = before {
                for &gid in before.groups.keys() {
                    if !config.groups.contains_key(&gid) {
                        if let Some(member) = members.get_mut(&gid) {
                            member.left = Some(config.num);
                        }
                    }
                }
            }
            before = Some(config);
        }
        members
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
            CtrlerCommand::Join { groups, shards } => self.join(groups, shards),
            CtrlerCommand::Leave(gids) => self.leave(gids),
            CtrlerCommand::Move { shard, gid } => self.move_shard(shard, gid),
            CtrlerCommand::Servers {
                gid,
                servers,
                expected,
            } => self.set_servers(gid, servers, expected),
            CtrlerCommand::Progress { gid, num, keep } => self.progress(gid, num, keep),
        }
    }

    fn query(&self, query: &CtrlerQuery) -> CtrlerOutput {
        Ok(match self.config_or_latest(query.0) {
            Ok(config) => CtrlerAnswer::Config(config.clone()),
            Err(oldest) => CtrlerAnswer::Compacted { oldest },
        })
    }

    fn snapshot(&self) -> Bytes {
        let state = pb::State {
            shards: self.latest().shards.len() as u64,
            configs: Vec::new(),
            history: self.history(),
            first: self.oldest(),
            members: self
                .members
                .iter()
                .map(|(&gid, m)| pb::Member {
                    gid,
                    needs: m.needs,
                    left: m.left,
                })
                .collect(),
        };
        Bytes::from(state.encode_to_vec())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        let state = pb::State::decode(data).map_err(|e| decode_error("controller state", e))?;
        let configs = if !state.history.is_empty() {
            Self::from_history(state.history, state.first)?
        } else {
            Self::from_full(state.configs)
        };
        if configs.is_empty() {
            return Err(RsmError::Decode {
                what: "controller state",
                detail: "no configurations".into(),
            });
        }
        if let Some(gap) = configs.windows(2).find(|w| w[1].num != w[0].num + 1) {
            return Err(RsmError::Decode {
                what: "controller state",
                detail: format!(
                    "configuration {} follows configuration {}",
                    gap[1].num, gap[0].num
                ),
            });
        }
        self.members = if state.members.is_empty() && state.first == 0 {
            Self::members_from_history(&configs)
        } else {
            state
                .members
                .into_iter()
                .map(|m| {
                    (
                        m.gid,
                        Member {
                            needs: m.needs,
                            left: m.left,
                        },
                    )
                })
                .collect()
        };
        self.configs = configs.into();
        Ok(())
    }

    fn encode_command(command: &CtrlerCommand) -> Bytes {
        use pb::command::Op;
        let op = match command {
            CtrlerCommand::Join { groups, shards } => Op::Join(pb::Join {
                groups: groups_to_proto(groups),
                shards: *shards,
            }),
            CtrlerCommand::Leave(gids) => Op::Leave(pb::Leave { gids: gids.clone() }),
            CtrlerCommand::Move { shard, gid } => Op::Move(pb::Move {
                shard: *shard,
                gid: *gid,
            }),
            CtrlerCommand::Servers {
                gid,
                servers,
                expected,
            } => Op::Servers(pb::Servers {
                group: Some(pb::Group {
                    gid: *gid,
                    servers: servers.clone(),
                }),
                expected: expected.clone().unwrap_or_default(),
            }),
            CtrlerCommand::Progress { gid, num, keep } => Op::Progress(pb::Progress {
                gid: *gid,
                num: *num,
                keep: *keep,
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
            Ok(CtrlerAnswer::Recorded { oldest }) => pb::Outcome {
                oldest_kept: Some(*oldest),
                ..pb::Outcome::default()
            },
            Ok(CtrlerAnswer::Compacted { oldest }) => pb::Outcome {
                oldest_kept: Some(*oldest),
                compacted: true,
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
            (None, None) if outcome.oldest_kept.is_some() => {
                let oldest = outcome.oldest_kept.unwrap_or_default();
                Ok(if outcome.compacted {
                    CtrlerAnswer::Compacted { oldest }
                } else {
                    CtrlerAnswer::Recorded { oldest }
                })
            }
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
                Op::Join(join) => CtrlerCommand::Join {
                    groups: join
                        .groups
                        .into_iter()
                        .map(|g| (g.gid, g.servers))
                        .collect(),
                    shards: join.shards,
                },
                Op::Leave(leave) => CtrlerCommand::Leave(leave.gids),
                Op::Move(m) => CtrlerCommand::Move {
                    shard: m.shard,
                    gid: m.gid,
                },
                Op::Servers(s) => {
                    let group = s.group.ok_or_else(|| RsmError::Decode {
                        what: "controller command",
                        detail: "a server list names no group".into(),
                    })?;
                    CtrlerCommand::Servers {
                        gid: group.gid,
                        servers: group.servers,
                        expected: (!s.expected.is_empty()).then_some(s.expected),
                    }
                }
                Op::Progress(p) => CtrlerCommand::Progress {
                    gid: p.gid,
                    num: p.num,
                    keep: p.keep,
                },
            },
        )
    }
}

#[cfg(test)]
mod tests;
