//! One node's durable write on its own: `SledStorage::persist` of a log write (1 or 16 entries of
//! 100 bytes) and a hard state, in a fresh data directory under the system temp dir. Prints p50, p90,
//! p99 and the mean per persist. The floor of every put: a persist is one journal record and one
//! `fdatasync` (`src/raft/journal.rs`); on the 2-core CI VM p50 about 90 µs for one entry, against
//! 175 µs for sled's flush before the journal.
//!
//! Run with `cargo bench --bench raft_storage` (`RAFT_BENCH_PERSISTS` changes the count, default 3000).

use bytes::Bytes;
use ds824::raft::storage::{Identity, SledStorage, Storage};
use ds824::raft::types::{Entry, EntryKind, HardState};
use ds824::raft::{LogWrite, Ready};
use std::time::{Duration, Instant};

fn persists(batch: u64, count: u64) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = Identity {
        cluster: "bench".into(),
        node: 1,
    };
    let mut storage = SledStorage::open(dir.path(), &identity).expect("open storage");
    let mut took = Vec::with_capacity(count as usize);
    for round in 0..count {
        let from = round * batch + 1;
        let entries = (from..from + batch)
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: Bytes::from(vec![b'x'; 100]),
            })
            .collect();
        let ready = Ready {
            log_write: Some(LogWrite { from, entries }),
            hard_state: Some(HardState {
                term: 1,
                vote: Some(1),
                commit: from,
            }),
            ..Ready::default()
        };
        let started = Instant::now();
        storage.persist(&ready).expect("persist");
        took.push(started.elapsed());
    }
    took.sort();
    took
}

fn main() {
    let count = std::env::var("RAFT_BENCH_PERSISTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000u64)
        .max(1);
    for batch in [1, 16] {
        let took = persists(batch, count);
        let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        let mean = took.iter().sum::<Duration>().as_secs_f64() * 1e6 / took.len() as f64;
        println!(
            "persist of {batch} entries: {count} persists, p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, mean {mean:.0} us",
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }
}
