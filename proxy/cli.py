"""`fender run | check | schema | version | demo` (SPEC section 2)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = ["main"]


def _version() -> str:
    try:
        return version("fender")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # (here, where a closed pipe is caught, not at exit)
        return code
    except BrokenPipeError:  # `fender schema | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fender", description="A resilience sidecar")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the proxy, admin and metrics listeners")
    run.add_argument("--config", help="config file (default: $FENDER_CONFIG or config/fender.yaml)")
    run.add_argument("--workers", type=int, help="worker processes sharing the ports (SO_REUSEPORT)")
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("path")
    sub.add_parser("schema", help="print the JSON Schema of the config file")
    sub.add_parser("version", help="print the version")
    demo = sub.add_parser("demo", help="run a failing demo upstream and Fender in front of it")
    demo.add_argument("--upstream-port", type=int, default=18080)
    args = parser.parse_args(argv)

    if args.command == "version":
        print(_version())
        return 0
    if args.command == "schema":
        from config.models import FenderConfig

        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **FenderConfig.model_json_schema()}
        print(json.dumps(schema, indent=2))
        return 0
    if args.command == "check":
        return _check(args.path)
    if args.command == "demo":
        from proxy.demo import run_demo

        return int(run_demo(args.upstream_port))
    return _run(args.config, args.workers)


def _check(path: str) -> int:
    from config.loader import ConfigInvalid, load_file

    try:
        loaded = load_file(path)
    except ConfigInvalid as exc:
        for issue in exc.errors:
            print(str(issue))
        return 1
    from pydantic import ValidationError

    from config.checks import warnings
    from config.settings import Settings

    redis_configured: bool | None = None
    settings_problems: list[str] = []
    try:
        redis_configured = bool(Settings().redis_url)
    except ValidationError as exc:
        # the config is what is checked (its exit code), but `fender run` would refuse these
        settings_problems = _settings_errors(exc)
        if not any(line.startswith("FENDER_REDIS_URL:") for line in settings_problems):
            redis_configured = bool(os.environ.get("FENDER_REDIS_URL"))
    found = warnings(loaded.config, redis_configured=redis_configured)
    for issue in found:
        print(f"warning: {issue}")
    for line in settings_problems:
        print(f"warning: {line} (`fender run` refuses to start with it)")
    print(f"{path}: ok ({len(loaded.config.routes)} routes, hash {loaded.hash})", file=sys.stderr)
    return 0


def _settings_errors(exc: ValidationError) -> list[str]:
    """One `FENDER_<NAME>: <message>` line per bad setting (the messages never echo the value)."""
    return [f"FENDER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_url=False)]


def _run(config: str | None, workers: int | None) -> int:
    from pydantic import ValidationError

    from config.loader import ConfigInvalid
    from config.settings import Settings
    from proxy.logs import configure_logging
    from saga.store import StoreOpenFailed

    try:
        settings = Settings.from_cli(config=config, workers=workers)
    except ValidationError as exc:
        for line in _settings_errors(exc):
            print(line, file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    try:
        if settings.workers > 1:
            from proxy.workers import run_workers

            return run_workers(settings)
        return _run_loop(settings)
    except ConfigInvalid as exc:
        for issue in exc.errors:
            print(str(issue), file=sys.stderr)
        return 1
    except OSError as exc:  # most often: a listener address already in use
        print(f"fender: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except StoreOpenFailed as exc:
        print(f"fender: cannot start: {exc}", file=sys.stderr)
        return 1


_early_signals: set[int] = set()


def remember_signal(signum: int, _frame: object) -> None:
    """A signal handler for before the event loop runs: `serve` acts on it once it started
    (SIGTERM/SIGINT stop, SIGHUP reloads)."""
    _early_signals.add(signum)


def _run_loop(settings: object) -> int:
    try:
        import uvloop
    except ImportError:  # optional: plain asyncio works, just slower
        return asyncio.run(serve(settings))
    return int(uvloop.run(serve(settings)))


async def serve(settings: object) -> int:
    from config.settings import Settings
    from proxy.app import FenderApp
    from proxy.assemble import assemble

    assert isinstance(settings, Settings)
    app = FenderApp(settings)
    app.load_initial()  # raises ConfigInvalid before anything listens
    assemble(app)
    await app.start()
    _settle_heap()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app.reload("sighup")))
    if _early_signals & {signal.SIGTERM, signal.SIGINT}:
        stopping.set()
    elif signal.SIGHUP in _early_signals:
        await app.reload("sighup")  # the file may have changed after this worker loaded it
    await stopping.wait()
    await app.drain_and_stop()
    return 0


def _settle_heap() -> None:
    """Keep the cyclic garbage collector off the request path.

    Each request allocates and frees containers (coroutines, frames, dicts) by the
    dozen. With CPython's default threshold of 700 a young collection ran every few
    requests under load, and every tenth of those walked everything imported at start
    too: 6 % of the CPU at 256 connections, and the p99 there doubled (README:
    Benchmarks). Freezing what start-up built takes it out of every later pass; the
    higher threshold still bounds uncollected cyclic garbage to a few thousand objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
    _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand the pages start-up freed (config validation, schema building) back to the OS.

    glibc keeps a freed page mapped unless it is at the top of the heap; `malloc_trim`
    releases the rest. That is about 1 MB of a 60 MB idle goal (README: Benchmarks).
    Elsewhere (musl, macOS) there is no such call and nothing to do.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


if __name__ == "__main__":
    sys.exit(main())
