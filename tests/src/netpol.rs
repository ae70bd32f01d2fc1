//! Which pods may open a connection to which, by the NetworkPolicies an API server holds: the
//! decision a network plugin makes, written out for tests, because nothing here enforces
//! NetworkPolicies (no kubelet, no network plugin; the stand-in kubelet runs pods as local
//! processes on loopback). Ingress only, as Tidelock's policies are.
//!
//! The rules (Kubernetes' NetworkPolicy reference): a pod no Ingress policy of its namespace
//! selects takes any traffic; a selected pod takes only what some selecting policy's rule allows,
//! a rule allowing a port (by number or by the pod's named container port; none listed: all)
//! from a peer: a `podSelector` alone matches pods of the policy's namespace, a
//! `namespaceSelector` alone every pod of matching namespaces, both together pods matching both;
//! a rule without `from` allows everyone.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Labels.
pub type Labels = BTreeMap<String, String>;

/// One end of a connection: a pod's namespace (with that namespace's labels) and labels.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub labels: Labels,
    /// Named container ports, for policies that name a port.
    pub ports: BTreeMap<String, i32>,
}

impl Endpoint {
    /// A pod as the API server has it, in a namespace with `namespace_labels`.
    pub fn of(pod: &Pod, namespace_labels: Labels) -> Endpoint {
        let ports = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        Endpoint {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            namespace_labels,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ports,
        }
    }

    /// A pod of no workload (an attacker's, a monitoring agent's) in `namespace`.
    pub fn stranger(namespace: &str, labels: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            namespace: namespace.to_owned(),
            namespace_labels: Labels::from([(
                "kubernetes.io/metadata.name".to_owned(),
                namespace.to_owned(),
            )]),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ports: BTreeMap::new(),
        }
    }
}

/// Whether `selector` matches `labels` (`matchLabels` and `matchExpressions`).
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let equal = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    equal && expressions
}

fn peer_matches(peer: &NetworkPolicyPeer, policy_namespace: &str, from: &Endpoint) -> bool {
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => false, // an ipBlock: never a pod here
        (None, Some(pods)) => from.namespace == policy_namespace && matches(pods, &from.labels),
        (Some(namespaces), pods) => {
            matches(namespaces, &from.namespace_labels)
                && pods.as_ref().is_none_or(|p| matches(p, &from.labels))
        }
    }
}

/// Whether `from` may connect to `to` on TCP `port` under `policies` (every policy of the
/// cluster; those of other namespaces are ignored).
pub fn allowed(policies: &[NetworkPolicy], from: &Endpoint, to: &Endpoint, port: i32) -> bool {
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(to.namespace.as_str()))
        .filter(|p| {
            let spec = p.spec.as_ref().expect("a policy has a spec");
            let ingress = spec
                .policy_types
                .as_ref()
                .is_none_or(|t| t.iter().any(|t| t == "Ingress"));
            ingress
                && spec
                    .pod_selector
                    .as_ref()
                    .is_none_or(|s| matches(s, &to.labels))
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|policy| {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
        let spec = policy.spec.as_ref().unwrap();
        spec.ingress.iter().flatten().any(|rule| {
            let port_ok = rule.ports.as_ref().is_none_or(|ports| {
                ports.is_empty()
                    || ports.iter().any(|p| {
                        p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                            && match &p.port {
                                None => true,
                                Some(IntOrString::Int(n)) => *n == port,
                                Some(IntOrString::String(name)) => {
                                    to.ports.get(name) == Some(&port)
                                }
                            }
                    })
            });
            let from_ok = rule.from.as_ref().is_none_or(|peers| {
                peers.is_empty() || peers.iter().any(|peer| peer_matches(peer, namespace, from))
            });
            port_ok && from_ok
        })
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(value: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn selectors_peers_and_ports_as_kubernetes_defines_them() {
        let policies = [policy(json!({
            "metadata": {"name": "w", "namespace": "ml"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "worker"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"ports": [{"port": 8000}], "from": [
                        {"podSelector": {"matchLabels": {"group": "g0"}}},
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sys"}},
                         "podSelector": {"matchLabels": {"app": "router"}}},
                    ]},
                    {"ports": [{"port": "metrics"}], "from": [
                        {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]}},
                    ]},
                ],
            },
        }))];
        let mut worker = Endpoint::stranger("ml", &[("app", "worker"), ("group", "g0")]);
        worker.ports.insert("metrics".into(), 9100);
        let peer = Endpoint::stranger("ml", &[("group", "g0")]);
        let other_group = Endpoint::stranger("ml", &[("group", "g1")]);
        let router = Endpoint::stranger("sys", &[("app", "router")]);
        let router_elsewhere = Endpoint::stranger("ml", &[("app", "router")]);
        let prometheus = Endpoint::stranger("monitoring", &[]);
        let stranger = Endpoint::stranger("tenant", &[("group", "g0")]);
        assert!(allowed(&policies, &peer, &worker, 8000));
        assert!(allowed(&policies, &router, &worker, 8000));
        assert!(allowed(&policies, &prometheus, &worker, 9100));
        assert!(!allowed(&policies, &other_group, &worker, 8000));
        assert!(!allowed(&policies, &router_elsewhere, &worker, 8000));
        assert!(
            !allowed(&policies, &stranger, &worker, 8000),
            "podSelector alone: own namespace"
        );
        assert!(!allowed(&policies, &prometheus, &worker, 8000));
        assert!(!allowed(&policies, &router, &worker, 9100));
        // A pod no policy selects takes anything.
        let unselected = Endpoint::stranger("ml", &[("app", "other")]);
        assert!(allowed(&policies, &stranger, &unselected, 1234));
    }
}
