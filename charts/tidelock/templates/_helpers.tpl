{{/*
Names, labels, images and the etcd endpoints every component shares.
*/}}

{{- define "tidelock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name alone when it already contains the chart name. */}}
{{- define "tidelock.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Component names, truncated so that each object's name still fits in the 63 characters of a
DNS label with its longest suffix: `<operator>-metrics` (Service), `<router>` (Service,
Deployment), `<etcd>-peers` (Service) and `<etcd>-<ordinal>` pods with their
`<etcd>-<10-character hash>` revision label.
*/}}
{{- define "tidelock.operator.fullname" -}}
{{- printf "%s-operator" (include "tidelock.fullname" . | trunc 46 | trimSuffix "-") }}
{{- end }}
{{- define "tidelock.router.fullname" -}}
{{- printf "%s-router" (include "tidelock.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}
{{- define "tidelock.etcd.fullname" -}}
{{- printf "%s-etcd" (include "tidelock.fullname" . | trunc 40 | trimSuffix "-") }}
{{- end }}
{{- define "tidelock.etcd.peers" -}}
{{- printf "%s-peers" (include "tidelock.etcd.fullname" .) }}
{{- end }}

{{- define "tidelock.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tidelock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tidelock
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "router"). */}}
{{- define "tidelock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tidelock.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tidelock.componentLabels" -}}
{{ include "tidelock.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Tidelock image, `repository:tag`. */}}
{{- define "tidelock.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tidelock.workerImage" -}}
{{- default (include "tidelock.image" .) .Values.worker.image }}
{{- end }}

{{/* etcd client URLs, comma-separated: the external ones, or each bundled member's. */}}
{{- define "tidelock.etcdEndpoints" -}}
{{- if .Values.etcd.external.endpoints }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- $etcd := include "tidelock.etcd.fullname" . }}
{{- $peers := include "tidelock.etcd.peers" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:2379" $etcd $i $peers $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
{{- end }}

{{/* `--initial-cluster` of the bundled etcd: every member's name and peer URL. */}}
{{- define "tidelock.etcdInitialCluster" -}}
{{- $etcd := include "tidelock.etcd.fullname" . }}
{{- $peers := include "tidelock.etcd.peers" . }}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $members = append $members (printf "%s-%d=http://%s-%d.%s.%s.svc:2380" $etcd $i $etcd $i $peers $.Release.Namespace) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* Environment every Tidelock component shares: the cluster state and the log filter. */}}
{{- define "tidelock.stateEnv" -}}
- name: TIDELOCK_ETCD_ENDPOINTS
  value: {{ include "tidelock.etcdEndpoints" . | quote }}
- name: TIDELOCK_ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* Pod and container security of Tidelock's own images (the image's user is uid 10001). */}}
{{- define "tidelock.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tidelock.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
What the operator may do, wherever it watches (a ClusterRole, or a Role in watchNamespace):
exactly what it uses, which tests/kube.rs checks against the API server's audit log. Secrets
are read-only: the operator hashes Tenants' keys and never writes them.
*/}}
{{- define "tidelock.operatorRules" -}}
# The Models and Tenants it reconciles: watched, finalizers added and removed by patch, status
# by server-side apply.
- apiGroups: ["tidelock.dev"]
  resources: ["models", "tenants"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["tidelock.dev"]
  resources: ["models/status", "tenants/status"]
  verbs: ["patch"]
# Owning objects with blockOwnerDeletion (StatefulSets, Service, budget) needs this where the
# OwnerReferencesPermissionEnforcement admission plugin runs.
- apiGroups: ["tidelock.dev"]
  resources: ["models/finalizers"]
  verbs: ["update"]
# What it owns: applied (server-side apply creates them), groups listed and removed on scale-down;
# the garbage collector deletes the rest.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
# Tenants' keys, read-only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Why workers do not run: their pods, and the StatefulSet controller's FailedCreate Events.
- apiGroups: [""]
  resources: ["pods", "events"]
  verbs: ["list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Checks the values the schema cannot express. */}}
{{- define "tidelock.validate" -}}
{{- if and .Values.router.autoscaling.enabled (gt (int .Values.router.autoscaling.minReplicas) (int .Values.router.autoscaling.maxReplicas)) }}
{{- fail (printf "router.autoscaling.minReplicas (%d) must not exceed router.autoscaling.maxReplicas (%d)" (int .Values.router.autoscaling.minReplicas) (int .Values.router.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
