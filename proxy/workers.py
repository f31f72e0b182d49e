"""`fender run --workers N`: N processes share the proxy port through SO_REUSEPORT.

Worker 0 also serves the admin and metrics listeners and the saga coordinator, so
there is one journal driver and one place to reload from the API; the parent
forwards SIGTERM/SIGINT/SIGHUP to every worker. Policy state is per worker: a
local token bucket of `rate: 100/s` admits up to N x 100/s in total; use
`backend: redis` for a limit that holds across workers (and replicas).
"""

from __future__ import annotations

import os
import signal
import sys

from config.settings import Settings

__all__ = ["run_workers"]


def run_workers(settings: Settings) -> int:
    children: list[int] = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            os.environ["FENDER_WORKER_INDEX"] = str(index)
            code = _child(settings, index)
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, code = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
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
