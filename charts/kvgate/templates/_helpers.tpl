{{/* Names, labels and shared values of the kvgate chart. */}}

{{- define "kvgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.fullname" -}}
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

{{- define "kvgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ include "kvgate.chart" . }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kvgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The loader image (adapter-loader sidecars, cache Jobs): modelLoading.image, else the image the
Dockerfile's model-loader target builds, beside the gateway's image (same registry and tag). */}}
{{- define "kvgate.loaderImage" -}}
{{- default (printf "%s-model-loader:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag)) .Values.modelLoading.image }}
{{- end }}

{{/* Cluster-scoped names must not clash between releases of the same name in other namespaces. */}}
{{- define "kvgate.storageClassRoleName" -}}
{{- printf "%s-%s-storageclasses" (include "kvgate.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.autoscalerStateConfigMapName" -}}
{{- default (printf "%s-autoscaler-state" (include "kvgate.fullname" .)) .Values.modelAutoscaling.stateConfigMapName }}
{{- end }}

{{/* The Files and Batches API's store (batchStore): the claim's name, whether it is ReadWriteMany,
SQLite's journal mode, and the checks that refuse a store the replicas could not share. */}}
{{- define "kvgate.batchStoreClaimName" -}}
{{- default (printf "%s-batch-store" (include "kvgate.fullname" .)) .Values.batchStore.persistentVolumeClaim.existingClaim }}
{{- end }}

{{- define "kvgate.batchStoreShared" -}}
{{- $claim := .Values.batchStore.persistentVolumeClaim }}
{{- if and $claim.enabled (has "ReadWriteMany" $claim.accessModes) }}true{{ end }}
{{- end }}

{{- define "kvgate.batchJournalMode" -}}
{{- default (ternary "delete" "wal" (eq (include "kvgate.batchStoreShared" .) "true")) .Values.batchStore.journalMode }}
{{- end }}

{{- define "kvgate.batchStoreChecks" -}}
{{- $store := .Values.batchStore }}
{{- if and $store.enabled (gt (int .Values.replicaCount) 1) }}
{{- if not $store.persistentVolumeClaim.enabled }}
{{- fail (printf "batchStore: with replicaCount %d each replica would have a store of its own in its emptyDir (a file uploaded through one would be missing from the others); set batchStore.persistentVolumeClaim.enabled with accessModes [ReadWriteMany], or replicaCount 1" (int .Values.replicaCount)) }}
{{- end }}
{{- if ne (include "kvgate.batchStoreShared" .) "true" }}
{{- fail (printf "batchStore.persistentVolumeClaim.accessModes must include ReadWriteMany when replicaCount > 1 (every replica mounts the store, on any node); got %v" $store.persistentVolumeClaim.accessModes) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
config.yaml: the gateway's keys and the operator's keys in one file, read by `kvgate serve`
(kvgate.settings.load_settings).
*/}}
{{- define "kvgate.config" -}}
{{- $v := .Values }}
{{- $servers := deepCopy $v.modelServers }}
{{- if $servers.Sim }}
{{- if not $servers.Sim.images.default }}
{{- $_ := set $servers.Sim.images "default" (include "kvgate.image" .) }}
{{- end }}
{{- end }}
{{- $autoscaling := deepCopy $v.modelAutoscaling }}
{{- $_ := set $autoscaling "stateConfigMapName" (include "kvgate.autoscalerStateConfigMapName" .) }}
{{- $config := dict
  "server" (dict "host" "0.0.0.0" "port" (int $v.ports.http) "metricsPort" (int $v.ports.metrics) "logLevel" $v.gateway.logLevel)
  "retries" $v.gateway.retries
  "queue" $v.gateway.queue
  "limits" $v.gateway.limits
  "upstream" $v.gateway.upstream
  "ejection" $v.gateway.ejection
  "routing" $v.gateway.routing
  "engineMetrics" $v.gateway.engineMetrics
  "healthChecks" $v.gateway.healthChecks
  "apiKeys" $v.gateway.apiKeys
  "tracing" $v.gateway.tracing
  "modelServers" $servers
  "resourceProfiles" $v.resourceProfiles
  "cacheProfiles" $v.cacheProfiles
  "modelServerPods" $v.modelServerPods
  "secretNames" $v.secretNames
  "modelRollouts" $v.modelRollouts
  "modelAutoscaling" $autoscaling
  "messaging" $v.messaging
}}
{{- $_ := set $config "modelLoading" (dict "image" (include "kvgate.loaderImage" .)) }}
{{- if $v.batchStore.enabled }}
{{- $_ := set $config "batch" (dict "stateDir" $v.batchStore.mountPath "journalMode" (include "kvgate.batchJournalMode" .)) }}
{{- end }}
{{- toYaml (mergeOverwrite $config (deepCopy $v.extraConfig)) }}
{{- end }}
