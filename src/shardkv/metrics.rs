//! Prometheus gauges of a shard group replica, next to the state they read (as `mr/metrics.rs` is next
//! to the coordinator): the generic [`crate::metrics`] knows Raft and request counters only.

use super::ShardKv;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};

/// Gauges of a shard group replica, read from its state machine at scrape time: the configuration it
/// is at and how many shards it serves, is still pulling, and holds as frozen copies for new owners.
#[derive(Clone)]
pub struct ShardGauges {
    config: IntGauge,
    shards: IntGaugeVec,
}

impl ShardGauges {
    /// Register the gauges in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let config = IntGauge::new(
            "ds824_shard_config",
            "Configuration number this replica's group has reached",
        )?;
        let shards = IntGaugeVec::new(
            Opts::new(
                "ds824_shards",
                "Shards by state: serving, pulling (owned, data not arrived), outgoing (given away, copy kept until the new owner confirms), confirming (installed, the previous owner's deletion of its copy not yet confirmed)",
            ),
            &["state"],
        )?;
        registry.register(Box::new(config.clone()))?;
        registry.register(Box::new(shards.clone()))?;
        Ok(ShardGauges { config, shards })
    }

    /// Recompute the gauges from a shard group's state.
    pub fn refresh(&self, machine: &ShardKv) {
        self.config.set(machine.config().num as i64);
        for (state, count) in [
            ("serving", machine.serving().len()),
            ("pulling", machine.pulling().len()),
            ("outgoing", machine.outgoing().len()),
            ("confirming", machine.confirming().len()),
        ] {
            self.shards.with_label_values(&[state]).set(count as i64);
        }
    }
}
