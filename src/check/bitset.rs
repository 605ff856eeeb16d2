//! Fixed-size bitset used as the "which ops are linearized" half of the
//! memoization key.

/// A fixed-capacity set of small integers (operation ids within a partition).
///
/// Hash + Eq so it can be part of the WGL cache key; boxed slice so cloning
/// allocates exactly the words needed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Bitset {
    words: Box<[u64]>,
}

impl Bitset {
    /// An empty set able to hold ids `0..capacity`.
    pub(crate) fn new(capacity: usize) -> Self {
        Bitset {
            words: vec![0; capacity.div_ceil(64)].into_boxed_slice(),
        }
    }

    /// Adds `i`; out-of-range ids are ignored (callers only use ids they sized for).
    pub(crate) fn set(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    /// Removes `i`.
    pub(crate) fn clear(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Whether `i` is in the set.
    pub(crate) fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Writes bits `start..end` into `out`, re-based so bit `start` becomes
    /// bit 0 of `out[0]` (used to build compact memo keys).
    pub(crate) fn extract_into(&self, start: usize, end: usize, out: &mut Vec<u64>) {
        out.clear();
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(64);
            let (w, shift) = (offset / 64, offset % 64);
            let lo = self.words.get(w).map_or(0, |x| x >> shift);
            let hi = if shift == 0 {
                0
            } else {
                self.words.get(w + 1).map_or(0, |x| x << (64 - shift))
            };
            let mask = if len == 64 {
                u64::MAX
            } else {
                (1u64 << len) - 1
            };
            out.push((lo | hi) & mask);
            offset += len;
        }
    }

    /// Writes the members, ascending, into `out` (used for the memo's sorted info-op lists).
    pub(crate) fn members_into(&self, out: &mut Vec<u32>) {
        out.clear();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                // Ids fit in u32: a partition with 2^32 ops could not be loaded.
                out.push((w * 64 + bit) as u32);
                bits &= bits - 1;
            }
        }
    }
}
