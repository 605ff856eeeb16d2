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

/// Writes kvctl's output to stdout ([`outln!`](crate::outln), [`out!`](crate::out)). A reader that
/// went away (`kvctl status | head -3`) ends kvctl quietly with success, as it ends `cat`, where
/// `print!` would panic with a backtrace. Any other write error ends it with [`EXIT_ERROR`] and one line
/// on stderr, as every failure of a command does.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(EXIT_OK));
        }
        eprintln!("kvctl: error: cannot write the output: {e}");
        std::process::exit(i32::from(EXIT_ERROR));
    }
}

/// `println!` for kvctl's output, through [`write_stdout`](crate::kvctl::write_stdout).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::kvctl::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for kvctl's output, through [`write_stdout`](crate::kvctl::write_stdout).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::kvctl::write_stdout(format_args!($($arg)*))
    };
}

/// Split a `host:port,host:port` list, dropping empty items.
pub fn parse_cluster(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
