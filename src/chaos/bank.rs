//! The `bank` workload's ledgers: a few accounts kept in one key, moved between by compare-and-swap.
//!
//! Why one key per ledger: the stores offer single-key operations only (get, put, append, cas), so a
//! transfer between two accounts is atomic only if both balances live in the same value. A ledger is
//! the text `100,100,100,100,100` ([`ACCOUNTS`] balances of [`OPENING_BALANCE`]); a transfer reads it
//! and swaps in the ledger with an amount moved from one account to another (`cas(old, new)`), so a
//! concurrent transfer that read the same ledger loses the swap instead of overwriting it. A run uses
//! several ledgers at a time (keys `bN`), so on the sharded store they land in different shards.
//!
//! What must hold ([`audit`], the `bank` invariant of [`super::verdict`]): every ledger a client reads
//! has the opening total and no negative balance. The workload itself never makes a balance negative
//! ([`transfer`] moves at most what the source holds), so a ledger that breaks either rule was made by
//! the store: a lost or doubled swap, a read of a state that never existed.

use rand::seq::IndexedRandom;
use rand::Rng;

/// Accounts in one ledger.
pub const ACCOUNTS: usize = 5;
/// Every account's balance when a ledger is opened.
pub const OPENING_BALANCE: i64 = 100;
/// The sum of a ledger's balances: what every read must show.
pub const TOTAL: i64 = ACCOUNTS as i64 * OPENING_BALANCE;

/// A ledger as first written (by a cas from absent: whichever client gets there first opens it).
pub fn opening() -> String {
    encode(&[OPENING_BALANCE; ACCOUNTS])
}

/// `balances` as stored: decimal numbers separated by commas.
pub fn encode(balances: &[i64]) -> String {
    balances
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The balances in a stored ledger, or why the text is not one (the store handed back something no
/// client wrote: that is itself a finding, not an error of the harness).
pub fn parse(text: &str) -> Result<Vec<i64>, String> {
    let balances = text
        .split(',')
        .map(|field| field.trim().parse::<i64>())
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|e| format!("not a ledger ({e})"))?;
    match balances.len() {
        ACCOUNTS => Ok(balances),
        n => Err(format!("not a ledger ({n} accounts, not {ACCOUNTS})")),
    }
}

/// What is wrong with a ledger read back, if anything: not a ledger, a total other than [`TOTAL`], a
/// negative balance. The text names the totals found.
pub fn audit(text: &str) -> Result<(), String> {
    let balances = parse(text)?;
    let total: i64 = balances.iter().fold(0i64, |sum, b| sum.saturating_add(*b));
    let negative: Vec<String> = balances
        .iter()
        .enumerate()
        .filter(|(_, b)| **b < 0)
        .map(|(account, b)| format!("account {account} holds {b}"))
        .collect();
    match (total == TOTAL, negative.is_empty()) {
        (true, true) => Ok(()),
        (true, false) => Err(format!("total {total}, but {}", negative.join(", "))),
        (false, true) => Err(format!("total {total}, expected {TOTAL}")),
        (false, false) => Err(format!(
            "total {total}, expected {TOTAL}; {}",
            negative.join(", ")
        )),
    }
}

/// The ledger after moving a random amount (at least 1, at most the whole balance) from a random
/// account that holds something to another one; `None` if no account holds anything (a ledger
/// [`audit`] already rejects). The total is unchanged and no balance becomes negative.
pub fn transfer(balances: &[i64], rng: &mut impl Rng) -> Option<Vec<i64>> {
    let funded: Vec<usize> = (0..balances.len()).filter(|&a| balances[a] > 0).collect();
    let &from = funded.choose(rng)?;
    let others: Vec<usize> = (0..balances.len()).filter(|&a| a != from).collect();
    let &to = others.choose(rng)?;
    let amount = rng.random_range(1..=balances[from]);
    let mut next = balances.to_vec();
    next[from] -= amount;
    next[to] = next[to].saturating_add(amount);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn transfers_keep_the_total_and_never_overdraw() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut ledger = opening();
        for _ in 0..1000 {
            let balances = parse(&ledger).expect("a ledger");
            ledger = encode(&transfer(&balances, &mut rng).expect("money to move"));
            assert_eq!(audit(&ledger), Ok(()), "{ledger}");
        }
        assert_ne!(ledger, opening(), "a thousand transfers moved nothing");
        assert_eq!(transfer(&[0; ACCOUNTS], &mut rng), None);
    }

    #[test]
    fn an_audit_names_what_is_wrong() {
        assert_eq!(audit(&opening()), Ok(()));
        let short = audit("100,100,100,100,90").expect_err("short by 10");
        assert!(short.contains("total 490, expected 500"), "{short}");
        let overdrawn = audit("150,100,100,100,-50").expect_err("an overdraft");
        assert!(overdrawn.contains("account 4 holds -50"), "{overdrawn}");
        assert!(audit("100,100").is_err());
        assert!(audit("1;2;3").is_err());
        assert!(audit("").is_err());
    }
}
