//! The operator's configuration: command line and environment (the Helm chart sets the
//! environment), parsed by clap. The only place that reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::builders::Defaults;
use crate::leader::Timing;

/// Tidelock operator: reconciles `Model` and `Tenant` resources (group `tidelock.dev`) onto the
/// cluster. Run two replicas: a Lease elects the one that reconciles.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// etcd endpoints (comma-separated): where workers register and tenants' records go.
    #[arg(
        long,
        env = "TIDELOCK_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of Tidelock's cluster state in etcd.
    #[arg(long, env = "TIDELOCK_ETCD_PREFIX", default_value = "/tidelock/")]
    pub etcd_prefix: String,

    // --etcd-ca-file, --etcd-cert-file, --etcd-key-file: TLS to etcd (tidelock-state's flags).
    #[command(flatten)]
    pub etcd_tls: tidelock_state::EtcdTlsArgs,

    /// --log-format: text (coloured only on a terminal) or JSON lines.
    #[command(flatten)]
    pub log: tidelock_service::LogArgs,

    /// Secret in the operator's namespace (keys `ca.crt`, `tls.crt`, `tls.key`) with the etcd
    /// TLS files for the workers: copied into each Model's namespace and mounted into its
    /// workers. Empty: workers reach etcd without TLS. Required with `https://` endpoints.
    #[arg(long, env = "TIDELOCK_ETCD_CLIENT_SECRET", default_value = "")]
    pub etcd_client_secret: String,

    /// Secret in the operator's namespace whose `token` is the cluster credential of the
    /// internal APIs: created with a random token when missing, copied into each Model's
    /// namespace for its workers, mounted into the routers by the chart.
    #[arg(
        long,
        env = "TIDELOCK_CLUSTER_TOKEN_SECRET",
        default_value = "tidelock-cluster-token"
    )]
    pub cluster_token_secret: String,

    /// Give every shard group a NetworkPolicy: its workers take traffic only from their own
    /// group, the routers (`--router-labels` in the operator's namespace) and, on the metrics
    /// port, the monitoring namespace.
    #[arg(long, env = "TIDELOCK_WORKER_NETWORK_POLICIES", default_value_t = true, action = clap::ArgAction::Set)]
    pub worker_network_policies: bool,

    /// Labels of the router pods (`k=v`, comma-separated), in the operator's namespace.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_LABELS",
        value_delimiter = ',',
        default_value = "app.kubernetes.io/component=router"
    )]
    pub router_labels: Vec<String>,

    /// Labels of the operator's own pods (`k=v`, comma-separated), in its namespace: the
    /// workers' NetworkPolicies admit them to the HTTP port (load reports for the autoscaler).
    #[arg(
        long,
        env = "TIDELOCK_OPERATOR_LABELS",
        value_delimiter = ',',
        default_value = "app.kubernetes.io/component=operator"
    )]
    pub operator_labels: Vec<String>,

    /// Labels (`k=v`, comma-separated) of the namespace Prometheus scrapes from: the workers'
    /// metrics port admits it alone.
    #[arg(
        long,
        env = "TIDELOCK_MONITORING_NAMESPACE_LABELS",
        value_delimiter = ',',
        default_value = "kubernetes.io/metadata.name=monitoring"
    )]
    pub monitoring_namespace_labels: Vec<String>,

    /// Worker image for Models that name none.
    #[arg(long, env = "TIDELOCK_WORKER_IMAGE")]
    pub worker_image: String,

    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "TIDELOCK_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Reconcile only this namespace's resources (default: every namespace).
    #[arg(long, env = "TIDELOCK_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "TIDELOCK_LEASE_NAME", default_value = "tidelock-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (the chart passes the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// This replica's identity in the election (the chart passes the pod's name; default: the
    /// host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds a leader's lease lasts without renewal before a standby takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
}

/// A flag value the operator cannot run with; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A label list (`--router-labels`...) holds something that is not `key=value`.
    #[error("{flag}: `{pair}` is not key=value")]
    NotKeyValue { flag: &'static str, pair: String },
    /// The workers' NetworkPolicies are on, with nothing to admit.
    #[error("the workers' NetworkPolicies need --router-labels and --monitoring-namespace-labels")]
    PolicyPeersMissing,
    /// The etcd TLS flags do not go together.
    #[error(transparent)]
    EtcdTls(#[from] tidelock_state::EtcdFlagError),
    /// TLS to etcd for the operator, but no Secret with the files for the workers.
    #[error(
        "--etcd-ca-file is given but not --etcd-client-secret: the workers reach the same etcd \
         and need its TLS files too"
    )]
    ClientSecretMissing,
    /// A Secret with TLS files for the workers, but the operator itself reaches etcd without.
    #[error(
        "--etcd-client-secret is given but not --etcd-ca-file: the operator reaches the same \
         etcd as the workers, over TLS too"
    )]
    CaFileMissing,
    /// A lease too short to renew within.
    #[error("--lease-duration-secs must be at least 3, got {0}")]
    LeaseTooShort(u64),
}

/// `k=v` pairs as labels; `flag` names the option in the error.
fn labels(
    flag: &'static str,
    pairs: &[String],
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ConfigError::NotKeyValue {
                    flag,
                    pair: pair.clone(),
                })
        })
        .collect()
}

impl Config {
    /// The defaults every Model's objects are built with (an error names a malformed flag).
    pub fn defaults(&self) -> Result<Defaults, ConfigError> {
        let router_labels = labels("--router-labels", &self.router_labels)?;
        let operator_labels = labels("--operator-labels", &self.operator_labels)?;
        let monitoring = labels(
            "--monitoring-namespace-labels",
            &self.monitoring_namespace_labels,
        )?;
        if self.worker_network_policies && (router_labels.is_empty() || monitoring.is_empty()) {
            return Err(ConfigError::PolicyPeersMissing);
        }
        let network_policy = self
            .worker_network_policies
            .then(|| crate::builders::PolicyPeers {
                router_namespace: self.lease_namespace.clone(),
                router_labels,
                operator_labels,
                monitoring_namespace_labels: monitoring,
            });
        Ok(Defaults {
            cluster_token_secret: crate::builders::SecretRef {
                namespace: self.lease_namespace.clone(),
                name: self.cluster_token_secret.clone(),
            },
            network_policy,
            worker_image: self.worker_image.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_prefix: self.etcd_prefix.clone(),
            etcd_client_secret: (!self.etcd_client_secret.is_empty()).then(|| {
                crate::builders::SecretRef {
                    namespace: self.lease_namespace.clone(),
                    name: self.etcd_client_secret.clone(),
                }
            }),
            log: self.log.clone(),
        })
    }

    /// The operator's own etcd TLS settings, checked against the workers': with `https://`
    /// endpoints the workers need the client Secret, and without TLS they must not get one.
    pub fn etcd_tls(&self) -> Result<Option<tidelock_state::EtcdTls>, ConfigError> {
        let tls = self.etcd_tls.tls()?;
        let secret = !self.etcd_client_secret.is_empty();
        if tls.is_some() && !secret {
            return Err(ConfigError::ClientSecretMissing);
        }
        if tls.is_none() && secret {
            return Err(ConfigError::CaFileMissing);
        }
        Ok(tls)
    }

    /// Election timing scaled from the lease duration (client-go's ratios: renew within 2/3 of
    /// it, retry every 2/15).
    pub fn timing(&self) -> Result<Timing, ConfigError> {
        if self.lease_duration_secs < 3 {
            return Err(ConfigError::LeaseTooShort(self.lease_duration_secs));
        }
        let lease = Duration::from_secs(self.lease_duration_secs);
        Ok(Timing {
            lease_duration: lease,
            renew_deadline: lease * 2 / 3,
            retry: lease * 2 / 15,
        })
    }

    /// This replica's election identity.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("tidelock-operator-{}", std::process::id()))
        })
    }
}

#[cfg(test)]
mod etcd_tls_tests {
    use clap::Parser;

    use super::{Config, ConfigError};
    use crate::builders::SecretRef;

    fn parse(args: &[&str]) -> Config {
        let base = [
            "tidelock-operator",
            "--etcd-endpoints",
            "https://e:2379",
            "--worker-image",
            "w",
            "--lease-namespace",
            "tidelock-system",
        ];
        Config::try_parse_from(base.iter().chain(args).copied()).unwrap()
    }

    #[test]
    fn the_operators_tls_and_the_workers_secret_come_together() {
        let error = parse(&["--etcd-ca-file", "ca.crt"]).etcd_tls().unwrap_err();
        assert!(matches!(error, ConfigError::ClientSecretMissing), "{error}");
        assert!(
            error.to_string().contains("--etcd-client-secret"),
            "{error}"
        );
        let error = parse(&["--etcd-client-secret", "c"])
            .etcd_tls()
            .unwrap_err();
        assert!(matches!(error, ConfigError::CaFileMissing), "{error}");
        assert!(error.to_string().contains("--etcd-ca-file"), "{error}");
        assert_eq!(parse(&[]).etcd_tls().unwrap(), None);
        assert_eq!(parse(&[]).defaults().unwrap().etcd_client_secret, None);
        let config = parse(&[
            "--etcd-ca-file",
            "ca.crt",
            "--etcd-cert-file",
            "tls.crt",
            "--etcd-key-file",
            "tls.key",
            "--etcd-client-secret",
            "tidelock-etcd-client",
        ]);
        assert!(config.etcd_tls().unwrap().is_some());
        assert_eq!(
            config.defaults().unwrap().etcd_client_secret,
            Some(SecretRef {
                namespace: "tidelock-system".into(),
                name: "tidelock-etcd-client".into(),
            })
        );
    }

    #[test]
    fn malformed_flags_are_named() {
        let error = parse(&["--router-labels", "app"]).defaults().unwrap_err();
        assert!(
            matches!(&error, ConfigError::NotKeyValue { flag: "--router-labels", pair } if pair == "app"),
            "{error}"
        );
        assert_eq!(error.to_string(), "--router-labels: `app` is not key=value");
        let error = parse(&["--lease-duration-secs", "2"]).timing().unwrap_err();
        assert!(matches!(error, ConfigError::LeaseTooShort(2)), "{error}");
        assert_eq!(
            error.to_string(),
            "--lease-duration-secs must be at least 3, got 2"
        );
    }
}
