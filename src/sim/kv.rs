//! The KV service in the simulator: [`KvStore`] as a [`SimService`] whose operations are recorded for the
//! linearizability checker, and the 6.824 kvraft helpers (`Get`/`Put`/`Append` through a clerk).

use super::service::{Clerk, ClerkOp, ServiceCluster, SimService};
use crate::check::Operation;
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};

/// A simulated cluster of KV servers.
pub type KvCluster = ServiceCluster<KvStore>;
/// A clerk of the KV service.
pub type KvClerk = Clerk<KvStore>;
/// An operation of a KV clerk.
pub type KvOp = ClerkOp<KvStore>;

impl SimService for KvStore {
    fn record(client: u64, op: &KvOp, output: &KvOutput) -> Option<Operation> {
        Some(match op {
            ClerkOp::Query(KvQuery::Get { key }) => {
                Operation::get(client, key, output.value.as_deref())
            }
            ClerkOp::Command(KvCommand::Put { key, value }) => Operation::put(client, key, value),
            ClerkOp::Command(KvCommand::Append { key, value }) => {
                Operation::append(client, key, value)
            }
            ClerkOp::Command(KvCommand::Delete { key }) => Operation::delete(client, key),
            ClerkOp::Command(KvCommand::Cas {
                key,
                expected,
                value,
            }) => Operation::cas(client, key, expected.as_deref(), Some(value), output.ok),
        })
    }
}

/// A `Get` of `key`.
pub fn get_op(key: &str) -> KvOp {
    ClerkOp::Query(KvQuery::Get { key: key.into() })
}

impl KvCluster {
    /// `Get` through `clerk`; a missing key reads as "" (6.824 semantics).
    pub fn get(&mut self, clerk: &mut KvClerk, key: &str) -> String {
        self.run_op(clerk, get_op(key)).value.unwrap_or_default()
    }

    /// `Put` through `clerk`.
    pub fn put(&mut self, clerk: &mut KvClerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ClerkOp::Command(KvCommand::Put {
                key: key.into(),
                value: value.into(),
            }),
        );
    }

    /// `Append` through `clerk`.
    pub fn append(&mut self, clerk: &mut KvClerk, key: &str, value: &str) {
        self.run_op(
            clerk,
            ClerkOp::Command(KvCommand::Append {
                key: key.into(),
                value: value.into(),
            }),
        );
    }
}
