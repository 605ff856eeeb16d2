//! Throughput of the Raft core alone: three `RaftCore`s wired back to back with instant, in-order
//! delivery and no storage, so the numbers measure the protocol's own CPU cost.
//!
//! Reported: committed entries per second on the leader with 1 proposal in flight (each waits for the
//! previous commit) and with 64 in flight (pipelined); and linearizable reads per second one at a
//! time, by ReadIndex (a heartbeat round each) and from the leader's lease (no messages).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ds824::raft::{Config, Envelope, RaftCore};
use std::collections::VecDeque;
use std::hint::black_box;

const ENTRIES_PER_ITERATION: u64 = 1000;

struct Trio {
    nodes: Vec<RaftCore>,
    wire: VecDeque<Envelope>,
    committed: u64,
    reads: u64,
    payload: Bytes,
}

impl Trio {
    fn new(lease_reads: bool) -> Trio {
        let nodes = (1..=3)
            .map(|id| {
                let mut config = Config::new(id, vec![1, 2, 3]);
                config.seed = 7;
                config.lease_reads = lease_reads;
                RaftCore::new(config).expect("valid config")
            })
            .collect();
        let mut trio = Trio {
            nodes,
            wire: VecDeque::new(),
            committed: 0,
            reads: 0,
            payload: Bytes::from(vec![7u8; 100]),
        };
        if lease_reads {
            // A node started with leases refuses votes for its first election timeout, so all tick
            // until one of them wins; leadership then moves to node 1 by a transfer.
            let leader = loop {
                for node in &mut trio.nodes {
                    node.tick();
                }
                trio.pump();
                if let Some(leader) = trio.nodes.iter().position(RaftCore::is_leader) {
                    break leader;
                }
            };
            if leader != 0 {
                let _ = trio.nodes[leader].transfer_leadership(1);
                trio.pump();
            }
        }
        while !trio.nodes[0].is_leader() {
            trio.nodes[0].tick();
            trio.pump();
        }
        // A heartbeat round after the election's no-op commits: what starts a lease.
        for _ in 0..20 {
            for node in &mut trio.nodes {
                node.tick();
            }
            trio.pump();
        }
        trio
    }

    /// Deliver messages and handle every `Ready` until the cluster is quiet.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].has_ready() {
                    continue;
                }
                busy = true;
                let ready = self.nodes[i].ready();
                self.wire.extend(ready.messages);
                if i == 0 {
                    self.reads += ready.read_states.len() as u64;
                }
                if let Some(last) = ready.committed_entries.last() {
                    let applied = last.index;
                    if i == 0 {
                        self.committed += ready.committed_entries.len() as u64;
                    }
                    // Keep memory bounded across millions of entries, as a service snapshotting would.
                    if applied % 10_000 == 0 {
                        let _ = self.nodes[i].compact(applied, Bytes::new());
                    }
                }
            }
            while let Some(envelope) = self.wire.pop_front() {
                busy = true;
                let to = (envelope.to - 1) as usize;
                let _ = self.nodes[to].step(envelope);
            }
            if !busy {
                return;
            }
        }
    }

    /// Commit `count` entries keeping at most `window` proposals uncommitted.
    fn run(&mut self, count: u64, window: u64) {
        let target = self.committed + count;
        let mut proposed = self.committed;
        while self.committed < target {
            while proposed < target && proposed - self.committed < window {
                self.nodes[0]
                    .propose(self.payload.clone())
                    .expect("node 1 leads");
                proposed += 1;
            }
            // Deliver one round at a time so that several proposals really are in flight together.
            self.pump();
        }
    }

    /// Answer `count` reads on the leader, one at a time.
    fn read(&mut self, count: u64) {
        let target = self.reads + count;
        let mut id = self.reads;
        while self.reads < target {
            id += 1;
            self.nodes[0].read_index(id).expect("node 1 leads");
            self.pump();
        }
    }
}

fn committed_entries_per_second(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_core_commit");
    group.throughput(Throughput::Elements(ENTRIES_PER_ITERATION));
    for window in [1u64, 64] {
        let mut trio = Trio::new(false);
        group.bench_function(format!("in_flight_{window}"), |b| {
            b.iter(|| trio.run(black_box(ENTRIES_PER_ITERATION), window))
        });
    }
    group.finish();
}

fn reads_per_second(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_core_read");
    group.throughput(Throughput::Elements(ENTRIES_PER_ITERATION));
    for (name, lease) in [("read_index", false), ("lease", true)] {
        let mut trio = Trio::new(lease);
        group.bench_function(name, |b| {
            b.iter(|| trio.read(black_box(ENTRIES_PER_ITERATION)))
        });
    }
    group.finish();
}

criterion_group!(benches, committed_entries_per_second, reads_per_second);
criterion_main!(benches);
