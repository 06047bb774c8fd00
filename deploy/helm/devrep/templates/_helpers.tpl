{{/* The image of both containers: [<registry>/]<repository>:<tag or appVersion>-<backend>. */}}
{{- define "devrep.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if .Values.image.registry -}}{{- $repo = printf "%s/%s" .Values.image.registry $repo -}}{{- end -}}
{{- printf "%s:%s-%s" $repo (.Values.image.tag | default .Chart.AppVersion) .Values.backend -}}
{{- end -}}

{{- define "devrep.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "devrep.labels" -}}
{{ include "devrep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
