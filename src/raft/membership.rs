//! Who belongs to a Raft group: voters, learners, and the history of configurations in the log.
//!
//! # Single-server changes, used as soon as they are appended
//!
//! A change adds a learner, promotes a learner to voter, or removes one member — never more than one
//! voter at a time. Any majority of the old voters and any majority of the new ones then share a node,
//! so two leaders of one term cannot be elected under two configurations (Raft thesis §4.1). We chose
//! this over joint consensus because every operation an operator needs (grow, shrink, replace a node)
//! is a sequence of such steps, and it needs no second quorum rule anywhere in the core.
//!
//! Every node uses the **latest configuration in its log, committed or not** (thesis §4.1); a
//! truncation that removes a config entry reverts to the one before it. The leader therefore refuses a
//! new change while one is uncommitted, and — the fix to the single-server bug Ongaro described on
//! raft-dev in 2015 — until it has committed an entry of its own term (its election no-op), so that a
//! change proposed by a deposed leader can never combine with one of its successor's.
//!
//! A new member joins as a **learner**: it receives the log (or a snapshot) but does not vote and does
//! not count toward a commit or a read quorum, so adding an empty node never costs availability. It is
//! promoted only once it has caught up. A removed leader keeps leading, without counting itself, until
//! the change commits, then steps down.

use super::types::{Index, NodeId};
use crate::proto::raft as pb;
use bytes::Bytes;
use prost::Message as _;
use std::collections::BTreeMap;
use thiserror::Error;

/// One member's place in the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Where its peers reach it (`host:port`); opaque to the core, empty in the simulator.
    pub address: String,
    /// Receives the log but neither votes nor counts toward a quorum.
    pub learner: bool,
}

/// A group's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    members: BTreeMap<NodeId, Member>,
}

/// One step from a configuration to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new node starts as a learner at `address`.
    AddLearner {
        /// The new node's id.
        id: NodeId,
        /// Where its peers reach it.
        address: String,
    },
    /// A learner that caught up becomes a voter.
    Promote {
        /// The learner.
        id: NodeId,
    },
    /// A voter or learner leaves.
    Remove {
        /// The member.
        id: NodeId,
    },
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::AddLearner { id, address } => {
                write!(f, "add learner {id} at {address:?}")
            }
            MembershipChange::Promote { id } => write!(f, "promote {id}"),
            MembershipChange::Remove { id } => write!(f, "remove {id}"),
        }
    }
}

/// Why a configuration or a change of it was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MembershipError {
    /// Only the leader changes the configuration.
    #[error(transparent)]
    NotLeader(#[from] super::core::NotLeader),
    /// One change at a time: the previous one is not committed yet.
    #[error("a membership change (log index {index}) is still uncommitted; retry once it commits")]
    ChangePending {
        /// The uncommitted config entry.
        index: Index,
    },
    /// A new leader must commit an entry of its own term before it changes the configuration.
    #[error("the leader has not committed an entry of its term yet; retry shortly")]
    LeaderNotReady,
    /// The id is not in the configuration.
    #[error("node {0} is not a member")]
    UnknownMember(NodeId),
    /// The id is already in the configuration.
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    /// Only a learner can be promoted.
    #[error("node {0} is already a voter")]
    AlreadyVoter(NodeId),
    /// A promotion of a learner that would slow every commit while it catches up.
    #[error(
        "learner {id} has not caught up: it holds the log up to {matched}, the leader up to {last}"
    )]
    LearnerBehind {
        /// The learner.
        id: NodeId,
        /// What it acknowledged.
        matched: Index,
        /// The leader's last index.
        last: Index,
    },
    /// A group with no voter can never elect a leader again.
    #[error("cannot remove node {0}: it is the last voter")]
    LastVoter(NodeId),
    /// Id 0 means "nobody" on the wire.
    #[error("node ids must be non-zero")]
    ZeroId,
    /// A config entry or snapshot carried a configuration no correct leader writes.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Membership {
    /// A configuration of voters only (a group's first, from `--peers`), all without addresses.
    pub fn from_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            members: voters
                .into_iter()
                .map(|id| {
                    (
                        id,
                        Member {
                            address: String::new(),
                            learner: false,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Every member, voters and learners, in id order.
    pub fn members(&self) -> impl Iterator<Item = (NodeId, &Member)> + '_ {
        self.members.iter().map(|(&id, m)| (id, m))
    }

    /// Every member's id.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.keys().copied()
    }

    /// The voters' ids.
    pub fn voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| !m.learner)
            .map(|(&id, _)| id)
    }

    /// The learners' ids.
    pub fn learners(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| m.learner)
            .map(|(&id, _)| id)
    }

    /// How many voters there are: the size quorums are counted against.
    pub fn voter_count(&self) -> usize {
        self.voters().count()
    }

    /// Whether `id` votes.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.members.get(&id).is_some_and(|m| !m.learner)
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.contains_key(&id)
    }

    /// A member's entry.
    pub fn get(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// Whether the configuration names nobody (a node waiting to be added to a group).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Record `address` for every member that has none yet (a group started from `--peers` learns its
    /// addresses from the command line rather than from the log).
    pub fn fill_addresses(&mut self, address_of: impl Fn(NodeId) -> Option<String>) {
        for (&id, member) in self.members.iter_mut() {
            if member.address.is_empty() {
                if let Some(address) = address_of(id) {
                    member.address = address;
                }
            }
        }
    }

    /// The configuration after `change`, refused if the change does not apply to this one.
    pub fn apply(&self, change: &MembershipChange) -> Result<Membership, MembershipError> {
        let mut next = self.clone();
        match change {
            MembershipChange::AddLearner { id, address } => {
                if *id == 0 {
                    return Err(MembershipError::ZeroId);
                }
                if self.contains(*id) {
                    return Err(MembershipError::AlreadyMember(*id));
                }
                next.members.insert(
                    *id,
                    Member {
                        address: address.clone(),
                        learner: true,
                    },
                );
            }
            MembershipChange::Promote { id } => match next.members.get_mut(id) {
                None => return Err(MembershipError::UnknownMember(*id)),
                Some(member) if !member.learner => return Err(MembershipError::AlreadyVoter(*id)),
                Some(member) => member.learner = false,
            },
            MembershipChange::Remove { id } => {
                if !self.contains(*id) {
                    return Err(MembershipError::UnknownMember(*id));
                }
                if self.is_voter(*id) && self.voter_count() == 1 {
                    return Err(MembershipError::LastVoter(*id));
                }
                next.members.remove(id);
            }
        }
        Ok(next)
    }

    /// How many voters were added or removed between `self` and `other`: a correct leader never
    /// makes it more than 1 in one step (the simulator checks).
    pub fn voter_distance(&self, other: &Membership) -> usize {
        let a: std::collections::BTreeSet<NodeId> = self.voters().collect();
        let b: std::collections::BTreeSet<NodeId> = other.voters().collect();
        a.symmetric_difference(&b).count()
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Membership {
        pb::Membership {
            members: self
                .members
                .iter()
                .map(|(&id, m)| pb::Member {
                    id,
                    address: m.address.clone(),
                    learner: m.learner,
                })
                .collect(),
        }
    }

    /// From the protobuf form, refusing what no correct leader writes: id 0, an id twice, no voter.
    pub fn from_proto(membership: pb::Membership) -> Result<Membership, MembershipError> {
        let mut members = BTreeMap::new();
        for member in membership.members {
            if member.id == 0 {
                return Err(MembershipError::ZeroId);
            }
            let previous = members.insert(
                member.id,
                Member {
                    address: member.address,
                    learner: member.learner,
                },
            );
            if previous.is_some() {
                return Err(MembershipError::Invalid(format!(
                    "node {} is listed twice",
                    member.id
                )));
            }
        }
        let membership = Membership { members };
        if membership.voter_count() == 0 {
            return Err(MembershipError::Invalid("no voter".into()));
        }
        Ok(membership)
    }

    /// The bytes of a config entry.
    pub fn encode(&self) -> Bytes {
        Bytes::from(self.to_proto().encode_to_vec())
    }

    /// A config entry's bytes back, validated as [`Membership::from_proto`] does.
    pub fn decode(bytes: &[u8]) -> Result<Membership, MembershipError> {
        let proto = pb::Membership::decode(bytes)
            .map_err(|e| MembershipError::Invalid(format!("undecodable: {e}")))?;
        Membership::from_proto(proto)
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let voters: Vec<String> = self.voters().map(|id| id.to_string()).collect();
        let learners: Vec<String> = self.learners().map(|id| id.to_string()).collect();
        write!(f, "voters [{}]", voters.join(","))?;
        if !learners.is_empty() {
            write!(f, " learners [{}]", learners.join(","))?;
        }
        Ok(())
    }
}

/// The configurations a log holds: the one at its compaction point and one per config entry after it.
/// The current configuration is the last of them (used whether committed or not).
#[derive(Clone, Debug, Default)]
pub struct MembershipLog {
    base: Membership,
    entries: BTreeMap<Index, Membership>,
    /// The base came from storage (a snapshot), not from the command line.
    base_recorded: bool,
    /// Ids that were members of a configuration this log held and are not in the current one, with
    /// the index of the configuration that removed them.
    removed: BTreeMap<NodeId, Index>,
}

impl MembershipLog {
    /// A log whose compaction point has configuration `base` and no config entries after it;
    /// `recorded` says whether `base` is stored (a snapshot's) or only given (the command line's).
    pub fn new(base: Membership, recorded: bool) -> Self {
        MembershipLog {
            base,
            entries: BTreeMap::new(),
            base_recorded: recorded,
            removed: Default::default(),
        }
    }

    /// Whether the configuration in force is written down (in a snapshot or a config entry) rather
    /// than known from the command line only: a leader records it before anything else changes.
    pub fn is_recorded(&self) -> bool {
        self.base_recorded || !self.entries.is_empty()
    }

    /// The index of the configuration that removed `id`, if it was a member of a configuration
    /// this node saw and is not one now. Once that index is committed the node's messages are
    /// ignored (its certificate may still be valid); until then a removed leader still leads.
    pub fn removed_at(&self, id: NodeId) -> Option<Index> {
        self.removed.get(&id).copied()
    }

    /// Remember who left between `before` and the configuration in force (made at `at`).
    fn note_removed(&mut self, before: &Membership, at: Index) {
        let current: Vec<NodeId> = self.current().ids().collect();
        for id in before.ids().filter(|id| !current.contains(id)) {
            self.removed.entry(id).or_insert(at);
        }
        self.removed.retain(|id, _| !current.contains(id));
    }

    /// The configuration in force: the latest in the log.
    pub fn current(&self) -> &Membership {
        self.entries.values().next_back().unwrap_or(&self.base)
    }

    /// The configuration after applying the log up to `index` (at least the compaction point).
    pub fn at(&self, index: Index) -> &Membership {
        self.entries
            .range(..=index)
            .next_back()
            .map_or(&self.base, |(_, m)| m)
    }

    /// The index of the latest config entry, if the log holds one after its compaction point.
    pub fn latest_index(&self) -> Option<Index> {
        self.entries.keys().next_back().copied()
    }

    /// A config entry at `index` was appended.
    pub fn record(&mut self, index: Index, membership: Membership) {
        let before = self.current().clone();
        self.entries.insert(index, membership);
        self.note_removed(&before, index);
    }

    /// Entries after `index` were removed (or are about to be rewritten): forget their configurations.
    pub fn truncate_after(&mut self, index: Index) {
        let before = self.current().clone();
        self.entries.split_off(&(index + 1));
        // A removal truncated away is undone (the id is back in the configuration in force).
        self.removed.retain(|_, at| *at <= index);
        self.note_removed(&before, index);
    }

    /// The log was compacted through `index`: the configuration there becomes the base.
    pub fn compact(&mut self, index: Index) {
        let base = self.at(index).clone();
        self.entries = self.entries.split_off(&(index + 1));
        self.base = base;
        // The snapshot written with this compaction carries it.
        self.base_recorded = true;
    }

    /// A snapshot through `index` with configuration `base` replaced the log up to there.
    pub fn install(&mut self, index: Index, base: Membership) {
        let before = self.current().clone();
        self.entries = self.entries.split_off(&(index + 1));
        self.base = base;
        self.base_recorded = true;
        self.note_removed(&before, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learner(id: NodeId) -> MembershipChange {
        MembershipChange::AddLearner {
            id,
            address: format!("n{id}:1"),
        }
    }

    #[test]
    fn a_learner_is_added_promoted_and_removed_one_step_at_a_time() {
        let m = Membership::from_voters([1, 2, 3]);
        let m = m.apply(&learner(4)).expect("add");
        assert_eq!(m.voter_count(), 3);
        assert_eq!(m.learners().collect::<Vec<_>>(), vec![4]);
        assert_eq!(m.apply(&learner(4)), Err(MembershipError::AlreadyMember(4)));
        let m = m
            .apply(&MembershipChange::Promote { id: 4 })
            .expect("promote");
        assert!(m.is_voter(4));
        assert_eq!(
            m.apply(&MembershipChange::Promote { id: 4 }),
            Err(MembershipError::AlreadyVoter(4))
        );
        let m = m
            .apply(&MembershipChange::Remove { id: 1 })
            .expect("remove");
        assert_eq!(m.voters().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(
            Membership::from_voters([1, 2, 3]).voter_distance(&m),
            2,
            "two steps apart"
        );
    }

    #[test]
    fn the_last_voter_stays_and_nobody_is_id_zero() {
        let m = Membership::from_voters([7]);
        assert_eq!(
            m.apply(&MembershipChange::Remove { id: 7 }),
            Err(MembershipError::LastVoter(7))
        );
        assert_eq!(m.apply(&learner(0)), Err(MembershipError::ZeroId));
        assert_eq!(
            m.apply(&MembershipChange::Remove { id: 8 }),
            Err(MembershipError::UnknownMember(8))
        );
    }

    #[test]
    fn encoding_round_trips_and_refuses_what_no_leader_writes() {
        let m = Membership::from_voters([1, 2])
            .apply(&learner(3))
            .expect("add");
        assert_eq!(Membership::decode(&m.encode()), Ok(m));
        let twice = pb::Membership {
            members: vec![
                pb::Member {
                    id: 1,
                    ..Default::default()
                },
                pb::Member {
                    id: 1,
                    ..Default::default()
                },
            ],
        };
        assert!(Membership::decode(&twice.encode_to_vec()).is_err());
        let only_learners = pb::Membership {
            members: vec![pb::Member {
                id: 1,
                learner: true,
                ..Default::default()
            }],
        };
        assert!(Membership::decode(&only_learners.encode_to_vec()).is_err());
        assert!(Membership::decode(b"\xff\xff").is_err());
    }

    #[test]
    fn the_log_of_configurations_follows_truncation_and_compaction() {
        let mut log = MembershipLog::new(Membership::from_voters([1, 2, 3]), false);
        assert!(!log.is_recorded());
        let with_4 = log.current().apply(&learner(4)).expect("add");
        log.record(5, with_4.clone());
        let promoted = with_4
            .apply(&MembershipChange::Promote { id: 4 })
            .expect("promote");
        log.record(9, promoted.clone());
        assert!(log.is_recorded());
        assert_eq!(log.current(), &promoted);
        let without_1 = promoted
            .apply(&MembershipChange::Remove { id: 1 })
            .expect("remove");
        log.record(10, without_1);
        assert_eq!((log.removed_at(1), log.removed_at(2)), (Some(10), None));
        log.truncate_after(9);
        assert_eq!(log.removed_at(1), None, "the removal was truncated away");
        assert_eq!(log.at(7), &with_4);
        assert_eq!(log.at(4), &Membership::from_voters([1, 2, 3]));
        log.truncate_after(8);
        assert_eq!(log.current(), &with_4, "a truncated change is undone");
        log.compact(6);
        assert_eq!(log.latest_index(), None);
        assert_eq!(log.current(), &with_4);
        log.install(20, promoted.clone());
        assert_eq!(log.current(), &promoted);
    }
}
