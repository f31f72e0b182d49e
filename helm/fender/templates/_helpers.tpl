{{/*
Every helper takes a dict: "ctx" is the root context ($) and "values" the Fender
values (optional; defaults to ctx.Values). A chart that has Fender as a dependency
passes its own $ and .Values.fender, so the same helpers work from outside.
*/}}

{{/* Name of the chart's objects: "<release>-fender", or the release name when it already says fender. */}}
{{- define "fender.fullname" -}}
{{- $v := .values | default .ctx.Values -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "fender" .ctx.Release.Name -}}
{{- .ctx.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fender" .ctx.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of the ConfigMap holding fender.yaml. */}}
{{- define "fender.configMapName" -}}
{{- $v := .values | default .ctx.Values -}}
{{- $v.configMap.existing | default (include "fender.fullname" .) -}}
{{- end -}}

{{/* Image reference. */}}
{{- define "fender.image" -}}
{{- $v := .values | default .ctx.Values -}}
{{- printf "%s:%s" $v.image.repository ($v.image.tag | default .ctx.Chart.AppVersion) -}}
{{- end -}}

{{/* Selector labels of one component ("component" in the dict). */}}
{{- define "fender.selectorLabels" -}}
app.kubernetes.io/name: fender
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common labels for objects this chart renders. */}}
{{- define "fender.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fender.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: fender
{{- end -}}

{{/*
Pod annotations for a pod with Fender in it: Prometheus scrape annotations for the
metrics port (when metrics.podAnnotations). Deliberately no checksum of the config:
Fender reloads the mounted ConfigMap itself, so a config change must not roll pods.
*/}}
{{- define "fender.podAnnotations" -}}
{{- $v := .values | default .ctx.Values -}}
{{- if $v.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $v.sidecar.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/*
The Fender config as a YAML document. `config` may be a map (mergeable across values
files) or a string (written verbatim). With demo.enabled, the demo route (to the demo
upstream Service) is appended, since its upstream URL depends on the release name.
*/}}
{{- define "fender.configFile" -}}
{{- $v := .values | default .ctx.Values -}}
{{- if kindIs "string" $v.config -}}
{{- if $v.demo.enabled -}}
{{- fail "demo.enabled needs `config` as a map (the chart appends the demo route to it), not a string" -}}
{{- end -}}
{{- $v.config -}}
{{- else -}}
{{- $config := deepCopy $v.config -}}
{{- if $v.demo.enabled -}}
{{- $upstream := printf "http://%s-demo-upstream:8080" (include "fender.fullname" .) -}}
{{- $retry := dict "attempts" 3 "on" (list "connect-failure" "reset" "gateway-error" "5xx") "backoff" (dict "base" "25ms" "max" "250ms") -}}
{{- $chain := list (dict "timeout" "3s") (dict "retry" $retry) (dict "circuit_breaker" (dict "consecutive_failures" 5 "open_for" "10s")) (dict "timeout" "1s") -}}
{{- $route := dict "name" "demo" "match" (dict "host" "demo-upstream") "upstream" $upstream "chain" $chain -}}
{{- $_ := set $config "routes" (append ($config.routes | default (list)) $route) -}}
{{- end -}}
{{- $text := toYaml $config -}}
{{- /* YAML 1.1 reads an unquoted key `on` (retry.on, fallback.on) as the boolean true. */ -}}
{{- if regexMatch "(?m)^[ -]*\"?true\"?:" $text -}}
{{- fail "config: a key `on:` was read by Helm's YAML parser as the boolean true; quote it in your values (\"on\": [5xx]) or pass `config` as a string" -}}
{{- end -}}
{{- $text -}}
{{- end -}}
{{- end -}}
