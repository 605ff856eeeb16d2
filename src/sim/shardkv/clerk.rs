//! The sharded clerk of the simulator and the actor that runs one of its operations.

use super::{Answer, CallerId, ShardWorld, CLERK_BACKOFF_MS, CLERK_TIMEOUT_MS};
use crate::ctrler::{Config, Gid};
use crate::kv::{KvCommand, KvOutput};
use crate::shardkv::{key_to_shard, ShardCommand, ShardKv, ShardOutput, ShardQuery};
use crate::sim::clock::Actor;
use crate::sim::group::{ClientRequest, ReplyResult};
use rand::Rng;
use std::collections::HashMap;

/// What a sharded clerk is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardOp {
    /// Read a key.
    Get(String),
    /// Change a key.
    Command(KvCommand),
}

impl ShardOp {
    fn key(&self) -> &str {
        match self {
            ShardOp::Get(key) => key,
            ShardOp::Command(command) => command.key(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Ctrler,
    Server { gid: Gid, server: usize },
    Pause { until: u64 },
}

struct InFlight {
    op: ShardOp,
    request: ClientRequest<ShardKv>,
    id: u64,
    target: Target,
    sent_at: u64,
    /// When the operation began, as its history records it (`ShardWorld::history_stamp`).
    invoked: u64,
    /// Servers of the current group tried without an answer since the last configuration refresh.
    misses: usize,
    /// The attempt out went to a random server of the group (a follower read), not the leader.
    spread: bool,
}

/// A client of the sharded service, behaving as the library's sharded clerk does: key → shard → group
/// from its cached configuration; leader chasing within a group; a configuration refresh on "wrong
/// group" or when a whole group is silent; one (client id, seq) per operation across every retry, so
/// it is applied once wherever it lands.
pub struct ShardClerk {
    caller: CallerId,
    inbox: usize,
    client_id: u64,
    seq: u64,
    config: Option<Config>,
    leaders: HashMap<Gid, usize>,
    next_request: u64,
    current: Option<InFlight>,
}

impl ShardClerk {
    /// A clerk with no configuration yet, answering to `caller`, reading answers from `inbox`.
    pub(super) fn new(caller: CallerId, inbox: usize, client_id: u64) -> ShardClerk {
        ShardClerk {
            caller,
            inbox,
            client_id,
            seq: 0,
            config: None,
            leaders: HashMap::new(),
            next_request: 0,
            current: None,
        }
    }

    /// This clerk's client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Start `op`; drive it with [`ShardClerk::poll`].
    pub fn begin(&mut self, world: &mut ShardWorld, op: ShardOp) {
        let request = match &op {
            ShardOp::Get(key) => ClientRequest::Query(ShardQuery::Get(key.clone())),
            ShardOp::Command(command) => {
                self.seq += 1;
                ClientRequest::Mutate {
                    client: self.client_id,
                    seq: self.seq,
                    command: ShardCommand::Client {
                        client: self.client_id,
                        seq: self.seq,
                        owner: 0,
                        command: command.clone(),
                    },
                }
            }
        };
        let now = world.now();
        self.current = Some(InFlight {
            op,
            request,
            id: 0,
            target: Target::Ctrler,
            sent_at: now,
            invoked: world.history_stamp(),
            misses: 0,
            spread: false,
        });
        self.send(world);
    }

    /// Send the operation to the group its key's shard belongs to, or ask the controller first.
    fn send(&mut self, world: &mut ShardWorld) {
        let Some(current) = self.current.as_mut() else {
            return;
        };
        self.next_request += 1;
        current.id = self.next_request;
        current.sent_at = world.now();
        let owner = self.config.as_ref().and_then(|config| {
            let shard = key_to_shard(current.op.key(), config.shards.len());
            let gid = config.shards.get(shard as usize).copied()?;
            let servers = config.groups.get(&gid)?;
            Some((gid, servers.len()))
        });
        match owner {
            Some((gid, servers)) if current.misses < servers => {
                // With follower reads a Get's first try at a group goes to any of its servers, as
                // the library's clerk sends it to the next replica in turn.
                current.spread = current.misses == 0
                    && matches!(current.op, ShardOp::Get(_))
                    && world.follower_reads();
                let server = if current.spread {
                    world.reader_rng.random_range(0..servers)
                } else {
                    *self.leaders.get(&gid).unwrap_or(&0) % servers
                };
                current.target = Target::Server { gid, server };
                let to = ((gid - 100) as usize, server);
                world.send_request(self.caller, current.id, to, current.request.clone());
            }
            _ => {
                current.target = Target::Ctrler;
                current.misses = 0;
                world.send_ctrler_query(self.caller, current.id, None);
            }
        }
    }

    /// Advance the operation: `Some(output)` once it completed (and was recorded in the history).
    pub fn poll(&mut self, world: &mut ShardWorld) -> Option<KvOutput> {
        let current = self.current.as_mut()?;
        let id = current.id;
        while let Some((reply_id, answer)) = world.inboxes[self.inbox].pop_front() {
            if reply_id != id {
                continue; // an answer to an abandoned attempt
            }
            match (answer, current.target) {
                (Answer::Config(config), _) => {
                    let shard = key_to_shard(current.op.key(), config.shards.len());
                    let served = config
                        .shards
                        .get(shard as usize)
                        .is_some_and(|gid| config.groups.contains_key(gid));
                    self.config = Some(config);
                    if served {
                        self.send(world);
                    } else {
                        current.target = Target::Pause {
                            until: world.now() + CLERK_BACKOFF_MS,
                        };
                    }
                    return None;
                }
                (Answer::Server(ReplyResult::Done(ShardOutput::Kv(output))), _) => {
                    let finished = self.current.take()?;
                    world.record(self.client_id, &finished.op, finished.invoked, &output);
                    return Some(output);
                }
                (Answer::Server(ReplyResult::Done(_)), _) => {
                    // Wrong group (or an answer that makes no sense for a client): the configuration
                    // moved on; ask the controller.
                    current.misses = usize::MAX;
                    self.send(world);
                    return None;
                }
                (Answer::Server(ReplyResult::WrongLeader(_)), Target::Server { gid, server }) => {
                    if !current.spread {
                        self.leaders.insert(gid, server + 1);
                    }
                    current.misses += 1;
                    self.send(world);
                    return None;
                }
                (Answer::Server(ReplyResult::WrongLeader(_)), _) => {}
                // Clerks ask for the latest configuration, which is never dropped.
                (Answer::Compacted(config), _) => panic!(
                    "client {} asked for the latest configuration and was told configuration {} \
                     is the oldest kept",
                    self.client_id, config.num
                ),
                (Answer::Server(ReplyResult::SessionExpired(mark)), _) => panic!(
                    "client {} was told its session expired (mark {mark}): the simulator's \
                     policy keeps every session it creates",
                    self.client_id
                ),
            }
        }
        match current.target {
            Target::Pause { until } if world.now() >= until => self.send(world),
            Target::Pause { .. } => {}
            Target::Server { gid, server } if world.now() - current.sent_at >= CLERK_TIMEOUT_MS => {
                if !current.spread {
                    self.leaders.insert(gid, server + 1);
                }
                current.misses += 1;
                self.send(world);
            }
            Target::Ctrler if world.now() - current.sent_at >= CLERK_TIMEOUT_MS => self.send(world),
            _ => {}
        }
        None
    }
}

/// Runs one operation of one clerk to completion.
pub(super) struct OpTask<'a> {
    pub(super) clerk: &'a mut ShardClerk,
    pub(super) op: Option<ShardOp>,
    pub(super) result: Option<KvOutput>,
    pub(super) wake_at: u64,
}

impl Actor<ShardWorld> for OpTask<'_> {
    fn next_wake(&self) -> Option<u64> {
        self.result.is_none().then_some(self.wake_at)
    }

    fn wake(&mut self, world: &mut ShardWorld) {
        if let Some(op) = self.op.take() {
            self.clerk.begin(world, op);
        }
        self.result = self.clerk.poll(world);
        // Clerks look for answers every simulated millisecond (the network's time resolution).
        self.wake_at = world.now() + 1;
    }
}
