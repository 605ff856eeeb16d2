//! Ports for real processes started by tests, which must be chosen before the process binds them.
//!
//! Why not "bind port 0, read the port, close": that port comes from the kernel's ephemeral range
//! (32768–60999), the same range every outgoing connection of every process takes its local port from,
//! so between the close and the daemon's bind another test's client socket can take it ("address in
//! use", one run in a few dozen). Ports here come from below that range, and each is claimed across
//! the test processes that nextest runs in parallel with a file created exclusively; claims older than
//! [`CLAIM_LIFETIME`] (longer than any test holds a port) are taken back.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Ports handed out lie in `[FIRST, FIRST + COUNT)`, below the ephemeral range.
const FIRST: u16 = 20_000;
const COUNT: u16 = 12_000;
/// How long a claim keeps other test processes off a port.
const CLAIM_LIFETIME: Duration = Duration::from_secs(600);

fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("ds824-test-ports")
}

/// A port on 127.0.0.1 that nothing listens on now and that no other test process was given recently.
pub fn free_port() -> u16 {
    let dir = claims_dir();
    std::fs::create_dir_all(&dir).expect("create the port claims directory");
    let start = (std::process::id() as u64 * 7919 + nanos()) % COUNT as u64;
    for k in 0..COUNT as u64 {
        let port = FIRST + ((start + k * 7) % COUNT as u64) as u16;
        if claim(&dir, port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

/// Claim `port` by creating its file; a claim past its lifetime is taken over.
fn claim(dir: &std::path::Path, port: u16) -> bool {
    let path = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > CLAIM_LIFETIME);
    stale && std::fs::remove_file(&path).is_ok() && create()
}
