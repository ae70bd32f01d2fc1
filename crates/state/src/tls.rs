//! TLS to etcd: the CA that signed etcd's serving certificate (so the client verifies the
//! server), and optionally a client certificate and key (so etcd, run with
//! `--client-cert-auth`, knows the client).
//!
//! The files are read and checked here, before any connection, with the same rustls and crypto
//! provider (ring) the connection uses: a missing, unreadable or malformed file, a key that does
//! not belong to its certificate, is a [`StateError::TlsFile`] naming the file. tonic would
//! otherwise skip an unparsable CA certificate silently and report the rest as a failed
//! handshake with no file in the message. The files are read once, at connect: rotating them
//! means restarting the process (see the chart's README).
//!
//! A handshake etcd refuses is a [`StateError::Tls`] that says which side refused what: etcd's
//! certificate not signed by our CA, or our client certificate (or its absence) refused by etcd.
//! etcd refuses a client certificate after the client considers the TLS 1.3 handshake done, and
//! the HTTP/2 client then often reports only "connection closed"; [`Loaded::diagnose`] repeats
//! the handshake on a plain socket with the same configuration and reads etcd's alert.
//!
//! With the `clap` feature, [`EtcdTlsArgs`] is the one definition of the `--etcd-ca-file`,
//! `--etcd-cert-file` and `--etcd-key-file` flags that the router, the operator and the worker
//! flatten into their configurations.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::StateError;

/// How to reach etcd over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA certificate(s) that signed etcd's serving certificate. Only these are
    /// trusted (never the system's roots).
    pub ca_file: PathBuf,
    /// The client certificate presented to etcd, for etcd's `--client-cert-auth`.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate (PEM, the leaf first, then any intermediates) and its private key
/// (PEM: PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl EtcdTls {
    /// Verifies the server with `ca_file`; no client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        EtcdTls {
            ca_file: ca_file.into(),
            identity: None,
        }
    }

    /// Also presents this client certificate and key.
    pub fn with_identity(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.identity = Some(ClientIdentity {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        });
        self
    }

    /// Reads and checks the files: etcd-client's TLS options, and the same configuration for
    /// diagnosing a refused handshake.
    pub(crate) fn load(&self) -> Result<Loaded, StateError> {
        let ca_pem = read(&self.ca_file, "etcd CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(&ca_pem, &self.ca_file, "etcd CA certificate")? {
            roots.add(cert).map_err(|e| StateError::TlsFile {
                what: "etcd CA certificate",
                path: self.ca_file.clone(),
                source: format!("not a usable CA certificate: {e}").into(),
            })?;
        }
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(&ca_pem));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StateError::TlsFile {
                what: "etcd CA certificate",
                path: self.ca_file.clone(),
                source: Box::new(e),
            })?
            .with_root_certificates(roots);
        let mut config = if let Some(identity) = &self.identity {
            let cert_pem = read(&identity.cert_file, "etcd client certificate")?;
            let key_pem = read(&identity.key_file, "etcd client key")?;
            let chain = certificates(&cert_pem, &identity.cert_file, "etcd client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| StateError::TlsFile {
                what: "etcd client key",
                path: identity.key_file.clone(),
                source: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}").into(),
            })?;
            // What the connection will do with them: the provider loads the key and checks that
            // it is the certificate's.
            let config =
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| StateError::TlsFile {
                        what: "etcd client key",
                        path: identity.key_file.clone(),
                        source: format!(
                            "unusable with the client certificate {}: {e}",
                            identity.cert_file.display()
                        )
                        .into(),
                    })?;
            options = options.identity(Identity::from_pem(cert_pem, key_pem));
            config
        } else {
            builder.with_no_client_auth()
        };
        // As tonic does: gRPC needs HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Loaded {
            options,
            config: Arc::new(config),
            tls: self.clone(),
        })
    }

    /// Why etcd or this client refused the handshake, in words naming the files to look at.
    fn explain(&self, error: &rustls::Error) -> String {
        match error {
            rustls::Error::InvalidCertificate(_) => format!(
                "etcd's serving certificate fails verification with the CA in {} ({error})",
                self.ca_file.display()
            ),
            rustls::Error::AlertReceived(_) => match &self.identity {
                None => format!(
                    "etcd refused the connection ({error}): it requires a client certificate and \
                     none was given (--etcd-cert-file, --etcd-key-file)"
                ),
                Some(identity) => format!(
                    "etcd refused the client certificate {} ({error}): is it signed by the CA \
                     in etcd's --trusted-ca-file, and still valid?",
                    identity.cert_file.display()
                ),
            },
            _ => format!("the TLS handshake failed: {error}"),
        }
    }
}

/// Checked TLS settings, ready to connect with.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub options: TlsOptions,
    config: Arc<rustls::ClientConfig>,
    tls: EtcdTls,
}

impl Loaded {
    /// The explanation of a TLS failure inside an etcd-client error, if it holds one.
    pub fn explain(&self, error: &etcd_client::Error) -> Option<String> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = match error {
            etcd_client::Error::GRpcStatus(status) => Some(status),
            etcd_client::Error::TransportError(e) => Some(e),
            etcd_client::Error::IoError(e) => Some(e),
            _ => None,
        };
        while let Some(e) = next {
            if let Some(tls) = rustls_error(e) {
                return Some(self.tls.explain(tls));
            }
            next = e.source();
        }
        None
    }

    /// Repeats the handshake with `endpoint` on a plain socket, within `timeout`, and reads
    /// until etcd answers: the explanation if etcd (or this client) refuses it, `None` if the
    /// handshake succeeds or nothing is learnt in time. Blocking: run it off the runtime.
    pub fn diagnose(&self, endpoint: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (host, port) = host_port(endpoint)?;
        let name = ServerName::try_from(host.clone()).ok()?;
        let address = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
        };
        let mut socket = TcpStream::connect_timeout(&address, left()?).ok()?;
        socket.set_read_timeout(left()).ok()?;
        socket.set_write_timeout(left()).ok()?;
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name).ok()?;
        let mut stream = rustls::Stream::new(&mut conn, &mut socket);
        // The handshake, then etcd's first bytes (its HTTP/2 settings) or its alert.
        let mut buf = [0_u8; 64];
        match stream.read(&mut buf) {
            // Bytes, or a clean close: the handshake itself went through.
            Ok(_read) => None,
            Err(e) => {
                let tls = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())?;
                Some(self.tls.explain(tls))
            }
        }
    }
}

/// A rustls error itself, or one an `io::Error` carries (the way tokio-rustls reports them).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// `https://host:port/...` to `(host, port)`; IPv6 hosts in brackets; port 2379 if none.
fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.strip_prefix("https://").unwrap_or(endpoint);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 2379,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((authority.to_owned(), 2379)),
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, StateError> {
    std::fs::read(path).map_err(|e| StateError::TlsFile {
        what,
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Every certificate of a PEM file; at least one.
fn certificates(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, StateError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StateError::TlsFile {
            what,
            path: path.to_owned(),
            source: format!("not PEM: {e}").into(),
        })?;
    if certs.is_empty() {
        return Err(StateError::TlsFile {
            what,
            path: path.to_owned(),
            source: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The etcd TLS flags of a binary's command line; flatten it into the binary's `Config`.
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct EtcdTlsArgs {
    /// PEM CA certificate that signed etcd's serving certificate; needed for `https://` etcd
    /// endpoints (only this CA is trusted).
    #[arg(long, env = "TIDELOCK_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// PEM client certificate presented to etcd (etcd's `--client-cert-auth`); needs
    /// `--etcd-key-file` and `--etcd-ca-file`.
    #[arg(
        long,
        env = "TIDELOCK_ETCD_CERT_FILE",
        requires = "etcd_key_file",
        requires = "etcd_ca_file"
    )]
    pub etcd_cert_file: Option<PathBuf>,

    /// PEM private key of `--etcd-cert-file`.
    #[arg(long, env = "TIDELOCK_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

#[cfg(feature = "clap")]
impl EtcdTlsArgs {
    /// The TLS settings, or none for plain `http://` endpoints. Clap has already refused a
    /// certificate without its key (and the reverse) or without a CA; this refuses the same for
    /// values built in code.
    pub fn tls(&self) -> Result<Option<EtcdTls>, EtcdFlagError> {
        match (
            &self.etcd_ca_file,
            &self.etcd_cert_file,
            &self.etcd_key_file,
        ) {
            (None, None, None) => Ok(None),
            (Some(ca), None, None) => Ok(Some(EtcdTls::new(ca))),
            (Some(ca), Some(cert), Some(key)) => {
                Ok(Some(EtcdTls::new(ca).with_identity(cert, key)))
            }
            (_, Some(_), None) => Err(EtcdFlagError::CertWithoutKey),
            (_, None, Some(_)) => Err(EtcdFlagError::KeyWithoutCert),
            (None, Some(_), Some(_)) => Err(EtcdFlagError::CertWithoutCa),
        }
    }

    /// How to reach the etcd at `endpoints` (`--etcd`) with these TLS settings; none without
    /// endpoints, where TLS files are a mistake.
    pub fn config(&self, endpoints: &[String]) -> Result<Option<crate::EtcdConfig>, EtcdFlagError> {
        let tls = self.tls()?;
        match (endpoints.is_empty(), tls) {
            (true, Some(_)) => Err(EtcdFlagError::TlsWithoutEndpoints),
            (true, None) => Ok(None),
            (false, tls) => Ok(Some(
                crate::EtcdConfig::new(endpoints.iter().cloned()).with_tls(tls),
            )),
        }
    }
}

/// Etcd TLS flags that do not go together. Clap refuses most of these combinations itself; this
/// is for values built in code and for TLS files given without any etcd endpoint. The messages
/// name the flags, for the binaries to print as they are.
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EtcdFlagError {
    #[error("--etcd-cert-file needs --etcd-key-file")]
    CertWithoutKey,
    #[error("--etcd-key-file needs --etcd-cert-file")]
    KeyWithoutCert,
    #[error("--etcd-cert-file needs --etcd-ca-file (the CA that signed etcd's certificate)")]
    CertWithoutCa,
    #[error("--etcd-ca-file, --etcd-cert-file and --etcd-key-file need --etcd")]
    TlsWithoutEndpoints,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_give_host_and_port() {
        for (endpoint, host, port) in [
            ("https://127.0.0.1:2379", "127.0.0.1", 2379),
            (
                "https://etcd-0.etcd-peers.ns.svc:32379/",
                "etcd-0.etcd-peers.ns.svc",
                32379,
            ),
            ("https://[::1]:4001", "::1", 4001),
            ("https://[::1]", "::1", 2379),
            ("etcd.local", "etcd.local", 2379),
        ] {
            assert_eq!(
                host_port(endpoint),
                Some((host.to_owned(), port)),
                "{endpoint}"
            );
        }
        assert_eq!(host_port("https://etcd:port"), None);
    }
}

#[cfg(all(test, feature = "clap"))]
mod flag_tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: EtcdTlsArgs,
    }

    fn parse(args: &[&str]) -> Result<EtcdTlsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bin").chain(args.iter().copied())).map(|c| c.tls)
    }

    #[test]
    fn flags_give_the_tls_settings() {
        assert_eq!(parse(&[]).unwrap().tls().unwrap(), None);
        assert_eq!(
            parse(&["--etcd-ca-file", "ca.crt"]).unwrap().tls().unwrap(),
            Some(EtcdTls::new("ca.crt"))
        );
        let args = parse(&[
            "--etcd-ca-file",
            "ca.crt",
            "--etcd-cert-file",
            "tls.crt",
            "--etcd-key-file",
            "tls.key",
        ])
        .unwrap();
        assert_eq!(
            args.tls().unwrap(),
            Some(EtcdTls::new("ca.crt").with_identity("tls.crt", "tls.key"))
        );
    }

    #[test]
    fn a_certificate_and_its_key_come_together_with_a_ca() {
        for (args, words) in [
            (
                &["--etcd-ca-file", "ca", "--etcd-cert-file", "c"][..],
                "--etcd-key-file",
            ),
            (
                &["--etcd-ca-file", "ca", "--etcd-key-file", "k"][..],
                "--etcd-cert-file",
            ),
            (
                &["--etcd-cert-file", "c", "--etcd-key-file", "k"][..],
                "--etcd-ca-file",
            ),
        ] {
            let error = parse(args).expect_err("refused").to_string();
            assert!(error.contains(words), "{args:?}: {error}");
        }
        let built = EtcdTlsArgs {
            etcd_ca_file: None,
            etcd_cert_file: Some("c".into()),
            etcd_key_file: Some("k".into()),
        };
        let error = built.tls().unwrap_err();
        assert_eq!(error, EtcdFlagError::CertWithoutCa);
        assert!(error.to_string().contains("--etcd-ca-file"), "{error}");
        let without_etcd = parse(&["--etcd-ca-file", "ca"]).unwrap().config(&[]);
        assert!(matches!(
            without_etcd,
            Err(EtcdFlagError::TlsWithoutEndpoints)
        ));
    }
}
