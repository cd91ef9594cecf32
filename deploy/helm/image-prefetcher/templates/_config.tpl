{{/*
config.toml, read by both `prefetcher operator` and `prefetcher agent`
(`prefetcher config check` validates it; a test runs it on every rendering).
*/}}
{{- define "image-prefetcher.configToml" -}}
{{- $c := .Values.config -}}
{{- $i := $c.images -}}
{{- $r := $c.runtime -}}
{{- $op := $c.operator -}}
# Rendered by the {{ include "image-prefetcher.chart" . }} chart from its values; edit the values.
version = 2

[images]
snapshotter = {{ include "image-prefetcher.snapshotter" . | toJson }}
max_concurrent_downloads = {{ int64 $i.maxConcurrentDownloads }}
node_max_concurrent_downloads = {{ int64 $i.nodeMaxConcurrentDownloads }}
max_concurrent_unpacks = {{ int64 $i.maxConcurrentUnpacks }}
image_pull_progress_timeout = {{ toString $i.imagePullProgressTimeout | toJson }}
image_pull_min_bytes_per_second = {{ int64 $i.imagePullMinBytesPerSecond }}
image_pull_with_sync_fs = {{ $i.imagePullWithSyncFs }}
discard_unpacked_layers = {{ $i.discardUnpackedLayers }}
pinned_images = {{ $i.pinnedImages | toJson }}
max_layer_uncompressed_bytes = {{ include "image-prefetcher.tomlSize" $i.maxLayerUncompressedBytes }}
max_image_uncompressed_bytes = {{ include "image-prefetcher.tomlSize" $i.maxImageUncompressedBytes }}
stats_collect_period = {{ toString $i.statsCollectPeriod | toJson }}

[images.registry]
config_path = {{ if $i.registry.hosts }}{{ include "image-prefetcher.registryHostsDir" . | toJson }}{{ else }}""{{ end }}
headers = {{ include "image-prefetcher.tomlStringTable" $i.registry.headers }}
mirrors = {{ include "image-prefetcher.tomlListTable" $i.registry.mirrors }}

[images.containerd]
address = {{ $i.containerd.address | toJson }}
namespace = {{ $i.containerd.namespace | toJson }}
snapshotter = {{ $i.containerd.snapshotter | toJson }}

[runtime]
root = {{ .Values.agent.storePath | toJson }}
state = "/run/prefetcher"
namespace = {{ .Release.Namespace | toJson }}
metrics_address = {{ if .Values.metrics.enabled }}{{ printf ":%d" (int .Values.ports.metrics) | toJson }}{{ else }}""{{ end }}
health_address = {{ printf ":%d" (int .Values.ports.health) | toJson }}
log_level = {{ $r.logLevel | toJson }}
log_format = {{ $r.logFormat | toJson }}
gc_period = {{ toString $r.gcPeriod | toJson }}
min_free_bytes = {{ include "image-prefetcher.tomlSize" $r.minFreeBytes }}
min_free_percent = {{ $r.minFreePercent }}
max_store_bytes = {{ include "image-prefetcher.tomlSize" $r.maxStoreBytes }}

[tracing]
enabled = {{ $c.tracing.enabled }}
http_client_spans = {{ $c.tracing.httpClientSpans }}

[operator]
peering_name = {{ include "image-prefetcher.peeringName" . | toJson }}
standalone = false
status_interval = {{ toString $op.statusInterval | toJson }}
resync_interval = {{ toString $op.resyncInterval | toJson }}
agent_heartbeat_timeout = {{ toString $op.agentHeartbeatTimeout | toJson }}
agent_daemonset = {{ printf "%s/agent-daemonset.yaml" (include "image-prefetcher.configDir" .) | toJson }}
agent_daemonset_owner = {{ include "image-prefetcher.agentDaemonSetConfigName" . | toJson }}
agent_secrets_role = {{ include "image-prefetcher.agentSecretsRoleName" . | toJson }}
daemonset_check_interval = {{ toString $op.daemonsetCheckInterval | toJson }}
resolve_digests = {{ $op.resolveDigests }}
resolve_timeout = {{ toString $op.resolveTimeout | toJson }}
{{- end }}
