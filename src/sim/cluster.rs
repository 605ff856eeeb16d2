//! A simulated Raft cluster with the test helpers of 6.824's Raft `config.go`.
//!
//! Servers are numbered `0..n` as in the Go tests; server `i` is Raft node `i + 1`. Each server is a
//! [`RaftCore`], an in-memory persister ([`MemStorage`]) and the tester's view of what it applied. A
//! single event queue orders ticks and message deliveries by simulated time; test code advances time
//! with [`RaftCluster::sleep`] or runs concurrent clients as [`Actor`]s.
//!
//! The safety checker runs on every `Ready` and every applied entry and fails the test (printing the
//! seed) as soon as any of these breaks:
//! - two servers apply different commands at the same index (across crashes too);
//! - a server applies out of order (each entry must be exactly `last_applied + 1`);
//! - a server's term or commit index goes backwards (across restarts too);
//! - two servers lead the same term;
//! - a new leader lacks an entry that some server already applied (leader completeness);
//! - two configurations committed one after the other differ by more than one voter (single-server
//!   changes), or a server applies a configuration entry it cannot decode.

use super::clock::{run_until, Actor, Scheduler, World};
use super::raft_net::{RaftEvent, RaftNet};
use crate::raft::{
    Config, Entry, EntryKind, Index, Membership, MembershipChange, MembershipError, NodeId,
    NotLeader, RaftCore, Ready, Role, Snapshot, Term,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

/// How the tester's applier treats snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Apply entries, never snapshot (6.824 2A–2C).
    Plain,
    /// Snapshot whenever `(index + 1) % interval == 0` (6.824 2D uses 10). The snapshot holds every
    /// command up to the index, as in the 2022 tester, so it grows with the log.
    Snapshot {
        /// Entries between snapshots.
        interval: u64,
    },
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of servers.
    pub servers: usize,
    /// Start with a reliable network.
    pub reliable: bool,
    /// Snapshot behaviour of the applier.
    pub apply: ApplyMode,
    /// The seed of the whole schedule.
    pub seed: u64,
    /// Simulated milliseconds per Raft tick.
    pub tick_ms: u64,
    /// Election timeout in ticks (see [`Config::election_ticks`]).
    pub election_ticks: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: u32,
    /// See [`Config::noop_on_election`]. Off for the 6.824 scenarios, whose indices assume no no-ops.
    pub noop_on_election: bool,
    /// See [`Config::pre_vote`].
    pub pre_vote: bool,
    /// See [`Config::check_quorum`].
    pub check_quorum: bool,
    /// See [`Config::lease_reads`] (only with `check_quorum`).
    pub lease_reads: bool,
    /// [`RaftCluster::request_read`] asks through [`RaftCore::read_index_anywhere`], so a follower
    /// forwards the read to its leader (follower reads).
    pub follower_reads: bool,
    /// How many of the servers form the first configuration (`None`: all). The others start outside
    /// the group, waiting to be added ([`RaftCluster::change_membership`]).
    pub voters: Option<usize>,
}

impl ClusterOptions {
    /// The settings of the 6.824 Raft tests: 10 ms ticks, heartbeats every 100 ms (10 per second, the
    /// handout's limit), elections after 300–600 ms of silence.
    pub fn new(servers: usize, reliable: bool, seed: u64) -> Self {
        ClusterOptions {
            servers,
            reliable,
            apply: ApplyMode::Plain,
            seed,
            tick_ms: 10,
            election_ticks: 30,
            heartbeat_ticks: 10,
            noop_on_election: false,
            pre_vote: true,
            check_quorum: true,
            lease_reads: false,
            follower_reads: false,
            voters: None,
        }
    }

    /// With a snapshotting applier.
    pub fn snapshots(mut self, interval: u64) -> Self {
        self.apply = ApplyMode::Snapshot { interval };
        self
    }
}

/// What the checker remembers of one server across its restarts.
struct Tracked {
    highest_term: Term,
    highest_commit: Index,
    was_leader: bool,
}

/// The tester's view of one server: what it applied (6.824's `cfg.logs[i]`).
#[derive(Default)]
struct Applier {
    log: BTreeMap<Index, Bytes>,
    last_applied: Index,
}

/// Marker the checker records for no-op entries, so they are compared like commands.
const NOOP_MARKER: &[u8] = b"\0raft-noop";
/// Prefix the checker records before a config entry's bytes.
const CONFIG_MARKER: &[u8] = b"\0raft-config";

/// A simulated cluster. See the module documentation.
pub struct RaftCluster {
    options: ClusterOptions,
    clock: Scheduler<RaftEvent>,
    raft: RaftNet,
    /// Randomness for test decisions, separate from the network's so that each stream is stable.
    pub rng: ChaCha8Rng,
    servers: Vec<Tracked>,
    appliers: Vec<Applier>,
    committed: BTreeMap<Index, (Option<Term>, Bytes)>,
    leaders: HashMap<Term, usize>,
    max_index: Index,
    reads: HashMap<u64, (usize, Index)>,
    next_read_id: u64,
    /// Reads confirmed so far (ReadIndex answers that passed the staleness check).
    pub reads_confirmed: u64,
    /// Of those, reads confirmed on a node that did not lead (follower reads).
    pub follower_reads_confirmed: u64,
    started_at: u64,
    commands_started: u64,
    /// Every configuration committed so far, by index (0: the first one).
    configurations: BTreeMap<Index, Membership>,
}

impl RaftCluster {
    /// Start `options.servers` servers, all connected.
    pub fn new(options: ClusterOptions) -> Self {
        let n = options.servers;
        let mut cluster = RaftCluster {
            raft: RaftNet::new(n, options.reliable, options.seed, options.tick_ms),
            rng: ChaCha8Rng::seed_from_u64(options.seed.wrapping_add(0x5EED)),
            options,
            clock: Scheduler::default(),
            servers: (0..n)
                .map(|_| Tracked {
                    highest_term: 0,
                    highest_commit: 0,
                    was_leader: false,
                })
                .collect(),
            appliers: (0..n).map(|_| Applier::default()).collect(),
            committed: BTreeMap::new(),
            leaders: HashMap::new(),
            max_index: 0,
            reads: HashMap::new(),
            next_read_id: 0,
            reads_confirmed: 0,
            follower_reads_confirmed: 0,
            started_at: 0,
            commands_started: 0,
            configurations: BTreeMap::new(),
        };
        let first = Membership::from_voters(1..=cluster.first_voters() as NodeId);
        cluster.configurations.insert(0, first);
        for i in 0..n {
            cluster.start(i);
        }
        cluster
    }

    /// The seed this schedule was built from.
    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Simulated time in milliseconds.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Fail the test, naming the seed that reproduces it.
    #[track_caller]
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        super::seed::fail(self.options.seed, self.clock.now(), message)
    }

    // ------------------------------------------------------------------------------------------
    // Faults
    // ------------------------------------------------------------------------------------------

    /// Crash server `i` (6.824 `crash1`): disconnect it and lose everything but its persisted state.
    pub fn crash(&mut self, i: usize) {
        self.disconnect(i);
        self.raft.crash(i);
        self.servers[i].was_leader = false;
    }

    /// (Re)start server `i` from its persisted state (6.824 `start1`); crashes it first if it is up,
    /// which disconnects it, so a restarted server talks to nobody until [`RaftCluster::connect`].
    pub fn start(&mut self, i: usize) {
        if self.raft.hosts[i].core.is_some() {
            self.crash(i);
        }
        let voters: Vec<NodeId> = (1..=self.first_voters() as NodeId).collect();
        let mut config = Config::new(i as NodeId + 1, voters);
        // As the daemons run: a leader's flush overlaps its followers'.
        config.persist_after_send = true;
        config.election_ticks = self.options.election_ticks;
        config.heartbeat_ticks = self.options.heartbeat_ticks;
        config.noop_on_election = self.options.noop_on_election;
        config.pre_vote = self.options.pre_vote;
        config.check_quorum = self.options.check_quorum;
        config.lease_reads = self.options.lease_reads && self.options.check_quorum;
        if let Err(e) = self.raft.boot(&mut self.clock, i, config) {
            self.fail(format!(
                "server {i} cannot restart from its own storage: {e}"
            ));
        }
        self.appliers[i] = Applier::default();
        self.drain_ready(i);
    }

    fn first_voters(&self) -> usize {
        self.options
            .voters
            .unwrap_or(self.servers.len())
            .min(self.servers.len())
    }

    /// Ask server `i` to make one configuration change (its core checks that it may, as a leader).
    pub fn change_membership(
        &mut self,
        i: usize,
        change: MembershipChange,
    ) -> Result<(Index, Term), MembershipError> {
        let Some(core) = self.raft.hosts[i].core.as_mut() else {
            return Err(MembershipError::NotLeader(NotLeader::NotLeader {
                leader_hint: None,
            }));
        };
        let accepted = core.propose_membership(change, |_| None)?;
        self.drain_ready(i);
        Ok(accepted)
    }

    /// The configuration server `i` uses, if it is running.
    pub fn membership(&self, i: usize) -> Option<&Membership> {
        Some(self.raft.hosts[i].core.as_ref()?.membership())
    }

    /// The latest configuration committed so far.
    pub fn committed_membership(&self) -> &Membership {
        self.configurations
            .values()
            .next_back()
            .unwrap_or_else(|| self.fail("no configuration recorded"))
    }

    /// Connect server `i` to every other connected server.
    pub fn connect(&mut self, i: usize) {
        self.raft.net.set_connected(i, true);
    }

    /// Cut server `i` off from everyone.
    pub fn disconnect(&mut self, i: usize) {
        self.raft.net.set_connected(i, false);
    }

    /// Whether server `i` is connected.
    pub fn is_connected(&self, i: usize) -> bool {
        self.raft.net.is_connected(i)
    }

    /// Whether server `i` is running.
    pub fn is_alive(&self, i: usize) -> bool {
        self.raft.hosts[i].core.is_some()
    }

    /// Split the servers into groups by label; servers with different labels cannot talk.
    pub fn partition(&mut self, labels: &[u32]) {
        self.raft.net.set_partition(labels);
    }

    /// Remove every partition (disconnections stay).
    pub fn heal_partition(&mut self) {
        self.raft.net.heal_partition();
    }

    /// Make the network (un)reliable.
    pub fn set_reliable(&mut self, reliable: bool) {
        self.raft.net.set_reliable(reliable);
    }

    /// Turn long reordering of responses on or off.
    pub fn set_long_reordering(&mut self, on: bool) {
        self.raft.net.set_long_reordering(on);
    }

    // ------------------------------------------------------------------------------------------
    // The Raft API the Go tests use
    // ------------------------------------------------------------------------------------------

    /// `Start(cmd)` on server `i`: `Some((index, term))` if it is a running leader that accepted it.
    pub fn start_command(&mut self, i: usize, command: Bytes) -> Option<(Index, Term)> {
        let core = self.raft.hosts[i].core.as_mut()?;
        let accepted = core.propose(command).ok()?;
        self.commands_started += 1;
        self.drain_ready(i);
        Some(accepted)
    }

    /// Ask server `i` for a ReadIndex. When it is confirmed, the checker verifies that the read point
    /// is no older than anything applied anywhere when the read was asked (no stale reads).
    pub fn request_read(&mut self, i: usize) -> bool {
        let Some(core) = self.raft.hosts[i].core.as_mut() else {
            return false;
        };
        self.next_read_id += 1;
        let id = self.next_read_id;
        let asked = if self.options.follower_reads {
            core.read_index_anywhere(id)
        } else {
            core.read_index(id)
        };
        if asked.is_err() {
            return false;
        }
        self.reads.insert(id, (i, self.max_index));
        self.drain_ready(i);
        true
    }

    /// `GetState()` of server `i`: its term and whether it believes it leads (`None` if down).
    pub fn state(&self, i: usize) -> Option<(Term, bool)> {
        let core = self.raft.hosts[i].core.as_ref()?;
        Some((core.term(), core.is_leader()))
    }

    /// The core of server `i`, if running.
    pub fn core(&self, i: usize) -> Option<&RaftCore> {
        self.raft.hosts[i].core.as_ref()
    }

    /// Mutable access to the core of server `i` (for reads and compaction in tests).
    pub fn core_mut(&mut self, i: usize) -> Option<&mut RaftCore> {
        self.raft.hosts[i].core.as_mut()
    }

    /// Handle whatever the core of server `i` has ready (after a test called into it directly).
    pub fn flush(&mut self, i: usize) {
        self.drain_ready(i);
    }

    /// 6.824 `RaftStateSize()` of server `i`.
    pub fn raft_state_size(&self, i: usize) -> usize {
        self.raft.hosts[i].storage.raft_state_size()
    }

    /// Largest Raft state size of any server.
    pub fn max_raft_state_size(&self) -> usize {
        (0..self.len())
            .map(|i| self.raft_state_size(i))
            .max()
            .unwrap_or(0)
    }

    /// 6.824 `SnapshotSize()` of server `i`.
    pub fn snapshot_size(&self, i: usize) -> usize {
        self.raft.hosts[i].storage.snapshot_size()
    }

    /// Requests sent so far (6.824 `RpcTotal`).
    pub fn rpc_total(&self) -> u64 {
        self.raft.net.stats.rpc_total
    }

    /// Requests delivered to server `i` (6.824 `rpcCount(i)`).
    pub fn rpc_count(&self, i: usize) -> u64 {
        self.raft.net.stats.requests_delivered[i]
    }

    /// Bytes sent so far (6.824 `BytesTotal`).
    pub fn bytes_total(&self) -> u64 {
        self.raft.net.stats.bytes_total
    }

    /// The highest index any server applied.
    pub fn max_index(&self) -> Index {
        self.max_index
    }

    /// What server `i` applied at `index`, in the tester's view.
    pub fn applied_at(&self, i: usize, index: Index) -> Option<&Bytes> {
        self.appliers[i].log.get(&index)
    }

    /// The last index server `i` applied.
    pub fn last_applied(&self, i: usize) -> Index {
        self.appliers[i].last_applied
    }

    // ------------------------------------------------------------------------------------------
    // Checks (6.824 config.go)
    // ------------------------------------------------------------------------------------------

    /// A leader among the connected servers, waiting up to ~5 s; fails if a term has two leaders.
    pub fn check_one_leader(&mut self) -> usize {
        for _ in 0..10 {
            let pause = self.rng.random_range(450..550);
            self.sleep(pause);
            let mut leaders: BTreeMap<Term, Vec<usize>> = BTreeMap::new();
            for i in 0..self.len() {
                if !self.is_connected(i) {
                    continue;
                }
                if let Some((term, true)) = self.state(i) {
                    leaders.entry(term).or_default().push(i);
                }
            }
            for (term, ids) in &leaders {
                if ids.len() > 1 {
                    self.fail(format!("term {term} has {} (>1) leaders", ids.len()));
                }
            }
            if let Some((_, ids)) = leaders.iter().next_back() {
                return ids[0];
            }
        }
        self.fail("expected one leader, got none")
    }

    /// All connected servers agree on the term; returns it.
    pub fn check_terms(&self) -> Term {
        let mut term = None;
        for i in 0..self.len() {
            if !self.is_connected(i) {
                continue;
            }
            if let Some((t, _)) = self.state(i) {
                match term {
                    None => term = Some(t),
                    Some(existing) if existing != t => self.fail("servers disagree on term"),
                    Some(_) => {}
                }
            }
        }
        term.unwrap_or(0)
    }

    /// No connected server believes it leads.
    pub fn check_no_leader(&self) {
        for i in 0..self.len() {
            if self.is_connected(i) && matches!(self.state(i), Some((_, true))) {
                self.fail(format!(
                    "expected no leader among connected servers, but {i} claims to be leader"
                ));
            }
        }
    }

    /// How many servers applied `index`, and the command (checked to be the same everywhere).
    pub fn n_committed(&self, index: Index) -> (usize, Option<Bytes>) {
        let mut count = 0;
        let mut command: Option<Bytes> = None;
        for applier in &self.appliers {
            if let Some(c) = applier.log.get(&index) {
                if let Some(existing) = &command {
                    if existing != c {
                        self.fail(format!("committed values do not match: index {index}"));
                    }
                }
                count += 1;
                command = Some(c.clone());
            }
        }
        (count, command)
    }

    /// Wait (up to ~30 s) for `n` servers to apply `index`; `None` if some server moved past
    /// `start_term` meanwhile (the caller's leader lost its term).
    pub fn wait(&mut self, index: Index, n: usize, start_term: Option<Term>) -> Option<Bytes> {
        let mut pause = 10;
        for _ in 0..30 {
            if self.n_committed(index).0 >= n {
                break;
            }
            self.sleep(pause);
            if pause < 1000 {
                pause *= 2;
            }
            if let Some(start_term) = start_term {
                let moved_on = (0..self.len())
                    .filter_map(|i| self.state(i))
                    .any(|(term, _)| term > start_term);
                if moved_on {
                    return None;
                }
            }
        }
        let (count, command) = self.n_committed(index);
        if count < n {
            self.fail(format!(
                "only {count} decided for index {index}; wanted {n}"
            ));
        }
        command
    }

    /// 6.824 `one()`: submit `command` until `expected` servers applied it (10 s budget).
    pub fn one(&mut self, command: Bytes, expected: usize, retry: bool) -> Index {
        let mut task = OneTask::new(self, command, expected, retry);
        self.run_actors(&mut [&mut task]);
        task.index
            .unwrap_or_else(|| self.fail("one() did not finish"))
    }

    /// 6.824 `end()`: the 120 s limit, in simulated time.
    pub fn end(&self, name: &str) {
        let elapsed = self.clock.now() - self.started_at;
        if elapsed > 120_000 {
            self.fail("test took longer than 120 seconds");
        }
        println!(
            "{name} ... Passed -- {:.1}s {} {} {} {} (seed {})",
            elapsed as f64 / 1000.0,
            self.len(),
            self.rpc_total(),
            self.bytes_total(),
            self.commands_started,
            self.options.seed
        );
    }

    // ------------------------------------------------------------------------------------------
    // Running the simulation
    // ------------------------------------------------------------------------------------------

    /// Let `ms` of simulated time pass.
    pub fn sleep(&mut self, ms: u64) {
        let until = self.clock.now() + ms;
        self.run_until_with(until, &mut []);
    }

    /// Run until every actor finished.
    pub fn run_actors(&mut self, actors: &mut [&mut dyn Actor<RaftCluster>]) {
        self.run_until_with(u64::MAX, actors);
    }

    /// Run events and actors in time order until `until` (or, with `u64::MAX`, until every actor
    /// finished).
    pub fn run_until_with(&mut self, until: u64, actors: &mut [&mut dyn Actor<RaftCluster>]) {
        run_until(self, until, actors);
    }

    fn on_event(&mut self, event: RaftEvent) {
        match self.raft.handle(&mut self.clock, event) {
            Ok(Some(server)) => self.drain_ready(server),
            Ok(None) => {}
            Err(e) => self.fail(e),
        }
    }

    /// Handle every `Ready` of server `i` as the driver contract says: persist, send, apply.
    fn drain_ready(&mut self, i: usize) {
        while let Some(ready) = self.raft.next_ready(&mut self.clock, i) {
            self.check_ready(i, &ready);
            if let Some(snapshot) = ready.snapshot_to_apply {
                self.apply_snapshot(i, &snapshot);
            }
            for entry in ready.committed_entries {
                self.apply_entry(i, entry);
            }
            for read in ready.read_states {
                let Some((server, bound)) = self.reads.remove(&read.id) else {
                    self.fail(format!("server {i} confirmed unknown read {}", read.id));
                };
                if server != i || read.index < bound {
                    self.fail(format!(
                        "stale read on server {i}: read index {} but index {bound} was applied before the read",
                        read.index
                    ));
                }
                self.reads_confirmed += 1;
                if ready.soft_state.role != Role::Leader {
                    self.follower_reads_confirmed += 1;
                }
            }
            for failed in ready.failed_reads {
                self.reads.remove(&failed.id);
            }
        }
    }

    fn check_ready(&mut self, i: usize, ready: &Ready) {
        let soft = ready.soft_state;
        let server = &self.servers[i];
        if soft.term < server.highest_term {
            self.fail(format!(
                "server {i}'s term went back from {} to {}",
                server.highest_term, soft.term
            ));
        }
        if let Some(hs) = ready.hard_state {
            if hs.commit < server.highest_commit {
                self.fail(format!(
                    "server {i}'s commit index went back from {} to {}",
                    server.highest_commit, hs.commit
                ));
            }
            self.servers[i].highest_commit = hs.commit;
        }
        self.servers[i].highest_term = soft.term;
        let is_leader = soft.role == Role::Leader;
        if is_leader {
            if let Some(&other) = self.leaders.get(&soft.term) {
                if other != i {
                    self.fail(format!(
                        "servers {other} and {i} both lead term {}",
                        soft.term
                    ));
                }
            }
            self.leaders.insert(soft.term, i);
            if !self.servers[i].was_leader {
                self.check_leader_completeness(i);
            }
        }
        self.servers[i].was_leader = is_leader;
    }

    /// Leader completeness: a new leader's log holds every entry any server applied.
    fn check_leader_completeness(&self, i: usize) {
        let Some(core) = self.raft.hosts[i].core.as_ref() else {
            return;
        };
        let log = core.log();
        let from = log.snapshot_meta().index + 1;
        for (&index, (term, command)) in self.committed.range(from..) {
            let Some(entry) = log.entry(index) else {
                self.fail(format!(
                    "leader {i} of term {} lacks committed index {index}",
                    core.term()
                ));
            };
            let same = term.is_none_or(|t| t == entry.term) && entry_payload(entry) == *command;
            if !same {
                self.fail(format!(
                    "leader {i} of term {} has a different entry at committed index {index}",
                    core.term()
                ));
            }
        }
    }

    fn apply_entry(&mut self, i: usize, entry: Entry) {
        let applier = &self.appliers[i];
        if entry.index != applier.last_applied + 1 {
            self.fail(format!(
                "server {i} apply out of order: expected index {}, got {}",
                applier.last_applied + 1,
                entry.index
            ));
        }
        let payload = entry_payload(&entry);
        match self.committed.get(&entry.index) {
            Some((_, existing)) if *existing != payload => self.fail(format!(
                "commit index={} server={i} applied a different command than another server",
                entry.index
            )),
            Some((Some(term), _)) if *term != entry.term => self.fail(format!(
                "commit index={} server={i} applied an entry of term {} but term {} was applied before",
                entry.index, entry.term, term
            )),
            _ => {}
        }
        self.committed
            .insert(entry.index, (Some(entry.term), payload.clone()));
        if entry.kind == EntryKind::Config {
            self.check_configuration(i, &entry);
        }
        let applier = &mut self.appliers[i];
        applier.last_applied = entry.index;
        if entry.kind == EntryKind::Normal {
            applier.log.insert(entry.index, entry.data);
        }
        self.max_index = self.max_index.max(entry.index);
        if let ApplyMode::Snapshot { interval } = self.options.apply {
            if (entry.index + 1).is_multiple_of(interval) {
                let data = encode_snapshot(entry.index, &self.appliers[i].log);
                if let Some(core) = self.raft.hosts[i].core.as_mut() {
                    if let Err(e) = core.compact(entry.index, data) {
                        self.fail(format!("server {i} refused a snapshot: {e}"));
                    }
                }
            }
        }
    }

    /// Single-server changes: a committed configuration differs from the one committed before it
    /// by at most one voter.
    fn check_configuration(&mut self, i: usize, entry: &Entry) {
        let membership = match Membership::decode(&entry.data) {
            Ok(m) => m,
            Err(e) => self.fail(format!(
                "server {i} applied an invalid configuration at index {}: {e}",
                entry.index
            )),
        };
        if let Some((&at, previous)) = self.configurations.range(..entry.index).next_back() {
            if previous.voter_distance(&membership) > 1 {
                self.fail(format!(
                    "configuration at index {} ({membership}) is more than one voter away from the one committed at {at} ({previous})",
                    entry.index
                ));
            }
        }
        self.configurations.insert(entry.index, membership);
    }

    fn apply_snapshot(&mut self, i: usize, snapshot: &Snapshot) {
        let Some((index, log)) = decode_snapshot(&snapshot.data) else {
            self.fail(format!("server {i} delivered an undecodable snapshot"));
        };
        if index != snapshot.meta.index {
            self.fail(format!(
                "server {i} snapshot says index {index} but was delivered as {}",
                snapshot.meta.index
            ));
        }
        for (&k, v) in &log {
            match self.committed.get(&k) {
                Some((_, existing)) if existing != v => self.fail(format!(
                    "server {i}'s snapshot disagrees with a committed command at index {k}"
                )),
                _ => {}
            }
        }
        let applier = &mut self.appliers[i];
        applier.log = log;
        applier.last_applied = index;
    }
}

fn entry_payload(entry: &Entry) -> Bytes {
    match entry.kind {
        EntryKind::Normal => entry.data.clone(),
        EntryKind::Noop => Bytes::from_static(NOOP_MARKER),
        EntryKind::Config => Bytes::from([CONFIG_MARKER, &entry.data[..]].concat()),
    }
}

/// The tester's snapshot: the last included index, then every command up to it (6.824 2022 format).
fn encode_snapshot(index: Index, log: &BTreeMap<Index, Bytes>) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u64(index);
    for (&k, v) in log.range(..=index) {
        buf.put_u64(k);
        buf.put_u32(v.len() as u32);
        buf.put_slice(v);
    }
    buf.freeze()
}

fn decode_snapshot(data: &Bytes) -> Option<(Index, BTreeMap<Index, Bytes>)> {
    let mut buf = data.clone();
    if buf.remaining() < 8 {
        return None;
    }
    let index = buf.get_u64();
    let mut log = BTreeMap::new();
    while buf.has_remaining() {
        if buf.remaining() < 12 {
            return None;
        }
        let k = buf.get_u64();
        let len = buf.get_u32() as usize;
        if buf.remaining() < len {
            return None;
        }
        log.insert(k, buf.split_to(len));
    }
    Some((index, log))
}

/// 6.824 `one()` as an actor, so several can run concurrently.
pub struct OneTask {
    command: Bytes,
    expected: usize,
    retry: bool,
    started: u64,
    next_server: usize,
    polling: Option<(Index, u64)>,
    wake_at: Option<u64>,
    /// The index the command was committed at, once it was.
    pub index: Option<Index>,
}

impl OneTask {
    /// A task that starts now.
    pub fn new(cluster: &RaftCluster, command: Bytes, expected: usize, retry: bool) -> Self {
        OneTask {
            command,
            expected,
            retry,
            started: cluster.now(),
            next_server: 0,
            polling: None,
            wake_at: Some(cluster.now()),
            index: None,
        }
    }
}

impl Actor<RaftCluster> for OneTask {
    fn next_wake(&self) -> Option<u64> {
        self.wake_at
    }

    fn wake(&mut self, cluster: &mut RaftCluster) {
        let now = cluster.now();
        if now - self.started >= 10_000 {
            cluster.fail(format!("one({:?}) failed to reach agreement", self.command));
        }
        if let Some((index, since)) = self.polling {
            let (count, command) = cluster.n_committed(index);
            if count > 0 && count >= self.expected && command.as_ref() == Some(&self.command) {
                self.index = Some(index);
                self.wake_at = None;
                return;
            }
            if now - since < 2_000 {
                self.wake_at = Some(now + 20);
                return;
            }
            if !self.retry {
                cluster.fail(format!("one({:?}) failed to reach agreement", self.command));
            }
            self.polling = None;
        }
        for _ in 0..cluster.len() {
            self.next_server = (self.next_server + 1) % cluster.len();
            let i = self.next_server;
            if !cluster.is_connected(i) {
                continue;
            }
            if let Some((index, _)) = cluster.start_command(i, self.command.clone()) {
                self.polling = Some((index, now));
                self.wake_at = Some(now);
                return;
            }
        }
        self.wake_at = Some(now + 50);
    }
}

impl World for RaftCluster {
    type Event = RaftEvent;

    fn clock(&self) -> &Scheduler<RaftEvent> {
        &self.clock
    }

    fn clock_mut(&mut self) -> &mut Scheduler<RaftEvent> {
        &mut self.clock
    }

    fn handle_event(&mut self, event: RaftEvent) {
        self.on_event(event);
    }
}
