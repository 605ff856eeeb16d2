//! The replicated state of one shard group: the shards it owns, the configuration it is at, the shards
//! it gave away and has not yet been told to delete, and the shards it received whose previous owner
//! has not yet confirmed deleting them.
//!
//! Everything that changes ownership goes through the group's log, so every replica moves through the
//! same configurations at the same log positions:
//! - `NextConfig(n+1)` is applied only when the group is at `n` and holds every shard it owns in `n`
//!   (configurations are taken one at a time, in order). Shards kept keep serving; shards lost are
//!   frozen into `outgoing`; shards gained become *pulling* until their data arrives. The one exception
//!   is a *jump* ([`ShardKv::can_jump_to`]): a group that owns nothing may go straight to a later
//!   configuration that gives it nothing, because the controllers drop configurations no group needs
//!   and a new group (or one that left) must not depend on them;
//! - `Install` adds one page (about [`PAGE_BYTES`](super::PAGE_BYTES), see [`super::page`]) of a
//!   pulling shard at the group's cursor: its keys in key order, then its previous owner's dedup records
//!   in client order (so exactly-once survives the move); the final page makes the shard serve — each
//!   shard as soon as all of it, records included, has arrived, independently of the others;
//! - `Pull` serves a page of a frozen copy through the log, so the old owner's replicas agree when its
//!   final page went out; `DropOutgoing` deletes a frozen copy only after that, and only when asked by
//!   the group the configuration gave the shard to (no forged or early delete can lose a shard);
//!   `Confirmed` ends the new owner's duty to tell the old one.
//!
//! Client commands carry (client, seq) and are filtered per shard: the dedup records live in the shard
//! and travel with it, which is why this machine keeps them itself (`SESSIONS = false`).

use super::key_to_shard;
use super::page::{Cursor, ShardPage};
use super::wire;
use crate::ctrler::{Config, Gid};
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::rsm::sessions::{LogClock, Lookup, Owner, SessionTable};
use crate::rsm::{ClientId, RsmError, Seq, StateMachine};
use bytes::Bytes;
use std::collections::BTreeMap;

/// A shard number.
pub type ShardId = u64;

/// A shard's contents: keys and per-client dedup records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardData {
    /// The configuration in which the shard changed owner.
    pub config_num: u64,
    /// The shard.
    pub shard: ShardId,
    /// Its keys and values.
    pub data: KvStore,
    /// Each client's last applied request on this shard and its output, expiring like every session
    /// table (see [`crate::rsm::sessions`]).
    pub dedup: Dedup,
}

/// A shard's dedup records.
pub type Dedup = SessionTable<KvOutput>;

/// Where a gained shard comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The previous owner.
    pub gid: Gid,
    /// Its servers, as the configuration lists them.
    pub servers: Vec<String>,
}

/// A shard given away and not yet deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Frozen {
    /// The copy, as it was when the shard was given away.
    pub(super) contents: ShardData,
    /// The group the configuration gave it to; [`UNKNOWN_OWNER`] while nobody has it (every group had
    /// left), until a later configuration gives it to the group that will adopt it.
    pub(super) to: Gid,
    /// Whether the final page has been served (through the log): only then may the copy go.
    pub(super) served: bool,
}

impl Frozen {
    /// Why `by` (the calling group, `None` when callers are not authenticated) may not take this copy
    /// now: `NotReady` while no configuration this group has reached names its new owner (every group
    /// had left; the adopter asks again once this group has caught up — answering anybody would let any
    /// group take, then delete, the only copy), `NotOwner` for a group that is not the new owner.
    fn refusal(&self, by: Option<Gid>) -> Option<ShardOutput> {
        match by {
            _ if self.to == ANY_GROUP => None,
            _ if self.to == UNKNOWN_OWNER => Some(ShardOutput::NotReady),
            Some(gid) if gid != self.to => Some(ShardOutput::NotOwner(self.to)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Owned {
    /// `Some` while the data has not arrived from the previous owner.
    pub(super) pulling: Option<Source>,
    /// While pulling: where the transfer stands (the last key, then the last client's record,
    /// installed so far); the next page starts after it.
    pub(super) cursor: Cursor,
    /// The shard's data (complete once it serves).
    pub(super) contents: ShardData,
}

/// A change to a shard group's state (one log entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardCommand {
    /// A client's mutation, numbered for exactly-once.
    Client {
        /// The client.
        client: ClientId,
        /// Its request number.
        seq: Seq,
        /// Who sent it ([`crate::rsm::sessions::Owner`]): a shard's dedup record answers only the
        /// identity that opened it.
        owner: Owner,
        /// The mutation.
        command: KvCommand,
    },
    /// Move to this configuration (must be the next one).
    NextConfig(Config),
    /// A page of a shard pulled from its previous owner.
    Install(ShardPage),
    /// Serve the page after `after` of the shard given away in `config_num` to group `by`; the final
    /// page marks the copy served. A command, not a read, so that "the final page went out" is in the
    /// log and every replica (and every later leader) knows a delete may now be honoured.
    Pull {
        /// The configuration in which the shard moved.
        config_num: u64,
        /// The shard.
        shard: ShardId,
        /// Where the puller stands (`Cursor::Keys(None)`: it has nothing yet).
        after: Cursor,
        /// The group asking, as its certificate says (`None`: callers are not authenticated).
        by: Option<Gid>,
        /// The puller takes the dedup records in pages after the keys. False in entries and requests of
        /// versions before session pages, which are served every record on the page ending the keys.
        session_pages: bool,
    },
    /// The new owner has the shard given away in `config_num`: delete the frozen copy (only if `by` is
    /// that owner and the final page was served).
    DropOutgoing {
        /// The configuration in which the shard moved.
        config_num: u64,
        /// The shard.
        shard: ShardId,
        /// The group asking, as its certificate says (`None`: callers are not authenticated).
        by: Option<Gid>,
    },
    /// Where a shard this group gained from nobody (every group had left) really is: the group that last
    /// owned it froze it in configuration `config_num` (`source` `None`: nobody ever owned it, it starts
    /// empty).
    Adopt {
        /// The shard.
        shard: ShardId,
        /// The configuration in which its last owner gave it up.
        config_num: u64,
        /// That owner.
        source: Option<Source>,
    },
    /// The previous owner deleted its copy of a shard installed here.
    Confirmed {
        /// The configuration in which the shard moved.
        config_num: u64,
        /// The shard.
        shard: ShardId,
    },
}

/// A read of a shard group's state (answered after a ReadIndex, not logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardQuery {
    /// A client's read of one key.
    Get(String),
}

/// What a shard group's command or query returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardOutput {
    /// A client operation's result.
    Kv(KvOutput),
    /// The key's shard is not served here (not owned in the current configuration, or not arrived yet).
    WrongGroup,
    /// An internal command that did not apply (already applied, or not yet applicable).
    Ignored,
    /// The page of a frozen shard a `Pull` asked for.
    Pulled(ShardPage),
    /// The group has not reached the configuration a `Pull` names, or has not deleted a copy yet.
    NotReady,
    /// The frozen copy is gone (answer to `DropOutgoing`, also when it was gone already).
    Dropped,
    /// The caller of a `Pull` or `DropOutgoing` is not the group the shard was given to (this one).
    NotOwner(Gid),
    /// A client command not applied because the client's session on this shard had been dropped; new
    /// client ids must be above this one.
    SessionExpired(ClientId),
}

/// Work only the group's leader can start: each item is a request to another service, whose answer
/// becomes a command proposed to this group. Computed from the replicated state, so a new leader picks
/// up where the old one stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Duty {
    /// Ask the controller for configuration `num`; if it exists, propose `NextConfig`.
    FetchConfig {
        /// The configuration wanted (current + 1).
        num: u64,
    },
    /// Pull the next page of `shard` from `from`; propose `Install` with what it returns.
    Pull {
        /// The configuration in which the shard moved here.
        config_num: u64,
        /// The shard.
        shard: ShardId,
        /// Where the transfer stands: the next page starts after it.
        after: Cursor,
        /// The previous owner.
        from: Source,
    },
    /// The group gained `shard` from nobody: every group had left, so its data is frozen at the group
    /// that owned it last. Find that group in the controller's history (configurations before
    /// `before`) with [`last_owner`] and propose `Adopt`.
    FindOwner {
        /// The shard.
        shard: ShardId,
        /// The configuration that gave the shard to this group.
        before: u64,
    },
    /// Tell `to` it may delete its copy of `shard`; once it says the copy is gone, propose `Confirmed`.
    Delete {
        /// The configuration in which the shard moved here.
        config_num: u64,
        /// The shard.
        shard: ShardId,
        /// The previous owner.
        to: Source,
    },
}

/// A transfer the state decides on its own ([`ShardKv::transfer_settled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The configuration was reached and the copy is not held: deleted, or never this group's. A
    /// pull is answered "not ready" (whoever asks is behind), a delete "done".
    Absent,
    /// The copy was given to this other group.
    NotOwner(Gid),
}

/// A shard group's replicated state. See the module documentation.
#[derive(Clone, Debug)]
pub struct ShardKv {
    pub(super) gid: Gid,
    pub(super) config: Config,
    pub(super) shards: BTreeMap<ShardId, Owned>,
    pub(super) outgoing: BTreeMap<(u64, ShardId), Frozen>,
    pub(super) confirms: BTreeMap<(u64, ShardId), Source>,
    /// The log's clock as of the command being applied (dedup records expire by it).
    pub(super) clock: LogClock,
}

impl ShardKv {
    /// The empty state of group `gid`, at configuration 0 (which assigns nothing to anybody).
    pub fn new(gid: Gid) -> Self {
        ShardKv {
            gid,
            config: Config::default(),
            shards: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            confirms: BTreeMap::new(),
            clock: LogClock::default(),
        }
    }

    /// This group's id.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The configuration the group is at.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Shards owned and served now.
    pub fn serving(&self) -> Vec<ShardId> {
        self.shards
            .iter()
            .filter(|(_, o)| o.pulling.is_none())
            .map(|(&s, _)| s)
            .collect()
    }

    /// Shards owned in the current configuration whose data has not arrived.
    pub fn pulling(&self) -> Vec<ShardId> {
        self.shards
            .iter()
            .filter(|(_, o)| o.pulling.is_some())
            .map(|(&s, _)| s)
            .collect()
    }

    /// Shards installed whose previous owner has not yet confirmed deleting its copy, as
    /// (configuration, shard): the group keeps asking it. While any is listed, the previous owner's
    /// servers are needed (they hold the copy), and stopping them for good leaves the copy there.
    pub fn confirming(&self) -> Vec<(u64, ShardId)> {
        self.confirms.keys().copied().collect()
    }

    /// Frozen copies of given-away shards still held, as (configuration, shard).
    pub fn outgoing(&self) -> Vec<(u64, ShardId)> {
        self.outgoing.keys().copied().collect()
    }

    /// What a Pull or Delete of the copy of `shard` given away in `config_num`, asked by `by`, gets
    /// that the state alone already decides, so that the transfer service answers it without a log
    /// entry: a caller repeating settled requests (a copy long deleted, or never held) fills
    /// nothing. Only answers no later state can change are given here, so a lagging replica or one
    /// that no longer leads gives them as rightly as the leader.
    pub fn transfer_settled(
        &self,
        config_num: u64,
        shard: ShardId,
        by: Option<Gid>,
    ) -> Option<Settled> {
        if config_num > self.config.num {
            // Not decided here: this replica may lag, or not lead (the log's answer sends the
            // caller on to the leader).
            return None;
        }
        let Some(frozen) = self.outgoing.get(&(config_num, shard)) else {
            // Copies are made only as their configuration is applied, and this one was: deleted
            // once its new owner had it, or never this group's. It never appears again.
            return Some(Settled::Absent);
        };
        match frozen.refusal(by) {
            Some(ShardOutput::NotOwner(owner)) => Some(Settled::NotOwner(owner)),
            _ => None,
        }
    }

    /// Number of keys in the shards served and held.
    pub fn keys(&self) -> usize {
        self.shards.values().map(|o| o.contents.data.len()).sum()
    }

    /// What the leader should do next. While any gained shard is missing, the group stays at its
    /// configuration and pulls; otherwise it looks for the next configuration.
    pub fn duties(&self) -> Vec<Duty> {
        let mut duties: Vec<Duty> = self
            .shards
            .iter()
            .filter_map(|(&shard, owned)| {
                owned.pulling.as_ref().map(|from| match from.gid {
                    UNKNOWN_OWNER => Duty::FindOwner {
                        shard,
                        before: self.config.num,
                    },
                    _ => Duty::Pull {
                        config_num: owned.contents.config_num,
                        shard,
                        after: owned.cursor.clone(),
                        from: from.clone(),
                    },
                })
            })
            .collect();
        if duties.is_empty() {
            duties.push(Duty::FetchConfig {
                num: self.config.num + 1,
            });
        }
        duties.extend(
            self.confirms
                .iter()
                .map(|(&(config_num, shard), to)| Duty::Delete {
                    config_num,
                    shard,
                    to: to.clone(),
                }),
        );
        duties
    }

    fn serving_shard(&mut self, key: &str) -> Option<&mut ShardData> {
        let shard = key_to_shard(key, self.config.shards.len());
        self.shards
            .get_mut(&shard)
            .filter(|o| o.pulling.is_none())
            .map(|o| &mut o.contents)
    }

    fn apply_client(
        &mut self,
        client: ClientId,
        seq: Seq,
        owner: Owner,
        command: KvCommand,
    ) -> ShardOutput {
        let clock = self.clock;
        // The quota bounds the group's whole store: every shard it holds, whole or still arriving.
        let quota = clock.policy.map_or(0, |policy| policy.quota_bytes);
        let held = match quota {
            0 => 0,
            _ => self.shards.values().map(|o| o.contents.data.bytes()).sum(),
        };
        let Some(shard) = self.serving_shard(command.key()) else {
            return ShardOutput::WrongGroup;
        };
        if !clock.plausible(client) {
            return ShardOutput::SessionExpired(shard.dedup.evicted_max());
        }
        match shard.dedup.lookup(client, seq, owner) {
            // A retry of an applied request (its output) or of an older one (the client gave up on it
            // long ago; nothing to apply).
            Lookup::Repeat(output) | Lookup::Stale(output) => {
                return ShardOutput::Kv(output.clone())
            }
            Lookup::Expired(mark) => return ShardOutput::SessionExpired(mark),
            Lookup::New => {}
        }
        let output = shard.data.apply_within(command, held, quota);
        shard
            .dedup
            .record(client, seq, owner, output.remembered(), &clock);
        ShardOutput::Kv(output)
    }

    /// Whether the group may go from its configuration straight to `next`, skipping those between
    /// (the controllers dropped them): only when it owns no shard now, gains none in `next`, and holds
    /// no copy waiting for a configuration to name its taker. Then no configuration in between can
    /// concern it — the controllers drop a configuration only once every group that owned anything in
    /// it has passed it (see [`crate::ctrler::ShardCtrler::floor`]) — and stepping through them would
    /// change nothing.
    pub fn can_jump_to(&self, next: &Config) -> bool {
        next.num > self.config.num + 1
            && self.shards.is_empty()
            && !next.shards.contains(&self.gid)
            && self.outgoing.values().all(|f| f.to != UNKNOWN_OWNER)
    }

    /// Whether `next` splits keys into another number of shards than the group's configurations do
    /// (configuration 0, which no group serves under, excepted). Such a configuration comes only from
    /// a controller started with another `--shards`; following it would look for every stored key in
    /// another shard, so the group's driver does not propose it ([`super::migration::command`]) and
    /// the group stays where it is. Checked before proposing, not when applying: a log written by an
    /// older build that applied one must replay as it applied.
    pub fn changes_shard_count(&self, next: &Config) -> bool {
        self.config.num > 0 && next.shards.len() != self.config.shards.len()
    }

    fn apply_next_config(&mut self, next: Config) -> ShardOutput {
        let step = next.num == self.config.num + 1 && self.pulling().is_empty();
        if !step && !self.can_jump_to(&next) {
            return ShardOutput::Ignored;
        }
        for (shard, &new_owner) in next.shards.iter().enumerate() {
            let shard = shard as ShardId;
            let old_owner = self.config.shards.get(shard as usize).copied().unwrap_or(0);
            let (had, has) = (old_owner == self.gid, new_owner == self.gid);
            if had && !has {
                if let Some(mut owned) = self.shards.remove(&shard) {
                    owned.contents.config_num = next.num;
                    let frozen = Frozen {
                        contents: owned.contents,
                        to: new_owner,
                        served: false,
                    };
                    self.outgoing.insert((next.num, shard), frozen);
                }
            } else if has && !had {
                // From nobody: at configuration 1 every shard starts empty; later, nobody owning a
                // shard means every group had left, and its data waits frozen at its last owner.
                let pulling = match (old_owner, next.num) {
                    (0, 1) => None,
                    (0, _) => Some(Source {
                        gid: UNKNOWN_OWNER,
                        servers: Vec::new(),
                    }),
                    _ => Some(Source {
                        gid: old_owner,
                        servers: self
                            .config
                            .groups
                            .get(&old_owner)
                            .map(|s| s.to_vec())
                            .unwrap_or_default(),
                    }),
                };
                let contents = ShardData {
                    config_num: next.num,
                    shard,
                    ..ShardData::default()
                };
                self.shards.insert(
                    shard,
                    Owned {
                        pulling,
                        cursor: Cursor::default(),
                        contents,
                    },
                );
            }
        }
        // A copy given to nobody goes to the first group a later configuration gives the shard to:
        // that group finds it here through the history (`FindOwner`) and is its only rightful taker.
        for (&(_, shard), frozen) in self.outgoing.iter_mut() {
            if frozen.to == UNKNOWN_OWNER {
                frozen.to = next.shards.get(shard as usize).copied().unwrap_or(0);
            }
        }
        self.config = next;
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: None,
            elided: false,
            over_quota: false,
        })
    }

    /// Serve a page of a frozen copy to `by` (see [`ShardCommand::Pull`]).
    fn apply_pull(
        &mut self,
        config_num: u64,
        shard: ShardId,
        after: Cursor,
        by: Option<Gid>,
        session_pages: bool,
    ) -> ShardOutput {
        if config_num > self.config.num {
            return ShardOutput::NotReady;
        }
        let Some(frozen) = self.outgoing.get_mut(&(config_num, shard)) else {
            // Deleted: the new owner confirmed it has it, so whoever asks is behind.
            return ShardOutput::NotReady;
        };
        if let Some(refusal) = frozen.refusal(by) {
            return refusal;
        }
        let page = ShardPage::cut(&frozen.contents, config_num, after, session_pages);
        frozen.served |= page.last;
        ShardOutput::Pulled(page)
    }

    /// Delete a frozen copy for `by` (see [`ShardCommand::DropOutgoing`]). Idempotent: a copy already
    /// gone answers `Dropped` again.
    fn apply_drop(&mut self, config_num: u64, shard: ShardId, by: Option<Gid>) -> ShardOutput {
        if config_num > self.config.num {
            return ShardOutput::NotReady;
        }
        let Some(frozen) = self.outgoing.get(&(config_num, shard)) else {
            return ShardOutput::Dropped;
        };
        if let Some(refusal) = frozen.refusal(by) {
            return refusal;
        }
        if !frozen.served {
            // Nobody has had the final page: whoever asks cannot have installed the shard.
            return ShardOutput::NotReady;
        }
        self.outgoing.remove(&(config_num, shard));
        ShardOutput::Dropped
    }

    /// Install a page if it is the next one of a shard being pulled (a duplicate or out-of-order page,
    /// from a retried pull, is ignored): its keys, then its dedup records; the final page makes the
    /// shard serve, with every record of the old owner's table.
    fn apply_install(&mut self, page: ShardPage) -> ShardOutput {
        let Some(owned) = self.shards.get_mut(&page.shard) else {
            return ShardOutput::Ignored;
        };
        let expected_source = owned
            .pulling
            .as_ref()
            .is_some_and(|s| s.gid != UNKNOWN_OWNER);
        if !expected_source
            || page.config_num != owned.contents.config_num
            || owned.cursor != page.after
        {
            return ShardOutput::Ignored;
        }
        owned.cursor = page.next_cursor();
        owned.contents.data.extend(page.data);
        owned.contents.dedup.absorb(page.sessions, page.evicted_max);
        if !page.last {
            return ShardOutput::Kv(KvOutput {
                ok: true,
                value: None,
                elided: false,
                over_quota: false,
            });
        }
        owned.cursor = Cursor::default();
        if let Some(source) = owned.pulling.take() {
            self.confirms.insert((page.config_num, page.shard), source);
        }
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: None,
            elided: false,
            over_quota: false,
        })
    }

    fn apply_adopt(
        &mut self,
        shard: ShardId,
        config_num: u64,
        source: Option<Source>,
    ) -> ShardOutput {
        let Some(owned) = self.shards.get_mut(&shard) else {
            return ShardOutput::Ignored;
        };
        if owned
            .pulling
            .as_ref()
            .is_none_or(|s| s.gid != UNKNOWN_OWNER)
        {
            return ShardOutput::Ignored;
        }
        match source {
            Some(source) if source.gid != UNKNOWN_OWNER => {
                owned.contents.config_num = config_num;
                owned.pulling = Some(source);
            }
            _ => owned.pulling = None,
        }
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: None,
            elided: false,
            over_quota: false,
        })
    }
}

/// Placeholder previous owner of a shard gained from nobody, until `Adopt` names the real one; as a
/// frozen copy's taker, "nobody yet".
const UNKNOWN_OWNER: Gid = 0;

/// The taker of a copy frozen by a version that recorded none, restored after the group left the
/// configuration that gave it away (so who it went to is not known here): any group may take and drop
/// it, as that version allowed. Not a group id the controllers hand out (they refuse it on join).
pub(super) const ANY_GROUP: Gid = Gid::MAX;

/// The group that last owned `shard` before it was given to nobody, and the configuration in which it
/// gave it up, from `history` (configurations in increasing order, all before the one that gave the
/// shard to a group again). `None` if nobody in `history` owned it.
pub fn last_owner(shard: ShardId, history: &[Config]) -> Option<(u64, Source)> {
    history.iter().rev().find_map(|config| {
        let gid = *config.shards.get(shard as usize)?;
        (gid != 0).then(|| {
            let servers = config
                .groups
                .get(&gid)
                .map(|s| s.to_vec())
                .unwrap_or_default();
            (config.num + 1, Source { gid, servers })
        })
    })
}

impl StateMachine for ShardKv {
    type Command = ShardCommand;
    type Query = ShardQuery;
    type Output = ShardOutput;

    const SESSIONS: bool = false;

    fn observe_clock(&mut self, clock: &LogClock) {
        self.clock = *clock;
    }

    fn apply(&mut self, command: ShardCommand) -> ShardOutput {
        match command {
            ShardCommand::Client {
                client,
                seq,
                owner,
                command,
            } => self.apply_client(client, seq, owner, command),
            ShardCommand::NextConfig(next) => self.apply_next_config(next),
            ShardCommand::Install(incoming) => self.apply_install(incoming),
            ShardCommand::Pull {
                config_num,
                shard,
                after,
                by,
                session_pages,
            } => self.apply_pull(config_num, shard, after, by, session_pages),
            ShardCommand::DropOutgoing {
                config_num,
                shard,
                by,
            } => self.apply_drop(config_num, shard, by),
            ShardCommand::Adopt {
                shard,
                config_num,
                source,
            } => self.apply_adopt(shard, config_num, source),
            ShardCommand::Confirmed { config_num, shard } => {
                match self.confirms.remove(&(config_num, shard)) {
                    Some(_) => ShardOutput::Dropped,
                    None => ShardOutput::Ignored,
                }
            }
        }
    }

    fn query(&self, query: &ShardQuery) -> ShardOutput {
        match query {
            ShardQuery::Get(key) => {
                let shard = key_to_shard(key, self.config.shards.len());
                match self.shards.get(&shard) {
                    Some(owned) if owned.pulling.is_none() => {
                        let value = owned.contents.data.get(key).map(str::to_string);
                        ShardOutput::Kv(KvOutput {
                            ok: value.is_some(),
                            value,
                            elided: false,
                            over_quota: false,
                        })
                    }
                    _ => ShardOutput::WrongGroup,
                }
            }
        }
    }

    fn snapshot(&self) -> Bytes {
        wire::encode_state(self)
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        *self = wire::decode_state(self.gid, data)?;
        Ok(())
    }

    fn encode_command(command: &ShardCommand) -> Bytes {
        wire::encode_command(command)
    }

    fn decode_command(data: &[u8]) -> Result<ShardCommand, RsmError> {
        wire::decode_command(data)
    }

    fn encode_output(output: &ShardOutput) -> Bytes {
        wire::encode_output(output)
    }

    fn decode_output(data: &[u8]) -> Result<ShardOutput, RsmError> {
        wire::decode_output(data)
    }
}

impl From<KvQuery> for ShardQuery {
    fn from(query: KvQuery) -> Self {
        match query {
            KvQuery::Get { key } => ShardQuery::Get(key),
        }
    }
}
