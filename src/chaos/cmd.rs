//! Running the system tools the local target drives (`ip`, `iptables`, `kill`), with one error type
//! that names the command line and what it printed, so a failed fault says exactly what failed.
//!
//! Why tools rather than netlink or signal crates: `ip`, `iptables` and `kill` are what an operator
//! would type to reproduce or undo a fault by hand, and the crate forbids `unsafe` (raw `kill(2)`,
//! `setns(2)`).

use std::process::Output;
use thiserror::Error;

/// A command that could not be run or did not succeed.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The program could not be started (not installed, not executable).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
}

fn line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn finish(command: String, output: Output) -> Result<String, CommandError> {
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    // Keep the tail: the reason is usually on the last line.
    let start = stderr
        .char_indices()
        .rev()
        .nth(400)
        .map_or(0, |(index, _)| index);
    Err(CommandError::Failed {
        command,
        status: output.status.to_string(),
        stderr: stderr[start..].to_string(),
    })
}

/// Run `program args...`, wait for it, and return its stdout if it succeeded.
pub async fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let command = line(program, args);
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    finish(command, output)
}

/// [`run`] without a runtime: for teardown from `Drop`, which may run during a panic or after the
/// runtime stopped polling.
pub fn run_blocking(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let command = line(program, args);
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    finish(command, output)
}

/// Send `signal` (`KILL`, `STOP`, `CONT`) to process `pid`.
pub async fn signal(pid: u32, signal: &str) -> Result<(), CommandError> {
    run("kill", &[&format!("-{signal}"), &pid.to_string()])
        .await
        .map(drop)
}
