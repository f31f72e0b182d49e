{{/* The app's own pod spec, without Fender; fender.sidecar adds it. */}}
{{- define "my-app.podSpec" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 101
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
containers:
  - name: app
    image: {{ .Values.image }}
    ports:
      - name: http
        containerPort: 8080
        protocol: TCP
    env:
      - name: HTTP_PROXY
        value: http://127.0.0.1:15001
      - name: NO_PROXY
        value: 127.0.0.1,localhost
    securityContext:
      allowPrivilegeEscalation: false
      capabilities:
        drop: ["ALL"]
{{- end -}}
