//! Three `kvd` replicas of one role as real processes on 127.0.0.1: the shard controllers or one shard
//! group. Shared by the sharded process tests and the shard-move benchmark; each uses a subset.
#![allow(dead_code)]

use ds824::kv::clerk::node_status;
use ds824::proto::kv::StatusResponse;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest any wait for the cluster may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

pub use crate::ports::free_port;

/// Three replicas of one role: the controllers (`gid` 0) or shard group `gid`. Every process is killed
/// when the group is dropped; on a failing test the last lines of each log are printed.
pub struct Replicas {
    pub dir: PathBuf,
    pub gid: u64,
    ctrlers: String,
    snapshot_threshold: u64,
    pub addrs: Vec<String>,
    pub children: Vec<Option<Child>>,
}

impl Replicas {
    /// Small snapshot thresholds make snapshots (carrying shards, frozen copies and dedup records)
    /// happen mid-test; tests moving megabytes use a large one.
    pub fn start(root: &Path, gid: u64, ctrlers: &str) -> Replicas {
        Self::start_with(root, gid, ctrlers, 4 << 10)
    }

    pub fn start_with(root: &Path, gid: u64, ctrlers: &str, snapshot_threshold: u64) -> Replicas {
        let name = if gid == 0 {
            "ctrler".to_string()
        } else {
            format!("g{gid}")
        };
        let mut replicas = Replicas {
            dir: root.join(name),
            gid,
            ctrlers: ctrlers.to_string(),
            snapshot_threshold,
            addrs: (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            children: (0..3).map(|_| None).collect(),
        };
        std::fs::create_dir_all(&replicas.dir).expect("group dir");
        for i in 0..3 {
            replicas.start_node(i);
        }
        replicas
    }

    pub fn peers(&self) -> String {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}.log", i + 1))
    }

    pub fn start_node(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvd"));
        if self.gid == 0 {
            command.args(["ctrler", "--shards", "10"]);
        } else {
            command.args(["shard", "--gid", &self.gid.to_string()]);
            command.args(["--ctrlers", &self.ctrlers]);
        }
        let child = command
            .args(["--id", &(i + 1).to_string(), "--listen", &self.addrs[i]])
            .args(["--peers", &self.peers()])
            .arg("--data-dir")
            .arg(self.dir.join(format!("node-{}", i + 1)))
            .args(["--snapshot-threshold", &self.snapshot_threshold.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kvd");
        self.children[i] = Some(child);
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
    }

    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        node_status(&self.addrs[i], Duration::from_millis(500))
            .await
            .ok()
    }

    /// Poll the running nodes until one leads a term no one else has moved past.
    pub async fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut best: Option<(u64, usize)> = None;
            let mut max_term = 0;
            for i in 0..3 {
                if self.children[i].is_none() {
                    continue;
                }
                if let Some(s) = self.status(i).await {
                    max_term = max_term.max(s.term);
                    if s.role == "leader" && best.is_none_or(|(t, _)| s.term > t) {
                        best = Some((s.term, i));
                    }
                }
            }
            if let Some((term, i)) = best {
                if term == max_term {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "group {}: no leader within {WAIT:?}",
                self.gid
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll every node until `condition` holds for all of them at once; returns their statuses.
    pub async fn wait_until_all(
        &self,
        what: &str,
        condition: impl Fn(&StatusResponse) -> bool,
    ) -> Vec<StatusResponse> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut statuses = Vec::new();
            for i in 0..3 {
                if let Some(s) = self.status(i).await.filter(|s| condition(s)) {
                    statuses.push(s);
                }
            }
            if statuses.len() == 3 {
                return statuses;
            }
            assert!(
                Instant::now() < deadline,
                "group {}: not every node reached: {what}",
                self.gid
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for mut child in self.children.iter_mut().filter_map(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for i in 0..3 {
                if let Ok(log) = std::fs::read_to_string(self.log(i)) {
                    let tail: Vec<&str> = log.lines().rev().take(25).collect();
                    eprintln!("--- last lines of group {} node {} ---", self.gid, i + 1);
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}
