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

{{/* global.imageRegistry (a mirror, an air-gapped registry) goes in front of the repository. */}}
{{- define "bitrix24-bridge.image" -}}
{{- $repository := .Values.image.repository }}
{{- with (.Values.global).imageRegistry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Ingress host names as a JSON list; each entry is a name or {host: name}. */}}
{{- define "bitrix24-bridge.ingressHosts" -}}
{{- $hosts := list }}
{{- range .Values.ingress.hosts }}
{{- if kindIs "map" . }}{{ $hosts = append $hosts .host }}{{ else }}{{ $hosts = append $hosts . }}{{ end }}
{{- end }}
{{- toJson $hosts }}
{{- end }}

{{/*
A securityContext value without the chart's own "enabled" switch; empty when enabled is false.
*/}}
{{- define "bitrix24-bridge.securityContext" -}}
{{- if ne (toString .enabled) "false" }}
{{- toYaml (omit . "enabled") }}
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
The bridge's external base URL: config.publicUrl, else https:// and the first ingress host.
Always https when derived: the ingress may have no `tls` block because TLS ends in front of it,
and Bitrix24 must never be told to send tokens over plain HTTP by accident (set
config.publicUrl to choose http). Empty when neither is known.
*/}}
{{- define "bitrix24-bridge.publicUrl" -}}
{{- $hosts := include "bitrix24-bridge.ingressHosts" . | fromJsonArray }}
{{- if .Values.config.publicUrl }}
{{- trimSuffix "/" .Values.config.publicUrl }}
{{- else if and .Values.ingress.enabled $hosts }}
{{- printf "https://%s" (first $hosts) }}
{{- end }}
{{- end }}

{{/*
Every variable that holds a secret (or that the chart sets from the Secret). None may come
through config.extraEnv, in any letter case: the bridge reads variable names case-insensitively.
*/}}
{{- define "bitrix24-bridge.secretVarNames" -}}
{{- toJson (list "BRIDGE_CLIENT_ID" "BRIDGE_CLIENT_SECRET" "BRIDGE_AMQP_URL" "BRIDGE_REFRESH_TOKEN" "BRIDGE_APPLICATION_TOKEN" "BRIDGE_STATE_KEY" "BRIDGE_DIADOC_CLIENT_SECRET" "BRIDGE_DIADOC_REFRESH_TOKEN" "BRIDGE_STATE_URL") }}
{{- end }}

{{/*
Secret values as (field of secrets / existingSecretKeys -> variable name). The Diadoc ones only
while diadoc.enabled: a disabled source gets none of its variables.
*/}}
{{- define "bitrix24-bridge.secretVars" -}}
{{- $vars := dict "clientId" "BRIDGE_CLIENT_ID" "clientSecret" "BRIDGE_CLIENT_SECRET" "amqpUrl" "BRIDGE_AMQP_URL" "refreshToken" "BRIDGE_REFRESH_TOKEN" "applicationToken" "BRIDGE_APPLICATION_TOKEN" "stateKey" "BRIDGE_STATE_KEY" "stateUrl" "BRIDGE_STATE_URL" }}
{{- if .Values.diadoc.enabled }}
{{- $_ := set $vars "diadocClientSecret" "BRIDGE_DIADOC_CLIENT_SECRET" }}
{{- $_ := set $vars "diadocRefreshToken" "BRIDGE_DIADOC_REFRESH_TOKEN" }}
{{- end }}
{{- toJson $vars }}
{{- end }}

{{/*
A number as the bridge parses it: whole numbers without a fraction or exponent (30, not 30.0 or
3e+06), others as Go prints them.
*/}}
{{- define "bitrix24-bridge.number" -}}
{{- $f := float64 . }}
{{- if eq $f (floor $f) }}{{ int64 $f }}{{ else }}{{ $f }}{{ end }}
{{- end }}

{{/*
Plain (non-secret) BRIDGE_DIADOC_* variables as JSON; {} while diadoc.enabled is false. Keys left
empty or null are not set, so the bridge's own default applies.
*/}}
{{- define "bitrix24-bridge.diadocEnv" -}}
{{- $d := .Values.diadoc }}
{{- $env := dict }}
{{- if $d.enabled }}
{{- if not $d.boxes }}
{{- fail "diadoc.enabled is true but diadoc.boxes is empty: list at least one Diadoc box id to poll (BRIDGE_DIADOC_BOXES), or set diadoc.enabled=false" }}
{{- end }}
{{- $_ := set $env "BRIDGE_DIADOC_BOXES" (join "," $d.boxes) }}
{{- range $field, $var := dict "apiUrl" "API_URL" "tokenUrl" "TOKEN_URL" "clientId" "CLIENT_ID" "exchange" "EXCHANGE" "apiVersion" "API_VERSION" "departmentId" "DEPARTMENT_ID" }}
{{- with index $d $field }}{{ $_ := set $env (print "BRIDGE_DIADOC_" $var) (toString .) }}{{ end }}
{{- end }}
{{- range $field, $var := dict "pollInterval" "POLL_INTERVAL" "rescanWindow" "RESCAN_WINDOW" "rescanInterval" "RESCAN_INTERVAL" "startLookback" "START_LOOKBACK" "pageLimit" "PAGE_LIMIT" "seenKeep" "SEEN_KEEP" "requestTimeout" "REQUEST_TIMEOUT" }}
{{- $value := index $d $field }}
{{- /* 0 is a value (rescanWindow: 0 = no re-scan); only null or absent means "default". */}}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $env (print "BRIDGE_DIADOC_" $var) (include "bitrix24-bridge.number" $value) }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $d.populateDocuments) }}
{{- $_ := set $env "BRIDGE_DIADOC_POPULATE_DOCUMENTS" (toString $d.populateDocuments) }}
{{- end }}
{{- end }}
{{- toJson $env }}
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

{{/*
"true" in scaled mode: a state URL is given (secrets.stateUrl, existingSecretKeys.stateUrl or
stateUrlSecret.name), so the state is in PostgreSQL and any number of replicas may run; empty
otherwise. Fails when the URL is given in two places or is not a postgresql:// URL (the message
never holds the URL: it carries a password).
*/}}
{{- define "bitrix24-bridge.scaled" -}}
{{- $inSecret := hasKey (include "bitrix24-bridge.secretKeys" . | fromJson) "BRIDGE_STATE_URL" }}
{{- if and $inSecret .Values.stateUrlSecret.name }}
{{- fail (printf "the state URL is given twice: in stateUrlSecret (%s) and in %s; keep one" .Values.stateUrlSecret.name (ternary "existingSecretKeys.stateUrl" "secrets.stateUrl" (not (empty .Values.existingSecret)))) }}
{{- end }}
{{- with .Values.secrets.stateUrl }}
{{- if and (not $.Values.existingSecret) (not (regexMatch "^postgres(ql)?://[^\\s/]+" .)) }}
{{- fail "secrets.stateUrl must be a postgresql:// URL with a host (postgresql://user:password@host:5432/database)" }}
{{- end }}
{{- end }}
{{- if or $inSecret .Values.stateUrlSecret.name }}true{{ end }}
{{- end }}
