//! The control plane's credentials, made fresh for each start: a CA, the API server's serving
//! certificate (for `127.0.0.1` and `localhost`, signed by the CA, so every client verifies the
//! server as in a real cluster), the service-account signing key (ECDSA P-256; the API server
//! reads its public half, the controller-manager's token controller and the TokenRequest API
//! sign with it), and one bearer token per component in a static token file.

use std::fmt;
use std::path::{Path, PathBuf};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Error;

/// Who a token authenticates as: `(user, groups)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// `system:masters`: the kubeconfig handed to people and tests.
    Admin,
    /// The user the controller-manager's default RBAC binds.
    ControllerManager,
    /// The user the scheduler's default RBAC binds.
    Scheduler,
    /// kwok, the fake kubelets; and the stand-in kubelet that runs Tidelock's pods.
    Kubelet,
}

impl Identity {
    pub const ALL: [Identity; 4] = [
        Identity::Admin,
        Identity::ControllerManager,
        Identity::Scheduler,
        Identity::Kubelet,
    ];

    /// The user name the token authenticates as.
    pub fn name(self) -> &'static str {
        match self {
            Identity::Admin => "tidelock-admin",
            Identity::ControllerManager => "system:kube-controller-manager",
            Identity::Scheduler => "system:kube-scheduler",
            Identity::Kubelet => "tidelock-kubelet",
        }
    }

    fn groups(self) -> &'static str {
        match self {
            // The fake kubelets patch every node's and pod's status and read Secrets for the
            // pods they run: like the admin, they are trusted parts of the control plane.
            Identity::Admin | Identity::Kubelet => "system:masters",
            Identity::ControllerManager | Identity::Scheduler => "",
        }
    }
}

/// A random bearer token (base62, 48 characters).
fn token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..48)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Files written into the control plane's `pki/` folder.
pub struct Pki {
    pub ca_pem: String,
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_public: PathBuf,
    pub sa_private: PathBuf,
    pub token_file: PathBuf,
    tokens: Vec<(Identity, String)>,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the tokens.
        f.debug_struct("Pki")
            .field("ca_cert", &self.ca_cert)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Creates every credential in `dir`.
    pub fn create(dir: &Path) -> Result<Pki, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, Error> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            Ok(path)
        };

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "tidelock local control plane CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let sa = KeyPair::generate()?;
        let tokens: Vec<(Identity, String)> =
            Identity::ALL.iter().map(|&who| (who, token())).collect();
        // token,user,uid,"group1,group2"
        let token_lines: String = tokens
            .iter()
            .map(|(who, t)| format!("{t},{},{},\"{}\"\n", who.name(), who.name(), who.groups()))
            .collect();

        let ca_pem = ca_cert.pem();
        Ok(Pki {
            ca_cert: write("ca.crt", &ca_pem)?,
            ca_pem,
            serving_cert: write("apiserver.crt", &serving_cert.pem())?,
            serving_key: write("apiserver.key", &serving_key.serialize_pem())?,
            sa_public: write("sa.pub", &sa.public_key_pem())?,
            sa_private: write("sa.key", &sa.serialize_pem())?,
            token_file: write("tokens.csv", &token_lines)?,
            tokens,
        })
    }

    /// The bearer token of `who`.
    pub fn token(&self, who: Identity) -> &str {
        self.tokens
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, t)| t.as_str())
            .expect("every identity has a token")
    }
}

/// A kubeconfig for `server` that trusts `ca_pem` and authenticates with `token`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine as _;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tidelock-local", "cluster": {
            "server": server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "tidelock-local", "context": {
            "cluster": "tidelock-local", "user": user, "namespace": "default",
        }}],
        "current-context": "tidelock-local",
    });
    serde_yaml_ng::to_string(&config).expect("a kubeconfig serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_written_and_tokens_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path()).unwrap();
        let ca = std::fs::read_to_string(&pki.ca_cert).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            std::fs::read_to_string(&pki.sa_public)
                .unwrap()
                .contains("PUBLIC KEY")
        );
        let lines = std::fs::read_to_string(&pki.token_file).unwrap();
        assert_eq!(lines.lines().count(), Identity::ALL.len());
        assert!(lines.contains(",system:kube-scheduler,"));
        assert_ne!(pki.token(Identity::Admin), pki.token(Identity::Scheduler));
        assert_eq!(pki.token(Identity::Admin).len(), 48);
        assert!(!format!("{pki:?}").contains(pki.token(Identity::Admin)));
    }

    #[test]
    fn a_kubeconfig_names_server_ca_and_token() {
        let text = kubeconfig("https://127.0.0.1:6443", "PEM", "me", "secret");
        let v: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            "UEVN"
        );
        assert_eq!(v["users"][0]["user"]["token"], "secret");
    }
}
