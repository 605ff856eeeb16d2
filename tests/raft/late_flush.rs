//! A leader's flush that completes after its entries went out (`Ready::persist_after_send`, thesis
//! §10.2.1): three cores on a hand-driven network, so each test decides which messages arrive and
//! which of the leader's writes are flushed.

use super::lease::Trio;
use bytes::Bytes;
use ds824::raft::{Config, Envelope, Index, RaftCore};

/// The lease tests' configuration (without lease reads), a leader's writes sent before their flush.
fn config(id: u64) -> Config {
    let mut config = super::lease::config(id, false);
    config.persist_after_send = true;
    config
}

/// A proposal's `Ready` on the leader: written, sent, not flushed. Returns its messages and index.
fn propose_unflushed(core: &mut RaftCore, data: &'static [u8]) -> (Vec<Envelope>, Index) {
    let (index, _) = core.propose(Bytes::from_static(data)).expect("leader");
    let ready = core.ready();
    assert!(ready.persist_after_send, "a leader's write goes out first");
    (ready.messages, index)
}

fn to(node: usize, messages: &[Envelope]) -> Vec<Envelope> {
    messages
        .iter()
        .filter(|e| e.to as usize == node + 1)
        .cloned()
        .collect()
}

/// A `Ready` that needs no flush (only a higher commit index) says nothing of the leader's earlier
/// writes: counting them durable there let one follower's acknowledgement and the leader's
/// unflushed copy commit an entry stored durably on one node only.
#[test]
fn a_commit_index_alone_does_not_make_the_leaders_unflushed_writes_count() {
    let mut trio = Trio::of(config);
    let leader = trio.elect();
    assert!(
        trio.cores[leader].commit_index() > 0,
        "the leader's no-op committed"
    );
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (a, a_index) = propose_unflushed(&mut trio.cores[leader], b"a");
    let (b, b_index) = propose_unflushed(&mut trio.cores[leader], b"b");
    // Both followers store and acknowledge `a`: it commits without the leader's copy.
    for &f in &followers {
        trio.deliver(to(f, &a));
        let acks = trio.answers_of(f);
        trio.deliver(acks);
    }
    assert_eq!(trio.cores[leader].commit_index(), a_index);
    let commit = trio.cores[leader].ready();
    assert!(commit.commit_only, "{commit:?}");
    // One follower stores `b`; the leader's copy of `b` was never flushed.
    trio.deliver(to(followers[0], &b));
    let acks = trio.answers_of(followers[0]);
    trio.deliver(acks);
    assert_eq!(
        trio.cores[leader].commit_index(),
        a_index,
        "b committed on one durable copy"
    );
    // Once the leader's flush is reported, its copy counts.
    let term = trio.cores[leader].term();
    trio.cores[leader].persisted(b_index, term);
    assert_eq!(trio.cores[leader].commit_index(), b_index);
}
