"""`python -m bench.chain`: what each policy costs per call, in-process, without sockets.

Every chain runs against a terminal that suspends once on the event loop (as a real
upstream call does), on uvloop, one call at a time; the figure is microseconds per call.
The chains take turns over `--repeats` rounds, so a burst of noise on a shared machine
hits one round of each rather than one chain; the minimum is the figure to compare
(the median shows how noisy the machine was). Compare with the CPU per request that
`python -m bench.run` measures in the running proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from config.factory import PolicyFactory
from config.loader import load_text
from policies.base import Call, Outcome, RequestContext, compose

CHAINS = {
    "empty": "[]",
    "timeout": "[{timeout: 5s}]",
    "circuit_breaker": "[{circuit_breaker: {consecutive_failures: 5}}]",
    "retry": "[{retry: {attempts: 3}}]",
    "rate_limit": "[{rate_limit: {rate: 1000000000/s}}]",
    "bulkhead": "[{bulkhead: {max_concurrent: 1000}}]",
    "full": "[{rate_limit: {rate: 1000000000/s}}, {timeout: 5s}, {retry: {attempts: 3}},"
    " {circuit_breaker: {consecutive_failures: 5, open_for: 30s}}, {timeout: 1s}]",
}
_OK = Outcome(200, {})


def build(chain: str, terminal: Call) -> Call:
    config = load_text(f"routes: [{{name: r, upstream: 'http://x', chain: {chain}}}]").config
    policies = PolicyFactory().build(config)["r"].policies
    return compose([p for _, p in policies], terminal)


async def measure(calls: int, repeats: int, give_task: bool) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task() if give_task else None

    async def terminal(ctx: RequestContext) -> Outcome:
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future
        return _OK

    chains = {name: build(chain, terminal) for name, chain in CHAINS.items()}
    results: dict[str, list[float]] = {name: [] for name in chains}
    for _ in range(repeats):
        for name, call in chains.items():
            started = time.perf_counter()
            for _ in range(calls):
                await call(RequestContext("r", "GET", {}, task=task))
            results[name].append(1e6 * (time.perf_counter() - started) / calls)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per chain per round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    parser.add_argument("--task", action="store_true",
                        help="requests carry their task, as the proxy's do (Exchange.task)")
    args = parser.parse_args()
    try:
        import uvloop

        results = uvloop.run(measure(args.calls, args.repeats, args.task))
    except ImportError:
        results = asyncio.run(measure(args.calls, args.repeats, args.task))
    base = min(results["empty"])
    base_median = statistics.median(results["empty"])
    print(f"{'':16s} {'min':>6s}          {'median':>6s}")
    for name, runs in results.items():
        best, median = min(runs), statistics.median(runs)
        print(f"{name:16s} {best:6.2f} (+{best - base:4.2f})  {median:6.2f} (+{median - base_median:4.2f})"
              "  us/call")


if __name__ == "__main__":
    main()
