//! The KV service as operators run it: real `kvd` processes on loopback ports, killed with SIGKILL and
//! restarted, driven by the library's `Clerk` and by the `kvctl` binary.

#[path = "support/appends.rs"]
mod appends;
#[path = "support/ports.rs"]
mod ports;
#[path = "support/replicas.rs"]
mod replicas;
#[path = "support/scrape.rs"]
mod scrape;
#[path = "support/signals.rs"]
mod signals;
#[path = "support/tls.rs"]
mod tls;

use ds824::check::{History, Operation};

use ds824::kv::validate::MAX_VALUE_BYTES;
use ds824::kv::KvOps;
use ds824::kv::{Clerk, ClerkConfig};
use ds824::proto::kv as pb;
use ds824::proto::kv::kv_client::KvClient;
use ports::free_port;
use replicas::{get_at, Replicas, Role, WAIT};
use signals::signal;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cluster of `kvd kv` (or `kvd ctrler`) processes; every process is killed when it is dropped.
type Cluster = Replicas;

/// What the KV tests add to the shared process helpers.
trait KvCluster {
    /// `n` `kvd kv` replicas.
    fn kv(n: usize, snapshot_threshold: u64) -> Cluster;
    /// A clerk of the cluster.
    fn clerk(&self) -> Clerk;
}

impl KvCluster for Cluster {
    fn kv(n: usize, snapshot_threshold: u64) -> Cluster {
        Replicas::start_temp(Role::Kv, n, snapshot_threshold)
    }

    fn clerk(&self) -> Clerk {
        clerk_for(&self.addrs, Duration::from_secs(8))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_leader_sigkill_and_stay_linearizable() {
    // One worker each, as `compare-etcd.sh` runs them: followers then flush on that worker
    // (`flush_place` in `src/raft/node.rs`), and the small snapshot threshold makes them install
    // snapshots and checkpoint often, in place.
    let mut cluster = Replicas::start_temp_args(Role::Kv, 3, 8 << 10, &["--worker-threads", "1"]);
    cluster.wait_for_leader().await;
    let load = appends::Load::start(|| cluster.clerk());
    for round in 0..2 {
        // Let the clients get well under way (or back under way after the last crash).
        load.wait_for_more(200, WAIT, "before the crash").await;
        let leader = cluster.wait_for_leader().await;
        eprintln!("round {round}: SIGKILL leader node {}", leader + 1);
        cluster.kill(leader);
        // The survivors elect a new leader while the old one is down.
        cluster.wait_for_leader().await;
        cluster.start_node(leader);
    }
    load.wait_for_more(200, WAIT, "after the crashes").await;
    load.finish_and_verify(&mut cluster.clerk()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_restores_from_snapshot_and_replays_only_the_tail() {
    const N: usize = 100_000;
    const WRITERS: usize = 32;
    let mut cluster = Cluster::kv(3, 256 << 10);
    cluster.wait_for_leader().await;
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut clerk = cluster.clerk();
            tokio::spawn(async move {
                for k in (w..N).step_by(WRITERS) {
                    clerk
                        .put(&format!("key-{k}"), &format!("value-{k}"))
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    eprintln!("{N} puts in {:.1} s", started.elapsed().as_secs_f64());
    let leader = cluster.wait_for_leader().await;
    let commit = cluster
        .wait_for_status(leader, "applied its commit index", |s| {
            s.applied_index >= s.commit_index
        })
        .await
        .commit_index;
    // Every node has applied everything (so each has compacted its log at least once).
    for i in 0..3 {
        let s = cluster
            .wait_for_status(i, "applied all writes", |s| s.applied_index >= commit)
            .await;
        assert!(
            s.snapshot_index > 0,
            "node {} never snapshotted: {s:?}",
            i + 1
        );
    }
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.start_node(i);
    }
    for i in 0..3 {
        let s = cluster
            .wait_for_status(i, "caught up after the restart", |s| {
                s.applied_index >= commit
            })
            .await;
        eprintln!(
            "node {}: restored snapshot at {}, applied {} entries since start, log {}..={}",
            i + 1,
            s.restored_snapshot_index,
            s.entries_applied_since_start,
            s.first_index,
            s.last_index
        );
        assert!(
            s.restored_snapshot_index > 0,
            "node {} did not restore a snapshot",
            i + 1
        );
        assert_eq!(s.keys, N as u64, "node {} lost keys", i + 1);
        assert!(
            s.entries_applied_since_start < commit / 2,
            "node {} replayed {} of {commit} entries: more than the log tail",
            i + 1,
            s.entries_applied_since_start
        );
    }
    cluster.wait_for_leader().await;
    let readers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut clerk = cluster.clerk();
            tokio::spawn(async move {
                for k in (w..N).step_by(WRITERS) {
                    let value = clerk.get(&format!("key-{k}")).await.expect("get");
                    assert_eq!(value, Some(format!("value-{k}")), "key-{k}");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.expect("reader");
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

fn kvctl(cluster: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .env("DS824_INSECURE", "1")
        .args(["--cluster", cluster, "--timeout-ms", "3000"])
        .args(args)
        .env_remove("KVCTL_CLUSTER")
        .output()
        .expect("run kvctl")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_commands_and_exit_codes() {
    let mut cluster = Cluster::kv(3, 8 << 20);
    let leader = cluster.wait_for_leader().await;
    // A follower redirects: WRONG_LEADER naming the leader and its address.
    let follower = (leader + 1) % 3;
    let mut to_follower = KvClient::connect(format!("http://{}", cluster.addrs[follower]))
        .await
        .expect("connect");
    let redirect = to_follower
        .get(pb::GetRequest { key: "k".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(redirect.error(), pb::ErrorCode::WrongLeader);
    assert_eq!(redirect.leader_hint, leader as u64 + 1);
    assert_eq!(redirect.leader_address, cluster.addrs[leader]);
    let addrs = cluster.addrs.join(",");
    let run = |args: &[&str]| kvctl(&addrs, args);

    let missing = run(&["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(stderr(&missing), "not found");

    assert_eq!(run(&["put", "k", "v1"]).status.code(), Some(0));
    assert_eq!(run(&["append", "k", "+2"]).status.code(), Some(0));
    let got = run(&["get", "k"]);
    assert_eq!(
        (got.status.code(), stdout(&got)),
        (Some(0), "v1+2".to_string())
    );

    let mismatch = run(&["cas", "k", "wrong", "v3"]);
    assert_eq!(
        (mismatch.status.code(), stdout(&mismatch)),
        (Some(1), "v1+2".to_string())
    );
    assert_eq!(run(&["cas", "k", "v1+2", "v3"]).status.code(), Some(0));
    assert_eq!(
        run(&["cas", "--expect-absent", "fresh", "x"]).status.code(),
        Some(0)
    );
    assert_eq!(
        run(&["cas", "--expect-absent", "fresh", "y"]).status.code(),
        Some(1)
    );
    assert_eq!(run(&["delete", "k"]).status.code(), Some(0));
    assert_eq!(run(&["delete", "k"]).status.code(), Some(1));

    let empty = run(&["get", ""]);
    assert_eq!(empty.status.code(), Some(2), "{empty:?}");
    assert_eq!(stderr(&empty).lines().count(), 1, "{empty:?}");

    let status = run(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(0));
    let nodes: serde_json::Value = serde_json::from_str(&stdout(&status)).expect("json");
    assert_eq!(nodes.as_array().map(Vec::len), Some(3));
    // A header and a line per node, then the members as the leader sees them: a header line,
    // the column titles and a line per member.
    let table = stdout(&run(&["status"]));
    let (nodes, members) = table.split_once("\n\n").expect("two sections");
    assert_eq!(nodes.lines().count(), 4, "{table}");
    assert!(members.starts_with("members: leader "), "{table}");
    assert_eq!(members.lines().count(), 5, "{table}");
    assert_eq!(
        members
            .lines()
            .skip(2)
            .filter(|l| l.contains(" voter ") || l.contains(" leader "))
            .count(),
        3,
        "{table}"
    );

    // The service itself refuses bad input with INVALID_ARGUMENT, whoever the caller is.
    let mut raw = KvClient::connect(format!("http://{}", cluster.addrs[0]))
        .await
        .expect("connect");
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
        r.err().map(|s| s.code())
    }
    let invalid = Some(tonic::Code::InvalidArgument);
    assert_eq!(
        code(raw.get(pb::GetRequest { key: String::new() }).await),
        invalid
    );
    let put = |key: &str, value: String, client_id: u64| pb::MutateRequest {
        client_id,
        seq: 1,
        command: Some(pb::Command {
            op: Some(pb::command::Op::Put(pb::Put {
                key: key.into(),
                value,
            })),
        }),
    };
    assert_eq!(code(raw.mutate(put("", "v".into(), 7)).await), invalid);
    assert_eq!(code(raw.mutate(put("k", "v".into(), 0)).await), invalid);
    assert_eq!(
        code(
            raw.mutate(put("k", "v".repeat(MAX_VALUE_BYTES + 1), 7))
                .await
        ),
        invalid
    );
    let no_op = pb::MutateRequest {
        client_id: 7,
        seq: 1,
        command: Some(pb::Command { op: None }),
    };
    assert_eq!(code(raw.mutate(no_op).await), invalid);

    let unreachable = kvctl("127.0.0.1:1", &["get", "k"]);
    assert!(
        unreachable.status.code().unwrap_or(0) >= 2,
        "{unreachable:?}"
    );
    assert_eq!(stderr(&unreachable).lines().count(), 1, "{unreachable:?}");
    let garbage = kvctl("not an address", &["get", "k"]);
    assert!(garbage.status.code().unwrap_or(0) >= 2, "{garbage:?}");
    assert_eq!(stderr(&garbage).lines().count(), 1, "{garbage:?}");

    // kvctl check: a linearizable history and a violating one.
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.jsonl");
    let bad = dir.path().join("bad.jsonl");
    let write = |path: &PathBuf, ops: Vec<Operation>| {
        let mut out = Vec::new();
        History::new(ops)
            .expect("history")
            .to_jsonl(&mut out)
            .expect("encode");
        std::fs::write(path, out).expect("write");
    };
    write(
        &good,
        vec![
            Operation::put(1, "x", "a").ok_at(0, 10),
            Operation::get(2, "x", Some("a")).ok_at(20, 30),
        ],
    );
    write(
        &bad,
        vec![
            Operation::put(1, "x", "a").ok_at(0, 10),
            Operation::get(2, "x", Some("b")).ok_at(20, 30),
        ],
    );
    let ok = run(&["check", good.to_str().expect("path")]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let violation = run(&["check", bad.to_str().expect("path")]);
    assert_eq!(violation.status.code(), Some(1), "{violation:?}");
    assert!(stdout(&violation).contains("offending sub-history"));
    let undecided = run(&["check", "--budget-secs", "0", good.to_str().expect("path")]);
    assert_eq!(undecided.status.code(), Some(3), "{undecided:?}");
    let unreadable = run(&["check", "/nonexistent/history.jsonl"]);
    assert_eq!(unreadable.status.code(), Some(2), "{unreadable:?}");

    // SIGTERM is a clean shutdown.
    assert!(cluster.terminate(0).success());
}

#[test]
fn kvd_refuses_bad_flags_and_unusable_data_dirs() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .env("DS824_INSECURE", "1")
        .env("KVD_PEER_LISTEN", "127.0.0.1:0")
        .args([
            "kv",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "1=nope",
        ])
        .args(["--data-dir", "/tmp/unused"])
        .output()
        .expect("run kvd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .env("DS824_INSECURE", "1")
        .env("KVD_PEER_LISTEN", "127.0.0.1:0")
        .args(["kv", "--id", "1", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--peers", &format!("1=127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&file)
        .output()
        .expect("run kvd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("a-file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvd_refuses_another_nodes_data_dir() {
    let mut cluster = Cluster::kv(1, 8 << 20);
    cluster.wait_for_status(0, "answering", |_| true).await;
    cluster.kill(0);
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .env("DS824_INSECURE", "1")
        .env("KVD_PEER_LISTEN", "127.0.0.1:0")
        .args(["kv", "--id", "2", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--peers", &format!("2=127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(cluster.data_dir(0))
        .output()
        .expect("run kvd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("belongs to node 1"), "{err}");
}

fn kvctl_ctrler(ctrlers: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .env("DS824_INSECURE", "1")
        .args(["--ctrlers", ctrlers, "--timeout-ms", "10000", "ctrler"])
        .args(args)
        .output()
        .expect("run kvctl")
}

/// Three `kvd ctrler` processes driven through `kvctl ctrler`: joins rebalance, bad commands are refused
/// with a reason, the configuration survives SIGKILL of any node, and leaves move shards back.
#[test]
fn ctrler_daemons_manage_configurations_through_kvctl() {
    let mut cluster = Replicas::start_temp(Role::Ctrler, 3, 8 << 20);
    let ctrlers = cluster.addrs.join(",");
    let joined = kvctl_ctrler(&ctrlers, &["join", "101=a:1,b:1,c:1", "102=d:1,e:1,f:1"]);
    assert!(joined.status.success(), "join failed: {}", stderr(&joined));
    let text = stdout(&joined);
    assert!(text.contains("config 1"), "{text}");
    assert!(
        text.contains("group 101: 5 shards, servers a:1,b:1,c:1"),
        "{text}"
    );
    assert!(text.contains("group 102: 5 shards"), "{text}");

    // A command the state machine refuses comes back with its reason and exit status 2.
    let again = kvctl_ctrler(&ctrlers, &["join", "101=x:1"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already joined"),
        "{}",
        stderr(&again)
    );
    let bad = kvctl_ctrler(&ctrlers, &["join", "nonsense"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("GID=HOST:PORT"), "{}", stderr(&bad));

    // Any single node may die; the survivors answer with the same configuration.
    for victim in 0..3 {
        cluster.kill(victim);
        let query = kvctl_ctrler(&ctrlers, &["query", "--json"]);
        assert!(query.status.success(), "query failed: {}", stderr(&query));
        let config: serde_json::Value = serde_json::from_str(&stdout(&query)).expect("json");
        assert_eq!(config["num"], 1, "{config}");
        cluster.start_node(victim);
    }

    let moved = kvctl_ctrler(&ctrlers, &["move", "0", "102"]);
    assert!(moved.status.success(), "{}", stderr(&moved));
    // Group 102 never ran: its shards would wait for it for ever, so only a forced leave removes it.
    let refused = kvctl_ctrler(&ctrlers, &["leave", "102"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("has not reported reaching configuration 1"),
        "{}",
        stderr(&refused)
    );
    let left = kvctl_ctrler(&ctrlers, &["leave", "102", "--force"]);
    assert!(left.status.success(), "{}", stderr(&left));
    let query = kvctl_ctrler(&ctrlers, &["query", "--json"]);
    let config: serde_json::Value = serde_json::from_str(&stdout(&query)).expect("json");
    assert_eq!(config["num"], 3, "{config}");
    let shards = config["shards"].as_array().expect("shards");
    assert!(shards.iter().all(|g| g == 101), "{config}");
    // Historical configurations stay queryable.
    let first = kvctl_ctrler(&ctrlers, &["query", "1", "--json"]);
    let first: serde_json::Value = serde_json::from_str(&stdout(&first)).expect("json");
    assert_eq!(first["num"], 1, "{first}");
}

/// `--metrics-listen` serves Prometheus text with the node's Raft state and its request counters.
#[test]
fn kvd_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .env("DS824_INSECURE", "1")
        .env("KVD_PEER_LISTEN", "127.0.0.1:0")
        .args([
            "kv",
            "--id",
            "1",
            "--listen",
            &addr,
            "--peers",
            &format!("1={addr}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .args(["--metrics-listen", &metrics])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kvd");
    let put = kvctl(&addr, &["put", "k", "v"]);
    assert!(put.status.success(), "{}", stderr(&put));
    let body = scrape::scrape(&metrics);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(
        body.contains("ds824_raft_role{role=\"leader\"} 1"),
        "{body}"
    );
    assert!(body.contains("ds824_raft_term "), "{body}");
    assert!(
        body.contains("ds824_requests_total{kind=\"write\",outcome=\"ok\"} 1"),
        "{body}"
    );
    assert!(body.contains("ds824_request_seconds_count"), "{body}");
    scrape::assert_dashboard_metrics_exported("raft node", &body);
}

/// Values cannot grow past the limit through appends (they would stall replication and, in the sharded
/// store, migrations): the append that would cross it is refused at once with a clear error and changes
/// nothing, and the value stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_the_value_limit_is_refused_and_the_value_stays_readable() {
    let cluster = Replicas::start_temp(Role::Kv, 3, 8 << 20);
    let mut clerk = Clerk::new(
        &cluster.addrs,
        ClerkConfig {
            call_timeout: Duration::from_secs(20),
            ..ClerkConfig::default()
        },
    )
    .expect("clerk");
    let chunk = "a".repeat(MAX_VALUE_BYTES / 2);
    clerk.append("big", &chunk).await.expect("first half");
    clerk.append("big", &chunk).await.expect("second half");
    let started = Instant::now();
    let refused = clerk
        .append("big", "x")
        .await
        .expect_err("an append past the limit");
    assert!(
        matches!(refused, ds824::rsm::client::ClerkError::Rejected(_)),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("nothing was appended"),
        "{refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let value = clerk.get("big").await.expect("get").expect("present");
    assert_eq!(value.len(), MAX_VALUE_BYTES);
    assert!(!value.contains('x'));
}

/// Sessions are bounded (#12): with `--max-sessions 50`, 300 one-shot clerks leave at most 50 sessions
/// on every replica; the first clerk, whose session was dropped, goes on transparently (its next command
/// was refused before it applied, so it is simply sent again under a new session); and a retry of a
/// command whose session was dropped is refused with SESSION_EXPIRED, not applied a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_capped_and_a_dropped_one_is_never_applied_twice() {
    let cluster = Replicas::start_temp_args(Role::Kv, 3, 8 << 20, &["--max-sessions", "50"]);
    let mut first = cluster.clerk();
    let first_id = first.client_id();
    first.append("first", "a").await.expect("first append");
    let addrs = Arc::new(cluster.addrs.clone());
    let tasks: Vec<_> = (0..6)
        .map(|t| {
            let addrs = addrs.clone();
            tokio::spawn(async move {
                for n in 0..50 {
                    let mut clerk = Clerk::new(&addrs, ClerkConfig::default()).expect("clerk");
                    clerk
                        .put(&format!("one-shot-{t}-{n}"), "v")
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("one-shot clerks");
    }
    let statuses = cluster
        .wait_until_all("applied every put", |s| s.keys == 301)
        .await;
    for status in &statuses {
        assert!(
            status.sessions <= 50,
            "node {}: {} sessions",
            status.id,
            status.sessions
        );
    }
    // The first clerk's session is gone; its next command still applies, once.
    first
        .append("first", "b")
        .await
        .expect("append after expiry");
    assert_ne!(first.client_id(), first_id, "a new session");
    assert_eq!(
        first.get("first").await.expect("get").as_deref(),
        Some("ab")
    );
    // A late retry of its first append (as a clerk that never heard back would send it) is refused.
    let retry = pb::MutateRequest {
        client_id: first_id,
        seq: 1,
        command: Some(pb::Command {
            op: Some(pb::command::Op::Append(pb::Append {
                key: "first".into(),
                value: "a".into(),
            })),
        }),
    };
    let deadline = Instant::now() + WAIT;
    let answer = 'found: loop {
        for address in cluster.addrs.iter() {
            let Ok(mut client) = KvClient::connect(format!("http://{address}")).await else {
                continue;
            };
            if let Ok(reply) = client.mutate(retry.clone()).await {
                let reply = reply.into_inner();
                if reply.error != pb::ErrorCode::WrongLeader as i32 {
                    break 'found reply;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader answered the retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        answer.error,
        pb::ErrorCode::SessionExpired as i32,
        "{answer:?}"
    );
    assert!(answer.min_client_id >= first_id);
    assert_eq!(
        first.get("first").await.expect("get").as_deref(),
        Some("ab")
    );
}

/// MiB of state [`a_large_snapshot_stops_neither_heartbeats_nor_writes`] snapshots: 200, or
/// `DS824_LARGE_SNAPSHOT_MIB` (the 1 GiB check is `DS824_LARGE_SNAPSHOT_MIB=1024`; CI keeps
/// the default, which fits its time budget).
fn large_snapshot_mib() -> usize {
    std::env::var("DS824_LARGE_SNAPSHOT_MIB")
        .ok()
        .and_then(|mib| mib.parse().ok())
        .unwrap_or(200)
        .max(50)
}

/// A large state is snapshotted without stopping the world (#12): with ~200 MiB of values (or
/// [`large_snapshot_mib`]), the snapshot every replica takes while a client keeps writing is encoded
/// off the service lock and written off the Raft loop, so heartbeats go on (no term change) and no
/// small put waits a second. Before, the leader encoded under the lock and flushed the snapshot inside
/// its Raft loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_stops_neither_heartbeats_nor_writes() {
    const VALUE: usize = 1 << 20;
    let mib = large_snapshot_mib();
    // 90% of the threshold first (no snapshot yet), then a fifth more to cross it.
    let fill_count = mib * 9 / 10;
    let push = mib / 5;
    let threshold = (mib as u64) << 20;
    let cluster = Cluster::kv(3, threshold);
    let value = "s".repeat(VALUE);
    let fill = |from: usize, to: usize| {
        let addrs = cluster.addrs.clone();
        let value = value.clone();
        tokio::spawn(async move {
            let mut clerk = clerk_for(&addrs, Duration::from_secs(30));
            for n in from..to {
                clerk.put(&format!("big-{n}"), &value).await.expect("fill");
            }
        })
    };
    let fillers: Vec<_> = (0..3)
        .map(|t| fill(t * fill_count / 3, (t + 1) * fill_count / 3))
        .collect();
    for filler in fillers {
        filler.await.expect("filler");
    }
    let before = cluster
        .wait_until_all("filled", |s| s.keys == fill_count as u64)
        .await;
    assert!(
        before.iter().all(|s| s.snapshot_index == 0),
        "snapshotted too early"
    );
    let term = before.iter().map(|s| s.term).max().unwrap_or(0);
    // A client writing small values all through the snapshot, timing every put.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let mut clerk = cluster.clerk();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let wall = std::time::SystemTime::now();
                clerk
                    .put("probe", &latencies.len().to_string())
                    .await
                    .expect("probe put");
                latencies.push((started.elapsed(), wall));
            }
            latencies.sort_unstable();
            latencies
        })
    };
    // Push the log past the threshold: every replica snapshots ~200 MiB.
    fill(fill_count, fill_count + push).await.expect("filler");
    let after = cluster
        .wait_until_all("snapshotted", |s| s.snapshot_index > 0)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let latencies = probe.await.expect("probe");
    assert!(!latencies.is_empty(), "no probe put completed");
    let percentile = |p: usize| latencies[(latencies.len() - 1) * p / 100].0;
    let (slowest, slowest_at) = latencies
        .last()
        .copied()
        .unwrap_or((Duration::ZERO, std::time::UNIX_EPOCH));
    // Where a slow put came from: the nodes' own account of their slow fsyncs.
    for i in 0..3 {
        let log = std::fs::read_to_string(cluster.log(i)).unwrap_or_default();
        for line in log
            .lines()
            .filter(|l| l.contains("slow persist") || l.contains("snapshot"))
        {
            println!("node {}: {line}", i + 1);
        }
    }
    let since_epoch = slowest_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "slowest put started at unix {:.3} s",
        since_epoch.as_secs_f64()
    );
    let snapshot_bytes = after.iter().map(|s| s.snapshot_bytes).max().unwrap_or(0);
    println!(
        "snapshot of {snapshot_bytes} bytes; {} probe puts: p50 {:?}, p99 {:?}, slowest {slowest:?}",
        latencies.len(),
        percentile(50),
        percentile(99)
    );
    assert!(
        snapshot_bytes > threshold * 19 / 20,
        "snapshot of {snapshot_bytes} bytes"
    );
    let terms: Vec<u64> = after.iter().map(|s| s.term).collect();
    assert!(terms.iter().all(|&t| t == term), "term {term} -> {terms:?}");
    assert!(slowest < Duration::from_secs(1), "a put took {slowest:?}");
}

/// A clerk of `addrs` whose calls give up after `timeout`.
fn clerk_for(addrs: &[String], timeout: Duration) -> Clerk {
    Clerk::new(
        addrs,
        ClerkConfig {
            call_timeout: timeout,
            ..ClerkConfig::default()
        },
    )
    .expect("clerk")
}

/// Which kind of failure a clerk error is, for the load tests' tallies.
fn error_kind(error: &ds824::kv::ClerkError) -> &'static str {
    ["overloaded", "wrong leader", "timed out"]
        .into_iter()
        .find(|kind| error.to_string().contains(kind))
        .unwrap_or("other")
}

/// Resident memory of a process, in bytes (from /proc).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Admission, not step-down (#12): followers that are alive but slow (each stopped 200 ms of every
/// 300 ms, so they answer heartbeats but take in little) keep their leader, and 128 clients each
/// writing 1 MiB values as fast as they can want twice the 64 MiB of uncommitted proposals the leader
/// admits. The leader stays leader, commits what its followers take, answers the rest "leader
/// overloaded" (the clerks back off), and its memory stays bounded. In the paused-followers test
/// above the leader steps down instead, so that test cannot tell admission control from CheckQuorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_slow_followers_admits_only_what_they_can_take() {
    const WRITERS: usize = 128;
    let cluster = Cluster::kv(3, 64 << 20);
    let leader = cluster.wait_for_leader().await;
    let term = cluster.status(leader).await.expect("leader status").term;
    let pid = |i: usize| cluster.children[i].as_ref().expect("running").id();
    let followers: Vec<u32> = (0..3).filter(|&i| i != leader).map(pid).collect();
    let baseline = rss_bytes(pid(leader));
    let stop = Arc::new(AtomicBool::new(false));
    let slowdown = {
        let (stop, followers) = (stop.clone(), followers.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                followers.iter().for_each(|&f| signal(f, "-STOP"));
                std::thread::sleep(Duration::from_millis(200));
                followers.iter().for_each(|&f| signal(f, "-CONT"));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let value = Arc::new("w".repeat(MAX_VALUE_BYTES));
    let only_leader = vec![cluster.addrs[leader].clone()];
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let (value, addrs, stop) = (value.clone(), only_leader.clone(), stop.clone());
            // A few keys: the state stays small, so what the leader holds is what is in flight.
            tokio::spawn(async move {
                let mut clerk = clerk_for(&addrs, Duration::from_secs(2));
                let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = match clerk.put(&format!("w{}", n % 8), &value).await {
                        Ok(()) => "ok",
                        Err(e) => error_kind(&e),
                    };
                    *outcomes.entry(outcome).or_default() += 1;
                }
                outcomes
            })
        })
        .collect();
    // Peak resident memory in the first and the second half of the run.
    let (mut early, mut late) = (0, 0);
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(12) {
        let rss = rss_bytes(pid(leader));
        if watched.elapsed() < Duration::from_secs(6) {
            early = rss.max(early);
        } else {
            late = rss.max(late);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = early.max(late);
    stop.store(true, Ordering::Relaxed);
    slowdown.join().expect("slowdown thread");
    followers.iter().for_each(|&f| signal(f, "-CONT"));
    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for writer in writers {
        for (outcome, count) in writer.await.expect("writer") {
            *outcomes.entry(outcome).or_default() += count;
        }
    }
    let after = cluster.status(leader).await.expect("leader status");
    println!(
        "leader rss {} MiB before, peak {} MiB in the first 6 s, {} MiB in the next 6 s; \
         outcomes {outcomes:?}; term {term} -> {}",
        baseline >> 20,
        early >> 20,
        late >> 20,
        after.term
    );
    assert!(
        after.role == "leader" && after.term == term,
        "node {} lost its leadership (term {term} -> {}, now {})",
        leader + 1,
        after.term,
        after.role
    );
    assert!(
        outcomes.get("ok").copied().unwrap_or(0) > 0,
        "nothing committed: {outcomes:?}"
    );
    assert!(
        outcomes.get("overloaded").copied().unwrap_or(0) > 0,
        "no client was told the leader is overloaded: {outcomes:?}"
    );
    // Bounded by design: 128 MiB of requests being decoded (one per client), 64 MiB admitted, up to
    // 32 MiB of messages in flight to each follower, the encoded copies of each, and the allocator's
    // slack. And flat: the second half of the run may add no more than the admitted bytes and the
    // two followers' queues (64 + 2 × 32 MiB), which a loaded machine may fill only late (a CI run
    // with other tests beside it saw 350 MiB, then 447 MiB). A leak would not stay under that: the
    // ~600 requests refused in 12 s carry 1 MiB each.
    assert!(
        peak < baseline + (640 << 20),
        "leader grew to {} MiB",
        peak >> 20
    );
    assert!(
        late < early + (128 << 20),
        "leader kept growing: {} MiB, then {} MiB",
        early >> 20,
        late >> 20
    );
    // Up to 64 MiB of admitted proposals still wait for followers that persist slowly (CI disks have
    // shown 200 ms per fsync), and this put queues behind them: allow for the drain, not for speed.
    let mut clerk = clerk_for(&cluster.addrs, Duration::from_secs(60));
    clerk.put("after", "slow").await.expect("put after");
    assert_eq!(
        clerk.get("after").await.expect("get").as_deref(),
        Some("slow")
    );
}

/// Back-pressure, not growth (#12): 64 clients writing 1 MiB values to a leader whose followers are
/// paused. Nothing can commit; the leader admits at most 64 MiB of uncommitted proposals (the rest are
/// answered RESOURCE_EXHAUSTED) and, hearing from no majority, steps down (CheckQuorum) and refuses the
/// rest as WRONG_LEADER. Every client gets an error within its deadline, the leader's memory stays
/// bounded, and once the followers resume the cluster serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_majority_pushes_back_instead_of_growing() {
    let cluster = Cluster::kv(3, 8 << 20);
    let leader = cluster.wait_for_leader().await;
    let pid = |i: usize| cluster.children[i].as_ref().expect("running").id();
    let followers: Vec<u32> = (0..3).filter(|&i| i != leader).map(pid).collect();
    for &follower in &followers {
        signal(follower, "-STOP");
    }
    let baseline = rss_bytes(pid(leader));
    let value = Arc::new("m".repeat(MAX_VALUE_BYTES));
    let only_leader = vec![cluster.addrs[leader].clone()];
    let writers: Vec<_> = (0..64)
        .map(|n| {
            let (value, addrs) = (value.clone(), only_leader.clone());
            tokio::spawn(async move {
                let mut clerk = clerk_for(&addrs, Duration::from_secs(8));
                clerk.put(&format!("m{n}"), &value).await
            })
        })
        .collect();
    let mut peak = 0;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(9) {
        peak = peak.max(rss_bytes(pid(leader)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for writer in writers {
        match writer.await.expect("writer") {
            Ok(()) => panic!("a put committed without a majority"),
            Err(e) => *refusals.entry(error_kind(&e).to_string()).or_default() += 1,
        }
    }
    println!(
        "leader rss {} MiB before, peak {} MiB; last errors {refusals:?}",
        baseline >> 20,
        peak >> 20
    );
    // 64 MiB of admitted proposals, their copies on the way to the (paused) followers, and slack.
    assert!(
        peak < baseline + (320 << 20),
        "leader grew to {} MiB",
        peak >> 20
    );
    for &follower in &followers {
        signal(follower, "-CONT");
    }
    let mut clerk = cluster.clerk();
    clerk
        .put("after", "resume")
        .await
        .expect("put after resume");
    assert_eq!(
        clerk.get("after").await.expect("get").as_deref(),
        Some("resume")
    );
}

/// Issue #14, item 4: `kvctl bench` runs the YCSB core workloads against a real cluster. Workload D
/// inserts keys past the filled ones (so the store must hold one after the run) and F reads and writes
/// back; every operation succeeds and the latency percentiles are ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ycsb_workloads_run_against_a_cluster() {
    use ds824::kvctl::bench::{self, BenchConfig, BenchKind};
    use ds824::kvctl::ycsb::Workload;
    let cluster = Replicas::start_temp(Role::Kv, 3, 8 << 20);
    let clerk_config = ClerkConfig {
        call_timeout: Duration::from_secs(20),
        ..ClerkConfig::default()
    };
    for workload in [Workload::A, Workload::D, Workload::F] {
        let config = BenchConfig {
            target: bench::Target::Kv(cluster.addrs.clone()),
            clerk: clerk_config.clone(),
            load: bench::Load {
                clients: 4,
                ops: 400,
                duration: None,
                kind: BenchKind::Ycsb(workload),
                keys: 50,
                value_size: 16,
            },
        };
        let report = bench::run(&config, |_| {}).await.expect("bench");
        assert_eq!(
            (report.ok, report.errors),
            (400, 0),
            "{workload:?}: {report}"
        );
        assert!(report.p50 <= report.p90 && report.p90 <= report.p99);
        assert!(report.p99 <= report.p999 && report.p999 <= report.max);
        let json = report.to_json();
        assert_eq!(json["ok"], 400, "{json}");
    }
    // By time instead of count: about a second of workload C, however many operations that is.
    let timed = BenchConfig {
        target: bench::Target::Kv(cluster.addrs.clone()),
        clerk: clerk_config.clone(),
        load: bench::Load {
            clients: 4,
            ops: usize::MAX,
            duration: Some(Duration::from_secs(1)),
            kind: BenchKind::Ycsb(Workload::C),
            keys: 50,
            value_size: 16,
        },
    };
    let report = bench::run(&timed, |_| {}).await.expect("timed bench");
    assert!(report.ok > 0 && report.errors == 0, "{report}");
    assert!(
        report.elapsed >= Duration::from_secs(1) && report.elapsed < Duration::from_secs(10),
        "{report}"
    );
    // D's inserts (about 5 % of 400) created keys past the 50 filled.
    let mut clerk = Clerk::new(&cluster.addrs, clerk_config).expect("clerk");
    let value = clerk.get("bench-50").await.expect("get");
    assert_eq!(
        value.map(|v| v.len()),
        Some(16),
        "the first inserted key holds a value"
    );
}

/// Issue #15, item 2: SIGTERM on a leader hands leadership to its most up-to-date follower before the
/// process exits, so another node leads within an election round. After a SIGKILL the followers must
/// first hear nothing for an election timeout (1 s at the daemons' settings) before anyone may win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_by_sigterm_hands_over_leadership_before_it_exits() {
    let mut cluster = Replicas::start_temp(Role::Kv, 3, 8 << 20);
    let config = ClerkConfig {
        call_timeout: Duration::from_secs(20),
        ..ClerkConfig::default()
    };
    let mut clerk = Clerk::new(&cluster.addrs, config).expect("clerk");
    clerk.put("k", "before").await.expect("put");
    let leader = cluster.wait_for_leader().await;
    let (addrs, security) = (cluster.addrs.clone(), cluster.client_security());
    let sent = Instant::now();
    // Watch the other two for a leader while the old one shuts down.
    let watcher = tokio::spawn(async move {
        loop {
            for (i, addr) in addrs.iter().enumerate() {
                if i == leader {
                    continue;
                }
                let status =
                    ds824::kv::clerk::node_status(addr, Duration::from_millis(200), &security)
                        .await;
                if status.is_ok_and(|s| s.role == "leader") {
                    return sent.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let exit = tokio::task::block_in_place(|| cluster.terminate(leader));
    assert!(exit.success(), "{exit:?}");
    let took = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("no new leader within 10 s")
        .expect("watcher");
    println!("a new leader {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(1),
        "a new leader only {took:?} after SIGTERM: no hand-off, an election timeout passed"
    );
    assert!(
        std::fs::read_to_string(cluster.log(leader))
            .expect("log")
            .contains("handed leadership over"),
        "the old leader's log does not say it handed over"
    );
    // The data is all there, served by the new leader.
    assert_eq!(
        clerk.get("k").await.expect("get").as_deref(),
        Some("before")
    );
    clerk
        .put("k", "after")
        .await
        .expect("put after the hand-off");
}

/// Issue #14, item 3: with `--follower-reads` a follower answers a Get itself, and the answer holds
/// every write that completed before the Get was sent, even though the follower learns of commits a
/// heartbeat late: it waits for the index its leader confirms. Then the leader is SIGKILLed and the
/// new leader's followers do the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_answer_reads_with_every_write_completed_before() {
    let mut cluster = Replicas::start_temp_args(Role::Kv, 3, 8 << 20, &["--follower-reads"]);
    let mut writer = cluster.clerk();
    let leader = cluster.wait_for_leader().await;
    for i in 0..100 {
        let value = i.to_string();
        writer.put("k", &value).await.expect("put");
        // Straight after the write, at each follower in turn.
        let follower = [(leader + 1) % 3, (leader + 2) % 3][i % 2];
        assert_eq!(
            get_at(&cluster.addrs[follower], "k").await,
            (pb::ErrorCode::Ok, Some(value)),
            "follower {follower}, write {i}"
        );
    }
    // A clerk that spreads its reads reads the same from every replica.
    let mut reader = Clerk::new(
        &cluster.addrs,
        ClerkConfig {
            read_anywhere: true,
            ..ClerkConfig::default()
        },
    )
    .expect("clerk");
    for _ in 0..30 {
        assert_eq!(reader.get("k").await.expect("get").as_deref(), Some("99"));
    }
    cluster.kill(leader);
    writer.put("k", "after").await.expect("put after the crash");
    let new_leader = cluster.wait_for_leader().await;
    let survivor = (0..3)
        .find(|&i| i != leader && i != new_leader)
        .expect("a third node");
    assert_eq!(
        get_at(&cluster.addrs[survivor], "k").await,
        (pb::ErrorCode::Ok, Some("after".into()))
    );
    assert_eq!(
        reader.get("k").await.expect("get").as_deref(),
        Some("after")
    );
}

/// `KVCTL_FOLLOWER_READS=1` (and the other boolean variables) read as operators write them: 1/0,
/// yes/no, on/off, not only `true`/`false`.
#[test]
fn kvctl_boolean_environment_variables_take_1_and_yes() {
    for (variable, value) in [
        ("KVCTL_FOLLOWER_READS", "1"),
        ("KVCTL_FOLLOWER_READS", "yes"),
        ("KVCTL_INTERNAL_ADDRESSES", "on"),
        ("KVCTL_FOLLOWER_READS", "0"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .env("DS824_INSECURE", "1")
            .env(variable, value)
            .args([
                "--cluster",
                "127.0.0.1:1",
                "--timeout-ms",
                "100",
                "get",
                "k",
            ])
            .output()
            .expect("run kvctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("no answer within"),
            "{variable}={value}: {stderr}"
        );
    }
}

/// One Get sent on a raw HTTP/2 connection `client`: the response's head, and its `grpc-status` if the
/// head is the whole answer (a refusal), else its body, still unread (the caller keeps it to keep
/// the stream open).
async fn raw_get(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    address: &str,
    key: &str,
) -> Result<h2::RecvStream, (String, String)> {
    use prost::Message as _;
    let request = http::Request::post(format!("http://{address}/kv.Kv/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let message = pb::GetRequest { key: key.into() }.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let ready = client.clone().ready().await.expect("stream slot");
    *client = ready;
    let (response, mut send) = client.send_request(request, false).expect("send");
    send.send_data(frame.into(), true).expect("body");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("a response head (HEADERS are not flow-controlled)")
        .expect("response");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match header("grpc-status") {
        Some(code) => Err((code, header("grpc-message").unwrap_or_default())),
        None => Ok(response.into_body()),
    }
}

/// Get answers that a caller leaves unread are bounded (the attacker review's HIGH): a client that
/// sets every stream's HTTP/2 window to zero and asks for a 1 MiB value again and again used to make
/// the replica hold a copy per Get for as long as its connection lived, 256 streams a connection and
/// thousands of connections. Now it holds at most the caller's share of the answer budget: the next
/// Get is refused at once as overloaded, and everything held is given back when the connection goes
/// (a second connection fits exactly as many again).
/// The second round grants each stream one byte of window and the connection all it may: a server
/// that handed hyper an answer whole gave its reservation back then, though h2 still held the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_left_unread_hold_at_most_the_callers_share() {
    use ds824::limits::MAX_UNSENT_ANSWER_BYTES_PER_CALLER;
    use prost::Message as _;
    let cluster = Replicas::start_temp(Role::Kv, 1, 64 << 20);
    let mut clerk = cluster.clerk();
    let value = "v".repeat(MAX_VALUE_BYTES);
    clerk.put("big", &value).await.expect("put");
    let answer = pb::GetResponse {
        found: true,
        value: value.clone(),
        ..Default::default()
    };
    let fits = MAX_UNSENT_ANSWER_BYTES_PER_CALLER / answer.encoded_len();
    let address = cluster.addrs[0].clone();
    for round in 0..2u32 {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        let (mut client, connection) = h2::client::Builder::new()
            .initial_window_size(round)
            .initial_connection_window_size(i32::MAX as u32)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("HTTP/2 handshake");
        let connection = tokio::spawn(connection);
        let mut unread = Vec::new();
        let refused = loop {
            match raw_get(&mut client, &address, "big").await {
                Ok(body) => unread.push(body),
                Err(refusal) => break refusal,
            }
            assert!(
                unread.len() <= fits,
                "round {round}: {} answers held unread, the caller's share fits {fits}",
                unread.len()
            );
        };
        assert_eq!(unread.len(), fits, "round {round}: {refused:?}");
        assert_eq!(refused.0, "8", "RESOURCE_EXHAUSTED: {refused:?}");
        assert!(refused.1.contains("overloaded"), "{refused:?}");
        drop(unread);
        drop(client);
        connection.abort();
        // Given back once the server sees the connection go: a clerk (the same caller, on
        // loopback) backs off and reads the value.
        let read = clerk.get("big").await.expect("get").expect("present");
        assert_eq!(read.len(), value.len());
    }
}

/// `kvd --quota-bytes` bounds the store as etcd's `--quota-backend-bytes` does (the attacker
/// review's MEDIUM: any client could grow every replica's memory and snapshots without end): a put
/// that would pass it is refused at once with an error naming the quota, and nothing is written;
/// deleting makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_at_its_quota_refuses_growth_until_keys_are_deleted() {
    let cluster = Replicas::start_temp_args(Role::Kv, 3, 8 << 20, &["--quota-bytes", "4096"]);
    let mut clerk = cluster.clerk();
    let value = "v".repeat(3000);
    clerk.put("a", &value).await.expect("within the quota");
    let refused = clerk.put("b", &value).await.expect_err("past the quota");
    assert!(
        matches!(refused, ds824::kv::ClerkError::Rejected(_)),
        "{refused}"
    );
    assert!(refused.to_string().contains("quota"), "{refused}");
    assert_eq!(clerk.get("b").await.expect("get"), None, "written anyway");
    assert!(clerk.delete("a").await.expect("delete"));
    clerk.put("b", &value).await.expect("room again");
    assert_eq!(
        clerk.get("b").await.expect("get").map(|v| v.len()),
        Some(3000)
    );
}
