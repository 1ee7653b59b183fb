{{- define "ai-inference-optimization.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ai-inference-optimization.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ai-inference-optimization.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ai-inference-optimization.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ai-inference-optimization.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ai-inference-optimization.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ai-inference-optimization.labels" -}}
{{ include "ai-inference-optimization.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fuyao
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ai-inference-optimization.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A component's object name, (list $root "router"): the fullname cut so that "-<component>" always fits in 63
characters (so two components never truncate to the same name), dots replaced (Service names take none). */}}
{{- define "ai-inference-optimization.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $base := include "ai-inference-optimization.fullname" $root | replace "." "-" | trunc (int (sub 62 (len $component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $component -}}
{{- end -}}

{{/* The ServiceAccount a component's pods run as, (list $root "router"): the chart's own, or serviceAccount.name. */}}
{{- define "ai-inference-optimization.serviceAccountName" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.serviceAccount.create -}}
{{- include "ai-inference-optimization.componentName" . -}}
{{- else -}}
{{- default "default" $root.Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ai-inference-optimization.kvcacheName" -}}
{{- include "ai-inference-optimization.componentName" (list . "kvcache") -}}
{{- end -}}

{{/* The router's config.yaml: the design doc's four sections, then .Values.router.config over them. */}}
{{- define "ai-inference-optimization.routerConfig" -}}
{{- $discovery := dict "enabled" true "namespace" (default nil .Values.router.discovery.namespace) -}}
{{- $router := dict "listen" (printf ":%v" .Values.router.port) "strategy" .Values.router.strategy "discovery" $discovery -}}
{{- $kv := dict "enabled" true "blockSize" .Values.kvCache.blockSize "hashSeed" .Values.kvCache.hashSeed "blockHashing" .Values.kvCache.blockHashing "tokenizer" .Values.router.tokenizer -}}
{{- if .Values.kvCache.enabled -}}
{{- $_ := set $kv "service" (printf "http://%s.%s.svc:%v" (include "ai-inference-optimization.kvcacheName" .) .Release.Namespace .Values.kvCache.port) -}}
{{- end -}}
{{- $cfg := dict "version" "v1" "router" $router "kvCache" $kv "pdSeparation" (dict "enabled" .Values.router.pdSeparation.enabled "fallback" .Values.router.pdSeparation.fallback) -}}
{{- if .Values.router.model -}}
{{- $_ := set $cfg "inference" (dict "model" .Values.router.model) -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.router.config)) -}}
{{- end -}}

{{/* fuyao-kvcache's config: the kv_cache section with engine discovery, then .Values.kvCache.config over it. */}}
{{- define "ai-inference-optimization.kvcacheConfig" -}}
{{- $discovery := dict "enabled" true "labelSelector" .Values.kvCache.discovery.labelSelector -}}
{{- if .Values.router.discovery.namespace -}}
{{- $_ := set $discovery "namespace" .Values.router.discovery.namespace -}}
{{- end -}}
{{- $kv := dict "blockSize" .Values.kvCache.blockSize "hashSeed" .Values.kvCache.hashSeed "blockHashing" .Values.kvCache.blockHashing "size" (toString .Values.kvCache.size) "events" (dict "discovery" $discovery) -}}
{{- if .Values.kvCache.volume.enabled -}}
{{- $_ := set $kv "volume" (dict "path" .Values.kvCache.volume.mountPath "interval" .Values.kvCache.volume.interval) -}}
{{- end -}}
{{- $cfg := dict "version" "v1" "listen" (printf ":%v" .Values.kvCache.port) "kvCache" (mustMergeOverwrite $kv (deepCopy .Values.kvCache.config)) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "ai-inference-optimization.kvClaim" -}}
{{- .Values.kvCache.volume.existingClaim | default (printf "%s-kv" (include "ai-inference-optimization.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{- define "ai-inference-optimization.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65534
  runAsGroup: 65534
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "ai-inference-optimization.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- end -}}
