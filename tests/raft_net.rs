//! Raft over real sockets and real disks: three nodes on 127.0.0.1 with sled in temporary directories.
//!
//! Each node runs the tonic transport and the tokio driver; a small test service applies entries (the
//! state is the list of commands) and snapshots every `compact_every` entries. Crashes abort the node's
//! tasks without any shutdown, then reopen its sled directory.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ds824::raft::storage::Identity;
use ds824::raft::{
    Applied, EntryKind, Index, NodeConfig, NodeError, RaftCore, RaftHandle, RaftNode, Role,
    SledStorage, Storage,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

const WAIT: Duration = Duration::from_secs(20);

/// What one node's service applied.
#[derive(Default)]
struct ServiceState {
    last_applied: Index,
    commands: Vec<Bytes>,
    snapshots_installed: Vec<Index>,
}

fn encode_state(commands: &[Bytes]) -> Bytes {
    let mut buf = BytesMut::new();
    for c in commands {
        buf.put_u32(c.len() as u32);
        buf.put_slice(c);
    }
    buf.freeze()
}

fn decode_state(mut data: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while data.remaining() >= 4 {
        let len = data.get_u32() as usize;
        out.push(data.split_to(len.min(data.remaining())));
    }
    out
}

struct Running {
    node: RaftNode,
    server: JoinHandle<()>,
    applier: JoinHandle<()>,
    watcher: JoinHandle<()>,
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    addrs: Vec<SocketAddr>,
    listeners: Vec<Option<TcpListener>>,
    running: Vec<Option<Running>>,
    states: Vec<Arc<Mutex<ServiceState>>>,
    changed: Arc<Notify>,
    compact_every: u64,
}

impl Cluster {
    async fn new(n: usize, compact_every: u64) -> Cluster {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr"));
            listeners.push(Some(listener));
        }
        let mut cluster = Cluster {
            dirs: (0..n)
                .map(|_| tempfile::tempdir().expect("temp dir"))
                .collect(),
            addrs,
            listeners,
            running: (0..n).map(|_| None).collect(),
            states: (0..n).map(|_| Arc::default()).collect(),
            changed: Arc::new(Notify::new()),
            compact_every,
        };
        for i in 0..n {
            cluster.start(i).await;
        }
        cluster
    }

    fn id(i: usize) -> u64 {
        i as u64 + 1
    }

    async fn start(&mut self, i: usize) {
        let peers: HashMap<u64, String> = (0..self.addrs.len())
            .filter(|&j| j != i)
            .map(|j| (Self::id(j), format!("http://{}", self.addrs[j])))
            .collect();
        let mut config = NodeConfig::new(Self::id(i), peers);
        // Faster elections than production keep the tests short: 50–100 ms of silence.
        config.raft.election_ticks = 10;
        config.raft.heartbeat_ticks = 2;
        config.tick = Duration::from_millis(5);
        let identity = Identity {
            cluster: "raft-net-test".into(),
            node: Self::id(i),
        };
        let storage = open_storage(self.dirs[i].path(), &identity).await;
        let (node, mut applied) = RaftNode::start(config, storage).expect("node starts");
        let listener = match self.listeners[i].take() {
            Some(listener) => listener,
            None => rebind(self.addrs[i]).await,
        };
        let service = node.service();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        // A fresh process knows nothing: its state comes from the snapshot and the log replay.
        *self.states[i].lock().expect("lock") = ServiceState::default();
        let state = self.states[i].clone();
        let changed = self.changed.clone();
        let handle = node.handle();
        let compact_every = self.compact_every;
        let applier = tokio::spawn(async move {
            while let Some(item) = applied.recv().await {
                let mut compact = None;
                {
                    let mut s = state.lock().expect("lock");
                    match item {
                        Applied::Snapshot(snapshot) => {
                            s.commands = decode_state(snapshot.data);
                            s.last_applied = snapshot.meta.index;
                            s.snapshots_installed.push(snapshot.meta.index);
                        }
                        Applied::Entries(entries) => {
                            for entry in entries {
                                assert_eq!(entry.index, s.last_applied + 1, "applied out of order");
                                s.last_applied = entry.index;
                                if entry.kind == EntryKind::Normal {
                                    s.commands.push(entry.data);
                                }
                                if compact_every > 0 && entry.index % compact_every == 0 {
                                    compact = Some((entry.index, encode_state(&s.commands)));
                                }
                            }
                        }
                    }
                }
                if let Some((index, data)) = compact {
                    let _ = handle.compact(index, data).await;
                }
                changed.notify_waiters();
            }
        });
        let mut status = node.handle().subscribe();
        let changed = self.changed.clone();
        let watcher = tokio::spawn(async move {
            while status.changed().await.is_ok() {
                changed.notify_waiters();
            }
        });
        self.running[i] = Some(Running {
            node,
            server,
            applier,
            watcher,
        });
    }

    /// Kill node `i` as abruptly as the process allows: its tasks stop wherever they are.
    async fn crash(&mut self, i: usize) {
        if let Some(running) = self.running[i].take() {
            running.node.abort();
            running.server.abort();
            running.applier.abort();
            running.watcher.abort();
            let _ = running.server.await;
            running.node.join().await;
        }
    }

    fn handle(&self, i: usize) -> RaftHandle {
        self.running[i].as_ref().expect("running").node.handle()
    }

    fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                self.running[i]
                    .as_ref()
                    .is_some_and(|r| r.node.handle().status().raft.role == Role::Leader)
            })
            .collect();
        match leaders.as_slice() {
            [only] => Some(*only),
            _ => None,
        }
    }

    fn applied(&self, i: usize) -> (Index, Vec<Bytes>) {
        let s = self.states[i].lock().expect("lock");
        (s.last_applied, s.commands.clone())
    }

    /// Wait, woken by every status change and apply, until `condition` holds.
    async fn wait_for(&self, what: &str, condition: impl Fn(&Cluster) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return;
            }
            // A heartbeat-driven status change arrives at least every few ms while a cluster runs;
            // the short cap only guards against a condition that changes without a notification.
            let cap = Duration::from_millis(200);
            if tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + cap), notified)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                panic!("timed out waiting for {what}");
            }
        }
    }

    async fn wait_for_leader(&self) -> usize {
        self.wait_for("a leader", |c| c.leader().is_some()).await;
        self.leader().expect("leader")
    }

    /// Propose `commands` through the leader, retrying on leader changes.
    async fn propose_all(&self, commands: &[Bytes]) -> Index {
        let mut last = 0;
        for command in commands {
            loop {
                let leader = self.wait_for_leader().await;
                match self.handle(leader).propose(command.clone()).await {
                    Ok((index, _)) => {
                        last = index;
                        break;
                    }
                    Err(NodeError::NotLeader(_)) => continue,
                    Err(e) => panic!("propose failed: {e}"),
                }
            }
        }
        last
    }

    async fn shutdown(mut self) {
        for i in 0..self.running.len() {
            self.crash(i).await;
        }
    }
}

async fn open_storage(dir: &std::path::Path, identity: &Identity) -> SledStorage {
    // After an abort, the previous instance's sled handle closes once its blocking flush returns.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match SledStorage::open(dir, identity) {
            Ok(storage) => return storage,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("retrying open: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot reopen {}: {e}", dir.display()),
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

fn commands(from: usize, to: usize) -> Vec<Bytes> {
    (from..to)
        .map(|n| Bytes::from(format!("cmd-{n}")))
        .collect()
}

fn all_have(c: &Cluster, nodes: &[usize], index: Index) -> bool {
    nodes.iter().all(|&i| c.applied(i).0 >= index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_replicate() {
    let cluster = Cluster::new(3, 0).await;
    cluster.wait_for_leader().await;
    let sent = commands(0, 100);
    let last = cluster.propose_all(&sent).await;
    cluster
        .wait_for("all three to apply", |c| all_have(c, &[0, 1, 2], last))
        .await;
    for i in 0..3 {
        assert_eq!(
            cluster.applied(i).1,
            sent,
            "node {} applied something else",
            i + 1
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_its_leader_crashing_and_the_leader_recovers_from_disk() {
    let mut cluster = Cluster::new(3, 0).await;
    let first = commands(0, 50);
    let last = cluster.propose_all(&first).await;
    cluster
        .wait_for("all three to apply", |c| all_have(c, &[0, 1, 2], last))
        .await;
    let old = cluster.wait_for_leader().await;
    cluster.crash(old).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    cluster
        .wait_for("a new leader", |c| c.leader().is_some_and(|l| l != old))
        .await;
    let second = commands(50, 100);
    let last = cluster.propose_all(&second).await;
    cluster
        .wait_for("the survivors to apply", |c| all_have(c, &survivors, last))
        .await;
    // The old leader comes back from its sled directory and catches up.
    cluster.start(old).await;
    cluster
        .wait_for("the old leader to catch up", |c| all_have(c, &[old], last))
        .await;
    let expected: Vec<Bytes> = first.into_iter().chain(second).collect();
    for i in 0..3 {
        assert_eq!(cluster.applied(i).1, expected, "node {}", i + 1);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_compacted_entries_catches_up_by_snapshot() {
    let mut cluster = Cluster::new(3, 50).await;
    let leader = cluster.wait_for_leader().await;
    let lagging = (leader + 1) % 3;
    cluster.crash(lagging).await;
    let sent = commands(0, 300);
    let last = cluster.propose_all(&sent).await;
    let live: Vec<usize> = (0..3).filter(|&i| i != lagging).collect();
    cluster
        .wait_for("the live nodes to apply", |c| all_have(c, &live, last))
        .await;
    cluster
        .wait_for("the leader to compact", |c| {
            c.leader()
                .is_some_and(|l| c.handle(l).status().raft.snapshot_index >= 250)
        })
        .await;
    cluster.start(lagging).await;
    cluster
        .wait_for("the lagging node to catch up", |c| {
            all_have(c, &[lagging], last)
        })
        .await;
    let installed = cluster.states[lagging]
        .lock()
        .expect("lock")
        .snapshots_installed
        .clone();
    assert!(
        installed.iter().any(|&i| i >= 250),
        "expected a snapshot install, saw {installed:?}"
    );
    assert_eq!(cluster.applied(lagging).1, sent);
    // Compaction removed the covered entries from disk on the leader too.
    let status = cluster.handle(cluster.wait_for_leader().await).status();
    assert!(status.raft.first_index > 250, "{status:?}");
    cluster.shutdown().await;
}

/// A vote is a promise: persisted before it is sent, and still binding after a restart.
#[test]
fn a_node_never_votes_twice_in_a_term_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = Identity {
        cluster: "votes".into(),
        node: 1,
    };
    let config = ds824::raft::Config::new(1, vec![1, 2, 3]);
    let vote_request = |from: u64| ds824::raft::Envelope {
        from,
        to: 1,
        message: ds824::raft::Message::RequestVote {
            term: 5,
            last_log_index: 0,
            last_log_term: 0,
            pre_vote: false,
            leadership_transfer: false,
        },
    };
    let granted = |ready: &ds824::raft::Ready| {
        ready.messages.iter().any(|m| {
            matches!(
                m.message,
                ds824::raft::Message::RequestVoteResponse { granted: true, .. }
            )
        })
    };
    {
        let mut storage = SledStorage::open(dir.path(), &identity).expect("open");
        let mut core =
            RaftCore::restore(config.clone(), storage.load().expect("load")).expect("core");
        core.step(vote_request(2)).expect("step");
        let ready = core.ready();
        assert!(granted(&ready), "first vote in term 5 must be granted");
        storage.persist(&ready).expect("persist");
    }
    let storage = SledStorage::open(dir.path(), &identity).expect("reopen");
    let mut core = RaftCore::restore(config, storage.load().expect("load")).expect("core");
    assert_eq!(core.status().vote, Some(2));
    core.step(vote_request(3)).expect("step");
    assert!(
        !granted(&core.ready()),
        "a second vote in term 5 was granted"
    );
}
