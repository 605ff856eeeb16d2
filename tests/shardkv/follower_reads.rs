//! Follower reads in a sharded deployment: each group's followers answer Gets at the read index
//! their leader confirms, while shards move between groups. Two 4B scenarios again with every Get
//! sent to a random server of its group first: the values read must be the ones written, the history
//! linearizable, and followers must have served some of the reads.

use crate::scenarios::{concurrent3_with, unreliable3_with};

#[test]
fn follower_reads_while_groups_restart_and_shards_move() {
    let served = concurrent3_with("follower_reads_concurrent3", true);
    assert!(served > 0, "no Get was served by a follower");
}

#[test]
fn follower_reads_on_a_lossy_network_stay_linearizable() {
    let served = unreliable3_with("follower_reads_unreliable3", true);
    assert!(served > 0, "no Get was served by a follower");
}
