"""Saga coordinator throughput: three-step sagas per second on the SQLite journal, and the
overhead per step against the same three calls made directly through the proxy."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from bench.wrk import WrkResult, run_wrk

__all__ = ["SAGA_STEPS", "probe_saga_api", "run_saga_bench", "saga_body", "wrk_post_script"]

SAGA_ROUTE = "full"
SAGA_STEPS = ("reserve", "charge", "ship")
WAIT_S = 10


def saga_body() -> dict[str, Any]:
    return {
        "input": {"sku": "A1", "amount": 10},
        "steps": [
            {
                "name": step,
                "action": {"route": SAGA_ROUTE, "method": "POST", "path": f"/{step}",
                           "body": {"sku": "{{input.sku}}"}},
                "compensation": {"route": SAGA_ROUTE, "method": "DELETE", "path": f"/{step}"},
            }
            for step in SAGA_STEPS
        ],
    }


def wrk_post_script(path: Path, body: str, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def probe_saga_api(admin_port: int) -> str | None:
    """None when one saga completes through the admin API; otherwise why not."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=WAIT_S + 5)
        conn.request("POST", f"/v1/sagas?wait={WAIT_S}", body=json.dumps(saga_body()),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        conn.close()
    except OSError as exc:
        return f"admin listener not reachable: {exc}"
    if resp.status in (404, 405, 501):
        return f"no saga API (POST /v1/sagas answered {resp.status})"
    if resp.status not in (200, 201, 202):
        return f"POST /v1/sagas answered {resp.status}: {text[:200]}"
    try:
        status = json.loads(text).get("status")
    except ValueError:
        return f"POST /v1/sagas answered non-JSON: {text[:200]}"
    if status != "completed":
        return f"probe saga ended {status!r}, not 'completed': {text[:300]}"
    return None


def run_saga_bench(workdir: Path, *, admin_port: int, proxy_port: int, duration: int,
                   concurrencies: tuple[int, ...] = (1, 16)) -> dict[str, Any]:
    """sagas/s and p50 per saga, the same calls made directly, and the overhead per step."""
    reason = probe_saga_api(admin_port)
    if reason is not None:
        return {"available": False, "reason": reason}
    saga_script = wrk_post_script(workdir / "saga.lua", json.dumps(saga_body()),
                                  {"Content-Type": "application/json"})
    # what one step sends when it is made directly: same method, body and headers
    direct_script = wrk_post_script(
        workdir / "direct.lua", json.dumps({"sku": "A1"}),
        {"Content-Type": "application/json", "Idempotency-Key": "bench:reserve:action"},
    )
    result: dict[str, Any] = {"available": True, "steps": len(SAGA_STEPS), "by_concurrency": {}}
    for conc in concurrencies:
        saga: WrkResult = run_wrk(f"http://127.0.0.1:{admin_port}/v1/sagas?wait={WAIT_S}",
                                  connections=conc, duration=duration, script=str(saga_script),
                                  timeout_s=WAIT_S + 2)
        direct: WrkResult = run_wrk(f"http://127.0.0.1:{proxy_port}/reserve", connections=conc,
                                    duration=duration, script=str(direct_script),
                                    headers={"Host": SAGA_ROUTE})
        steps = len(SAGA_STEPS)
        result["by_concurrency"][conc] = {
            "sagas_per_s": round(saga.rps, 1),
            "saga_p50_us": saga.p50_us,
            "saga_p99_us": saga.p99_us,
            "saga_errors": saga.errors,
            "direct_calls_per_s": round(direct.rps, 1),
            "direct_p50_us": direct.p50_us,
            "direct_errors": direct.errors,
            # what the coordinator adds to each step's latency: journal writes, templating,
            # bookkeeping (meaningful at c=1; at higher concurrency queueing is in it too)
            "overhead_per_step_us": round(saga.p50_us / steps - direct.p50_us, 1),
            # and to its cost: time per step at saturation minus time per direct call
            "cost_per_step_us": (round(1e6 / (saga.rps * steps) - 1e6 / direct.rps, 1)
                                 if saga.rps and direct.rps else None),
            "steps_per_s_over_direct": round(saga.rps * steps / direct.rps, 3) if direct.rps else None,
        }
    result["not_completed"] = count_not_completed(admin_port)
    return result


def count_not_completed(admin_port: int) -> dict[str, int | None]:
    """Sagas of the run that ended otherwise than completed (the first page of each status)."""
    out: dict[str, int | None] = {}
    for status in ("compensated", "failed", "running", "compensating"):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
            conn.request("GET", f"/v1/sagas?status={status}&limit=100")
            resp = conn.getresponse()
            body = json.loads(resp.read() or b"{}") if resp.status == 200 else {}
            conn.close()
            items = body.get("items") if isinstance(body, dict) else None
            out[status] = len(items) if isinstance(items, list) else None
        except (OSError, ValueError):
            out[status] = None
    return out
