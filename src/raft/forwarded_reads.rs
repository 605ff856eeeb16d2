//! A follower's reads (follower reads, thesis §6.4.1): the follower asks the leader for a read
//! index, the leader answers as for a read of its own — after a quorum confirmed it still leads after
//! the question arrived, or at once within its lease — and the follower serves the read itself once
//! it applied that index. The answer is the leader's commit index when the question arrived (or, if
//! it had not yet committed an entry of its term, its first such commit), so the read sees every
//! write that completed before it began, wherever it is served.
//!
//! The reads that reach a follower between two driver wake-ups travel as one request. A request is
//! bound to the leader and term it was sent under: when either changes, or no answer came within an
//! election timeout, its reads fail and the service tells the client to retry, as it does when a
//! leader loses a read.

use super::types::{NodeId, Term};
use std::collections::BTreeMap;

/// Requests a follower keeps out at once; reads beyond wait for an answer, or an expiry, to free a
/// slot. With one request per driver wake-up this is reached only when the leader stops answering.
pub const MAX_REQUESTS_OUT: usize = 1024;

/// A request out to the leader and the reads it carries.
#[derive(Clone, Debug)]
struct Request {
    reads: Vec<u64>,
    sent_at: u64,
}

/// The follower side of follower reads.
#[derive(Clone, Debug, Default)]
pub struct ForwardedReads {
    /// Reads not yet sent: they go in the next request.
    unsent: Vec<u64>,
    /// Requests out, by number (numbers grow, so the oldest comes first).
    out: BTreeMap<u64, Request>,
    next_request: u64,
    /// The leader and term every request out (and every unsent read) was meant for.
    bound_to: Option<(NodeId, Term)>,
}

impl ForwardedReads {
    /// An empty set whose requests are numbered from `first` on. Give each incarnation of a node a
    /// random start: a leader's answer to a request sent before a restart may still be queued for the
    /// restarted node, and must not match a request of the new incarnation (its index could be older
    /// than writes completed before the new request's reads).
    pub fn numbered_from(first: u64) -> Self {
        ForwardedReads {
            next_request: first,
            ..Default::default()
        }
    }

    /// Queue read `id` for the leader `leader` of `term`; reads queued for another leader or term
    /// fail (returned), as their answers would never come.
    pub fn queue(&mut self, id: u64, leader: NodeId, term: Term) -> Vec<u64> {
        let failed = self.rebind(Some((leader, term)));
        self.unsent.push(id);
        failed
    }

    /// The leader or term changed (`None`: no leader known): reads meant for the old one fail.
    pub fn rebind(&mut self, to: Option<(NodeId, Term)>) -> Vec<u64> {
        if self.bound_to == to || self.is_empty() {
            self.bound_to = to;
            return Vec::new();
        }
        self.bound_to = to;
        self.drain()
    }

    /// The request to send now at tick `now`, if reads wait and a slot is free: (leader, number).
    pub fn take_request(&mut self, now: u64) -> Option<(NodeId, u64)> {
        let (leader, _) = self.bound_to?;
        if self.unsent.is_empty() || self.out.len() >= MAX_REQUESTS_OUT {
            return None;
        }
        self.next_request = self.next_request.wrapping_add(1);
        let request = self.next_request;
        let reads = std::mem::take(&mut self.unsent);
        self.out.insert(
            request,
            Request {
                reads,
                sent_at: now,
            },
        );
        Some((leader, request))
    }

    /// Whether [`ForwardedReads::rebind`] to `to` would fail reads.
    pub fn would_fail(&self, to: Option<(NodeId, Term)>) -> bool {
        self.bound_to != to && !self.is_empty()
    }

    /// Whether reads wait to be sent.
    pub fn request_needed(&self) -> bool {
        !self.unsent.is_empty() && self.out.len() < MAX_REQUESTS_OUT && self.bound_to.is_some()
    }

    /// `from` answered request `request`: the reads it carried, if it was out to `from`.
    pub fn answer(&mut self, from: NodeId, request: u64) -> Vec<u64> {
        if self.bound_to.map(|(leader, _)| leader) != Some(from) {
            return Vec::new();
        }
        self.out.remove(&request).map_or_else(Vec::new, |r| r.reads)
    }

    /// Requests sent before tick `before` get no answer any more: their reads fail.
    pub fn expire(&mut self, before: u64) -> Vec<u64> {
        let mut failed = Vec::new();
        while let Some(entry) = self.out.first_entry() {
            if entry.get().sent_at >= before {
                break;
            }
            failed.extend(entry.remove().reads);
        }
        failed
    }

    /// Every read, sent or not, fails.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut failed: Vec<u64> = std::mem::take(&mut self.out)
            .into_values()
            .flat_map(|r| r.reads)
            .collect();
        failed.append(&mut self.unsent);
        failed
    }

    /// Whether no read waits.
    pub fn is_empty(&self) -> bool {
        self.unsent.is_empty() && self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_between_two_wake_ups_travel_as_one_request() {
        let mut f = ForwardedReads::default();
        assert!(f.queue(1, 2, 5).is_empty());
        assert!(f.queue(2, 2, 5).is_empty());
        assert!(f.request_needed());
        let (leader, request) = f.take_request(0).expect("a request");
        assert_eq!(leader, 2);
        assert!(!f.request_needed());
        assert_eq!(f.take_request(0), None);
        assert_eq!(f.answer(2, request), vec![1, 2]);
        assert!(f.is_empty());
    }

    #[test]
    fn only_the_node_asked_answers() {
        let mut f = ForwardedReads::default();
        f.queue(1, 2, 5);
        let (_, request) = f.take_request(0).expect("a request");
        assert!(f.answer(3, request).is_empty(), "node 3 was not asked");
        assert!(f.answer(2, request + 1).is_empty(), "no such request");
        assert_eq!(f.answer(2, request), vec![1]);
        assert!(f.answer(2, request).is_empty(), "answered once");
    }

    #[test]
    fn a_new_leader_or_term_fails_the_reads_meant_for_the_old_one() {
        let mut f = ForwardedReads::default();
        f.queue(1, 2, 5);
        f.take_request(0).expect("a request");
        f.queue(2, 2, 5);
        assert_eq!(f.queue(3, 2, 6), vec![1, 2], "a new term");
        assert_eq!(f.rebind(Some((3, 6))), vec![3], "a new leader");
        assert!(f.is_empty());
        assert!(f.rebind(None).is_empty());
    }

    #[test]
    fn unanswered_requests_expire() {
        let mut f = ForwardedReads::default();
        f.queue(1, 2, 5);
        f.take_request(10).expect("a request");
        f.queue(2, 2, 5);
        f.take_request(20).expect("a request");
        assert!(f.expire(10).is_empty());
        assert_eq!(f.expire(15), vec![1]);
        assert_eq!(f.expire(100), vec![2]);
        assert!(f.is_empty());
    }

    #[test]
    fn numbering_starts_where_asked_and_wraps() {
        let mut f = ForwardedReads::numbered_from(u64::MAX);
        f.queue(1, 2, 5);
        assert_eq!(f.take_request(0), Some((2, 0)));
        let mut g = ForwardedReads::numbered_from(41);
        g.queue(1, 2, 5);
        assert_eq!(g.take_request(0), Some((2, 42)));
    }

    #[test]
    fn requests_out_are_bounded() {
        let mut f = ForwardedReads::default();
        for id in 0..MAX_REQUESTS_OUT as u64 {
            f.queue(id, 2, 5);
            assert!(f.take_request(0).is_some());
        }
        f.queue(u64::MAX, 2, 5);
        assert!(!f.request_needed());
        assert_eq!(f.take_request(0), None, "the reads wait for a free slot");
        assert_eq!(f.answer(2, 1), vec![0]);
        assert_eq!(f.take_request(1).map(|(leader, _)| leader), Some(2));
    }
}
