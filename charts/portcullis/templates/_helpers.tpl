{{/*
Names. Every object name is "<fullname>-<suffix>", with the fullname cut so
that the whole name stays within 63 characters (a DNS label: Services,
label values, and the webhook's DNS names need that).
*/}}

{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "portcullis.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>" within 63 characters: (list $ "suffix") */}}
{{- define "portcullis.suffixed" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $base := include "portcullis.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{- define "portcullis.ca.name" -}}{{ include "portcullis.suffixed" (list . "ca") }}{{- end -}}
{{- define "portcullis.ca.issuerSecret" -}}
{{- .Values.identity.issuer.existingSecret | default (include "portcullis.suffixed" (list . "ca-issuer")) -}}
{{- end -}}
{{- define "portcullis.trustBundle.name" -}}{{ include "portcullis.suffixed" (list . "trust-bundle") }}{{- end -}}
{{- define "portcullis.injector.name" -}}{{ include "portcullis.suffixed" (list . "injector") }}{{- end -}}
{{- define "portcullis.injector.config" -}}{{ include "portcullis.suffixed" (list . "injector-config") }}{{- end -}}
{{- define "portcullis.injector.tlsSecret" -}}
{{- if eq .Values.webhook.tls.mode "provided" -}}
{{- .Values.webhook.tls.provided.secretName -}}
{{- else -}}
{{- include "portcullis.suffixed" (list . "injector-tls") -}}
{{- end -}}
{{- end -}}

{{/* The identity service's URL, as sidecars use it (its certificate names the Service). */}}
{{- define "portcullis.ca.url" -}}
{{- printf "https://%s.%s.svc:%d" (include "portcullis.ca.name" .) .Release.Namespace (int .Values.identity.service.port) -}}
{{- end -}}

{{- define "portcullis.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "portcullis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portcullis
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (list $ "identity"|"injector") */}}
{{- define "portcullis.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "portcullis.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The control plane's pod and container security contexts: UID/GID 1500. */}}
{{- define "portcullis.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1500
runAsGroup: 1500
fsGroup: 1500
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "portcullis.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1500
runAsGroup: 1500
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Kubernetes-style resources -> the injector config's {cpuRequest, ...}. */}}
{{- define "portcullis.flatResources" -}}
{{- $r := . | default dict -}}
{{- $req := $r.requests | default dict -}}
{{- $lim := $r.limits | default dict -}}
cpuRequest: {{ $req.cpu | default "" | toString | quote }}
cpuLimit: {{ $lim.cpu | default "" | toString | quote }}
memoryRequest: {{ $req.memory | default "" | toString | quote }}
memoryLimit: {{ $lim.memory | default "" | toString | quote }}
{{- end -}}

{{/* A list of ports (numbers or "from-to" strings) as the injector's strings. */}}
{{- define "portcullis.portList" -}}
{{- $out := list -}}
{{- range . }}{{ $out = append $out (toString .) }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Namespaces never injected. */}}
{{- define "portcullis.excludedNamespaces" -}}
{{- $ns := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- range .Values.injector.excludedNamespaces }}{{ $ns = append $ns . }}{{ end -}}
{{- toJson ($ns | uniq) -}}
{{- end -}}

{{/* The injector's config file (the format of `portcullis webhook --config`). */}}
{{- define "portcullis.injectorConfig" -}}
# The injector's defaults for every injected pod (portcullis webhook --config).
# Written by the chart; docs/kubernetes.md documents every key.
image: {{ include "portcullis.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
nativeSidecar: {{ .Values.injector.nativeSidecar }}
proxyAwait: {{ .Values.injector.proxyAwait }}
rewriteAppProbes: {{ .Values.injector.rewriteAppProbes }}
trustDomain: {{ .Values.trustDomain | quote }}
caUrl: {{ include "portcullis.ca.url" . | quote }}
caAudience: {{ .Values.identity.audience | quote }}
excludedNamespaces: {{ include "portcullis.excludedNamespaces" . }}
denyOnError: {{ .Values.injector.denyOnError }}
proxy:
  uid: {{ .Values.proxy.uid }}
  gid: {{ .Values.proxy.gid }}
  resources:
    {{- include "portcullis.flatResources" .Values.proxy.resources | nindent 4 }}
  logLevel: {{ .Values.proxy.logLevel | quote }}
  logFormat: {{ .Values.proxy.logFormat }}
  inboundMode: {{ .Values.proxy.inboundMode }}
  defaultInboundPolicy: {{ .Values.proxy.defaultInboundPolicy }}
  meshCidrs: {{ toJson .Values.proxy.meshCidrs }}
  rulesConfigMap: {{ .Values.proxy.rulesConfigMap }}
  certTtl: {{ .Values.proxy.certTTL | quote }}
  {{- /* Absent after `helm upgrade --reuse-values` from a release without it: the injector's default (1) applies. */}}
  {{- if hasKey .Values.proxy "workerThreads" }}
  workerThreads: {{ .Values.proxy.workerThreads }}
  {{- end }}
init:
  resources:
    {{- include "portcullis.flatResources" .Values.init.resources | nindent 4 }}
  excludeInboundPorts: {{ include "portcullis.portList" .Values.init.excludeInboundPorts }}
  excludeOutboundPorts: {{ include "portcullis.portList" .Values.init.excludeOutboundPorts }}
  excludeOutboundCidrs: {{ toJson .Values.init.excludeOutboundCidrs }}
{{- if .Values.identity.trustBundlePEM }}
trustBundle: |
  {{- .Values.identity.trustBundlePEM | trim | nindent 2 }}
{{- else }}
# No identity.trustBundlePEM: the injector warns on every pod, and sidecars
# cannot verify the identity service until the bundle is set here.
trustBundle: ""
{{- end }}
{{- end -}}
