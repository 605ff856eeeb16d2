//! The floor of a single-client put on this machine, from its two parts measured alone:
//!
//! - one node's durable write: `SledStorage::persist` of a log write (1 or 16 entries of 100 bytes) and a
//!   hard state, in a fresh data directory under the system temp dir. A persist is one journal record
//!   and one `fdatasync` (`src/raft/journal.rs`); on the 2-core CI VM p50 about 90 µs for one entry,
//!   against 175 µs for sled's flush before the journal;
//! - one gRPC unary round trip on loopback, through the same tonic server and channel settings as a
//!   `kvd` and a clerk (plaintext), to a `Kv` service that answers at once.
//!
//! - the same persist in three storages at once (one thread each), as a local three-node cluster's
//!   leader and followers flush together on one disk.
//!
//! A put needs at least the client's round trip to the leader, the leader's round trip to a follower
//! and one persist (the leader's and the followers' run at the same time), so it prints that sum as
//! the floor (and, on a line of its own, that sum with the shared-disk persist). Issue #14 sets a single-client put's p50 at most 1.5 × this floor; `benches/compare-etcd.sh`
//! prints the ratio next to its table, so a machine of any speed can be judged by the same rule.
//!
//! Run with `cargo bench --bench raft_storage` (`RAFT_BENCH_PERSISTS` changes the count of persists,
//! default 3000, and of round trips, twice that).

use bytes::Bytes;
use ds824::proto::kv as pb;
use ds824::proto::kv::kv_server::{Kv, KvServer};
use ds824::raft::storage::{Identity, SledStorage, Storage};
use ds824::raft::types::{Entry, EntryKind, HardState};
use ds824::raft::{LogWrite, Ready};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

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

/// [`persists`] of one entry in `nodes` threads at once, each in a data directory of its own, as the
/// nodes of a cluster on one machine flush at the same moments: all threads' durations, sorted. The
/// disk takes one flush after another, or a few together, so each waits for some of the others'.
fn concurrent_persists(nodes: usize, count: u64) -> Vec<Duration> {
    let start = std::sync::Barrier::new(nodes);
    let mut took: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..nodes)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    persists(1, count)
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("persist thread"))
            .collect()
    });
    took.sort();
    took
}

/// A `Kv` service that answers every Get at once: what is left of a request is tonic, HTTP/2 and TCP.
struct Answering;

#[tonic::async_trait]
impl Kv for Answering {
    type BackupStream = ds824::rsm::service::BackupStream;

    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(pb::GetResponse::default()))
    }

    async fn mutate(
        &self,
        _: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateResponse>, Status> {
        Err(Status::unimplemented("round-trip bench"))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("round-trip bench"))
    }

    async fn backup(
        &self,
        _: Request<ds824::proto::rsm::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        Err(Status::unimplemented("round-trip bench"))
    }
}

/// `count` sequential Gets from one client to [`Answering`] on 127.0.0.1, each timed. The server runs
/// on a runtime of its own threads, as it would in another process.
fn round_trips(count: u64) -> Vec<Duration> {
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    let listener = server_runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1");
    let address = listener.local_addr().expect("local address");
    let routes = tonic::service::Routes::new(KvServer::new(Answering));
    server_runtime.spawn(async move {
        ds824::security::Security::Insecure
            .serve(
                routes,
                listener,
                ds824::security::Admit::Cluster,
                std::future::pending(),
            )
            .await
    });
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    client_runtime.block_on(async {
        let config = ds824::rsm::client::ClerkConfig::default();
        let channel =
            ds824::rsm::client::channel_to(&address.to_string(), &config, None).expect("channel");
        let mut client = ds824::proto::kv::kv_client::KvClient::new(channel);
        let mut took = Vec::with_capacity(count as usize);
        // The first calls connect and warm up; they are not counted.
        for round in 0..count + 100 {
            let started = Instant::now();
            client
                .get(pb::GetRequest { key: "k".into() })
                .await
                .expect("round trip");
            if round >= 100 {
                took.push(started.elapsed());
            }
        }
        took.sort();
        took
    })
}

/// The `q` quantile of sorted durations, in microseconds.
fn quantile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
}

/// p50, p90 and p99 of sorted durations, as the lines of this bench print them.
fn percentiles(sorted: &[Duration]) -> String {
    format!(
        "p50 {:.0} us, p90 {:.0} us, p99 {:.0} us",
        quantile(sorted, 0.5),
        quantile(sorted, 0.9),
        quantile(sorted, 0.99)
    )
}

fn main() {
    let count = std::env::var("RAFT_BENCH_PERSISTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000u64)
        .max(1);
    let mut persist_p50 = 0.0;
    for batch in [1, 16] {
        let took = persists(batch, count);
        let mean = took.iter().sum::<Duration>().as_secs_f64() * 1e6 / took.len() as f64;
        println!(
            "persist of {batch} entries: {count} persists, {}, mean {mean:.0} us",
            percentiles(&took)
        );
        if batch == 1 {
            persist_p50 = quantile(&took, 0.5);
        }
    }
    // A local cluster's three nodes share this disk: the leader's and a follower's flush of one put
    // run at the same time, so the one that commits it may wait behind another node's.
    let shared = concurrent_persists(3, count);
    let shared_p50 = quantile(&shared, 0.5);
    println!(
        "persist of 1 entry, 3 nodes' storages flushing at once on this disk: {} persists, {}",
        shared.len(),
        percentiles(&shared)
    );
    let took = round_trips(2 * count);
    let rtt_p50 = quantile(&took, 0.5);
    println!(
        "gRPC unary round trip on loopback: {} calls, {}",
        took.len(),
        percentiles(&took)
    );
    // Client -> leader, leader -> follower, and one persist (the leader's and the follower's overlap).
    let floor = 2.0 * rtt_p50 + persist_p50;
    println!(
        "floor of a single-client put: {floor:.0} us (2 x round trip p50 + persist p50); \
         issue #14's bound on its p50: 1.5 x floor = {:.0} us",
        1.5 * floor
    );
    println!(
        "the same with the three nodes' flushes sharing this disk: {:.0} us (2 x round trip p50 + the shared persist p50)",
        2.0 * rtt_p50 + shared_p50
    );
}
