//! Conversion between the core's messages and the protobuf messages of `proto/raft.proto`.
//!
//! Decoding is where untrusted bytes meet the core, so it validates: a message without a body, an unknown
//! entry kind or a sender id of 0 is refused with a [`WireError`] rather than guessed at.

use super::membership::Membership;
use super::message::{Envelope, Message};
use super::read_only::ReadFailure;
use super::types::{Entry, EntryKind, SnapshotMeta};
use crate::proto::raft as pb;
use prost::Message as _;
use thiserror::Error;

/// A protobuf message that does not describe a valid Raft message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The envelope's `oneof` was empty.
    #[error("envelope from node {0} carries no message")]
    Empty(u64),
    /// Node id 0 is reserved.
    #[error("envelope names node 0")]
    ZeroNode,
    /// The entry kind is not one this version knows.
    #[error("entry {index} has unknown kind {kind}")]
    UnknownEntryKind {
        /// The entry's index.
        index: u64,
        /// The raw kind value.
        kind: i32,
    },
    /// A snapshot's configuration is not one a correct leader writes.
    #[error("snapshot carries an invalid configuration: {0}")]
    InvalidMembership(String),
    /// A read index answer says "busy" without saying "refused": no node sends that.
    #[error("a read index answer is busy but not refused")]
    BusyNotRefused,
}

/// Decode the configuration a snapshot carries (absent from senders that predate membership changes).
pub fn membership_from_proto(
    membership: Option<pb::Membership>,
) -> Result<Option<Membership>, WireError> {
    membership
        .map(Membership::from_proto)
        .transpose()
        .map_err(|e| WireError::InvalidMembership(e.to_string()))
}

/// Encode an entry.
pub fn entry_to_proto(entry: &Entry) -> pb::Entry {
    pb::Entry {
        term: entry.term,
        index: entry.index,
        kind: match entry.kind {
            EntryKind::Normal => pb::EntryKind::Normal as i32,
            EntryKind::Noop => pb::EntryKind::Noop as i32,
            EntryKind::Config => pb::EntryKind::Config as i32,
        },
        data: entry.data.clone(),
    }
}

/// Decode an entry.
pub fn entry_from_proto(entry: pb::Entry) -> Result<Entry, WireError> {
    let kind = match pb::EntryKind::try_from(entry.kind) {
        Ok(pb::EntryKind::Normal) => EntryKind::Normal,
        Ok(pb::EntryKind::Noop) => EntryKind::Noop,
        Ok(pb::EntryKind::Config) => EntryKind::Config,
        Err(_) => {
            return Err(WireError::UnknownEntryKind {
                index: entry.index,
                kind: entry.kind,
            })
        }
    };
    Ok(Entry {
        term: entry.term,
        index: entry.index,
        kind,
        data: entry.data,
    })
}

/// Encode an envelope.
pub fn envelope_to_proto(envelope: &Envelope) -> pb::Envelope {
    use pb::envelope::Message as M;
    let message = match &envelope.message {
        Message::AppendEntries {
            term,
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            read_round,
        } => M::AppendEntries(pb::AppendEntriesRequest {
            term: *term,
            prev_log_index: *prev_log_index,
            prev_log_term: *prev_log_term,
            entries: entries.iter().map(entry_to_proto).collect(),
            leader_commit: *leader_commit,
            read_round: *read_round,
        }),
        Message::AppendEntriesResponse {
            term,
            success,
            match_index,
            rejected_index,
            conflict_index,
            conflict_term,
            read_round,
        } => M::AppendEntriesResponse(pb::AppendEntriesResponse {
            term: *term,
            success: *success,
            match_index: *match_index,
            rejected_index: *rejected_index,
            conflict_index: *conflict_index,
            conflict_term: conflict_term.unwrap_or(0),
            read_round: *read_round,
        }),
        Message::RequestVote {
            term,
            last_log_index,
            last_log_term,
            pre_vote,
            leadership_transfer,
        } => M::RequestVote(pb::RequestVoteRequest {
            term: *term,
            last_log_index: *last_log_index,
            last_log_term: *last_log_term,
            pre_vote: *pre_vote,
            leadership_transfer: *leadership_transfer,
        }),
        Message::RequestVoteResponse {
            term,
            granted,
            pre_vote,
        } => M::RequestVoteResponse(pb::RequestVoteResponse {
            term: *term,
            vote_granted: *granted,
            pre_vote: *pre_vote,
        }),
        Message::InstallSnapshot {
            term,
            meta,
            data,
            membership,
        } => M::InstallSnapshot(pb::InstallSnapshotRequest {
            term: *term,
            last_included_index: meta.index,
            last_included_term: meta.term,
            data: data.clone(),
            membership: membership.as_ref().map(Membership::to_proto),
        }),
        Message::InstallSnapshotResponse { term, match_index } => {
            M::InstallSnapshotResponse(pb::InstallSnapshotResponse {
                term: *term,
                match_index: *match_index,
            })
        }
        Message::TimeoutNow { term } => M::TimeoutNow(pb::TimeoutNowRequest { term: *term }),
        Message::ReadIndex { term, request } => M::ReadIndex(pb::ReadIndexRequest {
            term: *term,
            request: *request,
        }),
        Message::ReadIndexResponse {
            term,
            request,
            index,
        } => M::ReadIndexResponse(pb::ReadIndexResponse {
            term: *term,
            request: *request,
            index: *index.as_ref().unwrap_or(&0),
            refused: index.is_err(),
            busy: *index == Err(ReadFailure::LeaderBusy),
        }),
    };
    pb::Envelope {
        from: envelope.from,
        to: envelope.to,
        message: Some(message),
        cluster: String::new(),
    }
}

/// Decode an envelope.
pub fn envelope_from_proto(envelope: pb::Envelope) -> Result<Envelope, WireError> {
    use pb::envelope::Message as M;
    if envelope.from == 0 || envelope.to == 0 {
        return Err(WireError::ZeroNode);
    }
    let message = match envelope.message.ok_or(WireError::Empty(envelope.from))? {
        M::AppendEntries(m) => Message::AppendEntries {
            term: m.term,
            prev_log_index: m.prev_log_index,
            prev_log_term: m.prev_log_term,
            entries: m
                .entries
                .into_iter()
                .map(entry_from_proto)
                .collect::<Result<_, _>>()?,
            leader_commit: m.leader_commit,
            read_round: m.read_round,
        },
        M::AppendEntriesResponse(m) => Message::AppendEntriesResponse {
            term: m.term,
            success: m.success,
            match_index: m.match_index,
            rejected_index: m.rejected_index,
            conflict_index: m.conflict_index,
            conflict_term: (m.conflict_term != 0).then_some(m.conflict_term),
            read_round: m.read_round,
        },
        M::RequestVote(m) => Message::RequestVote {
            term: m.term,
            last_log_index: m.last_log_index,
            last_log_term: m.last_log_term,
            pre_vote: m.pre_vote,
            leadership_transfer: m.leadership_transfer,
        },
        M::RequestVoteResponse(m) => Message::RequestVoteResponse {
            term: m.term,
            granted: m.vote_granted,
            pre_vote: m.pre_vote,
        },
        M::InstallSnapshot(m) => Message::InstallSnapshot {
            term: m.term,
            meta: SnapshotMeta {
                index: m.last_included_index,
                term: m.last_included_term,
            },
            data: m.data,
            membership: membership_from_proto(m.membership)?,
        },
        M::InstallSnapshotResponse(m) => Message::InstallSnapshotResponse {
            term: m.term,
            match_index: m.match_index,
        },
        M::TimeoutNow(m) => Message::TimeoutNow { term: m.term },
        M::ReadIndex(m) => Message::ReadIndex {
            term: m.term,
            request: m.request,
        },
        M::ReadIndexResponse(m) => Message::ReadIndexResponse {
            term: m.term,
            request: m.request,
            index: match (m.refused, m.busy) {
                (false, false) => Ok(m.index),
                (false, true) => return Err(WireError::BusyNotRefused),
                (true, false) => Err(ReadFailure::LeadershipLost),
                (true, true) => Err(ReadFailure::LeaderBusy),
            },
        },
    };
    Ok(Envelope {
        from: envelope.from,
        to: envelope.to,
        message,
    })
}

/// The size of the envelope on the wire, for statistics and byte budgets.
pub fn encoded_len(envelope: &Envelope) -> usize {
    envelope_to_proto(envelope).encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn every_message_round_trips() {
        let entry = Entry {
            term: 3,
            index: 9,
            kind: EntryKind::Noop,
            data: Bytes::from_static(b"x"),
        };
        let messages = vec![
            Message::AppendEntries {
                term: 3,
                prev_log_index: 8,
                prev_log_term: 2,
                entries: vec![entry],
                leader_commit: 7,
                read_round: 4,
            },
            Message::AppendEntriesResponse {
                term: 3,
                success: false,
                match_index: 0,
                rejected_index: 8,
                conflict_index: 5,
                conflict_term: Some(2),
                read_round: 4,
            },
            Message::RequestVote {
                term: 4,
                last_log_index: 9,
                last_log_term: 3,
                pre_vote: true,
                leadership_transfer: false,
            },
            Message::RequestVoteResponse {
                term: 4,
                granted: true,
                pre_vote: true,
            },
            Message::InstallSnapshot {
                term: 4,
                meta: SnapshotMeta { index: 9, term: 3 },
                data: Bytes::from_static(b"state"),
                membership: None,
            },
            Message::InstallSnapshotResponse {
                term: 4,
                match_index: 9,
            },
            Message::TimeoutNow { term: 4 },
            Message::ReadIndex {
                term: 4,
                request: 17,
            },
            Message::ReadIndexResponse {
                term: 4,
                request: 17,
                index: Ok(9),
            },
            Message::ReadIndexResponse {
                term: 4,
                request: 18,
                index: Err(ReadFailure::LeadershipLost),
            },
            Message::ReadIndexResponse {
                term: 4,
                request: 19,
                index: Err(ReadFailure::LeaderBusy),
            },
        ];
        for message in messages {
            let envelope = Envelope {
                from: 1,
                to: 2,
                message,
            };
            let bytes = envelope_to_proto(&envelope).encode_to_vec();
            let decoded = pb::Envelope::decode(bytes.as_slice()).expect("decodes");
            assert_eq!(envelope_from_proto(decoded), Ok(envelope));
        }
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let empty = pb::Envelope {
            from: 1,
            to: 2,
            message: None,
            cluster: String::new(),
        };
        assert_eq!(envelope_from_proto(empty), Err(WireError::Empty(1)));
        let busy_not_refused = pb::Envelope {
            from: 1,
            to: 2,
            message: Some(pb::envelope::Message::ReadIndexResponse(
                pb::ReadIndexResponse {
                    term: 1,
                    request: 1,
                    index: 5,
                    refused: false,
                    busy: true,
                },
            )),
            cluster: String::new(),
        };
        assert_eq!(
            envelope_from_proto(busy_not_refused),
            Err(WireError::BusyNotRefused)
        );
        let bad_kind = pb::Envelope {
            from: 1,
            to: 2,
            message: Some(pb::envelope::Message::AppendEntries(
                pb::AppendEntriesRequest {
                    entries: vec![pb::Entry {
                        term: 1,
                        index: 1,
                        kind: 42,
                        data: Bytes::new(),
                    }],
                    ..Default::default()
                },
            )),
            cluster: String::new(),
        };
        assert!(matches!(
            envelope_from_proto(bad_kind),
            Err(WireError::UnknownEntryKind { kind: 42, .. })
        ));
    }
}
