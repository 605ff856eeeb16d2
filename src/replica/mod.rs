//! One replica of any replicated service (the KV store, the shard controller or a shard group) as a
//! running server: sled storage, the Raft node, two tonic servers (the client port with the role's
//! services, and the peer port with Raft, which only the group's own members may use: as etcd's
//! client and peer URLs), the shard group's driver and the metrics endpoint. Both ports speak the
//! process's [`Security`]: with TLS, every caller is the identity in its certificate and every
//! service checks what that identity may do.
//!
//! This is the composition at the top of the library: it is the only module that knows every service,
//! so no service has to know another (raft ← rsm ← kv/ctrler ← shardkv ← replica ← bin). [`args`]
//! parses the command-line values the daemon needs.
//!
//! Why split [`Replica::start`] from [`Replica::run`]: everything that can go wrong because of the
//! operator's input (flags, address in use, someone else's data dir) fails in `start`, before serving,
//! so the daemon can report it as a usage error; `run` only fails if the node breaks while serving.

pub mod admin;
pub mod args;

use crate::ctrler::service::CtrlerService;
use crate::kv::service::KvService;
use crate::metrics::{RaftGauges, ServiceMetrics};
use crate::proto::ctrler::ctrler_server::CtrlerServer;
use crate::raft::{Identity, NodeConfig, NodeError, NodeId, RaftNode, SledStorage, StorageError};
use crate::rsm::service::{ServiceConfig, ServiceError};
use crate::security::{Admit, Principal, Role, Security, SecurityError};
use crate::shardkv::driver::DriverConfig;
use crate::shardkv::metrics::ShardGauges;
use crate::shardkv::service::ShardGroupServices;
use prometheus::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// Which replicated service a node runs. The storage identity records it, so a data directory of one
/// role (or of one shard group) is never opened by another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceRole {
    /// The key/value store.
    Kv,
    /// The shard controller, with the shard count fixed at creation.
    Ctrler {
        /// Number of shards.
        shards: usize,
        /// See [`crate::ctrler::CtrlerService::start`].
        keep_configs: u64,
    },
    /// A replica of shard group `gid` of the sharded KV store. Also serves `ShardTransfer` (other
    /// groups pull shards from it) and runs the group's driver, which follows the controllers.
    Shard {
        /// The group id (non-zero), as joined to the controllers.
        gid: u64,
        /// The shard controllers' addresses (`host:port`).
        ctrlers: Vec<String>,
    },
}

impl ServiceRole {
    /// The cluster name stored in the data directory's identity. A shard group's includes its gid: a
    /// replica restarted with the wrong `--gid` would otherwise adopt another group's shards.
    pub fn cluster_name(&self) -> String {
        match self {
            ServiceRole::Kv => "kv".into(),
            ServiceRole::Ctrler { .. } => "ctrler".into(),
            ServiceRole::Shard { gid, .. } => format!("shard-{gid}"),
        }
    }

    /// The certificate role a replica of this service must hold.
    pub fn certificate_role(&self) -> Role {
        match self {
            ServiceRole::Kv => Role::Kv,
            ServiceRole::Ctrler { .. } => Role::Ctrler,
            ServiceRole::Shard { gid, .. } => Role::Shard(*gid),
        }
    }
}

/// The cluster name used when neither `--cluster` nor a certificate gives one.
pub const DEFAULT_CLUSTER: &str = "ds824";

/// Stops a background task when the scope that owns it ends, however it ends.
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

enum Served {
    Kv(KvService),
    Ctrler(CtrlerService),
    Shard(ShardGroupServices),
}

/// The snapshot size a follower accepts unless told otherwise: half of this machine's memory (it
/// holds the snapshot and then the state it decodes to), at least 4 GiB; 4 GiB where the memory size
/// cannot be read. Not a fixed ceiling: `kvd --max-snapshot-bytes` sets it for machines that hold
/// more state.
pub fn default_max_snapshot_bytes() -> u64 {
    const FLOOR: u64 = 4 << 30;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kib| kib.saturating_mul(1024))
        });
    total.map_or(FLOOR, |bytes| (bytes / 2).max(FLOOR))
}

/// Largest gRPC message a client may send (a maximal value plus framing).
const MAX_MESSAGE_BYTES: usize = crate::limits::MAX_CLIENT_MESSAGE_BYTES;

/// Everything a replica needs to start.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// Where to listen for clients (and, for a shard group, other groups' shard transfers).
    pub listen: SocketAddr,
    /// Where to listen for Raft messages from the other members.
    pub peer_listen: SocketAddr,
    /// Every voter's peer address (`host:port`); may include this node. Empty with `join`.
    pub peers: HashMap<NodeId, String>,
    /// Client addresses of members of a running group to join (instead of `peers`): a node with an
    /// empty data directory learns the configuration from them and waits, outside the group, until
    /// an operator adds it (`kvctl member add`); it then gets the state by snapshot. Ignored once
    /// the data directory holds state (the configuration is in it).
    pub join: Vec<String>,
    /// Members' client addresses, for the leader hints followers give clients (this node's defaults
    /// to its client listener). Members missing here are hinted by id only.
    pub clients: HashMap<NodeId, String>,
    /// The deployment's cluster name: with the Raft group it is the cluster id recorded in the data
    /// directory and carried by every peer message. With TLS it must match the certificate's.
    pub cluster: String,
    /// Plaintext or mutual TLS, for both ports and for the connections this replica makes.
    pub security: Security,
    /// sled data directory (created if missing).
    pub data_dir: PathBuf,
    /// See [`ServiceConfig::snapshot_threshold`].
    pub snapshot_threshold: u64,
    /// Largest snapshot accepted from a leader (a follower holds it whole in memory to install it);
    /// see [`default_max_snapshot_bytes`].
    pub max_snapshot_bytes: u64,
    /// See [`ServiceConfig::request_timeout`].
    pub request_timeout: Duration,
    /// See [`ServiceConfig::policy`].
    pub policy: crate::rsm::sessions::LogPolicy,
    /// Which service this replica runs.
    pub role: ServiceRole,
    /// Serve Prometheus metrics at `http://<this>/metrics`, if set.
    pub metrics_listen: Option<SocketAddr>,
    /// See [`ServiceConfig::unsafe_ack_before_commit`] (the self-test's deliberate bug; false
    /// everywhere else).
    pub unsafe_ack_before_commit: bool,
    /// A backup file (`kvctl snapshot save`) to start an empty data directory from; see [`restore`].
    pub restore: Option<PathBuf>,
    /// Serve linearizable reads from the leader's lease instead of a ReadIndex round (see
    /// [`crate::raft::Config::lease_reads`] for what that assumes). Every member must agree.
    pub lease_reads: bool,
    /// See [`ServiceConfig::follower_reads`].
    pub follower_reads: bool,
}

/// Why a replica could not start; each is the operator's to fix.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The data directory is unusable.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stored state could not be loaded.
    #[error("cannot start raft: {0}")]
    Node(#[from] NodeError),
    /// The certificate does not fit this replica.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The backup to restore from cannot be used here.
    #[error("--restore {}: {reason}", file.display())]
    Restore {
        /// The backup file.
        file: PathBuf,
        /// Why not.
        reason: String,
    },
}

/// A term no real cluster reaches; a backup claiming more is refused (terms are incremented).
const MAX_RESTORED_TERM: u64 = 1 << 62;

/// What a backup's snapshot holds, loaded by the machine of its `service` (`kv`, `ctrler`,
/// `shard-GID`): keys, or configurations for the controllers, and client sessions. An error says why
/// it does not load.
pub fn backup_contents(service: &str, snapshot: bytes::Bytes) -> Result<(u64, u64), String> {
    use crate::kv::service::KvMachine as _;
    let undecodable = |e: crate::rsm::RsmError| format!("the {service} state does not decode: {e}");
    // Loaded exactly as a node loads it at start-up (state, then every session's remembered output):
    // what passes here cannot fail a start.
    fn load<S: crate::rsm::StateMachine>(
        machine: S,
        snapshot: &bytes::Bytes,
    ) -> Result<crate::rsm::Rsm<S>, crate::rsm::RsmError> {
        let mut rsm = crate::rsm::Rsm::new(machine);
        rsm.apply_snapshot(&crate::raft::Snapshot {
            meta: crate::raft::SnapshotMeta { index: 1, term: 1 },
            data: snapshot.clone(),
            ..Default::default()
        })?;
        Ok(rsm)
    }
    let (items, sessions) = match service {
        "kv" => {
            let rsm = load(crate::kv::KvStore::default(), &snapshot).map_err(undecodable)?;
            (rsm.machine().describe().keys, rsm.sessions())
        }
        "ctrler" => {
            let ctrler = crate::ctrler::ShardCtrler::new(crate::ctrler::DEFAULT_SHARDS);
            let rsm = load(ctrler, &snapshot).map_err(undecodable)?;
            (rsm.machine().kept() as u64, rsm.sessions())
        }
        other => {
            let gid = other
                .strip_prefix("shard-")
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| format!("unknown service {other:?}"))?;
            let rsm = load(crate::shardkv::ShardKv::new(gid), &snapshot).map_err(undecodable)?;
            (rsm.machine().describe().keys, rsm.sessions())
        }
    };
    Ok((items, sessions as u64))
}

#[cfg(test)]
mod tests {
    use super::{backup_contents, restore};
    use crate::raft::{Identity, Seeded};
    use prost::Message as _;
    use std::path::Path;

    fn kv_backup(index: u64, term: u64) -> Vec<u8> {
        let state = crate::proto::rsm::Snapshot {
            state: crate::rsm::StateMachine::snapshot(&crate::kv::KvStore::default()),
            ..Default::default()
        };
        let header = crate::rsm::backup::BackupHeader {
            version: 0,
            cluster_id: "ds824/kv".into(),
            service: "kv".into(),
            index,
            term,
            snapshot_bytes: 0,
            created_unix_ms: 0,
            taken_by: 1,
        };
        crate::rsm::backup::encode(header, &state.encode_to_vec())
    }

    /// A header edited past the largest index Raft accepts would seed nodes that can never elect a
    /// leader (every vote request fails validation); a backup rotated away after seeding must not
    /// stop a node whose restarts keep the `--restore` flag.
    #[test]
    fn restore_refuses_impossible_indexes_and_outlives_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let identity = Identity {
            cluster: "ds824/kv".into(),
            node: 1,
        };
        let file = dir.path().join("kv.backup");
        let data = dir.path().join("data");
        std::fs::write(&file, kv_backup(crate::raft::MAX_INDEX + 1, 3)).expect("write");
        let refused =
            restore(&file, &data, &identity, "kv", u64::MAX).expect_err("index past MAX_INDEX");
        assert!(
            refused.to_string().contains("cannot be a committed state"),
            "{refused}"
        );
        // Not yet seeded: an unreadable file is an error.
        let missing = dir.path().join("gone.backup");
        let refused =
            restore(&missing, &data, &identity, "kv", u64::MAX).expect_err("nothing to start from");
        assert!(refused.to_string().contains("cannot read it"), "{refused}");
        // Larger than this node's --max-snapshot-bytes: refused from its header.
        let (header, _) = crate::rsm::backup::decode(&kv_backup(40, 3)).expect("a backup");
        std::fs::write(&file, crate::rsm::backup::encode(header, &[7; 16])).expect("write");
        let refused = restore(&file, &data, &identity, "kv", 15).expect_err("over the limit");
        std::fs::write(&file, kv_backup(40, 3)).expect("write");
        assert!(refused.to_string().contains("over the limit"), "{refused}");
        let refused = restore(Path::new("/dev/zero"), &data, &identity, "kv", u64::MAX)
            .expect_err("a device is no backup");
        assert!(
            refused.to_string().contains("not a regular file"),
            "{refused}"
        );
        assert_eq!(
            restore(&file, &data, &identity, "kv", u64::MAX).expect("seed"),
            Seeded::Restored
        );
        // Seeded: a file over this node's limit (moved to a smaller machine) does not stop it, nor
        // does the file rotated away; the node starts from its directory.
        let (header, _) = crate::rsm::backup::decode(&kv_backup(40, 3)).expect("a backup");
        let big = dir.path().join("big.backup");
        std::fs::write(&big, crate::rsm::backup::encode(header, &[7; 16])).expect("write");
        assert_eq!(
            restore(&big, &data, &identity, "kv", 15).expect("seeded before"),
            Seeded::AlreadyRestored
        );
        std::fs::remove_file(&file).expect("remove");
        assert_eq!(
            restore(&file, &data, &identity, "kv", u64::MAX).expect("restart"),
            Seeded::AlreadyRestored
        );
    }

    /// A snapshot whose state decodes but one of whose remembered outputs does not would pass a
    /// checksum and then fail every start of the restored node: it is refused up front.
    #[test]
    fn a_backup_with_an_undecodable_session_output_is_refused() {
        let session = |output: Vec<u8>| crate::proto::rsm::Snapshot {
            state: crate::rsm::StateMachine::snapshot(&crate::kv::KvStore::default()),
            sessions: vec![crate::proto::rsm::Session {
                client_id: 7,
                seq: 1,
                output: output.into(),
                last_ms: 0,
                owner: 0,
            }],
            ..Default::default()
        };
        let good = crate::proto::kv::Outcome::default().encode_to_vec();
        assert_eq!(
            backup_contents("kv", session(good).encode_to_vec().into()),
            Ok((0, 1))
        );
        let error = backup_contents("kv", session(vec![0xff, 0xff, 0xff]).encode_to_vec().into())
            .expect_err("an undecodable output must be refused");
        assert!(error.contains("does not decode"), "{error}");
    }
}

/// Seed `data_dir` (of `identity`, for `service`) from the backup `file`, checked whole first: a
/// snapshot over `max_snapshot_bytes` (the node could neither send nor take it), a truncated or
/// corrupt file, or a backup of another service (a controllers' backup given to a KV
/// node, shard group 1's to group 2), is refused before anything is written. The first start of
/// every member of a new cluster restores the same file, so all start from the same snapshot, index
/// and term and elect a leader among themselves; a later start with the same flag finds the
/// directory seeded from this backup and just starts. The new cluster is the one the node's flags
/// name (`--cluster`, its certificates, its `--peers`): the backup's source id is only reported.
pub fn restore(
    file: &std::path::Path,
    data_dir: &std::path::Path,
    identity: &Identity,
    service: &str,
    max_snapshot_bytes: u64,
) -> Result<crate::raft::Seeded, StartError> {
    use crate::rsm::backup;
    let refuse = |reason: String| StartError::Restore {
        file: file.to_path_buf(),
        reason,
    };
    let backup = match backup::read_file(file, max_snapshot_bytes) {
        Ok(backup) => backup,
        // Unreadable, or over this node's limit (a smaller machine since): not a reason to stop a
        // node whose directory was seeded from a backup before.
        Err(e @ (backup::BackupError::Unreadable(_) | backup::BackupError::TooLarge { .. })) => {
            // Restarts keep the flag (a unit file, a compose entry) long after the backup was
            // rotated away: a directory already seeded from one starts from what it holds.
            if let Some(origin) = seeded_before(data_dir, identity) {
                tracing::warn!(file = %file.display(), error = %e, %origin, "--restore file cannot be used; the data dir was seeded from a backup before, starting from what it holds");
                return Ok(crate::raft::Seeded::AlreadyRestored);
            }
            return Err(refuse(e.to_string()));
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    let header = backup.header;
    if header.service != service {
        return Err(refuse(format!(
            "it is a backup of the {:?} service ({}), this node runs {service:?}",
            header.service, header.cluster_id
        )));
    }
    if header.index == 0
        || header.index > crate::raft::MAX_INDEX
        || header.term == 0
        || header.term > MAX_RESTORED_TERM
    {
        return Err(refuse(format!(
            "index {} and term {} cannot be a committed state",
            header.index, header.term
        )));
    }
    // Loaded as the service will load it, before anything is written: a mislabelled or crafted
    // file must not leave a directory that fails at every start.
    let data = backup.snapshot;
    backup_contents(&header.service, data.clone()).map_err(refuse)?;
    let origin = format!(
        "backup of {} at index {}, checksum {:08x}",
        header.cluster_id, header.index, backup.checksum
    );
    let snapshot = crate::raft::Snapshot {
        meta: crate::raft::SnapshotMeta {
            index: header.index,
            term: header.term,
        },
        data,
        // A backup holds the service state only: the restored group is the one `--peers` names.
        membership: None,
    };
    let seeded = SledStorage::seed(data_dir, identity, snapshot, &origin)?;
    match seeded {
        crate::raft::Seeded::Restored => info!(%origin, "data dir seeded from the backup"),
        crate::raft::Seeded::AlreadyRestored => {
            info!(%origin, "data dir was seeded from this backup before; starting from what it holds")
        }
    }
    Ok(seeded)
}

/// The backup `data_dir` was seeded from, if it exists, opens as this node's, and was.
fn seeded_before(data_dir: &std::path::Path, identity: &Identity) -> Option<String> {
    if !data_dir.exists() {
        return None;
    }
    SledStorage::open(data_dir, identity)
        .ok()?
        .restored_from()
        .ok()
        .flatten()
}

/// How long a joining node keeps asking the members it was given for the configuration.
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// The same for a node started with `--join` whose data dir already holds state (it can start from
/// that if the group is not reachable, e.g. when every member restarts at once).
const REJOIN_WAIT: Duration = Duration::from_secs(5);

/// Ask the members at `join` (client addresses) for the group's configuration, retrying for `wait`
/// (a member may be restarting). Only a leader's answer is taken (a follower's, or a removed node's,
/// may be stale), and only from the group `cluster` names (`<cluster>/<group>`), following the
/// leader a follower names.
async fn fetch_membership(
    join: &[String],
    security: &Security,
    cluster: &str,
    wait: Duration,
) -> Result<crate::proto::raft::MembersResponse, StartError> {
    use crate::proto::raft::raft_admin_client::RaftAdminClient;
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_error = String::from("no member answered");
    let mut join = join.to_vec();
    loop {
        for index in 0.. {
            let Some(address) = join.get(index).cloned() else {
                break;
            };
            let address = &address;
            let endpoint = security
                .endpoint(address)
                .map_err(|e| StartError::Config(format!("--join {address}: {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(2));
            let channel = match endpoint.connect().await {
                Ok(channel) => channel,
                Err(e) => {
                    last_error = format!("{address}: {e}");
                    continue;
                }
            };
            match RaftAdminClient::new(channel)
                .members(crate::proto::raft::MembersRequest {})
                .await
            {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.cluster != cluster {
                        return Err(StartError::Config(format!(
                            "--join {address}: that is a member of {:?}, not of {cluster:?}",
                            reply.cluster
                        )));
                    }
                    if reply.leader == reply.id && reply.leader != 0 {
                        return Ok(reply);
                    }
                    last_error = format!("{address}: node {} does not lead", reply.id);
                    if !reply.leader_address.is_empty() && !join.contains(&reply.leader_address) {
                        join.push(reply.leader_address.clone());
                    }
                }
                Err(status) => last_error = format!("{address}: {}", status.message()),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::Config(format!(
                "--join: could not learn the configuration from {}: {last_error}",
                join.join(",")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A node with an empty data directory may join as a newcomer, or as a learner already added, but
/// never as a voter: a voter that lost its log could help elect a leader lacking writes it had
/// acknowledged.
fn check_joining(
    id: NodeId,
    members: &crate::proto::raft::MembersResponse,
) -> Result<(), StartError> {
    match members.members.iter().find(|m| m.id == id) {
        Some(member) if !member.learner => Err(StartError::Config(format!(
            "node {id} is a voter of the group, but its data dir is empty: a voter that lost its data \
             could lose acknowledged writes. Remove it first (kvctl member remove {id}), then add it \
             again (kvctl member add {id}=PEER_ADDRESS)"
        ))),
        // Added, and the leader already replicated to it: the data it held is gone.
        Some(member) if member.match_index > 0 => Err(StartError::Config(format!(
            "node {id} is a learner that already held part of the log, but its data dir is empty: \
             remove it first (kvctl member remove {id}), then add it again"
        ))),
        Some(_) => {
            info!(node = id, "joining as a learner already added; catching up");
            Ok(())
        }
        None => {
            info!(
                node = id,
                "joining: not a member yet; waiting to be added (kvctl member add {id}=PEER_ADDRESS)"
            );
            Ok(())
        }
    }
}

/// Why a running replica stopped other than by request.
#[derive(Debug, Error)]
pub enum RunError {
    /// The service could not apply the log.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The Raft node failed (storage).
    #[error("raft node failed: {0}")]
    Node(#[from] NodeError),
    /// The gRPC server failed.
    #[error("server failed: {0}")]
    Server(String),
}

/// A started replica, not yet serving requests (peers' connections queue in the listen backlog).
pub struct Replica {
    id: NodeId,
    listener: TcpListener,
    peer_listener: TcpListener,
    /// Who may connect to the peer port: this group's replicas only.
    peers: Admit,
    security: Security,
    node: RaftNode,
    service: Served,
    applier: JoinHandle<Result<(), ServiceError>>,
    metrics: Option<(TcpListener, Registry, RaftGauges)>,
    /// Membership and leadership for operators, on the client port.
    admin: admin::AdminService,
    /// A shard group's driver task (aborted when the node is dropped).
    _driver: AbortOnDrop<()>,
}

impl Replica {
    /// Bind, open the data directory and start Raft and the service. Must run inside a tokio runtime.
    pub async fn start(config: ReplicaConfig) -> Result<Replica, StartError> {
        if config.id == 0 {
            return Err(StartError::Config("node ids start at 1".into()));
        }
        if let ServiceRole::Shard { gid, ctrlers } = &config.role {
            if *gid == 0 {
                return Err(StartError::Config(
                    "group ids start at 1 (0 means \"no group\" in a configuration)".into(),
                ));
            }
            if ctrlers.is_empty() {
                return Err(StartError::Config(
                    "a shard group needs the controllers' addresses".into(),
                ));
            }
            // Refuse a malformed address now, before storage is opened and Raft runs.
            for address in ctrlers {
                crate::rsm::client::channel(address, &Default::default())
                    .map_err(|e| StartError::Config(format!("--ctrlers: {e}")))?;
            }
        }
        let group = config.role.cluster_name();
        if !crate::security::principal::valid_label(&config.cluster) {
            return Err(StartError::Config(format!(
                "cluster name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                config.cluster
            )));
        }
        config.security.expect_identity(&Principal::node(
            &config.cluster,
            config.role.certificate_role(),
            config.id,
        ))?;
        if config.listen == config.peer_listen && config.listen.port() != 0 {
            return Err(StartError::Config(format!(
                "the client and peer ports must differ (both are {})",
                config.listen
            )));
        }
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let peer_listener = bind(config.peer_listen).await?;
        let mut addresses = config.clients.clone();
        if let std::collections::hash_map::Entry::Vacant(entry) = addresses.entry(config.id) {
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
            entry.insert(local.to_string());
        }
        let raft_peers: HashMap<NodeId, String> = config
            .peers
            .iter()
            .filter(|(&id, _)| id != config.id)
            .map(|(&id, address)| (id, address.clone()))
            .collect();
        let identity = Identity {
            cluster: crate::raft::transport::cluster_id(&config.cluster, &group),
            node: config.id,
        };
        if let Some(file) = config.restore.clone() {
            let (data_dir, identity, service) =
                (config.data_dir.clone(), identity.clone(), group.clone());
            let limit = config.max_snapshot_bytes;
            tokio::task::spawn_blocking(move || {
                restore(&file, &data_dir, &identity, &service, limit)
            })
            .await
            .map_err(|e| StartError::Config(format!("restore task failed: {e}")))??;
        }
        let data_dir = config.data_dir.clone();
        let mut storage =
            tokio::task::spawn_blocking(move || SledStorage::open(data_dir, &identity))
                .await
                .map_err(|e| StartError::Config(format!("storage open task failed: {e}")))??;
        let mut joined_voters = None;
        let mut raft_peers = raft_peers;
        if !config.join.is_empty() {
            // The configuration stored in the data dir (if any) wins over what is fetched; the
            // fetched one gives the peers' addresses and is the fallback. Never this node as a
            // voter: a node started with --join only votes once the log says it does.
            let fresh = storage.is_fresh()?;
            let wait = if fresh { JOIN_WAIT } else { REJOIN_WAIT };
            let ours = crate::raft::transport::cluster_id(&config.cluster, &group);
            match fetch_membership(&config.join, &config.security, &ours, wait).await {
                Ok(members) => {
                    if fresh {
                        check_joining(config.id, &members)?;
                        // A group restored from a backup stamps that backup's tag on its messages,
                        // and ours must carry it too, now and after every restart (and a tag
                        // taken from another group before goes).
                        let tag = Some(members.restored.as_str()).filter(|t| !t.is_empty());
                        if tag.is_some_and(|t| !crate::raft::storage::is_restore_tag(t)) {
                            return Err(StartError::Config(format!(
                                "--join: the group answered with restore tag {:?}, which is not \
                                 8 lowercase hex digits",
                                crate::limits::truncated(&members.restored, 64)
                            )));
                        }
                        storage.set_restore_tag(tag)?;
                    }
                    raft_peers = members
                        .members
                        .iter()
                        .filter(|m| m.id != config.id && !m.address.is_empty())
                        .map(|m| (m.id, m.address.clone()))
                        .collect();
                    joined_voters = Some(
                        members
                            .members
                            .iter()
                            .filter(|m| !m.learner && m.id != config.id)
                            .map(|m| m.id)
                            .collect::<Vec<_>>(),
                    );
                }
                Err(e) if fresh => return Err(e),
                Err(e) => {
                    warn!(node = config.id, error = %e, "cannot reach the group; starting from the configuration in the data dir");
                    raft_peers = HashMap::new();
                    joined_voters = Some(Vec::new());
                }
            }
        }
        let own_address = config.peers.get(&config.id).cloned();
        let mut node_config = NodeConfig::new(config.id, raft_peers);
        node_config.address = own_address;
        if let Some(voters) = joined_voters {
            // The group as it is now, without this node: it waits to be added, and votes for
            // nobody until a leader has replicated to it (see `check_joining`).
            node_config.raft.voters = voters;
            node_config.raft.no_vote_until_replicated = true;
        }
        let restore_tag = storage.restore_tag()?;
        node_config.restored = restore_tag.clone();
        node_config.max_snapshot_bytes = config.max_snapshot_bytes;
        let service_name = group.clone();
        node_config.snapshot_check = Some(crate::raft::transport::SnapshotCheck::new(
            move |snapshot| backup_contents(&service_name, snapshot).map(|_| ()),
        ));
        node_config.raft.lease_reads = config.lease_reads;
        node_config.cluster = config.cluster.clone();
        let group_name = group.clone();
        node_config.group = group;
        node_config.guard = config.security.guard();
        node_config.transport.security = config.security.clone();
        let (node, applied) = RaftNode::start(node_config, storage)?;
        let admin = admin::AdminService::new(
            node.handle(),
            config.security.guard(),
            crate::raft::transport::cluster_id(&config.cluster, &group_name),
            addresses.clone(),
        )
        .with_restored(restore_tag);
        let metrics = match config.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let registry = Registry::new();
                let gauges = RaftGauges::register(&registry)
                    .map_err(|e| StartError::Config(format!("metrics: {e}")))?;
                let service = ServiceMetrics::register(&registry)
                    .map_err(|e| StartError::Config(format!("metrics: {e}")))?;
                Some((listener, registry, gauges, service))
            }
            None => None,
        };
        let service_config = ServiceConfig {
            request_timeout: config.request_timeout,
            snapshot_threshold: config.snapshot_threshold,
            addresses,
            metrics: metrics.as_ref().map(|(_, _, _, service)| service.clone()),
            guard: config.security.guard(),
            policy: config.policy,
            cluster_id: crate::raft::transport::cluster_id(&config.cluster, &group_name),
            unsafe_ack_before_commit: config.unsafe_ack_before_commit,
            follower_reads: config.follower_reads,
        };
        let metrics = metrics.map(|(listener, registry, gauges, _)| (listener, registry, gauges));
        // The shard group's driver, aborted with the node however it ends.
        let mut driver = AbortOnDrop(None);
        let peers = Admit::raft_peers_of(&config.role.certificate_role());
        let (service, applier) = match config.role {
            ServiceRole::Kv => {
                let (service, applier) =
                    KvService::start(config.id, node.handle(), applied, service_config);
                (Served::Kv(service), applier)
            }
            ServiceRole::Ctrler {
                shards,
                keep_configs,
            } => {
                let (service, applier) = CtrlerService::start(
                    config.id,
                    shards,
                    keep_configs,
                    node.handle(),
                    applied,
                    service_config,
                );
                (Served::Ctrler(service), applier)
            }
            ServiceRole::Shard { gid, ctrlers } => {
                let (services, applier) = crate::shardkv::service::start(
                    gid,
                    config.id,
                    node.handle(),
                    applied,
                    service_config,
                );
                let driver_config = DriverConfig {
                    ctrlers,
                    security: config.security.clone(),
                    ..DriverConfig::default()
                };
                let task = crate::shardkv::driver::spawn(
                    gid,
                    config.id,
                    services.rsm.clone(),
                    driver_config,
                )
                .map_err(|e| StartError::Config(format!("--ctrlers: {e}")))?;
                driver = AbortOnDrop(Some(task));
                (Served::Shard(services), applier)
            }
        };
        Ok(Replica {
            id: config.id,
            listener,
            peer_listener,
            peers,
            security: config.security,
            node,
            service,
            applier,
            metrics,
            admin,
            _driver: driver,
        })
    }

    /// The client address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The peer address actually bound.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_listener.local_addr().ok()
    }

    /// Serve until `shutdown` resolves (then stop cleanly: stop accepting, let Raft finish its current
    /// step and flush) or until the node fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let Replica {
            id,
            listener,
            peer_listener,
            peers,
            security,
            node,
            service,
            mut applier,
            metrics,
            admin,
            _driver,
        } = self;
        let shard_gauges = match (&service, &metrics) {
            (Served::Shard(services), Some((_, registry, _))) => {
                let gauges = ShardGauges::register(registry)
                    .map_err(|e| RunError::Server(format!("metrics: {e}")))?;
                Some((gauges, services.rsm.clone()))
            }
            _ => None,
        };
        let metrics_server = metrics.map(|(listener, registry, gauges)| {
            let handle = node.handle();
            let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                gauges.refresh(&handle);
                if let Some((shards, rsm)) = &shard_gauges {
                    rsm.with_machine(|machine| shards.refresh(machine));
                }
            });
            tokio::spawn(crate::metrics::serve(listener, registry, refresh))
        });
        let _stop_metrics = AbortOnDrop(metrics_server);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let peer_routes = tonic::service::Routes::new(node.service());
        let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let peer_security = security.clone();
        let mut peer_server = tokio::spawn(async move {
            let stopped = async {
                let _ = peer_stop_rx.await;
            };
            peer_security
                .serve(peer_routes, peer_listener, peers, stopped)
                .await
        });
        let routes = tonic::service::Routes::new(admin.into_server());
        let routes = match service {
            Served::Kv(service) => routes.add_service(service.into_server()),
            Served::Ctrler(service) => routes.add_service(
                CtrlerServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            ),
            Served::Shard(services) => routes
                .add_service(services.kv.into_server())
                .add_service(services.transfer.into_server()),
        };
        let client_security = security.clone();
        let mut server = tokio::spawn(async move {
            let stopped = async {
                let _ = stop_rx.await;
            };
            client_security
                .serve(routes, listener, Admit::Cluster, stopped)
                .await
        });
        info!(node = id, "serving");
        let outcome = tokio::select! {
            _ = shutdown => {
                info!(node = id, "shutting down");
                // Both servers still run: the transfer's messages go out, and clients that call in
                // meanwhile are told who leads next.
                if let Some(to) = node.handle().hand_off_leadership(HAND_OFF_WAIT).await {
                    info!(node = id, to, "handed leadership over before stopping");
                }
                Ok(())
            }
            result = &mut applier => match result {
                Ok(Ok(())) => Err(RunError::Node(NodeError::Stopped)),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(RunError::Server(format!("applier task failed: {e}"))),
            },
            result = &mut server => Err(RunError::Server(match result {
                Ok(Ok(())) => "server stopped".into(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            })),
            result = &mut peer_server => Err(RunError::Server(match result {
                Ok(Ok(())) => "peer server stopped".into(),
                Ok(Err(e)) => format!("peer server: {e}"),
                Err(e) => format!("peer server: {e}"),
            })),
        };
        let _ = stop_tx.send(());
        let _ = peer_stop_tx.send(());
        // Give in-flight requests a moment to finish; a stuck client must not block shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        server.abort();
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut peer_server).await;
        peer_server.abort();
        let node_result = node.shutdown().await;
        if let Err(e) = &outcome {
            error!(node = id, error = %e, "stopped");
        }
        outcome?;
        match node_result {
            Ok(()) | Err(NodeError::Stopped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// How long a leader stopping cleanly waits for a follower to take over (an election round, normally a
/// few milliseconds; the core gives up on a transfer after an election timeout).
const HAND_OFF_WAIT: Duration = Duration::from_secs(2);

pub use args::{id_from_hostname, parse_addresses, parse_node_id, parse_peers};
