{{/* Chart name, overridable. */}}
{{- define "bitrix24-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. A release already named after the chart is not repeated
("bitrix24-bridge", not "bitrix24-bridge-bitrix24-bridge"). 63 characters: the DNS label limit.
*/}}
{{- define "bitrix24-bridge.fullname" -}}
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

{{- define "bitrix24-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bitrix24-bridge.labels" -}}
helm.sh/chart: {{ include "bitrix24-bridge.chart" . }}
{{ include "bitrix24-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bitrix24-bridge
{{- end }}

{{/* Selector labels never change between upgrades: a Deployment's selector is immutable. */}}
{{- define "bitrix24-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bitrix24-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bitrix24-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bitrix24-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bitrix24-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret the pod reads its secret variables from. */}}
{{- define "bitrix24-bridge.secretName" -}}
{{- default (include "bitrix24-bridge.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "bitrix24-bridge.claimName" -}}
{{- default (printf "%s-state" (include "bitrix24-bridge.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "bitrix24-bridge.statePath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.persistence.mountPath) .Values.persistence.fileName }}
{{- end }}

{{/*
The bridge's external base URL: config.publicUrl, else the first ingress host (https when a TLS
entry names it). Empty when neither is known.
*/}}
{{- define "bitrix24-bridge.publicUrl" -}}
{{- if .Values.config.publicUrl }}
{{- trimSuffix "/" .Values.config.publicUrl }}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- $host := first .Values.ingress.hosts }}
{{- $scheme := "http" }}
{{- range .Values.ingress.tls }}
{{- if has $host .hosts }}{{ $scheme = "https" }}{{ end }}
{{- end }}
{{- printf "%s://%s" $scheme $host }}
{{- end }}
{{- end }}

{{/*
Secret variables as (variable name -> key in the Secret). From the chart's own Secret only the
values that were given; from existingSecret every key with a non-empty name.
*/}}
{{- define "bitrix24-bridge.secretVars" -}}
{{- dict "clientId" "BRIDGE_CLIENT_ID" "clientSecret" "BRIDGE_CLIENT_SECRET" "amqpUrl" "BRIDGE_AMQP_URL" "refreshToken" "BRIDGE_REFRESH_TOKEN" "applicationToken" "BRIDGE_APPLICATION_TOKEN" "stateKey" "BRIDGE_STATE_KEY" | toJson }}
{{- end }}

{{- define "bitrix24-bridge.secretKeys" -}}
{{- $out := dict }}
{{- range $field, $var := include "bitrix24-bridge.secretVars" . | fromJson }}
{{- if $.Values.existingSecret }}
{{- $key := get $.Values.existingSecretKeys $field }}
{{- if $key }}{{ $_ := set $out $var $key }}{{ end }}
{{- else if get $.Values.secrets $field }}
{{- $_ := set $out $var $var }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}
