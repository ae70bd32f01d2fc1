//! Certificates for a TLS etcd in tests, made fresh by rcgen: a CA, etcd's serving certificate
//! for `127.0.0.1` and `localhost` signed by it, and a client certificate signed by it (for
//! etcd's `--client-cert-auth`). ECDSA P-256 keys, PEM files in a folder the value owns.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::tls::EtcdTls;

/// A CA with one server and one client certificate, as files.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// A new CA named `name` and its two certificates.
    pub fn generate(name: &str) -> std::io::Result<TestPki> {
        let dir = tempfile::Builder::new()
            .prefix("tidelock-etcd-pki-")
            .tempdir()?;
        let write = |file: &str, text: &str| -> std::io::Result<PathBuf> {
            let path = dir.path().join(file);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let bad = |e: rcgen::Error| std::io::Error::other(format!("rcgen: {e}"));

        let ca_key = KeyPair::generate().map_err(bad)?;
        let mut ca = CertificateParams::new(Vec::new()).map_err(bad)?;
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(bad)?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, &issuer)?;
            Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "etcd",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .map_err(bad)?;
        let (client_cert, client_key) = leaf(
            Vec::new(),
            "tidelock-test-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .map_err(bad)?;
        Ok(TestPki {
            ca_cert: write("ca.crt", &ca_cert.pem())?,
            server_cert: write("server.crt", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.crt", &client_cert)?,
            client_key: write("client.key", &client_key)?,
            dir,
        })
    }

    /// Certificates made elsewhere (the Helm chart's, say), as PEM text, written to files.
    pub fn from_pem(
        ca_cert: &[u8],
        server: (&[u8], &[u8]),
        client: (&[u8], &[u8]),
    ) -> std::io::Result<TestPki> {
        let dir = tempfile::Builder::new()
            .prefix("tidelock-etcd-pki-")
            .tempdir()?;
        let write = |file: &str, pem: &[u8]| -> std::io::Result<PathBuf> {
            let path = dir.path().join(file);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        Ok(TestPki {
            ca_cert: write("ca.crt", ca_cert)?,
            server_cert: write("server.crt", server.0)?,
            server_key: write("server.key", server.1)?,
            client_cert: write("client.crt", client.0)?,
            client_key: write("client.key", client.1)?,
            dir,
        })
    }

    /// The folder holding the files (for a test's own extra files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client's TLS settings: this CA and the client certificate.
    pub fn client_tls(&self) -> EtcdTls {
        EtcdTls::new(&self.ca_cert).with_identity(&self.client_cert, &self.client_key)
    }
}
