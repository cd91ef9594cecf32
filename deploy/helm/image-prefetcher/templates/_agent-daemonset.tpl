{{/*
The agents' DaemonSet, rendered twice: as a chart object (agent-daemonset.yaml: what Helm,
GitOps diffs and policy scanners see) and, identical, into the "<fullname>-agent-daemonset"
ConfigMap: the operator's copy, from which it heals the DaemonSet (recreates it when deleted,
reverts edits made outside Helm). The copy carries Helm's ownership annotations so a
DaemonSet the operator recreated is one the next `helm upgrade` adopts.

prefetcher.dev/template-hash is a hash of the labels and spec (what the operator compares);
prefetcher.dev/template-revision is the release revision: an operator whose copy is older
than the live DaemonSet never overwrites it (see agent/operator/daemonsets.py).
*/}}
{{- define "image-prefetcher.agentDaemonSet" -}}
{{- $labels := include "image-prefetcher.labels" (dict "ctx" . "component" "agent") -}}
{{- $spec := include "image-prefetcher.agentDaemonSetSpec" . -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "image-prefetcher.agentName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
  annotations:
    meta.helm.sh/release-name: {{ .Release.Name }}
    meta.helm.sh/release-namespace: {{ .Release.Namespace }}
    prefetcher.dev/template-hash: {{ print $labels $spec | sha256sum | trunc 16 | quote }}
    prefetcher.dev/template-revision: {{ .Release.Revision | quote }}
spec:
  {{- $spec | nindent 2 }}
{{- end }}

{{- define "image-prefetcher.agentDaemonSetSpec" -}}
{{- $a := .Values.agent -}}
{{- $runtime := include "image-prefetcher.runtimeStore" . -}}
{{- $priority := include "image-prefetcher.agentPriorityClassName" . -}}
selector:
  matchLabels:
    {{- include "image-prefetcher.selectorLabels" (dict "ctx" . "component" "agent") | nindent 4 }}
updateStrategy:
  {{- toYaml $a.updateStrategy | nindent 2 }}
template:
  metadata:
    labels:
      {{- include "image-prefetcher.selectorLabels" (dict "ctx" . "component" "agent") | nindent 6 }}
      app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
      {{- with $a.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    annotations:
      checksum/config: {{ include "image-prefetcher.configToml" . | sha256sum }}
      {{- with .Values.config.images.registry.hosts }}
      checksum/registry-hosts: {{ toJson . | sha256sum }}
      {{- end }}
      {{- with $a.podAnnotations }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    serviceAccountName: {{ include "image-prefetcher.agentServiceAccountName" . }}
    # The agent reads its NodeImageSet and writes its status with the pod's bound token,
    # which carries the node name the admission policy checks.
    automountServiceAccountToken: true
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
    {{- end }}
    {{- with $priority }}
    priorityClassName: {{ . }}
    {{- end }}
    terminationGracePeriodSeconds: {{ $a.terminationGracePeriodSeconds }}
    securityContext:
      runAsUser: 0
      runAsGroup: 0
      runAsNonRoot: false
      seccompProfile:
        type: RuntimeDefault
    {{- with $a.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $a.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $a.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: agent
        image: {{ include "image-prefetcher.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        args:
          - agent
          - --config
          - {{ include "image-prefetcher.configDir" . }}/config.toml
          {{- with $a.extraArgs }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        env:
          {{- include "image-prefetcher.env" (dict "ctx" . "component" "agent") | nindent 10 }}
          {{- with $a.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        ports:
          - name: health
            containerPort: {{ .Values.ports.health }}
            protocol: TCP
          {{- if .Values.metrics.enabled }}
          - name: metrics
            containerPort: {{ .Values.ports.metrics }}
            protocol: TCP
          {{- end }}
        {{- with $a.livenessProbe }}
        livenessProbe:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $a.readinessProbe }}
        readinessProbe:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        resources:
          {{- toYaml $a.resources | nindent 10 }}
        securityContext:
          {{- if $a.privileged }}
          privileged: true
          {{- else }}
          privileged: false
          capabilities:
            drop: ["ALL"]
            add:
              {{- toYaml $a.capabilities | nindent 14 }}
          {{- end }}
          readOnlyRootFilesystem: true
        volumeMounts:
          - name: config
            mountPath: {{ include "image-prefetcher.configDir" . }}
            readOnly: true
          {{- if .Values.config.images.registry.hosts }}
          - name: registry-hosts
            mountPath: {{ include "image-prefetcher.registryHostsDir" . }}
            readOnly: true
          {{- end }}
          {{- include "image-prefetcher.certMounts" . | nindent 10 }}
          - name: store
            mountPath: {{ $a.storePath }}
          - name: state
            mountPath: /run/prefetcher
          - name: tmp
            mountPath: /tmp
          {{- if $runtime }}
          {{- range $i, $h := $a.runtime.hostPaths }}
          # {{ $h.for }}
          - name: runtime-{{ $i }}
            mountPath: {{ $h.path }}
            {{- if $h.readOnly }}
            readOnly: true
            {{- end }}
          {{- end }}
          {{- end }}
          {{- with $a.extraVolumeMounts }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
    volumes:
      - name: config
        configMap:
          name: {{ include "image-prefetcher.configName" . }}
      {{- if .Values.config.images.registry.hosts }}
      {{- include "image-prefetcher.registryHostsVolume" . | nindent 6 }}
      {{- end }}
      {{- include "image-prefetcher.certVolumes" . | nindent 6 }}
      - name: store
        hostPath:
          path: {{ $a.storePath }}
          type: DirectoryOrCreate
      - name: state
        emptyDir:
          medium: Memory
      - name: tmp
        emptyDir: {}
      {{- if $runtime }}
      {{- range $i, $h := $a.runtime.hostPaths }}
      - name: runtime-{{ $i }}
        hostPath:
          path: {{ $h.path }}
          type: DirectoryOrCreate
      {{- end }}
      {{- end }}
      {{- with $a.extraVolumes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}
