{{/* Names */}}
{{- define "swapserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "swapserve.fullname" -}}
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

{{- define "swapserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "swapserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swapserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "swapserve.labels" -}}
helm.sh/chart: {{ include "swapserve.chart" . }}
{{ include "swapserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: swapserve
{{- end }}

{{- define "swapserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "swapserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "swapserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The registry URL Secret (name), or "" when the pods use SQLite. */}}
{{- define "swapserve.registrySecret" -}}
{{- if .Values.registry.existingSecret }}
{{- .Values.registry.existingSecret }}
{{- else if .Values.registry.url }}
{{- printf "%s-registry" (include "swapserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "swapserve.controlSecret" -}}
{{- default (printf "%s-control" (include "swapserve.fullname" .)) .Values.control.existingSecret }}
{{- end }}

{{- define "swapserve.device" -}}
{{- if .Values.server.device }}{{ .Values.server.device }}{{ else if .Values.gpu.enabled }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{/*
ServerLive over the inference port, from inside the container (the image's Python has grpc and
swapserve's generated protos). Exit 0 only when the server answers live=true.
*/}}
{{- define "swapserve.liveCommand" -}}
{{- if .Values.tls.secretName }}
{{- include "swapserve.tlsProbeCommand" (dict "root" . "rpc" "ServerLive" "field" "live") }}
{{- else }}
- python
- -c
- "import sys, grpc; from swapserve._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc; sys.exit(0 if rpc.GRPCInferenceServiceStub(grpc.insecure_channel('127.0.0.1:{{ .Values.ports.grpc }}')).ServerLive(pb.ServerLiveRequest(), timeout=4).live else 1)"
{{- end }}
{{- end }}

{{/* With TLS (tls.secretName) the kubelet's gRPC probe cannot connect (it speaks plaintext): probes
run in the pod, with the pod's certificate as their client certificate (mTLS) and its CA as roots;
the certificate must name tls.probeServerName (a DNS SAN). */}}
{{- define "swapserve.tlsProbeCommand" -}}
{{- $v := .root.Values }}
- python
- -c
- "import sys, grpc; from swapserve._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc; r=lambda f: open('/etc/swapserve/tls/'+f,'rb').read(); c=grpc.ssl_channel_credentials(r('{{ if $v.tls.clientCA }}ca.crt{{ else }}tls.crt{{ end }}'), r('tls.key'), r('tls.crt')); ch=grpc.secure_channel('127.0.0.1:{{ $v.ports.grpc }}', c, options=[('grpc.ssl_target_name_override', '{{ $v.tls.probeServerName }}')]); sys.exit(0 if rpc.GRPCInferenceServiceStub(ch).{{ .rpc }}(pb.{{ .rpc }}Request(), timeout=4).{{ .field }} else 1)"
{{- end }}

{{/* Refuse configurations that would break a promise rather than render them. */}}
{{- define "swapserve.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "swapserve.registrySecret" .)) }}
{{- fail "replicaCount > 1 needs the shared PostgreSQL registry: set registry.existingSecret (a Secret with the SQLAlchemy URL postgresql+psycopg://...) or registry.url; per-pod SQLite registries would not act as one fleet" }}
{{- end }}
{{- $needed := add (int .Values.preStopSleepSeconds) (int .Values.server.drainTimeoutSeconds) 5 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must cover preStopSleepSeconds + server.drainTimeoutSeconds + 5 s to close (%d), or Kubernetes kills in-flight requests" (int .Values.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- if not (has .Values.modelRepository.source (list "examples" "pvc" "initContainer")) }}
{{- fail "modelRepository.source must be examples, pvc or initContainer" }}
{{- end }}
{{- if and (eq .Values.modelRepository.source "initContainer") (not .Values.modelRepository.initContainer.command) }}
{{- fail "modelRepository.source=initContainer needs modelRepository.initContainer.command (what fills the repository)" }}
{{- end }}
{{- end }}
