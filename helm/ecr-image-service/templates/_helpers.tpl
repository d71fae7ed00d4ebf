{{/* The chart name, overridable. */}}
{{- define "ecr-image-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; not repeated when the release already carries the chart name. */}}
{{- define "ecr-image-service.fullname" -}}
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

{{/* Labels that select this release's pods; never change them after install. */}}
{{- define "ecr-image-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ecr-image-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Recommended labels on every object. */}}
{{- define "ecr-image-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ecr-image-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ecr-image-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ecr-image-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest pins the image. */}}
{{- define "ecr-image-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The fewest replicas that run: what the PDB and the spread constraints are about. */}}
{{- define "ecr-image-service.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/* The most replicas that run: each takes this share of ECR's account-wide rates. */}}
{{- define "ecr-image-service.rateShare" -}}
{{- if not (kindIs "invalid" .Values.config.rateShare) }}{{ int .Values.config.rateShare }}
{{- else if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.maxReplicas }}
{{- else }}{{ max 1 (int .Values.replicaCount) }}{{ end }}
{{- end }}

{{/* The whole drain after SIGTERM, in seconds: NOT_SERVING delay, then the grace. */}}
{{- define "ecr-image-service.drainSeconds" -}}
{{- add (int .Values.config.shutdownDelaySeconds) (int .Values.config.shutdownGraceSeconds) }}
{{- end }}

{{/* The pod's termination grace: longer than the drain, so Kubernetes never kills mid-drain. */}}
{{- define "ecr-image-service.terminationGracePeriodSeconds" -}}
{{- $drain := int (include "ecr-image-service.drainSeconds" .) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than the drain, config.shutdownDelaySeconds + config.shutdownGraceSeconds (%d)" (int .Values.terminationGracePeriodSeconds) $drain) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The binary's settings as its ECR_IMAGE_SERVICE_* environment twins. The key list is the
flag list: tests/chart.rs checks that every env twin of `serve --help` is rendered when set.
Whole numbers are printed as integers (Helm reads numbers as floats: 1000000 would be 1e+06).
*/}}
{{- define "ecr-image-service.configEnv" -}}
{{- $names := dict
  "region" "REGION"
  "ecrEndpointUrl" "ECR_ENDPOINT_URL"
  "maxAttempts" "MAX_ATTEMPTS"
  "initialBackoff" "INITIAL_BACKOFF"
  "maxBackoff" "MAX_BACKOFF"
  "connectTimeout" "CONNECT_TIMEOUT"
  "attemptTimeout" "ATTEMPT_TIMEOUT"
  "operationTimeout" "OPERATION_TIMEOUT"
  "digestCacheBytes" "DIGEST_CACHE_BYTES"
  "tagCacheEntries" "TAG_CACHE_ENTRIES"
  "tagTtl" "TAG_TTL"
  "staleIfError" "STALE_IF_ERROR"
  "batchWindow" "BATCH_WINDOW"
  "defaultDeadline" "DEFAULT_DEADLINE"
  "maxConcurrentRequests" "MAX_CONCURRENT_REQUESTS"
  "watchPollInterval" "WATCH_POLL_INTERVAL"
  "watchHeartbeatInterval" "WATCH_HEARTBEAT_INTERVAL"
  "maxWatches" "MAX_WATCHES"
  "maxWatchesPerCaller" "MAX_WATCHES_PER_CALLER"
  "maxWatchedRepositoriesPerCaller" "MAX_WATCHED_REPOSITORIES_PER_CALLER"
  "maxUpstreamCalls" "MAX_UPSTREAM_CALLS"
  "maxUpstreamCallsPerCaller" "MAX_UPSTREAM_CALLS_PER_CALLER"
  "requestBodyTimeout" "REQUEST_BODY_TIMEOUT"
  "maxConnections" "MAX_CONNECTIONS"
  "workerThreads" "WORKER_THREADS"
  "putImageRate" "PUT_IMAGE_RATE"
  "batchGetImageRate" "BATCH_GET_IMAGE_RATE"
  "batchDeleteImageRate" "BATCH_DELETE_IMAGE_RATE"
  "listingRate" "LISTING_RATE"
  "attributeWrites" "ATTRIBUTE_WRITES"
  "stsRate" "STS_RATE"
  "maxAttributedSessions" "MAX_ATTRIBUTED_SESSIONS"
  "audit" "AUDIT"
  "verdictTtl" "VERDICT_TTL"
  "pageTokenKeyFile" "PAGE_TOKEN_KEY_FILE"
  "reflection" "REFLECTION"
  "logFormat" "LOG_FORMAT"
  "log" "LOG"
  "otlpEndpoint" "OTLP_ENDPOINT"
  "backend" "BACKEND"
  "immutableRepositories" "IMMUTABLE_REPOSITORIES"
  "localRegistryId" "LOCAL_REGISTRY_ID"
}}
{{- range $key := keys $names | sortAlpha }}
{{- $value := index $.Values.config $key }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
{{- $value = int64 $value }}
{{- end }}
- name: ECR_IMAGE_SERVICE_{{ index $names $key }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- $host := ternary (printf "[%s]" .Values.listenAddress) .Values.listenAddress (contains ":" .Values.listenAddress) }}
- name: ECR_IMAGE_SERVICE_LISTEN
  value: {{ printf "%s:%d" $host (int .Values.ports.grpc) | quote }}
- name: ECR_IMAGE_SERVICE_ADMIN_LISTEN
  value: {{ printf "%s:%d" $host (int .Values.ports.metrics) | quote }}
{{- if eq .Values.config.backend "local" }}
- name: ECR_IMAGE_SERVICE_DATA_DIR
  value: /data
{{- end }}
{{- with include "ecr-image-service.maxRequestBytesInFlight" . }}
- name: ECR_IMAGE_SERVICE_MAX_REQUEST_BYTES_IN_FLIGHT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: ECR_IMAGE_SERVICE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if .Values.redis.url }}
{{- if and .Values.redis.tls.enabled (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tls.enabled needs a rediss:// redis.url" }}
{{- end }}
- name: ECR_IMAGE_SERVICE_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: ECR_IMAGE_SERVICE_REDIS_CA_FILE
  value: {{ printf "%s/%s" (include "ecr-image-service.redisCaDir" .) .Values.redis.tls.caSecretKey | quote }}
{{- end }}
- name: ECR_IMAGE_SERVICE_IDENTITY_SOURCE
  value: {{ include "ecr-image-service.identitySource" . | quote }}
{{- if .Values.registries }}
- name: ECR_IMAGE_SERVICE_REGISTRIES
  value: {{ printf "%s/registries.yaml" (include "ecr-image-service.registriesDir" .) | quote }}
{{- end }}
{{- if .Values.authz.rules }}
- name: ECR_IMAGE_SERVICE_AUTHZ_POLICY
  value: {{ printf "%s/policy.yaml" (include "ecr-image-service.policyDir" .) | quote }}
{{- end }}
{{- if ne .Values.aws.credentialSource "instanceMetadata" }}
{{- /* Without this, a pod with no role silently borrows the node's instance role via IMDS. */}}
- name: AWS_EC2_METADATA_DISABLED
  value: "true"
{{- end }}
- name: ECR_IMAGE_SERVICE_RATE_SHARE
  value: {{ include "ecr-image-service.rateShare" . | quote }}
- name: ECR_IMAGE_SERVICE_SHUTDOWN_DELAY
  value: {{ printf "%ds" (int .Values.config.shutdownDelaySeconds) | quote }}
- name: ECR_IMAGE_SERVICE_SHUTDOWN_GRACE
  value: {{ printf "%ds" (int .Values.config.shutdownGraceSeconds) | quote }}
{{- end }}

{{/* A memory quantity in MiB, for Mi and Gi quantities; empty for any other spelling. */}}
{{- define "ecr-image-service.memoryMiB" -}}
{{- $m := toString . }}
{{- if regexMatch "^[0-9]+Mi$" $m }}{{ trimSuffix "Mi" $m }}
{{- else if regexMatch "^[0-9]+Gi$" $m }}{{ mul (int (trimSuffix "Gi" $m)) 1024 }}
{{- end }}
{{- end }}

{{/* config.digestCacheBytes in MiB: empty is the binary's 64 MiB; NMiB, NGiB or a byte count. */}}
{{- define "ecr-image-service.digestCacheMiB" -}}
{{- $c := toString . }}
{{- if eq $c "" }}64
{{- else if regexMatch "^[0-9]+MiB$" $c }}{{ trimSuffix "MiB" $c }}
{{- else if regexMatch "^[0-9]+GiB$" $c }}{{ mul (int (trimSuffix "GiB" $c)) 1024 }}
{{- else if regexMatch "^[0-9]+$" $c }}{{ div (int64 $c) 1048576 }}
{{- end }}
{{- end }}

{{/*
Request bytes in flight, from the pod's memory limit (values.yaml, at `resources`):
(limits.memory - digest cache - 96 MiB for the process and tag cache) / 3, in bytes. Empty when
the limit or the cache size is spelt in a way not parsed here: the binary's default then holds.
*/}}
{{- define "ecr-image-service.maxRequestBytesInFlight" -}}
{{- $set := .Values.config.maxRequestBytesInFlight }}
{{- if not (kindIs "invalid" $set) }}{{ int64 $set }}
{{- else }}
{{- $limit := include "ecr-image-service.memoryMiB" (dig "limits" "memory" "" (.Values.resources | default dict)) }}
{{- $cache := include "ecr-image-service.digestCacheMiB" .Values.config.digestCacheBytes }}
{{- if and $limit $cache }}
{{- $budget := div (sub (sub (int $limit) (int $cache)) 96) 3 }}
{{- if lt $budget 5 }}
{{- fail (printf "resources.limits.memory (%sMi) leaves %d MiB of request bytes after the %s MiB digest cache and 96 MiB for the process; one largest request needs 5 MiB. Raise the limit or lower config.digestCacheBytes" $limit $budget $cache) }}
{{- end }}
{{- mul $budget 1048576 }}
{{- end }}
{{- end }}
{{- end }}

{{/* With the ECR backend, IRSA needs a role: without one the pod has no credentials. */}}
{{- define "ecr-image-service.requireCredentials" -}}
{{- if and (eq .Values.config.backend "ecr") (eq .Values.aws.credentialSource "irsa") .Values.serviceAccount.create (not .Values.serviceAccount.roleArn) }}
{{- fail "serviceAccount.roleArn is required with the ECR backend (IRSA). Set it to the IAM role the pods assume, or set aws.credentialSource to podIdentity, env or instanceMetadata" }}
{{- end }}
{{- end }}

{{/* Where identities come from: set, or from the mesh. */}}
{{- define "ecr-image-service.identitySource" -}}
{{- if .Values.identity.source }}{{ .Values.identity.source }}
{{- else if .Values.mesh.istio.enabled }}istio-xfcc
{{- else if .Values.mesh.linkerd.enabled }}linkerd
{{- else }}none{{ end }}
{{- end }}

{{/* Where the policy ConfigMap is mounted. */}}
{{- define "ecr-image-service.policyDir" -}}/etc/ecr-image-service/authz{{- end }}
{{- define "ecr-image-service.registriesDir" -}}/etc/ecr-image-service/registries{{- end }}

{{/* A mesh without rules is a confused deputy for every meshed workload: say so, or refuse. */}}
{{- define "ecr-image-service.requirePolicy" -}}
{{- if and (or .Values.mesh.istio.enabled .Values.mesh.linkerd.enabled) (not .Values.authz.rules) (not .Values.authz.allowAll) }}
{{- fail "a mesh is enabled but authz.rules is empty: every meshed workload could write every repository. List authz.rules, or set authz.allowAll: true to mean it" }}
{{- end }}
{{- end }}

{{/* Where the Redis CA bundle (redis.tls.caSecret) is mounted. */}}
{{- define "ecr-image-service.redisCaDir" -}}
/etc/ecr-image-service/redis-ca
{{- end }}
