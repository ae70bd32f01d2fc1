"""The Helm chart as Helm and the API server's schemas see it (driven by tests/chart.rs).

1. `helm lint --strict` (Helm's own Go SDK through helm-python-sdk) for each value set.
2. Renders the chart for the value sets below, as `helm install` would, and checks facts about
   the objects: names, images, commands, the etcd endpoints, log format and OTLP endpoint
   every component gets, the etcd members and their --initial-cluster, etcd's TLS (client and peer, client-certificate
   authentication, generated or supplied Secrets) and the client Secret the operator and the
   routers mount, NetworkPolicies (each one's pods, sources and ports), RBAC (exactly the
   operator's permissions, no wildcard, Secrets never updated or deleted), Services that select their pods,
   budgets, autoscaler, ServiceMonitors (the metrics ports only).
3. Validates every rendered object, every CRD and the examples' built-in objects with
   `kubernetes-validate --strict -k 1.30.0`. It has no schema for custom resources (it says
   "Couldn't find schema" and passes them), so the examples' Model and Tenant objects are
   validated with `jsonschema` against the CRDs' openAPIV3Schema, made strict the way the API
   server's strict field validation is (an unknown field is an error). The CEL rules are checked
   on the examples by crates/api/tests/crds.rs.
4. Values that break values.schema.json are refused, with a message naming the key; values the
   schema cannot judge (etcd TLS Secrets and endpoint schemes) are refused by the templates.
5. The examples carry no working API key.

Environment: CHART (the chart folder), COMMANDS_OUT (a file to write every container's image
and command to, for the Rust side to check against the workspace and the Dockerfile), TLS_OUT
(a folder to write the generated etcd certificates of the default and HA renders to, as PEM
files `<set>/<secret>/<key>`, for the Rust side to run etcd with and verify).
Prints the default object list and the validator's output; exits 1 on the first failed check.
"""

import base64
import copy
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap

try:
    import helm_python
    import jsonschema
    import yaml
    import kubernetes_validate  # noqa: F401  (run below as `python -m kubernetes_validate`)
except ImportError as e:
    print(
        f"MISSING: {e}. The chart checks need helm-python-sdk and kubernetes-validate in the "
        "venv: run ./scripts/test, which installs the pinned versions."
    )
    sys.exit(3)

CHART = pathlib.Path(os.environ["CHART"])
KUBE = "1.30.0"
RELEASE = "tidelock"
NAMESPACE = "tidelock-system"
IMAGE = "tidelock/tidelock:0.1.0"

# Kinds kubernetes-validate has no schema for; checked here by other means.
NO_BUILTIN_SCHEMA = {"ServiceMonitor", "PodMonitor", "Model", "Tenant"}

VALUE_SETS = {
    "default": {},
    "external-etcd": {
        "etcd": {
            "external": {
                "endpoints": ["https://etcd-a.db.svc:2379", "https://etcd-b.db.svc:2379"],
                "tls": {"clientSecret": "etcd-client-certs"},
            },
            "prefix": "/tidelock-prod/",
        }
    },
    # As tests/kube.rs and `tidelock kube up` install it: an etcd over plain http.
    "external-etcd-plain": {"etcd": {"external": {"endpoints": ["http://127.0.0.1:2379"]}}},
    "supplied-certs": {
        "etcd": {"tls": {"serverSecret": "my-etcd-server", "clientSecret": "my-etcd-client"}},
        # Helm merges maps with the defaults: null removes the default label.
        "networkPolicy": {
            "monitoringNamespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": None, "team": "observability"}}
        },
    },
    "open": {"etcd": {"tls": {"enabled": False}}, "networkPolicy": {"enabled": False}},
    "ha": {
        "logFormat": "json",
        "otlp": {"endpoint": "http://otel-collector.monitoring:4317"},
        "etcd": {"replicas": 3},
        "operator": {"replicas": 2},
        "router": {
            "replicas": 3,
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    },
    "gpu": {
        "podMonitor": {"enabled": True},
        "worker": {"image": "tidelock/tidelock:0.1.0-cuda"},
        "operator": {
            "watchNamespace": "inference",
            "nodeSelector": {"node-role/cpu": "true"},
        },
        "router": {
            "replicas": 4,
            "policy": "session_hash",
            "extraArgs": ["--max-in-flight", "4096"],
            "limits": {"prepareMemory": "1GiB", "maxRequestsPerTenant": 64},
            "service": {"type": "LoadBalancer", "port": 443},
            "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        },
        "etcd": {"persistence": {"size": "20Gi", "storageClass": "fast-ssd"}},
        "imagePullSecrets": [{"name": "registry-credentials"}],
    },
}

# Values the schema must refuse, and the words the refusal must contain.
BAD_VALUES = [
    ({"etcd": {"replicas": 2}}, "at '/etcd/replicas': value must be one of 1, 3"),
    ({"router": {"replicas": -1}}, "at '/router/replicas': minimum: got -1, want 0"),
    ({"operator": {"replicas": -2}}, "at '/operator/replicas': minimum: got -2, want 0"),
    ({"router": {"replicas": "3"}}, "at '/router/replicas': got string, want integer"),
    ({"etcd": {"persistence": {"size": []}}}, "at '/etcd/persistence/size'"),
    ({"routers": {"replicas": 2}}, "additional properties 'routers' not allowed"),
    ({"router": {"replica": 2}}, "at '/router': additional properties 'replica' not allowed"),
    ({"router": {"policy": "random"}}, "at '/router/policy': value must be one of 'ttft'"),
    (
        {"etcd": {"external": {"endpoints": ["etcd:2379"]}}},
        "at '/etcd/external/endpoints/0': 'etcd:2379' does not match pattern",
    ),
    ({"serviceMonitor": {"enabled": "yes"}}, "at '/serviceMonitor/enabled': got string, want boolean"),
    ({"networkPolicy": {"enabled": "yes"}}, "at '/networkPolicy/enabled': got string, want boolean"),
    ({"networkPolicy": {"monitoringNamespace": "x"}}, "at '/networkPolicy': additional properties 'monitoringNamespace' not allowed"),
    ({"etcd": {"tls": {"validityDays": 0}}}, "at '/etcd/tls/validityDays': minimum: got 0, want 1"),
    ({"etcd": {"tls": {"clientSecret": "Bad_Name"}}}, "at '/etcd/tls/clientSecret': 'Bad_Name' does not match pattern"),
    ({"etcd": {"external": {"tls": {"caSecret": "x"}}}}, "at '/etcd/external/tls': additional properties 'caSecret' not allowed"),
    (
        {"otlp": {"endpoint": "https://otel-collector:4317"}},
        "at '/otlp/endpoint': 'https://otel-collector:4317' does not match pattern",
    ),
]

# Values only the templates can judge, and the words of their refusal.
BAD_TEMPLATES = [
    (
        {"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "minReplicas (5) must not exceed router.autoscaling.maxReplicas (2)",
    ),
    ({"etcd": {"tls": {"serverSecret": "s"}}}, "etcd.tls.serverSecret and etcd.tls.clientSecret come together"),
    (
        {"etcd": {"external": {"endpoints": ["https://e:2379"]}}},
        "https://e:2379 is https://: set etcd.external.tls.clientSecret",
    ),
    (
        {"etcd": {"external": {"endpoints": ["http://e:2379"], "tls": {"clientSecret": "c"}}}},
        "http://e:2379 is plain http:// but etcd.external.tls.clientSecret is set",
    ),
    ({"etcd": {"external": {"tls": {"clientSecret": "c"}}}}, "etcd.external.tls.clientSecret needs etcd.external.endpoints"),
    (
        {"etcd": {"external": {"endpoints": ["http://e:2379"]}, "tls": {"serverSecret": "s", "clientSecret": "c"}}},
        "give the client Secret as etcd.external.tls.clientSecret",
    ),
]

# The operator's permissions, exactly (issue #6): anything more is a review, not an accident.
OPERATOR_RULES = [
    (["tidelock.dev"], ["models", "tenants"], ["list", "watch", "patch"]),
    (["tidelock.dev"], ["models/status", "tenants/status"], ["patch"]),
    (["tidelock.dev"], ["models/finalizers"], ["update"]),
    (["apps"], ["statefulsets"], ["list", "watch", "create", "patch", "delete"]),
    ([""], ["services"], ["create", "patch"]),
    (["policy"], ["poddisruptionbudgets"], ["create", "patch"]),
    (["networking.k8s.io"], ["networkpolicies"], ["create", "patch", "delete"]),
    ([""], ["secrets"], ["get", "list", "watch", "create", "patch"]),
    ([""], ["pods", "events"], ["list"]),
    (["events.k8s.io"], ["events"], ["create", "patch"]),
]
LEASE_RULES = [
    (["coordination.k8s.io"], ["leases"], ["get", "create", "update"]),
    ([""], ["secrets"], ["get"]),
    ([""], ["secrets"], ["create"]),
]

DEFAULT_OBJECTS = [
    "ClusterRole/tidelock-system-tidelock-operator",
    "ClusterRoleBinding/tidelock-system-tidelock-operator",
    "Deployment/tidelock-operator",
    "Deployment/tidelock-router",
    "NetworkPolicy/tidelock-etcd",
    "NetworkPolicy/tidelock-operator",
    "NetworkPolicy/tidelock-router",
    "PodDisruptionBudget/tidelock-router",
    "Role/tidelock-operator-lease",
    "RoleBinding/tidelock-operator-lease",
    "Secret/tidelock-etcd-ca",
    "Secret/tidelock-etcd-client",
    "Secret/tidelock-etcd-server",
    "Service/tidelock-etcd",
    "Service/tidelock-etcd-peers",
    "Service/tidelock-operator-metrics",
    "Service/tidelock-router",
    "Service/tidelock-router-admin",
    "ServiceAccount/tidelock-operator",
    "ServiceAccount/tidelock-router",
    "StatefulSet/tidelock-etcd",
]

# The labels the operator gives worker pods (operator/src/builders.rs, tidelock_api::labels):
# etcd admits pods with these from the Models' namespaces.
WORKER_LABELS = {"app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "tidelock-operator"}
MONITORING = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
TLS_DIR = "/etc/tidelock/etcd-tls"

failures = 0


def check(ok, what):
    global failures
    if not ok:
        failures += 1
        print(f"FAIL: {what}")
    return ok


def fail_now(what):
    print(f"FAIL: {what}")
    sys.exit(1)


def render(chart, values):
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects, manifests


def named(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def one(objects, kind, name):
    found = named(objects, kind, name)
    if len(found) != 1:
        fail_now(f"expected one {kind}/{name}, found {len(found)}")
    return found[0]


def containers(obj):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def container(objects, kind, name):
    (c,) = [c for c in containers(one(objects, kind, name))]
    return c


def rules(role):
    return [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]


def etcd_flag(args, flag):
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return values[0] if len(values) == 1 else None


def check_common(set_name, objects, values):
    """Facts every value set must keep."""
    label = f"[{set_name}]"
    merged_ns = values.get("operator", {}).get("watchNamespace", "")
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        ns = o["metadata"].get("namespace")
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            check(ns is None, f"{label} {kind}/{name} is cluster-scoped but has a namespace")
        elif kind in ("Role", "RoleBinding") and name.endswith("-operator") and merged_ns:
            check(ns == merged_ns, f"{label} {kind}/{name} belongs in the watched namespace {merged_ns}")
        elif kind == "ConfigMap" and name.endswith("-dashboard"):
            want = values.get("grafanaDashboard", {}).get("namespace") or NAMESPACE
            check(ns == want, f"{label} the dashboard is in namespace {ns}, not {want}")
        else:
            check(ns == NAMESPACE, f"{label} {kind}/{name} is in namespace {ns}, not the release's")
        check(len(name) <= 63 or kind.startswith("Cluster"), f"{label} {kind}/{name}: name too long")

    # RBAC: no wildcards, Secrets read-only, exactly the operator's rules and the Lease rule.
    for o in objects:
        if o["kind"] in ("Role", "ClusterRole"):
            for groups, resources, verbs in rules(o):
                check("*" not in groups + resources + verbs, f"{label} {o['kind']}/{o['metadata']['name']} has a wildcard")
                if "secrets" in resources:
                    # Read tenants' keys; write (apply) the Models' copies of the cluster
                    # credential and etcd client Secret; never update or delete a Secret.
                    check(
                        set(verbs) <= {"get", "list", "watch", "create", "patch"},
                        f"{label} secrets: no update or delete, got {verbs}",
                    )
    operator_roles = [
        o for o in objects if o["kind"] in ("Role", "ClusterRole") and not o["metadata"]["name"].endswith("-lease")
    ]
    check(len(operator_roles) == 1, f"{label} one role holds the operator's permissions")
    check(rules(operator_roles[0]) == OPERATOR_RULES, f"{label} operator rules: {rules(operator_roles[0])}")
    lease = one(objects, "Role", "tidelock-operator-lease")
    check(rules(lease) == LEASE_RULES, f"{label} lease rules: {rules(lease)}")
    check(lease["metadata"]["namespace"] == NAMESPACE, f"{label} the Lease role is in the release namespace")
    for binding in [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]:
        ref = binding["roleRef"]
        check(
            named(objects, ref["kind"], ref["name"]) != [],
            f"{label} {binding['kind']}/{binding['metadata']['name']} refers to a missing {ref['kind']}/{ref['name']}",
        )
        check(
            binding["subjects"] == [{"kind": "ServiceAccount", "name": "tidelock-operator", "namespace": NAMESPACE}],
            f"{label} {binding['metadata']['name']} binds the operator's ServiceAccount only",
        )

    # The operator: the binary's interface.
    dep = one(objects, "Deployment", "tidelock-operator")
    op = container(objects, "Deployment", "tidelock-operator")
    env = env_of(op)
    check(op["command"] == ["tidelock-operator"], f"{label} operator command {op['command']}")
    check(dep["spec"]["template"]["spec"]["serviceAccountName"] == "tidelock-operator", f"{label} operator SA")
    worker_image = values.get("worker", {}).get("image") or IMAGE
    check(op["image"] == IMAGE, f"{label} operator image {op['image']}")
    check(env.get("TIDELOCK_WORKER_IMAGE") == worker_image, f"{label} worker image {env.get('TIDELOCK_WORKER_IMAGE')}")
    check("TIDELOCK_FETCH_IMAGE" not in env, f"{label} no fetch image: the worker image fetches")
    check(env.get("TIDELOCK_OPERATOR_LISTEN") == "0.0.0.0:8080", f"{label} operator listen")
    check(env.get("TIDELOCK_LEASE_NAME") == "tidelock-operator", f"{label} lease name")
    check(env.get("POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}, f"{label} POD_NAME from the pod")
    check(env.get("POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}}, f"{label} POD_NAMESPACE")
    check(env.get("TIDELOCK_WATCH_NAMESPACE") == (merged_ns or None), f"{label} watch namespace {env.get('TIDELOCK_WATCH_NAMESPACE')}")
    check(op["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}], f"{label} operator port")
    check(op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{label} operator liveness")
    check(op["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, f"{label} operator readiness")
    check(dep["spec"]["replicas"] == values.get("operator", {}).get("replicas", 2), f"{label} operator replicas")

    # The router.
    rt = container(objects, "Deployment", "tidelock-router")
    renv = env_of(rt)
    check(rt["command"] == ["tidelock-router"], f"{label} router command {rt['command']}")
    check(renv.get("TIDELOCK_ROUTER_LISTEN") == "0.0.0.0:8000", f"{label} router listen")
    check(
        rt["ports"]
        == [
            {"name": "http", "containerPort": 8000, "protocol": "TCP"},
            {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
        ],
        f"{label} router ports {rt['ports']}",
    )
    check(rt["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, f"{label} router readiness")
    policy = values.get("router", {}).get("policy", "ttft")
    check(rt["args"][:4] == ["--policy", policy, "--metrics-listen", "0.0.0.0:9090"], f"{label} router args {rt['args']}")
    # The cluster credential: the operator creates the Secret (and copies it for the workers);
    # the routers read it from there; the operator is told the routers' labels for the workers'
    # NetworkPolicies, and whether to write them.
    token = {"secretKeyRef": {"name": "tidelock-cluster-token", "key": "token"}}
    check(renv.get("TIDELOCK_CLUSTER_TOKEN") == token, f"{label} router credential {renv.get('TIDELOCK_CLUSTER_TOKEN')}")
    oenv = env_of(op)
    check(oenv.get("TIDELOCK_CLUSTER_TOKEN_SECRET") == "tidelock-cluster-token", f"{label} operator credential")
    policies_on = values.get("networkPolicy", {}).get("enabled", True)
    check(oenv.get("TIDELOCK_WORKER_NETWORK_POLICIES") == str(policies_on).lower(), f"{label} worker policies flag")
    router_labels = dict(kv.split("=", 1) for kv in oenv.get("TIDELOCK_ROUTER_LABELS", "").split(","))
    router_pod_labels = one(objects, "Deployment", "tidelock-router")["spec"]["template"]["metadata"]["labels"]
    check(
        router_labels.items() <= router_pod_labels.items() and router_labels.get("app.kubernetes.io/component") == "router",
        f"{label} the workers' policies select the routers by {router_labels}",
    )
    svc = one(objects, "Service", "tidelock-router")
    port = values.get("router", {}).get("service", {}).get("port", 80)
    # The public Service carries the API only, never the admin port (/metrics).
    check(svc["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}], f"{label} router Service port")
    admin = one(objects, "Service", "tidelock-router-admin")
    check(admin["spec"]["type"] == "ClusterIP", f"{label} the admin Service stays inside the cluster")
    check(admin["spec"]["ports"] == [{"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"}], f"{label} router admin Service port")
    router_dep = one(objects, "Deployment", "tidelock-router")
    check(
        router_dep["spec"]["template"]["spec"].get("automountServiceAccountToken") is False,
        f"{label} the router mounts no API token",
    )

    # Every component reads the same state: one set of etcd endpoints and one prefix; and logs
    # and exports its spans alike (the operator passes both on to the workers).
    for c in (op, rt):
        e = env_of(c)
        check(e.get("TIDELOCK_LOG_FORMAT") == values.get("logFormat", "text"), f"{label} log format")
        otlp = values.get("otlp", {}).get("endpoint") or None
        check(e.get("TIDELOCK_OTLP_ENDPOINT") == otlp, f"{label} OTLP endpoint {e.get('TIDELOCK_OTLP_ENDPOINT')}")
        check(e.get("TIDELOCK_ETCD_ENDPOINTS") == env["TIDELOCK_ETCD_ENDPOINTS"], f"{label} endpoints differ")
        check(e.get("TIDELOCK_ETCD_PREFIX") == values.get("etcd", {}).get("prefix", "/tidelock/"), f"{label} prefix")
    check_etcd_client_tls(label, objects, values)
    check_network_policies(label, objects, values)

    # Every Service, budget and autoscaler finds what it points at.
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for s in named(objects, "Service"):
        selector = s["spec"]["selector"]
        matches = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        check(len(matches) == 1, f"{label} Service/{s['metadata']['name']} selects {len(matches)} workloads")
        if matches:
            ports = {p["name"] for c in containers(matches[0]) for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                check(p["targetPort"] in ports, f"{label} Service/{s['metadata']['name']} targets a missing port")
    for w in workloads:
        check(
            w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items(),
            f"{label} {w['metadata']['name']}'s selector matches its pods",
        )
    for pdb in named(objects, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        check(
            any(sel.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads),
            f"{label} PodDisruptionBudget/{pdb['metadata']['name']} selects nothing",
        )
    for hpa in named(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        check(named(objects, ref["kind"], ref["name"]) != [], f"{label} the autoscaler's target exists")


def client_secret(values):
    """The etcd client Secret the operator and the routers mount, or None (plain http)."""
    etcd = values.get("etcd", {})
    if etcd.get("external", {}).get("endpoints"):
        return etcd["external"].get("tls", {}).get("clientSecret") or None
    tls = etcd.get("tls", {})
    if tls.get("enabled", True) is False:
        return None
    return tls.get("clientSecret") or "tidelock-etcd-client"


def check_etcd_client_tls(label, objects, values):
    """The operator and the routers mount the client Secret read-only and get its files' paths;
    the operator also names it for the workers. Without TLS: none of it, and http endpoints."""
    secret = client_secret(values)
    files = {"TIDELOCK_ETCD_CA_FILE": "ca.crt", "TIDELOCK_ETCD_CERT_FILE": "tls.crt", "TIDELOCK_ETCD_KEY_FILE": "tls.key"}
    for name in ("tidelock-operator", "tidelock-router"):
        dep = one(objects, "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        c = container(objects, "Deployment", name)
        env = env_of(c)
        endpoints = env["TIDELOCK_ETCD_ENDPOINTS"].split(",")
        volumes = [v for v in pod.get("volumes", []) if v.get("secret")]
        mounts = c.get("volumeMounts", [])
        if secret is None:
            check(not any(k in env for k in files), f"{label} {name} gets no etcd TLS files without TLS")
            check(volumes == [] and mounts == [], f"{label} {name} mounts nothing without TLS")
            check(all(e.startswith("http://") for e in endpoints), f"{label} {name} endpoints {endpoints}")
            continue
        check(all(e.startswith("https://") for e in endpoints), f"{label} {name} reaches etcd over https: {endpoints}")
        for var, file in files.items():
            check(env.get(var) == f"{TLS_DIR}/{file}", f"{label} {name} {var}={env.get(var)}")
        check(
            volumes == [{"name": "etcd-tls", "secret": {"secretName": secret, "defaultMode": 0o440}}],
            f"{label} {name} volumes {volumes}",
        )
        check(mounts == [{"name": "etcd-tls", "mountPath": TLS_DIR, "readOnly": True}], f"{label} {name} mounts {mounts}")
        check(pod["securityContext"].get("fsGroup") == 10001, f"{label} {name}: the pod's group reads the key")
        if secret == "tidelock-etcd-client" and "tls" not in values.get("etcd", {}).get("external", {}):
            check(
                "checksum/etcd-client-tls" in dep["spec"]["template"]["metadata"].get("annotations", {}),
                f"{label} {name} restarts when the generated client certificate changes",
            )
    op_env = env_of(container(objects, "Deployment", "tidelock-operator"))
    check(op_env.get("TIDELOCK_ETCD_CLIENT_SECRET") == secret, f"{label} the operator's workers get {op_env.get('TIDELOCK_ETCD_CLIENT_SECRET')}")


def peers(policy):
    return [(r.get("from"), r.get("ports")) for r in policy["spec"]["ingress"]]


def labels_of(objects, kind, name):
    return one(objects, kind, name)["spec"]["template"]["metadata"]["labels"]


def admits(peer, pod_labels, namespace_labels):
    """Whether a NetworkPolicy peer admits a pod with these labels in a namespace with these."""
    def matches(selector, labels):
        if selector is None:
            return True
        if selector.get("matchExpressions"):
            fail_now(f"matchExpressions are not evaluated here: {selector}")
        return selector.get("matchLabels", {}).items() <= labels.items()

    if "namespaceSelector" not in peer:
        # A podSelector alone means the policy's own namespace.
        return namespace_labels.get("kubernetes.io/metadata.name") == NAMESPACE and matches(peer.get("podSelector"), pod_labels)
    return matches(peer["namespaceSelector"], namespace_labels) and matches(peer.get("podSelector"), pod_labels)


def reachable(policy, port, pod_labels, namespace_labels):
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule.get("ports", [])]:
            continue
        sources = rule.get("from")
        if sources is None or any(admits(s, pod_labels, namespace_labels) for s in sources):
            return True
    return False


def check_network_policies(label, objects, values):
    """Each policy selects its component's pods, admits exactly the sources the chart promises
    on each port, and names ports its pods have; disabled, there are none."""
    policies = named(objects, "NetworkPolicy")
    enabled = values.get("networkPolicy", {}).get("enabled", True)
    if not enabled:
        check(policies == [], f"{label} no NetworkPolicy when networkPolicy.enabled is false")
        return
    bundled = not values.get("etcd", {}).get("external", {}).get("endpoints")
    expected = ["tidelock-operator", "tidelock-router"] + (["tidelock-etcd"] if bundled else [])
    check(sorted(p["metadata"]["name"] for p in policies) == sorted(expected), f"{label} NetworkPolicies {[p['metadata']['name'] for p in policies]}")
    given = values.get("networkPolicy", {}).get("monitoringNamespaceSelector", {}).get("matchLabels", {})
    monitoring = {k: v for k, v in {**MONITORING["matchLabels"], **given}.items() if v is not None}
    for p in policies:
        for rule in p["spec"]["ingress"]:
            for source in rule.get("from", []):
                if "namespaceSelector" in source and "podSelector" not in source:
                    check(source["namespaceSelector"] == {"matchLabels": monitoring}, f"{label} {p['metadata']['name']} admits {source}")
    monitoring_ns = {"kubernetes.io/metadata.name": "mon", **monitoring}
    release_ns = {"kubernetes.io/metadata.name": NAMESPACE}
    watched = values.get("operator", {}).get("watchNamespace")
    models_ns = {"kubernetes.io/metadata.name": watched or "some-team"}
    other_ns = {"kubernetes.io/metadata.name": "elsewhere"}
    operator = labels_of(objects, "Deployment", "tidelock-operator")
    router = labels_of(objects, "Deployment", "tidelock-router")
    stranger = {"app": "curious"}
    workloads = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}
    for policy in policies:
        name = policy["metadata"]["name"]
        spec = policy["spec"]
        check(spec["policyTypes"] == ["Ingress"], f"{label} {name} policyTypes")
        selected = [w for w in workloads.values() if spec["podSelector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        check([f"{w['kind']}/{w['metadata']['name']}" for w in selected] == [f"{'StatefulSet' if name.endswith('etcd') else 'Deployment'}/{name}"], f"{label} {name} selects {len(selected)} workloads")
        ports = {p["name"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        for rule in spec["ingress"]:
            for p in rule.get("ports", []):
                check(p["port"] in ports, f"{label} {name} names port {p['port']}, which its pods lack")

    def can(policy_name, port, pod, ns):
        return reachable(one(objects, "NetworkPolicy", policy_name), port, pod, ns)

    # The router: its API from anywhere, its admin port (/metrics) from the monitoring namespace only.
    for who, pod, ns in (("a stranger", stranger, other_ns), ("the operator", operator, release_ns)):
        check(can("tidelock-router", "http", pod, ns), f"{label} {who} reaches the router's API")
        check(not can("tidelock-router", "admin", pod, ns), f"{label} {who} must not reach the router's admin port")
    check(can("tidelock-router", "admin", stranger, monitoring_ns), f"{label} monitoring scrapes the router")
    # The operator: metrics from monitoring only.
    check(can("tidelock-operator", "metrics", stranger, monitoring_ns), f"{label} monitoring scrapes the operator")
    check(not can("tidelock-operator", "metrics", router, release_ns), f"{label} the router must not reach the operator")
    check(not can("tidelock-operator", "metrics", stranger, other_ns), f"{label} strangers must not reach the operator")
    if not bundled:
        return
    etcd = labels_of(objects, "StatefulSet", "tidelock-etcd")
    worker = {**WORKER_LABELS, "tidelock.dev/model": "smollm2"}
    for who, pod, ns in (
        ("the operator", operator, release_ns),
        ("a router", router, release_ns),
        ("a worker in its Model's namespace", worker, models_ns),
    ):
        check(can("tidelock-etcd", "client", pod, ns), f"{label} {who} reaches etcd")
        check(not can("tidelock-etcd", "peer", pod, ns), f"{label} {who} must not reach etcd's peer port")
    check(can("tidelock-etcd", "peer", etcd, release_ns), f"{label} etcd members reach each other")
    for who, pod, ns in (
        ("a stranger in the release namespace", stranger, release_ns),
        ("a stranger elsewhere", stranger, other_ns),
        ("the monitoring namespace", stranger, monitoring_ns),
        ("another release's router", {**router, "app.kubernetes.io/instance": "other"}, other_ns),
    ):
        check(not can("tidelock-etcd", "client", pod, ns), f"{label} {who} must not reach etcd")
    if watched:
        check(not can("tidelock-etcd", "client", worker, other_ns), f"{label} workers outside {watched} must not reach etcd")
    check(can("tidelock-etcd", "metrics", stranger, monitoring_ns), f"{label} monitoring scrapes etcd")


def check_bundled_etcd(label, objects, members, tls=True, server_secret="tidelock-etcd-server"):
    scheme = "https" if tls else "http"
    sts = one(objects, "StatefulSet", "tidelock-etcd")
    check(sts["spec"]["replicas"] == members, f"{label} etcd replicas {sts['spec']['replicas']}")
    check(sts["spec"]["serviceName"] == "tidelock-etcd-peers", f"{label} etcd serviceName")
    peers = one(objects, "Service", "tidelock-etcd-peers")
    check(peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"], f"{label} peers Service")
    (c,) = containers(sts)
    args = c["args"]
    expected = ",".join(
        f"tidelock-etcd-{i}={scheme}://tidelock-etcd-{i}.tidelock-etcd-peers.{NAMESPACE}.svc:2380" for i in range(members)
    )
    check(etcd_flag(args, "--initial-cluster") == expected, f"{label} --initial-cluster {etcd_flag(args, '--initial-cluster')}")
    check(etcd_flag(args, "--name") == "$(POD_NAME)", f"{label} each member is named after its pod")
    # Each member's own advertised peer URL is its entry in --initial-cluster.
    for i in range(members):
        pod = f"tidelock-etcd-{i}"
        own = etcd_flag(args, "--initial-advertise-peer-urls").replace("$(POD_NAME)", pod)
        check(f"{pod}={own}" in expected.split(","), f"{label} {pod} advertises {own}")
    check(env_of(c).get("POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}, f"{label} etcd POD_NAME")
    for flag in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls", "--initial-advertise-peer-urls"):
        check(etcd_flag(args, flag).startswith(f"{scheme}://"), f"{label} etcd {flag}={etcd_flag(args, flag)}")
    # Health probes read the metrics listener, which stays plain http and serves no data.
    check(etcd_flag(args, "--listen-metrics-urls") == "http://0.0.0.0:2381", f"{label} etcd metrics listener")
    tls_args = [
        "--cert-file=/etc/etcd/tls/tls.crt",
        "--key-file=/etc/etcd/tls/tls.key",
        "--trusted-ca-file=/etc/etcd/tls/ca.crt",
        "--client-cert-auth",
        "--peer-cert-file=/etc/etcd/tls/tls.crt",
        "--peer-key-file=/etc/etcd/tls/tls.key",
        "--peer-trusted-ca-file=/etc/etcd/tls/ca.crt",
        "--peer-client-cert-auth",
    ]
    pod = sts["spec"]["template"]["spec"]
    if tls:
        for a in tls_args:
            check(args.count(a) == 1, f"{label} etcd runs with {a}: {args}")
        check(
            pod.get("volumes") == [{"name": "tls", "secret": {"secretName": server_secret, "defaultMode": 0o440}}],
            f"{label} etcd's certificate volume {pod.get('volumes')}",
        )
        check({"name": "tls", "mountPath": "/etc/etcd/tls", "readOnly": True} in c["volumeMounts"], f"{label} etcd mounts its certificate")
    else:
        check(not any(a.startswith(("--cert-file", "--client-cert-auth", "--peer-")) for a in args), f"{label} etcd without TLS: {args}")
        check("volumes" not in pod, f"{label} etcd mounts no certificate without TLS")
    claims = sts["spec"]["volumeClaimTemplates"]
    check(len(claims) == 1 and claims[0]["metadata"]["name"] == "data", f"{label} one data claim per member")
    op = container(objects, "Deployment", "tidelock-operator")
    endpoints = ",".join(
        f"{scheme}://tidelock-etcd-{i}.tidelock-etcd-peers.{NAMESPACE}.svc:2379" for i in range(members)
    )
    check(env_of(op)["TIDELOCK_ETCD_ENDPOINTS"] == endpoints, f"{label} endpoints {env_of(op)['TIDELOCK_ETCD_ENDPOINTS']}")
    return sts, claims[0]


def check_sets(chart):
    commands = []
    rendered = {}
    notes = {}
    for set_name, values in VALUE_SETS.items():
        report = helm_python.lint(str(CHART), values, strict=True, kube_version="v" + KUBE, namespace=NAMESPACE)
        serious = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        infos = [m["error"] for m in report["messages"] if m["severity"] < 2]
        check(not serious, f"[{set_name}] helm lint --strict: {serious}")
        print(f"[{set_name}] helm lint --strict -k v{KUBE}: {len(serious)} warnings or errors ({'; '.join(infos) or 'no notes'})")
        objects, manifests = render(chart, values)
        rendered[set_name] = objects
        notes[set_name] = manifests.get("tidelock/templates/NOTES.txt", "")
        check(notes[set_name] != "", f"[{set_name}] NOTES.txt renders")
        check_common(set_name, objects, values)
        for o in objects:
            for c in containers(o):
                commands.append({"set": set_name, "object": f"{o['kind']}/{o['metadata']['name']}", "image": c["image"], "command": c.get("command", []),
                                 "args": c.get("args", []), "env": [e["name"] for e in c.get("env", [])]})
        # The worker the operator starts runs this image; its binary must be in it too.
        op = container(objects, "Deployment", "tidelock-operator")
        commands.append({"set": set_name, "object": "operator's workers", "image": env_of(op)["TIDELOCK_WORKER_IMAGE"], "command": ["tidelock-worker"], "args": [], "env": []})
    return commands, rendered, notes


def check_facts(rendered):
    default = rendered["default"]
    names = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in default)
    print(f"[default] rendered {len(names)} objects:")
    for n in names:
        print(f"  {n}")
    check(names == DEFAULT_OBJECTS, f"[default] objects differ from the expected list: {names}")
    sts, claim = check_bundled_etcd("[default]", default, 1)
    check(claim["spec"]["resources"]["requests"]["storage"] == "8Gi", "[default] etcd volume size")
    check("storageClassName" not in claim["spec"], "[default] the cluster's default storage class")
    check(named(default, "PodDisruptionBudget", "tidelock-etcd") == [], "[default] no etcd budget for one member")
    pdb = one(default, "PodDisruptionBudget", "tidelock-router")
    check(pdb["spec"] == {**pdb["spec"], "minAvailable": 1}, "[default] router budget minAvailable 1")
    check(
        pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow",
        "[default] a router that is not ready never blocks a drain",
    )
    check(named(default, "HorizontalPodAutoscaler") == [], "[default] no autoscaler")
    check(named(default, "ServiceMonitor") == [], "[default] no ServiceMonitor")
    check(one(default, "Deployment", "tidelock-router")["spec"]["replicas"] == 2, "[default] two routers")
    check_generated_certificates("[default]", default)
    check("checksum/etcd-server-tls" in sts["spec"]["template"]["metadata"].get("annotations", {}), "[default] etcd restarts when its generated certificate changes")

    ext = rendered["external-etcd"]
    check(named(ext, "StatefulSet") == [], "[external-etcd] renders no etcd StatefulSet")
    check(
        not [o for o in ext if "etcd" in o["metadata"]["name"]],
        f"[external-etcd] renders no etcd objects: {[o['metadata']['name'] for o in ext if 'etcd' in o['metadata']['name']]}",
    )
    for kind, name in (("Deployment", "tidelock-operator"), ("Deployment", "tidelock-router")):
        e = env_of(container(ext, kind, name))
        check(e["TIDELOCK_ETCD_ENDPOINTS"] == "https://etcd-a.db.svc:2379,https://etcd-b.db.svc:2379", f"[external-etcd] {name} endpoints {e['TIDELOCK_ETCD_ENDPOINTS']}")
        check(e["TIDELOCK_ETCD_PREFIX"] == "/tidelock-prod/", f"[external-etcd] {name} prefix")
    check(named(ext, "Secret") == [], "[external-etcd] the client Secret is the user's")
    check(
        "annotations" not in one(ext, "Deployment", "tidelock-router")["spec"]["template"]["metadata"],
        "[external-etcd] no checksum of a Secret the chart does not make",
    )
    plain = rendered["external-etcd-plain"]
    check(named(plain, "Secret") == [] and named(plain, "StatefulSet") == [], "[external-etcd-plain] no etcd, no certificates")

    supplied = rendered["supplied-certs"]
    check(named(supplied, "Secret") == [], "[supplied-certs] the chart makes no certificates")
    check_bundled_etcd("[supplied-certs]", supplied, 1, server_secret="my-etcd-server")
    for name in ("tidelock-operator", "tidelock-router"):
        meta = one(supplied, "Deployment", name)["spec"]["template"]["metadata"]
        check("annotations" not in meta, f"[supplied-certs] {name}: supplied Secrets are the user's to roll out")

    open_ = rendered["open"]
    check_bundled_etcd("[open]", open_, 1, tls=False)
    check(named(open_, "Secret") == [] and named(open_, "NetworkPolicy") == [], "[open] no certificates, no NetworkPolicies")

    ha = rendered["ha"]
    check_bundled_etcd("[ha]", ha, 3)
    check_generated_certificates("[ha]", ha)
    etcd_pdb = one(ha, "PodDisruptionBudget", "tidelock-etcd")
    check(etcd_pdb["spec"]["maxUnavailable"] == 1, "[ha] etcd loses one member at a time")
    router = one(ha, "Deployment", "tidelock-router")
    check("replicas" not in router["spec"], "[ha] the autoscaler owns the router's replicas")
    hpa = one(ha, "HorizontalPodAutoscaler", "tidelock-router")
    check((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12), "[ha] autoscaler bounds")
    check(one(ha, "PodDisruptionBudget", "tidelock-router")["spec"]["minAvailable"] == 1, "[ha] router budget")
    monitors = named(ha, "ServiceMonitor")
    check(sorted(m["metadata"]["name"] for m in monitors) == ["tidelock-operator", "tidelock-router"], "[ha] two ServiceMonitors")
    services = named(ha, "Service")
    for m in monitors:
        check(m["metadata"]["labels"].get("release") == "prometheus", "[ha] ServiceMonitor labels")
        sel = m["spec"]["selector"]["matchLabels"]
        targets = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        check(len(targets) == 1, f"[ha] ServiceMonitor/{m['metadata']['name']} selects {len(targets)} Services")
        for ep in m["spec"]["endpoints"]:
            check(
                targets and ep["port"] in {p["name"] for p in targets[0]["spec"]["ports"]} and ep["path"] == "/metrics",
                f"[ha] ServiceMonitor/{m['metadata']['name']} scrapes a port its Service has",
            )
        # Metrics only: the router's is its admin port, never the public API's.
        want = {"tidelock-operator": ("tidelock-operator-metrics", "metrics"), "tidelock-router": ("tidelock-router-admin", "admin")}
        check(
            [t["metadata"]["name"] for t in targets] == [want[m["metadata"]["name"]][0]]
            and [ep["port"] for ep in m["spec"]["endpoints"]] == [want[m["metadata"]["name"]][1]],
            f"[ha] ServiceMonitor/{m['metadata']['name']} scrapes {[t['metadata']['name'] for t in targets]}",
        )

    # Workers: what the operator labels its worker pods with (operator/src/builders.rs) and
    # the name of their metrics-only container port; in every namespace, or the watched one.
    check(named(default, "PodMonitor") == [] and named(default, "ConfigMap") == [], "[default] no PodMonitor, no dashboard")
    pm = one(ha, "PodMonitor", "tidelock-workers")
    check(
        pm["spec"]["selector"]["matchLabels"]
        == {"app.kubernetes.io/component": "worker", "app.kubernetes.io/managed-by": "tidelock-operator"},
        "[ha] the PodMonitor selects the operator's worker pods",
    )
    check(pm["spec"]["namespaceSelector"] == {"any": True}, "[ha] workers in every namespace")
    check([e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"], "[ha] the metrics-only port")
    check(pm["metadata"]["labels"].get("release") == "prometheus", "[ha] PodMonitor labels")
    check(
        one(rendered["gpu"], "PodMonitor", "tidelock-workers")["spec"]["namespaceSelector"] == {"matchNames": ["inference"]},
        "[gpu] workers in the watched namespace",
    )
    dashboard = one(ha, "ConfigMap", "tidelock-dashboard")
    check(dashboard["metadata"]["namespace"] == "monitoring", "[ha] the dashboard in Grafana's namespace")
    check(dashboard["metadata"]["labels"].get("grafana_dashboard") == "1", "[ha] the sidecar's label")
    shipped = json.loads(open(os.path.join(os.path.dirname(__file__), "../../charts/tidelock/dashboards/tidelock.json")).read())
    check(json.loads(dashboard["data"]["tidelock.json"]) == shipped, "[ha] the dashboard is the shipped JSON")

    gpu = rendered["gpu"]
    check(named(gpu, "ClusterRole") == [] and named(gpu, "ClusterRoleBinding") == [], "[gpu] no cluster-wide role when one namespace is watched")
    role = one(gpu, "Role", "tidelock-operator")
    check(role["metadata"]["namespace"] == "inference", "[gpu] the operator's Role is in the watched namespace")
    svc = one(gpu, "Service", "tidelock-router")
    check(svc["spec"]["type"] == "LoadBalancer", "[gpu] router Service type")
    rt = container(gpu, "Deployment", "tidelock-router")
    check(
        rt["args"]
        == [
            "--policy", "session_hash", "--metrics-listen", "0.0.0.0:9090",
            "--client-header-timeout-secs=30", "--client-body-timeout-secs=60",
            "--client-write-timeout-secs=60", "--max-connections=8192",
            "--max-requests-per-tenant=64", "--max-body=32MiB", "--prepare-threads=8",
            "--prepare-per-tenant=2", "--prepare-memory=1GiB", "--max-in-flight", "4096",
        ],
        f"[gpu] router args {rt['args']}",
    )
    sts = one(gpu, "StatefulSet", "tidelock-etcd")
    check(sts["spec"]["volumeClaimTemplates"][0]["spec"].get("storageClassName") == "fast-ssd", "[gpu] etcd storage class")
    pod = one(gpu, "Deployment", "tidelock-router")["spec"]["template"]["spec"]
    check(pod.get("imagePullSecrets") == [{"name": "registry-credentials"}], "[gpu] pull secrets")


def check_generated_certificates(label, objects):
    """The generated etcd Secrets: a CA, and a server and a client certificate it signed, each
    with the keys etcd and the clients read (the Rust side verifies the certificates themselves)."""
    secrets = {s["metadata"]["name"]: s for s in named(objects, "Secret")}
    check(sorted(secrets) == ["tidelock-etcd-ca", "tidelock-etcd-client", "tidelock-etcd-server"], f"{label} generated Secrets {sorted(secrets)}")
    if len(secrets) != 3:
        return
    ca = secrets["tidelock-etcd-ca"]
    check(ca["type"] == "Opaque" and sorted(ca["data"]) == ["ca.crt", "ca.key"], f"{label} the CA Secret")
    for name in ("tidelock-etcd-server", "tidelock-etcd-client"):
        s = secrets[name]
        check(s["type"] == "kubernetes.io/tls" and sorted(s["data"]) == ["ca.crt", "tls.crt", "tls.key"], f"{label} {name} keys")
        check(s["data"]["ca.crt"] == ca["data"]["ca.crt"], f"{label} {name} carries the CA's certificate")
        pem = base64.b64decode(s["data"]["tls.crt"]).decode()
        check(pem.startswith("-----BEGIN CERTIFICATE-----"), f"{label} {name} tls.crt is PEM")


def write_certificates(rendered, out):
    """The generated certificates of the default and HA renders as PEM files, for tests/chart.rs."""
    for set_name in ("default", "ha"):
        for s in named(rendered[set_name], "Secret"):
            folder = out / set_name / s["metadata"]["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for key, value in s["data"].items():
                (folder / key).write_bytes(base64.b64decode(value))


def check_long_release_name(chart):
    """The longest release name helm allows (53 characters) still gives valid object names: a
    Service name is a DNS label (63 characters), and a StatefulSet's pods carry a
    `<name>-<10-character hash>` revision label (63 characters)."""
    release = "r" * 53
    manifests = chart.render({}, name=release, namespace=NAMESPACE, is_install=True)
    names = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for o in yaml.safe_load_all(text):
            if not o or o["kind"].startswith("Cluster"):
                continue
            name = o["metadata"]["name"]
            limit = 63 - 11 if o["kind"] == "StatefulSet" else 63
            check(len(name) <= limit, f"[53-character release] {o['kind']}/{name}: {len(name)} characters, over {limit}")
            names.append(name)
    print(f"[53-character release] {len(names)} objects, longest name {max(map(len, names))} characters")


def check_refusals(chart):
    for values, words in BAD_VALUES:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmValuesError as e:
            message = str(e)
            check(words in message, f"refusal of {values} says {message!r}, expected {words!r}")
            print(f"refused {json.dumps(values)}: {message.strip().splitlines()[-1]}")
            continue
        check(False, f"{values} was accepted")
    # A rule the schema cannot express is a template failure with its own message.
    for bad, words in BAD_TEMPLATES:
        try:
            chart.render(bad, name=RELEASE, namespace=NAMESPACE, is_install=True)
            check(False, f"{bad} was accepted")
        except helm_python.HelmRenderError as e:
            check(words in str(e), f"refusal of {bad} says {e}, expected {words!r}")
            print(f"refused {json.dumps(bad)}: {str(e).split(': ', 1)[1]}")


def strict_schema(schema):
    """An openAPIV3Schema as JSON Schema, refusing unknown fields like strict field validation."""
    s = copy.deepcopy(schema)
    for key in ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "format"):
        s.pop(key, None)
    if s.pop("x-kubernetes-int-or-string", False):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict_schema(x) for x in s[key]]
    if "properties" in s:
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
        if not s.pop("x-kubernetes-preserve-unknown-fields", False):
            s.setdefault("additionalProperties", False)
    elif isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    if "items" in s:
        s["items"] = strict_schema(s["items"])
    return s


def crd_validators():
    validators = {}
    for crd_file in sorted((CHART / "crds").glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"].update(
                apiVersion={"const": f"{crd['spec']['group']}/{version['name']}"},
                kind={"const": crd["spec"]["names"]["kind"]},
                metadata={
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
                },
            )
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def check_examples():
    validators = crd_validators()
    examples = sorted((CHART / "examples").glob("*.yaml"))
    check(
        [e.name for e in examples] == ["model-cpu.yaml", "model-gpu.yaml", "model-sharded.yaml", "tenant.yaml"],
        f"examples: {[e.name for e in examples]}",
    )
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] not in validators:
                continue
            errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.path))
            for e in errors:
                check(False, f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
            if not errors:
                print(f"INFO {path.name} passed for resource {doc['kind'].lower()}/{doc['metadata']['name']} against the CRD's openAPIV3Schema (strict)")
    # The strict schema does refuse what the API server would.
    model = yaml.safe_load((CHART / "examples/model-cpu.yaml").read_text())
    for broken, why in (
        ({**model, "spec": {**model["spec"], "replica": 2}}, "Additional properties are not allowed ('replica' was unexpected)"),
        ({**model, "spec": {**model["spec"], "shards": 0}}, "0 is less than the minimum of 1"),
        ({**model, "spec": {**model["spec"], "kvCache": {"dtype": "f64"}}}, "'f64' is not one of ['f32', 'f16', 'bf16']"),
    ):
        messages = [e.message for e in validators["Model"].iter_errors(broken)]
        check(any(m.startswith(why) for m in messages), f"a broken Model is refused with {why!r}: {messages}")
    check_no_working_key(examples)


def check_no_working_key(examples):
    """No example carries an API key the operator would accept (16 characters or more): no Secret
    value of that length, no key-like literal even in a comment. The Tenant example says how to
    create its Secret with a generated key instead."""
    key_like = re.compile(r"sk-[A-Za-z0-9_\-]{13,}")
    for path in examples:
        text = path.read_text()
        check(not key_like.findall(text), f"{path.name} holds a key-like literal: {key_like.findall(text)}")
        for doc in yaml.safe_load_all(text):
            if doc.get("kind") != "Secret":
                continue
            values = list(doc.get("stringData", {}).values()) + [
                base64.b64decode(v).decode(errors="replace") for v in doc.get("data", {}).values()
            ]
            long_values = [v for v in values if len(str(v)) >= 16]
            check(not long_values, f"{path.name}: Secret/{doc['metadata']['name']} holds a usable key ({len(long_values)} values of 16+ characters)")
    tenant = (CHART / "examples/tenant.yaml").read_text()
    check("kubectl create secret generic team-a-key" in tenant, "tenant.yaml says how to create its Secret")
    print(f"examples: no API key of 16+ characters in {len(examples)} files")


def check_notes(notes):
    """The objects NOTES.txt tells a newcomer to apply are valid, in the namespace the operator watches."""
    validators = crd_validators()
    for set_name, text in notes.items():
        blocks = text.split("<<'YAML'\n")[1:]
        check(len(blocks) == 2, f"[{set_name}] NOTES.txt applies a Model and a Tenant")
        for block in blocks:
            doc = yaml.safe_load(textwrap.dedent(block.split("\n     YAML\n")[0]))
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
            check(not errors, f"[{set_name}] NOTES.txt's {doc['kind']}: {errors}")
        where = VALUE_SETS[set_name].get("operator", {}).get("watchNamespace") or NAMESPACE
        check(f"kubectl apply -n {where} -f -" in text, f"[{set_name}] NOTES.txt applies in {where}")
        check(f"kubectl port-forward -n {NAMESPACE} svc/tidelock-router" in text, f"[{set_name}] NOTES.txt port-forward")
    print(f"NOTES.txt: its Model and Tenant pass the CRDs' schemas for all {len(notes)} value sets")


def kubernetes_validate(files, cwd):
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE, *map(str, files)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, out.stdout + out.stderr


def check_kubernetes_validate(rendered, tmp):
    # Copied under short names, so the output reads `rendered/ha.yaml`, `crds/...`, `examples/...`.
    files = []
    (tmp / "rendered").mkdir()
    for set_name, objects in rendered.items():
        files.append(pathlib.Path("rendered", f"{set_name}.yaml"))
        (tmp / files[-1]).write_text(yaml.safe_dump_all(objects, sort_keys=False))
    for folder in ("crds", "examples"):
        (tmp / folder).mkdir()
        for source in sorted((CHART / folder).glob("*.yaml")):
            files.append(pathlib.Path(folder, source.name))
            (tmp / files[-1]).write_bytes(source.read_bytes())
    rc, output = kubernetes_validate(files, tmp)
    print(f"$ kubernetes-validate --strict -k {KUBE} rendered/*.yaml crds/*.yaml examples/*.yaml")
    print(output.rstrip())
    lines = output.strip().splitlines()
    errors = [l for l in lines if not l.startswith(("INFO ", "WARN "))]
    check(rc == 0 and not errors, f"kubernetes-validate exited {rc}: {errors}")
    warns = [l for l in lines if l.startswith("WARN ")]
    for w in warns:
        check(
            any(f"for kind {k} with" in w for k in NO_BUILTIN_SCHEMA),
            f"kubernetes-validate found no schema for a kind it should know: {w}",
        )
    total = sum(len([d for d in yaml.safe_load_all((tmp / f).read_text()) if d]) for f in files)
    passed = len([l for l in lines if l.startswith("INFO ") and " passed for resource " in l])
    print(f"kubernetes-validate: {passed} passed, {len(warns)} without a built-in schema (custom resources), {len(errors)} errors, of {total} objects")
    check(passed + len(warns) == total, f"every object was validated ({passed} + {len(warns)} of {total})")

    # The validator does refuse a wrong object (so a pass means something).
    dep = copy.deepcopy(one(rendered["default"], "Deployment", "tidelock-router"))
    dep["spec"]["replica"] = 2
    (tmp / "broken.yaml").write_text(yaml.safe_dump(dep))
    rc, output = kubernetes_validate(["broken.yaml"], tmp)
    check(rc != 0 and "Additional properties are not allowed ('replica' was unexpected)" in output, f"a broken Deployment is refused: {output}")


def main():
    with helm_python.Chart.load(str(CHART)) as chart:
        check(chart.metadata.get("kubeVersion") == ">=1.30.0-0", "Chart.yaml kubeVersion")
        commands, rendered, notes = check_sets(chart)
        check_facts(rendered)
        check_refusals(chart)
        check_long_release_name(chart)
    check_examples()
    check_notes(notes)
    with tempfile.TemporaryDirectory() as tmp:
        check_kubernetes_validate(rendered, pathlib.Path(tmp))
    pathlib.Path(os.environ["COMMANDS_OUT"]).write_text(json.dumps(commands, indent=1))
    write_certificates(rendered, pathlib.Path(os.environ["TLS_OUT"]))
    if failures:
        print(f"{failures} chart checks failed")
        sys.exit(1)
    print("all chart checks passed")


if __name__ == "__main__":
    main()
