{{/* Names and labels. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kept short: KubeRay derives "<name>-head-svc" and per-group pod names from it. */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "pdserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels for one component: (dict "ctx" $ "component" "router"). */}}
{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: pdserve
{{ include "pdserve.selectorLabels" . }}
{{- end }}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "pdserve.rayAddress" -}}
ray://{{ include "pdserve.fullname" . }}-head-svc.{{ .Release.Namespace }}.svc:{{ .Values.ray.clientPort }}
{{- end }}

{{/* The Redis URL routers and workers use; never with a password in it (that is a Secret). */}}
{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.externalUrl }}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" .Values.redis.externalUrl }}
{{- fail "redis.externalUrl carries a password: it would show in the pods' args and the ConfigMap; put the password in a Secret and name it in redis.auth.existingSecret" }}
{{- end }}
{{- .Values.redis.externalUrl }}
{{- else if .Values.redis.enabled }}
{{- printf "%s://%s-redis.%s.svc:6379/0" (ternary "rediss" "redis" (.Values.redis.tls.enabled | default false)) (include "pdserve.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* "true" when the Redis needs a password: the chart's with redis.auth.enabled, or an external one with a password Secret. */}}
{{- define "pdserve.redisAuth" -}}
{{- if .Values.redis.externalUrl }}
{{- if .Values.redis.auth.existingSecret }}true{{ end }}
{{- else if and .Values.redis.enabled .Values.redis.auth.enabled }}true{{ end }}
{{- end }}

{{/* "true" when the routers verify the Redis server against redis.tls.existingSecret's ca.crt. */}}
{{- define "pdserve.redisCA" -}}
{{- if and (include "pdserve.redisUrl" . | hasPrefix "rediss://") .Values.redis.tls.existingSecret }}true{{ end }}
{{- end }}

{{/* Where every pod finds its credentials (files of one projected volume). */}}
{{- define "pdserve.secretsDir" -}}
/etc/pdserve/secrets
{{- end }}

{{- define "pdserve.generatedSecret" -}}
{{ include "pdserve.fullname" . }}-secrets
{{- end }}

{{/* Keys the chart generates into <fullname>-secrets: those no existingSecret provides. */}}
{{- define "pdserve.generatedKeys" -}}
{{- $v := .Values }}
{{- if and $v.clusterSecret.enabled (not $v.clusterSecret.existingSecret) }}
- {{ $v.clusterSecret.secretKey }}
{{- end }}
{{- if and $v.ray.auth.enabled (not $v.ray.auth.existingSecret) }}
- {{ $v.ray.auth.secretKey }}
{{- end }}
{{- if and (include "pdserve.redisAuth" .) (not $v.redis.auth.existingSecret) }}
- {{ $v.redis.auth.secretKey }}
{{- end }}
{{- end }}

{{/* Projected-volume sources of the credentials directory (empty: nothing to mount). */}}
{{- define "pdserve.secretSources" -}}
{{- $v := .Values }}
{{- $gen := include "pdserve.generatedSecret" . }}
{{- if $v.clusterSecret.enabled }}
- secret:
    name: {{ $v.clusterSecret.existingSecret | default $gen }}
    items: [{key: {{ $v.clusterSecret.secretKey }}, path: cluster-secret}]
{{- end }}
{{- if $v.ray.auth.enabled }}
- secret:
    name: {{ $v.ray.auth.existingSecret | default $gen }}
    items: [{key: {{ $v.ray.auth.secretKey }}, path: ray-auth-token}]
{{- end }}
{{- if include "pdserve.redisAuth" . }}
- secret:
    name: {{ $v.redis.auth.existingSecret | default $gen }}
    items: [{key: {{ $v.redis.auth.secretKey }}, path: redis-password}]
{{- end }}
{{- if include "pdserve.redisCA" . }}
- secret:
    name: {{ $v.redis.tls.existingSecret }}
    items: [{key: ca.crt, path: redis-ca.crt}]
{{- end }}
{{- end }}

{{- define "pdserve.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{- define "pdserve.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- include "pdserve.fullname" . }}-api-key
{{- end }}
{{- end }}

{{/* `pdserve serve` flags for the router, one per list item. */}}
{{- define "pdserve.serveArgs" -}}
{{- $v := .Values }}
- serve
- --host=0.0.0.0
- --port={{ $v.router.port }}
- --ray-address={{ include "pdserve.rayAddress" . }}
- --ray-namespace={{ include "pdserve.fullname" . }}
- --prefill={{ $v.prefill.replicas }}
- --decode={{ $v.decode.replicas }}
{{- if gt (int $v.prefill.epSize) 1 }}
- --prefill-ep-size={{ $v.prefill.epSize }}
{{- end }}
{{- if gt (int $v.decode.epSize) 1 }}
- --decode-ep-size={{ $v.decode.epSize }}
{{- end }}
{{- if gt (int (default 1 $v.prefill.tpSize)) 1 }}
- --prefill-tp={{ $v.prefill.tpSize }}
{{- end }}
{{- if gt (int (default 1 $v.decode.tpSize)) 1 }}
- --decode-tp={{ $v.decode.tpSize }}
{{- end }}
- --kv-transport={{ $v.serving.kvTransport }}
{{- if $v.clusterSecret.enabled }}
- --cluster-secret-file={{ include "pdserve.secretsDir" . }}/cluster-secret
{{- end }}
{{- with include "pdserve.redisUrl" . }}
- --redis-url={{ . }}
{{- end }}
{{- if include "pdserve.redisAuth" . }}
- --redis-password-file={{ include "pdserve.secretsDir" . }}/redis-password
{{- end }}
{{- if include "pdserve.redisCA" . }}
- --redis-ca-file={{ include "pdserve.secretsDir" . }}/redis-ca.crt
{{- end }}
{{- if $v.model.path }}
- --model={{ $v.model.path }}
{{- end }}
{{- with $v.model.servedModelName }}
- --served-model-name={{ . }}
{{- end }}
- --dtype={{ $v.engine.dtype }}
- --block-size={{ $v.engine.blockSize }}
{{- with $v.engine.numKvBlocks }}
- --num-kv-blocks={{ . }}
{{- end }}
- --kv-cache-dtype={{ $v.engine.kvCacheDtype }}
{{- with $v.engine.maxModelLen }}
- --max-model-len={{ . }}
{{- end }}
- --max-num-batched-tokens={{ $v.engine.maxNumBatchedTokens }}
- --max-num-seqs={{ $v.engine.maxNumSeqs }}
- --local-prefill-tokens={{ $v.serving.localPrefillTokens }}
- --prefill-timeout={{ $v.serving.prefillTimeoutSeconds }}
- --request-timeout={{ $v.serving.requestTimeoutSeconds }}
- --max-inflight={{ $v.serving.maxInflight }}
{{- range $v.router.extraArgs }}
- {{ . }}
{{- end }}
{{- end }}

{{/* The model volume, /dev/shm, the writable dirs of a read-only root filesystem and the
credentials, shared by the router and Ray pods: (dict "ctx" $ "shm" "2Gi"). */}}
{{- define "pdserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- with include "pdserve.secretSources" .ctx }}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      {{- . | nindent 6 }}
{{- end }}
{{- with .ctx.Values.model.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "pdserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/pdserve
{{- if include "pdserve.secretSources" . }}
- name: secrets
  mountPath: {{ include "pdserve.secretsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.model.existingClaim }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Container resources plus GPUs: (dict "resources" ... "gpus" N). */}}
{{- define "pdserve.gpuResources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}
