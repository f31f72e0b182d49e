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

A guard may also hand the fused layer its common case as a few lines of source
(`Inline`), which the layer runs in place of the calls to `enter` and `exit`:
under CPython a call costs more than what most guards do on the common path
(README: Benchmarks). The lines answer only the case they are sure of and
call the method otherwise, so the method stays the whole definition; the
fused layer's property test holds the two together.
"""

from __future__ import annotations

from asyncio import Task
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeGuard, runtime_checkable

from policies.base import Call, Outcome, Policy, RequestContext
from policies.clock import Clock

__all__ = ["Guard", "Inline", "Inlinable", "Coverable", "Resume", "DEFER", "is_guard", "fusable", "clock_of"]


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
    defers: bool  # whether `enter` may return DEFER
    resumes: bool  # whether an exit may return a Resume
    recovers: bool  # whether `exit_error` may answer with an outcome (a fallback)

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> Any:
        """Before the call, at `now`: a token for the exit, or `DEFER`; raises a rejection."""

    def exit(self, ctx: RequestContext, token: Any, started: float, outcome: Outcome) -> Outcome | Resume:
        """After the inner call returned `outcome` (`started` is the `now` of `enter`)."""

    def exit_error(
        self, ctx: RequestContext, token: Any, started: float, error: BaseException
    ) -> Outcome | Resume:
        """After the inner call raised `error`: raises what goes on out, or recovers.

        One that raises `error` itself drops its own reference first (`try: raise error`,
        `finally: del error`): the traceback holds this frame, and a frame that holds the
        exception whose traceback holds it is a reference cycle, which would keep the
        request's frames, its connection and the client's task for the cyclic collector.
        """


@dataclass(frozen=True)
class Inline:
    """A guard's common case as source for a fused layer (policies.fused).

    The lines are Python statements. They share the layer's `ctx`, `now`,
    `task`, `outcome`, `error` and the builtins; every other name in them is
    the guard's own (the layer renames them apart from other guards'): `token`,
    `enter`, `exit` and `guard` (the guard's methods and the guard itself), the
    names in `names`, and any local they assign. `enter` sets `token` to what
    `enter(ctx, now, task)` would return (unless the guard neither defers nor
    settles: then nothing reads it); `exit`, given `outcome`, sets `outcome` to
    what `exit(ctx, token, now, outcome)` would return; `exit_error`, given
    `error`, raises what goes on out or sets `outcome`, as `exit_error` would.
    An empty string leaves that step to the method. A name in `names` for an
    int or a float is written into the lines as that number.
    """

    enter: str = ""
    exit: str = ""
    exit_error: str = ""
    names: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Inlinable(Protocol):
    def inline(self) -> Inline:
        """This guard's common case as source, as it is configured now."""


@runtime_checkable
class Coverable(Protocol):
    """A timeout: it does nothing but cut off what it wraps `duration` after `enter`.

    In a fused layer a shorter one further in cuts the call off first, so
    while the layer awaits only inside that one, this one's timer is never
    needed. The layer then enters it with `inline_covered()`, which only
    narrows `ctx.deadline`, and awaits anything else inside it through
    `within` (a retry's next attempts, a deferring guard's own layer). That
    holds only if no guard in between can answer for the shorter one's
    error (`recovers`): were the loop late past both deadlines, the answer
    would stand where this timeout would have failed the call. One difference
    remains: a call slow to unwind once the shorter one cancelled it is not
    cut short at this one's deadline, though it still fails with this one's
    error (TimeoutPolicy.overran).
    """

    duration: float

    def inline_covered(self) -> Inline:
        """Enter and leave with no timer; `enter` sets `deadline`, when this timeout runs out."""

    def within(self, ctx: RequestContext, deadline: float, awaitable: Awaitable[Outcome]) -> Awaitable[Outcome]:
        """`awaitable`, cut off at `deadline` as this timeout would have cut off the call."""


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
