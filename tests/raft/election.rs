//! 6.824 lab 2A: leader election.

use crate::common::*;

#[test]
fn initial_election() {
    let mut cfg = cluster("initial_election", 3, true);
    cfg.check_one_leader();
    cfg.sleep(50);
    let term1 = cfg.check_terms();
    assert!(term1 >= 1, "term is {term1}, but should be at least 1");
    // With no failures, nobody may start another election (the Go test only warns; PreVote and the
    // leader lease let us demand it).
    cfg.sleep(2 * ELECTION_TIMEOUT_MS);
    let term2 = cfg.check_terms();
    assert_eq!(
        term1, term2,
        "term changed even though there were no failures"
    );
    cfg.check_one_leader();
    cfg.end("initial_election");
}

#[test]
fn re_election() {
    let mut cfg = cluster("re_election", 3, true);
    let leader1 = cfg.check_one_leader();
    // If the leader disconnects, a new one should be elected.
    cfg.disconnect(leader1);
    cfg.check_one_leader();
    // If the old leader rejoins, that shouldn't disturb the new leader.
    cfg.connect(leader1);
    let leader2 = cfg.check_one_leader();
    // If there's no quorum, no new leader should be elected, and the lone server must not think it leads.
    cfg.disconnect(leader2);
    cfg.disconnect((leader2 + 1) % 3);
    cfg.sleep(2 * ELECTION_TIMEOUT_MS);
    cfg.check_no_leader();
    // If a quorum arises, it should elect a leader.
    cfg.connect((leader2 + 1) % 3);
    cfg.check_one_leader();
    // Re-join of the last node shouldn't prevent leader from existing.
    cfg.connect(leader2);
    cfg.check_one_leader();
    cfg.end("re_election");
}

#[test]
fn many_elections() {
    let mut cfg = cluster("many_elections", 7, true);
    cfg.check_one_leader();
    for _ in 1..10 {
        // Disconnect three random nodes (possibly the same one twice).
        let (i1, i2, i3) = (
            rand_server(&mut cfg),
            rand_server(&mut cfg),
            rand_server(&mut cfg),
        );
        cfg.disconnect(i1);
        cfg.disconnect(i2);
        cfg.disconnect(i3);
        // Either the current leader should still be alive, or the remaining four should elect a new one.
        cfg.check_one_leader();
        cfg.connect(i1);
        cfg.connect(i2);
        cfg.connect(i3);
    }
    cfg.check_one_leader();
    cfg.end("many_elections");
}
