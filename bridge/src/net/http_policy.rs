//! Which HTTP requests the JSON-RPC and metrics servers accept, by their `Host` and
//! `Origin` headers.
//!
//! - `Host` must name this bridge: a loopback name, the listen address, or a configured
//!   name. A web page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding)
//!   sends its own domain and is refused.
//! - A request carrying `Origin` comes from a browser page; it is refused unless that
//!   origin is configured, so no page can call the API or open a WebSocket to it. The
//!   bridge never sends CORS headers.

use std::net::SocketAddr;

use hyper::{HeaderMap, header};

use crate::config::HttpConfig;

/// The accepted `Host` names and `Origin`s.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl HttpPolicy {
    /// The policy for a server listening on TCP address `listen` (`None`: a unix socket).
    pub fn new(http: &HttpConfig, listen: Option<SocketAddr>) -> Self {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(String::from)
            .collect();
        if let Some(listen) = listen.filter(|l| !l.ip().is_unspecified()) {
            hosts.push(match listen {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
        }
        hosts.extend(http.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Self {
            hosts,
            origins: http.allowed_origins.clone(),
        }
    }

    /// `Ok` if a request with `headers` may be served, else why not (for a 403 body).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or("a Host header is required\n")?;
        if !self.hosts.iter().any(|h| *h == host_name(host)) {
            return Err("Host not allowed; see [http] allowed_hosts\n");
        }
        match headers.get(header::ORIGIN) {
            None => Ok(()),
            Some(origin)
                if self
                    .origins
                    .iter()
                    .any(|o| origin.as_bytes() == o.as_bytes()) =>
            {
                Ok(())
            }
            Some(_) => Err("Origin not allowed; see [http] allowed_origins\n"),
        }
    }
}

/// The name part of a `Host` value, lower-cased: `Example:80` -> `example`,
/// `[::1]:8080` -> `[::1]`.
fn host_name(host: &str) -> String {
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn hosts_and_origins() {
        let http = HttpConfig {
            allowed_hosts: vec!["Bridge".into()],
            allowed_origins: vec!["https://console.example".into()],
        };
        let p = HttpPolicy::new(&http, Some("10.0.0.5:8080".parse().expect("addr")));
        for ok in [
            "localhost:8080",
            "127.0.0.1",
            "[::1]:8080",
            "10.0.0.5:8080",
            "bridge:8080",
            "LOCALHOST",
        ] {
            assert_eq!(p.check(&headers(&[(header::HOST, ok)])), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.6",
            "[::2]:8080",
            "bridge:x",
        ] {
            assert!(p.check(&headers(&[(header::HOST, bad)])).is_err(), "{bad}");
        }
        assert!(p.check(&HeaderMap::new()).is_err());
        let with_origin = |o: &str| headers(&[(header::HOST, "localhost"), (header::ORIGIN, o)]);
        assert_eq!(p.check(&with_origin("https://console.example")), Ok(()));
        assert!(p.check(&with_origin("https://evil.example")).is_err());
        assert!(p.check(&with_origin("null")).is_err());
        // An unspecified listen address is not a name anyone may use.
        let any = HttpPolicy::new(
            &HttpConfig::default(),
            Some("0.0.0.0:8080".parse().expect("addr")),
        );
        assert!(
            any.check(&headers(&[(header::HOST, "0.0.0.0:8080")]))
                .is_err()
        );
    }
}
