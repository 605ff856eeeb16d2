//! Follower reads (`kvd --follower-reads`): followers answer Gets at the read index their leader
//! confirms. The 6.824 scenarios again, with every Get sent to a random server first; the histories
//! must stay linearizable, and followers must have served some of the reads.

use crate::common::*;
use crate::part_a::one_partition_with;

/// A follower cut off with a deposed leader must not answer a Get, and the majority's followers
/// must answer with what the majority wrote.
#[test]
fn a_follower_in_the_minority_serves_no_read() {
    one_partition_with("follower_reads_one_partition", true);
}

#[test]
fn concurrent_clients_read_from_followers_linearizably() {
    let served = generic_test_with(
        "follower_reads_concurrent",
        5,
        5,
        false,
        false,
        false,
        None,
        false,
        true,
    );
    assert!(served > 0, "no Get was served by a follower");
}

#[test]
fn follower_reads_survive_partitions_crashes_and_loss() {
    let served = generic_test_with(
        "follower_reads_persist_partition_unreliable_linearizable",
        15,
        7,
        true,
        true,
        true,
        None,
        true,
        true,
    );
    assert!(served > 0, "no Get was served by a follower");
}

/// Snapshots move followers forward by InstallSnapshot, under which a read waits for its index.
#[test]
fn follower_reads_with_snapshots_partitions_and_crashes() {
    let served = generic_test_with(
        "follower_reads_snapshot_unreliable_recover_partition",
        5,
        5,
        true,
        true,
        true,
        Some(1000),
        false,
        true,
    );
    assert!(served > 0, "no Get was served by a follower");
}
