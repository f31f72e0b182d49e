"""`fender demo`: a port already taken is one clear line and exit 1, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess

from bench.procs import free_port
from tests.support.processes import FENDER, ROOT


def test_demo_with_its_upstream_port_taken_says_so_and_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, FENDER_PROXY_ADDR=f"127.0.0.1:{free_port()}",
                   FENDER_ADMIN_ADDR=f"127.0.0.1:{free_port()}", FENDER_METRICS_ADDR=f"127.0.0.1:{free_port()}",
                   FENDER_DATA_DIR=str(tmp_path / "d"))
        proc = subprocess.run([FENDER, "demo", "--upstream-port", str(port)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot start" in proc.stderr
