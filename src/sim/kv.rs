//! A simulated cluster of KV servers, with the helpers of 6.824's kvraft `config.go`.
//!
//! Each server is the same stack the `kvd` daemon runs — a [`RaftCore`] under an [`Rsm`] of a
//! [`KvStore`] — driven by the simulator instead of tokio. Clerks ([`Clerk`]) talk to servers through
//! the simulated network with the same fault model as Raft's messages; each clerk reaches the servers the
//! test connects it to, independently of partitions between servers (as in 6.824, where server
//! partitions leave clerks connected). Every completed clerk operation is recorded with its invocation and
//! completion times so the history can be checked for linearizability by [`crate::check`].

use super::clock::{run_until, Actor, Scheduler, World};
use super::net::NetModel;
use super::storage::MemStorage;
use crate::check::Operation;
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::raft::wire::encoded_len;
use crate::raft::{Config, Envelope, NodeId, RaftCore, Role};
use crate::rsm::{Completion, Prepared, Rsm, Token};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};

/// How to build a KV cluster.
#[derive(Clone, Debug)]
pub struct KvOptions {
    /// Number of servers.
    pub servers: usize,
    /// Start with a reliable network.
    pub reliable: bool,
    /// Snapshot when the Raft state reaches this many bytes (6.824's `maxraftstate`); `None` never.
    pub max_raft_state: Option<usize>,
    /// The seed of the whole schedule.
    pub seed: u64,
}

/// What a clerk asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClerkOp {
    /// Read a key.
    Get(String),
    /// A command that changes the map.
    Command(KvCommand),
}

#[derive(Clone, Debug)]
enum ClientRequest {
    Get(KvQuery),
    Mutate {
        client: u64,
        seq: u64,
        command: KvCommand,
    },
}

#[derive(Clone, Debug)]
enum ReplyResult {
    Done(KvOutput),
    WrongLeader(Option<NodeId>),
}

#[derive(Debug)]
enum Event {
    Tick {
        server: usize,
        incarnation: u64,
    },
    Raft {
        envelope: Envelope,
        from_incarnation: u64,
        to_incarnation: u64,
        size: usize,
    },
    Request {
        clerk: usize,
        server: usize,
        to_incarnation: u64,
        id: u64,
        request: ClientRequest,
    },
    Reply {
        clerk: usize,
        server: usize,
        id: u64,
        result: ReplyResult,
    },
}

struct KvServer {
    core: Option<RaftCore>,
    rsm: Rsm<KvStore>,
    storage: MemStorage,
    incarnation: u64,
    waiting: HashMap<Token, (usize, u64)>,
    reads: HashMap<Token, KvQuery>,
    next_token: Token,
    was_leader: bool,
}

/// A simulated KV cluster. See the module documentation.
pub struct KvCluster {
    options: KvOptions,
    clock: Scheduler<Event>,
    net: NetModel,
    net_rng: ChaCha8Rng,
    /// Randomness for test decisions.
    pub rng: ChaCha8Rng,
    servers: Vec<KvServer>,
    reach: Vec<Vec<bool>>,
    inboxes: Vec<VecDeque<(u64, ReplyResult)>>,
    history: Vec<Operation>,
    client_ids: u64,
    ops: u64,
    started_at: u64,
}

const TICK_MS: u64 = 10;
/// How long a clerk waits for an answer before trying another server (labrpc's failed `Call`).
const CLERK_TIMEOUT_MS: u64 = 100;

impl KvCluster {
    /// Start `options.servers` servers, all connected.
    pub fn new(options: KvOptions) -> Self {
        let n = options.servers;
        let mut net = NetModel::new(n);
        net.set_reliable(options.reliable);
        let mut cluster = KvCluster {
            net_rng: ChaCha8Rng::seed_from_u64(options.seed),
            rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(0x5EED)),
            options,
            clock: Scheduler::default(),
            net,
            servers: (0..n)
                .map(|_| KvServer {
                    core: None,
                    rsm: Rsm::new(KvStore::default()),
                    storage: MemStorage::default(),
                    incarnation: 0,
                    waiting: HashMap::new(),
                    reads: HashMap::new(),
                    next_token: 0,
                    was_leader: false,
                })
                .collect(),
            reach: Vec::new(),
            inboxes: Vec::new(),
            history: Vec::new(),
            client_ids: 0,
            ops: 0,
            started_at: 0,
        };
        for i in 0..n {
            cluster.start_server(i);
        }
        cluster
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there are no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The schedule's seed.
    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// Fail the test, naming the seed that reproduces it.
    #[track_caller]
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        let seed = self.options.seed;
        panic!(
            "{message} [at {} ms; reproduce with RAFT_SEED={seed}]",
            self.clock.now()
        )
    }

    /// Simulated time in ms.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    // ------------------------------------------------------------------------------------------
    // Servers and network
    // ------------------------------------------------------------------------------------------

    /// 6.824 `ShutdownServer`: the server stops; only its persisted state survives.
    pub fn shutdown_server(&mut self, i: usize) {
        let server = &mut self.servers[i];
        if server.core.take().is_some() {
            server.incarnation += 1;
        }
        server.waiting.clear();
        server.reads.clear();
        server.was_leader = false;
    }

    /// 6.824 `StartServer`: (re)start server `i` from its persisted state with an empty state machine,
    /// which Raft refills from the snapshot and the log.
    pub fn start_server(&mut self, i: usize) {
        self.shutdown_server(i);
        let voters: Vec<NodeId> = (1..=self.servers.len() as NodeId).collect();
        let mut config = Config::new(i as NodeId + 1, voters);
        config.election_ticks = 30;
        config.heartbeat_ticks = 10;
        config.seed =
            self.options.seed ^ (self.servers[i].incarnation + 1).wrapping_mul(0xA24B_AED4);
        let core = match RaftCore::restore(config, self.servers[i].storage.load()) {
            Ok(core) => core,
            Err(e) => self.fail(format!("server {i} cannot restart: {e}")),
        };
        let server = &mut self.servers[i];
        server.core = Some(core);
        server.rsm = Rsm::new(KvStore::default());
        server.incarnation += 1;
        let incarnation = server.incarnation;
        let first = self.clock.now() + self.net_rng.random_range(1..=TICK_MS);
        self.clock.schedule(
            first,
            Event::Tick {
                server: i,
                incarnation,
            },
        );
        self.drain_ready(i);
    }

    /// Servers in `p1` can talk among themselves, those in `p2` too, but not across (6.824 `partition`).
    pub fn partition(&mut self, p1: &[usize], p2: &[usize]) {
        let mut labels = vec![0; self.len()];
        for &i in p2 {
            labels[i] = 1;
        }
        for &i in p1 {
            labels[i] = 0;
        }
        self.net.set_partition(&labels);
    }

    /// Reconnect every server to every other.
    pub fn connect_all(&mut self) {
        self.net.heal_partition();
    }

    /// Make the network (un)reliable.
    pub fn set_reliable(&mut self, reliable: bool) {
        self.net.set_reliable(reliable);
    }

    /// Largest Raft state of any server, in bytes.
    pub fn max_raft_state_size(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.storage.raft_state_size())
            .max()
            .unwrap_or(0)
    }

    /// Largest snapshot of any server, in bytes.
    pub fn max_snapshot_size(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.storage.snapshot_size())
            .max()
            .unwrap_or(0)
    }

    /// Requests sent so far.
    pub fn rpc_total(&self) -> u64 {
        self.net.stats.rpc_total
    }

    /// The server that currently believes it leads, if exactly one running server does.
    pub fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.len())
            .filter(|&i| self.servers[i].core.as_ref().is_some_and(|c| c.is_leader()))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    // ------------------------------------------------------------------------------------------
    // Clerks
    // ------------------------------------------------------------------------------------------

    /// A new clerk connected to every server (6.824 `makeClient(all)`).
    pub fn make_clerk(&mut self) -> Clerk {
        let all: Vec<usize> = (0..self.len()).collect();
        self.make_clerk_to(&all)
    }

    /// A new clerk that reaches only `servers`.
    pub fn make_clerk_to(&mut self, servers: &[usize]) -> Clerk {
        let index = self.reach.len();
        let mut reach = vec![false; self.len()];
        for &s in servers {
            reach[s] = true;
        }
        self.reach.push(reach);
        self.inboxes.push(VecDeque::new());
        self.client_ids += 1;
        let leader = self.rng.random_range(0..self.len());
        Clerk {
            index,
            client_id: self.client_ids,
            seq: 0,
            leader,
            next_request: 0,
            current: None,
        }
    }

    /// Change which servers a clerk reaches (6.824 `ConnectClient`).
    pub fn connect_clerk(&mut self, clerk: &Clerk, servers: &[usize]) {
        let reach = &mut self.reach[clerk.index];
        reach.iter_mut().for_each(|r| *r = false);
        for &s in servers {
            reach[s] = true;
        }
    }

    /// Every operation completed so far, for the linearizability checker.
    pub fn history(&self) -> &[Operation] {
        &self.history
    }

    /// Run one clerk operation to completion (a blocking call in the Go tests).
    pub fn run_op(&mut self, clerk: &mut Clerk, op: ClerkOp) -> KvOutput {
        let mut task = OpTask {
            clerk,
            op: Some(op),
            result: None,
            wake_at: 0,
        };
        run_until(self, u64::MAX, &mut [&mut task]);
        task.result
            .unwrap_or_else(|| self.fail("clerk operation did not finish"))
    }

    /// `Get` through `clerk`; a missing key reads as "" (6.824 semantics).
    pub fn get(&mut self, clerk: &mut Clerk, key: &str) -> String {
        self.run_op(clerk, ClerkOp::Get(key.into()))
            .value
            .unwrap_or_default()
    }

    /// `Put` through `clerk`.
    pub fn put(&mut self, clerk: &mut Clerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ClerkOp::Command(KvCommand::Put {
                key: key.into(),
                value: value.into(),
            }),
        );
    }

    /// `Append` through `clerk`.
    pub fn append(&mut self, clerk: &mut Clerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ClerkOp::Command(KvCommand::Append {
                key: key.into(),
                value: value.into(),
            }),
        );
    }

    /// Let `ms` of simulated time pass.
    pub fn sleep(&mut self, ms: u64) {
        let until = self.clock.now() + ms;
        run_until(self, until, &mut []);
    }

    /// Operations clerks completed.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Print the 6.824-style summary and enforce the 120 s (simulated) limit.
    pub fn end(&self, name: &str) {
        let elapsed = self.clock.now() - self.started_at;
        if elapsed > 120_000 {
            self.fail("test took longer than 120 seconds");
        }
        println!(
            "{name} ... Passed -- {:.1}s {} {} {} (seed {})",
            elapsed as f64 / 1000.0,
            self.len(),
            self.rpc_total(),
            self.ops,
            self.options.seed
        );
    }

    fn send_request(&mut self, clerk: &Clerk, server: usize, id: u64, request: ClientRequest) {
        self.net.stats.rpc_total += 1;
        if !self.reach[clerk.index][server] {
            return;
        }
        if let Some(delay) = self.net.fate(&mut self.net_rng, true) {
            let to_incarnation = self.servers[server].incarnation;
            self.clock.schedule(
                self.clock.now() + delay,
                Event::Request {
                    clerk: clerk.index,
                    server,
                    to_incarnation,
                    id,
                    request,
                },
            );
        }
    }

    fn reply(&mut self, server: usize, (clerk, id): (usize, u64), result: ReplyResult) {
        if let Some(delay) = self.net.fate(&mut self.net_rng, false) {
            self.clock.schedule(
                self.clock.now() + delay,
                Event::Reply {
                    clerk,
                    server,
                    id,
                    result,
                },
            );
        }
    }

    // ------------------------------------------------------------------------------------------
    // Server side
    // ------------------------------------------------------------------------------------------

    fn handle_request(&mut self, server: usize, from: (usize, u64), request: ClientRequest) {
        let s = &mut self.servers[server];
        let Some(core) = s.core.as_mut() else {
            return;
        };
        s.next_token += 1;
        let token = s.next_token;
        match request {
            ClientRequest::Get(query) => match core.read_index(token) {
                Ok(()) => {
                    s.reads.insert(token, query);
                    s.waiting.insert(token, from);
                }
                Err(_) => {
                    let hint = core.leader();
                    self.reply(server, from, ReplyResult::WrongLeader(hint));
                }
            },
            ClientRequest::Mutate {
                client,
                seq,
                command,
            } => match s.rsm.prepare(client, seq, &command) {
                Prepared::Answered(output) => self.reply(server, from, ReplyResult::Done(output)),
                Prepared::Stale => {}
                Prepared::Propose(data) => match core.propose(data) {
                    Ok((index, _)) => {
                        s.waiting.insert(token, from);
                        if let Some(done) = s.rsm.track(token, index, client, seq) {
                            self.complete(server, vec![done]);
                        }
                    }
                    Err(_) => {
                        let hint = core.leader();
                        self.reply(server, from, ReplyResult::WrongLeader(hint));
                    }
                },
            },
        }
        self.drain_ready(server);
    }

    fn complete(&mut self, server: usize, completions: Vec<Completion<KvOutput>>) {
        for completion in completions {
            let (token, result) = match completion {
                Completion::Done { token, output } => (token, ReplyResult::Done(output)),
                Completion::Retry { token } => (token, ReplyResult::WrongLeader(None)),
            };
            if let Some(to) = self.servers[server].waiting.remove(&token) {
                self.reply(server, to, result);
            }
        }
    }

    /// The driver contract for server `i`: persist, send, apply; then answer clients and snapshot.
    fn drain_ready(&mut self, i: usize) {
        loop {
            let Some(core) = self.servers[i].core.as_mut() else {
                return;
            };
            if !core.has_ready() {
                return;
            }
            let ready = core.ready();
            self.servers[i].storage.persist_ready(&ready);
            for envelope in ready.messages {
                self.send_raft(envelope);
            }
            let mut completions = Vec::new();
            let s = &mut self.servers[i];
            if let Some(snapshot) = &ready.snapshot_to_apply {
                match s.rsm.apply_snapshot(snapshot) {
                    Ok(done) => completions.extend(done),
                    Err(e) => self.fail(format!("server {i} cannot load a snapshot: {e}")),
                }
            }
            let s = &mut self.servers[i];
            match s.rsm.apply_entries(&ready.committed_entries) {
                Ok(done) => completions.extend(done),
                Err(e) => self.fail(format!("server {i} cannot apply: {e}")),
            }
            let s = &mut self.servers[i];
            for read in &ready.read_states {
                if let Some(query) = s.reads.remove(&read.id) {
                    completions.extend(s.rsm.read(read.id, read.index, query));
                }
            }
            for id in &ready.failed_reads {
                s.reads.remove(id);
                completions.push(Completion::Retry { token: *id });
            }
            let is_leader = ready.soft_state.role == Role::Leader;
            if s.was_leader && !is_leader {
                completions.extend(s.rsm.leadership_lost());
                s.reads.clear();
            }
            s.was_leader = is_leader;
            if let Some(max) = self.options.max_raft_state {
                if s.storage.raft_state_size() >= max {
                    let (index, data) = s.rsm.snapshot();
                    if let Some(core) = s.core.as_mut() {
                        if let Err(e) = core.compact(index, data) {
                            self.fail(format!("server {i} refused its own snapshot: {e}"));
                        }
                    }
                }
            }
            self.complete(i, completions);
        }
    }

    fn send_raft(&mut self, envelope: Envelope) {
        let from = (envelope.from - 1) as usize;
        let to = (envelope.to - 1) as usize;
        let size = encoded_len(&envelope);
        let is_request = envelope.message.is_request();
        if let Some(delay) = self
            .net
            .on_send(&mut self.net_rng, from, to, is_request, size)
        {
            let event = Event::Raft {
                from_incarnation: self.servers[from].incarnation,
                to_incarnation: self.servers[to].incarnation,
                envelope,
                size,
            };
            self.clock.schedule(self.clock.now() + delay, event);
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Tick {
                server,
                incarnation,
            } => {
                if self.servers[server].incarnation != incarnation {
                    return;
                }
                if let Some(core) = self.servers[server].core.as_mut() {
                    core.tick();
                    self.drain_ready(server);
                    let next = self.clock.now() + TICK_MS;
                    self.clock.schedule(
                        next,
                        Event::Tick {
                            server,
                            incarnation,
                        },
                    );
                }
            }
            Event::Raft {
                envelope,
                from_incarnation,
                to_incarnation,
                size,
            } => {
                let from = (envelope.from - 1) as usize;
                let to = (envelope.to - 1) as usize;
                if self.servers[from].incarnation != from_incarnation
                    || self.servers[to].incarnation != to_incarnation
                {
                    return;
                }
                let is_request = envelope.message.is_request();
                if !self.net.on_deliver(from, to, is_request, size) {
                    return;
                }
                if let Some(core) = self.servers[to].core.as_mut() {
                    if let Err(e) = core.step(envelope) {
                        self.fail(format!("server {to} refused a message: {e}"));
                    }
                    self.drain_ready(to);
                }
            }
            Event::Request {
                clerk,
                server,
                to_incarnation,
                id,
                request,
            } => {
                if self.servers[server].incarnation == to_incarnation && self.reach[clerk][server] {
                    self.handle_request(server, (clerk, id), request);
                }
            }
            Event::Reply {
                clerk,
                server,
                id,
                result,
            } => {
                if self.reach[clerk][server] {
                    self.inboxes[clerk].push_back((id, result));
                }
            }
        }
    }
}

impl World for KvCluster {
    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn next_event_time(&self) -> Option<u64> {
        self.clock.next_time()
    }

    fn step_event(&mut self) {
        if let Some(event) = self.clock.pop() {
            self.handle_event(event);
        }
    }

    fn advance_to(&mut self, t: u64) {
        self.clock.advance_to(t);
    }
}

struct InFlight {
    op: ClerkOp,
    request: ClientRequest,
    id: u64,
    server: usize,
    sent_at: u64,
    invoked_at: u64,
}

/// A client of the KV service, as the library's Clerk behaves: it remembers the leader, follows hints,
/// tries the next server on a wrong-leader answer or a timeout, and numbers its commands so that
/// retries are applied once.
pub struct Clerk {
    index: usize,
    client_id: u64,
    seq: u64,
    leader: usize,
    next_request: u64,
    current: Option<InFlight>,
}

impl Clerk {
    /// This clerk's client id (its session in the servers' dedup tables).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Start `op`; drive it with [`Clerk::poll`].
    pub fn begin(&mut self, cluster: &mut KvCluster, op: ClerkOp) {
        let request = match &op {
            ClerkOp::Get(key) => ClientRequest::Get(KvQuery::Get { key: key.clone() }),
            ClerkOp::Command(command) => {
                self.seq += 1;
                ClientRequest::Mutate {
                    client: self.client_id,
                    seq: self.seq,
                    command: command.clone(),
                }
            }
        };
        let now = cluster.now();
        self.current = Some(InFlight {
            op,
            request,
            id: 0,
            server: self.leader,
            sent_at: now,
            invoked_at: now,
        });
        self.send(cluster);
    }

    fn send(&mut self, cluster: &mut KvCluster) {
        let Some(current) = self.current.as_mut() else {
            return;
        };
        self.next_request += 1;
        current.id = self.next_request;
        current.server = self.leader;
        current.sent_at = cluster.now();
        let request = current.request.clone();
        let id = current.id;
        cluster.send_request(self, self.leader, id, request);
    }

    /// Advance the operation: `Some(output)` once it completed (and was recorded in the history).
    pub fn poll(&mut self, cluster: &mut KvCluster) -> Option<KvOutput> {
        let current = self.current.as_ref()?;
        let id = current.id;
        while let Some((reply_id, result)) = cluster.inboxes[self.index].pop_front() {
            if reply_id != id {
                continue; // an answer to an earlier attempt: that attempt was abandoned
            }
            match result {
                ReplyResult::Done(output) => {
                    let finished = self.current.take()?;
                    cluster.record(self.client_id, &finished, &output);
                    return Some(output);
                }
                ReplyResult::WrongLeader(hint) => {
                    self.leader = match hint {
                        Some(h)
                            if (h as usize) <= cluster.len() && h as usize - 1 != self.leader =>
                        {
                            h as usize - 1
                        }
                        _ => (self.leader + 1) % cluster.len(),
                    };
                    self.send(cluster);
                    return None;
                }
            }
        }
        if cluster.now() - current.sent_at >= CLERK_TIMEOUT_MS {
            self.leader = (current.server + 1) % cluster.len();
            self.send(cluster);
        }
        None
    }
}

impl KvCluster {
    fn record(&mut self, client: u64, op: &InFlight, output: &KvOutput) {
        self.ops += 1;
        let invoke = op.invoked_at * 1_000_000;
        let complete = self.clock.now() * 1_000_000;
        let record = match &op.op {
            ClerkOp::Get(key) => Operation::get(client, key, output.value.as_deref()),
            ClerkOp::Command(KvCommand::Put { key, value }) => Operation::put(client, key, value),
            ClerkOp::Command(KvCommand::Append { key, value }) => {
                Operation::append(client, key, value)
            }
            ClerkOp::Command(KvCommand::Delete { key }) => Operation::delete(client, key),
            ClerkOp::Command(KvCommand::Cas {
                key,
                expected,
                value,
            }) => Operation::cas(client, key, expected.as_deref(), Some(value), output.ok),
        };
        self.history.push(record.ok_at(invoke, complete));
    }
}

/// Runs one operation of one clerk to completion.
struct OpTask<'a> {
    clerk: &'a mut Clerk,
    op: Option<ClerkOp>,
    result: Option<KvOutput>,
    wake_at: u64,
}

impl Actor<KvCluster> for OpTask<'_> {
    fn next_wake(&self) -> Option<u64> {
        self.result.is_none().then_some(self.wake_at)
    }

    fn wake(&mut self, cluster: &mut KvCluster) {
        if let Some(op) = self.op.take() {
            self.clerk.begin(cluster, op);
        }
        self.result = self.clerk.poll(cluster);
        // Clerks look for answers every simulated millisecond (the network's time resolution).
        self.wake_at = cluster.now() + 1;
    }
}
