"""`fender run --workers N`: the parent watches its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from bench.procs import free_port
from tests.support.processes import ROOT, wait_http


def start(tmp_path, workers: int = 2):
    config = tmp_path / "f.yaml"
    config.write_text("routes: []\n")
    proxy, admin, metrics = free_port(), free_port(), free_port()
    env = dict(os.environ, FENDER_PROXY_ADDR=f"127.0.0.1:{proxy}", FENDER_ADMIN_ADDR=f"127.0.0.1:{admin}",
               FENDER_METRICS_ADDR=f"127.0.0.1:{metrics}", FENDER_DATA_DIR=str(tmp_path / "d"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "--config", str(config), "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_http(f"http://127.0.0.1:{metrics}/readyz", proc=proc)
    return proc, proxy


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_sigterm_stops_every_worker_with_exit_0(tmp_path):
    proc, _ = start(tmp_path)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, proc.stderr.read()
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_a_dead_worker_stops_the_rest_and_the_parent_fails(tmp_path):
    proc, proxy = start(tmp_path)
    workers = worker_pids(proc.pid)
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(20) == 1
    assert "stopping the others" in proc.stderr.read()
    time.sleep(0.2)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(f"http://127.0.0.1:{proxy}/", timeout=2)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"a worker still answers: {exc.code}") from exc
    except OSError:
        pass
