//! A simulated cluster of servers of any replicated service, with the helpers of 6.824's kvraft and
//! shardctrler `config.go`.
//!
//! Each server is the same stack the daemons run — a [`RaftCore`] under an [`Rsm`] of the service's
//! [`StateMachine`] — driven by the simulator instead of tokio. Clerks ([`Clerk`]) talk to servers through
//! the simulated network with the same fault model as Raft's messages; each clerk reaches the servers the
//! test connects it to, independently of partitions between servers (as in 6.824, where server
//! partitions leave clerks connected). Every completed clerk operation is recorded with its invocation and
//! completion times so the history can be checked for linearizability by [`crate::check`].

use super::clock::{run_until, Actor, Scheduler, World};
pub use super::group::{ClerkOp, SimService};
use super::group::{ClientRequest, Group, Replies, ReplyResult};
use super::raft_net::{RaftEvent, RaftNet};
use crate::check::Operation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// How to build a service cluster.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Number of servers.
    pub servers: usize,
    /// Start with a reliable network.
    pub reliable: bool,
    /// Snapshot when the Raft state reaches this many bytes (6.824's `maxraftstate`); `None` never.
    pub max_raft_state: Option<usize>,
    /// The seed of the whole schedule.
    pub seed: u64,
    /// Servers answer queries on followers too, and clerks send each query to a random server first.
    pub follower_reads: bool,
}

enum Event<S: SimService> {
    Raft(RaftEvent),
    Request {
        clerk: usize,
        server: usize,
        to_incarnation: u64,
        id: u64,
        request: ClientRequest<S>,
    },
    Reply {
        clerk: usize,
        server: usize,
        id: u64,
        result: ReplyResult<S::Output>,
    },
}

/// An event of a service world; opaque outside the simulator.
pub struct ServiceEvent<S: SimService>(Event<S>);

impl<S: SimService> From<RaftEvent> for ServiceEvent<S> {
    fn from(event: RaftEvent) -> Self {
        ServiceEvent(Event::Raft(event))
    }
}

/// A simulated cluster of one service. See the module documentation.
pub struct ServiceCluster<S: SimService> {
    options: ServiceOptions,
    clock: Scheduler<ServiceEvent<S>>,
    group: Group<S>,
    /// Randomness of the clerk-to-server links.
    client_rng: ChaCha8Rng,
    /// Randomness for test decisions.
    pub rng: ChaCha8Rng,
    /// Which server a clerk sends a query to first, with follower reads.
    reader_rng: ChaCha8Rng,
    reach: Vec<Vec<bool>>,
    inboxes: Vec<VecDeque<(u64, ReplyResult<S::Output>)>>,
    history: Vec<Operation>,
    client_ids: u64,
    ops: u64,
    started_at: u64,
}

const TICK_MS: u64 = 10;
/// How long a clerk waits for an answer before trying another server (labrpc's failed `Call`).
const CLERK_TIMEOUT_MS: u64 = 100;

impl<S: SimService + Default> ServiceCluster<S> {
    /// Start `options.servers` servers, all connected.
    pub fn new(options: ServiceOptions) -> Self {
        let n = options.servers;
        let raft = RaftNet::new(n, options.reliable, options.seed, TICK_MS);
        let mut cluster = ServiceCluster {
            group: Group::new(raft, options.max_raft_state, Box::new(S::default)),
            reader_rng: ChaCha8Rng::seed_from_u64(options.seed ^ 0xf0110),
            client_rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(1)),
            rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(0x5EED)),
            options,
            clock: Scheduler::default(),
            reach: Vec::new(),
            inboxes: Vec::new(),
            history: Vec::new(),
            client_ids: 0,
            ops: 0,
            started_at: 0,
        };
        cluster.group.follower_reads = cluster.options.follower_reads;
        for i in 0..n {
            cluster.start_server(i);
        }
        cluster
    }
}

impl<S: SimService> ServiceCluster<S> {
    /// Queries confirmed on a server that did not lead (follower reads).
    pub fn reads_served_by_followers(&self) -> u64 {
        self.group.reads_served_by_followers
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.group.len()
    }

    /// Whether there are no servers.
    pub fn is_empty(&self) -> bool {
        self.group.is_empty()
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

    // ------------------------------------------------------------------------------------------
    // Servers and network
    // ------------------------------------------------------------------------------------------

    /// 6.824 `ShutdownServer`: the server stops; only its persisted state survives.
    pub fn shutdown_server(&mut self, i: usize) {
        self.group.shutdown_server(i);
    }

    /// 6.824 `StartServer`: (re)start server `i` from its persisted state with an empty state machine,
    /// which Raft refills from the snapshot and the log.
    pub fn start_server(&mut self, i: usize) {
        let replies = self.group.start_server(&mut self.clock, i);
        self.send_replies(replies);
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
        self.group.raft.net.set_partition(&labels);
    }

    /// Reconnect every server to every other.
    pub fn connect_all(&mut self) {
        self.group.raft.net.heal_partition();
    }

    /// Make the network (un)reliable.
    pub fn set_reliable(&mut self, reliable: bool) {
        self.group.raft.net.set_reliable(reliable);
    }

    /// Largest Raft state of any server, in bytes.
    pub fn max_raft_state_size(&self) -> usize {
        self.group.max_raft_state_size()
    }

    /// Largest snapshot of any server, in bytes.
    pub fn max_snapshot_size(&self) -> usize {
        self.group.max_snapshot_size()
    }

    /// Requests sent so far.
    pub fn rpc_total(&self) -> u64 {
        self.group.raft.net.stats.rpc_total
    }

    /// The server that currently believes it leads, if exactly one running server does.
    pub fn leader(&self) -> Option<usize> {
        self.group.leader()
    }

    // ------------------------------------------------------------------------------------------
    // Clerks
    // ------------------------------------------------------------------------------------------

    /// A new clerk connected to every server (6.824 `makeClient(all)`).
    pub fn make_clerk(&mut self) -> Clerk<S> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.make_clerk_to(&all)
    }

    /// A new clerk that reaches only `servers`.
    pub fn make_clerk_to(&mut self, servers: &[usize]) -> Clerk<S> {
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
            service: std::marker::PhantomData,
        }
    }

    /// Change which servers a clerk reaches (6.824 `ConnectClient`).
    pub fn connect_clerk(&mut self, clerk: &Clerk<S>, servers: &[usize]) {
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
    pub fn run_op(&mut self, clerk: &mut Clerk<S>, op: ClerkOp<S>) -> S::Output {
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

    fn send_request(
        &mut self,
        clerk: &Clerk<S>,
        server: usize,
        id: u64,
        request: ClientRequest<S>,
    ) {
        self.group.raft.net.stats.rpc_total += 1;
        if !self.reach[clerk.index][server] {
            return;
        }
        if let Some(delay) = self.group.raft.net.fate(&mut self.client_rng, true) {
            let to_incarnation = self.group.raft.hosts[server].incarnation;
            self.clock.schedule(
                self.clock.now() + delay,
                ServiceEvent(Event::Request {
                    clerk: clerk.index,
                    server,
                    to_incarnation,
                    id,
                    request,
                }),
            );
        }
    }

    fn reply(&mut self, server: usize, (clerk, id): (usize, u64), result: ReplyResult<S::Output>) {
        if let Some(delay) = self.group.raft.net.fate(&mut self.client_rng, false) {
            self.clock.schedule(
                self.clock.now() + delay,
                ServiceEvent(Event::Reply {
                    clerk,
                    server,
                    id,
                    result,
                }),
            );
        }
    }

    /// Deliver what the group answered, or fail the test if the group broke.
    fn send_replies(&mut self, replies: Result<Replies<S::Output>, String>) {
        match replies {
            Ok(replies) => {
                for (server, to, result) in replies {
                    self.reply(server, to, result);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn on_event(&mut self, event: ServiceEvent<S>) {
        match event.0 {
            Event::Raft(event) => {
                let replies = self.group.handle_raft(&mut self.clock, event);
                self.send_replies(replies);
            }
            Event::Request {
                clerk,
                server,
                to_incarnation,
                id,
                request,
            } => {
                if self.group.raft.hosts[server].incarnation == to_incarnation
                    && self.reach[clerk][server]
                {
                    let replies =
                        self.group
                            .handle_request(&mut self.clock, server, (clerk, id), request);
                    self.send_replies(replies);
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

impl<S: SimService> World for ServiceCluster<S> {
    type Event = ServiceEvent<S>;

    fn clock(&self) -> &Scheduler<ServiceEvent<S>> {
        &self.clock
    }

    fn clock_mut(&mut self) -> &mut Scheduler<ServiceEvent<S>> {
        &mut self.clock
    }

    fn handle_event(&mut self, event: ServiceEvent<S>) {
        self.on_event(event);
    }
}

struct InFlight<S: SimService> {
    op: ClerkOp<S>,
    request: ClientRequest<S>,
    id: u64,
    server: usize,
    sent_at: u64,
    /// When the operation began, as its history records it ([`Scheduler::history_stamp`]).
    invoked: u64,
}

/// A client of a service, behaving as the library's Clerk does: it remembers the leader, follows hints,
/// tries the next server on a wrong-leader answer or a timeout, and numbers its commands so that
/// retries are applied once.
pub struct Clerk<S: SimService> {
    index: usize,
    client_id: u64,
    seq: u64,
    leader: usize,
    next_request: u64,
    current: Option<InFlight<S>>,
    service: std::marker::PhantomData<S>,
}

impl<S: SimService> Clerk<S> {
    /// This clerk's client id (its session in the servers' dedup tables).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Start `op`; drive it with [`Clerk::poll`].
    pub fn begin(&mut self, cluster: &mut ServiceCluster<S>, op: ClerkOp<S>) {
        let request = match &op {
            ClerkOp::Query(query) => ClientRequest::Query(query.clone()),
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
        // With follower reads a query goes to any server first, as the library's clerk sends it to
        // the next replica in turn; retries follow the leader as for commands.
        let first = match &op {
            ClerkOp::Query(_) if cluster.options.follower_reads => {
                cluster.reader_rng.random_range(0..cluster.len())
            }
            _ => self.leader,
        };
        self.current = Some(InFlight {
            op,
            request,
            id: 0,
            server: first,
            sent_at: now,
            invoked: cluster.clock.history_stamp(),
        });
        self.send_to(cluster, first);
    }

    fn send(&mut self, cluster: &mut ServiceCluster<S>) {
        self.send_to(cluster, self.leader);
    }

    fn send_to(&mut self, cluster: &mut ServiceCluster<S>, server: usize) {
        let Some(current) = self.current.as_mut() else {
            return;
        };
        self.next_request += 1;
        current.id = self.next_request;
        current.server = server;
        current.sent_at = cluster.now();
        let request = current.request.clone();
        let id = current.id;
        cluster.send_request(self, server, id, request);
    }

    /// Advance the operation: `Some(output)` once it completed (and was recorded in the history).
    pub fn poll(&mut self, cluster: &mut ServiceCluster<S>) -> Option<S::Output> {
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
                ReplyResult::SessionExpired(mark) => panic!(
                    "client {} was told its session expired (mark {mark}): the simulator's \
                     policy keeps every session it creates",
                    self.client_id
                ),
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

impl<S: SimService> ServiceCluster<S> {
    fn record(&mut self, client: u64, op: &InFlight<S>, output: &S::Output) {
        self.ops += 1;
        if let Some(record) = S::record(client, &op.op, output) {
            let complete = self.clock.history_stamp();
            self.history.push(record.ok_at(op.invoked, complete));
        }
    }
}

/// Runs one operation of one clerk to completion.
struct OpTask<'a, S: SimService> {
    clerk: &'a mut Clerk<S>,
    op: Option<ClerkOp<S>>,
    result: Option<S::Output>,
    wake_at: u64,
}

impl<S: SimService> Actor<ServiceCluster<S>> for OpTask<'_, S> {
    fn next_wake(&self) -> Option<u64> {
        self.result.is_none().then_some(self.wake_at)
    }

    fn wake(&mut self, cluster: &mut ServiceCluster<S>) {
        if let Some(op) = self.op.take() {
            self.clerk.begin(cluster, op);
        }
        self.result = self.clerk.poll(cluster);
        // Clerks look for answers every simulated millisecond (the network's time resolution).
        self.wake_at = cluster.now() + 1;
    }
}

/// A clerk that runs a fixed list of operations one after another: a client goroutine of the Go tests.
pub struct ScriptClient<S: SimService> {
    /// The clerk doing the work.
    pub clerk: Clerk<S>,
    script: VecDeque<ClerkOp<S>>,
    /// Outputs of the finished operations, in order.
    pub outputs: Vec<S::Output>,
    wake_at: u64,
}

impl<S: SimService> ScriptClient<S> {
    /// A client that will run `script` with `clerk`.
    pub fn new(clerk: Clerk<S>, script: Vec<ClerkOp<S>>) -> Self {
        ScriptClient {
            clerk,
            script: script.into(),
            outputs: Vec::new(),
            wake_at: 0,
        }
    }

    /// Whether every operation finished.
    pub fn done(&self) -> bool {
        self.script.is_empty() && !self.clerk.busy()
    }
}

impl<S: SimService> Actor<ServiceCluster<S>> for ScriptClient<S> {
    fn next_wake(&self) -> Option<u64> {
        (!self.done()).then_some(self.wake_at)
    }

    fn wake(&mut self, cluster: &mut ServiceCluster<S>) {
        if self.clerk.busy() {
            if let Some(output) = self.clerk.poll(cluster) {
                self.outputs.push(output);
            }
        }
        if !self.clerk.busy() {
            if let Some(op) = self.script.pop_front() {
                self.clerk.begin(cluster, op);
            }
        }
        // Clerks look for answers every simulated millisecond (the network's time resolution).
        self.wake_at = cluster.now() + 1;
    }
}

/// Run every client until its script is done.
pub fn run_clients<S: SimService>(
    cluster: &mut ServiceCluster<S>,
    clients: &mut [ScriptClient<S>],
) {
    let mut actors: Vec<&mut dyn Actor<ServiceCluster<S>>> = clients
        .iter_mut()
        .map(|c| c as &mut dyn Actor<ServiceCluster<S>>)
        .collect();
    run_until(cluster, u64::MAX, &mut actors);
}

impl SimService for crate::ctrler::ShardCtrler {}
