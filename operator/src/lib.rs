//! `tidelock-operator` as a library: everything the binary runs, testable without a cluster.
//!
//! | Module | What it does |
//! |---|---|
//! | [`builders`] | A Model's desired objects (StatefulSets per shard group, headless Service, PodDisruptionBudget). Pure. |
//! | [`tenants`] | A Tenant and its Secrets to the record routers read, or the reason there is none. Pure, plus the store writes. |
//! | [`reconcile`] | The Model and Tenant reconcilers: server-side apply, status conditions, Events, finalizers, backoff. |
//! | [`leader`] | Leader election on a `coordination.k8s.io` Lease. |
//! | [`metrics`] | Reconcile counts, durations, errors by reason, leadership. |
//! | [`run`] | The controllers and the `/healthz`, `/readyz`, `/metrics` endpoints. |
//! | [`config`] | Command line and environment. |

pub mod autoscale;
pub mod builders;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod tenants;
