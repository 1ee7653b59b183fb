{{- define "npu-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "npu-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "npu-operator.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "npu-operator.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "npu-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npu-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "npu-operator.labels" -}}
{{ include "npu-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fuyao
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "npu-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "npu-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "npu-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A policy section: enabled and its settings, with empty strings and maps left out (the API's defaults). */}}
{{- define "npu-operator.section" -}}
{{- $out := dict -}}
{{- range $k, $v := . -}}
{{- if or (kindIs "bool" $v) $v -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* operator.cleanupTimeout, a duration (90s, 2m30s, 500ms; the schema checks its form), for the uninstall hook and,
the same value, the operator, which waits for its components' pods 30s less: refused below 60s, as both refuse it. */}}
{{- define "npu-operator.cleanupTimeout" -}}
{{- $raw := .Values.operator.cleanupTimeout -}}
{{- $seconds := 0.0 -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h)" $raw -1 -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . -}}
{{- $seconds = addf $seconds (mulf (float64 $number) (get $units (trimPrefix $number .))) -}}
{{- end -}}
{{- if lt $seconds 60.0 -}}
{{- fail (printf "npu-operator: operator.cleanupTimeout (%s) must be at least 60s: the operator waits for its components' pods 30s less than the uninstall hook, and at least 30s" $raw) -}}
{{- end -}}
{{- $raw -}}
{{- end -}}
