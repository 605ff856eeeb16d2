//! Stable hashes: their values are part of the data format (which shard a stored key belongs to) or of
//! reproducibility (the seed a test name stands for), so they must never change between builds or
//! releases, unlike `std`'s `DefaultHasher`.

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
