"""What telemetry costs on the hot path: wrk through Fender to nginx, telemetry variants interleaved.

    .venv/bin/python -m tests.support.telemetry_bench [--rounds 3] [--duration 3s] [--connections 1,32]

Each variant is a fresh Fender process (one worker, uvloop) on the bench config's `full`
route (rate limit, timeout, retry, breaker, timeout) in front of an nginx `return 200`.
Traces go to a local OTLP/HTTP endpoint that reads and drops them, so a collector's work
stays out of the numbers. Reported: requests/s and Fender's own CPU time (user + system,
exporter thread included) per request, medians over the rounds. Needs nginx and wrk.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


def _serve() -> None:
    """A Fender process as `fender run` builds it; BENCH_TELEMETRY=0 leaves telemetry out."""
    import asyncio

    import uvloop

    from config.settings import Settings
    from proxy.app import FenderApp

    async def main() -> None:
        app = FenderApp(Settings())
        app.load_initial()
        if os.environ.get("BENCH_TELEMETRY", "1") == "1":
            from proxy.telemetry import install

            install(app)
        await app.start()
        await asyncio.Event().wait()

    uvloop.run(main())


def _sink(port: int) -> None:
    from aiohttp import web

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 15) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="3s")
    parser.add_argument("--connections", default="1,32")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fender-telemetry-bench-"))
    up, otlp = free_port(), free_port()
    nginx_conf = (ROOT / "bench/configs/nginx-upstream.conf").read_text()
    (work / "nginx.conf").write_text(nginx_conf.replace("$workdir", str(work)).replace("$port", str(up)))
    fender_conf = (ROOT / "bench/configs/fender.yaml").read_text().replace("$upstream_port", str(up))
    (work / "fender.yaml").write_text(fender_conf)
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}"}
    variants = {
        "no telemetry (NullObserver)": {"BENCH_TELEMETRY": "0"},
        "metrics": {},
        "metrics + access log (to a file)": {"FENDER_ACCESS_LOG": "true"},
        "metrics + tracing, every request exported": endpoint,
        "metrics + tracing, 10% sampled": {**endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                           "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        "metrics + tracing, sampler always_off": {**endpoint, "OTEL_TRACES_SAMPLER": "always_off"},
    }
    helpers = [
        subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work), "-e", "stderr"]),
        subprocess.Popen([sys.executable, "-m", "tests.support.telemetry_bench", "sink", str(otlp)], cwd=ROOT),
    ]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        wait_port(up, helpers[0])
        wait_port(otlp, helpers[1])
        for _ in range(args.rounds):
            for name, extra in variants.items():
                port = free_port()
                env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FENDER_"))}
                env.update(
                    FENDER_CONFIG=str(work / "fender.yaml"), FENDER_PROXY_ADDR=f"127.0.0.1:{port}",
                    FENDER_ADMIN_ADDR=f"127.0.0.1:{free_port()}", FENDER_METRICS_ADDR=f"127.0.0.1:{free_port()}",
                    FENDER_ACCESS_LOG="false", FENDER_DATA_DIR=str(work / "data"), PYTHONPATH=str(ROOT),
                )
                env.update(extra)
                with open(work / "stdout.log", "wb") as out:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "tests.support.telemetry_bench", "serve"], env=env, stdout=out, cwd=ROOT
                    )
                    try:
                        wait_port(port, proc)
                        url = f"http://127.0.0.1:{port}/"
                        subprocess.run(["wrk", "-t1", "-c8", "-d1s", "-H", "Host: full", url], capture_output=True)
                        for c in (int(x) for x in args.connections.split(",")):
                            before = cpu_seconds(proc.pid)
                            report = subprocess.run(
                                ["wrk", "-t1", f"-c{c}", f"-d{args.duration}", "-H", "Host: full", url],
                                capture_output=True, text=True,
                            ).stdout
                            if "Non-2xx" in report:
                                raise SystemExit(f"{name}: errors under load\n{report}")
                            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", report).group(1))  # type: ignore[union-attr]
                            total = int(re.search(r"(\d+) requests in", report).group(1))  # type: ignore[union-attr]
                            cpu_us = (cpu_seconds(proc.pid) - before) / total * 1e6
                            results.setdefault((name, c), []).append((rps, cpu_us))
                    finally:
                        proc.terminate()
                        proc.wait()
    finally:
        for helper in helpers:
            helper.terminate()
            helper.wait()
    print(f"wrk -t1 -d{args.duration}, medians of {args.rounds} interleaved rounds")
    print("| connections | variant | requests/s | Fender CPU per request |")
    print("|---|---|---|---|")
    for (name, c), values in sorted(results.items(), key=lambda item: item[0][1]):
        rps = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {c} | {name} | {rps:,.0f} | {cpu:.0f} µs |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve()
    elif sys.argv[1:2] == ["sink"]:
        _sink(int(sys.argv[2]))
    else:
        main()
