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
  calls: [billing]
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

{{- define "ub.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
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

{{/* Where DATABASE_URL and the admin token come from: [secret name, key]. */}}
{{- define "ub.databaseSecret" -}}
{{- if .Values.postgres.inCluster -}}
{{- list (include "ub.fullname" .) "database-url" | toJson -}}
{{- else -}}
{{- list (required "postgres.external.existingSecret is required when postgres.inCluster is false" .Values.postgres.external.existingSecret) .Values.postgres.external.existingSecretKey | toJson -}}
{{- end -}}
{{- end -}}

{{- define "ub.adminSecret" -}}
{{- if .Values.adminToken.existingSecret -}}
{{- list .Values.adminToken.existingSecret .Values.adminToken.existingSecretKey | toJson -}}
{{- else -}}
{{- $_ := required "set adminToken.value or adminToken.existingSecret" .Values.adminToken.value -}}
{{- list (include "ub.fullname" .) "admin-token" | toJson -}}
{{- end -}}
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
{{- $db := include "ub.databaseSecret" $root | fromJsonArray -}}
{{- $admin := include "ub.adminSecret" $root | fromJsonArray -}}
serviceAccountName: {{ include "ub.fullname" $root }}-{{ .name }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "ub.podSecurityContext" $root | nindent 2 }}
containers:
  - name: app
    image: {{ include "ub.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: {{ concat (list "python" "-m" (printf "services.%s" .name)) (.args | default list) | toJson }}
    # Server and Job read the same settings: a service-specific database URL
    # is then the one both migrate and use.
    envFrom:
      - configMapRef:
          name: {{ include "ub.fullname" $root }}-common
      - configMapRef:
          name: {{ include "ub.fullname" $root }}-{{ .name }}
    env:
      - name: DATABASE_URL
        valueFrom:
          secretKeyRef:
            name: {{ index $db 0 }}
            key: {{ index $db 1 }}
      - name: USAGEBILLING_ADMIN_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ index $admin 0 }}
            key: {{ index $admin 1 }}
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
volumes:
  # The root filesystem is read-only.
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end -}}

{{- /* Egress every pod of the suite needs: DNS (port 53 anywhere: clusters
       differ), then PostgreSQL (its pod when in the release; an external
       server is reachable on its port only). */}}
{{- define "ub.baseEgress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
- ports:
    - port: 5432
  {{- if .Values.postgres.inCluster }}
  to:
    - podSelector:
        matchLabels:
          {{- include "ub.selector" (dict "root" . "name" "postgres") | nindent 10 }}
  {{- end -}}
{{- end -}}
