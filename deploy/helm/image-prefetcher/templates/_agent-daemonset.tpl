{{/*
The agents' DaemonSet. Not a chart object: it is rendered into the
"<fullname>-agent-daemonset" ConfigMap, and the operator creates and keeps the DaemonSet
from it (operator.agent_daemonset), adding its own labels and a template hash.
*/}}
{{- define "image-prefetcher.agentDaemonSet" -}}
{{- $a := .Values.agent -}}
{{- $containerd := eq .Values.config.images.snapshotter "containerd" -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "image-prefetcher.agentName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "image-prefetcher.labels" (dict "ctx" . "component" "agent") | nindent 4 }}
spec:
  selector:
    matchLabels:
      {{- include "image-prefetcher.selectorLabels" (dict "ctx" . "component" "agent") | nindent 6 }}
  updateStrategy:
    {{- toYaml $a.updateStrategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "image-prefetcher.selectorLabels" (dict "ctx" . "component" "agent") | nindent 8 }}
        app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
        {{- with $a.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "image-prefetcher.configToml" . | sha256sum }}
        {{- with .Values.config.images.registry.hosts }}
        checksum/registry-hosts: {{ toJson . | sha256sum }}
        {{- end }}
        {{- with $a.podAnnotations }}
        {{- toYaml . | nindent 8 }}
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
      {{- with $a.priorityClassName }}
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
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $a.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $a.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: agent
          image: {{ include "image-prefetcher.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args: ["agent", "--config", "{{ include "image-prefetcher.configDir" . }}/config.toml"]
          env:
            {{- include "image-prefetcher.env" (dict "ctx" . "component" "agent") | nindent 12 }}
            {{- with $a.extraEnv }}
            {{- toYaml . | nindent 12 }}
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
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $a.readinessProbe }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $a.resources | nindent 12 }}
          securityContext:
            {{- if $a.privileged }}
            privileged: true
            {{- else }}
            privileged: false
            capabilities:
              drop: ["ALL"]
              add:
                {{- toYaml $a.capabilities | nindent 16 }}
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
            - name: store
              mountPath: {{ $a.storePath }}
            - name: state
              mountPath: /run/prefetcher
            - name: tmp
              mountPath: /tmp
            {{- if $containerd }}
            - name: containerd-socket
              mountPath: {{ .Values.config.images.containerd.address }}
            - name: containerd-root
              mountPath: {{ $a.containerd.root }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "image-prefetcher.configName" . }}
        {{- if .Values.config.images.registry.hosts }}
        {{- include "image-prefetcher.registryHostsVolume" . | nindent 8 }}
        {{- end }}
        - name: store
          hostPath:
            path: {{ $a.storePath }}
            type: DirectoryOrCreate
        - name: state
          emptyDir:
            medium: Memory
        - name: tmp
          emptyDir: {}
        {{- if $containerd }}
        - name: containerd-socket
          hostPath:
            path: {{ .Values.config.images.containerd.address }}
            type: Socket
        - name: containerd-root
          hostPath:
            path: {{ $a.containerd.root }}
            type: Directory
        {{- end }}
{{- end }}
