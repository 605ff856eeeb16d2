//! A cluster of real Raft nodes on 127.0.0.1 with sled in temporary directories, shared by the
//! loopback tests and the node benchmark.
//!
//! Each node runs the tonic transport and the tokio driver; a small service applies entries (its state is
//! the list of commands) and snapshots every `compact_every` entries. Crashes abort the node's tasks
//! without any shutdown, then reopen its sled directory.
#![allow(dead_code)]

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ds824::raft::storage::Identity;
use ds824::raft::{
    Applied, EntryKind, Index, NodeConfig, NodeError, RaftHandle, RaftNode, Role, SledStorage,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long any wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// What one node's service applied.
#[derive(Default)]
pub struct ServiceState {
    pub last_applied: Index,
    pub commands: Vec<Bytes>,
    pub snapshots_installed: Vec<Index>,
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

pub struct Cluster {
    pub dirs: Vec<tempfile::TempDir>,
    addrs: Vec<SocketAddr>,
    listeners: Vec<Option<TcpListener>>,
    running: Vec<Option<Running>>,
    pub states: Vec<Arc<Mutex<ServiceState>>>,
    changed: Arc<Notify>,
    compact_every: u64,
    /// Use the daemons' timing (10 ms ticks, elections after 1–2 s) instead of the tests' fast one.
    pub production_timing: bool,
    /// Leaders answer reads from their lease (`kvd --lease-reads`).
    pub lease_reads: bool,
}

impl Cluster {
    pub async fn new(n: usize, compact_every: u64) -> Cluster {
        Self::build(n, compact_every, false, false).await
    }

    /// A cluster with the daemons' production timing.
    pub async fn with_production_timing(n: usize, compact_every: u64) -> Cluster {
        Self::build(n, compact_every, true, false).await
    }

    /// A cluster with the daemons' production timing whose leaders answer reads from their lease.
    pub async fn with_lease_reads(n: usize) -> Cluster {
        Self::build(n, 0, true, true).await
    }

    async fn build(
        n: usize,
        compact_every: u64,
        production_timing: bool,
        lease_reads: bool,
    ) -> Cluster {
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
            production_timing,
            lease_reads,
        };
        for i in 0..n {
            cluster.start(i).await;
        }
        cluster
    }

    pub fn id(i: usize) -> u64 {
        i as u64 + 1
    }

    pub async fn start(&mut self, i: usize) {
        let peers: HashMap<u64, String> = (0..self.addrs.len())
            .filter(|&j| j != i)
            .map(|j| (Self::id(j), format!("http://{}", self.addrs[j])))
            .collect();
        let mut config = NodeConfig::new(Self::id(i), peers);
        config.raft.lease_reads = self.lease_reads;
        if !self.production_timing {
            // Faster elections than production keep the tests short: 50–100 ms of silence.
            config.raft.election_ticks = 10;
            config.raft.heartbeat_ticks = 2;
            config.tick = Duration::from_millis(5);
        }
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
            serve_plain(tonic::service::Routes::new(service), listener).await;
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
    pub async fn crash(&mut self, i: usize) {
        if let Some(running) = self.running[i].take() {
            running.node.abort();
            running.server.abort();
            running.applier.abort();
            running.watcher.abort();
            let _ = running.server.await;
            running.node.join().await;
        }
    }

    pub fn handle(&self, i: usize) -> RaftHandle {
        self.running[i].as_ref().expect("running").node.handle()
    }

    pub fn leader(&self) -> Option<usize> {
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

    pub fn last_applied(&self, i: usize) -> Index {
        self.states[i].lock().expect("lock").last_applied
    }

    pub fn applied(&self, i: usize) -> (Index, Vec<Bytes>) {
        let s = self.states[i].lock().expect("lock");
        (s.last_applied, s.commands.clone())
    }

    /// Wait, woken by every status change and apply, until `condition` holds.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Cluster) -> bool) {
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

    pub async fn wait_for_leader(&self) -> usize {
        self.wait_for("a leader", |c| c.leader().is_some()).await;
        self.leader().expect("leader")
    }

    /// Propose one command through whoever leads, retrying on leader changes; returns its index and the
    /// node that accepted it.
    pub async fn propose(&self, command: Bytes) -> (Index, usize) {
        loop {
            let leader = self.wait_for_leader().await;
            match self.handle(leader).propose(command.clone()).await {
                Ok((index, _)) => return (index, leader),
                Err(NodeError::NotLeader(_)) => continue,
                Err(e) => panic!("propose failed: {e}"),
            }
        }
    }

    /// Propose `commands` through the leader, retrying on leader changes.
    pub async fn propose_all(&self, commands: &[Bytes]) -> Index {
        let mut last = 0;
        for command in commands {
            last = self.propose(command.clone()).await.0;
        }
        last
    }

    pub async fn shutdown(mut self) {
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

pub fn commands(from: usize, to: usize) -> Vec<Bytes> {
    (from..to)
        .map(|n| Bytes::from(format!("cmd-{n}")))
        .collect()
}

pub fn all_have(c: &Cluster, nodes: &[usize], index: Index) -> bool {
    nodes.iter().all(|&i| c.last_applied(i) >= index)
}

/// Serve `routes` on `listener` in plaintext, as the nodes here do, until the task is dropped.
pub async fn serve_plain(routes: tonic::service::Routes, listener: TcpListener) {
    let _ = ds824::security::Security::Insecure
        .serve(
            routes,
            listener,
            ds824::security::Admit::Cluster,
            std::future::pending(),
        )
        .await;
}
