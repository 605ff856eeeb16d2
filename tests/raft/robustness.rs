//! No panic is reachable from the network: random and extreme messages, from members and strangers,
//! stepped into cores in every role.

use bytes::Bytes;
use ds824::raft::{
    Config, Entry, EntryKind, Envelope, Message, RaftCore, ReadFailure, SnapshotMeta,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn number(rng: &mut ChaCha8Rng) -> u64 {
    match rng.random_range(0..6) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX - rng.random_range(0..3),
        _ => rng.random_range(0..20),
    }
}

fn random_message(rng: &mut ChaCha8Rng) -> Message {
    let term = number(rng);
    match rng.random_range(0..9) {
        0 => {
            let prev = number(rng);
            let count = rng.random_range(0..4);
            let entries = (0..count)
                .map(|k| Entry {
                    term: number(rng),
                    index: if rng.random_bool(0.7) {
                        prev.wrapping_add(1 + k)
                    } else {
                        number(rng)
                    },
                    kind: if rng.random_bool(0.5) {
                        EntryKind::Normal
                    } else {
                        EntryKind::Noop
                    },
                    data: Bytes::from_static(b"x"),
                })
                .collect();
            Message::AppendEntries {
                term,
                prev_log_index: prev,
                prev_log_term: number(rng),
                entries,
                leader_commit: number(rng),
                read_round: number(rng),
            }
        }
        1 => Message::AppendEntriesResponse {
            term,
            success: rng.random_bool(0.5),
            match_index: number(rng),
            rejected_index: number(rng),
            conflict_index: number(rng),
            conflict_term: rng.random_bool(0.5).then(|| number(rng)),
            read_round: number(rng),
        },
        2 => Message::RequestVote {
            term,
            last_log_index: number(rng),
            last_log_term: number(rng),
            pre_vote: rng.random_bool(0.5),
            leadership_transfer: rng.random_bool(0.2),
        },
        3 => Message::RequestVoteResponse {
            term,
            granted: rng.random_bool(0.5),
            pre_vote: rng.random_bool(0.5),
        },
        4 => Message::InstallSnapshot {
            term,
            meta: SnapshotMeta {
                index: number(rng),
                term: number(rng),
            },
            data: Bytes::from_static(b"snapshot"),
            membership: None,
        },
        5 => Message::InstallSnapshotResponse {
            term,
            match_index: number(rng),
        },
        6 => Message::ReadIndex {
            term,
            request: number(rng),
        },
        7 => Message::ReadIndexResponse {
            term,
            request: number(rng),
            index: match rng.random_range(0..10) {
                0 => Err(ReadFailure::LeaderBusy),
                1..=2 => Err(ReadFailure::LeadershipLost),
                _ => Ok(number(rng)),
            },
        },
        _ => Message::TimeoutNow { term },
    }
}

#[test]
fn random_and_extreme_messages_never_panic() {
    let seed = ds824::sim::seed::for_test("random_and_extreme_messages_never_panic");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for round in 0..300 {
        let mut config = Config::new(1, vec![1, 2, 3]);
        config.election_ticks = 5;
        config.heartbeat_ticks = 1;
        let mut core = RaftCore::new(config).expect("config");
        // Get into a random role first: ticks make it campaign, votes may make it lead.
        for _ in 0..rng.random_range(0..12) {
            core.tick();
        }
        if rng.random_bool(0.5) {
            for from in [2, 3] {
                let _ = core.step(Envelope {
                    from,
                    to: 1,
                    message: Message::RequestVoteResponse {
                        term: core.term()
                            + u64::from(core.role() == ds824::raft::Role::PreCandidate),
                        granted: true,
                        pre_vote: core.role() == ds824::raft::Role::PreCandidate,
                    },
                });
            }
        }
        for _ in 0..50 {
            let from = if rng.random_bool(0.9) {
                rng.random_range(2..=3)
            } else {
                number(&mut rng)
            };
            let to = if rng.random_bool(0.95) {
                1
            } else {
                number(&mut rng)
            };
            let _ = core.step(Envelope {
                from,
                to,
                message: random_message(&mut rng),
            });
            if rng.random_bool(0.1) {
                let _ = core.read_index_anywhere(rng.random());
            }
            if rng.random_bool(0.2) {
                let _ = core.propose(Bytes::from_static(b"p"));
            }
            if rng.random_bool(0.1) {
                let _ = core.read_index(round);
            }
            if rng.random_bool(0.2) {
                core.tick();
            }
            let _ = core.ready();
        }
    }
}

/// One message with the largest term a core accepts, from a member, must not leave the group unable to
/// elect: a node that adopted it would campaign in a term every peer refuses, for good (restarts too,
/// since the term is persisted).
#[test]
fn one_message_with_a_huge_term_does_not_brick_the_group() {
    use crate::common::*;
    for forged_term in [ds824::raft::MAX_TERM, ds824::raft::MAX_TERM - 1, u64::MAX] {
        let mut cfg = cluster(
            "one_message_with_a_huge_term_does_not_brick_the_group",
            3,
            true,
        );
        let leader = cfg.check_one_leader();
        let target = (leader + 1) % 3;
        let before = cfg.check_terms();
        let core = cfg.core_mut(target).expect("target runs");
        let _ = core.step(Envelope {
            from: leader as u64 + 1,
            to: target as u64 + 1,
            message: Message::AppendEntries {
                term: forged_term,
                prev_log_index: 0,
                prev_log_term: 0,
                entries: vec![],
                leader_commit: 0,
                read_round: 0,
            },
        });
        cfg.flush(target);
        cfg.sleep(10_000);
        cfg.check_one_leader();
        cfg.one(cmd(forged_term % 1000), 3, true);
        let after = cfg.check_terms();
        assert!(
            after < before + ds824::raft::MAX_TERM_STEP,
            "term {forged_term} was adopted: the group went from term {before} to {after}"
        );
        cfg.end("one_message_with_a_huge_term_does_not_brick_the_group");
    }
}
