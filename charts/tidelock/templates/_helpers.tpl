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

{{/* Component names; truncated so a suffix still fits in 63 characters. */}}
{{- define "tidelock.operator.fullname" -}}
{{- printf "%s-operator" (include "tidelock.fullname" . | trunc 50 | trimSuffix "-") }}
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
What the operator may do, wherever it watches (a ClusterRole, or a Role in watchNamespace).
Secrets are read-only: the operator hashes Tenants' keys and never writes them.
*/}}
{{- define "tidelock.operatorRules" -}}
- apiGroups: ["tidelock.dev"]
  resources: ["models", "tenants"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["tidelock.dev"]
  resources: ["models/status", "tenants/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["tidelock.dev"]
  resources: ["models/finalizers", "tenants/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
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
