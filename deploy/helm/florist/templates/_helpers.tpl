{{/* The prefix of every object's name. */}}
{{- define "florist.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "florist.labels" -}}
app.kubernetes.io/name: florist
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (list $ "superlink"). */}}
{{- define "florist.selector" -}}
app.kubernetes.io/name: florist
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "florist.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{/* The Secret holding `database-url`. */}}
{{- define "florist.databaseSecret" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.existingSecret -}}
{{ .Values.externalDatabase.existingSecret }}
{{- else -}}
{{ include "florist.fullname" . }}-database
{{- end -}}
{{- end -}}

{{/* The SuperLink's Fleet API, as the SuperNodes dial it. */}}
{{- define "florist.fleetAddress" -}}
{{- if .Values.superlink.enabled -}}
{{ include "florist.fullname" . }}-superlink:{{ .Values.superlink.service.fleetPort }}
{{- else -}}
{{ required "superlink.address (host:port of the Fleet API) is needed when superlink.enabled=false" .Values.superlink.address }}
{{- end -}}
{{- end -}}

{{/* The SuperLink's Control API, as the API dials it. */}}
{{- define "florist.controlAddress" -}}
{{- if .Values.superlink.enabled -}}
{{ include "florist.fullname" . }}-superlink:8000
{{- else -}}
{{ required "superlink.controlAddress is needed for an API without a SuperLink in its release" .Values.superlink.controlAddress }}
{{- end -}}
{{- end -}}

{{- define "florist.tlsSecret" -}}
{{ default (printf "%s-tls" (include "florist.fullname" .)) .Values.security.tls.existingSecret }}
{{- end -}}

{{- define "florist.authSecret" -}}
{{ default (printf "%s-supernode-auth" (include "florist.fullname" .)) .Values.security.supernodeAuth.existingSecret }}
{{- end -}}

{{- define "florist.apiTokenSecret" -}}
{{ default (printf "%s-api-token" (include "florist.fullname" .)) .Values.security.apiToken.existingSecret }}
{{- end -}}

{{/* Environment every Florist container gets. */}}
{{- define "florist.commonEnv" -}}
- name: FLORIST_LOG_TO_STDOUT
  value: "true"
- name: FLORIST_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.security.tls.enabled }}
- name: FLORIST_TLS_CA_CERT
  value: /etc/florist/tls/ca.crt
{{- else }}
# Plain text on the pods' 0.0.0.0 is refused unless forced: `insecure` forces it.
- name: FLORIST_FORCE_INSECURE
  value: {{ .Values.insecure | quote }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the Florist pods. */}}
{{- define "florist.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
