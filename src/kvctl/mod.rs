//! The logic behind the `kvctl` command line: cluster status rendering, the load generator and the
//! history checker front end. The binary only parses flags; keeping this in the library lets tests and
//! other tools reuse it.
//!
//! Exit codes are part of the interface (scripts branch on them), so they are named here once.

pub mod backup;
pub mod bench;
pub mod breakdown;
pub mod check;
pub mod ctrler;
pub mod member;
pub mod shard;
pub mod status;
pub mod ycsb;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the answer is "no" — key not found, cas mismatch, history not linearizable.
pub const EXIT_NO: u8 = 1;
/// Exit code: the command could not be carried out (bad input, cluster unreachable, ...).
pub const EXIT_ERROR: u8 = 2;
/// Exit code: `kvctl check` could not decide within its budget.
pub const EXIT_UNKNOWN: u8 = 3;

/// Split a `host:port,host:port` list, dropping empty items.
pub fn parse_cluster(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
