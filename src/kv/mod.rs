//! The fault-tolerant key/value service (6.824 lab 3): a [`state::KvStore`] replicated by [`crate::rsm`]
//! over Raft. Writes go through the log exactly once per client request; reads use ReadIndex and never
//! touch the log.
//!
//! [`service`] is the gRPC service on one replica (`crate::replica` runs a whole replica: storage, Raft,
//! service, one port), [`clerk`] is the client library and [`validate`] the input limits both share.

pub mod clerk;
pub mod service;
pub mod state;
pub mod validate;

pub use clerk::{CasOutcome, Clerk, ClerkConfig, ClerkError, KvOps};
pub use service::KvService;
pub use state::{KvCommand, KvOutput, KvQuery, KvStore};
