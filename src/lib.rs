//! ds824: the systems of MIT 6.824 as real networked daemons.
//!
//! Start with [`raft`]: its module documentation explains the consensus core that every replicated service
//! in this crate embeds. [`sim`] is the deterministic simulator the tests drive it with; [`check`] is the
//! linearizability checker that judges the histories they record.

pub mod address;
pub mod chaos;
pub mod check;
pub mod ctrler;
pub mod daemon;
pub mod hash;
pub mod kv;
pub mod kvctl;
pub mod limits;
pub mod metrics;
pub mod mr;
pub mod pacer;
pub mod raft;
pub mod replica;
pub mod rsm;
pub mod security;
pub mod shardkv;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod stages;

/// Code generated from `proto/` by `build.rs`. The messages are documented in the `.proto` files;
/// generated items carry those comments where the files have them.
#[allow(missing_docs)]
pub mod proto {
    /// The Raft peer protocol (`proto/raft.proto`).
    pub mod raft {
        tonic::include_proto!("raft");
    }
    /// Records of the replicated-state-machine layer (`proto/rsm.proto`).
    pub mod rsm {
        tonic::include_proto!("rsm");
    }
    /// The key/value service (`proto/kv.proto`).
    pub mod kv {
        tonic::include_proto!("kv");
    }
    /// The shard controller (`proto/ctrler.proto`).
    pub mod ctrler {
        tonic::include_proto!("ctrler");
    }
    /// Shard groups: replicated state and shard hand-over (`proto/shardkv.proto`).
    pub mod shardkv {
        tonic::include_proto!("shardkv");
    }
    /// The MapReduce coordinator, worker and shuffle protocol (`proto/mr.proto`).
    pub mod mr {
        tonic::include_proto!("mr");
    }
}
