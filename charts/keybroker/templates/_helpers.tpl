{{/* The base name of every object: the release name, or "<release>-keybroker" when it does not contain "keybroker". */}}
{{- define "keybroker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "keybroker.selectorLabels" . }}
{{- end -}}

{{- define "keybroker.selectorLabels" -}}
app.kubernetes.io/name: keybroker
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* repository:tag or repository@digest. */}}
{{- define "keybroker.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.brokerHost" -}}
{{- printf "%s-broker.%s.svc" (include "keybroker.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "keybroker.gatewayHost" -}}
{{- printf "%s-gateway.%s.svc" (include "keybroker.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "keybroker.webhookHost" -}}
{{- printf "%s-webhook.%s.svc" (include "keybroker.fullname" .) .Release.Namespace -}}
{{- end -}}
