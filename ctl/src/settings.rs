//! Connection settings, merged: options and environment first (clap reads both), then the
//! config file, then the defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::{ConnectionArgs, Output};

/// Where to find the bridge when nothing says otherwise: the default gRPC listener.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or names unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `config.toml`: the same settings as the options, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    token: Option<String>,
    server_name: Option<String>,
    output: Option<Output>,
}

/// The settings a command runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The gRPC endpoint.
    pub endpoint: String,
    /// CA certificate for https.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Bearer token.
    pub token: Option<String>,
    /// The name the bridge's certificate must carry.
    pub server_name: Option<String>,
    /// How to print.
    pub output: Output,
    /// Per-call time limit.
    pub timeout: Option<std::time::Duration>,
}

/// The default config file: `$XDG_CONFIG_HOME/qgactl/config.toml`, or under `~/.config`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("qgactl").join("config.toml"))
}

/// Reads `path`; a missing default file is no file, a missing named one an error.
pub fn read_file(path: &Path, named: bool) -> Result<File, SettingsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
            return Ok(File::default());
        }
        Err(source) => {
            return Err(SettingsError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Settings {
    /// `args` (options and environment) over `file` over the defaults.
    pub fn merge(args: &ConnectionArgs, output: Option<Output>, file: File) -> Self {
        let cert = args.cert.clone().or(file.cert);
        let key = args.key.clone().or(file.key);
        Self {
            endpoint: args
                .endpoint
                .clone()
                .or(file.endpoint)
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            ca: args.ca.clone().or(file.ca),
            identity: cert.zip(key),
            token: args.token.clone().or(file.token),
            server_name: args.server_name.clone().or(file.server_name),
            output: output.or(file.output).unwrap_or(Output::Table),
            timeout: args
                .timeout
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(std::time::Duration::from_secs_f64),
        }
    }

    /// The settings for `args`, reading the config file it names (or the default one).
    pub fn load(args: &ConnectionArgs, output: Option<Output>) -> Result<Self, SettingsError> {
        let file = match (&args.config, default_path()) {
            (Some(named), _) => read_file(named, true)?,
            (None, Some(default)) => read_file(&default, false)?,
            (None, None) => File::default(),
        };
        Ok(Self::merge(args, output, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_win_over_the_file_which_wins_over_defaults() {
        let file: File = toml::from_str(
            r#"endpoint = "https://bridge:50051"
               ca = "/etc/ca.pem"
               token = "from-file"
               output = "json""#,
        )
        .expect("toml");
        let args = ConnectionArgs {
            token: Some("from-flag".into()),
            ..ConnectionArgs::default()
        };
        let s = Settings::merge(&args, None, file);
        assert_eq!(s.endpoint, "https://bridge:50051");
        assert_eq!(s.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.token.as_deref(), Some("from-flag"));
        assert_eq!(s.output, Output::Json);
        let s = Settings::merge(
            &ConnectionArgs::default(),
            Some(Output::Table),
            File::default(),
        );
        assert_eq!(
            (s.endpoint.as_str(), s.output),
            (DEFAULT_ENDPOINT, Output::Table)
        );
    }

    #[test]
    fn a_misspelt_key_is_an_error_and_a_missing_default_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "endpiont = \"x\"\n").expect("write");
        assert!(matches!(
            read_file(&path, false),
            Err(SettingsError::Parse { .. })
        ));
        let missing = dir.path().join("none.toml");
        assert!(read_file(&missing, false).is_ok());
        assert!(matches!(
            read_file(&missing, true),
            Err(SettingsError::Read { .. })
        ));
    }
}
