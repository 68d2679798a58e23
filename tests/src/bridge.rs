//! The `qga-bridge` binary as a test process, and clients for its two APIs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use jsonrpsee::{
    core::{ClientError, client::ClientT, params::ObjectParams},
    http_client::{HeaderMap, HttpClient, HttpClientBuilder},
};
use qga_proto::v1::{
    guest_agent_client::GuestAgentClient, guest_memory_client::GuestMemoryClient,
    memory_hotplug_client::MemoryHotplugClient,
};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The bridge binary for a guest's QGA socket(s).
#[derive(Debug)]
pub struct BridgeProcess {
    inner: qga_testkit::BridgeProcess,
}

impl BridgeProcess {
    /// Starts `qga-bridge` for `(name, socket)` VMs on free ports; waits until it serves.
    pub async fn start(vms: &[(&str, &Path)]) -> anyhow::Result<Self> {
        Self::start_with_qmp(vms, &[]).await
    }

    /// Like [`BridgeProcess::start`], and gives VMs their QMP sockets (`--qmp NAME=PATH`
    /// for each `(name, socket)` of `qmp`), for memory hotplug.
    pub async fn start_with_qmp(
        vms: &[(&str, &Path)],
        qmp: &[(&str, &Path)],
    ) -> anyhow::Result<Self> {
        let args: Vec<String> = qmp
            .iter()
            .flat_map(|(name, socket)| {
                ["--qmp".to_string(), format!("{name}={}", socket.display())]
            })
            .collect();
        Self::start_with_args(vms, args).await
    }

    /// `qga-bridge --libvirt URI` alone: libvirt's running domains.
    pub async fn start_libvirt(uri: &str) -> anyhow::Result<Self> {
        Self::start_with_args(&[], vec!["--libvirt".into(), uri.into()]).await
    }

    /// [`BridgeProcess::start`] with more command-line `args`.
    pub async fn start_with_args(vms: &[(&str, &Path)], args: Vec<String>) -> anyhow::Result<Self> {
        Self::start_with_env(vms, args, Vec::new()).await
    }

    /// [`BridgeProcess::start_with_args`] with more configuration (TOML after the `[vms]`
    /// table, e.g. a `[hotplug]` table).
    pub async fn start_with_config(
        vms: &[(&str, &Path)],
        config: &str,
        args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::start_full(vms, config, args, Vec::new()).await
    }

    /// [`BridgeProcess::start_with_args`] with more environment variables.
    pub async fn start_with_env(
        vms: &[(&str, &Path)],
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        Self::start_full(vms, "", args, env).await
    }

    /// A bridge serving `vms`, with `config` after its `[vms]` table, `args` and `env`.
    async fn start_full(
        vms: &[(&str, &Path)],
        config: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let table = format!(
            "{}\n{config}\n",
            qga_testkit::BridgeProcess::vms_table(vms.iter().copied())
        );
        let inner = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            qga_testkit::BridgeProcess::start_with_env(&table, &args, &env)
        })
        .await?
        .context("starting qga-bridge")?;
        Ok(Self { inner })
    }

    /// The bridge's gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn grpc_url(&self) -> String {
        self.inner.grpc_url()
    }

    /// Clients of this bridge.
    pub async fn clients(&self) -> anyhow::Result<Clients> {
        Clients::connect(&self.inner.grpc_url(), &self.inner.jsonrpc_url()).await
    }
}

/// gRPC and JSON-RPC clients of one bridge.
#[derive(Debug, Clone)]
pub struct Clients {
    /// GuestMemory service.
    pub memory: GuestMemoryClient<Channel>,
    /// GuestAgent service.
    pub agent: GuestAgentClient<Channel>,
    /// MemoryHotplug service.
    pub hotplug: MemoryHotplugClient<Channel>,
    /// JSON-RPC over HTTP.
    pub http: HttpClient,
}

/// A client's TLS material: the CA that issued the bridge's certificate and, for mutual
/// TLS, the client's certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// CA certificate.
    pub ca: PathBuf,
    /// Client certificate and key, if the client presents one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsClient {
    fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }

    /// tonic's TLS settings.
    fn tonic(&self) -> anyhow::Result<ClientTlsConfig> {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(Self::read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(Self::read(cert)?, Self::read(key)?));
        }
        Ok(tls)
    }

    /// rustls settings for the JSON-RPC client.
    fn rustls(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)? {
            roots.add(cert?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        Ok(match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
            }
            None => builder.with_no_client_auth(),
        })
    }
}

impl Clients {
    /// Connects over TLS with `tls`; `headers` go with every JSON-RPC request.
    pub async fn connect_tls(
        grpc: &str,
        jsonrpc: &str,
        tls: &TlsClient,
        headers: HeaderMap,
    ) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(grpc.to_string())?
            .tls_config(tls.tonic()?)?
            .connect_lazy();
        Ok(Self {
            memory: GuestMemoryClient::new(channel.clone()),
            agent: GuestAgentClient::new(channel.clone()),
            hotplug: MemoryHotplugClient::new(channel),
            http: HttpClientBuilder::default()
                .request_timeout(Duration::from_secs(180))
                .with_custom_cert_store(tls.rustls()?)
                .set_headers(headers)
                .build(jsonrpc)?,
        })
    }

    /// Connects to a bridge (gRPC lazily, so a bridge still starting is fine).
    pub async fn connect(grpc: &str, jsonrpc: &str) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(grpc.to_string())?.connect_lazy();
        Ok(Self {
            memory: GuestMemoryClient::new(channel.clone()),
            agent: GuestAgentClient::new(channel.clone()),
            hotplug: MemoryHotplugClient::new(channel),
            http: HttpClientBuilder::default()
                .request_timeout(Duration::from_secs(180))
                .build(jsonrpc)?,
        })
    }

    /// A JSON-RPC call with named params; errors carry the JSON-RPC code.
    pub async fn rpc(&self, method: &str, params: Value) -> Result<Value, (i32, String)> {
        self.rpc_full(method, params)
            .await
            .map_err(|e| (e.code, e.message))
    }

    /// Like [`Clients::rpc`], with the error's `data` too.
    pub async fn rpc_full(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let transport = |e: String| RpcError {
            code: 0,
            message: e,
            data: None,
        };
        let mut p = ObjectParams::new();
        if let Value::Object(map) = params {
            for (k, v) in map {
                p.insert(&k, v).map_err(|e| transport(e.to_string()))?;
            }
        }
        match self.http.request::<Value, _>(method, p).await {
            Ok(v) => Ok(v),
            Err(ClientError::Call(e)) => Err(RpcError {
                code: e.code(),
                message: e.message().to_string(),
                data: e.data().and_then(|d| serde_json::from_str(d.get()).ok()),
            }),
            Err(e) => Err(transport(e.to_string())),
        }
    }
}

/// A JSON-RPC error answer (code 0: the call did not get an answer).
#[derive(Debug, Clone)]
pub struct RpcError {
    /// The JSON-RPC error code.
    pub code: i32,
    /// Its message.
    pub message: String,
    /// Its `data`, if any.
    pub data: Option<Value>,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JSON-RPC error {}: {}", self.code, self.message)?;
        if let Some(d) = &self.data {
            write!(f, " (data {d})")?;
        }
        Ok(())
    }
}
