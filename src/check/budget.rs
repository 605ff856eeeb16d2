//! The memory budget every search draws from: one pool for the whole check, so the limit is a
//! total over all partitions searched in parallel, not a cap per cache.
//!
//! Why this shape: the checker once died at 23 GB resident and once aborted with "memory
//! allocation failed". Both came from containers that grew with the search (the memo, interned
//! model states) and from growth by doubling, where one `push` asks for as much again as the
//! whole container. Here every container that grows with the search grows through [`grow`],
//! which first takes the new bytes — and, for the moment of the copy, the old ones too — from the
//! pool, then uses `try_reserve_exact`, so running out is an `Err` the search turns into
//! "unknown", never an abort.

use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes shared by all searches of one check.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
}

/// The pool is exhausted (or the allocator refused): the search must give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory;

impl MemoryPool {
    /// A pool of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        MemoryPool {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` if they fit under the limit.
    fn take(&self, bytes: usize) -> Result<(), OutOfMemory> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used
                .checked_add(bytes)
                .filter(|&n| n <= self.limit)
                .ok_or(OutOfMemory)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The most bytes ever taken at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// A new, empty account on this pool.
    pub(crate) fn account(&self) -> Account<'_> {
        Account {
            pool: self,
            held: 0,
            peak: 0,
        }
    }
}

/// What one search (or the checker itself) holds from the pool; returned in full when dropped,
/// which is when the search's containers are freed.
#[derive(Debug)]
pub(crate) struct Account<'a> {
    pool: &'a MemoryPool,
    held: usize,
    peak: usize,
}

impl Account<'_> {
    /// Takes `bytes` more.
    pub(crate) fn charge(&mut self, bytes: usize) -> Result<(), OutOfMemory> {
        self.pool.take(bytes)?;
        self.held += bytes;
        self.peak = self.peak.max(self.held);
        Ok(())
    }

    /// Gives `bytes` back (never more than held).
    pub(crate) fn refund(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held);
        self.pool.give_back(bytes);
        self.held -= bytes;
    }

    /// The most this account held at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }
}

impl Drop for Account<'_> {
    fn drop(&mut self) {
        self.pool.give_back(self.held);
    }
}

/// Makes room for `extra` more elements in `v`, paying for it first: grows by half (not double,
/// so the last step overshoots less) and charges the copy's transient old buffer as well.
pub(crate) fn grow<T>(
    v: &mut Vec<T>,
    extra: usize,
    acct: &mut Account<'_>,
) -> Result<(), OutOfMemory> {
    let need = v.len().checked_add(extra).ok_or(OutOfMemory)?;
    if need <= v.capacity() {
        return Ok(());
    }
    let cap = need.max(v.capacity() + v.capacity() / 2).max(16);
    let old_bytes = v.capacity() * size_of::<T>();
    let new_bytes = cap.checked_mul(size_of::<T>()).ok_or(OutOfMemory)?;
    // During the copy both buffers exist.
    acct.charge(new_bytes)?;
    v.try_reserve_exact(cap - v.len()).map_err(|_| {
        acct.refund(new_bytes);
        OutOfMemory
    })?;
    acct.refund(old_bytes);
    Ok(())
}
