//! 6.824 lab 2D: log compaction and InstallSnapshot.

use crate::common::*;
use rand::Rng;

/// 6.824's `MAXLOGSIZE`: the Raft state (hard state plus the log after the snapshot) must stay below it.
const MAX_LOG_SIZE: usize = 2000;
/// 6.824's `SnapShotInterval`.
const SNAPSHOT_INTERVAL: u64 = 10;

fn snapcommon(name: &str, disconnect: bool, reliable: bool, crash: bool) {
    let iters = 30;
    let mut cfg = snapshot_cluster(name, 3, reliable);
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 3, true);
    let mut leader1 = cfg.check_one_leader();
    for i in 0..iters {
        let (mut victim, mut sender) = ((leader1 + 1) % 3, leader1);
        if i % 3 == 1 {
            sender = (leader1 + 1) % 3;
            victim = leader1;
        }
        if disconnect {
            cfg.disconnect(victim);
            let c = rand_cmd(&mut cfg);
            cfg.one(c, 2, true);
        }
        if crash {
            cfg.crash(victim);
            let c = rand_cmd(&mut cfg);
            cfg.one(c, 2, true);
        }
        // Perhaps send enough to get a snapshot.
        let nn = SNAPSHOT_INTERVAL / 2 + cfg.rng.random_range(0..SNAPSHOT_INTERVAL);
        for _ in 0..nn {
            let c = rand_cmd(&mut cfg);
            cfg.start_command(sender, c);
        }
        // Let the appliers catch up with the Starts.
        let c = rand_cmd(&mut cfg);
        if !disconnect && !crash {
            // Make sure all followers have caught up, so that an InstallSnapshot RPC isn't required.
            cfg.one(c, 3, true);
        } else {
            cfg.one(c, 2, true);
        }
        let size = cfg.max_raft_state_size();
        assert!(size < MAX_LOG_SIZE, "log size too large: {size}");
        if disconnect {
            // Reconnect a follower, who may be behind and need to receive a snapshot to catch up.
            cfg.connect(victim);
            let c = rand_cmd(&mut cfg);
            cfg.one(c, 3, true);
            leader1 = cfg.check_one_leader();
        }
        if crash {
            cfg.start(victim);
            cfg.connect(victim);
            let c = rand_cmd(&mut cfg);
            cfg.one(c, 3, true);
            leader1 = cfg.check_one_leader();
        }
    }
    cfg.end(name);
}

#[test]
fn snapshot_basic() {
    snapcommon("snapshot_basic", false, true, false);
}

#[test]
fn snapshot_install() {
    snapcommon("snapshot_install", true, true, false);
}

#[test]
fn snapshot_install_unreliable() {
    snapcommon("snapshot_install_unreliable", true, false, false);
}

#[test]
fn snapshot_install_crash() {
    snapcommon("snapshot_install_crash", false, true, true);
}

#[test]
fn snapshot_install_unreliable_crash() {
    snapcommon("snapshot_install_unreliable_crash", false, false, true);
}

#[test]
fn snapshot_all_crash() {
    let mut cfg = snapshot_cluster("snapshot_all_crash", 3, true);
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 3, true);
    for _ in 0..5 {
        // Perhaps enough to get a snapshot.
        let nn = SNAPSHOT_INTERVAL / 2 + cfg.rng.random_range(0..SNAPSHOT_INTERVAL);
        for _ in 0..nn {
            let c = rand_cmd(&mut cfg);
            cfg.one(c, 3, true);
        }
        let c = rand_cmd(&mut cfg);
        let index1 = cfg.one(c, 3, true);
        // Crash all.
        for i in 0..3 {
            cfg.crash(i);
        }
        // Revive all.
        for i in 0..3 {
            cfg.start(i);
            cfg.connect(i);
        }
        let c = rand_cmd(&mut cfg);
        let index2 = cfg.one(c, 3, true);
        assert!(index2 > index1, "index decreased from {index1} to {index2}");
    }
    cfg.end("snapshot_all_crash");
}
