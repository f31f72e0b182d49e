# syntax=docker/dockerfile:1
# Fender container image: a slim Python runtime with Fender installed in /opt/fender,
# running as an unprivileged user. Build from the repository root:
#   docker build -t fender:dev .
# Runtime layout: config /etc/fender/fender.yaml (mount a ConfigMap directory here;
# Fender reloads it when the ConfigMap is updated), saga journal /var/lib/fender
# (must be writable: an emptyDir or a persistent volume under a read-only root fs).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: turn the source into wheels and install them into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
ARG SRC=/src
ARG WHEELS=/wheels
ARG VENV=/opt/fender
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY policies/ policies/
COPY config/ config/
COPY saga/ saga/
# Every dependency arrives as a wheel (pip refuses to compile anything here), so
# neither stage needs a compiler; the install into the venv is then offline.
RUN python -m pip wheel --only-binary=:all: --no-binary=fender --wheel-dir "$WHEELS" "${SRC}[redis,postgres]" \
 && python -m venv "$VENV" \
 && "$VENV/bin/pip" install --no-index --find-links "$WHEELS" "fender[redis,postgres]" \
 && "$VENV/bin/fender" version

# ---- runtime: the venv only; no pip cache, no build tools, no source tree ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fender" \
      org.opencontainers.image.description="Resilience sidecar: retry, timeout, circuit breaker, rate limit, bulkhead, saga coordinator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fender \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/fender \
      --shell /usr/sbin/nologin fender \
 && mkdir -p /etc/fender /var/lib/fender \
 && chown 10001:10001 /var/lib/fender
COPY --from=build /opt/fender /opt/fender
COPY config/fender.yaml /etc/fender/fender.yaml
ENV PATH=/opt/fender/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FENDER_CONFIG=/etc/fender/fender.yaml \
    FENDER_DATA_DIR=/var/lib/fender
# Listener addresses keep the SPEC defaults: proxy and admin on loopback (a sidecar
# shares the pod's network namespace; it must not be an open proxy), metrics on all
# interfaces. For `docker run -p` set FENDER_PROXY_ADDR=0.0.0.0:15001.
EXPOSE 15000 15001 15090
VOLUME ["/var/lib/fender"]
USER 10001:10001
WORKDIR /var/lib/fender
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; a = os.environ.get('FENDER_METRICS_ADDR', '0.0.0.0:15090'); urllib.request.urlopen('http://127.0.0.1:%s/healthz' % a.rpartition(':')[2], timeout=2)"]
# SIGTERM goes straight to Fender (exec form), which drains within FENDER_DRAIN_TIMEOUT.
ENTRYPOINT ["fender", "run"]
