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

    /// Worker image for Models that name none.
    #[arg(long, env = "TIDELOCK_WORKER_IMAGE")]
    pub worker_image: String,

    /// Image of the init container that downloads `huggingFace` and `url` model sources (it
    /// needs Python).
    #[arg(long, env = "TIDELOCK_FETCH_IMAGE", default_value = "python:3.12-slim")]
    pub fetch_image: String,

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

impl Config {
    /// The defaults every Model's objects are built with.
    pub fn defaults(&self) -> Defaults {
        Defaults {
            worker_image: self.worker_image.clone(),
            fetch_image: self.fetch_image.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_prefix: self.etcd_prefix.clone(),
        }
    }

    /// Election timing scaled from the lease duration (client-go's ratios: renew within 2/3 of
    /// it, retry every 2/15).
    pub fn timing(&self) -> Result<Timing, String> {
        if self.lease_duration_secs < 3 {
            return Err(format!(
                "--lease-duration-secs must be at least 3, got {}",
                self.lease_duration_secs
            ));
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
