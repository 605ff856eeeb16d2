//! The sharded KV store as operators run it: real `kvd ctrler` and `kvd shard` processes on loopback
//! ports, groups joining and leaving under load, group leaders SIGKILLed in the middle of a migration
//! and restarted, driven by the library's `ShardClerk`.

use ds824::check::{check, CheckResult, History, KvModel, OpKind, Operation, Status as OpStatus};
use ds824::ctrler::CtrlerClerk;
use ds824::kv::clerk::node_status;
use ds824::kv::KvOps;
use ds824::proto::kv as pb;
use ds824::proto::kv::kv_client::KvClient;
use ds824::rsm::client::{new_client_id, ClerkConfig};
use ds824::shardkv::{key_to_shard, ShardClerk};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "support/ports.rs"]
mod ports;
#[path = "support/replicas.rs"]
mod replicas;
#[path = "support/scrape.rs"]
mod scrape;
#[path = "support/tls.rs"]
mod tls;
use replicas::{free_port, get_at, Replicas, WAIT};

const KEYS: usize = 10;
const CLIENTS: u64 = 4;

/// Nanoseconds since the test started: one clock shared by every client, as the checker requires.
fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// One client's loop until told to stop: append unique tokens (`c<client>.<n>;`) to the keys in turn,
/// reading a key every third operation, recording every operation for the checks.
async fn client_loop(
    c: u64,
    mut clerk: ShardClerk,
    start: Instant,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
    history: Arc<Mutex<Vec<Operation>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k{}", (c + n * 3) % KEYS as u64);
        let invoke = now_ns(start);
        let op = if n.is_multiple_of(3) {
            match clerk.get(&key).await {
                Ok(value) => Operation::get(c, &key, value.as_deref()).ok_at(invoke, now_ns(start)),
                Err(e) => {
                    eprintln!("client {c}: get {key} failed: {e}");
                    Operation::get(c, &key, None).info_at(invoke)
                }
            }
        } else {
            let token = format!("c{c}.{n};");
            match clerk.append(&key, &token).await {
                Ok(()) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                    Operation::append(c, &key, &token).ok_at(invoke, now_ns(start))
                }
                Err(e) => {
                    eprintln!("client {c}: append {token} to {key} failed: {e}");
                    Operation::append(c, &key, &token).info_at(invoke)
                }
            }
        };
        history.lock().expect("lock").push(op);
        // Pace the load: many operations around each change, not the longest values.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until the clients have acknowledged `more` appends beyond what they had.
async fn wait_for_progress(acks: &AtomicUsize, more: usize, when: &str) {
    let target = acks.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + WAIT;
    while acks.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "clients made no progress {when}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send one append as client `client_id` with sequence number `seq` straight to a group (trying each
/// server until one leads), as a clerk's retry would arrive; returns the error code of the answer that
/// ended the attempts (OK or WRONG_GROUP).
async fn raw_append(addrs: &[String], client_id: u64, seq: u64, key: &str, value: &str) -> i32 {
    let request = pb::MutateRequest {
        client_id,
        seq,
        command: Some(pb::Command {
            op: Some(pb::command::Op::Append(pb::Append {
                key: key.into(),
                value: value.into(),
            })),
        }),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        for address in addrs {
            let Ok(mut client) = KvClient::connect(format!("http://{address}")).await else {
                continue;
            };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(2), client.mutate(request.clone())).await
            {
                let error = reply.into_inner().error;
                if error == pb::ErrorCode::Ok as i32 || error == pb::ErrorCode::WrongGroup as i32 {
                    return error;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader of {addrs:?} took the append"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn clerk_config() -> ClerkConfig {
    ClerkConfig {
        call_timeout: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(1),
        ..ClerkConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_joins_leaves_and_leader_sigkill_during_migration() {
    let started = Instant::now();
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let ctrler_list = ctrlers.addrs.join(",");
    let mut groups: BTreeMap<u64, Replicas> = (1..=3)
        .map(|gid| (gid, Replicas::start(root.path(), gid, &ctrler_list)))
        .collect();
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    let group_of = |gid: u64, groups: &BTreeMap<u64, Replicas>| {
        [(gid, groups[&gid].addrs.clone())]
            .into_iter()
            .collect::<BTreeMap<_, _>>()
    };
    let mut both = group_of(1, &groups);
    both.extend(group_of(2, &groups));
    let config = admin.join(both).await.expect("join groups 1 and 2");
    eprintln!("config {}: {:?}", config.num, config.shards);

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let history = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|c| {
            let clerk = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
            tokio::spawn(client_loop(
                c,
                clerk,
                started,
                stop.clone(),
                acks.clone(),
                history.clone(),
            ))
        })
        .collect();
    wait_for_progress(&acks, 100, "with groups 1 and 2").await;

    let config = admin
        .join(group_of(3, &groups))
        .await
        .expect("join group 3");
    eprintln!(
        "config {}: {:?} (group 3 joined)",
        config.num, config.shards
    );
    wait_for_progress(&acks, 100, "after group 3 joined").await;
    // Group 3 has everything it gained, so the next configuration is the only one in flight.
    groups[&3]
        .wait_until_all("holding every shard of its first configuration", |s| {
            s.config_num == config.num && s.pulling_shards.is_empty()
        })
        .await;

    // A request applied by group 1 whose answer the client never saw: its retry, after the shard has
    // moved, reaches the new owner with the same (client, seq) and must not apply again. That only
    // holds if the dedup records moved with the shard.
    let probe = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|key| config.shards[key_to_shard(key, config.shards.len()) as usize] == 1)
        .expect("group 1 owns some shard");
    const PROBE_CLIENT: u64 = 0x5eed;
    assert_eq!(
        raw_append(&groups[&1].addrs, PROBE_CLIENT, 1, &probe, "once;").await,
        pb::ErrorCode::Ok as i32
    );

    // Group 1 leaves, and at once loses its leader and a follower: without a majority it cannot hand
    // its shards over, so the migration is certainly in progress (not finished in a few milliseconds)
    // while we look, and while we SIGKILL the leader of a receiving group in the middle of its pulls.
    let leader_1 = groups[&1].wait_for_leader().await;
    let follower_1 = (leader_1 + 1) % 3;
    let left = admin.leave(vec![1]).await.expect("leave group 1");
    eprintln!("config {}: {:?} (group 1 left)", left.num, left.shards);
    groups.get_mut(&1).expect("group 1").kill(leader_1);
    groups.get_mut(&1).expect("group 1").kill(follower_1);
    let leader_3 = groups[&3].wait_for_leader().await;
    let pulling = groups[&3]
        .wait_until_all("pulling shards of the new configuration", |s| {
            s.config_num == left.num && !s.pulling_shards.is_empty()
        })
        .await;
    eprintln!(
        "group 1 down to one node; group 3 at config {} pulling {:?}: SIGKILL its leader node {}",
        left.num,
        pulling[leader_3].pulling_shards,
        leader_3 + 1
    );
    groups.get_mut(&3).expect("group 3").kill(leader_3);
    groups[&3].wait_for_leader().await;
    groups.get_mut(&3).expect("group 3").start_node(leader_3);
    groups.get_mut(&1).expect("group 1").start_node(leader_1);
    groups.get_mut(&1).expect("group 1").start_node(follower_1);
    wait_for_progress(&acks, 200, "after group 1 left and the leaders were killed").await;
    let new_owner = left.shards[key_to_shard(&probe, left.shards.len()) as usize];
    assert_eq!(
        raw_append(&groups[&new_owner].addrs, PROBE_CLIENT, 1, &probe, "once;").await,
        pb::ErrorCode::Ok as i32,
        "the new owner serves {probe} after the migration"
    );

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }

    // Every acknowledged append is present exactly once; nothing that was never attempted is there.
    let ops = std::mem::take(&mut *history.lock().expect("lock"));
    let mut attempted: HashMap<String, HashSet<String>> = HashMap::new();
    let mut acknowledged: HashMap<String, HashSet<String>> = HashMap::new();
    for op in ops.iter().filter(|o| o.op == OpKind::Append) {
        let token = op.value.clone().expect("append value");
        attempted
            .entry(op.key.clone())
            .or_default()
            .insert(token.clone());
        if op.status == OpStatus::Ok {
            acknowledged
                .entry(op.key.clone())
                .or_default()
                .insert(token);
        }
    }
    let mut reader = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
    let mut total = 0;
    for k in 0..KEYS {
        let key = format!("k{k}");
        let value = reader
            .get(&key)
            .await
            .expect("final get")
            .unwrap_or_default();
        let mut seen = HashSet::new();
        for token in value.split_inclusive(';') {
            assert!(seen.insert(token), "{key}: {token} applied twice");
            assert!(
                attempted.get(&key).is_some_and(|a| a.contains(token)),
                "{key}: {token} was never appended"
            );
        }
        for token in acknowledged.get(&key).into_iter().flatten() {
            assert!(
                seen.contains(token.as_str()),
                "{key}: acknowledged {token} is missing"
            );
        }
        total += seen.len();
    }
    let acknowledged: usize = acknowledged.values().map(HashSet::len).sum();
    eprintln!(
        "{acknowledged} acknowledged appends, {total} present, {} operations, in {:.1} s",
        ops.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(acknowledged >= 400, "too little load to mean anything");

    // Reads and appends together are linearizable: a read at a shard's new owner sees every write
    // its old owner acknowledged. (The check is not vacuous: one impossible read makes it fail.)
    let history = History::new(ops).expect("well-formed history");
    let mut tampered = history.ops().to_vec();
    let read = tampered
        .iter()
        .position(|o| o.op == OpKind::Get && o.status == OpStatus::Ok)
        .expect("some read succeeded");
    tampered[read].output = Some("never written;".into());
    let tampered = History::new(tampered).expect("well-formed history");
    assert!(check(&tampered, &KvModel, Duration::from_secs(60)).is_violation());
    let verdict = check(&history, &KvModel, Duration::from_secs(60));
    if !verdict.is_ok() {
        let path = std::env::temp_dir().join(format!(
            "shardkv_process-history-{}.jsonl",
            std::process::id()
        ));
        let mut out = Vec::new();
        history.to_jsonl(&mut out).expect("encode history");
        std::fs::write(&path, out).expect("write history");
        match verdict {
            CheckResult::Violation(v) => {
                panic!("not linearizable (history in {}):\n{v}", path.display())
            }
            unknown => panic!(
                "checker could not decide (history in {}): {unknown}",
                path.display()
            ),
        }
    }
    assert_eq!(
        reader.get(&probe).await.expect("get probe").as_deref(),
        Some("once;"),
        "a retry after the migration applied again"
    );

    // Group 1 gave everything away and, once the new owners confirmed, deleted its frozen copies.
    let statuses = groups[&1]
        .wait_until_all("no shards and no outgoing copies", |s| {
            s.config_num >= left.num
                && s.serving_shards.is_empty()
                && s.pulling_shards.is_empty()
                && s.outgoing_shards == 0
        })
        .await;
    assert!(statuses.iter().all(|s| s.keys == 0 && s.gid == 1));
    // Groups 2 and 3 serve every shard between them, each exactly where the configuration says.
    let mut served = BTreeSet::new();
    for gid in [2, 3] {
        let owned: Vec<u64> = (0..left.shards.len() as u64)
            .filter(|&s| left.shards[s as usize] == gid)
            .collect();
        let statuses = groups[&gid]
            .wait_until_all("serving its shards of the last configuration", |s| {
                s.config_num == left.num && s.serving_shards == owned && s.pulling_shards.is_empty()
            })
            .await;
        assert!(statuses.iter().all(|s| s.gid == gid));
        served.extend(owned);
    }
    assert_eq!(served.len(), left.shards.len());
    // Snapshots of shard group state were taken (and, on the restarted nodes, possibly loaded).
    let mut snapshots = Vec::new();
    for gid in [1, 2, 3] {
        for i in 0..3 {
            if let Some(s) = groups[&gid].status(i).await {
                snapshots.push((gid, i + 1, s.snapshot_index, s.raft_state_bytes));
            }
        }
    }
    assert!(
        snapshots.iter().any(|&(_, _, index, _)| index > 0),
        "no shard group took a snapshot (gid, node, snapshot index, raft state bytes): {snapshots:?}"
    );
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    drop(ctrlers);
}

/// A shard group's data directory records its gid: started as another group, `kvd shard` refuses it
/// (exit 2, one line naming the directory) instead of serving that group's shards under a new name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_one_group_is_refused_by_another() {
    let root = tempfile::tempdir().expect("temp dir");
    let data_dir = root.path().join("node-1");
    let address = format!("127.0.0.1:{}", free_port());
    let start = |gid: u64| {
        Command::new(env!("CARGO_BIN_EXE_kvd"))
            .env("DS824_INSECURE", "1")
            .env("KVD_PEER_LISTEN", "127.0.0.1:0")
            .args(["shard", "--gid", &gid.to_string(), "--id", "1"])
            .args(["--listen", &address, "--peers", &format!("1={address}")])
            // Never contacted: a group with no configuration only asks, and nothing here needs an answer.
            .args(["--ctrlers", "127.0.0.1:1"])
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvd")
    };
    let mut first = start(1);
    // Serving (a single-node group elects itself) means the directory is initialised as group 1's.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = node_status(&address, Duration::from_millis(500), &Default::default()).await
        {
            if s.role == "leader" {
                assert_eq!(s.gid, 1);
                break;
            }
        }
        assert!(Instant::now() < deadline, "group 1's node never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().expect("kill");
    first.wait().expect("wait");

    let mut second = start(2);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = second.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = second.kill();
            panic!("kvd shard --gid 2 served group 1's data directory");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = second.stderr.take() {
        use std::io::Read as _;
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("shard-1") && stderr.contains("shard-2"),
        "the error names both groups: {stderr}"
    );
}

/// `kvctl` with `--ctrlers` and no `--cluster`: the data commands find the key's group and exit as
/// against a KV cluster, and `status` shows the groups, their shards and the config each reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_routes_through_the_controllers() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let ctrler_list = ctrlers.addrs.join(",");
    let group = Replicas::start(root.path(), 7, &ctrler_list);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .env("DS824_INSECURE", "1")
            .args(["--ctrlers", &ctrler_list, "--timeout-ms", "15000"])
            .args(args)
            .env_remove("KVCTL_CLUSTER")
            .env_remove("KVCTL_CTRLERS")
            .output()
            .expect("run kvctl")
    };
    let out = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_string();

    // The controllers answer (they have a leader), so what follows times out only for its own reason.
    CtrlerClerk::new(&ctrlers.addrs, clerk_config())
        .expect("ctrler clerk")
        .query(None)
        .await
        .expect("controllers up");
    // No group yet: a write cannot be placed, and says so at the deadline.
    let unplaced = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .env("DS824_INSECURE", "1")
        .args(["--ctrlers", &ctrler_list, "--timeout-ms", "1500"])
        .args(["put", "k", "v"])
        .env_remove("KVCTL_CLUSTER")
        .output()
        .expect("run kvctl");
    assert_eq!(unplaced.status.code(), Some(2), "{unplaced:?}");
    assert!(err(&unplaced).contains("no group"), "{unplaced:?}");
    assert_eq!(err(&unplaced).lines().count(), 1, "{unplaced:?}");

    let spec = format!("7={}", group.addrs.join(","));
    let joined = run(&["ctrler", "join", &spec]);
    assert_eq!(joined.status.code(), Some(0), "{joined:?}");
    // A second join of the same group is refused, unless told to skip groups already joined.
    assert_eq!(run(&["ctrler", "join", &spec]).status.code(), Some(2));
    let again = run(&["ctrler", "join", "--skip-joined", &spec]);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(out(&again).starts_with("config 1\n"), "{again:?}");

    let missing = run(&["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(err(&missing), "not found");
    assert_eq!(run(&["put", "k", "v1"]).status.code(), Some(0));
    assert_eq!(run(&["append", "k", "+2"]).status.code(), Some(0));
    let got = run(&["get", "k"]);
    assert_eq!(
        (got.status.code(), out(&got)),
        (Some(0), "v1+2".to_string())
    );
    let mismatch = run(&["cas", "k", "wrong", "v3"]);
    assert_eq!(
        (mismatch.status.code(), out(&mismatch)),
        (Some(1), "v1+2".to_string())
    );
    assert_eq!(run(&["cas", "k", "v1+2", "v3"]).status.code(), Some(0));
    assert_eq!(run(&["delete", "k"]).status.code(), Some(0));
    assert_eq!(run(&["delete", "k"]).status.code(), Some(1));

    let status = run(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let json: serde_json::Value = serde_json::from_str(&out(&status)).expect("status json");
    assert_eq!(json["config"]["num"], 1);
    assert_eq!(json["groups"][0]["gid"], 7);
    let nodes = json["groups"][0]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().any(|n| n["role"] == "leader"));
    let table = run(&["status"]);
    assert_eq!(table.status.code(), Some(0));
    assert!(
        out(&table).contains("group 7: assigned shards 0,1,2,3,4,5,6,7,8,9"),
        "{}",
        out(&table)
    );

    // A backup of the group holds every shard it serves; the status of the file says so.
    assert_eq!(
        run(&["put", "kept", "in the backup"]).status.code(),
        Some(0)
    );
    let file = root.path().join("group-7.backup");
    let file_arg = file.to_str().expect("utf-8");
    let saved = run(&["snapshot", "save", "--gid", "7", file_arg]);
    assert_eq!(saved.status.code(), Some(0), "{saved:?}");
    assert!(
        out(&saved).starts_with("saved shard-7 of ds824/shard-7"),
        "{saved:?}"
    );
    let unknown = run(&["snapshot", "save", "--gid", "9", file_arg]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(
        err(&unknown).contains("group 9 is not in configuration 1"),
        "{unknown:?}"
    );
    let status = run(&["snapshot", "status", file_arg]);
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    assert!(out(&status).contains("service     shard-7"), "{status:?}");
    assert!(out(&status).contains("keys        1\n"), "{status:?}");

    // The benchmark loads the sharded store through the controllers too (issue #14, item 4).
    let bench = run(&[
        "bench",
        "--kind",
        "ycsb-a",
        "--clients",
        "4",
        "--ops",
        "200",
        "--keys",
        "50",
    ]);
    assert_eq!(bench.status.code(), Some(0), "{bench:?}");
    assert!(out(&bench).contains("200 ok, 0 errors"), "{bench:?}");
    let breakdown = run(&["bench", "--ops", "10", "--breakdown"]);
    assert_eq!(breakdown.status.code(), Some(2), "{breakdown:?}");
    drop(group);
}

/// Shards bigger than a transfer page move between real processes page by page, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_shards_move_in_pages() {
    const VALUES: usize = 60;
    const VALUE_BYTES: usize = 256 << 10;
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let ctrler_list = ctrlers.addrs.join(",");
    let groups: BTreeMap<u64, Replicas> = (1..=2)
        .map(|gid| {
            (
                gid,
                Replicas::start_with(root.path(), gid, &ctrler_list, 64 << 20),
            )
        })
        .collect();
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    admin
        .join([(1, groups[&1].addrs.clone())].into_iter().collect())
        .await
        .expect("join group 1");
    // 15 MiB over 10 shards: most shards take more than one page.
    let mut clerk = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
    let value = |i: usize| format!("{i:04}").repeat(VALUE_BYTES / 4);
    for i in 0..VALUES {
        clerk
            .put(&format!("big-{i}"), &value(i))
            .await
            .expect("put");
    }
    let config = admin
        .join([(2, groups[&2].addrs.clone())].into_iter().collect())
        .await
        .expect("join group 2");
    let moved: Vec<u64> = (0..config.shards.len() as u64)
        .filter(|&s| config.shards[s as usize] == 2)
        .collect();
    let shard_bytes = |shard: u64| {
        (0..VALUES)
            .filter(|i| key_to_shard(&format!("big-{i}"), config.shards.len()) == shard)
            .count()
            * VALUE_BYTES
    };
    let sizes: Vec<usize> = moved.iter().map(|&s| shard_bytes(s)).collect();
    eprintln!("shards {moved:?} of {sizes:?} bytes move to group 2");
    assert!(
        sizes
            .iter()
            .any(|&b| b > ds824::shardkv::PAGE_BYTES + VALUE_BYTES),
        "no moving shard is bigger than a page"
    );
    groups[&2]
        .wait_until_all("serving the shards it gained", |s| {
            s.config_num == config.num && s.serving_shards == moved
        })
        .await;
    for i in 0..VALUES {
        let got = clerk.get(&format!("big-{i}")).await.expect("get");
        assert!(got.as_deref() == Some(value(i).as_str()), "big-{i} damaged");
    }
    groups[&1]
        .wait_until_all("no outgoing copies", |s| s.outgoing_shards == 0)
        .await;
}

/// `--metrics-listen` on a shard node adds its group's configuration and shard counts to the Raft and
/// request metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_nodes_export_shard_ownership_metrics() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrler = format!("127.0.0.1:{}", free_port());
    let shard = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let spawn = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_kvd"))
            .env("DS824_INSECURE", "1")
            .env("KVD_PEER_LISTEN", "127.0.0.1:0")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kvd")
    };
    let data = |name: &str| root.path().join(name).to_string_lossy().into_owned();
    let mut children = vec![
        spawn(
            [
                "ctrler",
                "--id",
                "1",
                "--listen",
                &ctrler,
                "--peers",
                &format!("1={ctrler}"),
                "--data-dir",
                &data("ctrler"),
            ]
            .map(String::from)
            .to_vec(),
        ),
        spawn(
            [
                "shard",
                "--gid",
                "7",
                "--id",
                "1",
                "--listen",
                &shard,
                "--peers",
                &format!("1={shard}"),
                "--ctrlers",
                &ctrler,
                "--data-dir",
                &data("g7"),
                "--metrics-listen",
                &metrics,
            ]
            .map(String::from)
            .to_vec(),
        ),
    ];
    let mut admin =
        CtrlerClerk::new(std::slice::from_ref(&ctrler), clerk_config()).expect("ctrler clerk");
    admin
        .join([(7, vec![shard.clone()])].into())
        .await
        .expect("join");
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let page = std::net::TcpStream::connect(&metrics)
            .ok()
            .map(|_| scrape::scrape(&metrics))
            .unwrap_or_default();
        if page.contains("ds824_shard_config 1") || Instant::now() >= deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    for line in [
        "ds824_shard_config 1",
        "ds824_shards{state=\"serving\"} 10",
        "ds824_shards{state=\"pulling\"} 0",
        "ds824_shards{state=\"outgoing\"} 0",
        "ds824_raft_term ",
    ] {
        assert!(page.contains(line), "{line} not in\n{page}");
    }
    scrape::assert_dashboard_metrics_exported("shard node", &page);
}

/// 70 fresh clients each fail a compare-and-swap against a 1 MiB value, then the shard moves (#12). When
/// dedup records kept whole values, those 70 MiB of records made the final page one log entry over the
/// peers' message limit: followers refused it forever and the group churned leaders. Records now keep a
/// bounded output, so the shard moves at once, with no leader change, and the value reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_many_failed_cas_records_moves_without_a_leader_change() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let ctrler_list = ctrlers.addrs.join(",");
    let g1 = Replicas::start_with(root.path(), 1, &ctrler_list, 64 << 20);
    let g2 = Replicas::start_with(root.path(), 2, &ctrler_list, 64 << 20);
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    admin
        .join([(1, g1.addrs.clone())].into())
        .await
        .expect("join group 1");
    let value = "f".repeat(ds824::limits::MAX_VALUE_BYTES);
    let mut clerk = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
    clerk.put("fat", &value).await.expect("put");
    for _ in 0..70 {
        let mut other = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
        let outcome = other.cas("fat", Some("not it"), "x").await.expect("cas");
        assert!(
            matches!(&outcome, ds824::kv::CasOutcome::Mismatch { current: Some(c) } if c.len() == value.len()),
            "cas should fail and report the current value to its caller"
        );
    }
    admin
        .join([(2, g2.addrs.clone())].into())
        .await
        .expect("join group 2");
    let terms_before = [
        g1.wait_until_all("up", |_| true).await,
        g2.wait_until_all("up", |_| true).await,
    ]
    .map(|statuses| statuses.iter().map(|s| s.term).max().unwrap_or(0));
    let shard = key_to_shard("fat", 10);
    let started = std::time::Instant::now();
    let config = admin.move_shard(shard, 2).await.expect("move");
    g2.wait_until_all("serving the moved shard", |s| {
        s.config_num == config.num && s.serving_shards.contains(&shard)
    })
    .await;
    assert_eq!(
        clerk.get("fat").await.expect("get").as_deref(),
        Some(value.as_str())
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    for (group, before) in [&g1, &g2].into_iter().zip(terms_before) {
        let after = group
            .wait_until_all("up", |_| true)
            .await
            .iter()
            .map(|s| s.term)
            .max()
            .unwrap_or(0);
        assert!(
            after <= before + 1,
            "{}: term {before} -> {after}",
            group.name()
        );
    }
}

/// The controllers drop configurations once every group has reported passing them (here keeping only
/// the 2 newest), and a group started after that jumps over the dropped ones instead of waiting for
/// them: it joins, takes shards, and serves what the first group held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_every_group_passed_are_dropped_and_a_new_group_still_joins() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers =
        Replicas::start_temp_args(replicas::Role::Ctrler, 3, 4 << 10, &["--keep-configs", "2"]);
    let ctrler_list = ctrlers.addrs.join(",");
    let g7 = Replicas::start(root.path(), 7, &ctrler_list);
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    admin
        .join([(7, g7.addrs.clone())].into())
        .await
        .expect("join 7");
    let mut clerk = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("shard clerk");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    for key in &keys {
        clerk.put(key, &format!("v-{key}")).await.expect("put");
    }
    let mut latest = 0;
    for shard in 0..10 {
        latest = admin.move_shard(shard, 7).await.expect("move").num;
    }
    // Group 7 reports each configuration it reaches; then only the newest are kept.
    wait_until_dropped(&mut admin, 1, latest).await;
    assert!(admin.query(Some(latest)).await.is_ok());

    // A group that was never up while the history moved on.
    let g8 = Replicas::start(root.path(), 8, &ctrler_list);
    let joined = admin
        .join([(8, g8.addrs.clone())].into())
        .await
        .expect("join 8");
    let given: Vec<u64> = (0..10u64)
        .filter(|&s| joined.shards[s as usize] == 8)
        .collect();
    assert!(!given.is_empty(), "{joined:?}");
    admin.leave(vec![7]).await.expect("leave 7");
    for key in &keys {
        assert_eq!(
            clerk.get(key).await.expect("get"),
            Some(format!("v-{key}")),
            "{key} after group 8 took every shard"
        );
    }
    drop(g7);
}

/// Wait until the controllers have dropped configuration `num` (the groups reported passing it);
/// `latest` is only for the failure message.
async fn wait_until_dropped(admin: &mut CtrlerClerk, num: u64, latest: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        match admin.query(Some(num)).await {
            Err(e) if e.to_string().contains("dropped") => return,
            other => assert!(
                Instant::now() < deadline,
                "configuration {num} is still kept (latest {latest}): {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `Move shard 0 to group 7` as (`client_id`, `seq`) to the controllers (each server until
/// one leads), as a clerk that does (`restarts_sessions`) or does not know SESSION_EXPIRED would;
/// returns the answer that ended the attempts.
async fn raw_move(
    addrs: &[String],
    client_id: u64,
    seq: u64,
    restarts_sessions: bool,
) -> ds824::proto::ctrler::ConfigResponse {
    use ds824::proto::ctrler as cpb;
    let request = cpb::CommandRequest {
        client_id,
        seq,
        command: Some(cpb::Command {
            op: Some(cpb::command::Op::Move(cpb::Move { shard: 0, gid: 7 })),
        }),
        restarts_sessions,
        force: false,
    };
    let deadline = Instant::now() + WAIT;
    loop {
        for address in addrs {
            let Ok(mut client) =
                cpb::ctrler_client::CtrlerClient::connect(format!("http://{address}")).await
            else {
                continue;
            };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(2), client.command(request.clone())).await
            {
                let reply = reply.into_inner();
                let routing = [cpb::ErrorCode::WrongLeader, cpb::ErrorCode::Timeout];
                if !routing.iter().any(|&code| reply.error == code as i32) {
                    return reply;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader of {addrs:?} took the move"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A shard group keeps one controller clerk for its whole life, and the controllers drop a session
/// idle past `--session-ttl`. The group's reports after that must still be recorded: refused, the
/// controllers would keep every later configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_controller_session_expired_still_reports_progress() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start_temp_args(
        replicas::Role::Ctrler,
        3,
        4 << 10,
        &["--keep-configs", "1", "--session-ttl", "1"],
    );
    let g7 = Replicas::start(root.path(), 7, &ctrlers.addrs.join(","));
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    admin
        .join([(7, g7.addrs.clone())].into())
        .await
        .expect("join 7");
    let latest = admin.move_shard(0, 7).await.expect("move").num;
    // The group's session works: its report of configuration 1 or 2 lets configuration 0 go.
    wait_until_dropped(&mut admin, 0, latest).await;
    // A session of a clerk from before SESSION_EXPIRED, and one of a clerk that knows it.
    let (old_clerk, new_clerk) = (new_client_id(), new_client_id());
    for (client, restarts) in [(old_clerk, false), (new_clerk, true)] {
        let first = raw_move(&ctrlers.addrs, client, 1, restarts).await;
        assert_eq!(first.error, 0, "{first:?}");
    }
    // Idle past the TTL (log time, which follows the leaders' clocks): the next command drops the
    // group's session and those two.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    admin.move_shard(0, 7).await.expect("move after the TTL");
    let latest = admin.move_shard(0, 7).await.expect("move").num;
    // Configuration `latest - 2` goes only once group 7 has reported `latest - 1` or later.
    wait_until_dropped(&mut admin, latest - 2, latest).await;
    // The older clerk is refused in words it knows; the newer one is told where to start again.
    let refused = raw_move(&ctrlers.addrs, old_clerk, 2, false).await;
    assert_eq!(
        refused.error,
        ds824::proto::ctrler::ErrorCode::Refused as i32,
        "{refused:?}"
    );
    assert!(refused.refusal.contains("session expired"), "{refused:?}");
    let expired = raw_move(&ctrlers.addrs, new_clerk, 2, true).await;
    assert_eq!(
        expired.error,
        ds824::proto::ctrler::ErrorCode::SessionExpired as i32,
        "{expired:?}"
    );
    assert!(expired.min_client_id >= new_clerk, "{expired:?}");
    drop(g7);
}

/// Issue #14, item 3: a shard group started with `--follower-reads` answers Gets on its followers,
/// each holding every write that completed before it; a sharded clerk that spreads its reads reads
/// the same through the controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_group_followers_answer_reads_with_every_write_completed_before() {
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let ctrler_list = ctrlers.addrs.join(",");
    let group =
        Replicas::start_with_args(root.path(), 7, &ctrler_list, 4 << 10, &["--follower-reads"]);
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, clerk_config()).expect("ctrler clerk");
    admin
        .join([(7, group.addrs.clone())].into_iter().collect())
        .await
        .expect("join group 7");
    let mut writer = ShardClerk::new(&ctrlers.addrs, clerk_config()).expect("clerk");
    writer.put("k", "first").await.expect("put");
    let leader = group.wait_for_leader().await;
    for i in 0..60 {
        let value = format!("v{i}");
        writer.put("k", &value).await.expect("put");
        let follower = [(leader + 1) % 3, (leader + 2) % 3][i % 2];
        assert_eq!(
            get_at(&group.addrs[follower], "k").await,
            (pb::ErrorCode::Ok, Some(value.clone())),
            "follower {follower}, write {i}"
        );
    }
    let mut reader = ShardClerk::new(
        &ctrlers.addrs,
        ClerkConfig {
            read_anywhere: true,
            ..clerk_config()
        },
    )
    .expect("clerk");
    for _ in 0..20 {
        assert_eq!(reader.get("k").await.expect("get").as_deref(), Some("v59"));
    }
}
