{{/*
Names. Short enough that "<fullname>-<service>-migrate-<revision>" stays a
valid name.
*/}}
{{- define "ub.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 36 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 36 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The three services: their gRPC ports (the code's defaults) and whom each one
calls (USAGEBILLING_<CALLEE>_ADDR and an egress rule per callee). Facts of the
code, not choices: hence not in values.yaml.
*/}}
{{- define "ub.services" -}}
ingest:
  port: 50051
  calls: [billing, meter]
  autoscaled: true
meter:
  port: 50052
  calls: [billing, ingest]
  autoscaled: true
billing:
  port: 50053
  calls: [meter]
  autoscaled: false
{{- end -}}

{{- define "ub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: usage-billing
{{- end -}}

{{/* All labels of one component: (dict "root" $ "name" "ingest" "component" "server") */}}
{{- define "ub.labelsFor" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: usage-billing
{{ include "ub.selector" . }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "name" "ingest" "component" "server") */}}
{{- define "ub.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/name: {{ .name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* repository:tag, or repository@sha256:... when image.digest is given (the
     digest wins: what was tested is what runs). */}}
{{- define "ub.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "ub.natsNodes" -}}
{{- if eq .Values.nats.mode "cluster" }}{{ int .Values.nats.clusterSize }}{{ else if eq .Values.nats.mode "single" }}1{{ else }}{{ fail "nats.mode must be single or cluster" }}{{ end -}}
{{- end -}}

{{- define "ub.streamReplicas" -}}
{{- $nodes := include "ub.natsNodes" . | int -}}
{{- $replicas := .Values.config.streamReplicas | default (ternary 3 1 (eq .Values.nats.mode "cluster")) | int -}}
{{- if gt $replicas $nodes }}{{ fail (printf "config.streamReplicas (%d) exceeds the NATS nodes (%d)" $replicas $nodes) }}{{ end -}}
{{- $replicas -}}
{{- end -}}

{{/* The Secret every credential comes from: secrets.existingSecret, or the one
     the chart creates from values (templates/secret.yaml). Keys: database-url,
     admin-token-sha256, <service>-token, <service>-token-sha256,
     nats-<service>-password (and
     postgres-password with the in-cluster PostgreSQL). */}}
{{- define "ub.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "ub.fullname" .) -}}
{{- end -}}

{{/* A variable from a key of that Secret: (dict "root" $ "name" "VAR" "key" "k") */}}
{{- define "ub.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ub.secretName" .root }}
      key: {{ .key }}
{{- end -}}

{{/* Settings every service reads, as a map (the common ConfigMap, and the
     migration Jobs' env: a hook Job runs before any ConfigMap exists). */}}
{{- define "ub.commonSettings" -}}
NATS_URL: nats://{{ include "ub.fullname" . }}-nats:4222
USAGEBILLING_STREAM_REPLICAS: {{ include "ub.streamReplicas" . | quote }}
# The migration Jobs migrate; the servers wait for them instead of racing.
USAGEBILLING_AUTO_MIGRATE: "false"
USAGEBILLING_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
USAGEBILLING_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
USAGEBILLING_SHUTDOWN_GRACE: {{ .Values.config.shutdownGrace | quote }}
USAGEBILLING_AUTH_CACHE_TTL: {{ .Values.config.authCacheTTL | quote }}
USAGEBILLING_METRICS_PORT: {{ .Values.metrics.port | quote }}
USAGEBILLING_HTTP_PORT: {{ .Values.http.port | quote }}
{{- with .Values.tracing.otlpEndpoint }}
# OpenTelemetry tracing (services/common/tracing.py): a new trace is kept with
# this probability, a caller's decision is followed.
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
OTEL_TRACES_SAMPLER: parentbased_traceidratio
OTEL_TRACES_SAMPLER_ARG: {{ $.Values.tracing.sampleRatio | quote }}
{{- end }}
{{- end -}}

{{/* One service's own settings: (dict "root" $ "name" "ingest") */}}
{{- define "ub.serviceSettings" -}}
{{- $root := .root -}}
{{- $fullname := include "ub.fullname" $root -}}
{{- $services := include "ub.services" $root | fromYaml -}}
{{- $svc := get $services .name -}}
USAGEBILLING_{{ upper .name }}_PORT: {{ $svc.port | quote }}
{{- range $callee := $svc.calls }}
USAGEBILLING_{{ upper $callee }}_ADDR: {{ printf "dns:///%s-%s-peers:%v" $fullname $callee (get (get $services $callee) "port") | quote }}
{{- end }}
USAGEBILLING_BACKDATE_WINDOW: {{ $root.Values.config.backdateWindow | quote }}
{{- if eq .name "billing" }}
USAGEBILLING_INVOICE_GRACE: {{ $root.Values.config.invoiceGrace | quote }}
USAGEBILLING_SCHEDULER_INTERVAL: {{ $root.Values.config.schedulerInterval | quote }}
{{- end }}
{{- end -}}

{{/* A pod's scheduling and annotations: the global values, then the
     service's (maps merged, the service's keys winning; lists appended;
     affinity and topologySpreadConstraints replaced when the service sets
     them). (dict "root" $ "values" <the service's values or dict>) */}}
{{- define "ub.scheduling" -}}
{{- $g := .root.Values.global -}}
{{- $s := .values -}}
{{- with merge (dict) ($s.nodeSelector | default dict) ($g.nodeSelector | default dict) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat ($g.tolerations | default list) ($s.tolerations | default list) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity | default $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.topologySpreadConstraints | default $g.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ub.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ub.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
The pod spec shared by a service's Deployment and its migration Job:
(dict "root" $ "name" "ingest" "args" (list "migrate") "resources" {...}).
*/}}
{{- define "ub.appPodSpec" -}}
{{- $root := .root -}}
{{- $values := get $root.Values .name -}}
{{- $tls := and $root.Values.tls.enabled (not .migrate) -}}
serviceAccountName: {{ include "ub.fullname" $root }}-{{ .name }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "ub.scheduling" (dict "root" $root "values" $values) }}
securityContext:
  {{- include "ub.podSecurityContext" $root | nindent 2 }}
containers:
  - name: app
    image: {{ include "ub.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: {{ concat (list "python" "-m" (printf "services.%s" .name)) (.args | default list) | toJson }}
    {{- if not .migrate }}
    envFrom:
      - configMapRef:
          name: {{ include "ub.fullname" $root }}-common
      - configMapRef:
          name: {{ include "ub.fullname" $root }}-{{ .name }}
    {{- end }}
    env:
      {{- if .migrate }}
      {{- /* The same settings as the server, given inline: as a Helm hook the
             Job runs before the ConfigMaps exist. */}}
      {{- range $k, $v := merge (include "ub.serviceSettings" (dict "root" $root "name" .name) | fromYaml) (include "ub.commonSettings" $root | fromYaml) }}
      - {name: {{ $k }}, value: {{ $v | quote }}}
      {{- end }}
      {{- end }}
      {{- include "ub.secretEnv" (dict "root" $root "name" "DATABASE_URL" "key" "database-url") | nindent 6 }}
      {{- /* Only the admin token's SHA-256: pods verify it, none can present it. */}}
      {{- include "ub.secretEnv" (dict "root" $root "name" "USAGEBILLING_ADMIN_TOKEN_SHA256" "key" "admin-token-sha256") | nindent 6 }}
      {{- /* Its own token, and the SHA-256 of the tokens of the services that
             call it (those whose `calls` name it; what each may call is
             services/common/service_identity.py). */}}
      {{- include "ub.secretEnv" (dict "root" $root "name" "USAGEBILLING_SERVICE_TOKEN" "key" (printf "%s-token" .name)) | nindent 6 }}
      {{- $callee := .name }}
      {{- range $caller, $facts := include "ub.services" $root | fromYaml }}
      {{- if has $callee $facts.calls }}
      {{- include "ub.secretEnv" (dict "root" $root "name" (printf "USAGEBILLING_%s_TOKEN_SHA256" (upper $caller)) "key" (printf "%s-token-sha256" $caller)) | nindent 6 }}
      {{- end }}
      {{- end }}
      {{- if not .migrate }}
      {{- /* Its own NATS user (the Jobs do not connect to NATS). */}}
      - {name: USAGEBILLING_NATS_USER, value: {{ .name }}}
      {{- include "ub.secretEnv" (dict "root" $root "name" "USAGEBILLING_NATS_PASSWORD" "key" (printf "nats-%s-password" .name)) | nindent 6 }}
      {{- end }}
      {{- if $tls }}
      - {name: USAGEBILLING_TLS_CERT, value: {{ $root.Values.tls.mountPath }}/tls.crt}
      - {name: USAGEBILLING_TLS_KEY, value: {{ $root.Values.tls.mountPath }}/tls.key}
      - {name: USAGEBILLING_TLS_CA, value: {{ $root.Values.tls.mountPath }}/ca.crt}
      {{- if $root.Values.tls.clientAuth }}
      - {name: USAGEBILLING_TLS_CLIENT_CA, value: {{ $root.Values.tls.mountPath }}/ca.crt}
      {{- end }}
      {{- end }}
      {{- with concat ($root.Values.global.extraEnv | default list) ($values.extraEnv | default list) }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    securityContext:
      {{- include "ub.containerSecurityContext" dict | nindent 6 }}
    {{- with .resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .extra }}
    {{- . | nindent 4 }}
    {{- end }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      {{- if $tls }}
      - name: tls
        mountPath: {{ $root.Values.tls.mountPath }}
        readOnly: true
      {{- end }}
volumes:
  # The root filesystem is read-only.
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  {{- if $tls }}
  - name: tls
    secret:
      secretName: {{ required "tls.existingSecret is required with tls.enabled (keys tls.crt, tls.key, ca.crt)" $root.Values.tls.existingSecret }}
      defaultMode: 0440
  {{- end }}
{{- end -}}

{{/* A health probe of one service: native gRPC in plaintext; with TLS an exec
     probe (kubelet's gRPC probes speak plaintext only, and present no client
     certificate under mTLS) that checks the same health service over TLS with
     the pod's own certificate. (dict "root" $ "name" "ingest" "port" 50051
     "service" "readiness") */}}
{{- define "ub.probe" -}}
{{- if .root.Values.tls.enabled -}}
{{- $dir := .root.Values.tls.mountPath -}}
{{- $peer := printf "%s-%s-peers" (include "ub.fullname" .root) .name -}}
exec:
  command:
    - python
    - -c
    - {{ printf "import sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;r=lambda f:open('%s/'+f,'rb').read();c=grpc.ssl_channel_credentials(r('ca.crt'),r('tls.key'),r('tls.crt'));s=g.HealthStub(grpc.secure_channel('localhost:%v',c,options=[('grpc.ssl_target_name_override','%s')]));sys.exit(s.Check(h.HealthCheckRequest(service=sys.argv[1]),timeout=4).status!=1)" $dir .port $peer | quote }}
    - {{ .service }}
{{- else -}}
grpc:
  port: {{ .port }}
  service: {{ .service }}
{{- end -}}
{{- end -}}

{{- /* Egress every pod of the suite needs: DNS (port 53 anywhere: clusters
       differ), then PostgreSQL (its pod when in the release; an external
       server is reachable on its port only). */}}
{{- define "ub.baseEgress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- if .Values.tracing.otlpEndpoint }}
# The OpenTelemetry collector (tracing.otlpEndpoint).
- ports:
    - port: {{ .Values.tracing.collectorPort }}
{{- end }}
- ports:
    - port: 5432
  {{- if .Values.postgres.inCluster }}
  to:
    - podSelector:
        matchLabels:
          {{- include "ub.selector" (dict "root" . "name" "postgres") | nindent 10 }}
  {{- end -}}
{{- end -}}
