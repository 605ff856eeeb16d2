//! 6.824 lab 3B: the key/value service with log compaction.

use crate::common::*;

/// A server that missed many operations catches up through InstallSnapshot.
#[test]
fn snapshot_rpc() {
    let max = 1000;
    let mut cfg = cluster("snapshot_rpc", 3, true, Some(max));
    let mut ck = cfg.make_clerk();
    cfg.put(&mut ck, "a", "A");
    assert_eq!(cfg.get(&mut ck, "a"), "A");
    // A bunch of puts into the majority partition.
    cfg.partition(&[0, 1], &[2]);
    {
        let mut ck1 = cfg.make_clerk_to(&[0, 1]);
        for i in 0..50 {
            cfg.put(&mut ck1, &i.to_string(), &i.to_string());
        }
        cfg.sleep(ELECTION_TIMEOUT_MS);
        cfg.put(&mut ck1, "b", "B");
    }
    // Check that the majority's logs were trimmed.
    let size = cfg.max_raft_state_size();
    assert!(size <= 8 * max, "logs were not trimmed ({size} > 8*{max})");
    // Now make a group that requires participation of the lagging server, so it has to catch up via
    // InstallSnapshot.
    cfg.partition(&[0, 2], &[1]);
    {
        let mut ck1 = cfg.make_clerk_to(&[0, 2]);
        cfg.put(&mut ck1, "c", "C");
        cfg.put(&mut ck1, "d", "D");
        assert_eq!(cfg.get(&mut ck1, "a"), "A");
        assert_eq!(cfg.get(&mut ck1, "b"), "B");
        assert_eq!(cfg.get(&mut ck1, "1"), "1");
        assert_eq!(cfg.get(&mut ck1, "49"), "49");
    }
    // Now everybody.
    cfg.partition(&[0, 1, 2], &[]);
    cfg.put(&mut ck, "e", "E");
    assert_eq!(cfg.get(&mut ck, "c"), "C");
    assert_eq!(cfg.get(&mut ck, "e"), "E");
    assert_eq!(cfg.get(&mut ck, "1"), "1");
    check_linearizable(&cfg);
    cfg.end("snapshot_rpc");
}

/// The dedup table must be compact (per-client last sequence number), so the snapshot stays small.
#[test]
fn snapshot_size() {
    let max = 1000;
    let max_snapshot = 500;
    let mut cfg = cluster("snapshot_size", 3, true, Some(max));
    let mut ck = cfg.make_clerk();
    for _ in 0..200 {
        cfg.put(&mut ck, "x", "0");
        assert_eq!(cfg.get(&mut ck, "x"), "0");
        cfg.put(&mut ck, "x", "1");
        assert_eq!(cfg.get(&mut ck, "x"), "1");
    }
    let size = cfg.max_raft_state_size();
    assert!(size <= 8 * max, "logs were not trimmed ({size} > 8*{max})");
    let snapshot = cfg.max_snapshot_size();
    assert!(
        snapshot <= max_snapshot,
        "snapshot too large ({snapshot} > {max_snapshot})"
    );
    cfg.end("snapshot_size");
}

#[test]
fn speed() {
    speed_test("speed_3b", Some(1000));
}

#[test]
fn snapshot_recover() {
    generic_test(
        "snapshot_recover",
        1,
        5,
        false,
        true,
        false,
        Some(1000),
        false,
    );
}

#[test]
fn snapshot_recover_many_clients() {
    generic_test(
        "snapshot_recover_many_clients",
        20,
        5,
        false,
        true,
        false,
        Some(1000),
        false,
    );
}

#[test]
fn snapshot_unreliable() {
    generic_test(
        "snapshot_unreliable",
        5,
        5,
        true,
        false,
        false,
        Some(1000),
        false,
    );
}

#[test]
fn snapshot_unreliable_recover() {
    generic_test(
        "snapshot_unreliable_recover",
        5,
        5,
        true,
        true,
        false,
        Some(1000),
        false,
    );
}

#[test]
fn snapshot_unreliable_recover_concurrent_partition() {
    generic_test(
        "snapshot_unreliable_recover_concurrent_partition",
        5,
        5,
        true,
        true,
        true,
        Some(1000),
        false,
    );
}

#[test]
fn snapshot_unreliable_recover_concurrent_partition_linearizable() {
    generic_test(
        "snapshot_unreliable_recover_concurrent_partition_linearizable",
        15,
        7,
        true,
        true,
        true,
        Some(1000),
        true,
    );
}
