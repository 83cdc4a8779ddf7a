{{/* Names, labels and checks shared by every template. */}}

{{- define "quotad.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quotad.fullname" -}}
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

{{- define "quotad.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quotad.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "quotad.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "quotad.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "quotad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quotad.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "quotad.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "quotad.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "quotad.fullname" .)) .Values.policyExistingConfigMap }}
{{- end }}

{{/* Where the server certificate comes from: existing, certManager or generated (tls.enabled only). */}}
{{- define "quotad.tlsSource" -}}
{{- if .Values.tls.existingSecret }}existing
{{- else if .Values.tls.certManager.enabled }}certManager
{{- else }}generated
{{- end }}
{{- end }}

{{/* The Secret holding tls.crt, tls.key (and maybe ca.crt). The generated one has a name of its
own so that moving to cert-manager never has two owners fight over one Secret. */}}
{{- define "quotad.tlsSecretName" -}}
{{- $source := include "quotad.tlsSource" . }}
{{- if eq $source "existing" }}
{{- .Values.tls.existingSecret }}
{{- else if eq $source "certManager" }}
{{- printf "%s-tls" (include "quotad.fullname" .) }}
{{- else }}
{{- printf "%s-generated-tls" (include "quotad.fullname" .) }}
{{- end }}
{{- end }}

{{/* The names the server certificate carries, as a JSON list: the Service's, then tls.dnsNames. */}}
{{- define "quotad.tlsDnsNames" -}}
{{- $svc := include "quotad.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) }}
{{- concat $names .Values.tls.dnsNames | uniq | toJson }}
{{- end }}

{{/* Where the container finds the client CA bundle (tls.clientAuth). */}}
{{- define "quotad.clientCaFile" -}}
{{- $auth := .Values.tls.clientAuth }}
{{- if or $auth.caSecret $auth.caConfigMap }}
{{- printf "/etc/quotad/client-ca/%s" $auth.caKey }}
{{- else }}
{{- printf "/etc/quotad/tls/%s" $auth.caKey }}
{{- end }}
{{- end }}

{{/* Checks the schema cannot express; each failure says what to change. */}}
{{- define "quotad.validate" -}}
{{- $redis := .Values.redis }}
{{- if gt (add (ternary 1 0 (not (empty $redis.url))) (ternary 1 0 (not (empty $redis.existingSecret))) (ternary 1 0 (not (empty $redis.seeds)))) 1 }}
{{- fail "redis: set one of redis.url, redis.existingSecret or redis.seeds, not both" }}
{{- end }}
{{- if and $redis.seeds (eq (toString $redis.cluster) "false") }}
{{- fail "redis.seeds are a Redis Cluster's nodes: redis.cluster must be auto or true" }}
{{- end }}
{{- if and $redis.seeds $redis.tls.existingSecret (not $redis.seedsTls) }}
{{- fail "redis.tls.existingSecret needs TLS: set redis.seedsTls with redis.seeds" }}
{{- end }}
{{- if not (or $redis.url $redis.existingSecret $redis.seeds) }}
{{- fail "redis: set redis.url (e.g. redis://redis.example:6379/0) or redis.existingSecret (a Secret holding the URL) or redis.seeds (a Redis Cluster's nodes): quotad needs an external Redis" }}
{{- end }}
{{- if and $redis.passwordSecret (not $redis.passwordSecretKey) }}
{{- fail "redis.passwordSecret needs redis.passwordSecretKey: the key of the password in it" }}
{{- end }}
{{- if and $redis.passwordSecretKey (not (or $redis.existingSecret $redis.passwordSecret)) }}
{{- fail "redis.passwordSecretKey needs redis.passwordSecret (or redis.existingSecret): the Secret holding it" }}
{{- end }}
{{- if ne (empty $redis.tls.certKey) (empty $redis.tls.keyKey) }}
{{- fail "redis.tls: set both certKey and keyKey (mutual TLS) or neither" }}
{{- end }}
{{- if and $redis.url $redis.tls.existingSecret (not (hasPrefix "rediss://" $redis.url)) }}
{{- fail "redis.tls.existingSecret needs a rediss:// redis.url" }}
{{- end }}
{{- if and .Values.dashboard.enabled (not .Values.metrics.enabled) }}
{{- fail "dashboard.enabled needs metrics.enabled: the dashboard reads quotad's metrics" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if eq (int .Values.metrics.port) 50051 }}
{{- fail "metrics.port must differ from the gRPC port 50051" }}
{{- end }}
{{- $tls := .Values.tls }}
{{- if and $tls.enabled $tls.existingSecret $tls.certManager.enabled }}
{{- fail "tls: set tls.existingSecret or tls.certManager.enabled, not both" }}
{{- end }}
{{- if and $tls.enabled $tls.certManager.enabled (not $tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name: the Issuer or ClusterIssuer that signs the certificate" }}
{{- end }}
{{- if and $tls.clientAuth.enabled (not $tls.enabled) }}
{{- fail "tls.clientAuth.enabled needs tls.enabled: client certificates are verified in the TLS handshake" }}
{{- end }}
{{- if and $tls.clientAuth.caSecret $tls.clientAuth.caConfigMap }}
{{- fail "tls.clientAuth: set caSecret or caConfigMap, not both" }}
{{- end }}
{{- if and $tls.enabled $tls.clientAuth.enabled (eq (include "quotad.tlsSource" .) "generated") (not (or $tls.clientAuth.caSecret $tls.clientAuth.caConfigMap)) }}
{{- fail "tls.clientAuth with the chart-generated certificate needs tls.clientAuth.caSecret or caConfigMap: the CA that signs your clients (the generated CA signs nothing after install)" }}
{{- end }}
{{- $s := .Values.shutdown }}
{{- $needed := add $s.preStopSleepSeconds (div (add $s.drainMs 999) 1000) $s.graceSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdown.preStopSleepSeconds + drainMs + graceSeconds (%d s), or the kubelet kills in-flight RPCs" (int .Values.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}
