//! `tidelock-operator` as a library: the pure parts of reconciling `Model` and `Tenant`
//! resources, tested without an API server.
//!
//! So far (issue #6): `builders`, a Model's desired objects (StatefulSets per shard group, the
//! headless Service, the PodDisruptionBudget); `tenants`, a Tenant and its Secrets to the record
//! routers read (or the reason there is none). The reconcilers, leader election and the binary's
//! runtime arrive next; `main.rs` still says the operator is not implemented.

pub mod builders;
pub mod tenants;
