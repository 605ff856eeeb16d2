//! The trust boundary with real `kvd` processes: the peer port is not the client port, TLS admits only
//! the cluster CA's certificates and each identity only to what its role may do, and nodes of different
//! clusters never talk.

#[path = "support/ports.rs"]
mod ports;
#[path = "support/replicas.rs"]
mod replicas;
#[path = "support/tls.rs"]
mod tls;

use bytes::Bytes;
use ds824::kv::{Clerk, ClerkConfig, ClerkError, KvOps as _};
use ds824::proto::raft as pb;
use ds824::proto::raft::raft_transport_client::RaftTransportClient;
use ds824::security::Security;
use replicas::{Replicas, Role};
use std::time::{Duration, Instant};

/// `AppendEntries{from, term: current + 1, entries: [garbage], leader_commit: last + 1}` for `to`.
fn forged(from: u64, to: u64, term: u64, last: u64, cluster: &str) -> pb::Envelope {
    pb::Envelope {
        from,
        to,
        cluster: cluster.to_string(),
        message: Some(pb::envelope::Message::AppendEntries(
            pb::AppendEntriesRequest {
                term: term + 1,
                prev_log_index: last,
                prev_log_term: term,
                entries: vec![pb::Entry {
                    term: term + 1,
                    index: last + 1,
                    kind: 0,
                    data: Bytes::from_static(b"\xff\xfegarbage"),
                }],
                leader_commit: last + 1,
                ..Default::default()
            },
        )),
    }
}

/// Send one envelope over a Raft stream to `address` with `security`; the call's outcome.
async fn send_raw(
    address: &str,
    security: &Security,
    envelope: pb::Envelope,
) -> Result<(), tonic::Status> {
    // The clerks' channel: it reports a refusal in the TLS handshake as the alert it was (tonic's
    // channel reports an alert that arrives after the request went out as "connection closed").
    let channel = security
        .channel(address, None, std::time::Duration::from_secs(5))
        .expect("channel");
    let mut client = RaftTransportClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(envelope).await.expect("queue");
    drop(tx);
    client
        .send(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|_| ())
}

fn clerk(addrs: &[String], security: Security) -> Clerk {
    Clerk::new(
        addrs,
        ClerkConfig {
            call_timeout: Duration::from_secs(8),
            security,
            ..ClerkConfig::default()
        },
    )
    .expect("clerk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_raft_message_on_the_client_port_changes_nothing() {
    let cluster = Replicas::start_temp(Role::Kv, 3, 8 << 20);
    let leader = cluster.wait_for_leader().await;
    clerk(&cluster.addrs, Security::Insecure)
        .put("k", "v")
        .await
        .expect("put");
    let victim = (leader + 1) % 3;
    let before = cluster
        .wait_for_status(victim, "the put applied", |s| s.applied_index >= 2)
        .await;
    let refused = send_raw(
        &cluster.addrs[victim],
        &Security::Insecure,
        forged(
            (leader + 1) as u64,
            victim as u64 + 1,
            before.term,
            before.last_index,
            "ds824/kv",
        ),
    )
    .await
    .expect_err("the client port must not take Raft messages");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused}");
    let after = cluster.status(victim).await.expect("status");
    assert_eq!(
        (after.term, after.commit_index, after.last_index),
        (before.term, before.commit_index, before.last_index),
        "the forged message changed the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_only_the_clusters_certificates_get_in_and_only_as_far_as_their_role() {
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    let other = tls::ca(root.path(), "other", "prod");
    let cluster = Replicas::start_temp_with(Role::Kv, 3, 8 << 20, Some(ca.clone()), None);
    let leader = cluster.wait_for_leader().await;
    let mut user = clerk(&cluster.addrs, tls::security(&ca, "client", "user"));
    user.put("k", "v")
        .await
        .expect("a client certificate writes");
    assert_eq!(user.get("k").await.expect("get").as_deref(), Some("v"));

    // Another CA's certificate: refused at the handshake, reported at once rather than retried.
    let started = Instant::now();
    let mut stranger = clerk(&cluster.addrs, tls::security(&other, "admin", "x"));
    let refused = stranger
        .get("k")
        .await
        .expect_err("another CA's certificate");
    assert!(matches!(refused, ClerkError::Tls(_)), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // The cluster's CA trusted, but a certificate another CA issued: the client's handshake completes
    // and the server refuses it afterwards (TLS 1.3 sends that alert after the client's handshake is
    // done). Also reported at once, saying the server refused this certificate, not retried until
    // the deadline as a connection failure.
    let started = Instant::now();
    let (other_cert, other_key) = tls::issue(&other, "client", "user");
    let mut outsider = clerk(
        &cluster.addrs,
        Security::load_tls(&ca.join("ca.pem"), &other_cert, &other_key).expect("load TLS"),
    );
    let refused = outsider
        .put("k", "outsider")
        .await
        .expect_err("a certificate of another CA");
    assert!(matches!(refused, ClerkError::Tls(_)), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("refused this client's certificate"),
        "{refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Plaintext against the TLS port gets nothing either.
    let mut plain = Clerk::new(
        &cluster.addrs,
        ClerkConfig {
            call_timeout: Duration::from_secs(2),
            ..ClerkConfig::default()
        },
    )
    .expect("clerk");
    assert!(plain.get("k").await.is_err(), "plaintext was served");

    // On the peer port: a client certificate, a replica certificate of another node id, another
    // group's replica and another CA are all refused; the node is unchanged.
    let victim = (leader + 1) % 3;
    let before = cluster
        .wait_for_status(victim, "the put applied", |s| s.applied_index >= 2)
        .await;
    // The message claims to come from the leader (a real peer of the victim), so only the
    // certificate can tell it apart from the real thing.
    let claimed = leader as u64 + 1;
    let third = (0..3)
        .find(|i| *i != leader && *i != victim)
        .expect("three nodes")
        + 1;
    let message = || {
        forged(
            claimed,
            victim as u64 + 1,
            before.term,
            before.last_index,
            "prod/kv",
        )
    };
    // A replica of the group is let in, and its message refused for what it claims.
    let impostor = tls::security(&ca, "kv", &third.to_string());
    let status = send_raw(&cluster.peer_addrs[victim], &impostor, message())
        .await
        .expect_err("an impostor");
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "kv node {third} claiming to be node {claimed}: {status}"
    );
    // Any other certificate of the cluster does not get a connection to the peer port at all.
    for (who, security) in [
        ("a client", tls::security(&ca, "client", "user")),
        ("a controller", tls::security(&ca, "ctrler", "2")),
    ] {
        let status = send_raw(&cluster.peer_addrs[victim], &security, message())
            .await
            .expect_err(who);
        assert!(
            format!("{status:?}").contains("AccessDenied"),
            "{who}: {status:?}"
        );
    }
    send_raw(
        &cluster.peer_addrs[victim],
        &tls::security(&other, "kv", "2"),
        message(),
    )
    .await
    .expect_err("another CA's node");
    let after = cluster.status(victim).await.expect("status");
    assert_eq!(
        (after.term, after.commit_index, after.last_index),
        (before.term, before.commit_index, before.last_index),
        "a refused message changed the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_and_both_sides_say_so() {
    let b = Replicas::start_temp_with(Role::Kv, 3, 8 << 20, None, Some("b".into()));
    let leader = b.wait_for_leader().await;
    clerk(&b.addrs, Security::Insecure)
        .put("k", "v")
        .await
        .expect("put");
    let before = b.status(leader).await.expect("status");
    // Cluster A's node 1, with a --peers typo: its node 2 is B's node 2.
    let mut a = Replicas::start_temp_with(Role::Kv, 3, 8 << 20, None, Some("a".into()));
    a.kill(1);
    a.kill(2);
    a.kill(0);
    a.peer_addrs[1] = b.peer_addrs[1].clone();
    a.start_node(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut a_log, mut b_log) = (String::new(), String::new());
    while Instant::now() < deadline {
        a_log = std::fs::read_to_string(a.log(0)).unwrap_or_default();
        b_log = std::fs::read_to_string(b.log(1)).unwrap_or_default();
        if a_log.contains("peer refuses our messages")
            && b_log.contains("refusing messages from another cluster")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        b_log.contains("refusing messages from another cluster") && b_log.contains("a/kv"),
        "B did not log the mismatch:\n{b_log}"
    );
    assert!(
        a_log.contains("peer refuses our messages") && a_log.contains("b/kv"),
        "A did not log the mismatch:\n{a_log}"
    );
    let after = b.wait_for_leader().await;
    let status = b.status(after).await.expect("status");
    assert_eq!(
        (after, status.term),
        (leader, before.term),
        "B lost its leader"
    );
    assert!(status.commit_index >= before.commit_index);
    assert_eq!(
        clerk(&b.addrs, Security::Insecure)
            .get("k")
            .await
            .expect("get")
            .as_deref(),
        Some("v")
    );
}

/// One `ShardTransfer` call to `address` as `security`: the status answered, or the refusal.
async fn transfer(
    address: &str,
    security: &Security,
    shard: u64,
    delete: bool,
) -> Result<i32, tonic::Status> {
    use ds824::proto::shardkv as spb;
    let channel = security
        .endpoint(address)
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| match ds824::security::is_tls_failure(&e) {
            true => tonic::Status::unauthenticated(format!("TLS handshake: {e}")),
            false => tonic::Status::unavailable(format!("connect: {e}")),
        })?;
    let mut client = spb::shard_transfer_client::ShardTransferClient::new(channel);
    let shard = Some(spb::ShardRef {
        config_num: 2,
        shard,
    });
    // With TLS 1.3 the server refuses a client certificate after the client finished its handshake:
    // the refusal may surface on the first call instead.
    let tls_refusal = |status: tonic::Status| match ds824::security::is_tls_failure(&status) {
        true => tonic::Status::unauthenticated(format!("TLS handshake: {status}")),
        false => status,
    };
    if delete {
        let request = spb::DeleteRequest { shard };
        let response = client.delete(request).await.map_err(tls_refusal)?;
        Ok(response.into_inner().status)
    } else {
        let request = spb::PullRequest {
            shard,
            ..spb::PullRequest::default()
        };
        let response = client.pull(request).await.map_err(tls_refusal)?;
        Ok(response.into_inner().status)
    }
}

/// [`transfer`]'s answer, with a refusal as text (comparable in assertions).
async fn transfer_status(
    address: &str,
    security: &Security,
    shard: u64,
    delete: bool,
) -> Result<i32, String> {
    transfer(address, security, shard, delete)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_shard_goes_only_to_its_new_owner_and_is_kept_until_it_had_it() {
    use ds824::ctrler::CtrlerClerk;
    use ds824::proto::shardkv::TransferStatus;
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    let ctrlers = Replicas::start_temp_with(Role::Ctrler, 1, 8 << 20, Some(ca.clone()), None);
    let group = Role::Shard {
        gid: 1,
        ctrlers: ctrlers.addrs.join(","),
    };
    let g1 = Replicas::start_temp_with(group, 1, 8 << 20, Some(ca.clone()), None);
    let config = ClerkConfig {
        call_timeout: Duration::from_secs(20),
        security: ctrlers.client_security(),
        ..ClerkConfig::default()
    };
    let mut admin = CtrlerClerk::new(&ctrlers.addrs, config).expect("ctrler clerk");
    admin
        .join([(1, g1.addrs.clone())].into())
        .await
        .expect("join 1");
    // Group 2 never runs, so the shards configuration 2 gives it stay frozen at group 1.
    let joined = admin
        .join([(2, vec!["127.0.0.1:1".to_string()])].into())
        .await
        .expect("join 2");
    let shard = joined
        .shards
        .iter()
        .position(|&gid| gid == 2)
        .expect("group 2 got shards") as u64;
    let frozen = g1
        .wait_for_status(0, "configuration 2", |s| s.config_num == 2)
        .await
        .outgoing_shards;
    assert!(frozen > 0);

    let as_group = |gid: u64| tls::security(&ca, &format!("shard-{gid}"), "1");
    let address = &g1.addrs[0];
    for (who, security, delete) in [
        ("group 3 pulling", as_group(3), false),
        ("group 3 deleting", as_group(3), true),
        (
            "a client deleting",
            tls::security(&ca, "client", "user"),
            true,
        ),
        (
            "an admin pulling",
            tls::security(&ca, "admin", "ops"),
            false,
        ),
    ] {
        let refused = transfer(address, &security, shard, delete)
            .await
            .expect_err(who);
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{who}: {refused}"
        );
    }
    // Group 2's identity from another CA does not get past the handshake.
    let other = tls::ca(root.path(), "other", "prod");
    let stranger = tls::security(&other, "shard-2", "1");
    for delete in [false, true] {
        let refused = transfer(address, &stranger, shard, delete)
            .await
            .expect_err("another CA's group 2");
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "not refused at the handshake: {refused}"
        );
    }
    // The new owner itself may not delete a copy whose final page nobody has had.
    assert_eq!(
        transfer_status(address, &as_group(2), shard, true).await,
        Ok(TransferStatus::NotReady as i32)
    );
    let kept = g1.status(0).await.expect("status").outgoing_shards;
    assert_eq!(kept, frozen, "a refused transfer dropped a copy");
    // Once it pulled the (final, empty) page, its delete is honoured, and only its.
    assert_eq!(
        transfer_status(address, &as_group(2), shard, false).await,
        Ok(TransferStatus::Ok as i32)
    );
    let refused = transfer(address, &as_group(3), shard, true)
        .await
        .expect_err("group 3 after the pull");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert_eq!(
        transfer_status(address, &as_group(2), shard, true).await,
        Ok(TransferStatus::Ok as i32)
    );
    let after = g1.status(0).await.expect("status").outgoing_shards;
    assert_eq!(after, frozen - 1);
    // Settled requests (a copy deleted) are answered from the state, without a log entry: any
    // group's certificate repeating them fills nothing.
    let before = g1.status(0).await.expect("status").commit_index;
    for _ in 0..20 {
        assert_eq!(
            transfer_status(address, &as_group(2), shard, false).await,
            Ok(TransferStatus::NotReady as i32)
        );
        assert_eq!(
            transfer_status(address, &as_group(3), shard, true).await,
            Ok(TransferStatus::Ok as i32)
        );
    }
    let after = g1.status(0).await.expect("status").commit_index;
    assert_eq!(after, before, "settled transfers went through the log");
}

/// `kvctl` against TLS controllers as `who` (a certificate from `ca` of `role`, or `None`: plaintext):
/// its exit status, what it printed on stderr, and how long it took.
fn kvctl(
    ctrlers: &str,
    who: Option<(&std::path::Path, &str)>,
    args: &[&str],
) -> (Option<i32>, String, Duration) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kvctl"));
    command.args(["--ctrlers", ctrlers]).args(args);
    for var in [
        "DS824_TLS_CA",
        "DS824_TLS_CERT",
        "DS824_TLS_KEY",
        "DS824_INSECURE",
    ] {
        command.env_remove(var);
    }
    tls::flags(&mut command, who.map(|(ca, role)| (ca, role, "cli")));
    let started = Instant::now();
    let output = command.output().expect("run kvctl");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_is_refused_at_once_without_the_right_certificate() {
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    let other = tls::ca(root.path(), "other", "prod");
    let ctrlers = Replicas::start_temp_with(Role::Ctrler, 1, 8 << 20, Some(ca.clone()), None);
    let addrs = ctrlers.addrs.join(",");
    // (The controllers serve no KV status: a client's query is what says they are up.)
    let (code, stderr, _) = kvctl(&addrs, Some((ca.as_path(), "client")), &["ctrler", "query"]);
    assert_eq!(code, Some(0), "a client may read configurations: {stderr}");
    let join = ["ctrler", "join", "1=127.0.0.1:1"];
    for (who, security, expected) in [
        ("a client", Some((ca.as_path(), "client")), "may not"),
        (
            "another CA's admin",
            Some((other.as_path(), "admin")),
            "TLS",
        ),
        ("no certificate", None, "TLS"),
    ] {
        let (code, stderr, took) = kvctl(&addrs, security, &join);
        assert_eq!(code, Some(2), "{who}: {stderr}");
        assert!(stderr.contains(expected), "{who}: {stderr}");
        assert!(
            took < Duration::from_secs(5),
            "{who} took {took:?}: {stderr}"
        );
    }
    let (code, stderr, _) = kvctl(&addrs, Some((ca.as_path(), "admin")), &join);
    assert_eq!(code, Some(0), "the admin may join: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_role_cannot_pass_for_the_one_a_client_wants() {
    use ds824::ctrler::CtrlerClerk;
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    // A genuine server of the cluster, but a shard group's: as if it intercepted the controllers'
    // traffic, or an operator pointed --ctrlers at the wrong port.
    let group = Role::Shard {
        gid: 1,
        ctrlers: "127.0.0.1:1".into(),
    };
    let g1 = Replicas::start_temp_with(group, 1, 8 << 20, Some(ca.clone()), None);
    g1.wait_for_leader().await;
    let config = ClerkConfig {
        call_timeout: Duration::from_secs(8),
        security: g1.client_security(),
        ..ClerkConfig::default()
    };
    let started = Instant::now();
    let mut posing = CtrlerClerk::new(&g1.addrs, config).expect("ctrler clerk");
    let refused = posing
        .query(None)
        .await
        .expect_err("a shard group passed for a controller");
    assert!(matches!(refused, ClerkError::Tls(_)), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // The same server is what a client of any replica (kvctl status) may talk to.
    let status = g1.status(0).await.expect("status of a replica");
    assert_eq!(status.gid, 1);
}

/// A progress report lets the controllers drop configurations, so only the group itself may make one:
/// another group's certificate, a client's or an admin's is refused, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_group_itself_may_report_its_progress_to_the_controllers() {
    use ds824::ctrler::CtrlerClerk;
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    let ctrlers = Replicas::start_temp_with(Role::Ctrler, 1, 8 << 20, Some(ca.clone()), None);
    let clerk_as = |security| {
        let config = ClerkConfig {
            call_timeout: Duration::from_secs(20),
            security,
            ..ClerkConfig::default()
        };
        CtrlerClerk::new(&ctrlers.addrs, config).expect("ctrler clerk")
    };
    let mut admin = clerk_as(ctrlers.client_security());
    admin
        .join([(1, vec!["127.0.0.1:1".to_string()])].into())
        .await
        .expect("join 1");
    for shard in 0..5 {
        admin.move_shard(shard, 1).await.expect("move");
    }
    for (who, security) in [
        ("group 2", tls::security(&ca, "shard-2", "1")),
        ("a client", tls::security(&ca, "client", "user")),
        ("an admin", tls::security(&ca, "admin", "ops")),
    ] {
        let refused = clerk_as(security)
            .report_progress(1, 6)
            .await
            .expect_err(who);
        assert!(
            refused
                .to_string()
                .contains("may not report progress for group 1"),
            "{who}: {refused}"
        );
    }
    admin.query(Some(0)).await.expect("nothing was dropped");
    let oldest = clerk_as(tls::security(&ca, "shard-1", "1"))
        .report_progress(1, 6)
        .await
        .expect("group 1's own report");
    assert_eq!(oldest, 6 - ds824::ctrler::DEFAULT_KEEP_CONFIGS.min(6));
}

/// One put with an explicit session, over the clerks' channel with `security`'s certificate, sent
/// to each of `addrs` in turn until one that leads answers.
async fn mutate_as(
    addrs: &[String],
    security: &Security,
    (client_id, seq): (u64, u64),
    key: &str,
    value: &str,
) -> ds824::proto::kv::MutateResponse {
    use ds824::proto::kv as kvpb;
    let deadline = Instant::now() + Duration::from_secs(20);
    for address in addrs.iter().cycle() {
        let channel = security
            .channel(address, None, Duration::from_secs(5))
            .expect("channel");
        let mut client = kvpb::kv_client::KvClient::new(channel);
        let command = kvpb::Command {
            op: Some(kvpb::command::Op::Put(kvpb::Put {
                key: key.into(),
                value: value.into(),
            })),
        };
        let answer = client
            .mutate(kvpb::MutateRequest {
                client_id,
                seq,
                command: Some(command),
            })
            .await
            .expect("mutate")
            .into_inner();
        if answer.error() != kvpb::ErrorCode::WrongLeader || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("addrs is not empty")
}

/// Sessions belong to the identity that opened them (the attacker review's MEDIUM): a client with
/// its own certificate that sends commands under another client's id — whose ids are not secret —
/// is told its session expired, and changes nothing: neither the key nor the victim's session, whose
/// next write applies as usual. Before, a sequence number far ahead made the victim's next writes
/// look like retries, answered "ok" and never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_answers_only_the_certificate_that_opened_its_session() {
    use ds824::proto::kv::ErrorCode;
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "prod");
    let cluster = Replicas::start_temp_with(Role::Kv, 3, 8 << 20, Some(ca.clone()), None);
    cluster.wait_for_leader().await;
    let addrs = &cluster.addrs;
    let victim = tls::security(&ca, "client", "victim");
    let attacker = tls::security(&ca, "client", "attacker");
    let session = ds824::rsm::client::new_client_id();

    let first = mutate_as(addrs, &victim, (session, 1), "k", "victim 1").await;
    assert_eq!(first.error(), ErrorCode::Ok, "{first:?}");
    let forged = mutate_as(addrs, &attacker, (session, 1_000_000), "k", "forged").await;
    assert_eq!(forged.error(), ErrorCode::SessionExpired, "{forged:?}");
    let second = mutate_as(addrs, &victim, (session, 2), "k", "victim 2").await;
    assert_eq!(second.error(), ErrorCode::Ok, "{second:?}");
    assert_eq!(second.outcome.map(|o| o.ok), Some(true));
    let mut reader = clerk(&cluster.addrs, victim);
    assert_eq!(
        reader.get("k").await.expect("get").as_deref(),
        Some("victim 2"),
        "the victim's second write was not applied"
    );
}
