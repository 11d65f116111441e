{{/*
Name of the controller's Deployment, ServiceAccount, ClusterRole and ClusterRoleBinding.
*/}}
{{- define "datamover.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-controller" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Selector labels. `app.kubernetes.io/name: datamover-controller` is fixed: the
NetworkPolicy of every DatamoverServer lets pods with this label read the servers'
probe port (/server-data).
*/}}
{{- define "datamover.selectorLabels" -}}
app.kubernetes.io/name: datamover-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of every object of the chart.
*/}}
{{- define "datamover.labels" -}}
{{ include "datamover.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/*
The controller's image reference.
*/}}
{{- define "datamover.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
