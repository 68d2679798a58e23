//! Who a caller is, and what it may do.
//!
//! Identities come from a client certificate (a DNS subjectAltName of the verified
//! certificate naming a configured identity), a bearer token (configured only as its
//! SHA-256, compared in constant time), or, without an `[auth]` section, the fact that
//! the caller is local (loopback) or the network was declared trusted
//! (`--allow-insecure-tcp`). Grants give an identity a role on VMs matching globs:
//! `read` (lists, info, ping, block lists and sizes) or `write` (read and every
//! state-changing call).

use std::sync::Arc;

use glob::Pattern;
use ring::digest::{SHA256, digest};
use rustls::pki_types::CertificateDer;
use subtle::ConstantTimeEq;
use x509_parser::extensions::GeneralName;

pub use crate::config::AuthConfigError;
use crate::{
    config::{AuthConfig, Role},
    error::BridgeError,
    peer::Peer,
};

#[derive(Debug)]
struct Grant {
    identity: String,
    role: Role,
    vms: Vec<Pattern>,
}

/// A caller's proven identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Named by a certificate or a token.
    Named(Arc<str>),
    /// No `[auth]` is configured and the caller is local or on a trusted network: it may
    /// do everything, as before authentication existed.
    Trusted,
}

impl Identity {
    /// How the audit trail names it.
    pub fn name(&self) -> &str {
        match self {
            Self::Named(n) => n,
            Self::Trusted => "trusted",
        }
    }
}

/// Why a caller was not authenticated. The caller is told no more than that.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unauthenticated: {0}")]
pub struct Unauthenticated(pub &'static str);

/// The checks, built from the configuration once.
#[derive(Debug)]
pub struct Auth {
    /// `[auth]` given: every caller must prove an identity.
    enabled: bool,
    /// Without `[auth]`, remote callers are served too (`--allow-insecure-tcp`).
    trust_network: bool,
    tokens: Vec<([u8; 32], Arc<str>)>,
    grants: Vec<Grant>,
}

impl Auth {
    /// The checks for the `[auth]` section `config` (`None`: no section; `Some`, even
    /// empty: authentication required); `trust_network` is `--allow-insecure-tcp`.
    pub fn new(config: Option<&AuthConfig>, trust_network: bool) -> Result<Self, AuthConfigError> {
        let enabled = config.is_some();
        let empty = AuthConfig::default();
        let config = config.unwrap_or(&empty);
        let tokens = config
            .tokens
            .iter()
            .map(|t| Ok((t.digest()?, Arc::from(t.identity.as_str()))))
            .collect::<Result<Vec<_>, AuthConfigError>>()?;
        let grants = config
            .grants
            .iter()
            .map(|g| {
                Ok(Grant {
                    identity: g.identity.clone(),
                    role: g.role,
                    vms: g.patterns()?,
                })
            })
            .collect::<Result<Vec<_>, AuthConfigError>>()?;
        Ok(Self {
            enabled,
            trust_network,
            tokens,
            grants,
        })
    }

    /// Whether `[auth]` is in force.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The identity of a caller at `peer` that sent `authorization` (the header's value).
    /// A unix-socket peer without a token is `uid:UID`; a TLS peer without one is its
    /// certificate's granted name.
    pub fn authenticate(
        &self,
        peer: &Peer,
        authorization: Option<&[u8]>,
    ) -> Result<Identity, Unauthenticated> {
        if !self.enabled {
            let local = peer.unix.is_some() || peer.addr.is_some_and(|p| p.ip().is_loopback());
            return if local || self.trust_network {
                Ok(Identity::Trusted)
            } else {
                Err(Unauthenticated(
                    "only local callers are served without [auth]",
                ))
            };
        }
        if let Some(header) = authorization {
            // The scheme is case-insensitive (RFC 7235).
            let token = match header.split_at_checked(7) {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token,
                _ => return Err(Unauthenticated("bad credentials")),
            };
            let hash = digest(&SHA256, token);
            // Every configured hash is compared, so timing does not tell which matched.
            let mut found = None;
            for (want, identity) in &self.tokens {
                if bool::from(want.ct_eq(hash.as_ref())) {
                    found = Some(identity.clone());
                }
            }
            return found
                .map(Identity::Named)
                .ok_or(Unauthenticated("bad credentials"));
        }
        if let Some(unix) = peer.unix {
            return Ok(Identity::Named(Arc::from(
                format!("uid:{}", unix.uid).as_str(),
            )));
        }
        if let Some(cert) = &peer.certificate {
            return self
                .certificate_identity(cert)
                .map(Identity::Named)
                .ok_or(Unauthenticated("the certificate names no identity"));
        }
        Err(Unauthenticated("credentials required"))
    }

    /// The first granted identity that is exactly one of the (already verified)
    /// certificate's DNS subjectAltNames. Wildcard names grant nothing, and names that
    /// belong to tokens cannot be taken by a certificate.
    fn certificate_identity(&self, cert: &CertificateDer<'_>) -> Option<Arc<str>> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let sans = cert.subject_alternative_name().ok()??;
        let names: Vec<&str> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) if !name.contains('*') => Some(*name),
                _ => None,
            })
            .collect();
        self.grants.iter().find_map(|g| {
            let is_token = self.tokens.iter().any(|(_, t)| **t == *g.identity);
            let named = names.iter().any(|n| n.eq_ignore_ascii_case(&g.identity));
            (named && !is_token).then(|| Arc::from(g.identity.as_str()))
        })
    }

    /// The role `identity` has on `vm`, if any.
    pub fn role(&self, identity: &Identity, vm: &str) -> Option<Role> {
        match identity {
            Identity::Trusted => Some(Role::Write),
            Identity::Named(name) => self
                .grants
                .iter()
                .filter(|g| *g.identity == **name && g.vms.iter().any(|p| p.matches(vm)))
                .map(|g| g.role)
                .max(),
        }
    }

    /// `Ok` if `identity` may make a call on `vm` that is a read (`write` false) or
    /// changes the guest; else PERMISSION_DENIED. Unknown VMs are denied alike, so a
    /// caller cannot probe which VMs exist beyond its grants.
    pub fn authorize(&self, identity: &Identity, vm: &str, write: bool) -> Result<(), BridgeError> {
        let needed = if write { Role::Write } else { Role::Read };
        match self.role(identity, vm) {
            Some(role) if role >= needed => Ok(()),
            _ => Err(BridgeError::PermissionDenied(format!(
                "'{}' may not {} VM '{vm}'",
                identity.name(),
                if write { "change" } else { "read" }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GrantConfig, TokenConfig};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A TCP peer at `addr`.
    fn at(addr: &str) -> Peer {
        Peer {
            addr: Some(addr.parse().expect("addr")),
            ..Peer::default()
        }
    }

    /// A unix-socket peer of user `uid`.
    fn unix_peer(uid: u32) -> Peer {
        Peer {
            unix: Some(crate::peer::UnixPeer {
                uid,
                gid: uid,
                pid: None,
            }),
            ..Peer::default()
        }
    }

    #[test]
    fn tokens_grants_and_the_no_auth_default() {
        let config = AuthConfig {
            tokens: vec![TokenConfig {
                identity: "ops".into(),
                sha256: hex(digest(&SHA256, b"s3cret").as_ref()),
            }],
            grants: vec![
                GrantConfig {
                    identity: "ops".into(),
                    role: Role::Read,
                    vms: vec!["*".into()],
                },
                GrantConfig {
                    identity: "ops".into(),
                    role: Role::Write,
                    vms: vec!["web-*".into()],
                },
            ],
        };
        let auth = Auth::new(Some(&config), false).expect("valid");
        let remote = at("10.0.0.9:4000");
        let ops = auth
            .authenticate(&remote, Some(b"Bearer s3cret"))
            .expect("token");
        assert_eq!(ops, Identity::Named("ops".into()));
        for bad in [&b"Bearer wrong"[..], b"Basic s3cret", b"Bearer "] {
            assert!(auth.authenticate(&remote, Some(bad)).is_err());
        }
        assert!(auth.authenticate(&at("127.0.0.1:1"), None).is_err());
        let unix = unix_peer(1000);
        assert_eq!(
            auth.authenticate(&unix, None),
            Ok(Identity::Named("uid:1000".into()))
        );
        assert!(auth.authorize(&ops, "web-1", true).is_ok());
        assert!(auth.authorize(&ops, "db-1", false).is_ok());
        assert!(matches!(
            auth.authorize(&ops, "db-1", true),
            Err(BridgeError::PermissionDenied(_))
        ));
        assert!(auth.authenticate(&remote, Some(b"bEaReR s3cret")).is_ok());
    }

    #[test]
    fn without_auth_only_local_callers_are_trusted_unless_the_network_is() {
        let (remote, local) = (at("10.0.0.9:4000"), at("127.0.0.1:5"));
        let unix = unix_peer(1000);
        let open = Auth::new(None, false).expect("valid");
        assert_eq!(open.authenticate(&local, None), Ok(Identity::Trusted));
        assert_eq!(open.authenticate(&unix, None), Ok(Identity::Trusted));
        assert!(open.authenticate(&remote, None).is_err());
        let trusting = Auth::new(None, true).expect("valid");
        assert_eq!(trusting.authenticate(&remote, None), Ok(Identity::Trusted));

        let bad = AuthConfig {
            tokens: vec![TokenConfig {
                identity: "x".into(),
                sha256: "abc".into(),
            }],
            grants: vec![],
        };
        assert!(Auth::new(Some(&bad), false).is_err());
        // A section with nothing in it grants nothing: it does not fall back to trust.
        let locked = Auth::new(Some(&AuthConfig::default()), true).expect("valid");
        assert!(locked.authenticate(&local, None).is_err());
    }
}
