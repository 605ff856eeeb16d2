//! Lease reads (issue #14, item 3): a leader answers reads without a round of messages while a majority
//! acknowledged it recently, and never once another node could have been elected. Three cores on a
//! hand-driven network, so the tests see exactly which messages a read costs.

use ds824::raft::{
    Config, ConfigError, Envelope, FailedRead, Message, RaftCore, ReadState, Ready, Role,
};

/// Three cores, a link switch per node, and the reads each answered (shared with the follower-read
/// tests).
pub struct Trio {
    pub cores: Vec<RaftCore>,
    pub connected: [bool; 3],
    pub answered: Vec<(usize, ReadState)>,
    /// Reads that failed, by node.
    pub failed: Vec<(usize, FailedRead)>,
    /// Messages the last `pump` delivered or dropped.
    pub sent: usize,
    /// Of those, follower-read messages (`ReadIndex` and its answer).
    pub read_index_messages: usize,
}

pub fn config(id: u64, lease_reads: bool) -> Config {
    let mut config = Config::new(id, vec![1, 2, 3]);
    config.election_ticks = 20;
    config.heartbeat_ticks = 2;
    config.lease_reads = lease_reads;
    config.seed = 7;
    config
}

impl Trio {
    pub fn new(lease_reads: bool) -> Self {
        Self::of(|id| config(id, lease_reads))
    }

    /// Three connected cores, node `id` configured by `config(id)`.
    pub fn of(config: impl Fn(u64) -> Config) -> Self {
        Trio {
            cores: (1..=3)
                .map(|id| RaftCore::new(config(id)).expect("config"))
                .collect(),
            connected: [true; 3],
            answered: Vec::new(),
            failed: Vec::new(),
            sent: 0,
            read_index_messages: 0,
        }
    }

    /// Hand out every `Ready` and deliver its messages between connected nodes, until quiet. A
    /// leader's write sent before its flush (`persist_after_send`) is reported flushed at once.
    pub fn pump(&mut self) {
        self.sent = 0;
        self.read_index_messages = 0;
        loop {
            let mut moved = false;
            for i in 0..3 {
                if !self.cores[i].has_ready() {
                    continue;
                }
                moved = true;
                let ready = self.cores[i].ready();
                if ready.persist_after_send {
                    report_flushed(&mut self.cores[i], &ready);
                }
                self.answered
                    .extend(ready.read_states.iter().map(|&r| (i, r)));
                self.failed
                    .extend(ready.failed_reads.iter().map(|&failed| (i, failed)));
                for envelope in ready.messages {
                    self.sent += 1;
                    if matches!(
                        envelope.message,
                        Message::ReadIndex { .. } | Message::ReadIndexResponse { .. }
                    ) {
                        self.read_index_messages += 1;
                    }
                    let to = envelope.to as usize - 1;
                    if self.connected[i] && self.connected[to] {
                        let _ = self.cores[to].step(envelope);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    pub fn tick_all(&mut self) {
        for core in &mut self.cores {
            core.tick();
        }
        self.pump();
    }

    pub fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| self.cores[i].role() == Role::Leader && self.connected[i])
    }

    /// Tick until a leader has committed its no-op and a heartbeat round came back.
    pub fn elect(&mut self) -> usize {
        for _ in 0..1000 {
            self.tick_all();
            if let Some(leader) = self.leader() {
                for _ in 0..4 {
                    self.tick_all();
                }
                return leader;
            }
        }
        panic!("no leader elected");
    }

    /// Hand `messages` to their addressees, whatever the link switches say.
    pub fn deliver(&mut self, messages: Vec<Envelope>) {
        for envelope in messages {
            let to = envelope.to as usize - 1;
            let _ = self.cores[to].step(envelope);
        }
    }

    /// Node `i`'s `Ready`s handled, nothing flushed late; returns what it sent.
    pub fn answers_of(&mut self, i: usize) -> Vec<Envelope> {
        let mut sent = Vec::new();
        while self.cores[i].has_ready() {
            sent.extend(self.cores[i].ready().messages);
        }
        sent
    }

    /// Ask node `i` for a read and hand out what that produces at once.
    fn read(&mut self, i: usize, id: u64) -> bool {
        self.answered.clear();
        if self.cores[i].read_index(id).is_err() {
            return false;
        }
        self.pump();
        self.answered.iter().any(|&(n, r)| n == i && r.id == id)
    }
}

/// What a driver reports once a `persist_after_send` write is flushed.
pub fn report_flushed(core: &mut RaftCore, ready: &Ready) {
    if let Some(last) = ready.log_write.as_ref().and_then(|w| w.entries.last()) {
        core.persisted(last.index, last.term);
    }
}

#[test]
fn a_leader_answers_from_its_lease_without_a_round_of_messages() {
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    // Cut the leader off: nothing it sends arrives, and the read is answered anyway, sending nothing.
    trio.connected[leader] = false;
    assert!(trio.read(leader, 1), "a lease read waits for a round");
    assert_eq!(trio.sent, 0, "a lease read sent messages");
    // Without leases the same read needs a round, which cannot complete while cut off.
    let mut plain = Trio::new(false);
    let leader = plain.elect();
    plain.connected[leader] = false;
    assert!(
        !plain.read(leader, 1),
        "a ReadIndex read answered without a round"
    );
    assert!(plain.sent > 0, "a ReadIndex read sent no heartbeat round");
}

#[test]
fn a_lease_ends_before_anyone_else_can_be_elected() {
    let mut trio = Trio::new(true);
    let old = trio.elect();
    let old_term = trio.cores[old].term();
    trio.connected[old] = false;
    let mut served_from_lease = 0;
    let mut new_leader_at = None;
    for t in 0..500 {
        trio.tick_all();
        let new_leader = (0..3).any(|i| {
            i != old && trio.cores[i].role() == Role::Leader && trio.cores[i].term() > old_term
        });
        if new_leader && new_leader_at.is_none() {
            new_leader_at = Some(t);
        }
        if trio.cores[old].role() == Role::Leader && trio.read(old, 1000 + t) {
            assert!(
                !new_leader,
                "the old leader answered from its lease at tick {t}, after another was elected"
            );
            served_from_lease += 1;
        }
        if new_leader && trio.cores[old].role() != Role::Leader {
            break;
        }
    }
    assert!(
        new_leader_at.is_some(),
        "the majority never elected a leader"
    );
    assert!(served_from_lease > 0, "the lease was never used");
    assert!(
        (served_from_lease as u64) <= config(1, true).lease_ticks(),
        "served {served_from_lease} ticks of reads from a lease of {}",
        config(1, true).lease_ticks()
    );
}

#[test]
fn a_restarted_node_refuses_votes_while_a_lease_it_granted_may_run() {
    // A node that just started cannot know whether it acknowledged a leader a moment ago: it refuses
    // to vote for an election timeout, as a follower in a lease does.
    let vote_request = Envelope {
        from: 3,
        to: 2,
        message: Message::RequestVote {
            term: 5,
            last_log_index: 0,
            last_log_term: 0,
            pre_vote: false,
            leadership_transfer: false,
        },
    };
    let granted = |core: &mut RaftCore| {
        let _ = core.step(vote_request.clone());
        core.ready().messages.iter().any(|m| {
            matches!(
                m.message,
                Message::RequestVoteResponse { granted: true, .. }
            )
        })
    };
    let mut fresh = RaftCore::new(config(2, true)).expect("config");
    assert!(
        !granted(&mut fresh),
        "a fresh node with leases voted at once"
    );
    for _ in 0..config(2, true).election_ticks {
        fresh.tick();
    }
    let _ = fresh.ready();
    assert!(granted(&mut fresh), "the vote is refused for good");
    // Without leases a fresh node votes at once, as before.
    let mut plain = RaftCore::new(config(2, false)).expect("config");
    assert!(granted(&mut plain));
}

#[test]
fn a_leadership_transfer_ends_the_lease() {
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    assert!(trio.read(leader, 1));
    let target = (leader + 1) % 3;
    trio.connected[target] = false; // the transfer cannot finish, the leader stays
    trio.cores[leader]
        .transfer_leadership(target as u64 + 1)
        .expect("leader");
    trio.pump();
    trio.connected[leader] = false;
    assert!(
        !trio.read(leader, 2),
        "a lease read during a transfer: the target may already lead"
    );
}

#[test]
fn lease_reads_need_check_quorum() {
    let mut config = config(1, true);
    config.check_quorum = false;
    assert_eq!(
        RaftCore::new(config).err().map(|e| e.to_string()),
        Some(ConfigError::LeaseWithoutCheckQuorum.to_string())
    );
}

#[test]
fn a_stale_message_from_a_higher_term_does_not_release_a_follower_from_its_promise() {
    // A follower acknowledged the leader's heartbeat (the leader's lease counts on it); then a
    // delayed response from a higher term moves it to that term, forgetting the leader. It must
    // still refuse to vote — in that term and the next — until an election timeout has passed.
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    let term = trio.cores[leader].term();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let (follower_id, other_id) = (follower as u64 + 1, other as u64 + 1);
    trio.connected[leader] = false;
    let _ = trio.cores[follower].step(Envelope {
        from: other_id,
        to: follower_id,
        message: Message::RequestVoteResponse {
            term: term + 1,
            granted: false,
            pre_vote: false,
        },
    });
    assert_eq!(trio.cores[follower].term(), term + 1);
    let _ = trio.cores[follower].ready();
    let last_log_index = 10_000; // beyond anything the follower holds: its log is no reason to refuse
    for (vote_term, pre_vote) in [(term + 1, false), (term + 2, true), (term + 2, false)] {
        let _ = trio.cores[follower].step(Envelope {
            from: other_id,
            to: follower_id,
            message: Message::RequestVote {
                term: vote_term,
                last_log_index,
                last_log_term: term,
                pre_vote,
                leadership_transfer: false,
            },
        });
        let granted = trio.cores[follower].ready().messages.iter().any(|m| {
            matches!(
                m.message,
                Message::RequestVoteResponse { granted: true, .. }
            )
        });
        assert!(
            !granted,
            "voted (term {vote_term}, pre-vote {pre_vote}) while the leader's lease may run"
        );
    }
}

/// Node `i`'s answer to a read if it gives it in the same `Ready` (from its lease), then everything
/// that read produced delivered as usual.
fn read_at_once(trio: &mut Trio, i: usize, id: u64) -> Option<u64> {
    trio.cores[i].read_index(id).ok()?;
    let ready = trio.cores[i].ready();
    let at_once = ready
        .read_states
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.index);
    for envelope in ready.messages {
        let to = envelope.to as usize - 1;
        if trio.connected[i] && trio.connected[to] {
            let _ = trio.cores[to].step(envelope);
        }
    }
    trio.pump();
    at_once
}

/// The grant a driver publishes so lease reads skip its loop (`lease_read_grant`) is what a lease read
/// asked of the core gets: the same index while the lease runs, for exactly the ticks it says are
/// left, and nothing after.
#[test]
fn the_published_grant_is_what_a_lease_read_gets_for_as_long_as_it_says() {
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    trio.connected[leader] = false;
    let (index, ticks_left) = trio.cores[leader]
        .lease_read_grant()
        .expect("a fresh leader holds a lease");
    assert!(ticks_left >= 1);
    for t in 0..ticks_left {
        let grant = trio.cores[leader].lease_read_grant();
        assert_eq!(grant, Some((index, ticks_left - t)), "at tick {t}");
        assert_eq!(read_at_once(&mut trio, leader, 100 + t), Some(index));
        trio.tick_all();
    }
    assert_eq!(trio.cores[leader].lease_read_grant(), None);
    assert_eq!(
        read_at_once(&mut trio, leader, 1),
        None,
        "the core answered from a lease the grant said had ended"
    );
}

/// A transfer (whose target campaigns past the followers' promise) and a configuration change (whose
/// new voters promised nothing) end the grant at once, before anything is sent.
#[test]
fn the_published_grant_ends_with_a_transfer_and_a_configuration_change() {
    let mut trio = Trio::new(true);
    let leader = trio.elect();
    assert!(trio.cores[leader].lease_read_grant().is_some());
    let target = (leader + 1) % 3;
    trio.cores[leader]
        .transfer_leadership(target as u64 + 1)
        .expect("transfer");
    assert_eq!(trio.cores[leader].lease_read_grant(), None);

    let mut trio = Trio::new(true);
    let leader = trio.elect();
    trio.tick_all();
    assert!(trio.cores[leader].lease_read_grant().is_some());
    trio.cores[leader]
        .propose_membership(
            ds824::raft::MembershipChange::AddLearner {
                id: 4,
                address: "http://127.0.0.1:1".into(),
            },
            |_| None,
        )
        .expect("configuration change");
    assert_eq!(trio.cores[leader].lease_read_grant(), None);
    // (Not delivered: the trio has no node 4.)
    trio.cores[leader].read_index(1).expect("still the leader");
    assert!(
        trio.cores[leader].ready().read_states.is_empty(),
        "the core answered from its lease after a configuration change"
    );
}

/// A leader cut off from its majority steps down on its own (CheckQuorum), which changes only its
/// role: that is work for the driver at once, so the service's leadership watcher sends its waiting
/// clients elsewhere now, not when an unrelated `Ready` (its first pre-vote, an election timeout
/// later) carries the new role.
#[test]
fn a_check_quorum_step_down_is_a_ready_of_its_own() {
    let mut trio = Trio::new(false);
    let leader = trio.elect();
    trio.connected[leader] = false;
    let mut ticks = 0;
    while trio.cores[leader].role() == Role::Leader {
        ticks += 1;
        assert!(ticks < 1000, "the cut-off leader never stepped down");
        trio.pump();
        trio.cores[leader].tick();
    }
    assert!(
        trio.cores[leader].has_ready(),
        "the step-down waits for an unrelated Ready"
    );
    assert_eq!(trio.cores[leader].ready().soft_state.role, Role::Follower);
}
