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

use super::clock::{run_until, Actor, Scheduler, World};
use super::group::{ClientRequest, Group, Replies, ReplyResult, SimService};
use super::net::NetModel;
use super::raft_net::{RaftEvent, RaftNet};
use super::service::ClerkOp;
use crate::check::Operation;
use crate::ctrler::{Config, CtrlerCommand, CtrlerQuery, Gid, ShardCtrler};
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::rsm::StateMachine;
use crate::shardkv::migration::{self, Reply, Request};
use crate::shardkv::{key_to_shard, Duty, ShardCommand, ShardKv, ShardOutput, ShardQuery};
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
                Group::new(
                    raft,
                    options.max_raft_state,
                    Box::new(move || ShardKv::new(gid)),
                )
            })
            .collect();
        let callers = (0..options.groups)
            .flat_map(|gi| (0..options.servers).map(move |server| Caller::Server { gi, server }))
            .collect();
        let mut world = ShardWorld {
            net_rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(1)),
            rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(0x5EED)),
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
        self.ctrler_apply(CtrlerCommand::Join(groups));
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
        ShardClerk {
            caller,
            inbox: self.inboxes.len() - 1,
            client_id: self.client_ids,
            seq: 0,
            config: None,
            leaders: HashMap::new(),
            next_request: 0,
            current: None,
        }
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

    // ------------------------------------------------------------------------------------------
    // Network
    // ------------------------------------------------------------------------------------------

    fn send_request(
        &mut self,
        from: CallerId,
        id: u64,
        (gi, server): (usize, usize),
        request: ClientRequest<ShardKv>,
    ) {
        self.rpcs += 1;
        let Some(group) = self.groups.get(gi).filter(|g| server < g.len()) else {
            return;
        };
        let to_incarnation = group.raft.hosts[server].incarnation;
        if let Some(delay) = self.net.fate(&mut self.net_rng, true) {
            self.clock.schedule(
                self.clock.now() + delay,
                ShardEvent::Request {
                    gi,
                    server,
                    to_incarnation,
                    from,
                    id,
                    request: Box::new(request),
                },
            );
        }
    }

    fn send_ctrler_query(&mut self, from: CallerId, id: u64, num: Option<u64>) {
        self.rpcs += 1;
        if let Some(delay) = self.net.fate(&mut self.net_rng, true) {
            self.clock.schedule(
                self.clock.now() + delay,
                ShardEvent::CtrlerQuery { from, id, num },
            );
        }
    }

    fn send_answer(&mut self, to: CallerId, id: u64, answer: Answer) {
        if let Some(delay) = self.net.fate(&mut self.net_rng, false) {
            self.clock.schedule(
                self.clock.now() + delay,
                ShardEvent::Answer {
                    to,
                    id,
                    answer: Box::new(AnswerBox(answer)),
                },
            );
        }
    }

    fn deliver_replies(&mut self, gi: usize, replies: Result<Replies<ShardOutput>, String>) {
        match replies {
            Ok(replies) => {
                for (_, (to, id), result) in replies {
                    self.send_answer(to, id, Answer::Server(result));
                }
            }
            Err(e) => self.fail(format!("group {gi}: {e}")),
        }
    }

    // ------------------------------------------------------------------------------------------
    // Group duties (what the daemon's driver does)
    // ------------------------------------------------------------------------------------------

    fn call(&mut self, gi: usize, server: usize, duty: Duty) -> u64 {
        self.next_call += 1;
        let incarnation = self.groups[gi].raft.hosts[server].incarnation;
        self.calls.insert(
            self.next_call,
            DriverCall {
                gi,
                server,
                incarnation,
                duty,
            },
        );
        self.next_call
    }

    fn caller_of(&self, gi: usize, server: usize) -> CallerId {
        gi * self.options.servers + server
    }

    /// Send `request` to every server named (only the leader will act on it).
    fn broadcast(
        &mut self,
        from: (usize, usize),
        servers: &[String],
        duty: &Duty,
        request: ClientRequest<ShardKv>,
    ) {
        for name in servers {
            if let Some(to) = parse_server_name(name) {
                let id = self.call(from.0, from.1, duty.clone());
                let caller = self.caller_of(from.0, from.1);
                self.send_request(caller, id, to, request.clone());
            }
        }
    }

    /// What the daemon's driver does in one round, over the simulated network: each duty's request
    /// ([`migration::request`]) goes out, and [`Self::on_driver_answer`] turns the answers into
    /// proposals with the same functions the daemon uses.
    fn do_duties(&mut self, gi: usize, server: usize) {
        let Some(machine) = self.groups[gi].machine(server) else {
            return;
        };
        if !self.groups[gi].is_leader(server) {
            return;
        }
        for duty in machine.duties() {
            match migration::request(&duty) {
                Request::Config { num } => {
                    let id = self.call(gi, server, duty);
                    let caller = self.caller_of(gi, server);
                    self.send_ctrler_query(caller, id, Some(num));
                }
                Request::History { shard, before } => {
                    // The controller is one linearizable object here: read its history directly.
                    let mut read = Vec::new();
                    while let Some(num) = migration::next_in_history(shard, before, &read) {
                        match self.ctrler.query(&CtrlerQuery(Some(num))) {
                            Ok(config) if config.num == num => read.push(config),
                            _ => self.fail(format!("controller has no configuration {num}")),
                        }
                    }
                    self.answered(gi, server, &duty, migration::Answer::History(read));
                }
                Request::Pull { from, request } => self.broadcast(
                    (gi, server),
                    &from.servers,
                    &duty,
                    ClientRequest::Query(migration::serve_pull(&request)),
                ),
                Request::Delete { to, request } => {
                    // Internal proposals are matched by (0, seq): a fresh seq for each.
                    let seq = (self.next_call << 1) | 1;
                    self.broadcast(
                        (gi, server),
                        &to.servers,
                        &duty,
                        ClientRequest::Mutate {
                            client: 0,
                            seq,
                            command: migration::delete_command(&request),
                        },
                    )
                }
            }
        }
    }

    /// Propose what `answer` to `duty` calls for, if it fits the group's state now.
    fn answered(&mut self, gi: usize, server: usize, duty: &Duty, answer: migration::Answer) {
        let Some(machine) = self.groups[gi].machine(server) else {
            return;
        };
        if let Ok(command) = migration::command(machine, duty, answer) {
            self.propose(gi, server, command);
        }
    }

    fn propose(&mut self, gi: usize, server: usize, command: ShardCommand) {
        let replies = self.groups[gi].propose(&mut self.clock, server, &command);
        self.deliver_replies(gi, replies.map(|(_, replies)| replies));
    }

    fn on_driver_answer(&mut self, call: DriverCall, answer: Answer) {
        let DriverCall {
            gi,
            server,
            incarnation,
            duty,
        } = call;
        if self.groups[gi].raft.hosts[server].incarnation != incarnation {
            return;
        }
        let answer = match (&duty, answer) {
            (Duty::FetchConfig { .. }, Answer::Config(config)) => migration::Answer::Config(config),
            (Duty::Pull { .. }, Answer::Server(ReplyResult::Done(output))) => {
                match migration::pull_reply(output) {
                    Ok(Reply::Ok(page)) => migration::Answer::Page(page),
                    Ok(Reply::NotReady) => return,
                    Err(e) => self.fail(e),
                }
            }
            (Duty::Delete { .. }, Answer::Server(ReplyResult::Done(output))) => {
                match migration::delete_reply(output) {
                    Ok(Reply::Ok(())) => migration::Answer::Deleted,
                    Ok(Reply::NotReady) => return,
                    Err(e) => self.fail(e),
                }
            }
            _ => return, // a wrong leader, or nothing to act on
        };
        self.answered(gi, server, &duty, answer);
    }

    fn on_event(&mut self, event: ShardEvent) {
        match event {
            ShardEvent::Raft(event) => {
                let gi = event.group();
                let replies = self.groups[gi].handle_raft(&mut self.clock, event);
                self.deliver_replies(gi, replies);
            }
            ShardEvent::Request {
                gi,
                server,
                to_incarnation,
                from,
                id,
                request,
            } => {
                if self.groups[gi].raft.hosts[server].incarnation == to_incarnation {
                    let replies = self.groups[gi].handle_request(
                        &mut self.clock,
                        server,
                        (from, id),
                        *request,
                    );
                    self.deliver_replies(gi, replies);
                }
            }
            ShardEvent::CtrlerQuery { from, id, num } => {
                let config = self.ctrler.query(&CtrlerQuery(num));
                if let Ok(config) = config {
                    self.send_answer(from, id, Answer::Config(config));
                }
            }
            ShardEvent::Answer { to, id, answer } => match self.callers.get(to).copied() {
                Some(Caller::Clerk(inbox)) => self.inboxes[inbox].push_back((id, answer.0)),
                Some(Caller::Server { .. }) => {
                    if let Some(call) = self.calls.remove(&id) {
                        self.on_driver_answer(call, answer.0);
                    }
                }
                None => {}
            },
            ShardEvent::Duties {
                gi,
                server,
                incarnation,
            } => {
                if self.groups[gi].raft.hosts[server].incarnation != incarnation
                    || !self.groups[gi].is_running(server)
                {
                    return;
                }
                // Calls older than a few rounds will not be answered any more (lost, or their server
                // restarted): forget them.
                let horizon = self.next_call.saturating_sub(10_000);
                self.calls.retain(|&id, _| id > horizon);
                self.do_duties(gi, server);
                self.clock.schedule(
                    self.clock.now() + DUTY_INTERVAL_MS,
                    ShardEvent::Duties {
                        gi,
                        server,
                        incarnation,
                    },
                );
            }
        }
    }

    fn record(&mut self, client: u64, op: &ShardOp, invoked_at: u64, output: &KvOutput) {
        self.ops += 1;
        let kv_op: ClerkOp<KvStore> = match op {
            ShardOp::Get(key) => ClerkOp::Query(KvQuery::Get { key: key.clone() }),
            ShardOp::Command(command) => ClerkOp::Command(command.clone()),
        };
        if let Some(record) = KvStore::record(client, &kv_op, output) {
            let complete = self.clock.now() * 1_000_000;
            self.history
                .push(record.ok_at(invoked_at * 1_000_000, complete));
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
    invoked_at: u64,
    /// Servers of the current group tried without an answer since the last configuration refresh.
    misses: usize,
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
            invoked_at: now,
            misses: 0,
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
                let server = *self.leaders.get(&gid).unwrap_or(&0) % servers;
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
                    world.record(self.client_id, &finished.op, finished.invoked_at, &output);
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
                    self.leaders.insert(gid, server + 1);
                    current.misses += 1;
                    self.send(world);
                    return None;
                }
                (Answer::Server(ReplyResult::WrongLeader(_)), _) => {}
            }
        }
        match current.target {
            Target::Pause { until } if world.now() >= until => self.send(world),
            Target::Pause { .. } => {}
            Target::Server { gid, server } if world.now() - current.sent_at >= CLERK_TIMEOUT_MS => {
                self.leaders.insert(gid, server + 1);
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
struct OpTask<'a> {
    clerk: &'a mut ShardClerk,
    op: Option<ShardOp>,
    result: Option<KvOutput>,
    wake_at: u64,
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
