//! Signals to real processes from tests: SIGSTOP/SIGCONT to pause one, SIGKILL to crash it.

use std::process::Command;

/// Sends `signal` (as `kill` spells it: `-STOP`, `-CONT`, `-9`) to `pid`, failing the test if `kill` fails.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}
