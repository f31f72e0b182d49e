"""What is measured: the upstream itself, Fender (empty and full chain), the aiohttp
reference and the peers, each rendered from bench/configs/ and started on free ports."""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Managed, free_port

__all__ = ["CONFIGS", "Target", "Workspace", "all_targets", "fender_supports_workers", "render"]

CONFIGS = Path(__file__).resolve().parent / "configs"
VENV_BIN = Path(sys.executable).parent


def render(template: str, workdir: Path, out_name: str, **values: object) -> Path:
    """Fill `$name` placeholders of a config template and write it into the workdir."""
    text = string.Template((CONFIGS / template).read_text()).substitute(workdir=workdir, **values)
    path = workdir / out_name
    path.write_text(text)
    return path


def tool(name: str) -> str | None:
    """A binary from the venv (envoy, traefik, fender) or from PATH (nginx, haproxy, wrk)."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    return found


@dataclass
class Workspace:
    workdir: Path
    upstream_port: int

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


Starter = Callable[[Workspace, int], Managed]


@dataclass
class Target:
    name: str
    description: str
    host: str  # Host header wrk sends (Fender routes on it)
    start: Starter
    needs: tuple[str, ...] = ()
    group: str = "peer"  # "upstream", "fender", "reference", "peer"
    port: int = 0
    managed: Managed | None = None

    def missing(self) -> list[str]:
        return [n for n in self.needs if tool(n) is None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def _nginx(template: str, name: str) -> Starter:
    def start(ws: Workspace, port: int) -> Managed:
        conf = render(template, ws.workdir, f"{name}.conf", port=port, upstream_port=ws.upstream_port)
        binary = tool("nginx") or "nginx"
        return Managed.start(name, [binary, "-p", str(ws.workdir), "-e", "stderr", "-c", str(conf)],
                             ws.workdir / f"{name}.log")
    return start


def start_upstream(workdir: Path) -> tuple[Managed, int]:
    port = free_port()
    ws = Workspace(workdir, port)
    return _nginx("nginx-upstream.conf", "upstream")(ws, port), port


def _haproxy(ws: Workspace, port: int) -> Managed:
    conf = render("haproxy.cfg", ws.workdir, "haproxy.cfg", port=port, upstream_port=ws.upstream_port)
    return Managed.start("haproxy", [tool("haproxy") or "haproxy", "-db", "-f", str(conf)],
                         ws.workdir / "haproxy.log")


def _envoy(ws: Workspace, port: int) -> Managed:
    conf = render("envoy.yaml", ws.workdir, "envoy.yaml", port=port, admin_port=free_port(),
                  upstream_port=ws.upstream_port)
    args = [tool("envoy") or "envoy", "-c", str(conf), "--concurrency", "1", "--log-level", "warn",
            "--disable-hot-restart"]
    return Managed.start("envoy", args, ws.workdir / "envoy.log")


def _traefik(ws: Workspace, port: int) -> Managed:
    render("traefik-dynamic.yaml", ws.workdir, "traefik-dynamic.yaml", upstream_port=ws.upstream_port)
    static = render("traefik-static.yaml", ws.workdir, "traefik-static.yaml", port=port)
    # one core, like Envoy's --concurrency 1 and the single-process Python targets
    env = {"GOMAXPROCS": os.environ.get("BENCH_TRAEFIK_GOMAXPROCS", "1")}
    return Managed.start("traefik", [tool("traefik") or "traefik", f"--configFile={static}"],
                         ws.workdir / "traefik.log", env=env)


def _reference(ws: Workspace, port: int) -> Managed:
    args = [sys.executable, "-m", "bench.ref_aiohttp_proxy", str(port), ws.upstream_url]
    return Managed.start("aiohttp-ref", args, ws.workdir / "aiohttp-ref.log",
                         cwd=Path(__file__).resolve().parent.parent)


def _relay(ws: Workspace, port: int) -> Managed:
    args = [sys.executable, "-m", "bench.ref_relay", str(port), str(ws.upstream_port)]
    return Managed.start("relay-floor", args, ws.workdir / "relay-floor.log",
                         cwd=Path(__file__).resolve().parent.parent)


def fender_config(ws: Workspace) -> Path:
    path = ws.workdir / "fender.yaml"
    if not path.exists():
        render("fender.yaml", ws.workdir, "fender.yaml", upstream_port=ws.upstream_port)
    return path


def fender_supports_workers() -> bool:
    binary = tool("fender")
    if binary is None:
        return False
    try:
        out = subprocess.run([binary, "run", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout + out.stderr


def _fender(name: str, workers: int = 0) -> Starter:
    def start(ws: Workspace, port: int) -> Managed:
        data_dir = ws.workdir / f"{name}-data"
        data_dir.mkdir(exist_ok=True)
        admin, metrics = free_port(), free_port()
        env = {
            "FENDER_PROXY_ADDR": f"127.0.0.1:{port}",
            "FENDER_ADMIN_ADDR": f"127.0.0.1:{admin}",
            "FENDER_METRICS_ADDR": f"127.0.0.1:{metrics}",
            "FENDER_ACCESS_LOG": "false",
            "FENDER_DATA_DIR": str(data_dir),
            "FENDER_LOG_LEVEL": "warning",
        }
        args = [tool("fender") or "fender", "run", "--config", str(fender_config(ws))]
        if workers:
            args += ["--workers", str(workers)]
        managed = Managed.start(name, args, ws.workdir / f"{name}.log", env=env)
        managed.extra.update(admin_port=admin, metrics_port=metrics, proxy_port=port)
        return managed
    return start


def _shared(starter: Starter) -> Starter:
    """One process for every target made with this starter (they differ by route, not by process)."""
    started: list[Managed] = []

    def start(ws: Workspace, port: int) -> Managed:
        if not started or not started[0].alive():
            started[:] = [starter(ws, port)]
        return started[0]
    return start


def all_targets(fender_workers: int = 0) -> list[Target]:
    # the empty and the full chain are two routes of one Fender: compared in one process, the
    # difference is the chain, not two processes' luck (hash seeds, heap layout, the core each got)
    fender = _shared(_fender("fender"))
    targets = [
        Target("upstream", "nginx `return 200`, 1 worker, called directly", "upstream",
               lambda ws, port: _never(), group="upstream"),
        Target("fender-empty", "Fender, route with `chain: []`", "empty", fender, needs=("fender",), group="fender"),
        Target("fender-full", "the same Fender, route rate_limit+timeout+retry+breaker+attempt timeout", "full",
               fender, needs=("fender",), group="fender"),
    ]
    if fender_workers > 1:
        targets.append(Target(f"fender-full-w{fender_workers}",
                              f"Fender full chain, --workers {fender_workers}", "full",
                              _fender(f"fender-full-w{fender_workers}", fender_workers),
                              needs=("fender",), group="fender"))
    targets += [
        Target("aiohttp-ref", "bare aiohttp + ClientSession pass-through, uvloop", "ref",
               _reference, group="reference"),
        Target("relay-floor", "uvloop byte relay, no HTTP: the floor of a Python proxy", "relay",
               _relay, group="reference"),
        Target("envoy", "Envoy --concurrency 1: rate limit, timeout, retry, breaker, outlier",
               "envoy", _envoy, needs=("envoy",)),
        Target("traefik", "Traefik (GOMAXPROCS=1): rateLimit, retry, circuitBreaker", "traefik",
               _traefik, needs=("traefik",)),
        Target("nginx", "nginx reverse proxy, 1 worker, upstream keepalive", "nginx",
               _nginx("nginx-proxy.conf", "nginx-proxy"), needs=("nginx",)),
        Target("haproxy", "haproxy, 1 thread, http-reuse always", "haproxy", _haproxy,
               needs=("haproxy",)),
    ]
    return targets


def _never() -> Managed:
    raise AssertionError("the upstream is started by start_upstream()")
