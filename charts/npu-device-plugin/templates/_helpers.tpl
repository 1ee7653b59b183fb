{{- define "npu-device-plugin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "npu-device-plugin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "npu-device-plugin.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "npu-device-plugin.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "npu-device-plugin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npu-device-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "npu-device-plugin.labels" -}}
{{ include "npu-device-plugin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fuyao
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "npu-device-plugin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "npu-device-plugin.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "npu-device-plugin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The plugin's config file (deviceplugin config v1, camelCase keys): what the chart decides, then .Values.config over it. */}}
{{- define "npu-device-plugin.config" -}}
{{- $mounts := list -}}
{{- range .Values.hostPaths.driver -}}
{{- $mounts = append $mounts (dict "hostPath" .) -}}
{{- end -}}
{{- if .Values.npuSmi.mountIntoContainers -}}
{{- $mounts = append $mounts (dict "hostPath" .Values.npuSmi.path "containerPath" "/usr/local/bin/npu-smi") -}}
{{- end -}}
{{- $vnpu := dict "mode" .Values.vnpu.mode "ledger" (printf "%s/vnpu-ledger.json" .Values.hostPaths.state) "podResourcesSocket" (printf "%s/kubelet.sock" .Values.hostPaths.podResources) -}}
{{- if eq .Values.vnpu.mode "static" -}}
{{- $_ := set $vnpu "config" "/etc/fuyao/vnpu/vnpu-config.json" -}}
{{- end -}}
{{- $h := .Values.health -}}
{{- $health := dict "interval" $h.interval "failureThreshold" $h.failureThreshold "reset" $h.reset "hccnTool" $h.hccnTool "linkInterval" $h.linkInterval "isolationState" (printf "%s/npu-isolated.json" .Values.hostPaths.state) -}}
{{- if $h.faultTable -}}
{{- $_ := set $health "faultTable" "/etc/fuyao/faults/fault-table.json" -}}
{{- end -}}
{{- $cfg := dict "version" "v1" "npuSmi" (dict "path" .Values.npuSmi.path "timeout" .Values.npuSmi.timeout) "devicePluginDir" .Values.hostPaths.devicePlugins "devRoot" .Values.hostPaths.dev "health" $health "metricsAddress" (ternary (printf ":%v" .Values.metrics.port) "" .Values.metrics.enabled) "driverMounts" $mounts "vnpu" $vnpu -}}
{{- if .Values.serverUsage -}}
{{- $_ := set $cfg "serverUsage" .Values.serverUsage -}}
{{- end -}}
{{- if .Values.containerEnv -}}
{{- $_ := set $cfg "containerEnv" .Values.containerEnv -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.config)) -}}
{{- end -}}
