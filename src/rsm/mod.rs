//! The replicated-state-machine layer: everything a service built on Raft needs besides its own logic,
//! written once.
//!
//! A service implements [`StateMachine`] (apply a command, answer a query, snapshot, restore). [`Rsm`]
//! wraps it and owns:
//! - **exactly-once**: every command carries a (client id, sequence number); the session table keeps each
//!   client's last sequence number and output, so a retried command is answered from the table instead of
//!   being applied twice. The table is part of every snapshot;
//! - **proposal tracking**: a proposal waits for its log index; when that index is applied with this
//!   client's command the caller gets the output, when it is applied with anything else (leadership changed
//!   and the entry was replaced) the caller is told to retry elsewhere. A proposal is *expected* before it
//!   is handed to Raft ([`Rsm::expect`]), so an entry applied before its index is known (a one-node
//!   group commits at once) keeps its output for the caller instead of sending it to retry;
//! - **linearizable reads**: a query waits until the state machine applied the ReadIndex Raft confirmed;
//! - **snapshots**: [`Rsm::snapshot`] produces the bytes to hand to Raft's `compact`, and applying a
//!   snapshot restores state and sessions.
//!
//! `Rsm` is sans-IO like the Raft core: the tokio service and the simulator both drive it, so the logic
//! the simulator verifies is the logic the daemons run. Callers identify their waiting requests with
//! opaque [`Token`]s and receive [`Completion`]s.

use crate::proto::rsm as pb;
use crate::raft::{Entry, EntryKind, Index, Snapshot};
use bytes::Bytes;
use prost::Message as _;
use sessions::{LogClock, LogPolicy, Lookup, Owner, SessionRecord, SessionTable};
use std::collections::BTreeMap;
use thiserror::Error;

pub mod answers;
pub mod backup;
pub mod client;
pub mod service;
pub mod sessions;

/// A deterministic state machine replicated through Raft.
///
/// `Clone` must be cheap (persistent or shared structures, like the KV store's `imbl` map): a snapshot
/// is encoded from a clone taken under the service's lock, off the lock (see [`Rsm::snapshot_job`]).
pub trait StateMachine: Clone {
    /// A command that changes state (goes through the log).
    type Command;
    /// A read-only question (answered after a ReadIndex, not logged).
    type Query;
    /// What commands and queries return.
    type Output: Clone;

    /// Whether [`Rsm`] keeps the exactly-once session table. A machine whose dedup records must move
    /// with parts of its state (a shard group's are per shard, so they migrate with the shard) sets this
    /// to false and filters duplicates itself; `Rsm` then still matches proposals to log entries by
    /// (client, seq) but applies every entry.
    const SESSIONS: bool = true;

    /// Apply a command. Must be deterministic: every replica applies the same commands in the same order.
    fn apply(&mut self, command: Self::Command) -> Self::Output;
    /// Answer a query from the current state.
    fn query(&self, query: &Self::Query) -> Self::Output;
    /// Serialize the whole state.
    fn snapshot(&self) -> Bytes;
    /// The length [`StateMachine::encode_snapshot`] will write, if the machine can tell without
    /// encoding; then the snapshot is written once, straight into the snapshot's buffer.
    fn snapshot_len(&self) -> Option<usize> {
        None
    }
    /// Append the serialized state to `out` (what [`StateMachine::snapshot`] returns).
    fn encode_snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.snapshot());
    }
    /// Replace the state with a snapshot.
    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError>;
    /// Encode a command for the log.
    fn encode_command(command: &Self::Command) -> Bytes;
    /// Decode a command from the log.
    fn decode_command(data: &[u8]) -> Result<Self::Command, RsmError>;
    /// Encode an output for the session table.
    fn encode_output(output: &Self::Output) -> Bytes;
    /// Decode an output from the session table.
    fn decode_output(data: &[u8]) -> Result<Self::Output, RsmError>;

    /// What the session table keeps of an output: everything by default. A machine whose outputs can be
    /// large (a failed compare-and-swap returns the current value) keeps a bounded version, so dedup
    /// records stay small; only a retry sees the difference.
    fn remember(output: &Self::Output) -> Self::Output {
        output.clone()
    }

    /// The log's clock and policy as of the command about to be applied (every command's, before it
    /// is applied). Machines that keep their own dedup records (`SESSIONS = false`) expire them by
    /// it; stores hold to its quota.
    fn observe_clock(&mut self, _clock: &LogClock) {}
}

/// Identifies a caller's waiting request.
pub type Token = u64;
/// A client session id.
pub type ClientId = u64;
/// A client's request number; each client has at most one outstanding request, numbered 1, 2, ...
pub type Seq = u64;

/// A sequence number for a service's own proposal (client 0) that a caller waits on. Machines with
/// `SESSIONS = false` ignore it, but `Rsm` matches a waiter to its log entry by (client, seq): a random
/// number keeps one node's internal proposal from being taken for another's that a new leader put at
/// the same index.
pub fn internal_seq() -> Seq {
    rand::random::<u64>() | 1
}

/// Broken input to the replicated state machine.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RsmError {
    /// A log entry or snapshot could not be decoded: the log is corrupt or from another service.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// Entries arrived out of order (a driver bug).
    #[error("entry {got} applied after {applied}")]
    OutOfOrder {
        /// Index applied last.
        applied: Index,
        /// Index received.
        got: Index,
    },
}

/// What to do with a new client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared<O> {
    /// Already applied (a retry): here is its output.
    Answered(O),
    /// Propose these bytes to Raft, then call [`Rsm::track`] with the index it got.
    Propose(Bytes),
    /// The client already moved past this sequence number: the request is stale and must not be applied.
    Stale,
    /// The client's session was dropped (idle too long, or too many sessions): the command must not be
    /// applied under this id; the client starts a new session with an id above the given one.
    Expired(ClientId),
}

/// The end of a waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion<O> {
    /// Applied (or answered); here is the output.
    Done {
        /// The request.
        token: Token,
        /// Its output.
        output: O,
    },
    /// Not applied, or a read not answered, here (the entry was replaced; a read's leader stepped
    /// down): retry, possibly on another node. For a command, the retry is safe: the session table
    /// prevents a double apply.
    Retry {
        /// The request.
        token: Token,
    },
    /// A command proposed here whose outcome this node will not learn: it stopped leading with the
    /// entry in flight, and the next leader may still commit it. Retry elsewhere (the session table
    /// prevents a double apply), but a caller whose retries all fail must not take it as not applied.
    Unknown {
        /// The request.
        token: Token,
    },
    /// The command was not applied because its client's session had been dropped (see
    /// [`sessions`]); the client must start a new session with an id above `min_client_id`.
    SessionExpired {
        /// The request.
        token: Token,
        /// The largest client id the table dropped.
        min_client_id: ClientId,
    },
}

/// What applying a logged command came to.
#[derive(Clone, Debug)]
enum Applied<O> {
    /// Applied now or before (a duplicate): its output.
    Output(O),
    /// Not applied: the client's session had been dropped.
    Expired(ClientId),
}

impl<O: Clone> Applied<O> {
    fn completion(&self, token: Token) -> Completion<O> {
        match self {
            Applied::Output(output) => Completion::Done {
                token,
                output: output.clone(),
            },
            Applied::Expired(min_client_id) => Completion::SessionExpired {
                token,
                min_client_id: *min_client_id,
            },
        }
    }
}

struct PendingWrite {
    token: Token,
    client: ClientId,
    seq: Seq,
    owner: Owner,
}

/// Which client command a proposal is: (client, seq, owner). Two identities' commands under one
/// client id and number are different proposals.
pub type Proposal = (ClientId, Seq, Owner);

/// The index and output of an expected proposal's entry, applied before the proposer tracked it.
type EarlyOutput<O> = (Index, Applied<O>);

/// A state machine with sessions, proposal tracking and read queueing. See the module documentation.
pub struct Rsm<S: StateMachine> {
    machine: S,
    sessions: SessionTable<S::Output>,
    /// Time and policy as of the last applied command (part of the snapshot: expiry is replicated).
    clock: LogClock,
    /// The policy this node stamps on its proposals.
    policy: LogPolicy,
    applied: Index,
    writes: BTreeMap<Index, Vec<PendingWrite>>,
    reads: BTreeMap<Index, Vec<(Token, S::Query)>>,
    /// Proposals handed to Raft whose index is not known yet, with the output of their entry if it was
    /// applied meanwhile. Holds only proposals in flight on this node (callers withdraw theirs).
    /// Keyed by (client, seq, owner): another identity's entry under the same id and number is not
    /// this proposal's.
    expected: BTreeMap<Proposal, Option<EarlyOutput<S::Output>>>,
}

impl<S: StateMachine> Rsm<S> {
    /// Wrap a fresh state machine.
    pub fn new(machine: S) -> Self {
        Self::with_policy(machine, LogPolicy::default())
    }

    /// Wrap a fresh state machine; this node's proposals carry `policy` (when it leads, every replica
    /// drops sessions by it).
    pub fn with_policy(machine: S, policy: LogPolicy) -> Self {
        Rsm {
            machine,
            sessions: SessionTable::default(),
            clock: LogClock::default(),
            policy,
            applied: 0,
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
            expected: BTreeMap::new(),
        }
    }

    /// The wrapped state machine.
    pub fn machine(&self) -> &S {
        &self.machine
    }

    /// The last applied log index.
    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Number of client sessions remembered.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The log's clock and policy as of the last applied command.
    pub fn clock(&self) -> LogClock {
        self.clock
    }

    /// Decide what to do with command `seq` of `client`, sent by `owner` (see [`sessions::Owner`])
    /// and proposed at `now_ms` (the leader's clock, ms since the Unix epoch); both are stamped into
    /// the entry.
    pub fn prepare(
        &self,
        client: ClientId,
        seq: Seq,
        owner: Owner,
        command: &S::Command,
        now_ms: u64,
    ) -> Prepared<S::Output> {
        if S::SESSIONS && client != 0 {
            match self.sessions.lookup(client, seq, owner) {
                Lookup::Repeat(output) => return Prepared::Answered(output.clone()),
                Lookup::Stale(_) => return Prepared::Stale,
                Lookup::Expired(mark) => return Prepared::Expired(mark),
                Lookup::New => {}
            }
        }
        let logged = pb::LoggedCommand {
            client_id: client,
            seq,
            command: S::encode_command(command),
            time_ms: now_ms,
            session_ttl_ms: self.policy.ttl_ms,
            max_sessions: self.policy.max_sessions,
            owner,
            quota_bytes: self.policy.quota_bytes,
        };
        Prepared::Propose(Bytes::from(logged.encode_to_vec()))
    }

    /// (`client`, `seq`) is about to be proposed: if its entry is applied before [`Rsm::track`] learns
    /// its index, keep the output for it. Without this, a machine without sessions (whose outputs are
    /// kept nowhere else) would answer such a proposal "retry", and a one-node group would do so for
    /// most of them. Pair with [`Rsm::track`] or, if the proposal fails, [`Rsm::withdraw`].
    pub fn expect(&mut self, client: ClientId, seq: Seq, owner: Owner) {
        self.expected.insert((client, seq, owner), None);
    }

    /// The proposal of (`client`, `seq`) by `owner` never reached Raft (or its caller gave up):
    /// forget it.
    pub fn withdraw(&mut self, client: ClientId, seq: Seq, owner: Owner) {
        self.expected.remove(&(client, seq, owner));
    }

    /// Raft accepted the proposal for (`client`, `seq`) by `owner` at `index`: wait for it. Returns
    /// the completion at once if that index was already applied meanwhile.
    pub fn track(
        &mut self,
        token: Token,
        index: Index,
        (client, seq, owner): Proposal,
    ) -> Option<Completion<S::Output>> {
        let early = self.expected.remove(&(client, seq, owner)).flatten();
        if let Some((applied_at, applied)) = early.filter(|(at, _)| *at == index) {
            debug_assert!(applied_at <= self.applied);
            return Some(applied.completion(token));
        }
        if index <= self.applied {
            return Some(self.answer_from_session(token, client, seq, owner));
        }
        self.writes.entry(index).or_default().push(PendingWrite {
            token,
            client,
            seq,
            owner,
        });
        None
    }

    /// Raft confirmed `read_index` for a query: answer once applied reaches it.
    pub fn read(
        &mut self,
        token: Token,
        read_index: Index,
        query: S::Query,
    ) -> Option<Completion<S::Output>> {
        if read_index <= self.applied {
            return Some(Completion::Done {
                token,
                output: self.machine.query(&query),
            });
        }
        self.reads
            .entry(read_index)
            .or_default()
            .push((token, query));
        None
    }

    /// The caller of a [`Rsm::read`] queued at `read_index` gave up (timed out or went away): drop the
    /// query. Otherwise a follower that cannot catch up (partitioned after it learnt the read index,
    /// or installing a large snapshot) would hold every read sent to it until it did.
    pub fn withdraw_read(&mut self, token: Token, read_index: Index) {
        if let Some(waiting) = self.reads.get_mut(&read_index) {
            waiting.retain(|(t, _)| *t != token);
            if waiting.is_empty() {
                self.reads.remove(&read_index);
            }
        }
    }

    /// Reads queued until the applied index reaches theirs.
    pub fn queued_reads(&self) -> usize {
        self.reads.values().map(Vec::len).sum()
    }

    /// This node stopped leading: nothing waiting here can be finished here.
    pub fn leadership_lost(&mut self) -> Vec<Completion<S::Output>> {
        let writes = std::mem::take(&mut self.writes)
            .into_values()
            .flatten()
            .map(|w| Completion::Unknown { token: w.token });
        let reads = std::mem::take(&mut self.reads)
            .into_values()
            .flatten()
            .map(|(token, _)| Completion::Retry { token });
        writes.chain(reads).collect()
    }

    /// Load a snapshot (from a leader, or the stored one at start-up).
    pub fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
    ) -> Result<Vec<Completion<S::Output>>, RsmError> {
        if snapshot.meta.index <= self.applied {
            return Ok(Vec::new());
        }
        let decoded =
            pb::Snapshot::decode(snapshot.data.as_ref()).map_err(|e| RsmError::Decode {
                what: "snapshot",
                detail: e.to_string(),
            })?;
        self.machine.restore(&decoded.state)?;
        let records = decoded
            .sessions
            .into_iter()
            .map(|s| {
                let output = S::decode_output(&s.output)?;
                let record = SessionRecord {
                    seq: s.seq,
                    owner: s.owner,
                    output,
                    last_ms: s.last_ms,
                };
                Ok((s.client_id, record))
            })
            .collect::<Result<Vec<_>, RsmError>>()?;
        self.sessions = SessionTable::from_parts(records, decoded.evicted_max);
        self.clock.now_ms = decoded.clock_ms;
        self.applied = snapshot.meta.index;
        Ok(self.settle())
    }

    /// Apply committed entries in order.
    pub fn apply_entries(
        &mut self,
        entries: &[Entry],
    ) -> Result<Vec<Completion<S::Output>>, RsmError> {
        let mut completions = Vec::new();
        for entry in entries {
            if entry.index <= self.applied {
                continue; // covered by a snapshot loaded meanwhile
            }
            if entry.index != self.applied + 1 {
                return Err(RsmError::OutOfOrder {
                    applied: self.applied,
                    got: entry.index,
                });
            }
            self.applied = entry.index;
            let applied_by = match entry.kind {
                EntryKind::Noop | EntryKind::Config => None,
                EntryKind::Normal => Some(self.apply_logged(&entry.data)?),
            };
            if let Some((proposal, applied)) = &applied_by {
                if let Some(slot) = self.expected.get_mut(proposal) {
                    *slot = Some((entry.index, applied.clone()));
                }
            }
            for pending in self.writes.remove(&entry.index).unwrap_or_default() {
                completions.push(match &applied_by {
                    Some(((client, seq, owner), applied))
                        if (*client, *seq, *owner)
                            == (pending.client, pending.seq, pending.owner) =>
                    {
                        applied.completion(pending.token)
                    }
                    _ => Completion::Retry {
                        token: pending.token,
                    },
                });
            }
        }
        completions.extend(self.settle());
        Ok(completions)
    }

    fn apply_logged(&mut self, data: &[u8]) -> Result<(Proposal, Applied<S::Output>), RsmError> {
        let logged = pb::LoggedCommand::decode(data).map_err(|e| RsmError::Decode {
            what: "log entry",
            detail: e.to_string(),
        })?;
        let (client, seq) = (logged.client_id, logged.seq);
        let proposal = (client, seq, logged.owner);
        self.clock.observe(
            logged.time_ms,
            LogPolicy {
                ttl_ms: logged.session_ttl_ms,
                max_sessions: logged.max_sessions,
                quota_bytes: logged.quota_bytes,
            },
        );
        self.machine.observe_clock(&self.clock);
        if !S::SESSIONS || client == 0 {
            // Internal proposals (client 0) and machines that keep their own records apply everything.
            let command = S::decode_command(&logged.command)?;
            return Ok((proposal, Applied::Output(self.machine.apply(command))));
        }
        if !self.clock.plausible(client) {
            return Ok((proposal, Applied::Expired(self.sessions.evicted_max())));
        }
        match self.sessions.lookup(client, seq, logged.owner) {
            // A duplicate in the log (the client retried before learning the outcome): apply nothing.
            Lookup::Repeat(output) | Lookup::Stale(output) => {
                return Ok((proposal, Applied::Output(output.clone())))
            }
            Lookup::Expired(mark) => return Ok((proposal, Applied::Expired(mark))),
            Lookup::New => {}
        }
        let command = S::decode_command(&logged.command)?;
        let output = self.machine.apply(command);
        self.sessions
            .record(client, seq, logged.owner, S::remember(&output), &self.clock);
        Ok((proposal, Applied::Output(output)))
    }

    /// The completion for (`client`, `seq`) whose entry was applied without this node watching (before
    /// it tracked it, or under a snapshot): the session table decides.
    fn answer_from_session(
        &self,
        token: Token,
        client: ClientId,
        seq: Seq,
        owner: Owner,
    ) -> Completion<S::Output> {
        match self.sessions.get(client) {
            // Another identity's session under this id is not this proposal's outcome.
            Some(session)
                if session.seq == seq && (session.owner == 0 || session.owner == owner) =>
            {
                Completion::Done {
                    token,
                    output: session.output.clone(),
                }
            }
            _ => Completion::Retry { token },
        }
    }

    /// Finish whatever the applied index now allows: queued reads, and writes whose index was passed by a
    /// snapshot (they may or may not be in it: the session table decides).
    fn settle(&mut self) -> Vec<Completion<S::Output>> {
        let mut completions = Vec::new();
        let later_reads = self.reads.split_off(&(self.applied + 1));
        for (token, query) in std::mem::replace(&mut self.reads, later_reads)
            .into_values()
            .flatten()
        {
            completions.push(Completion::Done {
                token,
                output: self.machine.query(&query),
            });
        }
        let later_writes = self.writes.split_off(&(self.applied + 1));
        for pending in std::mem::replace(&mut self.writes, later_writes)
            .into_values()
            .flatten()
        {
            completions.push(self.answer_from_session(
                pending.token,
                pending.client,
                pending.seq,
                pending.owner,
            ));
        }
        completions
    }

    /// A snapshot of state and sessions at the applied index, for Raft's `compact`.
    pub fn snapshot(&self) -> (Index, Bytes) {
        self.snapshot_job().encode()
    }

    /// The state and sessions at the applied index, copied cheaply, to encode elsewhere: the service
    /// takes this under its lock and encodes it on a blocking thread while applies and reads go on.
    pub fn snapshot_job(&self) -> SnapshotJob<S> {
        SnapshotJob {
            index: self.applied,
            machine: self.machine.clone(),
            sessions: self.sessions.clone(),
            clock_ms: self.clock.now_ms,
        }
    }
}

/// A consistent copy of an [`Rsm`]'s state at one index, not yet encoded.
pub struct SnapshotJob<S: StateMachine> {
    index: Index,
    machine: S,
    sessions: SessionTable<S::Output>,
    clock_ms: u64,
}

impl<S: StateMachine> SnapshotJob<S> {
    /// The index the snapshot covers.
    pub fn index(&self) -> Index {
        self.index
    }

    /// Encode the snapshot (the expensive part: proportional to the state).
    pub fn encode(self) -> (Index, Bytes) {
        // Everything but the state through prost; the state (field 1, the bulk) written by the machine
        // straight into the output when it knows its length, so it is copied once, not twice.
        let (state, state_len) = match self.machine.snapshot_len() {
            Some(len) => (None, len),
            None => {
                let state = self.machine.snapshot();
                let len = state.len();
                (Some(state), len)
            }
        };
        let rest = pb::Snapshot {
            state: Bytes::new(),
            sessions: self
                .sessions
                .iter()
                .map(|(&client_id, s)| pb::Session {
                    client_id,
                    seq: s.seq,
                    output: S::encode_output(&s.output),
                    last_ms: s.last_ms,
                    owner: s.owner,
                })
                .collect(),
            evicted_max: self.sessions.evicted_max(),
            clock_ms: self.clock_ms,
        };
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let mut out = Vec::with_capacity(
            11 + encoded_len_varint(state_len as u64) + state_len + rest.encoded_len(),
        );
        if state_len > 0 {
            encode_key(1, WireType::LengthDelimited, &mut out);
            encode_varint(state_len as u64, &mut out);
            match state {
                Some(state) => out.extend_from_slice(&state),
                None => self.machine.encode_snapshot(&mut out),
            }
        }
        rest.encode(&mut out)
            .expect("a Vec with room for the whole message");
        (self.index, Bytes::from(out))
    }
}

#[cfg(test)]
mod tests;
