//! Membership changes on real processes (issue #15): `kvd --join` and `kvctl member ...`, under a
//! recorded load whose history must stay linearizable with no acknowledged write lost.

#[path = "support/appends.rs"]
mod appends;
#[path = "support/ports.rs"]
mod ports;
#[path = "support/replicas.rs"]
mod replicas;
#[path = "support/tls.rs"]
mod tls;

use ds824::kv::{Clerk, ClerkConfig};
use replicas::{Replicas, Role, WAIT};
use std::time::Duration;

/// A clerk that knows every slot's address (joined nodes included) and finds the leader among them.
fn clerk(cluster: &Replicas) -> Clerk {
    Clerk::new(
        &cluster.addrs,
        ClerkConfig {
            call_timeout: Duration::from_secs(15),
            ..ClerkConfig::default()
        },
    )
    .expect("clerk")
}

/// `kvctl member ARGS` succeeds (the output is shown on failure).
fn member(cluster: &Replicas, args: &[&str]) -> String {
    let mut all = vec!["member"];
    all.extend_from_slice(args);
    let output = cluster.kvctl(&all);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "kvctl member {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The voters and learners `kvctl member list --json` reports.
fn members(cluster: &Replicas) -> (Vec<u64>, Vec<u64>) {
    let json: serde_json::Value =
        serde_json::from_str(&member(cluster, &["list", "--json"])).expect("json");
    let mut voters = Vec::new();
    let mut learners = Vec::new();
    for m in json["members"].as_array().expect("members") {
        let id = m["id"].as_u64().expect("id");
        if m["learner"].as_bool().expect("learner") {
            learners.push(id);
        } else {
            voters.push(id);
        }
    }
    (voters, learners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_one_to_five_and_shrinks_to_three_under_load() {
    let mut cluster = Replicas::prepare_temp(Role::Kv, 5, 16 << 10);
    cluster.bootstrap = Some(1);
    cluster.start_node(0);
    cluster.wait_for_leader().await;
    let load = appends::Load::start(|| clerk(&cluster));
    load.wait_for_more(100, WAIT, "on one node").await;
    for i in 1..5 {
        cluster.start_joining(i, &[0]);
        let spec = format!("{}={}", i + 1, cluster.peer_addrs[i]);
        let out = member(&cluster, &["add", &spec]);
        assert!(out.contains(&format!("promoted node {}", i + 1)), "{out}");
        load.wait_for_more(50, WAIT, &format!("after adding node {}", i + 1))
            .await;
    }
    assert_eq!(members(&cluster), (vec![1, 2, 3, 4, 5], vec![]));
    // Shrink by the first two, the founding node (perhaps the leader) included.
    for id in [1u64, 2] {
        member(&cluster, &["remove", &id.to_string()]);
        cluster.terminate(id as usize - 1);
        load.wait_for_more(50, WAIT, &format!("after removing node {id}"))
            .await;
    }
    assert_eq!(members(&cluster), (vec![3, 4, 5], vec![]));
    let mut final_clerk = clerk(&cluster);
    load.finish_and_verify(&mut final_clerk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_data_dir_was_deleted_is_replaced_and_catches_up_by_snapshot() {
    // A small snapshot threshold: the log is compacted long before the replacement arrives.
    let mut cluster = Replicas::prepare_temp(Role::Kv, 3, 4 << 10);
    for i in 0..3 {
        cluster.start_node(i);
    }
    cluster.wait_for_leader().await;
    let load = appends::Load::start(|| clerk(&cluster));
    load.wait_for_more(200, WAIT, "before the disk loss").await;
    // Node 3's disk dies.
    let lost = 2;
    cluster.kill(lost);
    std::fs::remove_dir_all(cluster.data_dir(lost)).expect("delete the data dir");
    load.wait_for_more(100, WAIT, "with node 3 down").await;
    // Back with an empty disk it must not rejoin as the voter it was.
    let refused = cluster.run_joining_to_exit(lost, &[0, 1]);
    assert_eq!(
        refused.code(),
        Some(2),
        "a voter with an empty data dir was let in"
    );
    let log = std::fs::read_to_string(cluster.log(lost)).expect("log");
    assert!(log.contains("kvctl member remove 3"), "{log}");
    // The operator's replacement: remove it, start it fresh with --join, add it.
    member(&cluster, &["remove", "3"]);
    assert_eq!(members(&cluster), (vec![1, 2], vec![]));
    std::fs::remove_dir_all(cluster.data_dir(lost)).ok();
    cluster.start_joining(lost, &[0, 1]);
    let spec = format!("3={}", cluster.peer_addrs[lost]);
    member(&cluster, &["add", &spec]);
    assert_eq!(members(&cluster), (vec![1, 2, 3], vec![]));
    load.wait_for_more(100, WAIT, "after the replacement").await;
    // It holds the state: it was sent a snapshot (the log it missed was compacted away).
    let status = cluster
        .wait_for_status(lost, "a snapshot installed", |s| s.snapshot_index > 0)
        .await;
    assert!(status.applied_index > 0);
    let mut final_clerk = clerk(&cluster);
    load.finish_and_verify(&mut final_clerk).await;
}

/// `kvctl --ctrlers ... ARGS` against the controllers (plaintext).
fn kvctl_ctrlers(ctrlers: &Replicas, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--insecure")
        .args([
            "--ctrlers",
            &ctrlers.addrs.join(","),
            "--timeout-ms",
            "30000",
        ])
        .args(args)
        .env_remove("KVCTL_CLUSTER")
        .output()
        .expect("run kvctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_membership_and_leadership_are_managed_the_same_way() {
    let mut ctrlers = Replicas::prepare_temp(Role::Ctrler, 3, 4 << 10);
    for i in 0..3 {
        ctrlers.start_node(i);
    }
    let list = |ctrlers: &Replicas| -> serde_json::Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (ok, text) = kvctl_ctrlers(ctrlers, &["member", "--ctrler", "list", "--json"]);
            if ok {
                return serde_json::from_str(text.trim()).expect("json");
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let members = list(&ctrlers);
    assert_eq!(members["members"].as_array().map(Vec::len), Some(3));
    let leader = members["leader"].as_u64().expect("leader");
    let target = leader % 3 + 1;
    let (ok, text) = kvctl_ctrlers(
        &ctrlers,
        &["transfer-leader", "--ctrler", &target.to_string()],
    );
    assert!(ok, "{text}");
    assert_eq!(list(&ctrlers)["leader"].as_u64(), Some(target));
    // A learner's progress shows in the list.
    let spec = format!("4={}", "127.0.0.1:9");
    let (ok, text) = kvctl_ctrlers(&ctrlers, &["member", "--ctrler", "add", &spec, "--learner"]);
    assert!(ok, "{text}");
    let learner = list(&ctrlers)["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"] == 4)
        .cloned()
        .expect("node 4 listed");
    assert_eq!(learner["learner"], true);
    assert!(learner["lag"].as_u64().expect("lag") > 0, "{learner}");
    let (ok, text) = kvctl_ctrlers(&ctrlers, &["member", "--ctrler", "remove", "4"]);
    assert!(ok, "{text}");
    assert_eq!(list(&ctrlers)["members"].as_array().map(Vec::len), Some(3));
}
