//! An in-memory persister: the simulated disk of one node.
//!
//! It survives a simulated crash; everything else of the node does not. Applying a [`Ready`] here is
//! atomic, which models a driver that flushes a whole `Ready` before acting on it.

use crate::proto::raft as pb;
use crate::raft::storage::{Storage, StorageError};
use crate::raft::wire::entry_to_proto;
use crate::raft::{Entry, HardState, PersistedState, Ready, Snapshot};
use prost::Message as _;

/// What one node has persisted.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Persist the durable parts of `ready` in the order the driver contract prescribes.
    pub fn persist_ready(&mut self, ready: &Ready) {
        if let Some(snapshot) = &ready.snapshot {
            self.entries.retain(|e| e.index > snapshot.meta.index);
            self.snapshot = Some(snapshot.clone());
        }
        if let Some(write) = &ready.log_write {
            self.entries.retain(|e| e.index < write.from);
            self.entries.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = ready.hard_state {
            self.hard_state = hard_state;
        }
    }

    /// What a restarted node reads back.
    pub fn load(&self) -> PersistedState {
        PersistedState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
        }
    }

    /// Bytes of Raft state (hard state and log) in our protobuf encoding: 6.824's `RaftStateSize`.
    /// The same quantity the daemons compare with their snapshot threshold.
    pub fn raft_state_size(&self) -> usize {
        let hard_state = pb::Entry {
            term: self.hard_state.term,
            index: self.hard_state.commit,
            kind: self.hard_state.vote.map_or(0, |v| v as i32),
            data: Default::default(),
        }
        .encoded_len();
        let entries: usize = self
            .entries
            .iter()
            .map(|e| {
                let len = entry_to_proto(e).encoded_len();
                len + prost::length_delimiter_len(len) + 1
            })
            .sum();
        hard_state + entries
    }

    /// Bytes of the stored snapshot: 6.824's `SnapshotSize`.
    pub fn snapshot_size(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |s| s.data.len())
    }

    /// The stored snapshot, if any.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }
}

impl Storage for MemStorage {
    fn load(&self) -> Result<PersistedState, StorageError> {
        Ok(MemStorage::load(self))
    }

    fn persist(&mut self, ready: &Ready) -> Result<(), StorageError> {
        self.persist_ready(ready);
        Ok(())
    }

    fn raft_state_size(&self) -> u64 {
        MemStorage::raft_state_size(self) as u64
    }

    fn snapshot_size(&self) -> u64 {
        MemStorage::snapshot_size(self) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{EntryKind, LogWrite, SnapshotMeta};
    use bytes::Bytes;

    fn e(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        }
    }

    #[test]
    fn writes_truncate_then_append_and_snapshots_drop_the_prefix() {
        let mut s = MemStorage::default();
        s.persist_ready(&Ready {
            log_write: Some(LogWrite {
                from: 1,
                entries: vec![e(1), e(2), e(3)],
            }),
            ..Default::default()
        });
        s.persist_ready(&Ready {
            log_write: Some(LogWrite {
                from: 2,
                entries: vec![e(2)],
            }),
            ..Default::default()
        });
        assert_eq!(s.load().entries.len(), 2);
        s.persist_ready(&Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta { index: 1, term: 1 },
                data: Bytes::from_static(b"s"),
                membership: None,
            }),
            ..Default::default()
        });
        let loaded = s.load();
        assert_eq!(loaded.entries, vec![e(2)]);
        assert_eq!(s.snapshot_size(), 1);
    }
}
