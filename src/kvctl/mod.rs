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

/// Set once stdout cannot take more: the rest of the output is dropped.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Why stdout failed, if it did for another reason than its reader going away.
static STDOUT_FAILURE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Writes kvctl's output to stdout ([`outln!`](crate::outln), [`out!`](crate::out)), where `print!`
/// would panic with a backtrace when the write fails. Once a write fails the rest of the output is
/// dropped and the command carries on to its end, so a change it is halfway through (`member add`
/// then promotes) is finished, not cut short:
/// - the reader went away (`kvctl status | head -3`): quietly, and the command's own exit status
///   stands (a "no" stays 1);
/// - anything else (a full disk under `> FILE`): [`stdout_failure`] says why, and kvctl reports it
///   as a failure once the command is done.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = STDOUT_FAILURE.set(e.to_string());
        }
    }
}

/// Why writing kvctl's output failed, other than its reader going away (see [`write_stdout`]).
pub fn stdout_failure() -> Option<&'static str> {
    STDOUT_FAILURE.get().map(String::as_str)
}

/// `eprintln!` for kvctl's messages, which have nowhere to report its own failure: a closed or
/// broken stderr (`kvctl get k 2>&1 | head -0`) loses the line instead of panicking.
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `eprintln!` for kvctl's messages, through [`write_stderr`](crate::kvctl::write_stderr).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::kvctl::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
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
