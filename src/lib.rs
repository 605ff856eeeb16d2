//! ds824: the systems of MIT 6.824 as real networked daemons.
//!
//! Start with [`raft`]: its module documentation explains the consensus core that every replicated service
//! in this crate embeds. [`sim`] is the deterministic simulator the tests drive it with.

pub mod mr;
pub mod raft;
pub mod sim;

/// Code generated from `proto/` by `build.rs`.
pub mod proto {
    /// The Raft peer protocol (`proto/raft.proto`).
    pub mod raft {
        tonic::include_proto!("raft");
    }
    /// The MapReduce coordinator, worker and shuffle protocol (`proto/mr.proto`).
    pub mod mr {
        tonic::include_proto!("mr");
    }
}
