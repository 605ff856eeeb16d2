//! The key/value state machine: a map from string keys to string values.

use crate::proto::kv as pb;
use crate::rsm::{RsmError, StateMachine};
use bytes::Bytes;
use imbl::OrdMap;
use prost::Message as _;
use std::sync::Arc;

/// A command that changes the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvCommand {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Append `value` to the value of `key` (an absent key counts as empty).
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: String,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: String,
    },
    /// Set `key` to `value` only if its value is `expected` (`None`: only if absent).
    Cas {
        /// The key.
        key: String,
        /// The value the caller believes is current.
        expected: Option<String>,
        /// The new value.
        value: String,
    },
}

/// A read-only question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvQuery {
    /// The value of `key`.
    Get {
        /// The key.
        key: String,
    },
}

/// The result of a command or query.
///
/// `ok`: for get, whether the key exists; for delete, whether it existed; for cas, whether it swapped;
/// otherwise true. `value`: for get, the value; for a cas that did not swap, the current value.
/// `elided`: a failed cas answered from a dedup record whose value was too long to keep
/// ([`crate::limits::MAX_REMEMBERED_VALUE_BYTES`]): `value` is absent although the key may exist.
/// `over_quota`: a write refused, with nothing written, because it would have grown the store past
/// its quota ([`crate::rsm::sessions::LogPolicy::quota_bytes`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvOutput {
    /// See the type documentation.
    pub ok: bool,
    /// See the type documentation.
    pub value: Option<String>,
    /// See the type documentation.
    pub elided: bool,
    /// See the type documentation.
    pub over_quota: bool,
}

/// The replicated map. Ordered, so snapshots are byte-for-byte the same on every replica and a shard
/// group can hold one per shard.
///
/// Persistent (`imbl::OrdMap` of shared strings): a clone costs O(1) and shares every node, so a
/// snapshot is encoded from a clone taken under the service lock in an instant, off the lock and off
/// the Raft loop, while writes go on (each write then copies only the path it changes, and keys and
/// values are reference-counted, so that copy never duplicates a value).
///
/// Equal stores hold the same keys and values; the quota they last saw is the log's, not theirs.
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    data: OrdMap<Arc<str>, Arc<str>>,
    /// Bytes of keys and values held, with [`KEY_OVERHEAD_BYTES`] for each key: what the quota
    /// bounds.
    bytes: u64,
    /// The quota of the command being applied (0: none), from the log ([`StateMachine::observe_clock`]).
    quota: u64,
}

/// What one key costs against the quota besides its key and value: the map's node and two shared
/// strings' headers, and its framing in every snapshot, about this much on a 64-bit machine. Without
/// it, empty values under short keys held tens of times the quota in memory.
pub const KEY_OVERHEAD_BYTES: u64 = 64;

/// What a key of `key`'s length with a value of `value_len` bytes counts against the quota.
fn entry_bytes(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64 + KEY_OVERHEAD_BYTES
}

impl PartialEq for KvStore {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl Eq for KvStore {}

impl KvStore {
    /// Bytes of keys and values held, with [`KEY_OVERHEAD_BYTES`] for each key (what
    /// [`crate::rsm::sessions::LogPolicy::quota_bytes`] bounds).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Set `key` to `value`, keeping the byte count.
    fn set(&mut self, key: Arc<str>, value: Arc<str>) {
        let added = entry_bytes(&key, value.len());
        if let Some(old) = self.data.insert(key.clone(), value) {
            self.bytes -= entry_bytes(&key, old.len());
        }
        self.bytes += added;
    }

    /// Remove `key`, keeping the byte count; whether it was there.
    fn unset(&mut self, key: &str) -> bool {
        match self.data.remove(key) {
            Some(old) => {
                self.bytes -= entry_bytes(key, old.len());
                true
            }
            None => false,
        }
    }

    /// Apply `command` in a machine holding `held` bytes in all (this store's, or a shard group's
    /// across its shards) under `quota` (0: none): a write that would grow the total past the quota
    /// is refused with nothing written; deletes, and writes that do not grow it, always apply (so a
    /// full store can be emptied).
    pub fn apply_within(&mut self, command: KvCommand, held: u64, quota: u64) -> KvOutput {
        let grows_by = |key: &str, new_value: usize, this: &KvStore| -> u64 {
            let old = this.data.get(key).map_or(0, |v| entry_bytes(key, v.len()));
            entry_bytes(key, new_value).saturating_sub(old)
        };
        let growth = match &command {
            KvCommand::Put { key, value } => grows_by(key, value.len(), self),
            KvCommand::Append { key, value } => {
                let current = self.data.get(key.as_str()).map_or(0, |v| v.len());
                grows_by(key, current + value.len(), self)
            }
            KvCommand::Cas {
                key,
                expected,
                value,
            } if self.data.get(key.as_str()).map(|v| &**v) == expected.as_deref() => {
                grows_by(key, value.len(), self)
            }
            KvCommand::Cas { .. } | KvCommand::Delete { .. } => 0,
        };
        if quota > 0 && growth > 0 && held.saturating_add(growth) > quota {
            return KvOutput {
                over_quota: true,
                ..KvOutput::default()
            };
        }
        self.apply_unbounded(command)
    }

    /// `command` applied with no quota (the value limit still holds).
    fn apply_unbounded(&mut self, command: KvCommand) -> KvOutput {
        let done = |ok| KvOutput {
            ok,
            ..KvOutput::default()
        };
        match command {
            KvCommand::Put { key, value } => {
                self.set(key.into(), value.into());
                done(true)
            }
            KvCommand::Append { key, value } => {
                // The limit holds for the value an append produces, not just the suffix: values that
                // grow without end would stall replication and migrations for everyone. Checked here,
                // at apply, so every replica refuses the same appends; nothing changes on a refusal.
                let current = self.data.get(key.as_str()).map_or(0, |v| v.len());
                if current + value.len() > super::validate::MAX_VALUE_BYTES {
                    return done(false);
                }
                let appended = match self.data.get(key.as_str()) {
                    Some(current) => Arc::from(format!("{current}{value}")),
                    None => Arc::from(value),
                };
                self.set(key.into(), appended);
                done(true)
            }
            KvCommand::Delete { key } => done(self.unset(&key)),
            KvCommand::Cas {
                key,
                expected,
                value,
            } => {
                let current = self.data.get(key.as_str());
                if current.map(|v| &**v) == expected.as_deref() {
                    self.set(key.into(), value.into());
                    done(true)
                } else {
                    KvOutput {
                        ok: false,
                        value: current.map(|v| v.to_string()),
                        ..KvOutput::default()
                    }
                }
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.data.get(key).map(|v| &**v)
    }

    /// The keys after `after` (from the first if `None`), in order, until their keys and values pass
    /// `max_bytes` (at least one key, so any value fits in some page); and whether keys remain after
    /// the page. How a large shard moves between groups in bounded messages and log entries.
    pub fn page(&self, after: Option<&str>, max_bytes: usize) -> (Vec<(String, String)>, bool) {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        let mut page = Vec::new();
        let mut bytes = 0;
        let mut range = self
            .data
            .range::<_, str>((start, Bound::Unbounded))
            .peekable();
        while let Some((key, value)) = range.next_if(|_| page.is_empty() || bytes < max_bytes) {
            bytes += key.len() + value.len();
            page.push((key.to_string(), value.to_string()));
        }
        (page, range.peek().is_some())
    }

    /// Every key and value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.data.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl Extend<(String, String)> for KvStore {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, pairs: I) {
        for (key, value) in pairs {
            self.set(Arc::from(key), Arc::from(value));
        }
    }
}

impl FromIterator<(String, String)> for KvStore {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut store = KvStore::default();
        store.extend(pairs);
        store
    }
}

impl From<&KvCommand> for pb::Command {
    fn from(command: &KvCommand) -> Self {
        use pb::command::Op;
        let op = match command.clone() {
            KvCommand::Put { key, value } => Op::Put(pb::Put { key, value }),
            KvCommand::Append { key, value } => Op::Append(pb::Append { key, value }),
            KvCommand::Delete { key } => Op::Delete(pb::Delete { key }),
            KvCommand::Cas {
                key,
                expected,
                value,
            } => Op::Cas(pb::CompareAndSwap {
                key,
                expected,
                value,
            }),
        };
        pb::Command { op: Some(op) }
    }
}

impl TryFrom<pb::Command> for KvCommand {
    type Error = RsmError;

    fn try_from(command: pb::Command) -> Result<Self, RsmError> {
        use pb::command::Op;
        Ok(
            match command.op.ok_or_else(|| RsmError::Decode {
                what: "kv command",
                detail: "no operation".into(),
            })? {
                Op::Put(p) => KvCommand::Put {
                    key: p.key,
                    value: p.value,
                },
                Op::Append(a) => KvCommand::Append {
                    key: a.key,
                    value: a.value,
                },
                Op::Delete(d) => KvCommand::Delete { key: d.key },
                Op::Cas(c) => KvCommand::Cas {
                    key: c.key,
                    expected: c.expected,
                    value: c.value,
                },
            },
        )
    }
}

impl StateMachine for KvStore {
    type Command = KvCommand;
    type Query = KvQuery;
    type Output = KvOutput;

    fn apply(&mut self, command: KvCommand) -> KvOutput {
        self.apply_within(command, self.bytes, self.quota)
    }

    fn observe_clock(&mut self, clock: &crate::rsm::sessions::LogClock) {
        self.quota = clock.policy.map_or(0, |policy| policy.quota_bytes);
    }

    fn query(&self, query: &KvQuery) -> KvOutput {
        match query {
            KvQuery::Get { key } => {
                let value = self.data.get(key.as_str()).map(|v| v.to_string());
                KvOutput {
                    ok: value.is_some(),
                    value,
                    elided: false,
                    over_quota: false,
                }
            }
        }
    }

    fn snapshot(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.snapshot_len().unwrap_or(0));
        self.encode_snapshot(&mut out);
        Bytes::from(out)
    }

    fn snapshot_len(&self) -> Option<usize> {
        Some(self.data.iter().map(|(k, v)| state_entry_len(k, v)).sum())
    }

    /// `pb::State` written straight from the map, in key order: no copy of every key and value first
    /// (a large state would be copied three times on its way into a snapshot otherwise).
    fn encode_snapshot(&self, out: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        for (key, value) in self.data.iter() {
            encode_key(1, WireType::LengthDelimited, out);
            encode_varint(map_entry_len(key, value) as u64, out);
            for (field, text) in [(1, key), (2, value)] {
                // As prost writes map entries: an empty string is the default and is left out.
                if !text.is_empty() {
                    encode_key(field, WireType::LengthDelimited, out);
                    encode_varint(text.len() as u64, out);
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        let state = pb::State::decode(data).map_err(|e| RsmError::Decode {
            what: "kv state",
            detail: e.to_string(),
        })?;
        self.data = state
            .data
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect();
        self.bytes = self.data.iter().map(|(k, v)| entry_bytes(k, v.len())).sum();
        Ok(())
    }

    fn encode_command(command: &KvCommand) -> Bytes {
        Bytes::from(pb::Command::from(command).encode_to_vec())
    }

    fn decode_command(data: &[u8]) -> Result<KvCommand, RsmError> {
        pb::Command::decode(data)
            .map_err(|e| RsmError::Decode {
                what: "kv command",
                detail: e.to_string(),
            })?
            .try_into()
    }

    fn encode_output(output: &KvOutput) -> Bytes {
        Bytes::from(pb::Outcome::from(output).encode_to_vec())
    }

    fn remember(output: &KvOutput) -> KvOutput {
        output.remembered()
    }

    fn decode_output(data: &[u8]) -> Result<KvOutput, RsmError> {
        let outcome = pb::Outcome::decode(data).map_err(|e| RsmError::Decode {
            what: "kv outcome",
            detail: e.to_string(),
        })?;
        Ok(KvOutput::from(outcome))
    }
}

/// Encoded length of one map entry's fields (key 1, value 2; empty ones left out).
fn map_entry_len(key: &str, value: &str) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    [key, value]
        .iter()
        .filter(|text| !text.is_empty())
        .map(|text| key_len(1) + encoded_len_varint(text.len() as u64) + text.len())
        .sum()
}

/// Encoded length of one entry of `pb::State.data`, field tag and length included.
fn state_entry_len(key: &str, value: &str) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    let entry = map_entry_len(key, value);
    key_len(1) + encoded_len_varint(entry as u64) + entry
}

impl KvOutput {
    /// What a dedup record keeps of this output: a value longer than
    /// [`crate::limits::MAX_REMEMBERED_VALUE_BYTES`] (a failed cas's current value, up to a whole
    /// [`crate::limits::MAX_VALUE_BYTES`]) is dropped and marked `elided`, so a table of one record per
    /// client stays small however large the values are.
    pub fn remembered(&self) -> KvOutput {
        match &self.value {
            Some(value) if value.len() > crate::limits::MAX_REMEMBERED_VALUE_BYTES => KvOutput {
                ok: self.ok,
                value: None,
                elided: true,
                over_quota: self.over_quota,
            },
            _ => self.clone(),
        }
    }
}

impl From<&KvOutput> for pb::Outcome {
    fn from(output: &KvOutput) -> Self {
        pb::Outcome {
            ok: output.ok,
            current: output.value.clone(),
            current_elided: output.elided,
            over_quota: output.over_quota,
        }
    }
}

impl From<pb::Outcome> for KvOutput {
    fn from(outcome: pb::Outcome) -> Self {
        KvOutput {
            ok: outcome.ok,
            value: outcome.current,
            elided: outcome.current_elided,
            over_quota: outcome.over_quota,
        }
    }
}

impl KvCommand {
    /// The key the command changes.
    pub fn key(&self) -> &str {
        match self {
            KvCommand::Put { key, .. }
            | KvCommand::Append { key, .. }
            | KvCommand::Delete { key }
            | KvCommand::Cas { key, .. } => key,
        }
    }
}

#[cfg(test)]
mod tests {
    /// The quota refuses exactly the writes that would grow the store past it, changes nothing when
    /// it does, and always lets a full store shrink; the byte count it goes by survives a snapshot.
    #[test]
    fn at_its_quota_a_store_refuses_growth_and_still_shrinks() {
        use super::{KvCommand, KvStore, KEY_OVERHEAD_BYTES as KEY};
        use crate::rsm::StateMachine as _;
        let put = |key: &str, value: &str| KvCommand::Put {
            key: key.into(),
            value: value.into(),
        };
        let mut store = KvStore::default();
        // Every key costs its overhead too: 10 bytes of key and value are 10 + KEY.
        let quota = 2 * (10 + KEY);
        let first = store.apply_within(put("a", &"x".repeat(9)), store.bytes(), quota);
        assert!(first.ok && !first.over_quota);
        assert_eq!(store.bytes(), 10 + KEY);
        let second = store.apply_within(put("b", &"y".repeat(9)), store.bytes(), quota);
        assert!(second.ok, "exactly at the quota is within it");
        assert_eq!(store.bytes(), quota);
        for refused in [
            put("c", ""),
            put("a", &"x".repeat(10)),
            KvCommand::Append {
                key: "b".into(),
                value: "y".into(),
            },
            KvCommand::Cas {
                key: "a".into(),
                expected: Some("x".repeat(9)),
                value: "x".repeat(10),
            },
        ] {
            let before = store.clone();
            let answer = store.apply_within(refused.clone(), store.bytes(), quota);
            assert!(answer.over_quota && !answer.ok, "{refused:?}: {answer:?}");
            assert_eq!(store, before, "{refused:?} changed the store");
            assert_eq!(store.bytes(), quota);
        }
        // A swap that does not happen is answered as ever; one that shrinks, a shorter put and a
        // delete apply.
        let mismatch = store.apply_within(
            KvCommand::Cas {
                key: "a".into(),
                expected: Some("other".into()),
                value: "z".repeat(50),
            },
            store.bytes(),
            quota,
        );
        assert!(!mismatch.over_quota && mismatch.value.is_some());
        assert!(store.apply_within(put("a", "x"), store.bytes(), quota).ok);
        assert_eq!(store.bytes(), 12 + 2 * KEY);
        let deleted = store.apply_within(KvCommand::Delete { key: "b".into() }, quota, quota);
        assert!(deleted.ok && !deleted.over_quota);
        assert_eq!(store.bytes(), 2 + KEY);
        // The overhead counts for keys without values too: an empty value under a new key is growth.
        let empty = store.apply_within(put("e", ""), store.bytes(), store.bytes() + KEY);
        assert!(empty.over_quota, "{empty:?}");
        // No quota: anything within the value limit.
        assert!(store.apply_within(put("big", &"z".repeat(1000)), 0, 0).ok);
        let mut restored = KvStore::default();
        restored.restore(&store.snapshot()).expect("restore");
        assert_eq!(restored.bytes(), store.bytes());
        assert_eq!(restored.bytes(), 2 + 3 + 1000 + 2 * KEY);
    }

    #[test]
    fn the_snapshot_is_written_as_prost_would_write_it() {
        let store: KvStore = [("b", "2"), ("a", ""), ("c", &*"x".repeat(300))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let by_prost = pb::State {
            data: store
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
        .encode_to_vec();
        assert_eq!(store.snapshot().as_ref(), by_prost.as_slice());
        assert_eq!(store.snapshot_len(), Some(by_prost.len()));
        let mut restored = KvStore::default();
        restored.restore(&by_prost).expect("restore");
        assert_eq!(restored, store);
    }

    use super::*;
    use crate::kv::validate::MAX_VALUE_BYTES;

    #[test]
    fn an_append_past_the_value_limit_is_refused_and_changes_nothing() {
        let mut store = KvStore::default();
        let append = |value: String| KvCommand::Append {
            key: "k".into(),
            value,
        };
        let ok = KvOutput {
            ok: true,
            value: None,
            elided: false,
            over_quota: false,
        };
        assert_eq!(store.apply(append("v".repeat(MAX_VALUE_BYTES - 1))), ok);
        assert_eq!(store.apply(append("w".into())), ok, "exactly at the limit");
        let refused = store.apply(append("x".into()));
        assert!(!refused.ok, "an append past the limit was applied");
        let value = store.query(&KvQuery::Get { key: "k".into() }).value;
        assert_eq!(value.map(|v| v.len()), Some(MAX_VALUE_BYTES));
    }

    /// Replicas reach the same state through the same commands, but their maps were built separately:
    /// their snapshots must still be the same bytes (compared, hashed, deduplicated by operators).
    #[test]
    fn equal_states_make_byte_identical_snapshots() {
        let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
        let mut forward = KvStore::default();
        let mut backward = KvStore::default();
        for key in &keys {
            forward.apply(KvCommand::Put {
                key: key.clone(),
                value: key.to_uppercase(),
            });
        }
        for key in keys.iter().rev() {
            backward.apply(KvCommand::Put {
                key: key.clone(),
                value: key.to_uppercase(),
            });
        }
        assert_eq!(forward.snapshot(), backward.snapshot());
        let mut restored = KvStore::default();
        restored.restore(&forward.snapshot()).expect("restore");
        assert_eq!(restored.snapshot(), forward.snapshot());
    }
}
