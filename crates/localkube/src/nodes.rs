//! The fake nodes kwok keeps alive: CPU nodes, and GPU nodes that look like the NVIDIA device
//! plugin and GPU feature discovery made them (`nvidia.com/gpu` capacity, the
//! `nvidia.com/gpu.product` label) with the `nvidia.com/gpu` NoSchedule taint GPU node pools
//! carry, so only pods that tolerate it land there.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The annotation kwok is told to manage nodes by.
pub const KWOK_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");
/// The label every fake node carries (for selecting them, and for `kubectl get nodes -l`).
pub const FAKE_LABEL: (&str, &str) = ("tidelock.dev/fake-node", "true");

/// One fake node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeNode {
    pub name: String,
    pub cpu: u32,
    pub memory_gib: u32,
    /// GPUs and their product name (the `nvidia.com/gpu.product` label).
    pub gpus: Option<(u32, String)>,
}

/// The GPU product of the default GPU nodes: the one `charts/tidelock/examples/model-gpu.yaml`
/// asks for.
pub const DEFAULT_GPU_PRODUCT: &str = "NVIDIA-H100-80GB-HBM3";

impl FakeNode {
    pub fn cpu(name: &str, cpu: u32, memory_gib: u32) -> FakeNode {
        FakeNode {
            name: name.into(),
            cpu,
            memory_gib,
            gpus: None,
        }
    }

    pub fn gpu(name: &str, gpus: u32, product: &str) -> FakeNode {
        FakeNode {
            name: name.into(),
            cpu: 64,
            memory_gib: 512,
            gpus: Some((gpus, product.into())),
        }
    }

    /// Two CPU nodes (16 CPUs, 64 GiB) and two GPU nodes (8 x H100, 64 CPUs, 512 GiB).
    pub fn defaults() -> Vec<FakeNode> {
        vec![
            FakeNode::cpu("cpu-0", 16, 64),
            FakeNode::cpu("cpu-1", 16, 64),
            FakeNode::gpu("gpu-0", 8, DEFAULT_GPU_PRODUCT),
            FakeNode::gpu("gpu-1", 8, DEFAULT_GPU_PRODUCT),
        ]
    }

    /// The Node object (status included: kwok keeps what it is created with).
    pub fn object(&self) -> Node {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), self.name.clone()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
            ("type".to_owned(), "kwok".to_owned()),
            (FAKE_LABEL.0.to_owned(), FAKE_LABEL.1.to_owned()),
        ]);
        let mut resources = BTreeMap::from([
            ("cpu".to_owned(), Quantity(self.cpu.to_string())),
            (
                "memory".to_owned(),
                Quantity(format!("{}Gi", self.memory_gib)),
            ),
            ("pods".to_owned(), Quantity("110".into())),
            ("ephemeral-storage".to_owned(), Quantity("500Gi".into())),
        ]);
        let mut taints = Vec::new();
        if let Some((count, product)) = &self.gpus {
            labels.insert("nvidia.com/gpu.product".into(), product.clone());
            labels.insert("nvidia.com/gpu.count".into(), count.to_string());
            resources.insert("nvidia.com/gpu".into(), Quantity(count.to_string()));
            taints.push(Taint {
                key: "nvidia.com/gpu".into(),
                value: Some("present".into()),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
        }
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    KWOK_ANNOTATION.0.to_owned(),
                    KWOK_ANNOTATION.1.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: (!taints.is_empty()).then_some(taints),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(resources.clone()),
                capacity: Some(resources),
                ..NodeStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_nodes_advertise_gpus_label_and_taint() {
        let node = FakeNode::gpu("g", 4, "NVIDIA-H200").object();
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-H200");
        let status = node.status.unwrap();
        assert_eq!(
            status.capacity.unwrap()["nvidia.com/gpu"],
            Quantity("4".into())
        );
        let taint = &node.spec.unwrap().taints.unwrap()[0];
        assert_eq!(
            (taint.key.as_str(), taint.effect.as_str()),
            ("nvidia.com/gpu", "NoSchedule")
        );
        assert_eq!(
            node.metadata.annotations.unwrap()[KWOK_ANNOTATION.0],
            KWOK_ANNOTATION.1
        );
    }

    #[test]
    fn cpu_nodes_have_no_gpus_and_no_taint() {
        let node = FakeNode::cpu("c", 2, 4).object();
        assert!(node.spec.unwrap().taints.is_none());
        let capacity = node.status.unwrap().capacity.unwrap();
        assert!(!capacity.contains_key("nvidia.com/gpu"));
        assert_eq!(capacity["memory"], Quantity("4Gi".into()));
    }
}
