"""`fender run --workers N`: the parent watches its workers."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from bench.procs import free_port
from proxy.workers import make_run_directory
from tests.support.processes import ROOT, wait_http


def start(tmp_path, workers: int = 2):
    ports = free_port(), free_port(), free_port()
    proc = launch(tmp_path, ports, workers)
    wait_http(f"http://127.0.0.1:{ports[2]}/readyz", proc=proc)
    return proc, ports[0]


def launch(tmp_path, ports: tuple[int, int, int], workers: int = 2) -> subprocess.Popen[str]:
    """`fender run --workers N` on these proxy, admin and metrics ports, not waiting for it."""
    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "f.yaml"
    config.write_text("routes: []\n")
    proxy, admin, metrics = ports
    env = dict(os.environ, FENDER_PROXY_ADDR=f"127.0.0.1:{proxy}", FENDER_ADMIN_ADDR=f"127.0.0.1:{admin}",
               FENDER_METRICS_ADDR=f"127.0.0.1:{metrics}", FENDER_DATA_DIR=str(tmp_path / "d"))
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "--config", str(config), "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


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


def test_a_run_removes_the_directories_of_dead_runs_and_never_a_live_ones(tmp_path):
    live, live_lock = make_run_directory(tmp_path)
    dead, dead_lock = make_run_directory(tmp_path)
    os.close(dead_lock)  # as the kernel does when the last process of a run ends, killed or not
    older = tmp_path / "workers-1"  # left by a Fender from before the lock
    older.mkdir()
    (older / "worker-1.json").write_text("{}")
    (tmp_path / "sagas.db").write_text("")
    new, new_lock = make_run_directory(tmp_path)
    try:
        assert sorted(tmp_path.iterdir()) == sorted([live, new, tmp_path / "sagas.db"])
        assert dead.name.startswith("workers-") and new.name.startswith("workers-")
    finally:
        os.close(live_lock)
        os.close(new_lock)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_gone(pid: int) -> None:
    try:
        process = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([process], [], [], 10)[0], f"process {pid} is still alive"
    finally:
        os.close(process)


def test_a_killed_runs_directory_is_removed_at_the_next_start_and_a_live_runs_is_kept(tmp_path):
    data = tmp_path / "d"
    killed, _ = start(tmp_path)
    [killed_dir] = data.glob("workers-*")
    live, _ = start(tmp_path)  # (two Fenders on one data dir, by mistake)
    [live_dir] = set(data.glob("workers-*")) - {killed_dir}
    newer = None
    try:
        workers = worker_pids(killed.pid)
        for pid in [killed.pid, *workers]:  # the supervisor first: it must not clean up after itself
            kill(pid)  # (its workers may be gone already: they stop when it dies)
        killed.wait(10)
        for pid in workers:
            wait_gone(pid)
        assert killed_dir.exists()
        newer, _ = start(tmp_path)
        remaining = set(data.glob("workers-*"))
        assert killed_dir not in remaining and live_dir in remaining and len(remaining) == 2
        assert (live_dir / "run.lock").exists()
    finally:
        for proc in (live, newer):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    assert list(data.glob("workers-*")) == []


def test_a_second_instance_on_the_ports_of_a_running_one_fails_and_the_first_keeps_serving(tmp_path):
    # every worker listens with SO_REUSEPORT: a second `--workers N` Fender could bind next to the
    # first one's sockets and take half its connections, unless the supervisor checks first
    ports = free_port(), free_port(), free_port()
    first = launch(tmp_path / "first", ports)
    second = None
    try:
        wait_http(f"http://127.0.0.1:{ports[2]}/readyz", proc=first)
        second = launch(tmp_path / "second", ports)
        assert second.wait(20) == 1
        assert f"proxy listener 127.0.0.1:{ports[0]}: Address already in use" in second.stderr.read()
        assert worker_pids(second.pid) == []
        assert first.poll() is None
        wait_http(f"http://127.0.0.1:{ports[2]}/readyz", proc=first)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(f"http://127.0.0.1:{ports[0]}/", timeout=2)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404  # (no routes: the first Fender answers)
    finally:
        for proc in (second, first):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)


def test_the_workers_of_a_killed_supervisor_stop_and_free_the_port(tmp_path):
    # (an operator's kill -9, an OOM kill): workers left serving would share the port with the
    # next run's, an old config next to the new one
    proc, proxy = start(tmp_path)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in workers:
            wait_gone(pid)
    finally:
        for pid in workers:
            kill(pid)
    with socket.socket() as sock:  # (no SO_REUSEPORT: any listener left on the port refuses it)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", proxy))


def test_a_reload_signal_goes_only_to_a_living_supervisor(monkeypatch):
    # (after the supervisor died, a draining worker's parent is init or a container's pid 1,
    # and SIGHUP there would reload systemd, not Fender's workers)
    import proxy.workers

    assert proxy.workers.live_supervisor() is None  # not a worker at all
    monkeypatch.setattr(proxy.workers, "_supervisor", os.getppid())
    assert proxy.workers.live_supervisor() == os.getppid()
    monkeypatch.setattr(proxy.workers, "_supervisor", os.getppid() + 100_000)  # (a parent gone: reparented)
    assert proxy.workers.live_supervisor() is None
