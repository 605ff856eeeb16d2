//! One recorded client operation: the unit a history is made of.
//!
//! The field layout mirrors the JSON-lines wire format exactly so that external
//! tools (Jepsen-style harnesses, `kvctl`, ad-hoc scripts) can emit histories
//! without knowing anything about this crate.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which request the client issued.
///
/// Kept as a closed enum (rather than a string) so a typo in a history file is a
/// parse error with a line number instead of a silently ignored operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Read a key; `output` is the value seen (`null` = key absent).
    Get,
    /// Overwrite a key with `value`.
    Put,
    /// Concatenate `value` to the key's current value (absent counts as "").
    Append,
    /// Remove a key.
    Delete,
    /// Compare-and-swap: if the current value equals `expected` (`null` =
    /// absent) set it to `value` (`null` = remove); the outcome is in `ok`.
    Cas,
}

/// What the client knows about the fate of the operation (Jepsen semantics).
///
/// The checker needs this because each status gives a different constraint:
/// `Ok` ops happened inside their interval, `Fail` ops never happened, and `Info`
/// ops may or may not have happened at any time after their invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Completed and acknowledged: it took effect between `invoke` and
    /// `complete` and produced `output` / `ok`.
    Ok,
    /// Definitely did not take effect (e.g. the server rejected it); the checker
    /// drops it.
    Fail,
    /// Indeterminate (timeout, crash): it may have taken effect at any point
    /// after `invoke`, or never; its output is unknown and `complete` is ignored.
    Info,
}

/// One operation of a history, exactly as it appears on one JSON line.
///
/// Wire format (one object per line):
///
/// ```json
/// {"client":3,"op":"cas","key":"x","value":"new","expected":"old","ok":true,
///  "output":null,"invoke":1000,"complete":2500,"status":"ok"}
/// ```
///
/// * `value`: the argument of `put`/`append`, the *new* value of `cas` (`null`
///   on a cas means "delete on match"); ignored for `get`/`delete`.
/// * `expected`: the expected value of `cas` (`null` = key must be absent).
///   Omitted when `null`.
/// * `ok`: **the outcome of a `cas`** — `true` = swapped, `false` = mismatch,
///   nothing changed. Omitted when `null`. Required for a `cas` with status
///   `ok`; as a convenience, a missing `ok` may be given instead as
///   `"output": "true"` / `"output": "false"` (see [`Operation::cas_outcome`]).
///   Accepted under the alias `cas_ok` too.
/// * `output`: the result of a `get` (`null` = key absent); ignored otherwise.
/// * `invoke` / `complete`: nanoseconds on one clock shared by all clients.
///   `complete` is required for status `ok` and ignored for `info`.
///
/// Unknown fields are ignored, so harnesses may add their own (an index, a
/// node name); a misspelt optional field therefore reads as `null`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    /// Client (process) that issued the operation; informational only, the
    /// checker relies on timestamps, not on per-client order.
    pub client: u64,
    /// The request kind.
    pub op: OpKind,
    /// The key operated on; the KV model checks every key independently.
    pub key: String,
    /// Argument value: put/append value, or the new value of a cas.
    #[serde(default)]
    pub value: Option<String>,
    /// Expected value of a cas (`None` = key must be absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// Outcome of a cas: `Some(true)` swapped, `Some(false)` mismatch.
    #[serde(
        default,
        rename = "ok",
        alias = "cas_ok",
        skip_serializing_if = "Option::is_none"
    )]
    pub cas_ok: Option<bool>,
    /// Value returned by a get (`None` = key absent).
    #[serde(default)]
    pub output: Option<String>,
    /// Invocation time in nanoseconds.
    pub invoke: u64,
    /// Completion time in nanoseconds; `None` for ops that never returned.
    #[serde(default)]
    pub complete: Option<u64>,
    /// What is known about whether the op took effect.
    pub status: Status,
}

/// Why an operation is not well-formed.
///
/// Rejected at load time so the checker never has to guess what a malformed
/// record meant (guessing could turn a violation into "ok").
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpError {
    /// put/append carry no `value`.
    #[error("`{0:?}` operation needs a non-null `value`")]
    MissingValue(OpKind),
    /// A completed (`ok`/`fail`) operation without a completion time.
    #[error("operation with status `{0:?}` needs a `complete` timestamp")]
    MissingComplete(Status),
    /// Completion precedes invocation, which no real execution can produce.
    #[error("`complete` ({complete}) is before `invoke` ({invoke})")]
    CompleteBeforeInvoke {
        /// Invocation time.
        invoke: u64,
        /// Completion time.
        complete: u64,
    },
    /// A successful cas whose outcome (`ok` or output "true"/"false") is absent.
    #[error("cas with status `ok` needs `\"ok\": true|false` (or output \"true\"/\"false\")")]
    MissingCasOutcome,
}

impl Operation {
    fn base(client: u64, op: OpKind, key: impl Into<String>) -> Self {
        Operation {
            client,
            op,
            key: key.into(),
            value: None,
            expected: None,
            cas_ok: None,
            output: None,
            invoke: 0,
            complete: Some(0),
            status: Status::Ok,
        }
    }

    /// A `get` (status ok, times 0/0 until set with [`Operation::ok_at`] etc.).
    /// Builders exist so harnesses and tests can record histories without
    /// spelling out every field.
    pub fn get(client: u64, key: impl Into<String>, output: Option<&str>) -> Self {
        let mut op = Self::base(client, OpKind::Get, key);
        op.output = output.map(str::to_owned);
        op
    }

    /// A `put` of `value`.
    pub fn put(client: u64, key: impl Into<String>, value: impl Into<String>) -> Self {
        let mut op = Self::base(client, OpKind::Put, key);
        op.value = Some(value.into());
        op
    }

    /// An `append` of `value`.
    pub fn append(client: u64, key: impl Into<String>, value: impl Into<String>) -> Self {
        let mut op = Self::base(client, OpKind::Append, key);
        op.value = Some(value.into());
        op
    }

    /// A `delete`.
    pub fn delete(client: u64, key: impl Into<String>) -> Self {
        Self::base(client, OpKind::Delete, key)
    }

    /// A `cas(expected -> new)` whose outcome was `swapped`.
    pub fn cas(
        client: u64,
        key: impl Into<String>,
        expected: Option<&str>,
        new: Option<&str>,
        swapped: bool,
    ) -> Self {
        let mut op = Self::base(client, OpKind::Cas, key);
        op.expected = expected.map(str::to_owned);
        op.value = new.map(str::to_owned);
        op.cas_ok = Some(swapped);
        op
    }

    /// Marks the op as acknowledged within `[invoke, complete]`.
    pub fn ok_at(mut self, invoke: u64, complete: u64) -> Self {
        self.invoke = invoke;
        self.complete = Some(complete);
        self.status = Status::Ok;
        self
    }

    /// Marks the op as indeterminate (invoked at `invoke`, never acknowledged);
    /// clears outputs since they are unknown.
    pub fn info_at(mut self, invoke: u64) -> Self {
        self.invoke = invoke;
        self.complete = None;
        self.status = Status::Info;
        self.output = None;
        self.cas_ok = None;
        self
    }

    /// Marks the op as definitely failed (it did not take effect).
    pub fn fail_at(mut self, invoke: u64, complete: u64) -> Self {
        self.invoke = invoke;
        self.complete = Some(complete);
        self.status = Status::Fail;
        self
    }

    /// The cas outcome: `Some(true)` swapped, `Some(false)` mismatch, `None`
    /// unknown (info op, or not a cas). Falls back to `output` "true"/"false"
    /// when the `ok` field is absent, so either encoding is accepted.
    pub fn cas_outcome(&self) -> Option<bool> {
        if self.op != OpKind::Cas || self.status == Status::Info {
            return None;
        }
        self.cas_ok.or(match self.output.as_deref() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        })
    }

    /// Completion time as the checker sees it: `None` (= +infinity) for info
    /// ops, whose effect may land at any time after invocation.
    pub fn effective_complete(&self) -> Option<u64> {
        match self.status {
            Status::Info => None,
            Status::Ok | Status::Fail => self.complete,
        }
    }

    /// Checks the record is well-formed, so the checker never runs on a record
    /// whose meaning is ambiguous.
    pub fn validate(&self) -> Result<(), OpError> {
        if matches!(self.op, OpKind::Put | OpKind::Append) && self.value.is_none() {
            return Err(OpError::MissingValue(self.op));
        }
        if self.status != Status::Info {
            let complete = self.complete.ok_or(OpError::MissingComplete(self.status))?;
            if complete < self.invoke {
                return Err(OpError::CompleteBeforeInvoke {
                    invoke: self.invoke,
                    complete,
                });
            }
        }
        if self.op == OpKind::Cas && self.status == Status::Ok && self.cas_outcome().is_none() {
            return Err(OpError::MissingCasOutcome);
        }
        Ok(())
    }
}
