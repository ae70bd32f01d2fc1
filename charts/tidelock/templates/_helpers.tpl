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

{{/* The label of the Services that carry only metrics ports (what ServiceMonitors select). */}}
{{- define "tidelock.metricsLabel" -}}
tidelock.dev/metrics: "true"
{{- end }}

{{/* The Tidelock image, `repository:tag`. */}}
{{- define "tidelock.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tidelock.workerImage" -}}
{{- default (include "tidelock.image" .) .Values.worker.image }}
{{- end }}

{{/* "true" when the bundled etcd runs with TLS and client-certificate authentication. */}}
{{- define "tidelock.etcd.tls" -}}
{{- if and (not .Values.etcd.external.endpoints) .Values.etcd.tls.enabled }}true{{ end }}
{{- end }}

{{/* `https` or `http`: the bundled etcd's URL scheme, for clients and peers alike. */}}
{{- define "tidelock.etcd.scheme" -}}
{{- ternary "https" "http" (eq (include "tidelock.etcd.tls" .) "true") }}
{{- end }}

{{/* The bundled etcd's serving (and peer) certificate Secret: supplied, or generated. */}}
{{- define "tidelock.etcd.serverSecret" -}}
{{- default (printf "%s-server" (include "tidelock.etcd.fullname" .)) .Values.etcd.tls.serverSecret }}
{{- end }}

{{/*
The Secret with the etcd client files (`ca.crt`, `tls.crt`, `tls.key`) the operator and the
routers mount and the operator copies for the workers; empty without TLS.
*/}}
{{- define "tidelock.etcd.clientSecret" -}}
{{- if .Values.etcd.external.endpoints }}
{{- .Values.etcd.external.tls.clientSecret }}
{{- else if .Values.etcd.tls.enabled }}
{{- default (printf "%s-client" (include "tidelock.etcd.fullname" .)) .Values.etcd.tls.clientSecret }}
{{- end }}
{{- end }}

{{/* etcd client URLs, comma-separated: the external ones, or each bundled member's. */}}
{{- define "tidelock.etcdEndpoints" -}}
{{- if .Values.etcd.external.endpoints }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- $etcd := include "tidelock.etcd.fullname" . }}
{{- $peers := include "tidelock.etcd.peers" . }}
{{- $scheme := include "tidelock.etcd.scheme" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "%s://%s-%d.%s.%s.svc:2379" $scheme $etcd $i $peers $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
{{- end }}

{{/* `--initial-cluster` of the bundled etcd: every member's name and peer URL. */}}
{{- define "tidelock.etcdInitialCluster" -}}
{{- $etcd := include "tidelock.etcd.fullname" . }}
{{- $peers := include "tidelock.etcd.peers" . }}
{{- $scheme := include "tidelock.etcd.scheme" . }}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $members = append $members (printf "%s-%d=%s://%s-%d.%s.%s.svc:2380" $etcd $i $scheme $etcd $i $peers $.Release.Namespace) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* Where the operator and the router mount the etcd client Secret. */}}
{{- define "tidelock.etcdTLSDir" -}}/etc/tidelock/etcd-tls{{- end }}

{{/* Environment every Tidelock component shares: the cluster state, the log filter and format,
 the span export. */}}
{{- define "tidelock.stateEnv" -}}
- name: TIDELOCK_ETCD_ENDPOINTS
  value: {{ include "tidelock.etcdEndpoints" . | quote }}
- name: TIDELOCK_ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
{{- if include "tidelock.etcd.clientSecret" . }}
{{- $dir := include "tidelock.etcdTLSDir" . }}
- name: TIDELOCK_ETCD_CA_FILE
  value: {{ printf "%s/ca.crt" $dir | quote }}
- name: TIDELOCK_ETCD_CERT_FILE
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: TIDELOCK_ETCD_KEY_FILE
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: TIDELOCK_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.otlp.endpoint }}
- name: TIDELOCK_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The etcd client Secret as a container's read-only mount (nothing without TLS). */}}
{{- define "tidelock.etcdTLSMount" -}}
{{- if include "tidelock.etcd.clientSecret" . }}
- name: etcd-tls
  mountPath: {{ include "tidelock.etcdTLSDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* ... and as the pod's volume: readable by the pod's group (fsGroup) only. */}}
{{- define "tidelock.etcdTLSVolume" -}}
{{- with include "tidelock.etcd.clientSecret" . }}
- name: etcd-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
The bundled etcd's generated certificates, made once per render (every template sees the same
ones: they are kept in `.Values.__tidelockEtcdTLS`) and kept across `helm upgrade`: the CA, the
server certificate and the client certificate are read back from their Secrets with `lookup`
when they exist, and only what is missing is made anew (a server or client certificate whose
Secret holds another CA's certificate counts as missing). Each is a map of Secret data (base64):
`ca` (ca.crt, ca.key), `server` and `client` (ca.crt, tls.crt, tls.key). `helm template` and
dry runs cannot look up: they show fresh certificates.
*/}}
{{- define "tidelock.etcd.generated" -}}
{{- if not (hasKey .Values "__tidelockEtcdTLS") }}
{{- $etcd := include "tidelock.etcd.fullname" . }}
{{- $peers := include "tidelock.etcd.peers" . }}
{{- $ns := .Release.Namespace }}
{{- $days := int .Values.etcd.tls.validityDays }}
{{- $found := dict }}
{{- range $part := list "ca" "server" "client" }}
{{- $secret := lookup "v1" "Secret" $ns (printf "%s-%s" $etcd $part) }}
{{- $_ := set $found $part (default dict (get (default dict $secret) "data")) }}
{{- end }}
{{- $ca := dict }}
{{- $caData := $found.ca }}
{{- if and (get $caData "ca.crt") (get $caData "ca.key") }}
{{- $ca = buildCustomCert (get $caData "ca.crt") (get $caData "ca.key") }}
{{- else }}
{{- $ca = genCA (printf "%s-ca" $etcd) $days }}
{{- $caData = dict "ca.crt" ($ca.Cert | b64enc) "ca.key" ($ca.Key | b64enc) }}
{{- end }}
{{- $caCrt := get $caData "ca.crt" }}
{{- $hosts := list $etcd (printf "%s.%s" $etcd $ns) (printf "%s.%s.svc" $etcd $ns) (printf "%s.%s.svc.cluster.local" $etcd $ns) }}
{{- $hosts = concat $hosts (list $peers (printf "%s.%s" $peers $ns) (printf "%s.%s.svc" $peers $ns) (printf "%s.%s.svc.cluster.local" $peers $ns)) }}
{{- $hosts = concat $hosts (list (printf "*.%s.%s.svc" $peers $ns) (printf "*.%s.%s.svc.cluster.local" $peers $ns) "localhost") }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc" $etcd $i $peers $ns) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc.cluster.local" $etcd $i $peers $ns) }}
{{- end }}
{{- $leaves := dict }}
{{- range $part := list "server" "client" }}
{{- $old := get $found $part }}
{{- if and (eq (get $old "ca.crt") $caCrt) (get $old "tls.crt") (get $old "tls.key") }}
{{- $_ := set $leaves $part (dict "ca.crt" $caCrt "tls.crt" (get $old "tls.crt") "tls.key" (get $old "tls.key")) }}
{{- else }}
{{- $cert := dict }}
{{- if eq $part "server" }}
{{- $cert = genSignedCert $etcd (list "127.0.0.1") $hosts $days $ca }}
{{- else }}
{{- $cert = genSignedCert "tidelock-etcd-client" nil nil $days $ca }}
{{- end }}
{{- $_ := set $leaves $part (dict "ca.crt" $caCrt "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc)) }}
{{- end }}
{{- end }}
{{- $_ := set .Values "__tidelockEtcdTLS" (dict "ca" $caData "server" $leaves.server "client" $leaves.client) }}
{{- end }}
{{- end }}

{{/*
Pod annotations that change when a generated etcd certificate does (include with (dict "ctx" $
"part" "server"|"client")), so `helm upgrade` after a rotation restarts the pods that read it.
Supplied Secrets are the user's to roll out.
*/}}
{{- define "tidelock.etcdTLSChecksum" -}}
{{- $ctx := .ctx }}
{{- if and (include "tidelock.etcd.tls" $ctx) (not $ctx.Values.etcd.tls.serverSecret) (not $ctx.Values.etcd.tls.clientSecret) }}
{{- include "tidelock.etcd.generated" $ctx }}
{{- $data := get $ctx.Values.__tidelockEtcdTLS .part }}
checksum/etcd-{{ .part }}-tls: {{ printf "%s%s" (get $data "ca.crt") (get $data "tls.crt") | sha256sum | trunc 16 | quote }}
{{- end }}
{{- end }}

{{/*
Pod and container security of Tidelock's own images (the image's user is uid 10001; the group
owns mounted Secrets, which are not world-readable).
*/}}
{{- define "tidelock.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
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
{{/* The Secret holding the cluster credential (key `token`): the operator creates it, the
routers read it, the operator copies it for the workers. */}}
{{- define "tidelock.clusterTokenSecret" -}}
{{- printf "%s-cluster-token" (include "tidelock.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A map as `k=v,k=v` (sorted by key), as the operator's label flags take it. */}}
{{- define "tidelock.keyValues" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

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
# Each shard group's NetworkPolicy, removed with its group on scale-down.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch", "delete"]
# Tenants' keys, read; and the Models' copies of the cluster credential (and of the etcd client
# certificate), written by server-side apply.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
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
{{- $tls := .Values.etcd.tls }}
{{- if ne (empty $tls.serverSecret) (empty $tls.clientSecret) }}
{{- fail "etcd.tls.serverSecret and etcd.tls.clientSecret come together: supply both Secrets, or neither and the chart generates the certificates" }}
{{- end }}
{{- $external := .Values.etcd.external }}
{{- if $external.endpoints }}
{{- if or $tls.serverSecret $tls.clientSecret }}
{{- fail "etcd.tls configures the bundled etcd; with etcd.external.endpoints, give the client Secret as etcd.external.tls.clientSecret" }}
{{- end }}
{{- range $external.endpoints }}
{{- if and $external.tls.clientSecret (hasPrefix "http://" .) }}
{{- fail (printf "etcd.external.endpoints: %s is plain http:// but etcd.external.tls.clientSecret is set: use https:// endpoints" .) }}
{{- end }}
{{- if and (not $external.tls.clientSecret) (hasPrefix "https://" .) }}
{{- fail (printf "etcd.external.endpoints: %s is https://: set etcd.external.tls.clientSecret (a Secret with ca.crt, tls.crt and tls.key)" .) }}
{{- end }}
{{- end }}
{{- else if $external.tls.clientSecret }}
{{- fail "etcd.external.tls.clientSecret needs etcd.external.endpoints" }}
{{- end }}
{{- end }}
