"""`python -m bench.chain`: what each policy costs per call, in-process, without sockets.

Every chain runs against a terminal that suspends once on the event loop (as a real
upstream call does), on uvloop, one call at a time; the figure is microseconds per call.
Compare with the CPU per request that `python -m bench.run` measures in the running proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from config.factory import PolicyFactory
from config.loader import load_text
from policies.base import Outcome, RequestContext, compose

CHAINS = {
    "empty": "[]",
    "timeout": "[{timeout: 5s}]",
    "circuit_breaker": "[{circuit_breaker: {consecutive_failures: 5}}]",
    "retry": "[{retry: {attempts: 3}}]",
    "rate_limit": "[{rate_limit: {rate: 1000000000/s}}]",
    "bulkhead": "[{bulkhead: {max_concurrent: 1000}}]",
    "full": "[{rate_limit: {rate: 1000000000/s}}, {timeout: 5s}, {retry: {attempts: 3}},"
    " {circuit_breaker: {consecutive_failures: 5}}, {timeout: 1s}]",
}
_OK = Outcome(200, {})


async def measure(calls: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()

    async def terminal(ctx: RequestContext) -> Outcome:
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future
        return _OK

    results = {}
    for name, chain in CHAINS.items():
        config = load_text(f"routes: [{{name: r, upstream: 'http://x', chain: {chain}}}]").config
        policies = PolicyFactory().build(config)["r"].policies
        call = compose([p for _, p in policies], terminal)
        started = time.perf_counter()
        for _ in range(calls):
            await call(RequestContext("r", "GET", {}))
        results[name] = 1e6 * (time.perf_counter() - started) / calls
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()
    try:
        import uvloop

        results = uvloop.run(measure(args.calls))
    except ImportError:
        results = asyncio.run(measure(args.calls))
    base = results["empty"]
    for name, us in results.items():
        print(f"{name:16s} {us:6.2f} us/call  (+{us - base:5.2f} over empty)")


if __name__ == "__main__":
    main()
