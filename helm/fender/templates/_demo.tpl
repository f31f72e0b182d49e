{{/* Pod spec of the demo client, before fender.sidecar adds Fender to it. */}}
{{- define "fender.demo.clientPod" -}}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: 20
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
containers:
  - name: client
    image: {{ .ctx.Values.demo.client.image }}
    command: ["/bin/sh", "-c"]
    args:
      - |
        while true; do
          curl -s -o /dev/null -w '%{http_code} route=%header{x-fender-route} attempts=%header{x-fender-attempts}\n' \
            "http://demo-upstream{{ .ctx.Values.demo.client.path }}"
          sleep 1
        done
    env:
      - name: http_proxy
        value: http://127.0.0.1:15001
      - name: HTTP_PROXY
        value: http://127.0.0.1:15001
    resources:
      requests:
        cpu: 10m
        memory: 16Mi
      limits:
        memory: 32Mi
    securityContext:
      runAsUser: 100
      runAsGroup: 101
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: ["ALL"]
{{- end -}}
