//! Input limits shared by the service (which enforces them) and the clerk (which checks early, so a
//! caller gets the same clear error without a round trip).
//!
//! Why limits at all: every value lives in memory on every replica and travels in log entries,
//! AppendEntries batches and snapshots; one huge value would stall replication for everyone.

use super::state::KvCommand;
use thiserror::Error;

pub use crate::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

/// Why a request is not acceptable; the service answers it with `INVALID_ARGUMENT`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InvalidInput {
    /// Keys must be non-empty.
    #[error("the key is empty")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("the key is {0} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    /// The value is longer than [`MAX_VALUE_BYTES`].
    #[error("the value is {0} bytes; the limit is {MAX_VALUE_BYTES}")]
    ValueTooLong(usize),
}

/// Check a key.
pub fn validate_key(key: &str) -> Result<(), InvalidInput> {
    if key.is_empty() {
        return Err(InvalidInput::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(InvalidInput::KeyTooLong(key.len()));
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), InvalidInput> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(InvalidInput::ValueTooLong(value.len()));
    }
    Ok(())
}

/// Check every key and value of a command.
pub fn validate_command(command: &KvCommand) -> Result<(), InvalidInput> {
    match command {
        KvCommand::Put { key, value } | KvCommand::Append { key, value } => {
            validate_key(key)?;
            validate_value(value)
        }
        KvCommand::Delete { key } => validate_key(key),
        KvCommand::Cas {
            key,
            expected,
            value,
        } => {
            validate_key(key)?;
            validate_value(value)?;
            expected.as_deref().map_or(Ok(()), validate_value)
        }
    }
}

impl From<InvalidInput> for crate::rsm::client::ClerkError {
    fn from(e: InvalidInput) -> Self {
        crate::rsm::client::ClerkError::Invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(validate_key(""), Err(InvalidInput::EmptyKey));
        assert!(validate_key("k").is_ok());
        assert_eq!(
            validate_key(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(InvalidInput::KeyTooLong(MAX_KEY_BYTES + 1))
        );
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(validate_command(&KvCommand::Append {
            key: "k".into(),
            value: big.clone()
        })
        .is_err());
        assert!(validate_command(&KvCommand::Cas {
            key: "k".into(),
            expected: Some(big),
            value: String::new()
        })
        .is_err());
        assert!(validate_command(&KvCommand::Delete { key: "k".into() }).is_ok());
    }
}
