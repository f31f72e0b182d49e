"""The synchronous form of a policy, which lets `compose` fuse neighbours into one layer.

A chain of coroutine layers pays a coroutine frame per policy per request. Yet
on the common path most policies await nothing of their own: a closed breaker,
a bucket that has a token, a timeout that only registers a deadline. Such a
policy is also a `Guard`: `enter` admits the call before it is made, and `exit`
(or `exit_error`) settles it afterwards, both synchronous. `compose` runs a
stretch of guards in one `FusedLayer` (policies.fused), which calls the enters
outermost first, awaits the inner call once, and hands the outcome or the error
to the exits innermost first: what nested layers would do, in one frame.

A guard that needs to await after all says so, and the fused layer awaits on
its behalf: `enter` returns `DEFER` (the request takes the policy's ordinary
async `__call__` around the rest of the chain: a rate limit that must wait for
a token, a full bulkhead), or an exit returns a `Resume` (a retry that has to
make another attempt through the rest of the chain).

Every guard is also an ordinary `Policy`, and its `__call__` is written with the
same `enter`/`exit` methods, so each policy has one implementation.
"""

from __future__ import annotations

from asyncio import Task
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeGuard, runtime_checkable

from policies.base import Call, Outcome, Policy, RequestContext
from policies.clock import Clock

__all__ = ["Guard", "Resume", "DEFER", "is_guard", "fusable", "clock_of"]


class _Defer:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFER"


DEFER: Final = _Defer()


class Resume:
    """An exit's answer when it must await more first: `run(inner)` makes the outcome.

    `inner` is the rest of the chain inside the policy (what its `__call__` would be given).
    """

    __slots__ = ("run",)

    def __init__(self, run: Callable[[Call], Awaitable[Outcome]]) -> None:
        self.run = run


@runtime_checkable
class Guard(Policy, Protocol):
    """A policy that can also admit and settle a call synchronously."""

    clock: Clock | None  # None: `enter` and the exits ignore `now` and `started`
    needs_task: bool  # whether `enter` uses its `task` argument (it is None otherwise)
    # False when `exit` returns the outcome and `exit_error` raises the error, whatever they are:
    # a fused layer then calls neither (a rate limit's work is all in `enter`)
    settles: bool

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> Any:
        """Before the call, at `now`: a token for the exit, or `DEFER`; raises a rejection."""

    def exit(self, ctx: RequestContext, token: Any, started: float, outcome: Outcome) -> Outcome | Resume:
        """After the inner call returned `outcome` (`started` is the `now` of `enter`)."""

    def exit_error(
        self, ctx: RequestContext, token: Any, started: float, error: BaseException
    ) -> Outcome | Resume:
        """After the inner call raised `error`: raises what goes on out, or recovers."""


def is_guard(policy: object) -> TypeGuard[Guard]:
    return isinstance(policy, Guard)


def fusable(guards: Sequence[Guard]) -> bool:
    """Whether the guards can enter at one `now`: they ask one clock, or none."""
    return len({id(guard.clock) for guard in guards if guard.clock is not None}) <= 1


def _no_time() -> float:
    return 0.0


def clock_of(guards: Sequence[Guard]) -> Callable[[], float]:
    """The `now` of fusable guards."""
    return next((guard.clock.now for guard in guards if guard.clock is not None), _no_time)
