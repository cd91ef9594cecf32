{{/*
Name of the chart (app.kubernetes.io/name).
*/}}
{{- define "image-prefetcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: "<release>-<name>", or the release name when it already contains the
name. Truncated to leave room for the "-operator" / "-agent-daemonset" suffixes (63 chars).
*/}}
{{- define "image-prefetcher.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
helm.sh/chart label value.
*/}}
{{- define "image-prefetcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object; call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "image-prefetcher.labels" -}}
helm.sh/chart: {{ include "image-prefetcher.chart" .ctx }}
{{ include "image-prefetcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: image-prefetcher
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels; call with (dict "ctx" $ "component" "operator"). A component of "" gives the
release-wide selector.
*/}}
{{- define "image-prefetcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "image-prefetcher.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/*
Names of the objects.
*/}}
{{- define "image-prefetcher.operatorName" -}}
{{ include "image-prefetcher.fullname" . }}-operator
{{- end }}

{{- define "image-prefetcher.agentName" -}}
{{ include "image-prefetcher.fullname" . }}-agent
{{- end }}

{{- define "image-prefetcher.configName" -}}
{{ include "image-prefetcher.fullname" . }}-config
{{- end }}

{{- define "image-prefetcher.agentDaemonSetConfigName" -}}
{{ include "image-prefetcher.fullname" . }}-agent-daemonset
{{- end }}

{{- define "image-prefetcher.agentSecretsRoleName" -}}
{{ include "image-prefetcher.fullname" . }}-agent-pull-secrets
{{- end }}

{{- define "image-prefetcher.registryHostsName" -}}
{{ include "image-prefetcher.fullname" . }}-registry-hosts
{{- end }}

{{- define "image-prefetcher.peeringName" -}}
{{ default (include "image-prefetcher.fullname" .) .Values.operator.peeringName }}
{{- end }}

{{- define "image-prefetcher.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "image-prefetcher.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "image-prefetcher.agentServiceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "image-prefetcher.agentName" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: [global.imageRegistry or image.registry/]repository, then @digest if
set, else :tag (default appVersion). A repository that already starts with a registry host
(a first component with "." or ":", or "localhost", as Docker parses references) is used
as it is.
*/}}
{{- define "image-prefetcher.image" -}}
{{- $registry := default .Values.image.registry (.Values.global).imageRegistry }}
{{- $parts := splitList "/" .Values.image.repository }}
{{- $first := first $parts }}
{{- $hasHost := and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository := .Values.image.repository }}
{{- if and $registry (not $hasHost) }}{{ $repository = printf "%s/%s" (trimSuffix "/" $registry) .Values.image.repository }}{{ end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The agents' priority class: agent.priorityClassName, else system-node-critical when the
release namespace is kube-system (the only namespace where every platform admits it without
a ResourceQuota), else none (as cilium's chart does).
*/}}
{{- define "image-prefetcher.agentPriorityClassName" -}}
{{- if .Values.agent.priorityClassName }}
{{- .Values.agent.priorityClassName }}
{{- else if eq .Release.Namespace "kube-system" }}
{{- "system-node-critical" }}
{{- end }}
{{- end }}

{{/*
The snapshotter written into config.toml: config.images.snapshotter, except that
agent.store "private" turns "auto" into the agent's own store (overlayfs).
*/}}
{{- define "image-prefetcher.snapshotter" -}}
{{- $s := .Values.config.images.snapshotter }}
{{- if eq .Values.agent.store "private" }}
{{- if eq $s "containerd" }}
{{- fail "agent.store is private but config.images.snapshotter is containerd: set one of them" }}
{{- end }}
{{- if eq $s "auto" }}overlayfs{{ else }}{{ $s }}{{ end }}
{{- else }}
{{- $s }}
{{- end }}
{{- end }}

{{/*
"true" when the agent writes into the node's runtime (its host directories are mounted).
*/}}
{{- define "image-prefetcher.runtimeStore" -}}
{{- if not (has (include "image-prefetcher.snapshotter" .) (list "overlayfs" "naive")) }}true{{ end }}
{{- end }}

{{/*
Volumes and mounts of the Secrets holding registry CAs and client certificates
(config.images.registry.certSecrets), for both containers.
*/}}
{{- define "image-prefetcher.certVolumes" -}}
{{- range .Values.config.images.registry.certSecrets }}
- name: {{ printf "certs-%s" . | trunc 63 | trimSuffix "-" }}
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{- define "image-prefetcher.certMounts" -}}
{{- range .Values.config.images.registry.certSecrets }}
- name: {{ printf "certs-%s" . | trunc 63 | trimSuffix "-" }}
  mountPath: {{ include "image-prefetcher.certsDir" $ }}/{{ . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Paths inside the containers.
*/}}
{{- define "image-prefetcher.configDir" -}}
/etc/prefetcher
{{- end }}

{{- define "image-prefetcher.registryHostsDir" -}}
/etc/prefetcher/certs.d
{{- end }}

{{- define "image-prefetcher.certsDir" -}}
/etc/prefetcher/certs
{{- end }}

{{/*
A TOML value of a size: an integer, or a string such as "32GiB".
*/}}
{{- define "image-prefetcher.tomlSize" -}}
{{- if kindIs "string" . }}{{ toJson . }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}

{{/*
A TOML inline table of strings (name → value).
*/}}
{{- define "image-prefetcher.tomlStringTable" -}}
{{- $items := list }}
{{- range $k, $v := . }}
{{- $items = append $items (printf "%s = %s" (toJson $k) (toJson $v)) }}
{{- end }}
{{- printf "{ %s }" (join ", " $items) | replace "{  }" "{}" }}
{{- end }}

{{/*
A TOML inline table of string lists (host → [endpoints]).
*/}}
{{- define "image-prefetcher.tomlListTable" -}}
{{- $items := list }}
{{- range $k, $v := . }}
{{- $items = append $items (printf "%s = %s" (toJson $k) (toJson $v)) }}
{{- end }}
{{- printf "{ %s }" (join ", " $items) | replace "{  }" "{}" }}
{{- end }}

{{/*
Environment shared by the operator and the agent: the Downward API identity, then OTEL_*.
Call with (dict "ctx" $ "component" "agent").
*/}}
{{- define "image-prefetcher.env" -}}
{{- $v := .ctx.Values -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ printf "image-prefetcher-%s" .component | quote }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" }}
{{- range $k, $val := $v.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $val)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- with $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with $v.otel.protocol }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with $v.otel.headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.otel.headersSecret.key }}
{{- end }}
{{- with $v.otel.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with $v.otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
ConfigMap key of one registry host's hosts.toml (keys cannot hold ":"; the mount restores
the <host>/hosts.toml layout).
*/}}
{{- define "image-prefetcher.hostKey" -}}
{{ . | replace ":" "_" }}.hosts.toml
{{- end }}

{{/*
The volume of the registry hosts directory (items restore <host>/hosts.toml).
*/}}
{{- define "image-prefetcher.registryHostsVolume" -}}
- name: registry-hosts
  configMap:
    name: {{ include "image-prefetcher.registryHostsName" . }}
    items:
      {{- range $host, $_ := .Values.config.images.registry.hosts }}
      - key: {{ include "image-prefetcher.hostKey" $host }}
        path: {{ $host }}/hosts.toml
      {{- end }}
{{- end }}
