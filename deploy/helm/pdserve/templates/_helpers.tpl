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

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.externalUrl }}
{{- .Values.redis.externalUrl }}
{{- else if .Values.redis.enabled }}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "pdserve.fullname" .) .Release.Namespace }}
{{- end }}
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
- --kv-transport={{ $v.serving.kvTransport }}
{{- with include "pdserve.redisUrl" . }}
- --redis-url={{ . }}
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

{{/* The model volume and /dev/shm, shared by the router and Ray pods: (dict "ctx" $ "shm" "2Gi"). */}}
{{- define "pdserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
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
