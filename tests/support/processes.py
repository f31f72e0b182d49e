"""Start `fender run` and the test upstream as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
FENDER = str(Path(sys.executable).parent / "fender")


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {out} {err}")
        try:
            with opener.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream_server", str(self.port)], cwd=ROOT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/echo", proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class FenderProcess:
    def __init__(self, config_path: Path, data_dir: Path, **env: str) -> None:
        self.proxy_port, self.admin_port, self.metrics_port = free_port(), free_port(), free_port()
        full_env = dict(os.environ)
        for key in [k for k in full_env if k.startswith(("FENDER_", "OTEL_"))]:
            del full_env[key]
        full_env.update(
            FENDER_PROXY_ADDR=f"127.0.0.1:{self.proxy_port}",
            FENDER_ADMIN_ADDR=f"127.0.0.1:{self.admin_port}",
            FENDER_METRICS_ADDR=f"127.0.0.1:{self.metrics_port}",
            FENDER_DATA_DIR=str(data_dir),
            FENDER_ACCESS_LOG="false",
        )
        full_env.update(env)
        self.proc = subprocess.Popen(
            [FENDER, "run", "--config", str(config_path)],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.proxy = f"http://127.0.0.1:{self.proxy_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.metrics = f"http://127.0.0.1:{self.metrics_port}"
        wait_http(self.metrics + "/readyz", proc=self.proc)

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
