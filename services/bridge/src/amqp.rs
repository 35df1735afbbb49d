//! The AMQP connection: URL, TLS files, a connect that gives up after
//! `amqp.connect_timeout`.

use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use thiserror::Error;
use warden_shared::amqp::AmqpConfig;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot read {key} {path}")]
    TlsFile {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no AMQP connection within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to AMQP at {url}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
}

/// The TLS settings of `c` (empty for `amqp://`).
pub fn tls_config(c: &AmqpConfig) -> Result<OwnedTLSConfig, ConnectError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ConnectError::TlsFile {
            key,
            path: path.display().to_string(),
            source,
        })
    };
    let cert_chain = match &c.tls_ca_file {
        Some(p) => Some(String::from_utf8_lossy(&read("amqp.tls_ca_file", p)?).into_owned()),
        None => None,
    };
    let identity = match (&c.tls_cert_file, &c.tls_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls_cert_file", cert)?,
            key: read("amqp.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// One connection attempt named `name` (the broker's management UI and
/// `rabbitmqctl list_connections` show it).
pub async fn connect(c: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let tls = tls_config(c)?;
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let url = c.url.trim().to_string();
    let runtime = lapin::runtime::default_runtime().map_err(|source| ConnectError::Connect {
        url: warden_shared::redact::redact(&url),
        source,
    })?;
    match tokio::time::timeout(
        c.connect_timeout,
        Connection::connect_with_config(&url, props, tls, runtime),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(ConnectError::Connect {
            url: warden_shared::redact::redact(&url),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout(c.connect_timeout)),
    }
}
