//! A simulated sharded KV deployment with the helpers of 6.824's shardkv `config.go`: replica groups
//! (gids 100, 101, ...) of [`ShardKv`] servers, a shard controller, and sharded clerks.
//!
//! Each group is a [`Group`] — the same Raft + [`crate::rsm::Rsm`] stack the daemons run — and each
//! group leader runs the same duties ([`ShardKv::duties`]) the daemon's driver runs, with the same
//! protocol functions ([`crate::shardkv::migration`]): fetch the next configuration, pull gained shards
//! page by page (each page checked as the daemon checks it), and have previous owners delete what was
//! handed over through their own logs. Requests
//! between groups, to the controller and from clerks all cross the simulated network with 6.824's
//! fault model (the unreliable flag applies to all of them, as in the Go tests).
//!
//! The controller is modelled as one linearizable [`ShardCtrler`] that answers over the network: the
//! 4B tests never crash or partition controllers, and the replicated controller has tests of its own
//! (`tests/ctrler.rs`, and the process tests run the real one).

mod clerk;
mod driver;
mod network;

use clerk::OpTask;
pub use clerk::{ShardClerk, ShardOp};

use super::clock::{run_until, Actor, Scheduler, World};
use super::group::ClerkOp;
use super::group::{ClientRequest, Group, ReplyResult, SimService};
use super::net::NetModel;
use super::raft_net::{RaftEvent, RaftNet};
use crate::check::Operation;
use crate::ctrler::{Config, CtrlerCommand, Gid, ShardCtrler};
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::rsm::StateMachine;
use crate::shardkv::{Duty, ShardKv, ShardOutput};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap, VecDeque};

impl SimService for ShardKv {}

/// How to build a sharded deployment.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// Number of replica groups (gids 100, 101, ...).
    pub groups: usize,
    /// Servers per group.
    pub servers: usize,
    /// Start with a reliable network.
    pub reliable: bool,
    /// Snapshot when a server's Raft state reaches this many bytes; `None` never.
    pub max_raft_state: Option<usize>,
    /// The seed of the whole schedule.
    pub seed: u64,
    /// Group followers answer Gets too, and clerks send each Get to a random server of the group
    /// first (`kvd --follower-reads`, `kvctl --follower-reads`).
    pub follower_reads: bool,
}

/// The gid of group index `gi` (6.824 numbers groups from 100).
pub fn gid_of(gi: usize) -> Gid {
    100 + gi as Gid
}

/// The name a configuration lists for server `i` of group `gid`.
fn server_name(gid: Gid, i: usize) -> String {
    format!("server-{gid}-{i}")
}

/// Group index and server of a name made by [`server_name`].
fn parse_server_name(name: &str) -> Option<(usize, usize)> {
    let mut parts = name.strip_prefix("server-")?.split('-');
    let gid: Gid = parts.next()?.parse().ok()?;
    let i: usize = parts.next()?.parse().ok()?;
    Some((gid.checked_sub(100)? as usize, i))
}

/// Who sent a request: a clerk, or a group server doing its duties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Clerk(usize),
    Server { gi: usize, server: usize },
}

struct DriverCall {
    gi: usize,
    server: usize,
    incarnation: u64,
    /// The duty the request performs; its answer goes through [`migration::command`].
    duty: Duty,
}

enum Answer {
    Server(ReplyResult<ShardOutput>),
    Config(Config),
    /// The configuration asked for was dropped; the oldest kept.
    Compacted(Config),
}

/// An event of the sharded world; opaque outside the simulator.
pub enum ShardEvent {
    /// A Raft event of one group.
    Raft(RaftEvent),
    /// A request reaches a group server.
    Request {
        /// Group index.
        gi: usize,
        /// Server in the group.
        server: usize,
        /// The incarnation it was sent to.
        to_incarnation: u64,
        /// The sender.
        from: CallerId,
        /// The sender's request id.
        id: u64,
        /// The request.
        request: Box<ClientRequest<ShardKv>>,
    },
    /// A request reaches the controller.
    CtrlerQuery {
        /// The sender.
        from: CallerId,
        /// The sender's request id.
        id: u64,
        /// Which configuration (`None`: latest).
        num: Option<u64>,
    },
    /// An answer reaches its caller.
    Answer {
        /// The caller.
        to: CallerId,
        /// The request id.
        id: u64,
        /// The answer.
        answer: Box<AnswerBox>,
    },
    /// A group server looks at its duties.
    Duties {
        /// Group index.
        gi: usize,
        /// Server in the group.
        server: usize,
        /// The incarnation that scheduled it.
        incarnation: u64,
    },
}

/// An index into the world's table of callers.
pub type CallerId = usize;

/// An answer in transit (opaque).
pub struct AnswerBox(Answer);

impl From<RaftEvent> for ShardEvent {
    fn from(event: RaftEvent) -> Self {
        ShardEvent::Raft(event)
    }
}

const TICK_MS: u64 = 10;
/// How often a group leader looks at its duties (6.824 servers poll the controller about every 100 ms).
const DUTY_INTERVAL_MS: u64 = 100;
/// How long a clerk waits for an answer before trying another server.
const CLERK_TIMEOUT_MS: u64 = 100;
/// How long a clerk waits before asking the controller again when no group serves a key.
const CLERK_BACKOFF_MS: u64 = 100;

/// A simulated sharded deployment. See the module documentation.
pub struct ShardWorld {
    options: ShardOptions,
    clock: Scheduler<ShardEvent>,
    groups: Vec<Group<ShardKv>>,
    ctrler: ShardCtrler,
    net: NetModel,
    net_rng: ChaCha8Rng,
    /// Randomness for test decisions.
    pub rng: ChaCha8Rng,
    /// Which server of a group a clerk sends a Get to first, with follower reads.
    pub(super) reader_rng: ChaCha8Rng,
    callers: Vec<Caller>,
    inboxes: Vec<VecDeque<(u64, Answer)>>,
    calls: HashMap<u64, DriverCall>,
    next_call: u64,
    history: Vec<Operation>,
    client_ids: u64,
    ops: u64,
    rpcs: u64,
}

impl ShardWorld {
    /// Start every group's servers (no group has joined the controller yet).
    pub fn new(options: ShardOptions) -> Self {
        let mut net = NetModel::new(0);
        net.set_reliable(options.reliable);
        let groups = (0..options.groups)
            .map(|gi| {
                let seed = options.seed.wrapping_add(1000 * (gi as u64 + 1));
                let raft =
                    RaftNet::new(options.servers, options.reliable, seed, TICK_MS).with_group(gi);
                let gid = gid_of(gi);
                let mut group = Group::new(
                    raft,
                    options.max_raft_state,
                    Box::new(move || ShardKv::new(gid)),
                );
                group.follower_reads = options.follower_reads;
                group
            })
            .collect();
        let callers = (0..options.groups)
            .flat_map(|gi| (0..options.servers).map(move |server| Caller::Server { gi, server }))
            .collect();
        let mut world = ShardWorld {
            net_rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(1)),
            rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(0x5EED)),
            reader_rng: ChaCha8Rng::seed_from_u64(options.seed ^ 0xf0110),
            clock: Scheduler::default(),
            groups,
            ctrler: ShardCtrler::default(),
            net,
            callers,
            inboxes: Vec::new(),
            calls: HashMap::new(),
            next_call: 0,
            history: Vec::new(),
            client_ids: 0,
            ops: 0,
            rpcs: 0,
            options,
        };
        for gi in 0..world.options.groups {
            world.start_group(gi);
        }
        world
    }

    /// The schedule's seed.
    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// Fail the test, naming the seed that reproduces it.
    #[track_caller]
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        super::seed::fail(self.options.seed, self.clock.now(), message)
    }

    /// Simulated time in ms.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Let `ms` of simulated time pass.
    pub fn sleep(&mut self, ms: u64) {
        let until = self.clock.now() + ms;
        run_until(self, until, &mut []);
    }

    /// Let `ms` of simulated time pass while `actors` run.
    pub fn run_for(&mut self, ms: u64, actors: &mut [&mut dyn Actor<ShardWorld>]) {
        let until = self.clock.now() + ms;
        run_until(self, until, actors);
    }

    /// Run `actors` until every one of them is finished; fail if that takes more than 120 simulated
    /// seconds (an operation that never completes would otherwise run the simulation forever).
    pub fn run_until_done(&mut self, actors: &mut [&mut dyn Actor<ShardWorld>]) {
        let deadline = self.clock.now() + 120_000;
        while actors.iter().any(|a| a.next_wake().is_some()) {
            if self.clock.now() >= deadline {
                self.fail("clerk operations did not finish within 120 s");
            }
            self.run_for(100, actors);
        }
    }

    /// Make the whole network (clerks, groups, controller) (un)reliable.
    pub fn set_reliable(&mut self, reliable: bool) {
        self.net.set_reliable(reliable);
        for group in &mut self.groups {
            group.raft.net.set_reliable(reliable);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Controller (6.824 `join`, `leave`, `joinm`, `leavem`, `mck.Query`)
    // ------------------------------------------------------------------------------------------

    fn ctrler_apply(&mut self, command: CtrlerCommand) {
        if let Err(e) = self.ctrler.apply(command) {
            self.fail(format!("controller refused: {e}"));
        }
    }

    /// Group `gi` joins.
    pub fn join(&mut self, gi: usize) {
        self.joinm(&[gi]);
    }

    /// Groups `gis` join in one configuration change.
    pub fn joinm(&mut self, gis: &[usize]) {
        let groups: BTreeMap<Gid, Vec<String>> = gis
            .iter()
            .map(|&gi| {
                let gid = gid_of(gi);
                let servers = (0..self.options.servers)
                    .map(|i| server_name(gid, i))
                    .collect();
                (gid, servers)
            })
            .collect();
        self.ctrler_apply(CtrlerCommand::Join { groups, shards: 0 });
    }

    /// Group `gi` leaves.
    pub fn leave(&mut self, gi: usize) {
        self.leavem(&[gi]);
    }

    /// Groups `gis` leave in one configuration change.
    pub fn leavem(&mut self, gis: &[usize]) {
        self.ctrler_apply(CtrlerCommand::Leave(
            gis.iter().map(|&gi| gid_of(gi)).collect(),
        ));
    }

    /// The controller's latest configuration.
    pub fn latest_config(&self) -> Config {
        self.ctrler.latest().clone()
    }

    /// The oldest configuration the controller keeps (older ones were dropped once every group that
    /// could ask for them had reported passing them).
    pub fn oldest_config(&self) -> u64 {
        self.ctrler.oldest()
    }

    // ------------------------------------------------------------------------------------------
    // Servers
    // ------------------------------------------------------------------------------------------

    /// Stop server `i` of group `gi`; only its persisted state survives.
    pub fn shutdown_server(&mut self, gi: usize, i: usize) {
        self.groups[gi].shutdown_server(i);
    }

    /// (Re)start server `i` of group `gi` from its persisted state.
    pub fn start_server(&mut self, gi: usize, i: usize) {
        let replies = self.groups[gi].start_server(&mut self.clock, i);
        self.deliver_replies(gi, replies);
        let incarnation = self.groups[gi].raft.hosts[i].incarnation;
        let at = self.clock.now() + DUTY_INTERVAL_MS;
        self.clock.schedule(
            at,
            ShardEvent::Duties {
                gi,
                server: i,
                incarnation,
            },
        );
    }

    /// Stop every server of group `gi`.
    pub fn shutdown_group(&mut self, gi: usize) {
        for i in 0..self.options.servers {
            self.shutdown_server(gi, i);
        }
    }

    /// Start every server of group `gi`.
    pub fn start_group(&mut self, gi: usize) {
        for i in 0..self.options.servers {
            self.start_server(gi, i);
        }
    }

    /// The state of server `i` of group `gi`, if it runs.
    pub fn machine(&self, gi: usize, i: usize) -> Option<&ShardKv> {
        self.groups[gi].machine(i)
    }

    /// 6.824 `checklogs`: with a snapshot threshold, no server's Raft state exceeds 8× it; without one,
    /// nobody snapshotted.
    pub fn check_logs(&self) {
        for (gi, group) in self.groups.iter().enumerate() {
            match self.options.max_raft_state {
                Some(max) => {
                    let size = group.max_raft_state_size();
                    if size > 8 * max {
                        self.fail(format!(
                            "group {gi}: raft state size {size} exceeds 8 × {max}"
                        ));
                    }
                }
                None => {
                    let size = group.max_snapshot_size();
                    if size > 0 {
                        self.fail(format!(
                            "group {gi}: snapshot of {size} bytes without a threshold"
                        ));
                    }
                }
            }
        }
    }

    /// Raft state plus snapshot bytes over every server of every group (challenge 1's measure).
    pub fn total_persisted(&self) -> usize {
        self.groups
            .iter()
            .map(|g| (0..g.len()).map(|i| g.persisted_size(i)).sum::<usize>())
            .sum()
    }

    // ------------------------------------------------------------------------------------------
    // Clerks
    // ------------------------------------------------------------------------------------------

    /// A new sharded clerk (6.824 `makeClient`), with no configuration yet.
    pub fn make_clerk(&mut self) -> ShardClerk {
        let caller = self.callers.len();
        self.callers.push(Caller::Clerk(self.inboxes.len()));
        self.inboxes.push(VecDeque::new());
        self.client_ids += 1;
        ShardClerk::new(caller, self.inboxes.len() - 1, self.client_ids)
    }

    /// Gets confirmed on a server that did not lead its group (follower reads).
    pub fn reads_served_by_followers(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| g.reads_served_by_followers)
            .sum()
    }

    /// Whether Gets go to any server of a group first.
    pub(super) fn follower_reads(&self) -> bool {
        self.options.follower_reads
    }

    /// Every operation completed so far, for the linearizability checker.
    pub fn history(&self) -> &[Operation] {
        &self.history
    }

    /// Operations clerks completed.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Run one clerk operation to completion.
    pub fn run_op(&mut self, clerk: &mut ShardClerk, op: ShardOp) -> KvOutput {
        let mut task = OpTask {
            clerk,
            op: Some(op),
            result: None,
            wake_at: 0,
        };
        self.run_until_done(&mut [&mut task]);
        task.result
            .unwrap_or_else(|| self.fail("clerk operation did not finish"))
    }

    /// `Get` (a missing key reads as "").
    pub fn get(&mut self, clerk: &mut ShardClerk, key: &str) -> String {
        self.run_op(clerk, ShardOp::Get(key.into()))
            .value
            .unwrap_or_default()
    }

    /// `Put`.
    pub fn put(&mut self, clerk: &mut ShardClerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ShardOp::Command(KvCommand::Put {
                key: key.into(),
                value: value.into(),
            }),
        );
    }

    /// `Append`.
    pub fn append(&mut self, clerk: &mut ShardClerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ShardOp::Command(KvCommand::Append {
                key: key.into(),
                value: value.into(),
            }),
        );
    }

    /// Print the 6.824-style summary and enforce the 120 s (simulated) limit.
    pub fn end(&self, name: &str) {
        let elapsed = self.clock.now();
        if elapsed > 120_000 {
            self.fail("test took longer than 120 seconds");
        }
        println!(
            "{name} ... Passed -- {:.1}s {} {} {} (seed {})",
            elapsed as f64 / 1000.0,
            self.options.groups * self.options.servers,
            self.rpcs,
            self.ops,
            self.options.seed
        );
    }

    /// A time for the history: see [`crate::sim::clock::Scheduler::history_stamp`].
    pub(crate) fn history_stamp(&mut self) -> u64 {
        self.clock.history_stamp()
    }

    /// Records a completed operation that began at history time `invoked`.
    fn record(&mut self, client: u64, op: &ShardOp, invoked: u64, output: &KvOutput) {
        self.ops += 1;
        let kv_op: ClerkOp<KvStore> = match op {
            ShardOp::Get(key) => ClerkOp::Query(KvQuery::Get { key: key.clone() }),
            ShardOp::Command(command) => ClerkOp::Command(command.clone()),
        };
        if let Some(record) = KvStore::record(client, &kv_op, output) {
            let complete = self.clock.history_stamp();
            self.history.push(record.ok_at(invoked, complete));
        }
    }
}

impl World for ShardWorld {
    type Event = ShardEvent;

    fn clock(&self) -> &Scheduler<ShardEvent> {
        &self.clock
    }

    fn clock_mut(&mut self) -> &mut Scheduler<ShardEvent> {
        &mut self.clock
    }

    fn handle_event(&mut self, event: ShardEvent) {
        self.on_event(event);
    }
}
