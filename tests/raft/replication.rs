//! 6.824 lab 2B: log replication.

use crate::common::*;
use bytes::Bytes;
use ds824::sim::cluster::OneTask;
use ds824::sim::{Actor, RaftCluster};
use rand::Rng;

#[test]
fn basic_agree() {
    let mut cfg = cluster("basic_agree", 3, true);
    for index in 1..4u64 {
        let (nd, _) = cfg.n_committed(index);
        assert_eq!(nd, 0, "some have committed before Start()");
        let xindex = cfg.one(cmd(index * 100), 3, false);
        assert_eq!(xindex, index, "got index {xindex} but expected {index}");
    }
    cfg.end("basic_agree");
}

#[test]
fn rpc_bytes() {
    let mut cfg = cluster("rpc_bytes", 3, true);
    cfg.one(cmd(99), 3, false);
    let bytes0 = cfg.bytes_total();
    let mut sent = 0u64;
    for index in 2..12u64 {
        let payload: Vec<u8> = (0..5000)
            .map(|_| cfg.rng.random_range(b'a'..=b'z'))
            .collect();
        let xindex = cfg.one(Bytes::from(payload), 3, false);
        assert_eq!(xindex, index, "got index {xindex} but expected {index}");
        sent += 5000;
    }
    let got = cfg.bytes_total() - bytes0;
    let expected = 3 * sent;
    assert!(
        got <= expected + 50_000,
        "too many RPC bytes; got {got}, expected {expected}"
    );
    cfg.end("rpc_bytes");
}

#[test]
fn fail_agree() {
    let mut cfg = cluster("fail_agree", 3, true);
    cfg.one(cmd(101), 3, false);
    // Disconnect one follower from the network.
    let leader = cfg.check_one_leader();
    cfg.disconnect((leader + 1) % 3);
    // The leader and remaining follower should be able to agree despite the disconnected follower.
    cfg.one(cmd(102), 2, false);
    cfg.one(cmd(103), 2, false);
    cfg.sleep(ELECTION_TIMEOUT_MS);
    cfg.one(cmd(104), 2, false);
    cfg.one(cmd(105), 2, false);
    // Re-connect: the full set of servers should preserve previous agreements and agree on new ones.
    cfg.connect((leader + 1) % 3);
    cfg.one(cmd(106), 3, true);
    cfg.sleep(ELECTION_TIMEOUT_MS);
    cfg.one(cmd(107), 3, true);
    cfg.end("fail_agree");
}

#[test]
fn fail_no_agree() {
    let mut cfg = cluster("fail_no_agree", 5, true);
    cfg.one(cmd(10), 5, false);
    // Three of five followers disconnect.
    let leader = cfg.check_one_leader();
    for k in 1..4 {
        cfg.disconnect((leader + k) % 5);
    }
    let (index, _) = cfg
        .start_command(leader, cmd(20))
        .unwrap_or_else(|| cfg.fail("leader rejected Start()"));
    assert_eq!(index, 2, "expected index 2, got {index}");
    cfg.sleep(2 * ELECTION_TIMEOUT_MS);
    let (n, _) = cfg.n_committed(index);
    assert_eq!(n, 0, "{n} committed but no majority");
    // Repair.
    for k in 1..4 {
        cfg.connect((leader + k) % 5);
    }
    // The disconnected majority may have chosen a leader from among their own ranks, forgetting index 2.
    let leader2 = cfg.check_one_leader();
    let (index2, _) = cfg
        .start_command(leader2, cmd(30))
        .unwrap_or_else(|| cfg.fail("leader2 rejected Start()"));
    assert!((2..=3).contains(&index2), "unexpected index {index2}");
    cfg.one(cmd(1000), 5, true);
    cfg.end("fail_no_agree");
}

#[test]
fn concurrent_starts() {
    let mut cfg = cluster("concurrent_starts", 3, true);
    let mut success = false;
    'tries: for attempt in 0..5 {
        if attempt > 0 {
            // Give the solution some time to settle.
            cfg.sleep(3000);
        }
        let leader = cfg.check_one_leader();
        let Some((_, term)) = cfg.start_command(leader, cmd(1)) else {
            continue; // leader moved on really quickly
        };
        // Five Starts at the same instant: the simulated equivalent of five goroutines.
        let mut indices = Vec::new();
        for i in 0..5u64 {
            if let Some((index, term1)) = cfg.start_command(leader, cmd(100 + i)) {
                if term1 == term {
                    indices.push(index);
                }
            }
        }
        for j in 0..3 {
            if let Some((t, _)) = cfg.state(j) {
                if t != term {
                    continue 'tries; // term changed: can't expect low RPC counts
                }
            }
        }
        let mut cmds = Vec::new();
        for index in indices {
            match cfg.wait(index, 3, Some(term)) {
                Some(c) => cmds.push(c),
                None => continue 'tries, // peers have moved on to later terms
            }
        }
        for i in 0..5u64 {
            assert!(cmds.contains(&cmd(100 + i)), "cmd {} missing", 100 + i);
        }
        success = true;
        break;
    }
    assert!(success, "term changed too often");
    cfg.end("concurrent_starts");
}

#[test]
fn rejoin() {
    let mut cfg = cluster("rejoin", 3, true);
    cfg.one(cmd(101), 3, true);
    // The leader network failure.
    let leader1 = cfg.check_one_leader();
    cfg.disconnect(leader1);
    // Make the old leader try to agree on some entries.
    cfg.start_command(leader1, cmd(102));
    cfg.start_command(leader1, cmd(103));
    cfg.start_command(leader1, cmd(104));
    // The new leader commits, also for index=2.
    cfg.one(cmd(103), 2, true);
    // New leader network failure.
    let leader2 = cfg.check_one_leader();
    cfg.disconnect(leader2);
    // The old leader connected again: its stale entries must be overwritten.
    cfg.connect(leader1);
    cfg.one(cmd(104), 2, true);
    // All together now.
    cfg.connect(leader2);
    cfg.one(cmd(105), 3, true);
    cfg.end("rejoin");
}

#[test]
fn backup() {
    let mut cfg = cluster("backup", 5, true);
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 5, true);
    // Put the leader and one follower in a partition.
    let leader1 = cfg.check_one_leader();
    for k in 2..5 {
        cfg.disconnect((leader1 + k) % 5);
    }
    // Submit lots of commands that won't commit.
    for _ in 0..50 {
        let c = rand_cmd(&mut cfg);
        cfg.start_command(leader1, c);
    }
    cfg.sleep(ELECTION_TIMEOUT_MS / 2);
    cfg.disconnect(leader1);
    cfg.disconnect((leader1 + 1) % 5);
    // Allow the other partition to recover.
    for k in 2..5 {
        cfg.connect((leader1 + k) % 5);
    }
    // Lots of successful commands to the new group.
    for _ in 0..50 {
        let c = rand_cmd(&mut cfg);
        cfg.one(c, 3, true);
    }
    // Now another partitioned leader and one follower.
    let leader2 = cfg.check_one_leader();
    let mut other = (leader1 + 2) % 5;
    if leader2 == other {
        other = (leader2 + 1) % 5;
    }
    cfg.disconnect(other);
    // Lots more commands that won't commit.
    for _ in 0..50 {
        let c = rand_cmd(&mut cfg);
        cfg.start_command(leader2, c);
    }
    cfg.sleep(ELECTION_TIMEOUT_MS / 2);
    // Bring the original leader back to life.
    for i in 0..5 {
        cfg.disconnect(i);
    }
    cfg.connect(leader1);
    cfg.connect((leader1 + 1) % 5);
    cfg.connect(other);
    // Lots of successful commands to the new group.
    for _ in 0..50 {
        let c = rand_cmd(&mut cfg);
        cfg.one(c, 3, true);
    }
    // Now everyone.
    for i in 0..5 {
        cfg.connect(i);
    }
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 5, true);
    cfg.end("backup");
}

#[test]
fn count() {
    let mut cfg = cluster("count", 3, true);
    let rpcs = |cfg: &RaftCluster| (0..3).map(|j| cfg.rpc_count(j)).sum::<u64>();
    cfg.check_one_leader();
    let total1 = rpcs(&cfg);
    assert!(
        (1..=30).contains(&total1),
        "too many or few RPCs ({total1}) to elect initial leader"
    );
    let mut success = false;
    let mut total2 = 0;
    'tries: for attempt in 0..5 {
        if attempt > 0 {
            cfg.sleep(3000);
        }
        let leader = cfg.check_one_leader();
        let total1 = rpcs(&cfg);
        let iters = 10u64;
        let Some((starti, term)) = cfg.start_command(leader, cmd(1)) else {
            continue;
        };
        let mut cmds = Vec::new();
        for i in 1..iters + 2 {
            let x = rand_cmd(&mut cfg);
            cmds.push(x.clone());
            let Some((index1, term1)) = cfg.start_command(leader, x) else {
                continue 'tries;
            };
            if term1 != term {
                continue 'tries;
            }
            assert_eq!(starti + i, index1, "Start() failed");
        }
        for i in 1..iters + 1 {
            match cfg.wait(starti + i, 3, Some(term)) {
                Some(c) => assert_eq!(
                    c,
                    cmds[(i - 1) as usize],
                    "wrong value committed for index {}",
                    starti + i
                ),
                None => continue 'tries,
            }
        }
        for j in 0..3 {
            if let Some((t, _)) = cfg.state(j) {
                if t != term {
                    continue 'tries;
                }
            }
        }
        total2 = rpcs(&cfg);
        assert!(
            total2 - total1 <= (iters + 1 + 3) * 3,
            "too many RPCs ({}) for {iters} entries",
            total2 - total1
        );
        success = true;
        break;
    }
    assert!(success, "term changed too often");
    cfg.sleep(ELECTION_TIMEOUT_MS);
    let total3 = rpcs(&cfg);
    assert!(
        total3 - total2 <= 3 * 20,
        "too many RPCs ({}) for 1 second of idleness",
        total3 - total2
    );
    cfg.end("count");
}

/// Runs several `one()` calls concurrently, as the Go tests do with goroutines.
pub fn one_concurrently(cfg: &mut RaftCluster, cmds: Vec<(Bytes, usize)>) {
    let mut tasks: Vec<OneTask> = cmds
        .into_iter()
        .map(|(c, expected)| OneTask::new(cfg, c, expected, true))
        .collect();
    let mut actors: Vec<&mut dyn Actor<RaftCluster>> = tasks
        .iter_mut()
        .map(|t| t as &mut dyn Actor<RaftCluster>)
        .collect();
    cfg.run_actors(&mut actors);
}
