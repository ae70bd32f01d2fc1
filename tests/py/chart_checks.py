"""The Helm chart as Helm and the API server's schemas see it (driven by tests/chart.rs).

1. `helm lint --strict` (Helm's own Go SDK through helm-python-sdk) for each value set.
2. Renders the chart for the value sets below, as `helm install` would, and checks facts about
   the objects: names, images, commands, the etcd endpoints every component gets, the etcd
   members and their --initial-cluster, RBAC (exactly the operator's permissions, no wildcard,
   Secrets read-only), Services that select their pods, budgets, autoscaler, ServiceMonitors.
3. Validates every rendered object, every CRD and the examples' built-in objects with
   `kubernetes-validate --strict -k 1.30.0`. It has no schema for custom resources (it says
   "Couldn't find schema" and passes them), so the examples' Model and Tenant objects are
   validated with `jsonschema` against the CRDs' openAPIV3Schema, made strict the way the API
   server's strict field validation is (an unknown field is an error). The CEL rules are checked
   on the examples by crates/api/tests/crds.rs.
4. Values that break values.schema.json are refused, with a message naming the key.

Environment: CHART (the chart folder), COMMANDS_OUT (a file to write every container's image
and command to, for the Rust side to check against the workspace and the Dockerfile).
Prints the default object list and the validator's output; exits 1 on the first failed check.
"""

import copy
import json
import os
import pathlib
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
NO_BUILTIN_SCHEMA = {"ServiceMonitor", "Model", "Tenant"}

VALUE_SETS = {
    "default": {},
    "external-etcd": {
        "etcd": {
            "external": {"endpoints": ["http://etcd-a.db.svc:2379", "https://etcd-b.db.svc:2379"]},
            "prefix": "/tidelock-prod/",
        }
    },
    "ha": {
        "etcd": {"replicas": 3},
        "operator": {"replicas": 2},
        "router": {
            "replicas": 3,
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "gpu": {
        "worker": {"image": "tidelock/tidelock:0.1.0-cuda"},
        "operator": {
            "watchNamespace": "inference",
            "nodeSelector": {"node-role/cpu": "true"},
        },
        "router": {
            "replicas": 4,
            "policy": "session_hash",
            "extraArgs": ["--max-in-flight", "4096"],
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
]

# The operator's permissions, exactly (issue #6): anything more is a review, not an accident.
OPERATOR_RULES = [
    (["tidelock.dev"], ["models", "tenants"], ["list", "watch", "patch"]),
    (["tidelock.dev"], ["models/status", "tenants/status"], ["patch"]),
    (["tidelock.dev"], ["models/finalizers"], ["update"]),
    (["apps"], ["statefulsets"], ["list", "watch", "create", "patch", "delete"]),
    ([""], ["services"], ["create", "patch"]),
    (["policy"], ["poddisruptionbudgets"], ["create", "patch"]),
    ([""], ["secrets"], ["get", "list", "watch"]),
    ([""], ["pods", "events"], ["list"]),
    (["events.k8s.io"], ["events"], ["create", "patch"]),
]
LEASE_RULES = [(["coordination.k8s.io"], ["leases"], ["get", "create", "update"])]

DEFAULT_OBJECTS = [
    "ClusterRole/tidelock-system-tidelock-operator",
    "ClusterRoleBinding/tidelock-system-tidelock-operator",
    "Deployment/tidelock-operator",
    "Deployment/tidelock-router",
    "PodDisruptionBudget/tidelock-router",
    "Role/tidelock-operator-lease",
    "RoleBinding/tidelock-operator-lease",
    "Service/tidelock-etcd",
    "Service/tidelock-etcd-peers",
    "Service/tidelock-operator-metrics",
    "Service/tidelock-router",
    "ServiceAccount/tidelock-operator",
    "ServiceAccount/tidelock-router",
    "StatefulSet/tidelock-etcd",
]

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
        else:
            check(ns == NAMESPACE, f"{label} {kind}/{name} is in namespace {ns}, not the release's")
        check(len(name) <= 63 or kind.startswith("Cluster"), f"{label} {kind}/{name}: name too long")

    # RBAC: no wildcards, Secrets read-only, exactly the operator's rules and the Lease rule.
    for o in objects:
        if o["kind"] in ("Role", "ClusterRole"):
            for groups, resources, verbs in rules(o):
                check("*" not in groups + resources + verbs, f"{label} {o['kind']}/{o['metadata']['name']} has a wildcard")
                if "secrets" in resources:
                    check(set(verbs) <= {"get", "list", "watch"}, f"{label} secrets must be read-only, got {verbs}")
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
    check(env.get("TIDELOCK_FETCH_IMAGE") == "python:3.12-slim", f"{label} fetch image")
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
    check(rt["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}], f"{label} router port")
    check(rt["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, f"{label} router readiness")
    policy = values.get("router", {}).get("policy", "ttft")
    check(rt["args"][:2] == ["--policy", policy], f"{label} router args {rt['args']}")
    svc = one(objects, "Service", "tidelock-router")
    port = values.get("router", {}).get("service", {}).get("port", 80)
    check(svc["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}], f"{label} router Service port")
    router_dep = one(objects, "Deployment", "tidelock-router")
    check(
        router_dep["spec"]["template"]["spec"].get("automountServiceAccountToken") is False,
        f"{label} the router mounts no API token",
    )

    # Every component reads the same state: one set of etcd endpoints and one prefix.
    for c in (op, rt):
        e = env_of(c)
        check(e.get("TIDELOCK_ETCD_ENDPOINTS") == env["TIDELOCK_ETCD_ENDPOINTS"], f"{label} endpoints differ")
        check(e.get("TIDELOCK_ETCD_PREFIX") == values.get("etcd", {}).get("prefix", "/tidelock/"), f"{label} prefix")

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


def check_bundled_etcd(label, objects, members):
    sts = one(objects, "StatefulSet", "tidelock-etcd")
    check(sts["spec"]["replicas"] == members, f"{label} etcd replicas {sts['spec']['replicas']}")
    check(sts["spec"]["serviceName"] == "tidelock-etcd-peers", f"{label} etcd serviceName")
    peers = one(objects, "Service", "tidelock-etcd-peers")
    check(peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"], f"{label} peers Service")
    (c,) = containers(sts)
    args = c["args"]
    expected = ",".join(
        f"tidelock-etcd-{i}=http://tidelock-etcd-{i}.tidelock-etcd-peers.{NAMESPACE}.svc:2380" for i in range(members)
    )
    check(etcd_flag(args, "--initial-cluster") == expected, f"{label} --initial-cluster {etcd_flag(args, '--initial-cluster')}")
    check(etcd_flag(args, "--name") == "$(POD_NAME)", f"{label} each member is named after its pod")
    # Each member's own advertised peer URL is its entry in --initial-cluster.
    for i in range(members):
        pod = f"tidelock-etcd-{i}"
        own = etcd_flag(args, "--initial-advertise-peer-urls").replace("$(POD_NAME)", pod)
        check(f"{pod}={own}" in expected.split(","), f"{label} {pod} advertises {own}")
    check(env_of(c).get("POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}, f"{label} etcd POD_NAME")
    claims = sts["spec"]["volumeClaimTemplates"]
    check(len(claims) == 1 and claims[0]["metadata"]["name"] == "data", f"{label} one data claim per member")
    op = container(objects, "Deployment", "tidelock-operator")
    endpoints = ",".join(
        f"http://tidelock-etcd-{i}.tidelock-etcd-peers.{NAMESPACE}.svc:2379" for i in range(members)
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
    check(named(default, "HorizontalPodAutoscaler") == [], "[default] no autoscaler")
    check(named(default, "ServiceMonitor") == [], "[default] no ServiceMonitor")
    check(one(default, "Deployment", "tidelock-router")["spec"]["replicas"] == 2, "[default] two routers")

    ext = rendered["external-etcd"]
    check(named(ext, "StatefulSet") == [], "[external-etcd] renders no etcd StatefulSet")
    check(
        not [o for o in ext if "etcd" in o["metadata"]["name"]],
        f"[external-etcd] renders no etcd objects: {[o['metadata']['name'] for o in ext if 'etcd' in o['metadata']['name']]}",
    )
    for kind, name in (("Deployment", "tidelock-operator"), ("Deployment", "tidelock-router")):
        e = env_of(container(ext, kind, name))
        check(e["TIDELOCK_ETCD_ENDPOINTS"] == "http://etcd-a.db.svc:2379,https://etcd-b.db.svc:2379", f"[external-etcd] {name} endpoints {e['TIDELOCK_ETCD_ENDPOINTS']}")
        check(e["TIDELOCK_ETCD_PREFIX"] == "/tidelock-prod/", f"[external-etcd] {name} prefix")

    ha = rendered["ha"]
    check_bundled_etcd("[ha]", ha, 3)
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

    gpu = rendered["gpu"]
    check(named(gpu, "ClusterRole") == [] and named(gpu, "ClusterRoleBinding") == [], "[gpu] no cluster-wide role when one namespace is watched")
    role = one(gpu, "Role", "tidelock-operator")
    check(role["metadata"]["namespace"] == "inference", "[gpu] the operator's Role is in the watched namespace")
    svc = one(gpu, "Service", "tidelock-router")
    check(svc["spec"]["type"] == "LoadBalancer", "[gpu] router Service type")
    rt = container(gpu, "Deployment", "tidelock-router")
    check(rt["args"] == ["--policy", "session_hash", "--max-in-flight", "4096"], f"[gpu] router args {rt['args']}")
    sts = one(gpu, "StatefulSet", "tidelock-etcd")
    check(sts["spec"]["volumeClaimTemplates"][0]["spec"].get("storageClassName") == "fast-ssd", "[gpu] etcd storage class")
    pod = one(gpu, "Deployment", "tidelock-router")["spec"]["template"]["spec"]
    check(pod.get("imagePullSecrets") == [{"name": "registry-credentials"}], "[gpu] pull secrets")


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
    bad = {"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    try:
        chart.render(bad, name=RELEASE, namespace=NAMESPACE, is_install=True)
        check(False, f"{bad} was accepted")
    except helm_python.HelmRenderError as e:
        check("minReplicas (5) must not exceed router.autoscaling.maxReplicas (2)" in str(e), f"refusal says {e}")
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
    if failures:
        print(f"{failures} chart checks failed")
        sys.exit(1)
    print("all chart checks passed")


if __name__ == "__main__":
    main()
