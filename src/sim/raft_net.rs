//! The Raft half of every simulated world: each server's core, its persister and its incarnation, the
//! tick timers, and Raft messages under the network's fault model. A world (the Raft test cluster, a
//! service cluster) owns a `RaftNet`, forwards [`RaftEvent`]s to it, and handles the `Ready` of whichever
//! server [`RaftNet::handle`] says changed, in its own way.

use super::clock::Scheduler;
use super::net::NetModel;
use super::storage::MemStorage;
use crate::raft::wire::encoded_len;
use crate::raft::{Config, Envelope, RaftCore, Ready, RestoreError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Timer and message events of the Raft layer.
#[derive(Debug)]
pub enum RaftEvent {
    /// Server `server` ticks, if it is still the same incarnation.
    Tick {
        /// The Raft group (worlds with several groups route by it).
        group: usize,
        /// The server.
        server: usize,
        /// Which run of the server scheduled the tick.
        incarnation: u64,
    },
    /// A Raft message arrives.
    Deliver {
        /// The Raft group (worlds with several groups route by it).
        group: usize,
        /// The message.
        envelope: Envelope,
        /// The sender's incarnation when it sent the message.
        from_incarnation: u64,
        /// The receiver's incarnation when the message was sent.
        to_incarnation: u64,
        /// Encoded size, for statistics.
        size: usize,
    },
    /// A leader's write that went out before its flush ([`Ready::persist_after_send`]) is durable, with
    /// every earlier one of the same run.
    Persisted {
        /// The Raft group.
        group: usize,
        /// The server.
        server: usize,
        /// The run of the server that wrote it; a crash in between loses the write.
        incarnation: u64,
        /// Which write (see [`RaftHost::unflushed`]).
        seq: u64,
    },
}

impl RaftEvent {
    /// The Raft group the event belongs to.
    pub fn group(&self) -> usize {
        match self {
            RaftEvent::Tick { group, .. }
            | RaftEvent::Deliver { group, .. }
            | RaftEvent::Persisted { group, .. } => *group,
        }
    }
}

/// One server as Raft sees it.
pub struct RaftHost {
    /// The running core, `None` while crashed.
    pub core: Option<RaftCore>,
    /// What survives a crash.
    pub storage: MemStorage,
    /// Bumped on every crash and restart, so messages and timers of an earlier run are dropped.
    pub incarnation: u64,
    /// A leader's writes whose messages went out before them, in order, numbered: a crash loses them.
    pub unflushed: std::collections::VecDeque<(u64, Ready)>,
    /// The number the next such write gets.
    pub next_write: u64,
}

/// Servers, timers and the faulty network between them.
pub struct RaftNet {
    /// The fault model and statistics.
    pub net: NetModel,
    rng: ChaCha8Rng,
    seed: u64,
    tick_ms: u64,
    /// The servers, numbered from 0 (Raft node `i + 1`).
    pub hosts: Vec<RaftHost>,
    group: usize,
}

impl RaftNet {
    /// `n` servers, none running yet.
    pub fn new(n: usize, reliable: bool, seed: u64, tick_ms: u64) -> Self {
        let mut net = NetModel::new(n);
        net.set_reliable(reliable);
        RaftNet {
            net,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            tick_ms,
            hosts: (0..n)
                .map(|_| RaftHost {
                    core: None,
                    storage: MemStorage::default(),
                    incarnation: 0,
                    unflushed: Default::default(),
                    next_write: 0,
                })
                .collect(),
            group: 0,
        }
    }

    /// Tag this group's events with `group`, for worlds that run several Raft groups.
    pub fn with_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }

    /// Stop server `i`, keeping only its persisted state. Returns whether it was running.
    pub fn crash(&mut self, i: usize) -> bool {
        let host = &mut self.hosts[i];
        let was_running = host.core.take().is_some();
        // What the driver had not flushed is gone with it.
        host.unflushed.clear();
        if was_running {
            host.incarnation += 1;
        }
        was_running
    }

    /// Start server `i` from its persisted state with `config` (its seed is derived from the schedule's
    /// seed and the incarnation) and schedule its first tick.
    pub fn boot<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
        mut config: Config,
    ) -> Result<(), RestoreError> {
        self.crash(i);
        let host = &mut self.hosts[i];
        config.seed = self.seed ^ (host.incarnation + 1).wrapping_mul(0xA24B_AED4);
        host.core = Some(RaftCore::restore(config, host.storage.load())?);
        host.incarnation += 1;
        let first = clock.now() + self.rng.random_range(1..=self.tick_ms);
        clock.schedule(
            first,
            E::from(RaftEvent::Tick {
                group: self.group,
                server: i,
                incarnation: host.incarnation,
            }),
        );
        Ok(())
    }

    /// Hand a message to the network.
    pub fn send<E: From<RaftEvent>>(&mut self, clock: &mut Scheduler<E>, envelope: Envelope) {
        let from = (envelope.from - 1) as usize;
        let to = (envelope.to - 1) as usize;
        let size = encoded_len(&envelope);
        let is_request = envelope.message.is_request();
        if let Some(delay) = self.net.on_send(&mut self.rng, from, to, is_request, size) {
            let event = RaftEvent::Deliver {
                group: self.group,
                from_incarnation: self.hosts[from].incarnation,
                to_incarnation: self.hosts[to].incarnation,
                envelope,
                size,
            };
            clock.schedule(clock.now() + delay, E::from(event));
        }
    }

    /// The driver contract's first steps for server `i`: take its next `Ready`, persist it and send its
    /// messages. Returns it (messages taken) for the world to apply, or `None` when nothing is ready.
    pub fn next_ready<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        i: usize,
    ) -> Option<Ready> {
        let core = self.hosts[i].core.as_mut()?;
        if !core.has_ready() {
            return None;
        }
        let mut ready = core.ready();
        if ready.persist_after_send {
            // Messages first; the flush completes at a random later moment, unless a crash comes first.
            for envelope in std::mem::take(&mut ready.messages) {
                self.send(clock, envelope);
            }
            // Mostly within a tick; a quarter of them several ticks late, so followers often commit
            // without the leader's copy.
            let late = if self.rng.random_bool(0.25) { 5 } else { 1 };
            let delay = self.rng.random_range(0..=late * self.tick_ms);
            let host = &mut self.hosts[i];
            let seq = host.next_write;
            host.next_write += 1;
            let durable = Ready {
                hard_state: ready.hard_state,
                log_write: ready.log_write.clone(),
                ..Ready::default()
            };
            host.unflushed.push_back((seq, durable));
            let event = RaftEvent::Persisted {
                group: self.group,
                server: i,
                incarnation: host.incarnation,
                seq,
            };
            clock.schedule(clock.now() + delay, E::from(event));
            return Some(ready);
        }
        // The ordinary contract: everything earlier, then this, durable before anything is sent.
        self.flush_unflushed(i, u64::MAX);
        self.hosts[i].storage.persist_ready(&ready);
        for envelope in std::mem::take(&mut ready.messages) {
            self.send(clock, envelope);
        }
        Some(ready)
    }

    /// Server `i`'s unflushed writes up to number `upto` reach its disk, in order, and its core hears.
    fn flush_unflushed(&mut self, i: usize, upto: u64) {
        let host = &mut self.hosts[i];
        while host.unflushed.front().is_some_and(|(seq, _)| *seq <= upto) {
            let Some((_, write)) = host.unflushed.pop_front() else {
                break;
            };
            host.storage.persist_ready(&write);
            let last = write.log_write.as_ref().and_then(|w| w.entries.last());
            if let (Some(core), Some(last)) = (host.core.as_mut(), last) {
                core.persisted(last.index, last.term);
            }
        }
    }

    /// Run one Raft event. Returns the server whose core it changed (its `Ready` must be handled now),
    /// or an error if a core refused a message — which the simulator treats as a bug.
    pub fn handle<E: From<RaftEvent>>(
        &mut self,
        clock: &mut Scheduler<E>,
        event: RaftEvent,
    ) -> Result<Option<usize>, String> {
        match event {
            RaftEvent::Tick {
                server,
                incarnation,
                ..
            } => {
                let host = &mut self.hosts[server];
                let Some(core) = host
                    .core
                    .as_mut()
                    .filter(|_| host.incarnation == incarnation)
                else {
                    return Ok(None);
                };
                core.tick();
                clock.schedule(
                    clock.now() + self.tick_ms,
                    E::from(RaftEvent::Tick {
                        group: self.group,
                        server,
                        incarnation,
                    }),
                );
                Ok(Some(server))
            }
            RaftEvent::Deliver {
                envelope,
                from_incarnation,
                to_incarnation,
                size,
                ..
            } => {
                let from = (envelope.from - 1) as usize;
                let to = (envelope.to - 1) as usize;
                // A message from a crashed sender or to a crashed receiver never arrives (labrpc's
                // DeleteServer): no positive reply can escape a server that was killed.
                if self.hosts[from].incarnation != from_incarnation
                    || self.hosts[to].incarnation != to_incarnation
                    || self.hosts[to].core.is_none()
                {
                    return Ok(None);
                }
                if !self
                    .net
                    .on_deliver(from, to, envelope.message.is_request(), size)
                {
                    return Ok(None);
                }
                let Some(core) = self.hosts[to].core.as_mut() else {
                    return Ok(None);
                };
                core.step(envelope)
                    .map_err(|e| format!("server {to} refused a message: {e}"))?;
                Ok(Some(to))
            }
            RaftEvent::Persisted {
                server,
                incarnation,
                seq,
                ..
            } => {
                if self.hosts[server].incarnation != incarnation
                    || self.hosts[server].core.is_none()
                {
                    return Ok(None);
                }
                self.flush_unflushed(server, seq);
                Ok(Some(server))
            }
        }
    }
}
