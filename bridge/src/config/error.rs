//! Why a configuration is refused: the key as the user wrote it (`limits.max_in_flight`,
//! `vms.vm1.qmp`, `--qmp vm1=/run/vm1.qmp`) and what is wrong with its value.

use std::{fmt, path::PathBuf};

use super::file::Deprecation;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value the bridge cannot use.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The key or flag, as written.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A number outside its range.
    #[error("invalid configuration: {key}: must be {bound}, not {value}")]
    OutOfRange {
        /// The key, as written.
        key: String,
        /// The value given.
        value: u64,
        /// The bound it crosses.
        bound: Bound,
    },
    /// Keys whose values cannot go together.
    #[error("invalid configuration: {} and {}: {reason}", .keys.0, .keys.1)]
    Conflict {
        /// The two keys, as written.
        keys: (String, String),
        /// Why they conflict.
        reason: String,
    },
}

/// The bound a number crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The smallest value allowed.
    AtLeast(u64),
    /// The largest duration allowed, milliseconds.
    AtMostMs(u64),
    /// The largest value allowed.
    AtMost(u64),
}

/// A day, in milliseconds.
pub(super) const DAY_MS: u64 = 86_400_000;

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::AtLeast(min) => write!(f, "at least {min}"),
            Self::AtMostMs(DAY_MS) => write!(f, "at most {DAY_MS} (one day)"),
            Self::AtMostMs(max) | Self::AtMost(max) => write!(f, "at most {max}"),
        }
    }
}

impl ConfigError {
    /// [`ConfigError::Invalid`].
    pub(super) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// `Err(OutOfRange)` when `value` is below `min`.
    pub(super) fn at_least(key: &str, value: u64, min: u64) -> Result<(), Self> {
        if value >= min {
            return Ok(());
        }
        Err(Self::OutOfRange {
            key: key.to_string(),
            value,
            bound: Bound::AtLeast(min),
        })
    }

    /// The error with the keys the file gave under a deprecated name named by that name,
    /// as the user wrote them.
    pub(super) fn named_as_written(self, deprecated: &[Deprecation]) -> Self {
        let written = |key: String| match deprecated.iter().find(|d| d.new == key) {
            Some(d) => d.old.to_string(),
            None => key,
        };
        match self {
            Self::Invalid { key, reason } => Self::Invalid {
                key: written(key),
                reason,
            },
            Self::OutOfRange { key, value, bound } => Self::OutOfRange {
                key: written(key),
                value,
                bound,
            },
            Self::Conflict { keys, reason } => Self::Conflict {
                keys: (written(keys.0), written(keys.1)),
                reason,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_key_and_the_reason() {
        let e = ConfigError::at_least("limits.max_in_flight", 0, 1).expect_err("zero");
        assert_eq!(
            e.to_string(),
            "invalid configuration: limits.max_in_flight: must be at least 1, not 0"
        );
        let e = ConfigError::OutOfRange {
            key: "hotplug.timeout_ms".into(),
            value: DAY_MS + 1,
            bound: Bound::AtMostMs(DAY_MS),
        };
        assert_eq!(
            e.to_string(),
            "invalid configuration: hotplug.timeout_ms: must be at most 86400000 (one day), \
             not 86400001"
        );
        let old = [Deprecation {
            old: "limits.max_batch",
            new: "limits.jsonrpc_max_batch",
        }];
        let e = ConfigError::at_least("limits.jsonrpc_max_batch", 0, 1)
            .expect_err("zero")
            .named_as_written(&old);
        assert!(
            e.to_string()
                .contains(" limits.max_batch: must be at least 1"),
            "{e}"
        );
    }
}
