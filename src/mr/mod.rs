//! MapReduce (Dean & Ghemawat, OSDI 2004; MIT 6.824 lab 1) as daemons.
//!
//! A [coordinator](coordinator_service) queues jobs, persists their progress in sled and hands tasks to
//! [workers](worker) that pull them over gRPC. Map tasks partition their output by [`partition::ihash`] into
//! `mr-<map>-<reduce>.job<job>.<attempt>` files; reduce tasks turn partitions into `mr-out-<reduce>`. Every file is written
//! under a temporary name and renamed into place ([`fsutil::write_atomic`]), so a task that crashes half
//! way or runs twice never leaves a partial or doubled output, and the coordinator simply accepts the first
//! completion of each task.
//!
//! The pieces, each small enough to read on its own:
//! - [`app`]: the map/reduce trait and the registry of [`apps`] compiled into `mrd`;
//! - [`exec`]: running one map or reduce task in memory, shared by workers and [`sequential`];
//! - [`coordinator`]: the pure, unit-tested scheduling state machine; [`coordinator_service`] wraps it in
//!   gRPC and sled;
//! - [`worker`]: the task loop; [`shuffle`]: moving map outputs to reducers through a shared directory or
//!   over gRPC; [`client`]: submit/status/wait for the CLI and the tests.

pub mod app;
pub mod apps;
pub mod client;
pub mod coordinator;
pub mod coordinator_service;
pub mod corpus;
pub mod counts;
pub mod exec;
pub mod fsutil;
pub mod job;
pub mod merge;
pub mod metrics;
pub mod partition;
pub mod records;
pub mod roots;
pub mod sequential;
pub mod shuffle;
pub mod split;
pub mod worker;

use std::path::PathBuf;

pub use app::{App, AppError};

/// Everything that can go wrong in the MapReduce library; the CLI turns these into one-line messages.
#[derive(Debug, thiserror::Error)]
pub enum MrError {
    /// The app refused its arguments or failed on its input.
    #[error(transparent)]
    App(#[from] AppError),
    /// A file operation failed; carries the path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An intermediate file or fetched partition does not decode.
    #[error("corrupt intermediate data from {0}")]
    Corrupt(String),
    /// A submission was refused; the message says why.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// No connection to a gRPC peer.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// The peer's address.
        addr: String,
        /// What the transport said.
        source: tonic::transport::Error,
    },
    /// A peer answered with an error status; its message is shown as is.
    #[error("{}", .0.message())]
    Rpc(tonic::Status),
    /// The peer refused this process's identity (PERMISSION_DENIED or UNAUTHENTICATED, named first in
    /// the message): retrying cannot help, so callers stop at once.
    #[error("refused: {0}")]
    Denied(String),
    /// The TLS handshake failed (unknown CA, no or refused certificate, plaintext against TLS):
    /// retrying cannot help, so callers stop at once.
    #[error("TLS handshake with {addr} failed: {detail}")]
    Tls {
        /// The peer's address.
        addr: String,
        /// The TLS error and its causes.
        detail: String,
    },
    /// A job path was refused by the coordinator's `--data-root` check.
    #[error(transparent)]
    Roots(#[from] roots::RootsError),
    /// sled failed.
    #[error("coordinator storage: {0}")]
    Storage(#[from] sled::Error),
    /// A persisted job record does not decode.
    #[error("corrupt coordinator state: {0}")]
    CorruptState(String),
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

impl From<tonic::Status> for MrError {
    /// Security refusals become [`MrError::Denied`] and [`MrError::Tls`], so callers can tell them from
    /// transport trouble worth retrying.
    fn from(status: tonic::Status) -> MrError {
        if crate::security::is_tls_failure(&status) {
            return MrError::Tls {
                addr: "the peer".into(),
                detail: crate::security::describe_tls_failure(&status),
            };
        }
        match status.code() {
            tonic::Code::PermissionDenied => {
                MrError::Denied(format!("PERMISSION_DENIED: {}", status.message()))
            }
            tonic::Code::Unauthenticated => {
                MrError::Denied(format!("UNAUTHENTICATED: {}", status.message()))
            }
            _ => MrError::Rpc(status),
        }
    }
}

impl MrError {
    /// Whether retrying cannot help: the peer or the handshake refused this process's identity.
    pub fn is_refusal(&self) -> bool {
        matches!(self, MrError::Denied(_) | MrError::Tls { .. })
    }

    /// A failed connection to `addr`, as [`MrError::Tls`] when the handshake was refused.
    pub fn connect(addr: &str, source: tonic::transport::Error) -> MrError {
        if crate::security::is_tls_failure(&source) {
            return MrError::Tls {
                addr: addr.to_string(),
                detail: crate::security::describe_tls_failure(&source),
            };
        }
        MrError::Connect {
            addr: addr.to_string(),
            source,
        }
    }

    /// Attaches the path an I/O error happened on, which `std::io::Error` omits.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> MrError {
        let path = path.into();
        move |source| MrError::Io { path, source }
    }
}
