//! How the agent proves who it is to the aggregator and checks who the aggregator is: TLS
//! (rustls) with our CA bundle, optionally a client certificate (mTLS), and the projected
//! ServiceAccount token as `authorization: Bearer`. The token file is read again on every
//! connection attempt, since the kubelet rotates projected tokens.

use std::path::PathBuf;

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSecurity {
    /// Projected ServiceAccount token (audience = the aggregator's `security.token_audience`).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signed the aggregator's certificate; turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// Name to verify in the aggregator's certificate (default: the endpoint's host).
    pub tls_server_name: Option<String>,
    /// PEM client certificate and key, when the aggregator requires mTLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("token file {0} does not hold a valid header value")]
    BadToken(PathBuf),
    #[error("TLS setup: {0}")]
    Tls(#[from] tonic::transport::Error),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        path: path.clone(),
        source,
    })
}

impl StreamSecurity {
    /// Whether the connection uses TLS.
    #[must_use]
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
    }

    /// Applies TLS to `endpoint` when configured (files read now, so rotated certs are used).
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, SecurityError> {
        let Some(ca) = &self.ca_file else {
            return Ok(endpoint);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        if let (Some(cert), Some(key)) = (&self.client_cert_file, &self.client_key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(endpoint.tls_config(tls)?)
    }

    /// The `authorization` header value from the token file (read now), if one is configured.
    pub fn bearer(&self) -> Result<Option<MetadataValue<Ascii>>, SecurityError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&read(path)?).trim().to_string();
        if text.is_empty() {
            return Err(SecurityError::EmptyToken(path.clone()));
        }
        format!("Bearer {text}")
            .parse()
            .map(Some)
            .map_err(|_| SecurityError::BadToken(path.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_read_on_every_call_and_validated() {
        let dir = std::env::temp_dir().join(format!("gw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        let s = StreamSecurity {
            token_file: Some(path.clone()),
            ..Default::default()
        };
        assert!(matches!(s.bearer(), Err(SecurityError::Read { .. })));
        std::fs::write(&path, "abc\n").expect("write");
        assert_eq!(s.bearer().expect("ok").expect("some").to_str().ok(), Some("Bearer abc"));
        // Rotated by the kubelet: the next connection uses the new token.
        std::fs::write(&path, "def").expect("write");
        assert_eq!(s.bearer().expect("ok").expect("some").to_str().ok(), Some("Bearer def"));
        std::fs::write(&path, "  \n").expect("write");
        assert!(matches!(s.bearer(), Err(SecurityError::EmptyToken(_))));
        std::fs::write(&path, "a\u{7}b").expect("write");
        assert!(matches!(s.bearer(), Err(SecurityError::BadToken(_))));
        assert!(StreamSecurity::default().bearer().expect("none").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
