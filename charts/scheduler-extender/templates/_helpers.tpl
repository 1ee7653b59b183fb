{{- define "scheduler-extender.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "scheduler-extender.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "scheduler-extender.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "scheduler-extender.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "scheduler-extender.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scheduler-extender.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A label selector for the extender's own pods: its Deployment's (immutable) labels, without the bundled
kube-scheduler's pods (scheduler.enabled: the same name and instance labels, component scheduler). NotIn, not a
component label to match: pods started by an earlier chart version have none, and an upgrade must not leave the
PodDisruptionBudget empty meanwhile. (The Service needs no such care: its target port "http" is a port the
scheduler's pods do not declare, so they are never its endpoints.) */}}
{{- define "scheduler-extender.podSelector" -}}
matchLabels:
  {{- include "scheduler-extender.selectorLabels" . | nindent 2 }}
matchExpressions:
- {key: app.kubernetes.io/component, operator: NotIn, values: [scheduler]}
{{- end -}}

{{- define "scheduler-extender.labels" -}}
{{ include "scheduler-extender.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fuyao
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "scheduler-extender.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "scheduler-extender.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "scheduler-extender.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where kube-scheduler reaches the extender: the fixed service.clusterIP when one is set (a kubeadm kube-scheduler
is a hostNetwork static pod with the node's resolv.conf: it cannot resolve .svc names), else the Service's name. */}}
{{- define "scheduler-extender.url" -}}
{{- $scheme := ternary "https" "http" (ne .Values.tls.secretName "") -}}
{{- $ip := .Values.service.clusterIP -}}
{{- if and $ip (ne $ip "None") -}}
{{- printf "%s://%s:%v" $scheme (ternary (printf "[%s]" $ip) $ip (contains ":" $ip)) .Values.service.port -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:%v" $scheme (include "scheduler-extender.fullname" .) .Release.Namespace .Values.service.port -}}
{{- end -}}
{{- end -}}

{{/* The extender's config file (scheduler_extender config v1): what the chart decides, then .Values.config over it. */}}
{{- define "scheduler-extender.config" -}}
{{- $cfg := dict "version" "v1" "listen" (printf ":%v" .Values.service.port) "bind" .Values.bind -}}
{{- if and .Values.bind (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "scheduler-extender: replicas > 1 with bind: true needs leaderElection.enabled (one binder; see values.yaml)" -}}
{{- end -}}
{{- if and .Values.bind .Values.leaderElection.enabled -}}
{{- $_ := set $cfg "leaderElection" (dict "enabled" true "leaseName" (include "scheduler-extender.fullname" .) "leaseDuration" .Values.leaderElection.leaseDuration "renewDeadline" .Values.leaderElection.renewDeadline "retryPeriod" .Values.leaderElection.retryPeriod) -}}
{{- end -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $cfg "tls" (dict "certFile" "/etc/fuyao/tls/tls.crt" "keyFile" "/etc/fuyao/tls/tls.key") -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.config)) -}}
{{- end -}}

{{/* The extenders: entry of a KubeSchedulerConfiguration (docs/examples/kube-scheduler-config.yaml). */}}
{{- define "scheduler-extender.kubeSchedulerEntry" -}}
- urlPrefix: {{ include "scheduler-extender.url" . }}
  filterVerb: filter
  prioritizeVerb: prioritize
  preemptVerb: preempt
  {{- if .Values.bind }}
  bindVerb: bind
  {{- end }}
  weight: {{ .Values.extenderEntry.weight }}
  enableHTTPS: {{ ne .Values.tls.secretName "" }}
  {{- if and .Values.tls.secretName .Values.extenderEntry.tlsConfig }}
  tlsConfig:
    {{- toYaml .Values.extenderEntry.tlsConfig | nindent 4 }}
  {{- end }}
  httpTimeout: {{ .Values.extenderEntry.httpTimeout }}
  nodeCacheCapable: true
  ignorable: {{ .Values.extenderEntry.ignorable }}
  managedResources:
  {{- range .Values.extenderEntry.managedResources }}
  {{- /* kube-scheduler refuses names in the kubernetes.io domains (any *kubernetes.io/ prefix) here ("an invalid
  extended resource name") */}}
  {{- if not (contains "kubernetes.io/" .) }}
  - {name: {{ . }}, ignoredByScheduler: false}
  {{- end }}
  {{- end }}
{{- end -}}
