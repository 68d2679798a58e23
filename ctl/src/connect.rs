//! A gRPC channel to the bridge from the settings: plain HTTP/2 to a local port, TLS (and
//! mutual TLS) to `https://`, or a unix socket (`unix:/path`); and the requests sent on it,
//! with the bearer token and the time limit.

use std::{path::PathBuf, time::Duration};

use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::settings::Settings;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no channel could be made before any call.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint is not one qgactl understands.
    #[error("endpoint '{0}': give https://HOST:PORT, http://HOST:PORT or unix:/PATH")]
    BadEndpoint(String),
    /// A certificate, key or CA file cannot be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The token cannot go in a header.
    #[error("the token has characters a header cannot carry")]
    BadToken,
    /// TLS settings tonic refused.
    #[error("TLS: {0}")]
    Tls(String),
    /// The bridge could not be reached.
    #[error("cannot reach the bridge at {endpoint}: {reason}")]
    Unreachable {
        /// Where.
        endpoint: String,
        /// Why, as the transport says it.
        reason: String,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::File {
        path: path.clone(),
        source,
    })
}

/// A connected client: the channel, and what every request carries.
#[derive(Debug, Clone)]
pub struct Client {
    /// The channel to the bridge.
    pub channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Option<Duration>,
}

impl Client {
    /// Connects as `settings` say.
    pub async fn connect(settings: &Settings) -> Result<Self, ConnectError> {
        let token = settings
            .token
            .as_deref()
            .map(|t| MetadataValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| ConnectError::BadToken)?;
        let endpoint = &settings.endpoint;
        let unreachable = |e: tonic::transport::Error| ConnectError::Unreachable {
            endpoint: endpoint.clone(),
            reason: source_chain(&e),
        };
        let channel = if let Some(path) = endpoint.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // The URI is a placeholder: the connector below decides where bytes go.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(unreachable)?
        } else {
            endpoint_of(settings)?
                .connect()
                .await
                .map_err(unreachable)?
        };
        Ok(Self {
            channel,
            token,
            timeout: settings.timeout,
        })
    }

    /// `message` as a request with the token and the time limit.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        request
    }
}

/// The tonic endpoint of an `http://` or `https://` URL, with TLS set up for `https`.
fn endpoint_of(settings: &Settings) -> Result<Endpoint, ConnectError> {
    let url = &settings.endpoint;
    let bad = || ConnectError::BadEndpoint(url.clone());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad());
    }
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| bad())?
        .connect_timeout(CONNECT_TIMEOUT);
    if url.starts_with("http://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new();
    match &settings.ca {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls = tls.with_enabled_roots(),
    }
    if let Some((cert, key)) = &settings.identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &settings.server_name {
        tls = tls.domain_name(name.clone());
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| ConnectError::Tls(source_chain(&e)))
}

/// An error and its sources in one line: tonic's own text is only "transport error".
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Output;

    fn settings(endpoint: &str) -> Settings {
        Settings {
            endpoint: endpoint.into(),
            ca: None,
            identity: None,
            token: None,
            server_name: None,
            output: Output::Table,
            timeout: None,
        }
    }

    #[test]
    fn endpoints_qgactl_understands() {
        assert!(endpoint_of(&settings("http://127.0.0.1:50051")).is_ok());
        for bad in ["127.0.0.1:50051", "ftp://x", "http://"] {
            assert!(endpoint_of(&settings(bad)).is_err(), "{bad}");
        }
    }
}
