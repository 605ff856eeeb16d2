//! The simulated network's fault model, after 6.824's labrpc.
//!
//! Raft's messages are one-way here, so labrpc's request/reply pair maps to a request message and a
//! response message:
//! - reliable: every message arrives after 0–1 ms;
//! - unreliable: requests wait 0–26 ms, and 10 % of requests and 10 % of responses are lost (a lost
//!   response is labrpc's "handler ran, reply dropped");
//! - long reordering: two thirds of responses are held back 200–2200 ms, skewed short;
//! - connectivity: a node can be disconnected from everyone, and nodes can be split into partitions;
//!   a message is lost if its endpoints cannot talk when it is sent or when it would arrive.
//!
//! labrpc's "long delays" (an RPC to a dead server fails only after up to 7 s) exist to punish a leader
//! that waits for RPCs one at a time; the core never waits on a peer, so there is nothing to model.

use rand::Rng;

/// Counters in the spirit of labrpc's: requests sent (even those lost), bytes of requests sent and of
/// responses delivered, and requests delivered per node.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    /// Requests handed to the network.
    pub rpc_total: u64,
    /// Encoded bytes of requests sent plus responses delivered.
    pub bytes_total: u64,
    /// Requests delivered to each node.
    pub requests_delivered: Vec<u64>,
}

/// Connectivity and fault settings.
#[derive(Clone, Debug)]
pub struct NetModel {
    reliable: bool,
    long_reordering: bool,
    connected: Vec<bool>,
    partition: Vec<u32>,
    /// What crossed the network so far.
    pub stats: NetStats,
}

impl NetModel {
    /// A reliable, fully connected network of `n` nodes.
    pub fn new(n: usize) -> Self {
        NetModel {
            reliable: true,
            long_reordering: false,
            connected: vec![true; n],
            partition: vec![0; n],
            stats: NetStats {
                requests_delivered: vec![0; n],
                ..Default::default()
            },
        }
    }

    /// Turn message loss and delays on or off.
    pub fn set_reliable(&mut self, reliable: bool) {
        self.reliable = reliable;
    }

    /// Whether messages may be lost.
    pub fn is_reliable(&self) -> bool {
        self.reliable
    }

    /// Turn long response delays on or off.
    pub fn set_long_reordering(&mut self, on: bool) {
        self.long_reordering = on;
    }

    /// Connect or disconnect node `i` from everyone.
    pub fn set_connected(&mut self, i: usize, connected: bool) {
        self.connected[i] = connected;
    }

    /// Whether node `i` is connected.
    pub fn is_connected(&self, i: usize) -> bool {
        self.connected[i]
    }

    /// Split the nodes: nodes with equal labels can talk, others cannot.
    pub fn set_partition(&mut self, labels: &[u32]) {
        self.partition.copy_from_slice(labels);
    }

    /// Remove every partition.
    pub fn heal_partition(&mut self) {
        self.partition.iter_mut().for_each(|p| *p = 0);
    }

    /// Whether `a` and `b` can exchange messages now.
    pub fn can_talk(&self, a: usize, b: usize) -> bool {
        self.connected[a] && self.connected[b] && self.partition[a] == self.partition[b]
    }

    /// A message is handed to the network: `Some(delay_ms)` if it will be delivered (subject to
    /// [`NetModel::on_deliver`]), `None` if it is lost.
    pub fn on_send(
        &mut self,
        rng: &mut impl Rng,
        from: usize,
        to: usize,
        is_request: bool,
        size: usize,
    ) -> Option<u64> {
        if is_request {
            self.stats.rpc_total += 1;
            self.stats.bytes_total += size as u64;
        }
        if !self.can_talk(from, to) {
            return None;
        }
        self.fate(rng, is_request)
    }

    /// Loss and delay of one message whose endpoints can talk: `Some(delay_ms)` or `None` if lost.
    /// Links whose connectivity a harness manages itself (clerk to server) use this directly.
    pub fn fate(&mut self, rng: &mut impl Rng, is_request: bool) -> Option<u64> {
        if self.reliable {
            return Some(rng.random_range(0..=1));
        }
        if rng.random_bool(0.1) {
            return None;
        }
        let mut delay = if is_request {
            rng.random_range(0..27)
        } else {
            rng.random_range(0..=1)
        };
        if !is_request && self.long_reordering && rng.random_range(0..900) < 600 {
            let upper = rng.random_range(0..=2000);
            delay += 200 + rng.random_range(0..=upper);
        }
        Some(delay)
    }

    /// A message reaches its destination: whether it is delivered.
    pub fn on_deliver(&mut self, from: usize, to: usize, is_request: bool, size: usize) -> bool {
        if !self.can_talk(from, to) {
            return false;
        }
        if is_request {
            self.stats.requests_delivered[to] += 1;
        } else {
            self.stats.bytes_total += size as u64;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn unreliable_networks_lose_about_a_tenth() {
        let mut net = NetModel::new(2);
        net.set_reliable(false);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let lost = (0..10_000)
            .filter(|_| net.on_send(&mut rng, 0, 1, true, 10).is_none())
            .count();
        assert!((800..1200).contains(&lost), "lost {lost}");
        assert_eq!(net.stats.rpc_total, 10_000);
    }

    #[test]
    fn partitions_and_disconnections_cut_links() {
        let mut net = NetModel::new(3);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        net.set_partition(&[0, 0, 1]);
        assert!(net.can_talk(0, 1));
        assert!(net.on_send(&mut rng, 0, 2, true, 1).is_none());
        net.heal_partition();
        net.set_connected(1, false);
        assert!(!net.can_talk(0, 1));
        assert!(net.can_talk(0, 2));
    }
}
