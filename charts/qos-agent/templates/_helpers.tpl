{{- define "qos-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "qos-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "qos-agent.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "qos-agent.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "qos-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qos-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "qos-agent.labels" -}}
{{ include "qos-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fuyao
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "qos-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qos-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "qos-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The kubelet's root directory to mount (for its CPU manager checkpoint), only under the cpuset policy: it holds
the node's kubelet credentials and every pod's volumes, so it is not mounted where nothing reads it. "": none. */}}
{{- define "qos-agent.kubeletRoot" -}}
{{- if eq (dig "cpuSuppress" "policy" "" .Values.config) "cpuset" -}}{{ .Values.kubeletRootDir }}{{- end -}}
{{- end -}}

{{/* The agent's config file (qos config v1): what the chart decides, then .Values.config over it. */}}
{{- define "qos-agent.config" -}}
{{- $kubelet := include "qos-agent.kubeletRoot" . -}}
{{- $cfg := dict "version" "v1" "cgroupRoot" "/host/sys/fs/cgroup" "stateFile" (printf "%s/state.json" .Values.stateDir) "interval" .Values.interval "metricsAddress" (ternary (printf ":%v" .Values.metrics.port) "" .Values.metrics.enabled) "cpuManagerStateFile" (ternary (printf "/host%s/cpu_manager_state" $kubelet) "" (ne $kubelet "")) -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.config)) -}}
{{- end -}}
