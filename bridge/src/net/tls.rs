//! TLS for the bridge's listeners: rustls (ring), TLS 1.2 and 1.3 only, client
//! certificates required and verified when a client CA is configured, and the files
//! reloaded on demand (SIGHUP) without touching established connections.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why TLS could not be set up from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material (key not matching the certificate, say).
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// What a listener speaks inside TLS (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC.
    H2,
    /// JSON-RPC, WebSocket and metrics.
    Http1,
}

/// The current TLS configurations; [`Tls::reload`] swaps them for new connections.
#[derive(Debug)]
pub struct Tls {
    files: TlsConfig,
    h2: RwLock<Arc<ServerConfig>>,
    http1: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads `files`.
    pub fn load(files: TlsConfig) -> Result<Arc<Self>, TlsError> {
        let (h2, http1) = build(&files)?;
        Ok(Arc::new(Self {
            files,
            h2: RwLock::new(h2),
            http1: RwLock::new(http1),
        }))
    }

    /// Reads the files again; on success new connections get the new certificates, on
    /// failure the old ones stay and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (h2, http1) = build(&self.files)?;
        for (slot, new) in [(&self.h2, h2), (&self.http1, http1)] {
            *qga_wire::sync::write(slot) = new;
        }
        Ok(())
    }

    /// An acceptor with the current configuration for `alpn`.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let slot = match alpn {
            Alpn::H2 => &self.h2,
            Alpn::Http1 => &self.http1,
        };
        let config = qga_wire::sync::read(slot).clone();
        TlsAcceptor::from(config)
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The server configurations for gRPC (ALPN h2) and HTTP/1.
fn build(files: &TlsConfig) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let make = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = server_config(files, provider.clone())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    Ok((make(b"h2")?, make(b"http/1.1")?))
}

fn server_config(
    files: &TlsConfig,
    provider: Arc<CryptoProvider>,
) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))
}
