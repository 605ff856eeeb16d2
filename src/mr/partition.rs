//! Which reduce task a key belongs to.
//!
//! Every mapper must agree on this without talking to each other, and the sequential reference must agree
//! with the distributed run, so it is a fixed, platform-independent hash rather than `std`'s randomised one.

/// 6.824's `ihash`: FNV-1a 32-bit, masked to a non-negative `i32` so results match the Go labs bit for bit.
pub fn ihash(key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash & 0x7fff_ffff
}

/// The reduce bucket of `key` among `n_reduce` (which callers guarantee is at least 1).
pub fn bucket(key: &str, n_reduce: u32) -> u32 {
    ihash(key) % n_reduce.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_go_fnv1a() {
        // Values from Go: fnv.New32a() over the bytes, & 0x7fffffff.
        assert_eq!(ihash(""), 0x811c_9dc5 & 0x7fff_ffff);
        assert_eq!(ihash("a"), 0xe40c_292c & 0x7fff_ffff);
        assert_eq!(ihash("foobar"), 0xbf9c_f968 & 0x7fff_ffff);
    }

    #[test]
    fn bucket_is_in_range() {
        for key in ["", "a", "zebra", "the"] {
            assert!(bucket(key, 10) < 10);
        }
        assert_eq!(bucket("anything", 1), 0);
    }
}
