//! The YCSB core workloads (Cooper et al., SoCC 2010) for `kvctl bench --kind ycsb-*`: the standard
//! mixes etcd, TiKV and every other store publish numbers for, so ours can be compared like for like.
//!
//! | workload | mix | key choice |
//! |---|---|---|
//! | A (update heavy) | 50 % read, 50 % update | Zipfian |
//! | B (read mostly) | 95 % read, 5 % update | Zipfian |
//! | C (read only) | 100 % read | Zipfian |
//! | D (read latest) | 95 % read, 5 % insert | latest |
//! | F (read-modify-write) | 50 % read, 50 % read-modify-write | Zipfian |
//!
//! Workload E (short range scans) is left out: the store has no range reads.
//!
//! The Zipfian constant is YCSB's 0.99; ranks are drawn from a precomputed cumulative distribution
//! (exact, one binary search per draw) rather than YCSB's approximation.

use rand::Rng;

/// One of the supported core workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 50 % read, 50 % update, Zipfian.
    A,
    /// 95 % read, 5 % update, Zipfian.
    B,
    /// Reads only, Zipfian.
    C,
    /// 95 % read, 5 % insert, reads favour the newest keys.
    D,
    /// 50 % read, 50 % read-modify-write, Zipfian.
    F,
}

/// One operation of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Get.
    Read,
    /// Put to an existing key.
    Update,
    /// Put to a new key.
    Insert,
    /// Get, then put the key (counted as one operation, as YCSB does).
    ReadModifyWrite,
}

impl Workload {
    /// The next operation, drawn with the workload's proportions.
    pub fn next_op(self, rng: &mut impl Rng) -> Op {
        let roll = rng.random_range(0..100u32);
        match self {
            Workload::A if roll < 50 => Op::Read,
            Workload::A => Op::Update,
            Workload::B if roll < 95 => Op::Read,
            Workload::B => Op::Update,
            Workload::C => Op::Read,
            Workload::D if roll < 95 => Op::Read,
            Workload::D => Op::Insert,
            Workload::F if roll < 50 => Op::Read,
            Workload::F => Op::ReadModifyWrite,
        }
    }

    /// Whether reads favour the newest keys (D) rather than a fixed popular set.
    pub fn latest(self) -> bool {
        self == Workload::D
    }
}

/// YCSB's Zipfian constant.
pub const ZIPF_THETA: f64 = 0.99;

/// Draws ranks `0..n` with probability proportional to `1 / (rank + 1)^θ`.
#[derive(Clone, Debug)]
pub struct Zipfian {
    cumulative: Vec<f64>,
}

impl Zipfian {
    /// The distribution over `n` ranks (at least 1).
    pub fn new(n: usize, theta: f64) -> Zipfian {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(theta);
                total
            })
            .collect();
        Zipfian { cumulative }
    }

    /// A rank; 0 is the most popular.
    pub fn next(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let pick = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c < pick)
            .min(self.cumulative.len() - 1)
    }
}

/// Which key an operation touches: popular keys scattered over the key space (YCSB scrambles ranks
/// so hot keys do not sit side by side), or for workload D the newest keys first.
pub fn key_index(workload: Workload, zipf: &Zipfian, rng: &mut impl Rng, keys: usize) -> usize {
    let rank = zipf.next(rng);
    let keys = keys.max(1);
    if workload.latest() {
        keys - 1 - rank.min(keys - 1)
    } else {
        // A fixed permutation-like scatter: multiply by a large odd constant modulo the key count.
        ((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_mixes_have_their_proportions() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (workload, op, share) in [
            (Workload::A, Op::Read, 0.50),
            (Workload::B, Op::Update, 0.05),
            (Workload::C, Op::Read, 1.0),
            (Workload::D, Op::Insert, 0.05),
            (Workload::F, Op::ReadModifyWrite, 0.50),
        ] {
            let n = 100_000;
            let seen = (0..n).filter(|_| workload.next_op(&mut rng) == op).count();
            let got = seen as f64 / n as f64;
            assert!((got - share).abs() < 0.01, "{workload:?} {op:?}: {got}");
        }
    }

    #[test]
    fn zipfian_keys_are_skewed_and_uniform_would_not_be() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let zipf = Zipfian::new(1000, ZIPF_THETA);
        let mut counts = vec![0usize; 1000];
        let draws = 200_000;
        for _ in 0..draws {
            counts[key_index(Workload::A, &zipf, &mut rng, 1000)] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // With θ = 0.99 over 1,000 keys the hottest key takes ~13 % and the top ten ~39 %; uniform
        // choice would give 0.1 % and 1 %.
        let top = counts[0] as f64 / draws as f64;
        let top10 = counts[..10].iter().sum::<usize>() as f64 / draws as f64;
        assert!((0.11..0.15).contains(&top), "hottest key {top}");
        assert!((0.35..0.43).contains(&top10), "top ten {top10}");
    }

    #[test]
    fn workload_d_reads_the_newest_keys_most() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let zipf = Zipfian::new(500, ZIPF_THETA);
        let newest = (0..10_000)
            .filter(|_| key_index(Workload::D, &zipf, &mut rng, 500) >= 490)
            .count();
        assert!(
            newest > 3_000,
            "{newest} of 10,000 reads hit the 10 newest keys"
        );
    }
}
