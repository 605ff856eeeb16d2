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
    voters_and_learners(&member(cluster, &["list", "--json"]))
}

/// The voters and learners in the output of `kvctl member list --json`.
fn voters_and_learners(text: &str) -> (Vec<u64>, Vec<u64>) {
    let json: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
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

/// `kvctl --ctrlers ... member --gid GID ARGS` (plaintext) succeeds or not, with its output.
fn kvctl_group(ctrlers: &Replicas, gid: u64, args: &[&str]) -> (bool, String) {
    let mut all = vec!["member", "--gid"];
    let gid = gid.to_string();
    all.push(&gid);
    all.extend_from_slice(args);
    kvctl_ctrlers(ctrlers, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_groups_new_members_are_what_the_controllers_hand_out() {
    use ds824::ctrler::CtrlerClerk;
    use ds824::kv::KvOps;
    use ds824::shardkv::ShardClerk;
    let root = tempfile::tempdir().expect("temp dir");
    let ctrlers = Replicas::start(root.path(), 0, "");
    let role = Role::Shard {
        gid: 1,
        ctrlers: ctrlers.addrs.join(","),
    };
    let mut group = Replicas::prepare_temp(role, 4, 4 << 10);
    group.bootstrap = Some(3);
    for i in 0..3 {
        group.start_node(i);
    }
    let config = ClerkConfig {
        call_timeout: Duration::from_secs(20),
        ..ClerkConfig::default()
    };
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, config.clone()).expect("ctrler clerk");
    let first: Vec<String> = group.addrs[..3].to_vec();
    admin
        .join([(1, first.clone())].into())
        .await
        .expect("join group 1");
    let mut clerk = ShardClerk::new(&ctrlers.addrs, config.clone()).expect("clerk");
    for k in 0..20 {
        clerk
            .put(&format!("k{k}"), &format!("v{k}"))
            .await
            .expect("put");
    }
    let servers = |config: &ds824::ctrler::Config| config.groups[&1].to_vec();

    // Node 4 joins and, once a voter, is one of the group's servers in the controllers.
    group.start_joining(3, &[0, 1, 2]);
    let spec = format!("4={}", group.peer_addrs[3]);
    let (ok, text) = kvctl_group(&ctrlers, 1, &["add", &spec, "--serve", &group.addrs[3]]);
    assert!(ok, "{text}");
    assert!(text.contains("controllers: group 1 is served by"), "{text}");
    let latest = admin.query(None).await.expect("query");
    let mut expected = first.clone();
    expected.push(group.addrs[3].clone());
    assert_eq!(servers(&latest), expected);
    // A voter change without --serve leaves the list and says so.
    let (ok, text) = kvctl_group(&ctrlers, 1, &["promote", "4"]);
    assert!(ok && text.contains("without --serve"), "{text}");

    // A server the controllers do not list is refused before the membership changes.
    let (ok, text) = kvctl_group(&ctrlers, 1, &["remove", "1", "--serve", "127.0.0.1:1"]);
    assert!(
        !ok && text.contains("is not one of group 1's servers"),
        "{text}"
    );
    let (voters, _) = members_of(&ctrlers, 1);
    assert_eq!(
        voters,
        [1, 2, 3, 4],
        "a refused command changed the membership"
    );

    // Nodes 1 and 2 leave: their entries go; what the controllers hand out reaches the rest.
    for (id, slot) in [(1, 0), (2, 1)] {
        let (ok, text) = kvctl_group(
            &ctrlers,
            1,
            &["remove", &id.to_string(), "--serve", &group.addrs[slot]],
        );
        assert!(ok, "{text}");
        group.kill(slot);
    }
    let latest = admin.query(None).await.expect("query");
    assert_eq!(servers(&latest), group.addrs[2..].to_vec());
    let mut fresh = ShardClerk::new(&ctrlers.addrs, config).expect("clerk");
    for k in 0..20 {
        assert_eq!(
            fresh.get(&format!("k{k}")).await.expect("get"),
            Some(format!("v{k}"))
        );
    }
}

/// Group `gid`'s voters and learners, as `kvctl member --gid GID list --json` reports them.
fn members_of(ctrlers: &Replicas, gid: u64) -> (Vec<u64>, Vec<u64>) {
    let (ok, text) = kvctl_group(ctrlers, gid, &["list", "--json"]);
    assert!(ok, "{text}");
    voters_and_learners(&text)
}
