//! `[auth]`: bearer tokens (by their SHA-256) and the roles granted to identities on VMs.
//! [`crate::auth`] enforces them.

use serde::Deserialize;

use super::ConfigError;

/// A bearer token, by the SHA-256 of its text (hex).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The identity the token proves.
    pub identity: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// What a role allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads only.
    Read,
    /// Reads and state-changing calls.
    Write,
}

/// A role on some VMs for an identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// The identity.
    pub identity: String,
    /// The role.
    pub role: Role,
    /// Globs of VM names.
    pub vms: Vec<String>,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Grants.
    pub grants: Vec<GrantConfig>,
}

/// Why the `[auth]` section is unusable: the key and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct AuthConfigError {
    /// The key: `auth.tokens` or `auth.grants` (the reason names the entry's identity).
    key: String,
    /// What is wrong with it.
    reason: String,
}

impl From<AuthConfigError> for ConfigError {
    fn from(e: AuthConfigError) -> Self {
        ConfigError::invalid(e.key, e.reason)
    }
}

impl TokenConfig {
    /// The SHA-256 the token must hash to, from its 64 hex digits.
    pub(crate) fn digest(&self) -> Result<[u8; 32], AuthConfigError> {
        parse_hex32(&self.sha256).ok_or_else(|| AuthConfigError {
            key: "auth.tokens".into(),
            reason: format!(
                "the token of '{}': sha256 must be 64 hex digits (e.g. `printf %s TOKEN | \
                 sha256sum`)",
                self.identity
            ),
        })
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl GrantConfig {
    /// The VM globs, compiled.
    pub(crate) fn patterns(&self) -> Result<Vec<glob::Pattern>, AuthConfigError> {
        self.vms
            .iter()
            .map(|p| glob::Pattern::new(p).map_err(|e| (p, e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(p, e)| AuthConfigError {
                key: "auth.grants".into(),
                reason: format!("the grant of '{}': bad VM glob '{p}': {e}", self.identity),
            })
    }
}

impl AuthConfig {
    /// `Ok` when every token hash and grant glob is usable.
    pub(super) fn check(&self) -> Result<(), AuthConfigError> {
        for token in &self.tokens {
            token.digest()?;
        }
        for grant in &self.grants {
            grant.patterns()?;
        }
        Ok(())
    }
}
