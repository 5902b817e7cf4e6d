{{/* Chart name, overridable. */}}
{{- define "ebpf-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or fullnameOverride; 63 chars at most. */}}
{{- define "ebpf-router.fullname" -}}
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

{{- define "ebpf-router.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "ebpf-router.labels" -}}
helm.sh/chart: {{ include "ebpf-router.chart" . }}
{{ include "ebpf-router.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the DaemonSet's pods; never change them in an upgrade. */}}
{{- define "ebpf-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebpf-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ebpf-router.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ebpf-router.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ebpf-router.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the Secret holding the peer key. */}}
{{- define "ebpf-router.keySecretName" -}}
{{- default (printf "%s-peer-key" (include "ebpf-router.fullname" .)) .Values.peerKey.existingSecret }}
{{- end }}

{{/* "true" when the CRI socket must be mounted: asked for, or a containerLabel rule exists. */}}
{{- define "ebpf-router.needsRuntime" -}}
{{- $needs := .Values.containerRuntime.enabled }}
{{- range $name, $rule := .Values.rules }}
{{- if eq $rule.type "containerLabel" }}{{- $needs = true }}{{- end }}
{{- end }}
{{- if $needs }}true{{- end }}
{{- end }}
