"""`fender run --workers N`: N processes share the proxy port through SO_REUSEPORT.

Worker 0 also serves the admin and metrics listeners and the saga coordinator, so
there is one journal driver and one place to reload from the API; the parent
forwards SIGTERM/SIGINT/SIGHUP to every worker, and the workers stop when it dies. Policy state is per worker: a
local token bucket of `rate: 100/s` admits up to N x 100/s in total; use
`backend: redis` for a limit that holds across workers (and replicas). Worker 0's
/metrics counts every worker's requests (`proxy/telemetry/peers.py`), and a breaker reset
on its admin API reaches the others (`proxy/breaker_resets.py`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from config.settings import Settings

__all__ = ["WORKERS_DIR_ENV", "WORKER_INDEX_ENV", "live_supervisor", "make_run_directory", "replace_file", "run_workers",
           "shared_directory"]

WORKERS_DIR_ENV = "FENDER_WORKERS_DIR"  # the run's files shared between workers (metrics, breaker resets)
WORKER_INDEX_ENV = "FENDER_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1  # prctl(2) option, from <linux/prctl.h>
_supervisor: int | None = None  # in a worker: the pid of the process that forked it
_RUN_LOCK = "run.lock"  # in a run's directory, flock-ed by its processes for as long as one lives


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
    """Fork the workers and watch them: the first one to exit stops them all. ConfigInvalid, or
    OSError if a listener address is taken (by another Fender's workers, say), before any fork."""
    from config.loader import load_file
    from proxy.app import check_listeners_free, resolve_config_path

    check_listeners_free(settings, load_file(resolve_config_path(settings.config)).config.listeners)
    # the files the workers share in this run: metrics for worker 0 (proxy/telemetry/peers.py),
    # breaker resets from it (proxy/breaker_resets.py)
    # (a new directory each run: in a container the supervisor is always pid 1, and a run
    # that was killed leaves its files behind, which must not count for this one)
    run: tuple[Path, int] | None = None
    try:
        run = make_run_directory(Path(settings.data_dir))
    except OSError as exc:
        print(f"fender: cannot create a directory in {settings.data_dir} ({exc.strerror or exc}): "
              "/metrics will count worker 0's requests only, and a breaker reset will close worker 0's "
              "breaker only", file=sys.stderr)
    else:
        os.environ[WORKERS_DIR_ENV] = str(run[0])
    try:
        return _supervise(settings)
    finally:
        if run is not None:
            shutil.rmtree(run[0], ignore_errors=True)
            os.close(run[1])


def make_run_directory(data_dir: Path) -> tuple[Path, int]:
    """A new `workers-*` directory in `data_dir` for one run, and the descriptor that holds its lock
    (close it when the run is over); first removes those of runs no longer alive. OSError."""
    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_runs(data_dir)
    # made under another name and renamed once locked: a `workers-*` directory of this Fender
    # always has its lock held while its run lives, even in the instant after it is made
    building = Path(tempfile.mkdtemp(prefix=".workers-", dir=data_dir))
    lock = os.open(building / _RUN_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        # the workers inherit the descriptor when forked: a directory they still use stays
        # locked even if the supervisor alone was killed; the kernel drops the lock with the last
        # process of the run, however it ends
        fcntl.flock(lock, fcntl.LOCK_EX)
        directory = building.with_name(building.name.removeprefix("."))
        os.rename(building, directory)
    except OSError:
        os.close(lock)
        shutil.rmtree(building, ignore_errors=True)
        raise
    return directory, lock


def _remove_dead_runs(data_dir: Path) -> None:
    """Remove what killed runs left: `workers-*` directories whose lock no process holds."""
    for directory in data_dir.glob("workers-*"):
        if directory.is_dir() and not _alive(directory):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(directory: Path) -> bool:
    try:
        lock = os.open(directory / _RUN_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False  # made by a Fender from before the lock (this one's have it from the start)
    except OSError:
        return True  # cannot tell: leave it be
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # (BlockingIOError: a process of that run holds it)
        return True
    finally:
        os.close(lock)  # (which releases the lock, if taken)
    return False


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
    supervisor = os.getpid()
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            from proxy.cli import remember_signal

            # until the worker's loop takes them over, signals are remembered: SIG_DFL would
            # kill a worker stopped while it starts (and the parent would report a failure),
            # SIG_IGN would lose a reload that reached it before its loop ran
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, remember_signal)
            _stop_with(supervisor)
            global _supervisor
            _supervisor = supervisor
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


def live_supervisor() -> int | None:
    """In a worker of `--workers N`, its supervisor's pid while the supervisor lives; else None.

    (A worker draining after its supervisor died has a new parent: init, or a container's
    pid 1. A signal meant for the supervisor must not go there: SIGHUP reloads systemd.)"""
    return _supervisor if _supervisor is not None and os.getppid() == _supervisor else None


def _stop_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (the graceful drain) when the supervisor dies,
    even by SIGKILL: workers left behind would keep serving an old config next to the next run's
    workers on the same ports. Linux only (PR_SET_PDEATHSIG); elsewhere they outlive a killed
    supervisor."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0))
        except (OSError, AttributeError):  # (no prctl in this libc)
            pass
    if os.getppid() != supervisor:  # it died before the prctl: no signal will come
        os._exit(0)


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
