//! Lowe's memoization cache: the configurations `(linearized ops, model state)` already explored,
//! with the subsumption that makes indeterminate operations cheap.

use std::hash::{Hash, Hasher};
use std::mem::size_of;

use super::budget::{grow, Account, OutOfMemory};

/// Small, fast non-cryptographic hasher (FxHash's mixing step).
///
/// The cache is hashed millions of times per second on attacker-free data,
/// so SipHash's DoS resistance buys nothing and costs most of the search time.
#[derive(Default)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The low bits index the tables; fold the well-mixed high bits in.
        self.hash ^ (self.hash >> 32)
    }
}

/// End of a hash chain / empty slot.
const NONE: u32 = u32::MAX;

/// One explored configuration, compactly encoded (see [`Memo`]).
struct Entry {
    hash: u64,
    frontier: usize,
    state: u32,
    /// Next entry in the same bucket.
    next: u32,
    /// Offset and length of the window's words in [`Memo::words`].
    words_at: usize,
    words_len: u32,
    /// Offset and length of the linearized info ops (sorted ids) in [`Memo::infos`].
    infos_at: usize,
    infos_len: u32,
}

/// Set of explored configurations plus the interned model states, every byte paid for from the
/// search's [`Account`].
///
/// A configuration is `(definite ops linearized, info ops linearized, model state)`:
/// * the definite set is stored as `(frontier, window)`: with definite op ids in invocation
///   order, every op below `frontier` (the first unlinearized one) is linearized and no op
///   invoked after the frontier op returned can be, so the bits in between (`window`, a few words
///   for realistic concurrency) determine the set exactly — memory per entry does not grow with
///   the history;
/// * the info set is a sorted list of ids (info ops are linearized lazily, so it stays short);
/// * states are interned, so an entry holds a small id and each state is stored once.
///
/// **Subsumption.** [`Memo::insert`] refuses a configuration if one with the same definite set
/// and state and a *subset* of its info ops was explored before. That is sound: info ops never
/// return, so they never constrain when another op may be linearized, and every way to finish
/// from the larger configuration finishes the smaller one too (the extra info ops are simply
/// linearized at the same points, or stay pending = never happened). Without it, `k` concurrent
/// info ops give `2^k` configurations per state; with it, a state is explored again only with an
/// info set that is not a superset of one already tried.
pub(crate) struct Memo<S> {
    states: Vec<S>,
    state_hashes: Vec<u64>,
    /// Open-addressing table of state ids (`NONE` = empty), at most half full.
    state_table: Vec<u32>,
    /// Heads of the configuration chains (`NONE` = empty), one per bucket.
    heads: Vec<u32>,
    entries: Vec<Entry>,
    words: Vec<u64>,
    infos: Vec<u32>,
}

fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = FxHasher::default();
    value.hash(&mut h);
    h.finish()
}

/// Whether sorted list `small` is a subset of sorted list `big`.
fn is_subset(small: &[u32], big: &[u32]) -> bool {
    if small.len() > big.len() {
        return false;
    }
    let mut rest = big.iter();
    small.iter().all(|x| rest.any(|y| y == x))
}

impl<S: Hash + Eq> Memo<S> {
    /// An empty cache.
    pub(crate) fn new() -> Self {
        Memo {
            states: Vec::new(),
            state_hashes: Vec::new(),
            state_table: Vec::new(),
            heads: Vec::new(),
            entries: Vec::new(),
            words: Vec::new(),
            infos: Vec::new(),
        }
    }

    /// Id of `state`, adding it if new; `heap_bytes` is what the state owns beyond its inline
    /// size (charged only if it is kept).
    pub(crate) fn intern(
        &mut self,
        state: S,
        heap_bytes: usize,
        acct: &mut Account<'_>,
    ) -> Result<u32, OutOfMemory> {
        let hash = hash_of(&state);
        if let Some(id) = self.find_state(hash, &state) {
            return Ok(id);
        }
        if (self.states.len() + 1) * 2 > self.state_table.len() {
            self.rehash_states(acct)?;
        }
        let id = u32::try_from(self.states.len()).map_err(|_| OutOfMemory)?;
        grow(&mut self.states, 1, acct)?;
        grow(&mut self.state_hashes, 1, acct)?;
        acct.charge(heap_bytes)?;
        self.states.push(state);
        self.state_hashes.push(hash);
        self.place_state(hash, id);
        Ok(id)
    }

    fn find_state(&self, hash: u64, state: &S) -> Option<u32> {
        let mask = self.state_table.len().checked_sub(1)?;
        let mut slot = hash as usize & mask;
        loop {
            let id = *self.state_table.get(slot)?;
            if id == NONE {
                return None;
            }
            let i = id as usize;
            if self.state_hashes.get(i) == Some(&hash) && self.states.get(i) == Some(state) {
                return Some(id);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn place_state(&mut self, hash: u64, id: u32) {
        let mask = self.state_table.len().wrapping_sub(1);
        let mut slot = hash as usize & mask;
        while let Some(cell) = self.state_table.get_mut(slot) {
            if *cell == NONE {
                *cell = id;
                return;
            }
            slot = (slot + 1) & mask;
        }
    }

    fn rehash_states(&mut self, acct: &mut Account<'_>) -> Result<(), OutOfMemory> {
        let len = (self.state_table.len() * 2).max(64);
        let mut table = Vec::new();
        grow(&mut table, len, acct)?;
        table.resize(len, NONE);
        let old = std::mem::replace(&mut self.state_table, table);
        acct.refund(old.capacity() * size_of::<u32>());
        for id in 0..self.states.len() {
            let hash = self.state_hashes.get(id).copied().unwrap_or(0);
            // `id < states.len() <= u32::MAX` (checked when interned).
            self.place_state(hash, id as u32);
        }
        Ok(())
    }

    /// The state with id `id` (from [`Memo::intern`]).
    pub(crate) fn state(&self, id: u32) -> Option<&S> {
        self.states.get(id as usize)
    }

    /// Records the configuration; `Ok(false)` if it, or one that subsumes it (same definite set
    /// and state, a subset of its info ops), was explored before.
    pub(crate) fn insert(
        &mut self,
        frontier: usize,
        window: &[u64],
        infos: &[u32],
        state: u32,
        acct: &mut Account<'_>,
    ) -> Result<bool, OutOfMemory> {
        let mut h = FxHasher::default();
        h.write_usize(frontier);
        h.write_u32(state);
        for &w in window {
            h.write_u64(w);
        }
        let hash = h.finish();
        if self.entries.len() >= self.heads.len() {
            self.rehash_entries(acct)?;
        }
        let bucket = hash as usize & (self.heads.len() - 1);
        let head = self.heads.get(bucket).copied().unwrap_or(NONE);
        let mut cur = head;
        while let Some(e) = self.entries.get(cur as usize) {
            if e.hash == hash
                && e.frontier == frontier
                && e.state == state
                && self
                    .words
                    .get(e.words_at..e.words_at + e.words_len as usize)
                    == Some(window)
                && self
                    .infos
                    .get(e.infos_at..e.infos_at + e.infos_len as usize)
                    .is_some_and(|seen| is_subset(seen, infos))
            {
                return Ok(false);
            }
            cur = e.next;
        }
        let index = u32::try_from(self.entries.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or(OutOfMemory)?;
        let words_len = u32::try_from(window.len()).map_err(|_| OutOfMemory)?;
        let infos_len = u32::try_from(infos.len()).map_err(|_| OutOfMemory)?;
        grow(&mut self.entries, 1, acct)?;
        grow(&mut self.words, window.len(), acct)?;
        grow(&mut self.infos, infos.len(), acct)?;
        self.entries.push(Entry {
            hash,
            frontier,
            state,
            next: head,
            words_at: self.words.len(),
            words_len,
            infos_at: self.infos.len(),
            infos_len,
        });
        self.words.extend_from_slice(window);
        self.infos.extend_from_slice(infos);
        if let Some(slot) = self.heads.get_mut(bucket) {
            *slot = index;
        }
        Ok(true)
    }

    fn rehash_entries(&mut self, acct: &mut Account<'_>) -> Result<(), OutOfMemory> {
        let len = (self.heads.len() * 2).max(1024);
        let mut heads = Vec::new();
        grow(&mut heads, len, acct)?;
        heads.resize(len, NONE);
        let mask = len - 1;
        for (i, e) in self.entries.iter_mut().enumerate() {
            let bucket = e.hash as usize & mask;
            if let Some(slot) = heads.get_mut(bucket) {
                e.next = *slot;
                // `i < entries.len() < u32::MAX` (checked when inserted).
                *slot = i as u32;
            }
        }
        let old = std::mem::replace(&mut self.heads, heads);
        acct.refund(old.capacity() * size_of::<u32>());
        Ok(())
    }

    /// Configurations recorded.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Distinct model states interned.
    pub(crate) fn states(&self) -> usize {
        self.states.len()
    }
}
