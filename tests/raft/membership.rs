//! Membership changes (issue #15, item 1) on the simulator: learners, promotion, removal, one voter at
//! a time, under load and faults. Besides each test's own assertions, the cluster's checker watches
//! every step: applied entries agree everywhere, reads are never stale, no two leaders share a term,
//! and two configurations committed one after the other differ by at most one voter.

use crate::common::{cmd, rand_cmd};
use ds824::raft::{Index, MembershipChange, MembershipError, NodeId};
use ds824::sim::{seed, ClusterOptions, RaftCluster};

/// `servers` servers of which the first `voters` form the group; the rest wait to be added.
fn cluster(name: &str, servers: usize, voters: usize, reliable: bool) -> RaftCluster {
    let mut options = ClusterOptions::new(servers, reliable, seed::for_test(name));
    options.voters = Some(voters);
    // As the daemons run: a new leader commits a no-op, so it may change the configuration at once.
    options.noop_on_election = true;
    RaftCluster::new(options)
}

fn node(server: usize) -> NodeId {
    server as NodeId + 1
}

fn add(server: usize) -> MembershipChange {
    MembershipChange::AddLearner {
        id: node(server),
        address: String::new(),
    }
}

/// Make `change` through whoever leads, retrying while the cluster is busy (an uncommitted change,
/// a leader that has not committed in its term, a learner still catching up, lost messages), until
/// the change is committed. Returns the index of its entry.
fn change(cfg: &mut RaftCluster, change: MembershipChange) -> Index {
    let started = cfg.now();
    while cfg.now() - started < 30_000 {
        let leader = cfg.check_one_leader();
        match cfg.change_membership(leader, change.clone()) {
            Ok((index, term)) => {
                for _ in 0..100 {
                    cfg.sleep(50);
                    let Some(core) = cfg.core(leader) else { break };
                    if core.commit_index() >= index {
                        let log_term = core.log().term(index);
                        if log_term == Some(term) || log_term.is_none() {
                            return index;
                        }
                    }
                    if core.term() != term {
                        break;
                    }
                }
            }
            // An earlier attempt whose answer we did not wait for went through after all.
            Err(MembershipError::AlreadyMember(_))
            | Err(MembershipError::AlreadyVoter(_))
            | Err(MembershipError::UnknownMember(_))
                if cfg.committed_membership() == cfg.membership(leader).expect("running") =>
            {
                return 0;
            }
            Err(_) => cfg.sleep(100),
        }
    }
    cfg.fail(format!("{change} did not commit within 30 s"))
}

/// Let the leader's replication reach `server` until it holds everything the leader holds.
fn wait_caught_up(cfg: &mut RaftCluster, server: usize) {
    for _ in 0..200 {
        let leader = cfg.check_one_leader();
        let last = cfg.core(leader).map_or(0, |c| c.log().last_index());
        if cfg
            .core(server)
            .is_some_and(|c| c.log().last_index() >= last)
        {
            return;
        }
        cfg.sleep(50);
    }
    cfg.fail(format!("server {server} never caught up"));
}

/// Commit a few commands through whoever leads, and confirm a read point on the leader.
fn load(cfg: &mut RaftCluster, commands: usize, expected: usize) {
    for _ in 0..commands {
        let command = rand_cmd(cfg);
        cfg.one(command, expected, true);
    }
    let leader = cfg.check_one_leader();
    cfg.request_read(leader);
}

#[test]
fn every_member_of_three_is_replaced_one_by_one_under_load_and_faults() {
    let mut cfg = cluster("membership_replace_all", 6, 3, false);
    load(&mut cfg, 5, 3);
    for old in 0..3 {
        let new = old + 3;
        change(&mut cfg, add(new));
        load(&mut cfg, 3, 3);
        wait_caught_up(&mut cfg, new);
        change(&mut cfg, MembershipChange::Promote { id: node(new) });
        load(&mut cfg, 3, 3);
        change(&mut cfg, MembershipChange::Remove { id: node(old) });
        // The removed server is stopped for good, as an operator would.
        cfg.crash(old);
        load(&mut cfg, 3, 3);
    }
    let membership = cfg.committed_membership().clone();
    assert_eq!(membership.voters().collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(membership.learners().count(), 0);
    // The new group works on its own, reliable or not, and every member has everything.
    cfg.set_reliable(true);
    let index = cfg.one(cmd(77), 3, true);
    for server in 3..6 {
        assert!(cfg.applied_at(server, index).is_some(), "server {server}");
    }
    cfg.end("every_member_of_three_is_replaced_one_by_one_under_load_and_faults");
}

#[test]
fn a_removed_leader_steps_down_once_its_removal_commits_and_the_rest_carry_on() {
    let mut cfg = cluster("membership_remove_leader", 3, 3, true);
    load(&mut cfg, 3, 3);
    let leader = cfg.check_one_leader();
    let index = change(&mut cfg, MembershipChange::Remove { id: node(leader) });
    assert!(index > 0);
    // It led until the change committed (it proposed it and saw it commit), then stepped down.
    let core = cfg.core(leader).expect("still running");
    assert!(!core.is_leader(), "a removed leader stays leader");
    assert!(!core.is_voter());
    let next = cfg.check_one_leader();
    assert_ne!(next, leader);
    // It never campaigns again, however long it waits, and the others do not hear it.
    let term = cfg.core(next).expect("running").term();
    cfg.sleep(5_000);
    assert_eq!(
        cfg.core(next).expect("running").term(),
        term,
        "the removed node disrupted the group"
    );
    assert!(!cfg.core(leader).expect("running").is_leader());
    load(&mut cfg, 3, 2);
    cfg.end("a_removed_leader_steps_down_once_its_removal_commits_and_the_rest_carry_on");
}

#[test]
fn a_member_added_during_a_partition_joins_the_majority_and_the_minority_learns_of_it() {
    let mut cfg = cluster("membership_partition_add", 4, 3, true);
    load(&mut cfg, 3, 3);
    let leader = cfg.check_one_leader();
    let cut = (leader + 1) % 3;
    // The cut-off follower on one side; the leader, the third voter and the newcomer on the other.
    let labels: Vec<u32> = (0..4).map(|s| u32::from(s == cut)).collect();
    cfg.partition(&labels);
    change(&mut cfg, add(3));
    load(&mut cfg, 5, 3);
    wait_caught_up(&mut cfg, 3);
    change(&mut cfg, MembershipChange::Promote { id: 4 });
    load(&mut cfg, 3, 3);
    assert_eq!(
        cfg.membership(cut).expect("running").voters().count(),
        3,
        "the cut-off follower cannot know yet"
    );
    cfg.heal_partition();
    let index = cfg.one(cmd(99), 4, true);
    assert!(cfg.applied_at(cut, index).is_some());
    assert_eq!(
        cfg.membership(cut)
            .expect("running")
            .voters()
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    cfg.end("a_member_added_during_a_partition_joins_the_majority_and_the_minority_learns_of_it");
}

#[test]
fn learners_never_count_toward_a_commit_and_never_lead() {
    let mut cfg = cluster("membership_learners_do_not_count", 5, 3, true);
    load(&mut cfg, 2, 3);
    change(&mut cfg, add(3));
    change(&mut cfg, add(4));
    load(&mut cfg, 2, 5);
    let leader = cfg.check_one_leader();
    // Leave the leader with its two learners only: 3 of 5 nodes, but 1 of 3 voters.
    for server in 0..3 {
        if server != leader {
            cfg.disconnect(server);
        }
    }
    let before = cfg.core(leader).expect("running").commit_index();
    let (index, _) = cfg
        .start_command(leader, cmd(4242))
        .expect("the leader accepts the command");
    cfg.sleep(600);
    let learners_have_it = [3, 4]
        .iter()
        .all(|&s| cfg.core(s).is_some_and(|c| c.log().last_index() >= index));
    assert!(learners_have_it, "the learners should hold the entry");
    assert_eq!(
        cfg.core(leader).expect("running").commit_index(),
        before,
        "the leader committed with the learners' copies alone"
    );
    assert_eq!(
        cfg.n_committed(index).0,
        0,
        "an entry without a voter majority was applied"
    );
    // With the leader gone too, the learners have the longest logs but never campaign.
    cfg.disconnect(leader);
    let terms: Vec<_> = [3, 4].iter().map(|&s| cfg.state(s)).collect();
    cfg.sleep(5_000);
    assert_eq!(
        terms,
        [3, 4].iter().map(|&s| cfg.state(s)).collect::<Vec<_>>()
    );
    // The voters come back and carry on, learners included.
    for server in 0..3 {
        cfg.connect(server);
    }
    load(&mut cfg, 2, 5);
    cfg.end("learners_never_count_toward_a_commit_and_never_lead");
}

#[test]
fn a_learner_is_promoted_only_once_it_caught_up() {
    let mut cfg = cluster("membership_promote_caught_up", 4, 3, true);
    cfg.disconnect(3);
    load(&mut cfg, 300, 3);
    change(&mut cfg, add(3));
    let leader = cfg.check_one_leader();
    match cfg.change_membership(leader, MembershipChange::Promote { id: 4 }) {
        Err(MembershipError::LearnerBehind {
            id: 4,
            matched,
            last,
        }) => assert!(matched < last),
        other => panic!("promoting a learner that holds nothing: {other:?}"),
    }
    cfg.connect(3);
    wait_caught_up(&mut cfg, 3);
    change(&mut cfg, MembershipChange::Promote { id: 4 });
    assert!(cfg.committed_membership().is_voter(4));
    cfg.end("a_learner_is_promoted_only_once_it_caught_up");
}

#[test]
fn one_change_at_a_time_and_none_before_the_leader_committed_in_its_term() {
    // Without an election no-op, a new leader has nothing of its term committed.
    let mut options = ClusterOptions::new(5, true, seed::for_test("membership_one_at_a_time"));
    options.voters = Some(3);
    let mut cfg = RaftCluster::new(options);
    let leader = cfg.check_one_leader();
    assert_eq!(
        cfg.change_membership(leader, add(3)),
        Err(MembershipError::LeaderNotReady)
    );
    cfg.one(cmd(1), 3, true);
    let leader = cfg.check_one_leader();
    // With both followers cut off, the first change cannot commit, so a second must wait.
    for server in 0..3 {
        if server != leader {
            cfg.disconnect(server);
        }
    }
    let (index, _) = cfg.change_membership(leader, add(3)).expect("first change");
    assert_eq!(
        cfg.change_membership(leader, add(4)),
        Err(MembershipError::ChangePending { index })
    );
    for server in 0..3 {
        cfg.connect(server);
    }
    change(&mut cfg, add(4));
    assert_eq!(cfg.committed_membership().learners().count(), 2);
    cfg.end("one_change_at_a_time_and_none_before_the_leader_committed_in_its_term");
}

#[test]
fn leadership_moves_to_a_lagging_follower_only_after_it_caught_up() {
    let mut cfg = cluster("membership_transfer_lagging", 3, 3, true);
    load(&mut cfg, 2, 3);
    let leader = cfg.check_one_leader();
    let laggard = (leader + 1) % 3;
    cfg.disconnect(laggard);
    load(&mut cfg, 50, 2);
    cfg.connect(laggard);
    let last = cfg.core(leader).expect("running").log().last_index();
    cfg.core_mut(leader)
        .expect("running")
        .transfer_leadership(node(laggard))
        .expect("leader");
    cfg.flush(leader);
    cfg.sleep(1_000);
    let now_leading = cfg.check_one_leader();
    assert_eq!(
        now_leading, laggard,
        "the transfer did not reach the lagging follower"
    );
    let core = cfg.core(laggard).expect("running");
    assert!(
        core.log().last_index() > last,
        "the new leader lacks the old leader's entries"
    );
    load(&mut cfg, 2, 3);
    cfg.end("leadership_moves_to_a_lagging_follower_only_after_it_caught_up");
}

/// One core, fed messages by hand: what it answers to whom.
mod single_core {
    use ds824::raft::{Config, Envelope, Message, RaftCore};

    fn vote_request(from: u64, term: u64) -> Envelope {
        Envelope {
            from,
            to: 4,
            message: Message::RequestVote {
                term,
                last_log_index: 10,
                last_log_term: 1,
                pre_vote: false,
                leadership_transfer: false,
            },
        }
    }

    fn granted(core: &mut RaftCore) -> Option<bool> {
        core.ready()
            .messages
            .into_iter()
            .find_map(|e| match e.message {
                Message::RequestVoteResponse { granted, .. } => Some(granted),
                _ => None,
            })
    }

    #[test]
    fn a_node_joining_with_an_empty_log_votes_for_nobody() {
        // The group may still count node 4 as the voter it was before its disk died.
        let mut config = Config::new(4, vec![1, 2, 3, 4]);
        config.no_vote_until_replicated = true;
        let mut core = RaftCore::new(config).expect("config");
        core.step(vote_request(2, 5)).expect("step");
        assert_eq!(granted(&mut core), Some(false));
        // Without the flag the same empty log grants the vote: that is the danger.
        let mut core = RaftCore::new(Config::new(4, vec![1, 2, 3, 4])).expect("config");
        core.step(vote_request(2, 5)).expect("step");
        assert_eq!(granted(&mut core), Some(true));
    }

    #[test]
    fn only_the_leader_of_our_term_can_make_us_campaign() {
        let mut core = RaftCore::new(Config::new(4, vec![1, 2, 3, 4])).expect("config");
        // A learner, a removed node or a stale leader sends TimeoutNow: ignored.
        for from in [2, 9] {
            core.step(Envelope {
                from,
                to: 4,
                message: Message::TimeoutNow { term: 0 },
            })
            .expect("step");
            assert_eq!(core.term(), 0, "TimeoutNow from {from} started an election");
        }
    }
}
