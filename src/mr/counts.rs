//! The per-task table of a counting map ([`App::counts`](crate::mr::app::App::counts)): key → count.
//!
//! Word count spends its time here, once per word of the input, so the table is built for short keys
//! found inside a larger text: a key of up to 16 bytes is held inline as two zero-padded words, read
//! straight out of the text, hashed with two multiplications and compared as three integers, with no
//! call to `memcmp`, no hashing pass over the bytes and no allocation. Longer keys keep their first 16
//! bytes inline and the rest in a side vector. Open addressing with linear probing, at most half full.
//!
//! The hash is not keyed: a table lives for one map task and only costs its own task time if an input
//! is built to collide, which is no worse than the input simply being large.

/// Key bytes held inline.
const INLINE: usize = 16;
/// An empty slot's `len`.
const EMPTY: u64 = u64::MAX;
/// `long` of a key that fits inline.
const NO_LONG: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Slot {
    /// The first 16 key bytes, little-endian, zero-padded.
    k0: u64,
    k1: u64,
    /// Key length, or [`EMPTY`].
    len: u64,
    /// Index into `Counts::long` of the whole key, when longer than [`INLINE`].
    long: u32,
    count: u64,
}

const VACANT: Slot = Slot {
    k0: 0,
    k1: 0,
    len: EMPTY,
    long: NO_LONG,
    count: 0,
};

/// Per-key counts a counting map adds to: one table per map task, so a key is stored once per task
/// however often it occurs.
pub struct Counts {
    slots: Vec<Slot>,
    /// log2 of `slots.len()`.
    bits: u32,
    used: usize,
    long: Vec<Box<str>>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            slots: vec![VACANT; 1 << 10],
            bits: 10,
            used: 0,
            long: Vec::new(),
        }
    }
}

/// The first 16 bytes of `text[start..start + len]`, zero-padded: read as two words when the text has
/// 16 bytes from `start` (nearly always), copied otherwise.
fn inline_key(text: &[u8], start: usize, len: usize) -> (u64, u64) {
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
    let (k0, k1) = match text.get(start..start + INLINE) {
        Some(window) => (word(&window[..8]), word(&window[8..])),
        None => {
            let mut buf = [0u8; INLINE];
            let take = len.min(INLINE);
            buf[..take].copy_from_slice(&text[start..start + take]);
            (word(&buf[..8]), word(&buf[8..]))
        }
    };
    // Without branches: key lengths vary word to word, so a branch on them would mispredict.
    let keep = u128::MAX
        .checked_shr(128 - 8 * len.min(INLINE) as u32)
        .unwrap_or(0);
    (k0 & keep as u64, k1 & (keep >> 64) as u64)
}

fn hash(k0: u64, k1: u64, len: usize, rest: &[u8]) -> u64 {
    const M0: u64 = 0x9E37_79B9_7F4A_7C15;
    const M1: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut h = (k0 ^ len as u64).wrapping_mul(M0) ^ k1.wrapping_mul(M1);
    for chunk in rest.chunks(8) {
        let mut buf = [0u8; 8];
        buf[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(buf)).wrapping_mul(M0);
    }
    h ^ (h >> 32)
}

impl Counts {
    /// Adds `n` to `key`'s count.
    pub fn add(&mut self, key: &str, n: u64) {
        self.add_within(key, 0, key.len(), n);
    }

    /// Adds `n` to the count of the key `text[start..end]` (which must lie on character boundaries),
    /// reading it in place: the fast way for words found inside a chunk of input.
    pub fn add_within(&mut self, text: &str, start: usize, end: usize, n: u64) {
        let bytes = text.as_bytes();
        let len = end - start;
        let (k0, k1) = inline_key(bytes, start, len);
        let rest = if len > INLINE {
            &bytes[start + INLINE..end]
        } else {
            &[]
        };
        let mask = (1usize << self.bits) - 1;
        let mut i = (hash(k0, k1, len, rest).wrapping_mul(0x2545_F491_4F6C_DD1D)
            >> (64 - self.bits)) as usize;
        loop {
            let slot = &mut self.slots[i];
            if slot.len == EMPTY {
                break;
            }
            if slot.k0 == k0
                && slot.k1 == k1
                && slot.len == len as u64
                && (slot.long == NO_LONG
                    || self.long[slot.long as usize].as_bytes() == &bytes[start..end])
            {
                slot.count += n;
                return;
            }
            i = (i + 1) & mask;
        }
        let long = if len > INLINE {
            self.long.push(text[start..end].into());
            (self.long.len() - 1) as u32
        } else {
            NO_LONG
        };
        self.slots[i] = Slot {
            k0,
            k1,
            len: len as u64,
            long,
            count: n,
        };
        self.used += 1;
        if self.used * 2 > self.slots.len() {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let old = std::mem::replace(&mut self.slots, vec![VACANT; 1 << (self.bits + 1)]);
        self.bits += 1;
        let mask = (1usize << self.bits) - 1;
        for slot in old.into_iter().filter(|s| s.len != EMPTY) {
            let rest = match slot.long {
                NO_LONG => &[][..],
                long => &self.long[long as usize].as_bytes()[INLINE..],
            };
            let h = hash(slot.k0, slot.k1, slot.len as usize, rest);
            let mut i = (h.wrapping_mul(0x2545_F491_4F6C_DD1D) >> (64 - self.bits)) as usize;
            while self.slots[i].len != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// Every key with its total, in no particular order.
    pub fn into_pairs(self) -> impl Iterator<Item = (String, u64)> {
        let longs = self.long;
        self.slots
            .into_iter()
            .filter(|s| s.len != EMPTY)
            .map(move |slot| {
                let key = match slot.long {
                    NO_LONG => {
                        let mut bytes = [0u8; INLINE];
                        bytes[..8].copy_from_slice(&slot.k0.to_le_bytes());
                        bytes[8..].copy_from_slice(&slot.k1.to_le_bytes());
                        // The bytes came from a `&str` on character boundaries.
                        String::from_utf8_lossy(&bytes[..slot.len as usize]).into_owned()
                    }
                    index => longs
                        .get(index as usize)
                        .map_or_else(String::new, |key| key.to_string()),
                };
                (key, slot.count)
            })
    }

    /// Number of distinct keys.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn counts_agree_with_a_hash_map_for_keys_of_every_length() {
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut text = String::new();
        let mut spans = Vec::new();
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let start = text.len();
            for _ in 0..len {
                text.push(['a', 'b', 'é', '日'][(next() % 4) as usize]);
            }
            spans.push((start, text.len()));
            text.push(' ');
        }
        let mut counts = Counts::default();
        let mut reference: HashMap<&str, u64> = HashMap::new();
        for &(start, end) in &spans {
            counts.add_within(&text, start, end, 2);
            *reference.entry(&text[start..end]).or_default() += 2;
        }
        // The last key sits at the very end of the text: read by copy, not by window.
        counts.add("tail", 1);
        *reference.entry("tail").or_default() += 1;
        assert_eq!(counts.len(), reference.len());
        let got: HashMap<String, u64> = counts.into_pairs().collect();
        let want: HashMap<String, u64> = reference
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(got, want);
    }
}
