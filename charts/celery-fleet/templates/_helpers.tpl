{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "celery-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the release's objects. Cluster-scoped objects (ClusterRoles) carry it
too, so two releases never collide.
*/}}
{{- define "celery-fleet.fullname" -}}
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

{{- define "celery-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "celery-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "celery-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "celery-fleet.labels" -}}
helm.sh/chart: {{ include "celery-fleet.chart" . }}
{{ include "celery-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: celery-fleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "celery-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "celery-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image; a digest, when given, pins it exactly. */}}
{{- define "celery-fleet.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The image beat pods copy the elector from: by default the operator's own image. */}}
{{- define "celery-fleet.electorImage" -}}
{{- default (include "celery-fleet.image" .) .Values.operator.electorImage }}
{{- end }}

{{- define "celery-fleet.metricsServiceName" -}}
{{- printf "%s-metrics" (include "celery-fleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
