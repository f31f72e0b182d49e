{{/*
fender.sidecar: adds Fender to a pod spec. Pass a dict:
  ctx     the root context ($)                                         required
  pod     the pod spec as a dict (e.g. fromYaml of your pod spec YAML)  optional
  values  the Fender values (default ctx.Values; from a parent chart: .Values.fender)
and it returns the pod spec YAML with
  - the Fender container appended to `containers` (sidecar.mode: classic), or
    prepended to `initContainers` with restartPolicy: Always (sidecar.mode: native,
    so it is up before the app's init containers and containers, and stops last),
  - the config, journal and /tmp volumes appended to `volumes`.
Example, inside a Deployment:
    template:
      metadata:
        annotations:
          {{- include "fender.podAnnotations" (dict "ctx" $) | nindent 8 }}
      spec:
        {{- $pod := fromYaml (include "myapp.podSpec" .) }}
        {{- include "fender.sidecar" (dict "ctx" $ "pod" $pod) | nindent 8 }}
*/}}
{{- define "fender.sidecar" -}}
{{- $v := .values | default .ctx.Values -}}
{{- $args := dict "ctx" .ctx "values" $v -}}
{{- $pod := deepCopy (.pod | default (dict)) -}}
{{- $container := fromYaml (include "fender.container" $args) -}}
{{- if eq $v.sidecar.mode "native" -}}
{{- $_ := set $pod "initContainers" (prepend ($pod.initContainers | default (list)) $container) -}}
{{- else -}}
{{- $_ := set $pod "containers" (append ($pod.containers | default (list)) $container) -}}
{{- end -}}
{{- $volumes := fromYamlArray (include "fender.volumes" $args) -}}
{{- $_ := set $pod "volumes" (concat ($pod.volumes | default (list)) $volumes) -}}
{{- toYaml $pod -}}
{{- end -}}

{{/*
fender.container: the Fender container spec alone (one mapping), for pod specs you
assemble by hand. Same dict as fender.sidecar; add "role" "coordinator" for the
standalone coordinator (admin listener on all interfaces, no sidecar behaviour).
*/}}
{{- define "fender.container" -}}
{{- $v := .values | default .ctx.Values -}}
{{- $s := $v.sidecar -}}
{{- $coordinator := eq (.role | default "sidecar") "coordinator" -}}
{{- $native := and (not $coordinator) (eq $s.mode "native") -}}
name: {{ $s.name }}
image: {{ include "fender.image" . }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if $native }}
restartPolicy: Always
{{- end }}
args: ["--config", "/etc/fender/fender.yaml"]
env:
  - name: FENDER_CONFIG
    value: /etc/fender/fender.yaml
  - name: FENDER_DATA_DIR
    value: /var/lib/fender
  - name: FENDER_PROXY_ADDR
    value: {{ $s.proxyAddr | quote }}
  - name: FENDER_ADMIN_ADDR
    value: {{ ternary (printf "0.0.0.0:%v" $v.coordinator.service.adminPort) $s.adminAddr $coordinator | quote }}
  - name: FENDER_METRICS_ADDR
    value: {{ printf "0.0.0.0:%v" $s.metricsPort | quote }}
  - name: FENDER_LOG_LEVEL
    value: {{ $s.logLevel | quote }}
  - name: FENDER_ACCESS_LOG
    value: {{ $s.accessLog | quote }}
  - name: FENDER_DRAIN_TIMEOUT
    value: {{ $s.drainTimeout | quote }}
  {{- if $v.adminToken.existingSecret }}
  - name: FENDER_ADMIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ $v.adminToken.existingSecret }}
        key: {{ $v.adminToken.key }}
  {{- end }}
  {{- if $v.redis.existingSecret }}
  - name: FENDER_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ $v.redis.existingSecret }}
        key: {{ $v.redis.key }}
  {{- end }}
  {{- if and $coordinator $v.coordinator.sagaStore.existingSecret }}
  - name: FENDER_SAGA_STORE
    valueFrom:
      secretKeyRef:
        name: {{ $v.coordinator.sagaStore.existingSecret }}
        key: {{ $v.coordinator.sagaStore.key }}
  {{- end }}
  {{- if $v.tracing.otlpEndpoint }}
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ $v.tracing.otlpEndpoint | quote }}
  - name: OTEL_SERVICE_NAME
    value: {{ $v.tracing.serviceName | default "fender" | quote }}
  - name: K8S_POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: K8S_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: OTEL_RESOURCE_ATTRIBUTES
    value: "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE)"
  {{- end }}
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: fender-metrics
    containerPort: {{ $s.metricsPort }}
    protocol: TCP
  {{- if $coordinator }}
  - name: fender-admin
    containerPort: {{ $v.coordinator.service.adminPort }}
    protocol: TCP
  {{- end }}
startupProbe:
  httpGet:
    path: /healthz
    port: fender-metrics
  {{- toYaml $s.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: fender-metrics
  {{- toYaml $s.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: fender-metrics
  {{- toYaml $s.probes.readiness | nindent 2 }}
{{- if and (not $coordinator) (not $native) (gt (int $s.classic.preStopSleepSeconds) 0) }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ $s.classic.preStopSleepSeconds | quote }}]
{{- end }}
resources:
  {{- toYaml (ternary $v.coordinator.resources $s.resources $coordinator) | nindent 2 }}
securityContext:
  {{- toYaml $s.securityContext | nindent 2 }}
volumeMounts:
  # A directory mount, not subPath: only then does the kubelet update the file
  # in place (the ..data symlink swap) and Fender hot-reloads it.
  - name: {{ $s.name }}-config
    mountPath: /etc/fender
    readOnly: true
  - name: {{ $s.name }}-data
    mountPath: /var/lib/fender
  - name: {{ $s.name }}-tmp
    mountPath: /tmp
{{- end -}}

{{/*
fender.volumes: the volumes fender.container mounts, as a YAML list. With "dataClaim"
in the dict, the journal volume is that PVC (the coordinator uses this).
*/}}
{{- define "fender.volumes" -}}
{{- $v := .values | default .ctx.Values -}}
{{- $s := $v.sidecar -}}
{{- $claim := .dataClaim | default $s.dataVolume.existingClaim -}}
- name: {{ $s.name }}-config
  configMap:
    name: {{ include "fender.configMapName" . }}
    items:
      - key: fender.yaml
        path: fender.yaml
- name: {{ $s.name }}-data
  {{- if $claim }}
  persistentVolumeClaim:
    claimName: {{ $claim }}
  {{- else }}
  emptyDir:
    {{- toYaml $s.dataVolume.emptyDir | nindent 4 }}
  {{- end }}
- name: {{ $s.name }}-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}
