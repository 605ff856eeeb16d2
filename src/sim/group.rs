//! One replicated service group in the simulator: each server is the stack the daemons run — a
//! [`crate::raft::RaftCore`] under an [`Rsm`] of the service's state machine — driven by simulated events.
//!
//! A `Group` knows nothing about who calls it: requests come in with an opaque [`ReplyTo`] and every
//! method returns the replies to send, so a world can host one group ([`super::service::ServiceCluster`])
//! or several that call each other ([`super::shardkv::ShardWorld`]) and route replies its own way.

use super::clock::Scheduler;
use super::raft_net::{RaftEvent, RaftNet};
use crate::raft::{Config, NodeId, Role};
use crate::rsm::{Completion, Prepared, Rsm, StateMachine, Token};
use std::collections::HashMap;
use std::fmt::Debug;

/// A service the simulator can run: a state machine whose commands and queries can be cloned and
/// printed, and which may record completed operations for the linearizability checker.
pub trait SimService:
    StateMachine<Command: Clone + Debug, Query: Clone + Debug, Output: Debug> + Sized + 'static
{
    /// The checker's record of a completed operation, if this service's histories are checked.
    fn record(
        _client: u64,
        _op: &ClerkOp<Self>,
        _output: &Self::Output,
    ) -> Option<crate::check::Operation> {
        None
    }
}

/// What a clerk asks for.
pub enum ClerkOp<S: SimService> {
    /// A read (answered after a ReadIndex).
    Query(S::Query),
    /// A command that changes state.
    Command(S::Command),
}

impl<S: SimService> Clone for ClerkOp<S> {
    fn clone(&self) -> Self {
        match self {
            ClerkOp::Query(q) => ClerkOp::Query(q.clone()),
            ClerkOp::Command(c) => ClerkOp::Command(c.clone()),
        }
    }
}

/// What a caller asks a server.
pub enum ClientRequest<S: SimService> {
    /// A read, answered after a ReadIndex.
    Query(S::Query),
    /// A command for the log, numbered for exactly-once.
    Mutate {
        /// The caller's session.
        client: u64,
        /// Its request number.
        seq: u64,
        /// The command.
        command: S::Command,
    },
}

impl<S: SimService> Clone for ClientRequest<S> {
    fn clone(&self) -> Self {
        match self {
            ClientRequest::Query(q) => ClientRequest::Query(q.clone()),
            ClientRequest::Mutate {
                client,
                seq,
                command,
            } => ClientRequest::Mutate {
                client: *client,
                seq: *seq,
                command: command.clone(),
            },
        }
    }
}

/// A server's answer.
#[derive(Debug)]
pub enum ReplyResult<O> {
    /// Applied or read: the output.
    Done(O),
    /// Not the leader (hint: who may be), or the request was lost with leadership: try elsewhere.
    WrongLeader(Option<NodeId>),
    /// Not applied: the client's session had been dropped (ids above this one start afresh).
    SessionExpired(u64),
}

/// Who a reply goes to: (caller, request id), meaningful only to the world.
pub type ReplyTo = (usize, u64);

/// Replies a group produced, for the world to deliver: (answering server, addressee, answer).
pub type Replies<O> = Vec<(usize, ReplyTo, ReplyResult<O>)>;

/// The service half of a server (its Raft half is in `RaftNet`).
struct Server<S: StateMachine> {
    rsm: Rsm<S>,
    waiting: HashMap<Token, ReplyTo>,
    reads: HashMap<Token, S::Query>,
    next_token: Token,
    was_leader: bool,
}

/// One group of servers of service `S`. See the module documentation.
pub struct Group<S: SimService> {
    /// The group's Raft cores, persisters and network.
    pub raft: RaftNet,
    servers: Vec<Server<S>>,
    max_raft_state: Option<usize>,
    fresh: Box<dyn Fn() -> S>,
    /// Followers answer queries too, at the read index their leader confirms (`kvd --follower-reads`).
    pub follower_reads: bool,
    /// Queries confirmed on a server that did not lead (follower reads).
    pub reads_served_by_followers: u64,
}

impl<S: SimService> Group<S> {
    /// A group of `raft.hosts.len()` servers, none running; `fresh` builds the empty state machine a
    /// (re)started server begins with; snapshots are taken when the Raft state reaches
    /// `max_raft_state` bytes.
    pub fn new(raft: RaftNet, max_raft_state: Option<usize>, fresh: Box<dyn Fn() -> S>) -> Self {
        let servers = (0..raft.hosts.len())
            .map(|_| Server {
                rsm: Rsm::new(fresh()),
                waiting: HashMap::new(),
                reads: HashMap::new(),
                next_token: 0,
                was_leader: false,
            })
            .collect();
        Group {
            raft,
            servers,
            max_raft_state,
            fresh,
            follower_reads: false,
            reads_served_by_followers: 0,
        }
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the group has no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Stop server `i`; only its persisted state survives. Requests waiting on it are dropped (their
    /// callers time out, as with a crashed process).
    pub fn shutdown_server(&mut self, i: usize) {
        self.raft.crash(i);
        let server = &mut self.servers[i];
        server.waiting.clear();
        server.reads.clear();
        server.was_leader = false;
    }

    /// (Re)start server `i` from its persisted state with an empty state machine, which Raft refills from
    /// the snapshot and the log.
    pub fn start_server<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
    ) -> Result<Replies<S::Output>, String> {
        self.shutdown_server(i);
        let voters: Vec<NodeId> = (1..=self.len() as NodeId).collect();
        let mut config = Config::new(i as NodeId + 1, voters);
        // As the daemons run: a leader's flush overlaps its followers'.
        config.persist_after_send = true;
        config.election_ticks = 30;
        config.heartbeat_ticks = 10;
        self.raft
            .boot(clock, i, config)
            .map_err(|e| format!("server {i} cannot restart: {e}"))?;
        self.servers[i].rsm = Rsm::new((self.fresh)());
        self.drain_ready(clock, i)
    }

    /// Whether server `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.raft.hosts[i].core.is_some()
    }

    /// Whether server `i` is running and believes it leads.
    pub fn is_leader(&self, i: usize) -> bool {
        self.raft.hosts[i]
            .core
            .as_ref()
            .is_some_and(|c| c.is_leader())
    }

    /// The server that currently believes it leads, if exactly one running server does.
    pub fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.len()).filter(|&i| self.is_leader(i)).collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// The state machine of server `i`, if it is running.
    pub fn machine(&self, i: usize) -> Option<&S> {
        self.is_running(i).then(|| self.servers[i].rsm.machine())
    }

    /// Raft state plus snapshot bytes persisted by server `i`.
    pub fn persisted_size(&self, i: usize) -> usize {
        let storage = &self.raft.hosts[i].storage;
        storage.raft_state_size() + storage.snapshot_size()
    }

    /// Largest Raft state of any server, in bytes.
    pub fn max_raft_state_size(&self) -> usize {
        self.raft
            .hosts
            .iter()
            .map(|h| h.storage.raft_state_size())
            .max()
            .unwrap_or(0)
    }

    /// Largest snapshot of any server, in bytes.
    pub fn max_snapshot_size(&self) -> usize {
        self.raft
            .hosts
            .iter()
            .map(|h| h.storage.snapshot_size())
            .max()
            .unwrap_or(0)
    }

    /// Feed a Raft event of this group.
    pub fn handle_raft<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        event: RaftEvent,
    ) -> Result<Replies<S::Output>, String> {
        match self.raft.handle(clock, event)? {
            Some(server) => self.drain_ready(clock, server),
            None => Ok(Vec::new()),
        }
    }

    /// A request reaches server `i`.
    pub fn handle_request<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
        from: ReplyTo,
        request: ClientRequest<S>,
    ) -> Result<Replies<S::Output>, String> {
        let mut replies = Vec::new();
        let s = &mut self.servers[i];
        let Some(core) = self.raft.hosts[i].core.as_mut() else {
            return Ok(replies);
        };
        s.next_token += 1;
        let token = s.next_token;
        match request {
            ClientRequest::Query(query) => match if self.follower_reads {
                core.read_index_anywhere(token)
            } else {
                core.read_index(token)
            } {
                Ok(()) => {
                    s.reads.insert(token, query);
                    s.waiting.insert(token, from);
                }
                Err(_) => replies.push((i, from, ReplyResult::WrongLeader(core.leader()))),
            },
            ClientRequest::Mutate {
                client,
                seq,
                command,
            } => match s.rsm.prepare(client, seq, 0, &command, clock.now()) {
                Prepared::Answered(output) => replies.push((i, from, ReplyResult::Done(output))),
                Prepared::Expired(mark) => {
                    replies.push((i, from, ReplyResult::SessionExpired(mark)))
                }
                Prepared::Stale => {}
                Prepared::Propose(data) => match core.propose(data) {
                    Ok((index, _)) => {
                        s.waiting.insert(token, from);
                        if let Some(done) = s.rsm.track(token, index, (client, seq, 0)) {
                            Self::complete(i, s, vec![done], &mut replies);
                        }
                    }
                    Err(_) => replies.push((i, from, ReplyResult::WrongLeader(core.leader()))),
                },
            },
        }
        replies.extend(self.drain_ready(clock, i)?);
        Ok(replies)
    }

    /// Propose a command of the service's own (no client waits for it, no session: the state machine
    /// must make it idempotent). Returns whether server `i` is a leader that accepted it.
    pub fn propose<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
        command: &S::Command,
    ) -> Result<(bool, Replies<S::Output>), String> {
        let Some(core) = self.raft.hosts[i].core.as_mut() else {
            return Ok((false, Vec::new()));
        };
        let Prepared::Propose(data) = self.servers[i].rsm.prepare(0, 0, 0, command, clock.now())
        else {
            return Ok((false, Vec::new()));
        };
        let accepted = core.propose(data).is_ok();
        Ok((accepted, self.drain_ready(clock, i)?))
    }

    fn complete(
        i: usize,
        server: &mut Server<S>,
        completions: Vec<Completion<S::Output>>,
        replies: &mut Replies<S::Output>,
    ) {
        for completion in completions {
            let (token, result) = match completion {
                Completion::Done { token, output } => (token, ReplyResult::Done(output)),
                Completion::Retry { token } | Completion::Unknown { token } => {
                    (token, ReplyResult::WrongLeader(None))
                }
                Completion::SessionExpired {
                    token,
                    min_client_id,
                } => (token, ReplyResult::SessionExpired(min_client_id)),
            };
            if let Some(to) = server.waiting.remove(&token) {
                replies.push((i, to, result));
            }
        }
    }

    /// The driver contract for server `i`: persist, send, apply; then answer callers and snapshot.
    fn drain_ready<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
    ) -> Result<Replies<S::Output>, String> {
        let mut replies = Vec::new();
        while let Some(ready) = self.raft.next_ready(clock, i) {
            let mut completions = Vec::new();
            let s = &mut self.servers[i];
            if let Some(snapshot) = &ready.snapshot_to_apply {
                let done = s
                    .rsm
                    .apply_snapshot(snapshot)
                    .map_err(|e| format!("server {i} cannot load a snapshot: {e}"))?;
                completions.extend(done);
            }
            let done = s
                .rsm
                .apply_entries(&ready.committed_entries)
                .map_err(|e| format!("server {i} cannot apply: {e}"))?;
            completions.extend(done);
            for read in &ready.read_states {
                if let Some(query) = s.reads.remove(&read.id) {
                    if ready.soft_state.role != Role::Leader {
                        self.reads_served_by_followers += 1;
                    }
                    completions.extend(s.rsm.read(read.id, read.index, query));
                }
            }
            for failed in &ready.failed_reads {
                s.reads.remove(&failed.id);
                completions.push(Completion::Retry { token: failed.id });
            }
            let is_leader = ready.soft_state.role == Role::Leader;
            if s.was_leader && !is_leader {
                completions.extend(s.rsm.leadership_lost());
                s.reads.clear();
            }
            s.was_leader = is_leader;
            if let Some(max) = self.max_raft_state {
                let host = &mut self.raft.hosts[i];
                if host.storage.raft_state_size() >= max {
                    let (index, data) = s.rsm.snapshot();
                    if let Some(core) = host.core.as_mut() {
                        core.compact(index, data)
                            .map_err(|e| format!("server {i} refused its own snapshot: {e}"))?;
                    }
                }
            }
            Self::complete(i, s, completions, &mut replies);
        }
        Ok(replies)
    }
}
