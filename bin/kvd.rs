//! `kvd`: the ds824 server daemon. One binary, one role per subcommand (`kvd kv`, `kvd ctrler`,
//! `kvd shard`). The logic lives in the library; this file only parses flags and maps errors to exit
//! codes: 2 for anything the operator must fix before a start can succeed, 1 for a failure while serving.

/// mimalloc instead of glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};
use ds824::raft::NodeId;
use ds824::replica::{
    parse_addresses, parse_node_id, parse_peers, Replica, ReplicaConfig, ServiceRole,
    DEFAULT_CLUSTER,
};
use ds824::security::TlsArgs;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The ds824 server daemon: one replica of a replicated service per process.
///
/// Logs go to stderr, filtered by RUST_LOG (default "info"). SIGTERM or SIGINT stops the node cleanly.
/// Exit status: 0 after a clean shutdown; 2 if it could not start (bad flag, address in use, unusable
/// data directory: one line on stderr says why); 1 if it failed while serving.
#[derive(Parser)]
#[command(name = "kvd", version)]
struct Cli {
    #[command(flatten)]
    logs: ds824::daemon::LogArgs,
    #[command(flatten)]
    runtime: ds824::daemon::RuntimeArgs,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Run one replica of the linearizable key/value service.
    ///
    /// Example: kvd kv --id 1 --listen 127.0.0.1:7001 --peer-listen 127.0.0.1:8001
    ///   --peers 1=127.0.0.1:8001,2=127.0.0.1:8002,3=127.0.0.1:8003 --data-dir /var/lib/kvd/1
    ///   --tls-ca certs/ca.pem --tls-cert certs/kv-1.pem --tls-key certs/kv-1-key.pem
    Kv(KvArgs),
    /// Run one replica of the shard controller (the configurations of the sharded KV store).
    ///
    /// Example: kvd ctrler --id 1 --listen 127.0.0.1:7101 --peer-listen 127.0.0.1:8101
    ///   --peers 1=127.0.0.1:8101,2=127.0.0.1:8102,3=127.0.0.1:8103 --data-dir /var/lib/kvd/ctrler-1
    ///   --tls-ca certs/ca.pem --tls-cert certs/ctrler-1.pem --tls-key certs/ctrler-1-key.pem
    Ctrler(CtrlerArgs),
    /// Run one replica of a shard group of the sharded key/value store. KV clients and other groups
    /// (shard hand-over) share the client port; register the group's client addresses with the controllers
    /// (`kvctl ctrler join GID=HOST:PORT,...`) to give it shards. The group follows the controllers'
    /// configurations on its own: it pulls the shards it gains from their previous owners and deletes
    /// the ones it gave away once the new owner has them.
    ///
    /// Example: kvd shard --gid 1 --id 1 --listen 127.0.0.1:7201 --peer-listen 127.0.0.1:8201
    ///   --peers 1=127.0.0.1:8201,2=127.0.0.1:8202,3=127.0.0.1:8203
    ///   --ctrlers 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103 --data-dir /var/lib/kvd/g1-1
    ///   --tls-ca certs/ca.pem --tls-cert certs/shard-1-1.pem --tls-key certs/shard-1-1-key.pem
    Shard(ShardArgs),
}

#[derive(Args)]
struct ShardArgs {
    #[command(flatten)]
    replica: KvArgs,
    /// This replica's group id (1, 2, ...), as joined to the controllers. Recorded in the data
    /// directory: a directory of another group is refused.
    #[arg(long)]
    gid: u64,
    /// The shard controllers as HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ctrlers: Vec<String>,
}

#[derive(Args)]
struct CtrlerArgs {
    #[command(flatten)]
    replica: KvArgs,
    /// Number of shards the key space is split into, 1 to 65536. Fixed by the cluster's first join,
    /// from the flag of the controller that takes it; a controller started later with another value
    /// follows the cluster's count, and a join it proposes is refused with the count to use.
    #[arg(long, default_value_t = ds824::ctrler::DEFAULT_SHARDS)]
    shards: usize,
    /// Keep at least this many of the most recent configurations for `kvctl ctrler query N`. Older
    /// ones are dropped once every shard group has reported passing them (a group that never reports
    /// keeps them). The leader's setting applies on every replica.
    #[arg(long, default_value_t = ds824::ctrler::DEFAULT_KEEP_CONFIGS)]
    keep_configs: u64,
}

#[derive(Args)]
struct KvArgs {
    /// This node's id (1, 2, ...); must match its entry in --peers if listed there. `auto` takes it
    /// from the host name's trailing ordinal plus one (`kv-0` is 1), as Kubernetes StatefulSets name pods.
    #[arg(long, value_parser = parse_node_id)]
    id: NodeId,
    /// Address to listen on for clients (HOST:PORT); a shard group also serves shard hand-over here.
    #[arg(long)]
    listen: String,
    /// Address to listen on for Raft messages from the other members (HOST:PORT). Keep it on the
    /// internal network: only the group's own members may use it.
    #[arg(long, env = "KVD_PEER_LISTEN")]
    peer_listen: String,
    /// Every member's peer address as ID=HOST:PORT, comma-separated (may include this node): the
    /// group's first configuration, used when the data dir holds none. Later changes go through the
    /// log (`kvctl member ...`). Give this or --join.
    #[arg(long, value_parser = parse_peers, required_unless_present = "join")]
    peers: Option<HashMap<NodeId, String>>,
    /// Join a running group instead (HOST:PORT,...: client addresses of some of its members). With an
    /// empty --data-dir the node learns the configuration from them and waits outside the group until
    /// an operator adds it (`kvctl member add ID=PEER_ADDRESS`), then gets the state by snapshot.
    /// Refused if the group lists this node as a voter (a voter that lost its data must be removed
    /// and added again). Once the data dir holds state, the configuration in it wins.
    #[arg(long, value_delimiter = ',', conflicts_with = "peers")]
    join: Vec<String>,
    /// Every member's client address as ID=HOST:PORT, comma-separated, for the leader hints followers
    /// give clients. Optional: without it, clients find the leader by trying the servers they know.
    #[arg(long, value_parser = parse_addresses, default_value = "")]
    clients: HashMap<NodeId, String>,
    /// The deployment's cluster name. With TLS it defaults to (and must equal) the cluster in the
    /// certificate; otherwise to "ds824". Recorded in the data directory and carried by every peer
    /// message, so nodes of different clusters never talk.
    #[arg(long, env = "DS824_CLUSTER")]
    cluster: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Directory for the Raft log, hard state and snapshots (created if missing; refused if it belongs
    /// to another node or cluster).
    #[arg(long)]
    data_dir: PathBuf,
    /// Start an empty --data-dir from this backup file (`kvctl snapshot save`): every member of the new
    /// cluster is started with the same file, and they elect a leader among themselves. The file is
    /// checked whole first (a truncated or corrupt file, or another service's backup, is refused);
    /// a directory already seeded from this file just starts (so the flag may stay on a restarted
    /// node), one holding anything else is refused.
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,
    /// Answer linearizable reads on the leader from its lease, without the round of heartbeats a
    /// ReadIndex read waits for: after a majority acknowledged it, followers refuse to vote for an
    /// election timeout (CheckQuorum), and the leader serves reads for 90 % of that, less a tick.
    /// Assumes the members' clocks run at rates within 10 % of each other (not that they agree on the
    /// time); a leader frozen (SIGSTOP, suspend) past its lease counts the lost time on waking before
    /// it answers. Set it on every member or none; a member started with it refuses to vote for an
    /// election timeout after a restart. Off by default.
    #[arg(long)]
    lease_reads: bool,
    /// Answer reads on followers too, still linearizably: a follower asks the leader for a read index
    /// (one request for all the reads that arrived meanwhile), and serves the reads once it applied
    /// that far. Spreads read load over every replica; a read costs one more hop than on the leader.
    /// Clients send reads to any replica only when asked to (`kvctl --follower-reads`); without this
    /// flag a follower answers reads with a hint to the leader. Off by default.
    #[arg(long)]
    follower_reads: bool,
    /// Snapshot once the persisted Raft state exceeds this many bytes (0: never).
    #[arg(long, default_value_t = 8 << 20)]
    snapshot_threshold: u64,
    /// Largest snapshot this node accepts from a leader, in bytes. A follower holds the snapshot in
    /// memory to install it, so this bounds what a lagging follower can catch up on. Default: half of
    /// this machine's memory, at least 4 GiB.
    #[arg(long)]
    max_snapshot_bytes: Option<u64>,
    /// Serve Prometheus metrics (Raft term, role, indices, sizes; request counts and latency; snapshots)
    /// at http://HOST:PORT/metrics. Off unless given.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// SELF-TEST ONLY, debug builds only: acknowledge a put or append once this node, as leader, has
    /// appended it, before a majority has it. Breaks linearizability on purpose so that `chaos run
    /// --self-test` can show its checker catches lost writes. Release builds have no such flag.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    unsafe_ack_before_commit: bool,
    /// TESTS ONLY, debug builds only: move this node's wall clock by the number of milliseconds
    /// (signed) in this file, re-read every 100 ms — how `chaos run --nemesis clock` skews one node's
    /// clock. Release builds have no such flag.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true, value_name = "PATH")]
    unsafe_clock_skew_file: Option<std::path::PathBuf>,
    /// Answer TIMEOUT to a request not completed within this many milliseconds (the client retries).
    #[arg(long, default_value_t = 1000)]
    request_timeout_ms: u64,
    /// Drop a client session idle for this many seconds (its retries are then refused with
    /// SESSION_EXPIRED instead of being applied twice); 0 keeps idle sessions. Measured by the leaders'
    /// clocks as recorded in the log; the leader's setting applies on every replica.
    #[arg(long, default_value_t = ds824::limits::DEFAULT_SESSION_TTL_MS / 1000)]
    session_ttl: u64,
    /// Keep at most this many client sessions (per shard in a shard group), dropping the least recently
    /// active. At most 100000.
    #[arg(long, default_value_t = ds824::limits::DEFAULT_MAX_SESSIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=ds824::limits::MAX_SESSIONS as u64))]
    max_sessions: u64,
    /// Most bytes of keys and values the store holds (a shard group: across its shards), as etcd's
    /// --quota-backend-bytes: a write that would grow it past this is refused with "over its quota" and
    /// nothing written; deletes and writes that do not grow it still apply. 0: no limit. Every replica
    /// holds the whole store in memory and in every snapshot, so keep it well under their memory. The
    /// leader's setting applies on every replica.
    #[arg(long, default_value_t = ds824::limits::DEFAULT_QUOTA_BYTES)]
    quota_bytes: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ds824::daemon::init_logging_as("info", cli.logs.log_format);
    let runtime = match ds824::daemon::runtime_with("kvd", &cli.runtime) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        match cli.role {
            Role::Kv(args) => run_kv(args, ServiceRole::Kv).await,
            Role::Ctrler(args) => {
                if args.shards == 0 || args.shards > ds824::ctrler::MAX_SHARDS {
                    eprintln!(
                        "kvd: error: --shards must be 1 to {}",
                        ds824::ctrler::MAX_SHARDS
                    );
                    return ExitCode::from(2);
                }
                let role = ServiceRole::Ctrler {
                    shards: args.shards,
                    keep_configs: args.keep_configs,
                };
                run_kv(args.replica, role).await
            }
            Role::Shard(args) => {
                if args.gid == 0 {
                    eprintln!("kvd: error: --gid must be at least 1");
                    return ExitCode::from(2);
                }
                let ctrlers: Vec<String> = args
                    .ctrlers
                    .iter()
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect();
                if ctrlers.is_empty() {
                    eprintln!("kvd: error: --ctrlers lists no addresses");
                    return ExitCode::from(2);
                }
                let role = ServiceRole::Shard {
                    gid: args.gid,
                    ctrlers,
                };
                run_kv(args.replica, role).await
            }
        }
    })
}

async fn resolve(flag: &str, address: &str) -> Result<std::net::SocketAddr, ExitCode> {
    match tokio::net::lookup_host(address).await.map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) | Err(_) => {
            eprintln!("kvd: error: {flag} {address:?} is not a usable HOST:PORT");
            Err(ExitCode::from(2))
        }
    }
}

/// Keep [`ds824::rsm::sessions::CLOCK_SKEW_MS`] at the value in `path` (debug builds, tests only).
#[cfg(debug_assertions)]
async fn follow_clock_skew(path: std::path::PathBuf) {
    use std::sync::atomic::Ordering;
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        ticks.tick().await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        let Ok(skew) = text.trim().parse::<i64>() else {
            continue;
        };
        let before = ds824::rsm::sessions::CLOCK_SKEW_MS.swap(skew, Ordering::Relaxed);
        if before != skew {
            tracing::warn!(
                skew_ms = skew,
                "wall clock moved (--unsafe-clock-skew-file)"
            );
        }
    }
}

async fn run_kv(args: KvArgs, role: ServiceRole) -> ExitCode {
    #[cfg(debug_assertions)]
    let unsafe_ack_before_commit = args.unsafe_ack_before_commit;
    #[cfg(not(debug_assertions))]
    let unsafe_ack_before_commit = false;
    if unsafe_ack_before_commit {
        tracing::warn!("--unsafe-ack-before-commit: writes are acknowledged before they commit (self-test only)");
    }
    #[cfg(debug_assertions)]
    if let Some(path) = args.unsafe_clock_skew_file.clone() {
        tokio::spawn(follow_clock_skew(path));
    }
    let listen = match resolve("--listen", &args.listen).await {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    let peer_listen = match resolve("--peer-listen", &args.peer_listen).await {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    let security = match args.tls.for_node(args.id).security() {
        Ok(security) => security,
        Err(e) => {
            eprintln!("kvd: error: {e}");
            return ExitCode::from(2);
        }
    };
    let cluster = match (&args.cluster, security.principal()) {
        (Some(cluster), _) => cluster.clone(),
        (None, Some(principal)) => principal.cluster.clone(),
        (None, None) => DEFAULT_CLUSTER.to_string(),
    };
    let config = ReplicaConfig {
        id: args.id,
        listen,
        peer_listen,
        peers: args.peers.unwrap_or_default(),
        join: args.join,
        clients: args.clients,
        cluster,
        security: security.clone(),
        data_dir: args.data_dir,
        snapshot_threshold: args.snapshot_threshold,
        max_snapshot_bytes: args
            .max_snapshot_bytes
            .unwrap_or_else(ds824::replica::default_max_snapshot_bytes),
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        policy: ds824::rsm::sessions::LogPolicy {
            ttl_ms: args.session_ttl.saturating_mul(1000),
            max_sessions: args.max_sessions,
            quota_bytes: args.quota_bytes,
        },
        role,
        metrics_listen: args.metrics_listen,
        unsafe_ack_before_commit,
        restore: args.restore,
        lease_reads: args.lease_reads,
        follower_reads: args.follower_reads,
    };
    let node = match Replica::start(config).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!("kvd: error: {e}");
            return ExitCode::from(2);
        }
    };
    security.log_startup("kvd");
    match node.run(ds824::daemon::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
