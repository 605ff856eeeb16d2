//! Seeds: every test has a fixed default seed (so CI is repeatable) that `RAFT_SEED` overrides.

/// The seed for a test: `RAFT_SEED` if set, otherwise a hash of the test's name.
pub fn for_test(name: &str) -> u64 {
    match std::env::var("RAFT_SEED") {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("RAFT_SEED must be an unsigned integer, got {value:?}")),
        Err(_) => crate::hash::fnv1a(name.as_bytes()),
    }
}

/// An environment variable as a number, or `default` when unset.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be an unsigned integer, got {value:?}")),
        Err(_) => default,
    }
}

/// Fail a simulated test at simulated time `now_ms`, naming the seed that replays its schedule.
#[track_caller]
pub fn fail(seed: u64, now_ms: u64, message: impl std::fmt::Display) -> ! {
    panic!("{message} [at {now_ms} ms; reproduce with RAFT_SEED={seed}]")
}
