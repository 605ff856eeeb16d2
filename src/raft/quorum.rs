//! Majority rules as pure functions, so the arithmetic every safety argument rests on is tested alone.

/// How many votes make a majority of `voters`.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// The largest value that at least a majority of `values` (one per voter) has reached: the commit index
/// when `values` are match indices, the confirmed ReadIndex round when they are acknowledged rounds.
pub fn quorum_value(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[majority(values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_of_odd_and_even_groups() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn quorum_value_is_reached_by_a_majority() {
        assert_eq!(quorum_value(&mut [5, 1, 3]), 3);
        assert_eq!(quorum_value(&mut [5, 5, 1, 1, 1]), 1);
        assert_eq!(quorum_value(&mut [9, 8, 7, 1, 1]), 7);
        assert_eq!(quorum_value(&mut [4]), 4);
        assert_eq!(quorum_value(&mut [4, 2]), 2);
        assert_eq!(quorum_value(&mut []), 0);
    }
}
