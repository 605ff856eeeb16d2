//! Admission control on the leader: how much a node lets clients put in flight before it says "not now".
//!
//! Why: a leader whose followers are paused or partitioned cannot commit, yet every proposal it accepts
//! stays in its memory (the log, the send queues) until it does; 64 clients writing 1 MiB values would
//! run it out of memory. Likewise a service that applies slower than the log commits gathers a backlog
//! of committed entries without end. So the driver admits a proposal only while
//!
//! - its own proposals not yet committed stay under [`MAX_UNCOMMITTED_BYTES`] and
//!   [`MAX_UNCOMMITTED_PROPOSALS`], and
//! - the service's applied index is within [`MAX_APPLY_BACKLOG`] entries of the commit index,
//!
//! and refuses the rest with [`Refused::Overloaded`]; clients back off and retry (their deadline still
//! holds). An entry over [`crate::limits::MAX_ENTRY_BYTES`] is refused for good ([`Refused::TooLarge`]):
//! followers could never accept it.

use super::types::Index;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of this leader's proposals that may wait for commitment at once.
pub const MAX_UNCOMMITTED_BYTES: u64 = 64 << 20;
/// Proposals of this leader that may wait for commitment at once.
pub const MAX_UNCOMMITTED_PROPOSALS: usize = 8192;
/// Committed entries the service may be behind before new proposals wait.
pub const MAX_APPLY_BACKLOG: u64 = 50_000;

/// Why a proposal was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Larger than any log entry may be.
    TooLarge {
        /// The proposal's size.
        bytes: usize,
    },
    /// Too much is in flight; retry after a pause.
    Overloaded(String),
}

/// The service's applied index, shared with the driver ([`crate::raft::RaftHandle::report_applied`]).
/// `u64::MAX` until the service first reports: a node driven without a service has no apply backlog.
#[derive(Clone, Debug)]
pub struct AppliedIndex(Arc<AtomicU64>);

impl Default for AppliedIndex {
    fn default() -> Self {
        AppliedIndex(Arc::new(AtomicU64::new(u64::MAX)))
    }
}

impl AppliedIndex {
    /// The service applied everything up to `index`.
    pub fn report(&self, index: Index) {
        self.0.store(index, Ordering::Relaxed);
    }

    /// The index last reported, if the service reports at all.
    pub fn get(&self) -> Option<Index> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&i| i != u64::MAX)
    }
}

/// The driver's ledger of proposals in flight.
#[derive(Debug, Default)]
pub struct Admission {
    /// (index, bytes) of this leader's uncommitted proposals, in index order.
    pending: VecDeque<(Index, u64)>,
    pending_bytes: u64,
    /// The service's progress.
    pub applied: AppliedIndex,
}

impl Admission {
    /// May a proposal of `bytes` go in now, with the log committed up to `commit`?
    pub fn check(&self, bytes: usize, commit: Index) -> Result<(), Refused> {
        if bytes > crate::limits::MAX_ENTRY_BYTES {
            return Err(Refused::TooLarge { bytes });
        }
        if self.pending.len() >= MAX_UNCOMMITTED_PROPOSALS
            || self.pending_bytes + bytes as u64 > MAX_UNCOMMITTED_BYTES
        {
            return Err(Refused::Overloaded(format!(
                "{} proposals ({} bytes) wait for a majority of replicas; is a majority reachable?",
                self.pending.len(),
                self.pending_bytes
            )));
        }
        if let Some(applied) = self.applied.get() {
            if commit.saturating_sub(applied) > MAX_APPLY_BACKLOG {
                return Err(Refused::Overloaded(format!(
                    "the service is {} committed entries behind",
                    commit - applied
                )));
            }
        }
        Ok(())
    }

    /// A proposal of `bytes` got `index`.
    pub fn admitted(&mut self, index: Index, bytes: usize) {
        self.pending.push_back((index, bytes as u64));
        self.pending_bytes += bytes as u64;
    }

    /// The log is committed up to `commit`, and this node leads (or not: then nothing of its own is
    /// pending any more — what it proposed is committed by the next leader or replaced).
    pub fn settle(&mut self, commit: Index, leading: bool) {
        if !leading {
            self.pending.clear();
            self.pending_bytes = 0;
            return;
        }
        while let Some(&(index, bytes)) = self.pending.front() {
            if index > commit {
                break;
            }
            self.pending.pop_front();
            self.pending_bytes -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_bytes_and_apply_backlog_are_bounded() {
        let mut admission = Admission::default();
        let mib = 1 << 20;
        for index in 1..=64 {
            admission.check(mib, 0).expect("room");
            admission.admitted(index, mib);
        }
        assert!(matches!(
            admission.check(mib, 0),
            Err(Refused::Overloaded(_))
        ));
        admission.settle(32, true);
        assert!(admission.check(mib, 32).is_ok());
        assert_eq!(
            admission.check(crate::limits::MAX_ENTRY_BYTES + 1, 32),
            Err(Refused::TooLarge {
                bytes: crate::limits::MAX_ENTRY_BYTES + 1
            })
        );
        admission.applied.report(10);
        assert!(matches!(
            admission.check(1, 10 + MAX_APPLY_BACKLOG + 1),
            Err(Refused::Overloaded(_))
        ));
        admission.settle(64, false);
        admission.applied.report(u64::MAX - 1);
        assert!(admission.check(mib, 64).is_ok());
    }
}
