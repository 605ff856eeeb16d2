//! Randomized schedules: every seed builds a cluster with random options and runs random proposals,
//! reads, leadership transfers, crashes, restarts, disconnections, partitions, message loss and long
//! reordering, with the safety checker watching every step. Half the seeds also change the membership
//! at random (two spare servers; learners added, promoted, members removed and re-added). Then the
//! faults are healed and a fresh proposal must commit on every member.
//!
//! `RAFT_SIM_SEEDS` (default 200) seeds are run, starting at `RAFT_SIM_SEED_BASE` (default 0). A failing
//! seed is reported; `RAFT_SIM_SEEDS=1 RAFT_SIM_SEED_BASE=<seed>` replays it alone.

use crate::common::cmd;
use ds824::raft::{MembershipChange, NodeId};
use ds824::sim::{seed, ApplyMode, ClusterOptions, RaftCluster};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Runs one schedule; returns how many reads followers served (follower reads).
fn run_schedule(schedule_seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(schedule_seed);
    let voters = if rng.random_bool(0.5) { 3 } else { 5 };
    // Membership changes draw from a stream of their own, so the seeds without them keep their schedules.
    let mut membership_rng = ChaCha8Rng::seed_from_u64(schedule_seed ^ 0x03e3_be25);
    let changes_membership = membership_rng.random_bool(0.5);
    let servers = if changes_membership {
        voters + 2
    } else {
        voters
    };
    let mut options = ClusterOptions::new(servers, rng.random_bool(0.5), schedule_seed);
    options.voters = Some(voters);
    options.noop_on_election = rng.random_bool(0.5);
    options.pre_vote = rng.random_bool(0.75);
    options.check_quorum = rng.random_bool(0.75);
    // Drawn from a stream of its own, so every seed keeps the schedule it had before lease reads.
    options.lease_reads = ChaCha8Rng::seed_from_u64(schedule_seed ^ 0x1ea5e).random_bool(0.5);
    // Likewise: half the seeds ask for reads anywhere, so followers forward them to their leader,
    // and send most reads to any server.
    let mut follower_rng = ChaCha8Rng::seed_from_u64(schedule_seed ^ 0xf0110);
    options.follower_reads = follower_rng.random_bool(0.5);
    if rng.random_bool(0.5) {
        options.apply = ApplyMode::Snapshot {
            interval: rng.random_range(3..20),
        };
    }
    let options_follower_reads = options.follower_reads;
    let mut cfg = RaftCluster::new(options);
    let duration = rng.random_range(5_000..20_000);
    let mut next_value = schedule_seed << 20;
    while cfg.now() < duration {
        let mut i = rng.random_range(0..servers);
        let leaders: Vec<usize> = (0..servers)
            .filter(|&s| matches!(cfg.state(s), Some((_, true))))
            .collect();
        let action = rng.random_range(0..100);
        // Aim most client work at a node that believes it leads (possibly a deposed one).
        if action < 55 && !leaders.is_empty() && rng.random_bool(0.8) {
            i = leaders[rng.random_range(0..leaders.len())];
        }
        match action {
            0..=44 => {
                next_value += 1;
                for _ in 0..rng.random_range(1..4) {
                    cfg.start_command(i, cmd(next_value));
                }
            }
            45..=54 => {
                let target = if options_follower_reads && follower_rng.random_bool(0.7) {
                    follower_rng.random_range(0..servers)
                } else {
                    i
                };
                cfg.request_read(target);
            }
            55..=59 => {
                let target = rng.random_range(1..=servers as u64);
                if let Some(core) = cfg.core_mut(i) {
                    let _ = core.transfer_leadership(target);
                    cfg.flush(i);
                }
            }
            60..=66 => cfg.crash(i),
            67..=76 => {
                if !cfg.is_alive(i) {
                    cfg.start(i);
                }
                cfg.connect(i);
            }
            77..=82 => cfg.disconnect(i),
            83..=87 => {
                let labels: Vec<u32> = (0..servers).map(|_| rng.random_range(0..2)).collect();
                cfg.partition(&labels);
            }
            88..=92 => cfg.heal_partition(),
            93..=96 => {
                let reliable = rng.random_bool(0.5);
                cfg.set_reliable(reliable);
            }
            _ => {
                let on = rng.random_bool(0.3);
                cfg.set_long_reordering(on);
            }
        }
        if changes_membership && membership_rng.random_bool(0.08) && !leaders.is_empty() {
            let leader = leaders[membership_rng.random_range(0..leaders.len())];
            change_membership_at_random(&mut cfg, &mut membership_rng, leader, servers);
        }
        let pause = rng.random_range(1..100);
        cfg.sleep(pause);
    }
    // Heal everything; the cluster must then make progress on every node.
    cfg.set_reliable(true);
    cfg.set_long_reordering(false);
    cfg.heal_partition();
    for i in 0..servers {
        if !cfg.is_alive(i) {
            cfg.start(i);
        }
        cfg.connect(i);
    }
    // Delayed responses (up to 2.2 s) drain, then a fresh command commits on every member (a
    // removed or never-added server gets nothing new).
    cfg.sleep(2_500);
    let members = if changes_membership {
        // The leader's configuration is the one the command below commits under (a change it has
        // not committed yet commits with it).
        let leader = cfg.check_one_leader();
        cfg.membership(leader).map_or(servers, |m| m.ids().count())
    } else {
        servers
    };
    cfg.one(cmd(u64::MAX - schedule_seed), members, true);
    cfg.follower_reads_confirmed
}

/// Ask `leader` for a random change: add a server that is not a member as a learner, promote a
/// learner, or remove a member (keeping two voters, so a crash or two can still be survived).
/// Refusals (a change pending, a learner behind, a deposed leader) are part of the schedule.
fn change_membership_at_random(
    cfg: &mut RaftCluster,
    rng: &mut ChaCha8Rng,
    leader: usize,
    servers: usize,
) {
    let Some(membership) = cfg.membership(leader).cloned() else {
        return;
    };
    let outsiders: Vec<NodeId> = (1..=servers as NodeId)
        .filter(|&id| !membership.contains(id))
        .collect();
    let learners: Vec<NodeId> = membership.learners().collect();
    let members: Vec<NodeId> = membership.ids().collect();
    let change = match rng.random_range(0..3) {
        0 if !outsiders.is_empty() => MembershipChange::AddLearner {
            id: outsiders[rng.random_range(0..outsiders.len())],
            address: String::new(),
        },
        1 if !learners.is_empty() => MembershipChange::Promote {
            id: learners[rng.random_range(0..learners.len())],
        },
        2 => {
            let id = members[rng.random_range(0..members.len())];
            if membership.is_voter(id) && membership.voter_count() <= 2 {
                return;
            }
            MembershipChange::Remove { id }
        }
        _ => return,
    };
    let _ = cfg.change_membership(leader, change);
}

#[test]
fn randomized_schedules() {
    let seeds = seed::env_u64("RAFT_SIM_SEEDS", 200);
    let base = seed::env_u64("RAFT_SIM_SEED_BASE", 0);
    let mut follower_reads = 0;
    for schedule_seed in base..base + seeds {
        match std::panic::catch_unwind(|| run_schedule(schedule_seed)) {
            Ok(served) => follower_reads += served,
            Err(_) => panic!(
                "schedule {schedule_seed} failed; replay it with RAFT_SIM_SEEDS=1 RAFT_SIM_SEED_BASE={schedule_seed}"
            ),
        }
    }
    // The checker verified every read point; make sure followers' reads were among them.
    if seeds >= 20 {
        assert!(
            follower_reads > 0,
            "no schedule had a follower serve a read: the follower-read path went untested"
        );
    }
    println!(
        "randomized_schedules: {seeds} schedules from seed {base} passed ({follower_reads} reads served by followers)"
    );
}
