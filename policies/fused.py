"""FusedLayer: a stretch of guards (policies.guard) and what they wrap, as one coroutine.

It does what nested layers would do, in the same order: enters outermost
first, then the inner call, then exits innermost first, each exit seeing the
outcome or the error that the guard inside it let out. A guard that defers
gets the rest of the chain through its own `__call__`; an exit that resumes
gets the rest of the chain inside it to await.
"""

from __future__ import annotations

from asyncio import current_task
from collections.abc import Sequence
from typing import Any

from policies.base import Call, Outcome, RequestContext
from policies.guard import DEFER, Guard, Resume, clock_of, fusable

__all__ = ["FusedLayer"]


class FusedLayer:
    __slots__ = ("guards", "inners", "innermost", "now", "needs_task")

    def __init__(self, guards: Sequence[Guard], inners: Sequence[Call]) -> None:
        """`inners[i]` is the rest of the chain inside `guards[i]`; the last one is what they all wrap."""
        if not guards or len(inners) != len(guards):
            raise ValueError("one inner call per guard")
        if not fusable(guards):
            raise ValueError("fused guards share one clock: they enter at one `now`")
        self.guards = tuple(guards)
        self.inners = tuple(inners)
        self.innermost = inners[-1]
        self.now = clock_of(guards)
        # asyncio.current_task() costs a getpid() syscall: ask once, and only if a guard needs it
        self.needs_task = any(guard.needs_task for guard in guards)

    async def __call__(self, ctx: RequestContext) -> Outcome:
        guards = self.guards
        now = self.now()
        task = (ctx.task or current_task()) if self.needs_task else None
        tokens: list[Any] = []
        outcome: Any = None
        error: BaseException | None = None
        try:
            for guard in guards:
                token = guard.enter(ctx, now, task)
                if token is DEFER:
                    outcome = await guard(self.inners[len(tokens)], ctx)
                    break
                tokens.append(token)
            else:
                outcome = await self.innermost(ctx)
        except BaseException as exc:
            error = exc
        i = len(tokens)
        while i:
            i -= 1
            guard = guards[i]
            try:
                if error is None:
                    result = guard.exit(ctx, tokens[i], now, outcome)
                else:
                    result = guard.exit_error(ctx, tokens[i], now, error)
                    error = None
                if type(result) is Resume:
                    result = await result.run(self.inners[i])
                outcome = result
            except BaseException as exc:
                error = exc
        if error is not None:
            try:
                raise error
            finally:
                error = None  # the traceback holds this frame: do not let the frame hold it back
        return outcome  # type: ignore[no-any-return]
