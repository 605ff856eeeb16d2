//! Assigning shards to groups: as even as possible, moving as few shards as possible, and the same result
//! on every replica (only sorted collections, no hash-map iteration order).

use super::state::Gid;
use std::collections::BTreeMap;

/// Reassign `shards` (shard → gid, 0 = unassigned) to the groups `gids` so that counts differ by at
/// most one, moving only shards that must move: shards of departed groups or of unassigned slots, and
/// the excess of groups above their target. Groups that already hold more shards keep the larger
/// targets, which is what makes the number of moves minimal.
pub fn rebalance(shards: &mut [Gid], gids: &[Gid]) {
    let mut groups: Vec<Gid> = gids.to_vec();
    groups.sort_unstable();
    groups.dedup();
    if groups.is_empty() {
        shards.iter_mut().for_each(|g| *g = 0);
        return;
    }
    let mut owned: BTreeMap<Gid, Vec<usize>> = groups.iter().map(|&g| (g, Vec::new())).collect();
    let mut pool: Vec<usize> = Vec::new();
    for (shard, gid) in shards.iter().enumerate() {
        match owned.get_mut(gid) {
            Some(list) => list.push(shard),
            None => pool.push(shard),
        }
    }
    // Larger holders first (ties: smaller gid), so they get the "+1" targets.
    let mut order = groups.clone();
    order.sort_by_key(|g| (std::cmp::Reverse(owned[g].len()), *g));
    let base = shards.len() / groups.len();
    let extra = shards.len() % groups.len();
    let target: BTreeMap<Gid, usize> = order
        .iter()
        .enumerate()
        .map(|(rank, &g)| (g, base + usize::from(rank < extra)))
        .collect();
    for (gid, list) in owned.iter_mut() {
        while list.len() > target[gid] {
            if let Some(shard) = list.pop() {
                pool.push(shard);
            }
        }
    }
    pool.sort_unstable();
    let mut pool = pool.into_iter();
    for (gid, list) in owned.iter_mut() {
        while list.len() < target[gid] {
            match pool.next() {
                Some(shard) => list.push(shard),
                None => break,
            }
        }
    }
    for (gid, list) in &owned {
        for &shard in list {
            shards[shard] = *gid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn counts(shards: &[Gid], gids: &[Gid]) -> Vec<usize> {
        gids.iter()
            .map(|g| shards.iter().filter(|s| *s == g).count())
            .collect()
    }

    #[test]
    fn joins_and_leaves_stay_balanced_and_move_the_minimum() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..2000 {
            let nshards = rng.random_range(1..20);
            let mut gids: Vec<Gid> = (1..=rng.random_range(1..8)).collect();
            let mut shards = vec![0; nshards];
            rebalance(&mut shards, &gids);
            for _ in 0..5 {
                let before = shards.clone();
                let joining = rng.random_bool(0.5) || gids.len() == 1;
                let changed: Gid = if joining {
                    let g = gids.iter().max().copied().unwrap_or(0) + 1;
                    gids.push(g);
                    g
                } else {
                    gids.remove(rng.random_range(0..gids.len()))
                };
                rebalance(&mut shards, &gids);
                let c = counts(&shards, &gids);
                let (max, min) = (c.iter().max().copied(), c.iter().min().copied());
                assert!(
                    max.zip(min).is_some_and(|(a, b)| a - b <= 1),
                    "unbalanced {c:?}"
                );
                assert!(shards.iter().all(|g| gids.contains(g)), "unassigned shard");
                for (shard, (&old, &new)) in before.iter().zip(&shards).enumerate() {
                    if old != new {
                        // A join moves shards only to the new group; a leave only from the old one.
                        if joining {
                            assert_eq!(new, changed, "shard {shard} moved between old groups");
                        } else {
                            assert_eq!(
                                old, changed,
                                "shard {shard} moved between remaining groups"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn more_groups_than_shards_leaves_some_groups_empty() {
        let mut shards = vec![0; 3];
        rebalance(&mut shards, &[5, 4, 3, 2, 1]);
        let c = counts(&shards, &[1, 2, 3, 4, 5]);
        assert_eq!(c.iter().sum::<usize>(), 3);
        assert!(c.iter().all(|&n| n <= 1));
    }

    #[test]
    fn no_groups_means_no_owner() {
        let mut shards = vec![3; 4];
        rebalance(&mut shards, &[]);
        assert_eq!(shards, vec![0; 4]);
    }
}
