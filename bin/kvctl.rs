//! `kvctl`: the operator and user command line for a ds824 KV cluster.
//!
//! Exit status: 0 success; 1 a "no" answer (key not found, cas mismatch, history not linearizable);
//! 2 the command could not be carried out (bad flags, cluster unreachable, server refused); 3 `check`
//! could not decide. Errors are one line on stderr.

/// mimalloc instead of glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ds824::ctrler::addresses::client_addresses;
use ds824::ctrler::addresses::AddressView;
use ds824::ctrler::CtrlerClerk;
use ds824::kv::KvOps as _;
use ds824::kv::{CasOutcome, Clerk, ClerkConfig, ClerkError};
use ds824::kvctl::shard::{self, AnyClerk};
use ds824::kvctl::{
    self, backup, bench, breakdown, check, member, status, EXIT_ERROR, EXIT_NO, EXIT_OK,
};
use ds824::security::Role;
use ds824::security::{certs, Security, TlsArgs};
use ds824::shardkv::ShardClerk;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Talk to a ds824 key/value cluster, plain or sharded.
///
/// Which cluster: get/put/append/delete/cas and status address the KV cluster of --cluster
/// (KVCTL_CLUSTER; default 127.0.0.1:7001). If --ctrlers (or KVCTL_CTRLERS) is given and --cluster is
/// not, they address the sharded cluster behind those controllers instead: each key goes to the shard
/// group that owns it in the latest configuration (found and followed automatically), and `status` shows
/// the configuration and every shard group's servers (role, term, leader, commit/applied index, the
/// configuration each has reached, shards serving and still pulling, and frozen copies of given-away
/// shards still held), including groups that left in the last few configurations.
///
/// Security: TLS is on by default. Give the cluster CA and a certificate with --tls-ca, --tls-cert,
/// --tls-key (or DS824_TLS_CA, DS824_TLS_CERT, DS824_TLS_KEY); a "client" certificate may read, write
/// and see status, an "admin" one may also change the controllers' configuration. `kvctl certs` makes
/// the CA and certificates. --insecure (DS824_INSECURE=1) talks plaintext to a cluster started with it.
///
/// Exit status: 0 success; 1 a "no" (key not found, cas mismatch, history not linearizable); 2 the command
/// could not be carried out (one line on stderr says why), or it succeeded but its output could not be
/// written; 3 `check` could not decide within its budget. A reader that stops reading
/// (`kvctl status | head -3`) cuts the output short, not the command, and leaves the exit status as it
/// would have been.
#[derive(Parser)]
#[command(name = "kvctl", version)]
struct Cli {
    /// The KV cluster's servers as HOST:PORT, comma-separated (any subset works; the leader is found).
    /// Default 127.0.0.1:7001, unless --ctrlers is given (then the sharded cluster is used; a
    /// --ctrlers typed on the command line also beats a KVCTL_CLUSTER from the environment).
    #[arg(long, env = "KVCTL_CLUSTER", global = true)]
    cluster: Option<String>,
    /// Give up on a request after this many milliseconds, retries included.
    #[arg(long, default_value_t = 10_000, global = true)]
    timeout_ms: u64,
    /// The shard controllers as HOST:PORT, comma-separated. Used by `kvctl ctrler ...` (default
    /// 127.0.0.1:7101), and, when --cluster is not given, by get/put/append/delete/cas/status to reach
    /// the sharded cluster.
    #[arg(long, env = "KVCTL_CTRLERS", global = true)]
    ctrlers: Option<String>,
    /// Reach shard groups at their peer addresses (before the `@` of a joined `PEER@CLIENT` entry)
    /// instead of the client addresses they advertise: for a kvctl inside the cluster's network.
    #[arg(long, env = "KVCTL_INTERNAL_ADDRESSES", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    internal_addresses: bool,
    /// Send reads (get, and the reads of `bench`) to every replica in turn, not only the leader: for
    /// servers started with `kvd --follower-reads`, which answer them linearizably. Servers without it
    /// refuse a read on a follower with a hint, and it is retried at the leader, costing a round trip.
    /// The environment variable takes 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "KVCTL_FOLLOWER_READS", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    follower_reads: bool,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the value of KEY (exit 1 and "not found" on stderr if absent).
    Get {
        /// The key.
        key: String,
    },
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Append VALUE to the value of KEY (an absent key counts as empty).
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: String,
    },
    /// Remove KEY (exit 1 and "not found" on stderr if it was absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Set KEY to NEW if its value is EXPECTED (or, with --expect-absent, if it is absent). On a
    /// mismatch, print the current value (or "not found" on stderr) and exit 1.
    Cas {
        /// The key.
        key: String,
        /// EXPECTED then NEW; with --expect-absent only NEW.
        #[arg(value_name = "VALUES", num_args = 1..=2, required = true)]
        values: Vec<String>,
        /// Swap only if KEY is absent (then give only NEW).
        #[arg(long)]
        expect_absent: bool,
    },
    /// Show every node's role, term, leader, commit/applied index, log and snapshot sizes. With
    /// --ctrlers (and no --cluster): the latest configuration and, per shard group, each server's role,
    /// term, leader, commit/applied index, configuration reached, shards serving / pulling, outgoing
    /// copies held (OUTGOING) and shards whose old owner has not yet confirmed deleting its copy
    /// (CONFIRMING: keep that old owner running until it drops to 0).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a JSON-lines history for linearizability (exit 0 ok, 1 violation, 3 undecided, 2 bad
    /// input). An undecided check names the keys it could not decide and why.
    Check {
        /// The history file (one operation per line; see the `check` module documentation).
        history: PathBuf,
        /// Give up (exit 3) after this many seconds.
        #[arg(long, default_value_t = 60)]
        budget_secs: u64,
        /// Memory the whole check may use, the parsed history included (e.g. 512MiB, 2GiB); keys
        /// whose search needs more are reported undecided (exit 3) instead of the process dying.
        #[arg(long, default_value = "2GiB", value_parser = check::parse_size)]
        max_memory: usize,
    },
    /// Manage the shard controller (see `kvctl ctrler --help`); uses --ctrlers / KVCTL_CTRLERS.
    Ctrler {
        #[command(subcommand)]
        op: CtrlerOp,
    },
    /// Create the cluster's certificate authority and issue certificates (see `kvctl certs --help`).
    Certs {
        #[command(subcommand)]
        op: CertsOp,
    },
    /// Back up a service to a file, or say what a backup file holds (see `kvctl snapshot --help`).
    /// Restore with `kvd ... --restore FILE`.
    Snapshot {
        #[command(subcommand)]
        op: SnapshotOp,
    },
    /// See and change a Raft group's members: the KV cluster (--cluster), the controllers (--ctrler,
    /// from --ctrlers) or shard group GID (--gid, its servers found through --ctrlers). Changes need
    /// an admin certificate with TLS and go to the leader one at a time (see `kvctl member --help`).
    Member {
        #[command(flatten)]
        group: GroupArgs,
        #[command(subcommand)]
        op: MemberOp,
    },
    /// Hand the group's leadership to voter ID (it must be caught up; the old leader refuses writes
    /// until the transfer ends, a few milliseconds). Which group: as for `kvctl member`.
    TransferLeader {
        #[command(flatten)]
        group: GroupArgs,
        /// The voter to lead.
        id: u64,
    },
    /// Measure throughput and latency with concurrent clients, against the KV cluster (--cluster) or,
    /// with --ctrlers, the sharded store (each client routes keys to groups through the controllers).
    Bench {
        #[command(flatten)]
        load: bench::LoadArgs,
        /// Also print where a write's time went: every node's per-stage counters (arrival to log
        /// index, append to commit, leader and follower flushes, commit to reply), read before and
        /// after the run, as means per write next to the client's mean.
        #[arg(long)]
        breakdown: bool,
    },
}

/// Shard controller operations.
#[derive(Subcommand)]
enum CtrlerOp {
    /// Add replica groups, each as GID=SERVER,SERVER,... (several at once allowed). Prints the new
    /// configuration. A SERVER is HOST:PORT, or PEER@CLIENT when clients outside the cluster's network
    /// reach it elsewhere than the other groups do (a published port): groups pull shards from PEER,
    /// clerks use CLIENT (unless run with --internal-addresses).
    Join {
        /// Groups, e.g. 101=kvs1:7201,kvs2:7201,kvs3:7201 or
        /// 1=g1a:7201@127.0.0.1:17201,g1b:7201@127.0.0.1:17202,g1c:7201@127.0.0.1:17203
        #[arg(required = true, value_name = "GID=SERVERS")]
        groups: Vec<String>,
        /// Leave out groups the latest configuration already has instead of failing on them (for a
        /// provisioning job that runs on every start); with nothing left to join, print the latest
        /// configuration and exit 0.
        #[arg(long)]
        skip_joined: bool,
    },
    /// Remove replica groups; their shards move to the others. Prints the new configuration.
    Leave {
        /// Group ids.
        #[arg(required = true)]
        gids: Vec<u64>,
        /// Remove a group even though it never reported taking the shards it was given (the
        /// controllers refuse that otherwise: those shards would wait, frozen at their previous
        /// owners, for a group that is gone). For controllers run without shard groups, or a group
        /// lost for good.
        #[arg(long)]
        force: bool,
    },
    /// Give SHARD to group GID (rebalancing will not undo it). Prints the new configuration.
    Move {
        /// The shard number.
        shard: u64,
        /// The group id.
        gid: u64,
    },
    /// Replace group GID's server list (same form as join) and keep its shards where they are: what
    /// clerks and other groups are handed after the group's Raft members changed. `kvctl member
    /// add|remove --gid GID --serve SERVER` does this for one server; this sets the whole list.
    Servers {
        /// The group and its servers now, e.g. 1=g1a:7201@127.0.0.1:17201,g1d:7201@127.0.0.1:17207
        #[arg(value_name = "GID=SERVERS")]
        group: String,
    },
    /// Print configuration NUM (default: the latest).
    Query {
        /// Configuration number.
        num: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Backups: `save` asks the leader of a service for a consistent snapshot (every write acknowledged
/// before the save began is in it) and writes it to FILE with a checksum; `status` checks a file and
/// says what it holds. To restore, start every node of a new cluster with `kvd ... --restore FILE`
/// and an empty --data-dir.
#[derive(Subcommand)]
enum SnapshotOp {
    /// Save a backup of the KV cluster (--cluster), of the controllers (--ctrler, from --ctrlers) or of
    /// shard group GID (--gid, its servers found through --ctrlers) to FILE. Needs an admin
    /// certificate with TLS. FILE must not exist; it appears only complete and checked.
    Save {
        /// Where to write the backup.
        file: PathBuf,
        /// Back up the shard controllers instead of the KV cluster.
        #[arg(long, conflicts_with = "gid")]
        ctrler: bool,
        /// Back up shard group GID (every shard it holds) instead of the KV cluster.
        #[arg(long)]
        gid: Option<u64>,
        /// Refuse a backup whose snapshot is larger than this many bytes (a server that sends more
        /// than it declared is refused too). Default: the space free where FILE goes (a save holds
        /// nothing in memory).
        #[arg(long, value_name = "BYTES")]
        max_snapshot_bytes: Option<u64>,
    },
    /// Check a backup file (length, checksum, that its state decodes) and print its service, source
    /// cluster, index, term, size, keys and sessions. Exit 2 with the reason if it is unusable.
    Status {
        /// The backup file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Refuse a file whose snapshot is larger than this many bytes (checking one loads it into
        /// memory). Default: half this machine's memory, at least 4 GiB.
        #[arg(long, value_name = "BYTES")]
        max_snapshot_bytes: Option<u64>,
    },
}

/// Which Raft group a `member` or `transfer-leader` command addresses.
#[derive(clap::Args)]
struct GroupArgs {
    /// The shard controllers' group (its servers from --ctrlers) instead of the KV cluster.
    #[arg(long, conflicts_with = "gid")]
    ctrler: bool,
    /// Shard group GID (its servers found through --ctrlers) instead of the KV cluster.
    #[arg(long)]
    gid: Option<u64>,
}

/// Membership of a Raft group. A new node is started with `kvd ... --join HOST:PORT,...` (client
/// addresses of members) and an empty data dir, then added here; it gets the state by snapshot.
/// To replace a node: `remove` it, start the new one with --join, `add` it.
#[derive(Subcommand)]
enum MemberOp {
    /// Show the configuration: each member's role (leader, voter, learner), peer address, and how
    /// many entries it is behind the leader.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add node ID with peer address HOST:PORT: first as a learner (it receives the log but does not
    /// vote), then, once it caught up, as a voter. One voter is added or removed at a time.
    Add {
        /// ID=HOST:PORT: the new node's id and its --peer-listen address as the others reach it.
        #[arg(value_name = "ID=HOST:PORT", value_parser = parse_member)]
        member: (u64, String),
        /// Stop once it is a learner (promote it later with `kvctl member promote ID`).
        #[arg(long, conflicts_with = "serve")]
        learner: bool,
        /// With --gid: once it is a voter, add SERVER (PEER or PEER@CLIENT, as `ctrler join` names
        /// servers) to the group's servers in the controllers, so clerks and other groups reach it.
        #[arg(long, value_name = "SERVER")]
        serve: Option<String>,
    },
    /// Make learner ID a voter, once it has caught up with the leader (waits for that).
    Promote {
        /// The learner.
        id: u64,
        /// With --gid: then add SERVER to the group's servers in the controllers (as for `add`).
        #[arg(long, value_name = "SERVER")]
        serve: Option<String>,
    },
    /// Remove member ID. Removing the leader is allowed: it steps down once the removal commits.
    /// Stop the removed node's process afterwards.
    Remove {
        /// The member.
        id: u64,
        /// With --gid: then take SERVER (the removed node's entry) out of the group's servers in the
        /// controllers; checked to be listed before anything is removed.
        #[arg(long, value_name = "SERVER")]
        serve: Option<String>,
    },
}

fn parse_member(spec: &str) -> Result<(u64, String), String> {
    let peers = ds824::replica::parse_peers(spec)?;
    match peers.into_iter().collect::<Vec<_>>().as_slice() {
        [(id, address)] => Ok((*id, address.clone())),
        _ => Err(format!("{spec:?}: give one ID=HOST:PORT")),
    }
}

/// Certificate authority operations. The CA directory holds ca.pem (give it to every node and
/// client), ca-key.pem (keep it off the nodes) and the certificates issued.
#[derive(Subcommand)]
enum CertsOp {
    /// Create a CA for a cluster in DIR (refused if DIR already has one).
    Init {
        /// The CA directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// The cluster name every certificate will be issued for (kvd's --cluster).
        #[arg(long, default_value = "ds824")]
        cluster: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Also issue these certificates, as ROLE/NAME (comma-separated), e.g.
        /// kv/1,kv/2,kv/3,admin/operator: one command provisions a whole deployment.
        #[arg(long, value_delimiter = ',')]
        issue: Vec<String>,
        /// Reuse a CA already in DIR (of the same cluster) and certificates already issued, instead of
        /// refusing: for a provisioning job that runs on every start.
        #[arg(long)]
        keep_existing: bool,
        /// Write the issued certificates, their keys and a copy of ca.pem here instead of DIR, so the
        /// directory handed to the nodes never holds the CA key.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Issue a certificate for ROLE/NAME, written to DIR/ROLE-NAME.pem and DIR/ROLE-NAME-key.pem.
    ///
    /// Roles: kv, ctrler, shard-GID (replicas: NAME is the node id), client (read, write, status),
    /// admin (also controller join/leave/move and MapReduce submit), worker, coordinator (MapReduce).
    /// To rotate a certificate, issue it again and restart the process that uses it.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// What the holder may do.
        #[arg(long)]
        role: String,
        /// Which one it is (a replica's node id).
        #[arg(long)]
        name: String,
        /// Extra DNS names or IP addresses to put in it, comma-separated (clients verify servers under
        /// names given by role, ROLE.server.ds824, so these are only for other tools; names under
        /// server.ds824 are refused).
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Where the KV cluster is when neither --cluster nor KVCTL_CLUSTER says.
const DEFAULT_CLUSTER: &str = "127.0.0.1:7001";
/// Where the controllers are when neither --ctrlers nor KVCTL_CTRLERS says.
const DEFAULT_CTRLERS: &str = "127.0.0.1:7101";

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // What is typed beats what is exported: `--ctrlers X` with KVCTL_CLUSTER in the environment
    // means the sharded store, as it does without the variable.
    let from_env = |id| matches.value_source(id) == Some(ValueSource::EnvVariable);
    if cli.ctrlers.is_some() && from_env("cluster") && !from_env("ctrlers") {
        cli.cluster = None;
    }
    let runtime = match ds824::daemon::runtime("kvctl") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = runtime.block_on(run(cli));
    // A command carried out whose output (its answer) was lost did not succeed.
    ExitCode::from(ds824::daemon::exit_status(
        "kvctl",
        code,
        ds824::kvctl::EXIT_ERROR,
    ))
}

fn fail(error: impl std::fmt::Display) -> u8 {
    ds824::errln!("kvctl: error: {error}");
    EXIT_ERROR
}

fn certs_command(op: CertsOp) -> u8 {
    match op {
        CertsOp::Init {
            dir,
            cluster,
            days,
            issue,
            keep_existing,
            out,
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            if keep_existing && dir.join("ca.pem").exists() {
                match certs::cluster_of(&dir) {
                    Ok(existing) if existing == cluster => {}
                    Ok(existing) => {
                        return fail(format!(
                            "{} holds the CA of cluster {existing:?}, not {cluster:?}",
                            dir.display()
                        ))
                    }
                    Err(e) => return fail(e),
                }
            } else if let Err(e) = certs::init(&dir, &cluster, days) {
                return fail(e);
            }
            ds824::outln!("{}", dir.join("ca.pem").display());
            for spec in issue {
                let Some((role, name)) = spec.split_once('/') else {
                    return fail(format!("--issue {spec:?} is not ROLE/NAME"));
                };
                if keep_existing && out.join(format!("{role}-{name}.pem")).exists() {
                    continue;
                }
                match certs::issue_into(&dir, &out, role, name, &[], 365) {
                    Ok(issued) => ds824::outln!("{} {}", issued.principal, issued.cert.display()),
                    Err(e) => return fail(e),
                }
            }
            EXIT_OK
        }
        CertsOp::Issue {
            dir,
            role,
            name,
            host,
            days,
        } => match certs::issue(&dir, &role, &name, &host, days) {
            Ok(issued) => {
                ds824::outln!(
                    "{} {} {}",
                    issued.principal,
                    issued.cert.display(),
                    issued.key.display()
                );
                EXIT_OK
            }
            Err(e) => fail(e),
        },
    }
}

async fn run(cli: Cli) -> u8 {
    if let Command::Certs { op } = cli.command {
        return certs_command(op);
    }
    // `check` and `snapshot status` read a file: they need no connection, so no certificate.
    let offline = matches!(
        cli.command,
        Command::Check { .. }
            | Command::Snapshot {
                op: SnapshotOp::Status { .. }
            }
    );
    let security: Security = match cli.tls.security() {
        Ok(security) => security,
        Err(_) if offline => Security::Insecure,
        Err(e) => return fail(e),
    };
    // Sharded mode: controllers named, no KV cluster named.
    let sharded = cli.cluster.is_none() && cli.ctrlers.is_some();
    let cluster = kvctl::parse_cluster(cli.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER));
    let ctrlers = kvctl::parse_cluster(cli.ctrlers.as_deref().unwrap_or(DEFAULT_CTRLERS));
    if sharded && ctrlers.is_empty() {
        return fail("no controllers given (--ctrlers or KVCTL_CTRLERS)");
    }
    if !sharded && cluster.is_empty() {
        return fail("no servers given (--cluster or KVCTL_CLUSTER)");
    }
    let config = ClerkConfig {
        call_timeout: Duration::from_millis(cli.timeout_ms),
        security: security.clone(),
        read_anywhere: cli.follower_reads,
        ..ClerkConfig::default()
    };
    let view = match cli.internal_addresses {
        true => AddressView::Internal,
        false => AddressView::Advertised,
    };
    let clerk = || -> Result<AnyClerk, ClerkError> {
        Ok(if sharded {
            AnyClerk::Sharded(Box::new(
                ShardClerk::new(&ctrlers, config.clone())?.with_address_view(view),
            ))
        } else {
            AnyClerk::Kv(Box::new(Clerk::new(&cluster, config.clone())?))
        })
    };
    if let Command::Snapshot { op } = cli.command {
        return snapshot_command(op, &cluster, &ctrlers, config, view).await;
    }
    if let Command::Member { group, op } = cli.command {
        use kvctl::ctrler::ServerEdit;
        let (op, edit) = match op {
            MemberOp::List { json } => (member::Op::List { json }, None),
            MemberOp::Add {
                member: (id, address),
                learner,
                serve,
            } => (
                member::Op::Add {
                    id,
                    address,
                    learner_only: learner,
                },
                serve.map(ServerEdit::Add),
            ),
            MemberOp::Promote { id, serve } => {
                (member::Op::Promote(id), serve.map(ServerEdit::Add))
            }
            MemberOp::Remove { id, serve } => {
                (member::Op::Remove(id), serve.map(ServerEdit::Remove))
            }
        };
        let changes_voters = matches!(
            op,
            member::Op::Add {
                learner_only: false,
                ..
            } | member::Op::Promote(_)
                | member::Op::Remove(_)
        );
        let unchanged_servers = group.gid.filter(|_| changes_voters && edit.is_none());
        let edit = match (edit, group.gid) {
            (None, _) => None,
            (Some(edit), Some(gid)) => Some((gid, edit)),
            (Some(_), None) => return fail("--serve edits a shard group's servers: give --gid"),
        };
        let code = member_command(&group, op, edit, &cluster, &ctrlers, config, view).await;
        if let (EXIT_OK, Some(gid)) = (code, unchanged_servers) {
            ds824::errln!(
                "kvctl: note: without --serve the controllers keep handing out group {gid}'s servers as they were (see `kvctl member add --help`)"
            );
        }
        return code;
    }
    if let Command::TransferLeader { group, id } = cli.command {
        let op = member::Op::TransferLeader(id);
        return member_command(&group, op, None, &cluster, &ctrlers, config, view).await;
    }
    if let Command::Ctrler { op } = cli.command {
        if ctrlers.is_empty() {
            return fail("no controllers given (--ctrlers or KVCTL_CTRLERS)");
        }
        return kvctl::ctrler::run(&ctrlers, config, op.into()).await;
    }
    if let (Command::Status { json }, true) = (&cli.command, sharded) {
        return match shard::collect_sharded(&ctrlers, config, Duration::from_secs(2), view).await {
            Ok(report) => {
                if *json {
                    ds824::outln!("{}", shard::render_sharded_json(&report));
                } else {
                    ds824::out!("{}", shard::render_sharded_table(&report));
                }
                EXIT_OK
            }
            Err(e) => fail(format!("controllers: {e}")),
        };
    }
    match cli.command {
        Command::Ctrler { .. }
        | Command::Certs { .. }
        | Command::Snapshot { .. }
        | Command::Member { .. }
        | Command::TransferLeader { .. } => EXIT_ERROR,
        Command::Get { key } => match clerk() {
            Ok(mut c) => match c.get(&key).await {
                Ok(Some(value)) => {
                    ds824::outln!("{value}");
                    EXIT_OK
                }
                Ok(None) => {
                    ds824::errln!("not found");
                    EXIT_NO
                }
                Err(e) => fail(e),
            },
            Err(e) => fail(e),
        },
        Command::Put { key, value } => done(async { clerk()?.put(&key, &value).await }.await),
        Command::Append { key, value } => done(async { clerk()?.append(&key, &value).await }.await),
        Command::Delete { key } => match async { clerk()?.delete(&key).await }.await {
            Ok(true) => EXIT_OK,
            Ok(false) => {
                ds824::errln!("not found");
                EXIT_NO
            }
            Err(e) => fail(e),
        },
        Command::Cas {
            key,
            values,
            expect_absent,
        } => {
            let (expected, new) =
                match (expect_absent, values.as_slice()) {
                    (true, [new]) => (None, new.clone()),
                    (false, [expected, new]) => (Some(expected.clone()), new.clone()),
                    _ => return fail(
                        "usage: kvctl cas KEY EXPECTED NEW, or kvctl cas --expect-absent KEY NEW",
                    ),
                };
            match async { clerk()?.cas(&key, expected.as_deref(), &new).await }.await {
                Ok(CasOutcome::Swapped) => EXIT_OK,
                Ok(CasOutcome::Mismatch { current: Some(v) }) => {
                    ds824::outln!("{v}");
                    EXIT_NO
                }
                Ok(CasOutcome::Mismatch { current: None }) => {
                    ds824::errln!("not found");
                    EXIT_NO
                }
                Ok(CasOutcome::MismatchValueNotKept) => {
                    ds824::errln!(
                        "mismatch (the current value is too long to repeat for a retried request; \
                         read it with `kvctl get`)"
                    );
                    EXIT_NO
                }
                Err(e) => fail(e),
            }
        }
        Command::Status { json } => {
            let reports = status::collect(&cluster, Duration::from_secs(2), &security).await;
            if json {
                ds824::outln!("{}", status::render_json(&reports));
            } else {
                ds824::out!("{}", status::render_table(&reports));
                // The configuration as the leader sees it: learners, and how far each is behind.
                let target = backup::Target {
                    servers: cluster.clone(),
                    role: Role::Kv,
                };
                if let Ok(members) =
                    member::leader_members(&target, &config, Duration::from_secs(2)).await
                {
                    ds824::out!("\nmembers: {}", member::render_table(&members));
                }
            }
            if reports.iter().any(|r| r.status.is_ok()) {
                EXIT_OK
            } else {
                fail("no node answered")
            }
        }
        Command::Check {
            history,
            budget_secs,
            max_memory,
        } => {
            let budget = Duration::from_secs(budget_secs);
            let job = move || check::check_file_with(&history, budget, max_memory);
            match tokio::task::spawn_blocking(job).await {
                Ok(Ok((report, code))) => {
                    ds824::outln!("{report}");
                    code
                }
                Ok(Err(e)) => fail(e),
                Err(e) => fail(format!("checker failed: {e}")),
            }
        }
        Command::Bench { load, breakdown } => {
            let json = load.json;
            let load = match load.load() {
                Ok(load) => load,
                Err(e) => return fail(e),
            };
            if breakdown && sharded {
                return fail("--breakdown reads a KV cluster's nodes (--cluster); it does not cover shard groups");
            }
            let cluster_copy = cluster.clone();
            let config = bench::BenchConfig {
                target: if sharded {
                    bench::Target::Sharded {
                        ctrlers: ctrlers.clone(),
                        view,
                    }
                } else {
                    bench::Target::Kv(cluster)
                },
                clerk: config.clone(),
                load,
            };
            let read_stages = || async {
                let reports =
                    status::collect(&cluster_copy, Duration::from_secs(2), &security).await;
                breakdown::readings(&reports)
            };
            if let Err(e) = bench::fill(&config, &config.load).await {
                return fail(e);
            }
            // Read after the fill, so the means cover the measured operations only.
            let before = if breakdown {
                Some(read_stages().await)
            } else {
                None
            };
            let result = bench::measure_showing_progress(&config, &config.load).await;
            let stages = match (&result, before) {
                (Ok(report), Some(before)) => Some(breakdown::Breakdown::between(
                    &before,
                    &read_stages().await,
                    report.mean,
                )),
                _ => None,
            };
            match result {
                Ok(report) if json => {
                    let mut out = report.to_json();
                    if let Some(stages) = stages {
                        out["breakdown"] = serde_json::Value::String(stages.to_string());
                    }
                    ds824::outln!("{out}");
                    EXIT_OK
                }
                Ok(report) => {
                    ds824::outln!("{report}");
                    if let Some(stages) = stages {
                        ds824::out!("{stages}");
                    }
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// The servers and certificate role of the group `group` names: the KV cluster, the controllers,
/// or a shard group as the latest configuration lists it.
async fn resolve_group(
    group: &GroupArgs,
    cluster: &[String],
    ctrlers: &[String],
    config: &ClerkConfig,
    view: AddressView,
) -> Result<backup::Target, String> {
    match (group.ctrler, group.gid) {
        (true, _) => Ok(backup::Target {
            servers: ctrlers.to_vec(),
            role: Role::Ctrler,
        }),
        (false, Some(gid)) => {
            let mut clerk = CtrlerClerk::new(ctrlers, config.clone())
                .map_err(|e| format!("controllers: {e}"))?;
            let (_, servers) = kvctl::ctrler::group_servers(&mut clerk, gid).await?;
            Ok(backup::Target {
                servers: client_addresses(&servers, view),
                role: Role::Shard(gid),
            })
        }
        (false, None) => Ok(backup::Target {
            servers: cluster.to_vec(),
            role: Role::Kv,
        }),
    }
}

/// Run a membership operation; with `edit`, then make the controllers hand out shard group `gid`'s
/// servers accordingly (checked before the membership changes, so a typo changes nothing).
async fn member_command(
    group: &GroupArgs,
    op: member::Op,
    edit: Option<(u64, kvctl::ctrler::ServerEdit)>,
    cluster: &[String],
    ctrlers: &[String],
    config: ClerkConfig,
    view: AddressView,
) -> u8 {
    let target = match resolve_group(group, cluster, ctrlers, &config, view).await {
        Ok(target) => target,
        Err(e) => return fail(e),
    };
    let mut ctrler_clerk = None;
    if let Some((gid, edit)) = &edit {
        let mut clerk = match CtrlerClerk::new(ctrlers, config.clone()) {
            Ok(clerk) => clerk,
            Err(e) => return fail(format!("controllers: {e}")),
        };
        if let Err(e) = kvctl::ctrler::check_server_edit(&mut clerk, *gid, edit).await {
            return fail(e);
        }
        ctrler_clerk = Some(clerk);
    }
    if let Err(e) = member::run(&target, &config, op).await {
        return fail(format!("{e:#}"));
    }
    if let (Some((gid, edit)), Some(clerk)) = (edit, ctrler_clerk.as_mut()) {
        match kvctl::ctrler::edit_servers(clerk, gid, &edit).await {
            Ok(latest) => {
                let servers = latest.groups.get(&gid).map(|s| s.join(",")).unwrap_or_default();
                ds824::outln!(
                    "controllers: group {gid} is served by {servers} (configuration {})",
                    latest.num
                );
            }
            Err(e) => {
                return fail(format!(
                    "the membership changed, but {e}; set the list with `kvctl ctrler servers {gid}=SERVERS`"
                ))
            }
        }
    }
    EXIT_OK
}

async fn snapshot_command(
    op: SnapshotOp,
    cluster: &[String],
    ctrlers: &[String],
    config: ClerkConfig,
    view: AddressView,
) -> u8 {
    match op {
        SnapshotOp::Status {
            file,
            json,
            max_snapshot_bytes,
        } => match backup::inspect(&file, limit_or_default(max_snapshot_bytes)) {
            Ok(summary) if json => {
                ds824::outln!("{}", serde_json::to_string(&summary).unwrap_or_default());
                EXIT_OK
            }
            Ok(summary) => {
                ds824::out!("{}", backup::render(&summary));
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        SnapshotOp::Save {
            file,
            ctrler,
            gid,
            max_snapshot_bytes,
        } => {
            let group = GroupArgs { ctrler, gid };
            let target = match resolve_group(&group, cluster, ctrlers, &config, view).await {
                Ok(target) => target,
                Err(e) => return fail(e),
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {bytes} received")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let result = backup::save(&target, &config, &file, max_snapshot_bytes, |bytes| {
                bar.set_position(bytes)
            })
            .await;
            bar.finish_and_clear();
            match result {
                Ok(header) => {
                    ds824::outln!(
                        "saved {} of {} at index {} (term {}, {} bytes of snapshot) to {}",
                        header.service,
                        header.cluster_id,
                        header.index,
                        header.term,
                        header.snapshot_bytes,
                        file.display()
                    );
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// A `--max-snapshot-bytes` as given, or the default `kvd` uses.
fn limit_or_default(given: Option<u64>) -> u64 {
    given.unwrap_or_else(ds824::replica::default_max_snapshot_bytes)
}

fn done(result: Result<(), ClerkError>) -> u8 {
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => fail(e),
    }
}

impl From<CtrlerOp> for kvctl::ctrler::Op {
    fn from(op: CtrlerOp) -> Self {
        match op {
            CtrlerOp::Join {
                groups,
                skip_joined,
            } => kvctl::ctrler::Op::Join(groups, skip_joined),
            CtrlerOp::Leave { gids, force } => kvctl::ctrler::Op::Leave(gids, force),
            CtrlerOp::Move { shard, gid } => kvctl::ctrler::Op::Move(shard, gid),
            CtrlerOp::Servers { group } => kvctl::ctrler::Op::Servers(group),
            CtrlerOp::Query { num, json } => kvctl::ctrler::Op::Query(num, json),
        }
    }
}
