//! `kvd` replicas of one role as real processes on 127.0.0.1: a KV cluster, the shard controllers or one
//! shard group. Shared by the KV and sharded process tests and the shard-move benchmark; each uses a
//! subset.
#![allow(dead_code)]

use ds824::kv::clerk::node_status;
use ds824::proto::kv as pb;
use ds824::proto::kv::kv_client::KvClient;
use ds824::proto::kv::StatusResponse;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest any wait for the cluster may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

pub use crate::ports::free_port;

/// Which `kvd` subcommand the replicas run.
#[derive(Clone, Debug)]
pub enum Role {
    /// `kvd kv`.
    Kv,
    /// `kvd ctrler --shards 10`.
    Ctrler,
    /// `kvd shard --gid GID --ctrlers CTRLERS`.
    Shard { gid: u64, ctrlers: String },
}

/// Replicas of one role: a KV cluster, the controllers (`gid` 0) or shard group `gid`. Every process
/// is killed when the replicas are dropped; on a failing test the last lines of each log are printed.
pub struct Replicas {
    dir: PathBuf,
    /// Owns `dir` when the replicas made it themselves (removed on drop).
    _temp: Option<tempfile::TempDir>,
    role: Role,
    pub gid: u64,
    snapshot_threshold: u64,
    pub addrs: Vec<String>,
    /// Each node's Raft (peer) address.
    pub peer_addrs: Vec<String>,
    pub children: Vec<Option<Child>>,
    /// A CA directory (`kvctl certs init`) to issue each node's certificate from; plaintext without.
    pub tls: Option<PathBuf>,
    /// The `--cluster` each node is started with, if any.
    pub cluster: Option<String>,
    /// More `kvd` flags for every node.
    pub extra_args: Vec<String>,
    /// `--peers` names only the first this many nodes (the group's first configuration); the others
    /// join later ([`Replicas::start_joining`]). `None`: all of them.
    pub bootstrap: Option<usize>,
}

impl Replicas {
    /// Small snapshot thresholds make snapshots (carrying shards, frozen copies and dedup records)
    /// happen mid-test; tests moving megabytes use a large one.
    pub fn start(root: &Path, gid: u64, ctrlers: &str) -> Replicas {
        Self::start_with(root, gid, ctrlers, 4 << 10)
    }

    /// `n` slots for replicas of `role` in a temporary directory, none started yet.
    pub fn prepare_temp(role: Role, n: usize, snapshot_threshold: u64) -> Replicas {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        Self::prepare(dir, Some(temp), role, n, snapshot_threshold)
    }

    /// Three controllers (`gid` 0) or three servers of shard group `gid`, in a directory under `root`.
    pub fn start_with(root: &Path, gid: u64, ctrlers: &str, snapshot_threshold: u64) -> Replicas {
        Self::start_with_args(root, gid, ctrlers, snapshot_threshold, &[])
    }

    /// [`Replicas::start_with`] with more `kvd` flags for every node.
    pub fn start_with_args(
        root: &Path,
        gid: u64,
        ctrlers: &str,
        snapshot_threshold: u64,
        args: &[&str],
    ) -> Replicas {
        let (name, role) = if gid == 0 {
            ("ctrler".to_string(), Role::Ctrler)
        } else {
            let ctrlers = ctrlers.to_string();
            (format!("g{gid}"), Role::Shard { gid, ctrlers })
        };
        Self::start_in(root.join(name), None, role, 3, snapshot_threshold, args)
    }

    /// `n` replicas of `role` in a fresh temporary directory.
    pub fn start_temp(role: Role, n: usize, snapshot_threshold: u64) -> Replicas {
        Self::start_temp_with(role, n, snapshot_threshold, None, None)
    }

    /// [`Replicas::start_temp`] with more `kvd` flags for every node.
    #[allow(dead_code)] // not every test binary passes flags
    pub fn start_temp_args(
        role: Role,
        n: usize,
        snapshot_threshold: u64,
        args: &[&str],
    ) -> Replicas {
        Self::start_temp_full(role, n, snapshot_threshold, None, None, args)
    }

    /// [`Replicas::start_temp`] with TLS from the CA in `tls` and a `--cluster` name.
    pub fn start_temp_with(
        role: Role,
        n: usize,
        snapshot_threshold: u64,
        tls: Option<PathBuf>,
        cluster: Option<String>,
    ) -> Replicas {
        Self::start_temp_full(role, n, snapshot_threshold, tls, cluster, &[])
    }

    /// [`Replicas::start_temp`] with TLS, a `--cluster` name and more `kvd` flags.
    pub fn start_temp_full(
        role: Role,
        n: usize,
        snapshot_threshold: u64,
        tls: Option<PathBuf>,
        cluster: Option<String>,
        args: &[&str],
    ) -> Replicas {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut replicas = Self::prepare(dir, Some(temp), role, n, snapshot_threshold);
        replicas.tls = tls;
        replicas.cluster = cluster;
        replicas.extra_args = args.iter().map(|a| a.to_string()).collect();
        for i in 0..n {
            replicas.start_node(i);
        }
        replicas
    }

    fn start_in(
        dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        role: Role,
        n: usize,
        snapshot_threshold: u64,
        args: &[&str],
    ) -> Replicas {
        let mut replicas = Self::prepare(dir, temp, role, n, snapshot_threshold);
        replicas.extra_args = args.iter().map(|a| a.to_string()).collect();
        for i in 0..n {
            replicas.start_node(i);
        }
        replicas
    }

    fn prepare(
        dir: PathBuf,
        temp: Option<tempfile::TempDir>,
        role: Role,
        n: usize,
        snapshot_threshold: u64,
    ) -> Replicas {
        let gid = match &role {
            Role::Shard { gid, .. } => *gid,
            Role::Kv | Role::Ctrler => 0,
        };
        let replicas = Replicas {
            dir,
            _temp: temp,
            role,
            gid,
            snapshot_threshold,
            addrs: (0..n)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            peer_addrs: (0..n)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            children: (0..n).map(|_| None).collect(),
            tls: None,
            cluster: None,
            extra_args: Vec::new(),
            bootstrap: None,
        };
        std::fs::create_dir_all(&replicas.dir).expect("replicas dir");
        replicas
    }

    /// The certificate role of these replicas.
    fn cert_role(&self) -> String {
        match &self.role {
            Role::Kv => "kv".into(),
            Role::Ctrler => "ctrler".into(),
            Role::Shard { gid, .. } => format!("shard-{gid}"),
        }
    }

    /// How the replicas are named in failure messages.
    pub fn name(&self) -> String {
        match &self.role {
            Role::Kv => "kv".into(),
            Role::Ctrler => "controllers".into(),
            Role::Shard { gid, .. } => format!("group {gid}"),
        }
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", i + 1))
    }

    pub fn peers(&self) -> String {
        self.peer_addrs
            .iter()
            .take(self.bootstrap.unwrap_or(self.peer_addrs.len()))
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's client address, as `--clients` takes them (for leader hints).
    pub fn clients(&self) -> String {
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
        let peers = self.peers();
        self.spawn(i, &["--peers", &peers]);
    }

    /// Start node `i` with `--join` (the client addresses of nodes `via`) instead of `--peers`.
    pub fn start_joining(&mut self, i: usize, via: &[usize]) {
        let join: Vec<&str> = via.iter().map(|&v| self.addrs[v].as_str()).collect();
        let join = join.join(",");
        self.spawn(i, &["--join", &join]);
    }

    /// Start node `i` with `--join` and wait for it to exit (it is expected to refuse to start).
    pub fn run_joining_to_exit(&mut self, i: usize, via: &[usize]) -> std::process::ExitStatus {
        self.start_joining(i, via);
        let mut child = self.children[i].take().expect("spawned");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kvd node {} did not exit", i + 1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kvctl` against the running nodes (an admin certificate with TLS), with `args` after the
    /// global flags.
    pub fn kvctl(&self, args: &[&str]) -> std::process::Output {
        let running: Vec<&str> = (0..self.addrs.len())
            .filter(|&i| self.children[i].is_some())
            .map(|i| self.addrs[i].as_str())
            .collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvctl"));
        let identity = self.tls.as_deref().map(|ca| (ca, "admin", "tests"));
        crate::tls::flags(&mut command, identity);
        command
            .args(["--cluster", &running.join(","), "--timeout-ms", "30000"])
            .args(args)
            .env_remove("KVCTL_CLUSTER")
            .output()
            .expect("run kvctl")
    }

    fn spawn(&mut self, i: usize, membership: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvd"));
        match &self.role {
            Role::Kv => {
                command.arg("kv");
            }
            Role::Ctrler => {
                command.args(["ctrler", "--shards", "10"]);
            }
            Role::Shard { gid, ctrlers } => {
                command.args(["shard", "--gid", &gid.to_string(), "--ctrlers", ctrlers]);
            }
        }
        let (role, name) = (self.cert_role(), (i + 1).to_string());
        let identity = self
            .tls
            .as_deref()
            .map(|ca| (ca, role.as_str(), name.as_str()));
        crate::tls::flags(&mut command, identity);
        if let Some(cluster) = &self.cluster {
            command.args(["--cluster", cluster]);
        }
        let child = command
            .args(["--id", &(i + 1).to_string(), "--listen", &self.addrs[i]])
            .args(["--peer-listen", &self.peer_addrs[i]])
            .args(membership)
            .args(["--clients", &self.clients()])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--snapshot-threshold", &self.snapshot_threshold.to_string()])
            .args(&self.extra_args)
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

    /// SIGTERM node `i` and wait for it to exit on its own.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let mut child = self.children[i].take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "kvd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How a test client connects to these replicas: an admin certificate from their CA, or plaintext.
    pub fn client_security(&self) -> ds824::security::Security {
        match &self.tls {
            Some(ca) => crate::tls::security(ca, "admin", "tests"),
            None => ds824::security::Security::Insecure,
        }
    }

    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        node_status(
            &self.addrs[i],
            Duration::from_millis(500),
            &self.client_security(),
        )
        .await
        .ok()
    }

    /// Poll the running nodes until one leads a term no one else has moved past.
    pub async fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut best: Option<(u64, usize)> = None;
            let mut max_term = 0;
            for i in 0..self.addrs.len() {
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
                "{}: no leader within {WAIT:?}",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll node `i`'s Status until `condition` holds.
    pub async fn wait_for_status(
        &self,
        i: usize,
        what: &str,
        condition: impl Fn(&StatusResponse) -> bool,
    ) -> StatusResponse {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.status(i).await {
                if condition(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} node {} never reached: {what}",
                self.name(),
                i + 1
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
            for i in 0..self.addrs.len() {
                if let Some(s) = self.status(i).await.filter(|s| condition(s)) {
                    statuses.push(s);
                }
            }
            if statuses.len() == self.addrs.len() {
                return statuses;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not every node reached: {what}",
                self.name()
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
            for i in 0..self.addrs.len() {
                if let Ok(log) = std::fs::read_to_string(self.log(i)) {
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    eprintln!("--- last lines of {} node {} ---", self.name(), i + 1);
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

/// One plaintext Get sent straight to the replica at `address` (no clerk: no retry, no redirect), so a
/// test sees what that replica itself answers: its error code and the value, if found.
pub async fn get_at(address: &str, key: &str) -> (pb::ErrorCode, Option<String>) {
    let mut client = KvClient::connect(format!("http://{address}"))
        .await
        .expect("connect");
    let reply = client
        .get(pb::GetRequest { key: key.into() })
        .await
        .expect("get")
        .into_inner();
    (reply.error(), reply.found.then_some(reply.value))
}
