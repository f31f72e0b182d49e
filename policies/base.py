"""The one interface every policy implements, and the values that flow through it.

A chain is built once per route per config version (`compose`); per request
there is one small `RequestContext`. The innermost call (the proxy's forwarder)
returns an `Outcome` for every upstream response, 5xx included, and raises one of
`policies.errors` only when there is no response at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from policies.events import Event, EventBus

__all__ = ["Outcome", "RequestContext", "Call", "Policy", "compose", "NO_EVENTS"]


class Outcome:
    """An upstream (or fallback) response head, with a handle on its body.

    `response` is opaque to policies: the proxy streams it to the client.
    `body` is set when the whole body is already known (fallbacks, saga calls).
    `release()` must be called when a policy drops the outcome (to retry),
    so the upstream connection goes back to its pool or is closed.
    """

    __slots__ = ("status", "headers", "response", "body", "_release")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        response: Any = None,
        body: bytes | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.response = response
        self.body = body
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __repr__(self) -> str:
        return f"Outcome(status={self.status})"


class RequestContext:
    """Per-request state shared by the policies of one chain."""

    __slots__ = (
        "route",
        "method",
        "headers",
        "client_ip",
        "attempts",
        "replayable",
        "deadline",
        "request",
        "span",
        "bus",
        "extra",
        "task",
    )

    def __init__(
        self,
        route: str,
        method: str,
        headers: Mapping[str, str],
        *,
        client_ip: str | None = None,
        replayable: bool = True,
        request: Any = None,
        bus: EventBus | None = None,
        task: Any = None,
    ) -> None:
        self.route = route
        self.method = method
        # case-insensitive in practice (aiohttp's CIMultiDict); policies use lower-case names
        self.headers = headers
        self.client_ip = client_ip
        self.attempts = 0  # incremented by the forwarder for every upstream attempt
        self.replayable = replayable  # False once the request body was streamed
        self.deadline: float | None = None  # absolute Clock.now() of the total timeout
        self.request = request  # opaque: what the forwarder needs to send the call
        self.span: Any = None  # tracing slot, owned by telemetry
        self.bus = bus if bus is not None else NO_EVENTS
        self.extra: dict[str, Any] | None = None
        # the asyncio task that runs the chain, when the caller knows it (the proxy's `Exchange.task`):
        # timeouts need it, and asyncio.current_task() costs a getpid() syscall per call
        self.task = task

    def emit(self, event: Event) -> None:
        self.bus.emit(event, self)


NO_EVENTS = EventBus()

Call = Callable[[RequestContext], Awaitable[Outcome]]


class Policy(Protocol):
    """Wraps the next call. Returns its Outcome or raises a `policies.errors` type."""

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome: ...


def compose(policies: Sequence[Policy], terminal: Call) -> Call:
    """Bind a chain once: `policies[0]` is outermost, `terminal` innermost.

    Neighbours that are guards (policies.guard) on one clock become one
    `FusedLayer`, chained by its `run` (`fused_layer(call)` finds the layer): one
    coroutine per request for the whole stretch. Any other
    policy is a `partial(policy, inner)`: calling it returns the policy's own
    coroutine, so a layer costs one coroutine per request, not two.
    """
    from policies.fused import FusedLayer  # (imports this module)
    from policies.guard import fusable, is_guard

    # layers[i] runs policies[i:] around the terminal; built inside out, so that a
    # guard that defers or resumes has the rest of the chain ready
    layers: list[Call] = [terminal] * (len(policies) + 1)
    for i in reversed(range(len(policies))):
        policy = policies[i]
        if not is_guard(policy):
            layers[i] = partial(policy, layers[i + 1])
            continue
        guards = [policy]
        for following in policies[i + 1:]:
            if not is_guard(following) or not fusable([*guards, following]):
                break
            guards.append(following)
        if len(guards) == 1:  # a lone guard is cheaper as its own layer than as a fused one
            layers[i] = partial(policy, layers[i + 1])
        else:
            layers[i] = FusedLayer(guards, layers[i + 1:i + 1 + len(guards)]).run
    return layers[0]
