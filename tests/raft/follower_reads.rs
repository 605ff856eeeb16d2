//! Follower reads (issue #14, item 3): a follower asks its leader for the read index and serves the
//! read itself. Three cores on the hand-driven network of the lease tests, so each test sees exactly
//! which messages a read costs and what becomes of it when the leader goes away. The randomized
//! schedules check every follower read point against what was applied before it (`follower_reads`
//! in `randomized.rs`).

use crate::lease::Trio;
use bytes::Bytes;
use ds824::raft::read_only::MAX_FORWARDED_REQUESTS;
use ds824::raft::{Envelope, FailedRead, Message, ReadFailure, Role};

fn follower_of(leader: usize) -> usize {
    (leader + 1) % 3
}

fn node(i: usize) -> u64 {
    i as u64 + 1
}

#[test]
fn reads_waiting_on_a_follower_cost_one_request_and_get_the_leaders_commit_index() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    for _ in 0..3 {
        trio.cores[leader]
            .propose(Bytes::from_static(b"w"))
            .expect("leader");
    }
    trio.pump();
    let commit = trio.cores[leader].commit_index();
    let follower = follower_of(leader);
    trio.answered.clear();
    for id in [1, 2, 3] {
        trio.cores[follower]
            .read_index_anywhere(id)
            .expect("a follower that knows its leader takes reads");
    }
    trio.pump();
    let mut answered: Vec<(usize, u64, u64)> = trio
        .answered
        .iter()
        .map(|&(i, r)| (i, r.id, r.index))
        .collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        vec![
            (follower, 1, commit),
            (follower, 2, commit),
            (follower, 3, commit)
        ]
    );
    assert_eq!(
        trio.read_index_messages, 2,
        "three reads should travel as one request and one answer"
    );
    assert!(trio.failed.is_empty());
}

#[test]
fn a_follower_that_knows_no_leader_refuses_at_once() {
    let mut trio = Trio::new(false);
    // Before any election nobody leads.
    assert!(trio.cores[0].read_index_anywhere(1).is_err());
}

#[test]
fn a_read_sent_to_a_leader_that_went_away_fails_and_is_never_answered() {
    let mut trio = Trio::new(false);
    let old = trio.elect();
    let follower = follower_of(old);
    trio.connected[old] = false;
    trio.cores[follower]
        .read_index_anywhere(7)
        .expect("it still believes in the old leader");
    trio.pump();
    trio.answered.clear();
    for _ in 0..200 {
        trio.tick_all();
        if trio.failed.iter().any(|&(i, f)| i == follower && f.id == 7) {
            break;
        }
    }
    assert!(
        trio.failed.iter().any(|&(i, f)| i == follower
            && f == FailedRead {
                id: 7,
                why: ReadFailure::LeadershipLost
            }),
        "the read waited forever for a leader that went away"
    );
    // Reconnected, the old leader steps down and the read stays failed.
    trio.connected[old] = true;
    for _ in 0..50 {
        trio.tick_all();
    }
    assert!(
        !trio
            .answered
            .iter()
            .any(|&(i, r)| i == follower && r.id == 7),
        "a failed read was answered later"
    );
}

#[test]
fn a_node_that_does_not_lead_refuses_a_forwarded_read() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    let follower = follower_of(leader);
    let other = follower_of(follower);
    let term = trio.cores[follower].term();
    trio.cores[follower]
        .step(Envelope {
            from: node(other),
            to: node(follower),
            message: Message::ReadIndex { term, request: 9 },
        })
        .expect("a well-formed message");
    let ready = trio.cores[follower].ready();
    assert!(ready.messages.iter().any(|m| m.to == node(other)
        && m.message
            == Message::ReadIndexResponse {
                term,
                request: 9,
                index: Err(ReadFailure::LeadershipLost)
            }));
}

#[test]
fn with_lease_reads_the_leader_answers_a_follower_without_a_round() {
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    let follower = follower_of(leader);
    trio.answered.clear();
    trio.cores[follower]
        .read_index_anywhere(1)
        .expect("follower");
    trio.pump();
    assert!(trio
        .answered
        .iter()
        .any(|&(i, r)| i == follower && r.id == 1));
    assert_eq!(trio.sent, 2, "a request and its answer, no heartbeat round");
}

#[test]
fn a_leader_queues_a_bounded_number_of_follower_requests() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    let follower = follower_of(leader);
    // Cut off, the leader can confirm no round, so every request stays queued.
    trio.connected[leader] = false;
    flood_with_requests(
        &mut trio,
        leader,
        follower,
        0..=MAX_FORWARDED_REQUESTS as u64,
    );
    assert_eq!(trio.cores[leader].role(), Role::Leader);
    let ready = trio.cores[leader].ready();
    let refused: Vec<u64> = ready
        .messages
        .iter()
        .filter_map(|m| match m.message {
            Message::ReadIndexResponse {
                request,
                index: Err(ReadFailure::LeaderBusy),
                ..
            } => Some(request),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![MAX_FORWARDED_REQUESTS as u64]);
}

/// The first attacker review's finding: a leader's answer to a request a follower sent before it
/// restarted can still be queued for it. It must not answer a read of the new incarnation, whose
/// request numbers start elsewhere (drivers give every start a new seed): its index predates writes
/// completed before the new read.
#[test]
fn an_answer_to_a_request_sent_before_a_restart_answers_no_read_after_it() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    let follower = follower_of(leader);
    let other = follower_of(follower);
    trio.cores[follower]
        .read_index_anywhere(1)
        .expect("follower");
    let request = trio.cores[follower]
        .ready()
        .messages
        .into_iter()
        .find(|m| matches!(m.message, Message::ReadIndex { .. }))
        .expect("a ReadIndex request");
    trio.cores[leader].step(request).expect("step");
    // Only the other follower hears the leader's round, so the answer to `follower` is held back.
    let mut held = Vec::new();
    for _ in 0..4 {
        let ready = trio.cores[leader].ready();
        for m in ready.messages {
            if m.to == node(other) {
                for reply in {
                    trio.cores[other].step(m).expect("step");
                    trio.cores[other].ready().messages
                } {
                    trio.cores[leader].step(reply).expect("step");
                }
            } else if matches!(m.message, Message::ReadIndexResponse { .. }) {
                held.push(m);
            }
        }
    }
    assert_eq!(held.len(), 1, "the leader answered the request once");
    // The follower restarts with a new seed, a write completes, and a read arrives there.
    let mut config = crate::lease::config(node(follower), false);
    config.seed = 8;
    trio.cores[follower] = ds824::raft::RaftCore::new(config).expect("config");
    trio.cores[leader]
        .propose(Bytes::from_static(b"w"))
        .expect("leader");
    trio.pump();
    let write = trio.cores[leader].commit_index();
    trio.answered.clear();
    trio.cores[follower]
        .read_index_anywhere(2)
        .expect("follower");
    let ready = trio.cores[follower].ready();
    assert!(ready
        .messages
        .iter()
        .any(|m| matches!(m.message, Message::ReadIndex { .. })));
    // The old answer arrives now.
    for m in held {
        trio.cores[follower].step(m).expect("step");
    }
    let ready = trio.cores[follower].ready();
    assert!(
        ready.read_states.iter().all(|r| r.index >= write),
        "read answered at {:?}, before the write at {write}",
        ready.read_states
    );
}

/// A follower whose request the leader refuses for having too many of its requests queued (an
/// earlier incarnation's, still unconfirmed: a follower keeps no more out itself) fails the reads it
/// carried as the leader being busy (the service answers RESOURCE_EXHAUSTED: back off), not as
/// leadership lost (WRONG_LEADER: the client would look for another leader that is not there).
#[test]
fn reads_a_busy_leader_refuses_fail_as_busy() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    let follower = follower_of(leader);
    // Cut off, the leader confirms no round: the requests of the follower's last incarnation stay
    // queued there, as many as it takes.
    trio.connected[leader] = false;
    flood_with_requests(
        &mut trio,
        leader,
        follower,
        0..MAX_FORWARDED_REQUESTS as u64,
    );
    let _ = trio.cores[leader].ready();
    trio.cores[follower]
        .read_index_anywhere(77)
        .expect("the follower knows its leader");
    // Only the read request and its answer travel.
    for (from, to) in [(follower, leader), (leader, follower)] {
        for envelope in trio.cores[from].ready().messages {
            let read_traffic = matches!(
                envelope.message,
                Message::ReadIndex { .. } | Message::ReadIndexResponse { .. }
            );
            if read_traffic && envelope.to == node(to) {
                trio.cores[to]
                    .step(envelope)
                    .expect("a well-formed message");
            }
        }
    }
    assert_eq!(
        trio.cores[follower].ready().failed_reads,
        vec![FailedRead {
            id: 77,
            why: ReadFailure::LeaderBusy
        }]
    );
}

/// Deliver read requests numbered `requests` from `follower` straight to `leader`, in its term.
fn flood_with_requests(
    trio: &mut Trio,
    leader: usize,
    follower: usize,
    requests: impl Iterator<Item = u64>,
) {
    let term = trio.cores[leader].term();
    for request in requests {
        trio.cores[leader]
            .step(Envelope {
                from: node(follower),
                to: node(leader),
                message: Message::ReadIndex { term, request },
            })
            .expect("a well-formed message");
    }
}
