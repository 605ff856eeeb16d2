//! Backup and restore as an operator does them: `kvctl snapshot save` against a loaded cluster of real
//! `kvd` processes while writes continue, `kvctl snapshot status`, and a fresh cluster started with
//! `kvd --restore`; refused files and directories.

#[path = "support/ports.rs"]
mod ports;
#[path = "support/replicas.rs"]
mod replicas;
#[path = "support/tls.rs"]
mod tls;

use ds824::kv::KvOps as _;
use ds824::kv::{Clerk, ClerkConfig};
use replicas::{Replicas, Role};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn kvctl(args: &[&str], security: Option<(&Path, &str)>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvctl"));
    tls::flags(&mut command, security.map(|(ca, role)| (ca, role, "tests")));
    command
        .args(["--timeout-ms", "10000"])
        .args(args)
        .env_remove("KVCTL_CLUSTER")
        .env_remove("KVCTL_CTRLERS")
        .output()
        .expect("run kvctl")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn clerk(addrs: &[String]) -> Clerk {
    Clerk::new(
        addrs,
        ClerkConfig {
            call_timeout: Duration::from_secs(10),
            ..ClerkConfig::default()
        },
    )
    .expect("clerk")
}

/// Writers put distinct keys (`w<writer>-<n>` = `<n>`) one after another and record every one that
/// was acknowledged.
type Acked = Arc<Mutex<BTreeMap<String, String>>>;

fn spawn_writers(
    addrs: &[String],
    writers: usize,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let (mut clerk, stop, acked) = (clerk(addrs), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (key, value) = (format!("w{w}-{n}"), n.to_string());
                    if clerk.put(&key, &value).await.is_ok() {
                        acked.lock().expect("acked").insert(key, value);
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_writes_restores_every_write_acknowledged_before_it() {
    // A small threshold: the source has compacted several times, so the backup is not just its log.
    let source = Replicas::start_temp(Role::Kv, 3, 64 << 10);
    source.wait_for_leader().await;
    let (stop, acked): (Arc<AtomicBool>, Acked) = Default::default();
    let writers = spawn_writers(&source.addrs, 4, stop.clone(), acked.clone());
    while acked.lock().expect("acked").len() < 2_000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every write acknowledged before the save began must be in the backup.
    let before: BTreeMap<String, String> = acked.lock().expect("acked").clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("kv.backup");
    let file_arg = file.to_str().expect("utf-8 path");
    let cluster = source.addrs.join(",");
    let saved = tokio::task::spawn_blocking({
        let (cluster, file_arg) = (cluster.clone(), file_arg.to_string());
        move || {
            kvctl(
                &["--cluster", &cluster, "snapshot", "save", &file_arg],
                None,
            )
        }
    })
    .await
    .expect("kvctl");
    let written_after_save = acked.lock().expect("acked").len();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    assert!(saved.status.success(), "{}", text(&saved));
    assert!(
        text(&saved).contains("saved kv of ds824/kv at index"),
        "{}",
        text(&saved)
    );
    assert!(!dir.path().join("kv.backup.part").exists());
    eprintln!(
        "{} acknowledged before the save, {written_after_save} by its end",
        before.len()
    );

    // A second save to the same name is refused: a backup is never written over.
    let again = kvctl(&["--cluster", &cluster, "snapshot", "save", file_arg], None);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("exists"), "{}", text(&again));

    let status = kvctl(&["snapshot", "status", file_arg], None);
    assert!(status.status.success(), "{}", text(&status));
    let report = text(&status);
    assert!(report.contains("service     kv"), "{report}");
    assert!(report.contains("checksum"), "{report}");
    let keys: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("keys"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no key count in {report}"));
    assert!(
        keys >= before.len(),
        "{keys} keys in the backup, {} acknowledged before",
        before.len()
    );

    // Broken copies are refused with the reason, by `status` and by `kvd --restore`.
    let bytes = std::fs::read(&file).expect("read backup");
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let mut flipped = bytes.clone();
    let middle = bytes.len() / 2;
    flipped[middle] ^= 0x40;
    let corrupt = dir.path().join("corrupt.backup");
    std::fs::write(&corrupt, &flipped).expect("write");
    for (path, reason) in [(&truncated, "truncated"), (&corrupt, "corrupt")] {
        let out = kvctl(&["snapshot", "status", path.to_str().expect("utf-8")], None);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(reason), "{}", text(&out));
        let empty = tempfile::tempdir().expect("temp dir");
        let out = one_kvd("kv", empty.path(), path);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(reason), "{}", text(&out));
        assert_eq!(
            std::fs::read_dir(empty.path()).expect("dir").count(),
            0,
            "a refused restore wrote into the data dir"
        );
    }
    // Another service's node, and a data dir that holds a node's state, refuse it.
    let other = tempfile::tempdir().expect("temp dir");
    let out = one_kvd("ctrler", other.path(), &file);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("backup of the \"kv\" service"),
        "{}",
        text(&out)
    );
    let mut source = source;
    for i in 0..3 {
        source.kill(i);
    }
    let out = one_kvd("kv", &source.data_dir(0), &file);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already holds"), "{}", text(&out));

    // A new cluster from the backup holds every write acknowledged before the save, and only
    // values that were written.
    let mut restored = Replicas::start_temp_args(Role::Kv, 3, 64 << 10, &["--restore", file_arg]);
    restored.wait_for_leader().await;
    let mut reader = clerk(&restored.addrs);
    for (key, value) in &before {
        let got = reader.get(key).await.expect("get");
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "{key} after the restore"
        );
    }
    let status = restored.status(0).await.expect("status");
    assert!(status.keys as usize >= before.len());
    assert!(status.restored_snapshot_index > 0, "{status:?}");
    // It serves writes, and a node restarted with the same --restore starts from its own state.
    reader.put("after-restore", "yes").await.expect("put");
    restored.kill(1);
    restored.start_node(1);
    restored
        .wait_for_status(1, "caught up after its restart", |s| {
            s.applied_index > status.applied_index
        })
        .await;
    assert_eq!(
        reader.get("after-restore").await.expect("get").as_deref(),
        Some("yes")
    );
    let log = std::fs::read_to_string(restored.log(1)).expect("log");
    assert!(
        log.contains("seeded from this backup before"),
        "restart log:\n{log}"
    );

    // A node of the old cluster started with its own data among the restored ones (the operator
    // restored two of three): it is another cluster on the wire, so it can neither win an election
    // with its longer log and undo the restore, nor be taken for a member that has the state.
    restored.kill(2);
    std::fs::remove_dir_all(restored.data_dir(2)).expect("remove");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(source.data_dir(2))
        .arg(restored.data_dir(2))
        .status()
        .expect("cp");
    assert!(copied.success());
    restored.extra_args.clear();
    restored.start_node(2);
    let mut writer = clerk(&restored.addrs[..2]);
    for n in 0..20 {
        writer
            .put("after-old-node", &n.to_string())
            .await
            .expect("put");
    }
    let old = restored
        .status(2)
        .await
        .expect("the old node answers status");
    assert!(old.leader == 0 || old.leader == 3, "{old:?}");
    for (key, value) in before.iter().take(50) {
        assert_eq!(
            reader.get(key).await.expect("get").as_deref(),
            Some(value.as_str())
        );
    }
    assert_eq!(
        reader.get("after-old-node").await.expect("get").as_deref(),
        Some("19")
    );
    // Its pre-votes (it hears no leader it accepts) are refused as another cluster's.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = |i: usize| {
        std::fs::read_to_string(restored.log(i))
            .is_ok_and(|log| log.contains("refusing messages from another cluster"))
    };
    while !(refused(0) || refused(1)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored nodes never refused the old node's messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = restored
        .status(2)
        .await
        .expect("the old node answers status");
    assert!(old.leader == 0 || old.leader == 3, "{old:?}");

    // The operator replaces that node as a lost disk is replaced: removed, started empty with
    // --join, added. It takes the restored group's tag from the group it joins (without it, the
    // group would refuse its messages as another cluster's and it would never catch up).
    restored.kill(2);
    std::fs::remove_dir_all(restored.data_dir(2)).expect("remove");
    let removed = restored.kvctl(&["member", "remove", "3"]);
    assert!(removed.status.success(), "{}", text(&removed));
    restored.start_joining(2, &[0, 1]);
    let spec = format!("3={}", restored.peer_addrs[2]);
    let added = restored.kvctl(&["member", "add", &spec]);
    assert!(added.status.success(), "{}", text(&added));
    let joined = restored
        .wait_for_status(2, "the joined node caught up", |s| s.snapshot_index > 0)
        .await;
    assert!(joined.applied_index > 0, "{joined:?}");
    // And it keeps up with new writes.
    reader.put("after-join", "yes").await.expect("put");
    restored
        .wait_for_status(2, "the joined node applies new writes", |s| {
            s.applied_index > joined.applied_index
        })
        .await;
}

/// One `kvd` of `service` started with `--restore file` into `data_dir`, expected to refuse and exit.
fn one_kvd(service: &str, data_dir: &Path, file: &Path) -> std::process::Output {
    let port = ports::free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvd"));
    command.arg(service);
    if service == "ctrler" {
        command.args(["--shards", "10"]);
    }
    command
        .env("DS824_INSECURE", "1")
        .env("KVD_PEER_LISTEN", "127.0.0.1:0")
        .args(["--id", "1", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--peers", &format!("1=127.0.0.1:{}", ports::free_port())])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--restore")
        .arg(file)
        .output()
        .expect("run kvd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_takes_backups_and_the_controllers_back_up_too() {
    let root = tempfile::tempdir().expect("temp dir");
    let ca = tls::ca(root.path(), "ca", "ds824");
    let ctrlers = Replicas::start_temp_with(Role::Ctrler, 3, 8 << 20, Some(ca.clone()), None);
    // Controllers serve no Status: kvctl's own retries wait for their leader.
    let list = ctrlers.addrs.join(",");
    let joined = kvctl(
        &[
            "--ctrlers",
            &list,
            "ctrler",
            "join",
            "1=127.0.0.1:1",
            "2=127.0.0.1:2",
        ],
        Some((&ca, "admin")),
    );
    assert!(joined.status.success(), "{}", text(&joined));
    let file = root.path().join("ctrler.backup");
    let file_arg = file.to_str().expect("utf-8");
    let refused = kvctl(
        &["--ctrlers", &list, "snapshot", "save", "--ctrler", file_arg],
        Some((&ca, "client")),
    );
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("may not take backups"),
        "{}",
        text(&refused)
    );
    assert!(!file.exists());
    let saved = kvctl(
        &["--ctrlers", &list, "snapshot", "save", "--ctrler", file_arg],
        Some((&ca, "admin")),
    );
    assert!(saved.status.success(), "{}", text(&saved));
    let status = kvctl(&["snapshot", "status", file_arg], None);
    assert!(status.status.success(), "{}", text(&status));
    let report = text(&status);
    assert!(report.contains("service     ctrler"), "{report}");
    // Configurations 0 (empty) and 1 (after the join) are both kept.
    assert!(report.contains("configurations 2"), "{report}");

    // The same bytes relabelled as a KV backup, with a valid checksum (a CRC is no signature): a KV
    // node loads the state before writing anything, and refuses it.
    let bytes = std::fs::read(&file).expect("read");
    let (mut header, range) = ds824::rsm::backup::decode(&bytes).expect("valid backup");
    header.service = "kv".into();
    header.cluster_id = "ds824/kv".into();
    let relabelled = root.path().join("relabelled.backup");
    std::fs::write(
        &relabelled,
        ds824::rsm::backup::encode(header.clone(), &bytes[range.clone()]),
    )
    .expect("write");
    let empty = tempfile::tempdir().expect("temp dir");
    let out = one_kvd("kv", empty.path(), &relabelled);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("does not decode"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(empty.path()).expect("dir").count(), 0);
    header.service = "ctrler".into();
    header.index = 0;
    std::fs::write(
        &relabelled,
        ds824::rsm::backup::encode(header, &bytes[range]),
    )
    .expect("write");
    let out = one_kvd("ctrler", empty.path(), &relabelled);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot be a committed state"),
        "{}",
        text(&out)
    );

    // Controllers restored from it hand out the same latest configuration.
    let restored = Replicas::start_temp_full(
        Role::Ctrler,
        3,
        8 << 20,
        Some(ca.clone()),
        None,
        &["--restore", file_arg],
    );
    let query = kvctl(
        &["--ctrlers", &restored.addrs.join(","), "ctrler", "query"],
        Some((&ca, "client")),
    );
    let before = kvctl(
        &["--ctrlers", &list, "ctrler", "query"],
        Some((&ca, "client")),
    );
    assert!(query.status.success(), "{}", text(&query));
    assert_eq!(text(&query), text(&before));
}
