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

/// The URL the bridge connects with: with a client certificate and no
/// `auth_mechanism` in the URL it logs in with SASL EXTERNAL (the broker
/// takes the user from the certificate), as fedora-messaging does and
/// Fedora's broker expects.
pub fn effective_url(c: &AmqpConfig) -> String {
    let url = c.url.trim();
    if c.tls_cert_file.is_none() || url.contains("auth_mechanism=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}auth_mechanism=external")
}

/// One connection attempt named `name` (the broker's management UI and
/// `rabbitmqctl list_connections` show it).
pub async fn connect(c: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let tls = tls_config(c)?;
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let url = effective_url(c);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use warden_shared::Config;

    #[test]
    fn a_client_certificate_means_sasl_external_unless_the_url_says_otherwise() {
        let mut c = Config::defaults().amqp;
        c.url = "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub".into();
        assert_eq!(effective_url(&c), c.url);
        c.tls_cert_file = Some("cert.pem".into());
        c.tls_key_file = Some("key.pem".into());
        assert_eq!(
            effective_url(&c),
            "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub?auth_mechanism=external"
        );
        c.url = "amqps://h/%2F?heartbeat=30".into();
        assert_eq!(
            effective_url(&c),
            "amqps://h/%2F?heartbeat=30&auth_mechanism=external"
        );
        c.url = "amqps://u:p@h/%2F?auth_mechanism=plain".into();
        assert_eq!(effective_url(&c), c.url);
    }
}
