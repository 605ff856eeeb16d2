//! Lowe's memoization cache: the set of `(linearized ops, model state)`
//! configurations already explored.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::mem::size_of;

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
        self.hash
    }
}

/// Hasher for keys that already are good hashes.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Marks the end of a hash chain.
const NONE: usize = usize::MAX;

/// One explored configuration, compactly encoded (see [`Memo`]).
struct Entry {
    frontier: usize,
    /// Offset of the window's words in [`Memo::words`].
    window_start: usize,
    window_len: usize,
    state: usize,
    /// Next entry with the same hash.
    next: usize,
}

/// Set of explored configurations `(linearized ops, model state)` plus the
/// interned model states.
///
/// The linearized set is stored compactly as `(frontier, window)`: with op ids
/// in invocation order, every op below `frontier` (the first unlinearized op)
/// is linearized and no op invoked after the frontier op returned can be, so
/// the bits in between (`window`, a few words for realistic concurrency)
/// determine the set exactly. This keeps memory per entry independent of the
/// history length. States are interned so each entry holds a small id, and
/// entries and windows live in flat arenas: the search allocates nothing per
/// configuration (allocation dominated the run time before).
pub(crate) struct Memo<S> {
    states: Vec<S>,
    state_ids: HashMap<S, usize, BuildHasherDefault<FxHasher>>,
    heads: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
    entries: Vec<Entry>,
    words: Vec<u64>,
}

impl<S: Hash + Eq + Clone> Memo<S> {
    /// An empty cache.
    pub(crate) fn new() -> Self {
        Memo {
            states: Vec::new(),
            state_ids: HashMap::default(),
            heads: HashMap::default(),
            entries: Vec::new(),
            words: Vec::new(),
        }
    }

    /// Id of `state`, adding it if new.
    pub(crate) fn intern(&mut self, state: S) -> usize {
        if let Some(&id) = self.state_ids.get(&state) {
            return id;
        }
        let id = self.states.len();
        self.states.push(state.clone());
        self.state_ids.insert(state, id);
        id
    }

    /// The state with id `id` (from [`Memo::intern`]).
    pub(crate) fn state(&self, id: usize) -> Option<&S> {
        self.states.get(id)
    }

    /// Records the configuration; true if it was not there before.
    pub(crate) fn insert(&mut self, frontier: usize, window: &[u64], state: usize) -> bool {
        let mut h = FxHasher::default();
        h.write_usize(frontier);
        h.write_usize(state);
        for &w in window {
            h.write_u64(w);
        }
        let hash = h.finish();
        let head = self.heads.get(&hash).copied().unwrap_or(NONE);
        let mut cur = head;
        while let Some(e) = self.entries.get(cur) {
            if e.frontier == frontier
                && e.state == state
                && self
                    .words
                    .get(e.window_start..e.window_start + e.window_len)
                    == Some(window)
            {
                return false;
            }
            cur = e.next;
        }
        self.entries.push(Entry {
            frontier,
            window_start: self.words.len(),
            window_len: window.len(),
            state,
            next: head,
        });
        self.words.extend_from_slice(window);
        self.heads.insert(hash, self.entries.len() - 1);
        true
    }

    /// Rough memory held (arenas, tables and inline state sizes; heap data
    /// owned by states is not counted), used to stop before exhausting RAM.
    pub(crate) fn approx_bytes(&self) -> usize {
        self.entries.capacity() * size_of::<Entry>()
            + self.words.capacity() * size_of::<u64>()
            + self.heads.capacity() * 2 * size_of::<u64>()
            + self.states.capacity() * 3 * size_of::<S>()
    }
}
