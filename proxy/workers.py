"""`fender run --workers N`: N processes share the proxy port through SO_REUSEPORT.

Worker 0 also serves the admin and metrics listeners and the saga coordinator, so
there is one journal driver and one place to reload from the API; the parent
forwards SIGTERM/SIGINT/SIGHUP to every worker. Policy state is per worker: a
local token bucket of `rate: 100/s` admits up to N x 100/s in total; use
`backend: redis` for a limit that holds across workers (and replicas). Worker 0's
/metrics counts every worker's requests (`proxy/telemetry/peers.py`), and a breaker reset
on its admin API reaches the others (`proxy/breaker_resets.py`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from config.settings import Settings

__all__ = ["WORKERS_DIR_ENV", "WORKER_INDEX_ENV", "replace_file", "run_workers", "shared_directory"]

WORKERS_DIR_ENV = "FENDER_WORKERS_DIR"  # the run's files shared between workers (metrics, breaker resets)
WORKER_INDEX_ENV = "FENDER_WORKER_INDEX"


def shared_directory(settings: Settings) -> tuple[Path, int] | None:
    """This worker's share of `--workers N`: the run's shared directory and its index (0 serves
    the admin API and /metrics); None when running alone or without the directory."""
    directory = os.environ.get(WORKERS_DIR_ENV)
    if not directory or settings.workers < 2:
        return None
    return Path(directory), int(os.environ.get(WORKER_INDEX_ENV, "0"))


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a reader sees the old file or the new, never half); OSError."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def run_workers(settings: Settings) -> int:
    """Fork the workers and watch them: the first one to exit stops them all."""
    # the files the workers share in this run: metrics for worker 0 (proxy/telemetry/peers.py),
    # breaker resets from it (proxy/breaker_resets.py)
    # (a new directory each run: in a container the supervisor is always pid 1, and a run
    # that was killed leaves its files behind, which must not count for this one)
    shared: str | None = None
    try:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        shared = tempfile.mkdtemp(prefix="workers-", dir=settings.data_dir)
    except OSError as exc:
        print(f"fender: cannot create a directory in {settings.data_dir} ({exc.strerror or exc}): "
              "/metrics will count worker 0's requests only, and a breaker reset will close worker 0's "
              "breaker only", file=sys.stderr)
    else:
        os.environ[WORKERS_DIR_ENV] = shared
    try:
        return _supervise(settings)
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


def _supervise(settings: Settings) -> int:
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    # handlers before forking, so that a signal in the first instants is not lost or fatal
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            from proxy.cli import remember_signal

            # until the worker's loop takes them over, signals are remembered: SIG_DFL would
            # kill a worker stopped while it starts (and the parent would report a failure),
            # SIG_IGN would lose a reload that reached it before its loop ran
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, remember_signal)
            os.environ[WORKER_INDEX_ENV] = str(index)
            os._exit(_child(settings, index))
        children[pid] = index
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0 or not stopping:
            status = 1
            if not stopping:
                # a worker died on its own: a half-running sidecar is worse than a restarted one
                print(f"fender: worker {index} exited ({exit_code}); stopping the others", file=sys.stderr)
                forward(signal.SIGTERM, None)
    return status


def _child(settings: Settings, index: int) -> int:
    from proxy.cli import _run_loop

    if index > 0:
        # only worker 0 serves admin, metrics and sagas; the others run the data plane
        settings = settings.model_copy(update={"admin_addr": "", "metrics_addr": ""})
    try:
        return _run_loop(settings)
    except Exception as exc:  # a worker that cannot start must say why
        print(f"worker {index}: {exc}", file=sys.stderr)
        return 1
