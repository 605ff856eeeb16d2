//! The replicated log of one node: a compaction point (the snapshot's index and term), the entries after
//! it, the commit and apply cursors, and which suffix still has to be written to storage.
//!
//! Invariants (checked by `debug_assert`s and by the simulator):
//! - entries are contiguous: `entries[i].index == snapshot.index + 1 + i`;
//! - terms never decrease along the log;
//! - `snapshot.index <= applied <= committed <= last_index()`;
//! - nothing at or below `committed` is ever truncated.

use super::types::{Entry, Index, SnapshotMeta, Term};
use std::collections::VecDeque;

/// Entries the driver must write: delete every stored entry with index `>= from`, then store `entries`
/// (which start at `from` when non-empty). A pure truncation has no entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogWrite {
    /// First index whose stored copy is replaced.
    pub from: Index,
    /// The new entries from `from` on.
    pub entries: Vec<Entry>,
}

/// Why a follower could not append what a leader sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendConflict {
    /// The log has no entry at `prev_log_index`; the leader should go back to `last_index + 1`.
    Missing {
        /// This log's last index + 1.
        next: Index,
    },
    /// The entry at `prev_log_index` has another term; the leader may skip that whole term.
    TermMismatch {
        /// The term found at `prev_log_index`.
        term: Term,
        /// The first index of that term in this log.
        first_index: Index,
    },
    /// Appending would remove committed entries: only a broken leader asks that. Refused.
    WouldTruncateCommitted,
}

/// A node's log.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    snapshot: SnapshotMeta,
    entries: VecDeque<Entry>,
    committed: Index,
    applied: Index,
    /// Lowest index whose stored copy is stale; `None` when storage is up to date.
    unstable_from: Option<Index>,
}

impl RaftLog {
    /// A log restored from storage. Nothing needs writing: it came from there.
    pub fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>, committed: Index) -> Self {
        let last = snapshot.index + entries.len() as Index;
        let committed = committed.clamp(snapshot.index, last);
        RaftLog {
            snapshot,
            entries: entries.into(),
            committed,
            applied: snapshot.index,
            unstable_from: None,
        }
    }

    /// Index and term of the compaction point.
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        self.snapshot
    }

    /// The first index still held as an entry.
    pub fn first_index(&self) -> Index {
        self.snapshot.index + 1
    }

    /// The last index in the log (the snapshot's index if there are no entries).
    pub fn last_index(&self) -> Index {
        self.snapshot.index + self.entries.len() as Index
    }

    /// The term of the last entry (or of the snapshot).
    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot.term, |e| e.term)
    }

    /// Highest index known committed.
    pub fn committed(&self) -> Index {
        self.committed
    }

    /// Highest index handed to the service for applying.
    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Number of entries held (after the compaction point).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries are held after the compaction point.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The term at `index`: known for the compaction point and every held entry, `None` otherwise.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`, if held.
    pub fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.snapshot.index {
            return None;
        }
        self.entries.get((index - self.snapshot.index - 1) as usize)
    }

    /// Whether the log has an entry at `index` with `term` (the Log Matching check).
    pub fn matches(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Raft §5.4.1: a candidate whose log ends at (`last_index`, `last_term`) is at least as up to date as
    /// this log.
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries from `from` on, at most `max_entries` of them and about `max_bytes` (always at least one).
    pub fn slice(&self, from: Index, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut index = from.max(self.first_index());
        while let Some(entry) = self.entry(index) {
            if out.len() >= max_entries
                || (!out.is_empty() && bytes + entry.approx_size() > max_bytes)
            {
                break;
            }
            bytes += entry.approx_size();
            out.push(entry.clone());
            index += 1;
        }
        out
    }

    /// The first index of `term` at or before `index`, for conflict hints.
    pub fn first_index_of_term(&self, term: Term, index: Index) -> Index {
        let mut first = index;
        while first > self.first_index() && self.term(first - 1) == Some(term) {
            first -= 1;
        }
        first
    }

    /// The last index that has `term`, searching back from `upto` (the leader's side of fast back-up).
    pub fn last_index_of_term(&self, term: Term, upto: Index) -> Option<Index> {
        let mut index = upto.min(self.last_index());
        loop {
            match self.term(index) {
                Some(t) if t == term => return Some(index),
                Some(t) if t < term => return None,
                Some(_) if index > self.snapshot.index => index -= 1,
                _ => return None,
            }
        }
    }

    /// Leader side: append a new entry at the end.
    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        debug_assert!(entry.term >= self.last_term());
        self.mark_unstable(entry.index);
        self.entries.push_back(entry);
    }

    /// Follower side (Figure 2, AppendEntries steps 2 to 4): check that the log matches at `prev_index`,
    /// then store `entries`, truncating only at a real conflict so a delayed, shorter message never
    /// removes entries a newer one already delivered. Returns the index up to which this log now
    /// provably matches the leader's.
    pub fn try_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
    ) -> Result<Index, AppendConflict> {
        // Entries at or below the compaction point are committed, hence equal to the leader's: skip them.
        let (prev_index, prev_term, entries) = if prev_index < self.snapshot.index {
            let skip = (self.snapshot.index - prev_index) as usize;
            if skip > entries.len() {
                // Everything sent is already covered by the snapshot.
                return Ok(prev_index + entries.len() as Index);
            }
            let (prev_term, rest) = if skip == 0 {
                (prev_term, entries)
            } else {
                (entries[skip - 1].term, &entries[skip..])
            };
            (self.snapshot.index, prev_term, rest)
        } else {
            (prev_index, prev_term, entries)
        };
        match self.term(prev_index) {
            None => {
                return Err(AppendConflict::Missing {
                    next: self.last_index() + 1,
                })
            }
            Some(term) if term != prev_term => {
                if prev_index <= self.committed {
                    return Err(AppendConflict::WouldTruncateCommitted);
                }
                return Err(AppendConflict::TermMismatch {
                    term,
                    first_index: self.first_index_of_term(term, prev_index),
                });
            }
            Some(_) => {}
        }
        for (offset, entry) in entries.iter().enumerate() {
            let index = prev_index + 1 + offset as Index;
            match self.term(index) {
                Some(term) if term == entry.term => continue,
                Some(_) => {
                    if index <= self.committed {
                        return Err(AppendConflict::WouldTruncateCommitted);
                    }
                    self.truncate_from(index);
                }
                None => {}
            }
            for entry in &entries[offset..] {
                self.append(entry.clone());
            }
            break;
        }
        Ok(prev_index + entries.len() as Index)
    }

    fn truncate_from(&mut self, index: Index) {
        let keep = (index - self.snapshot.index - 1) as usize;
        self.entries.truncate(keep);
        self.mark_unstable(index);
    }

    fn mark_unstable(&mut self, index: Index) {
        self.unstable_from = Some(self.unstable_from.map_or(index, |u| u.min(index)));
    }

    /// Advance the commit index; never moves it back or past the log.
    pub fn commit_to(&mut self, index: Index) -> bool {
        let index = index.min(self.last_index());
        if index > self.committed {
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// Hands out committed entries not yet handed out, within `budget` (all of them for `None`), and
    /// counts them as applied.
    pub fn take_committed(&mut self, budget: Option<ApplyBudget>) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let (max_entries, max_bytes) =
            budget.map_or((usize::MAX, usize::MAX), |b| (b.entries, b.bytes));
        while self.applied < self.committed && entries.len() < max_entries && bytes < max_bytes {
            let Some(entry) = self.entry(self.applied + 1).cloned() else {
                break;
            };
            bytes += entry.data.len();
            entries.push(entry);
            self.applied += 1;
        }
        entries
    }

    /// Whether committed entries are waiting to be handed out and `budget` allows one.
    pub fn has_committed(&self, budget: Option<ApplyBudget>) -> bool {
        self.committed > self.applied && budget.is_none_or(|b| b.entries > 0 && b.bytes > 0)
    }

    /// The service snapshotted its state up to `meta.index` (which it has applied): drop the entries the
    /// snapshot covers.
    pub fn compact(&mut self, meta: SnapshotMeta) {
        debug_assert!(meta.index <= self.applied && meta.index > self.snapshot.index);
        let drop = (meta.index - self.snapshot.index) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = meta;
        if let Some(u) = self.unstable_from {
            self.unstable_from = Some(u.max(meta.index + 1));
        }
    }

    /// A leader's snapshot replaces the log up to `meta.index` (Figure 13, steps 6 and 7): if the log holds
    /// that very entry the suffix after it is kept, since it may already have been acknowledged; otherwise
    /// the whole log is discarded. The snapshot counts as committed and applied.
    pub fn install_snapshot(&mut self, meta: SnapshotMeta) {
        if self.matches(meta.index, meta.term) && meta.index <= self.last_index() {
            let drop = (meta.index - self.snapshot.index) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        } else {
            self.entries.clear();
            self.unstable_from = Some(meta.index + 1);
        }
        if let Some(u) = self.unstable_from {
            self.unstable_from = Some(u.max(meta.index + 1));
        }
        self.snapshot = meta;
        self.committed = self.committed.max(meta.index);
        self.applied = meta.index;
    }

    /// What storage must write to catch up with this log; afterwards the log counts as stable.
    pub fn take_unstable(&mut self) -> Option<LogWrite> {
        let from = self.unstable_from.take()?;
        let from = from.max(self.first_index());
        let entries = self.slice(from, usize::MAX, usize::MAX);
        Some(LogWrite { from, entries })
    }
}

/// How much more the service may be handed before it reports applying what it has (see
/// [`crate::raft::RaftCore::set_apply_budget`]): the apply queue between Raft and the service is
/// bounded by this, not by how far the commit index runs ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyBudget {
    /// Entries.
    pub entries: usize,
    /// Bytes of entry data (a single entry may exceed what is left: at least one always goes).
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryKind;
    use bytes::Bytes;

    fn e(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        }
    }

    fn log_with(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| e(i as Index + 1, *t))
            .collect();
        RaftLog::restore(SnapshotMeta::default(), entries, 0)
    }

    #[test]
    fn a_delayed_shorter_append_does_not_truncate() {
        let mut log = log_with(&[1, 1, 1]);
        assert_eq!(log.try_append(1, 1, &[e(2, 1)]), Ok(2));
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.take_unstable(), None);
    }

    #[test]
    fn a_conflict_truncates_and_rewrites_the_suffix() {
        let mut log = log_with(&[1, 1, 2, 2]);
        assert_eq!(log.try_append(2, 1, &[e(3, 3)]), Ok(3));
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.term(3), Some(3));
        let write = log.take_unstable().expect("a write");
        assert_eq!(write.from, 3);
        assert_eq!(write.entries, vec![e(3, 3)]);
    }

    #[test]
    fn mismatch_hints_name_the_first_index_of_the_conflicting_term() {
        let mut log = log_with(&[1, 2, 2, 2]);
        assert_eq!(
            log.try_append(4, 3, &[]),
            Err(AppendConflict::TermMismatch {
                term: 2,
                first_index: 2
            })
        );
        assert_eq!(
            log.try_append(7, 3, &[]),
            Err(AppendConflict::Missing { next: 5 })
        );
    }

    #[test]
    fn committed_entries_are_never_truncated() {
        let mut log = log_with(&[1, 1, 1]);
        log.commit_to(2);
        assert_eq!(
            log.try_append(1, 1, &[e(2, 5)]),
            Err(AppendConflict::WouldTruncateCommitted)
        );
        assert_eq!(log.term(2), Some(1));
    }

    #[test]
    fn entries_below_the_snapshot_are_skipped() {
        let mut log = log_with(&[1, 1, 1, 1]);
        log.commit_to(4);
        log.take_committed(None);
        log.compact(SnapshotMeta { index: 3, term: 1 });
        assert_eq!(
            log.try_append(1, 1, &[e(2, 1), e(3, 1), e(4, 1), e(5, 2)]),
            Ok(5)
        );
        assert_eq!(log.last_index(), 5);
        assert_eq!(log.try_append(0, 0, &[e(1, 1)]), Ok(1));
    }

    #[test]
    fn installing_a_snapshot_keeps_a_matching_suffix() {
        let mut log = log_with(&[1, 1, 2, 2]);
        log.install_snapshot(SnapshotMeta { index: 2, term: 1 });
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.committed(), 2);
        let mut other = log_with(&[1, 1, 2, 2]);
        other.install_snapshot(SnapshotMeta { index: 3, term: 3 });
        assert_eq!(other.last_index(), 3);
        assert_eq!(other.take_unstable().map(|w| w.from), Some(4));
    }

    #[test]
    fn last_index_of_term_searches_back() {
        let log = log_with(&[1, 1, 3, 3, 5]);
        assert_eq!(log.last_index_of_term(3, 5), Some(4));
        assert_eq!(log.last_index_of_term(2, 5), None);
        assert_eq!(log.last_index_of_term(1, 5), Some(2));
    }
}
