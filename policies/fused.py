"""FusedLayer: a stretch of guards (policies.guard) and what they wrap, as one coroutine.

It does what nested layers would do, in the same order: enters outermost
first, then the inner call, then exits innermost first, each exit seeing the
outcome or the error that the guard inside it let out. A guard that defers
gets the rest of the chain through its own `__call__`; an exit that resumes
gets the rest of the chain inside it to await.

The coroutine is generated for the stretch when it is built: the nested
`try` blocks that nested layers would have, unrolled into one function whose
guard methods are bound names. A loop over the guards does the same with a
list of tokens, an index and a test per step, which cost the full chain
about a fifth of what its policies cost (instructions counted with callgrind,
README: Benchmarks); the loop is kept for stretches too long to nest.

The generated form also leaves out what a guard says it never needs: the
DEFER test of a guard that never defers, the Resume test of one that never
resumes, the block of one whose exits do nothing; and where a guard offers
its common case as source (policies.guard: Inline), those lines stand in for
its method calls.
"""

from __future__ import annotations

import ast
import builtins
import textwrap
from asyncio import current_task
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import MethodType
from typing import Any

from policies.base import Call, Outcome, RequestContext
from policies.guard import DEFER, Coverable, Guard, Inlinable, Inline, Resume, clock_of, fusable

__all__ = ["FusedLayer", "fused_layer"]

# CPython allows 20 nested blocks in one function; each guard takes one
MAX_GENERATED = 12


class FusedLayer:
    __slots__ = ("guards", "inners", "innermost", "now", "needs_task", "source", "_function")

    def __init__(self, guards: Sequence[Guard], inners: Sequence[Call], *, generate: bool = True) -> None:
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
        self.source = ""
        generated = generate and len(self.guards) <= MAX_GENERATED
        self._function: Callable[..., Coroutine[Any, Any, Outcome]] = (
            self._generated() if generated else FusedLayer._loop
        )

    @property
    def run(self) -> Callable[[RequestContext], Coroutine[Any, Any, Outcome]]:
        """The layer's coroutine function; `compose` chains it itself, one call less than `self`.

        Made on request rather than kept: a layer that held its own bound method would be
        a reference cycle, left after a reload for the cyclic collector (which Fender keeps
        away from the objects built at start-up: proxy.cli).
        """
        return MethodType(self._function, self)

    def __call__(self, ctx: RequestContext) -> Coroutine[Any, Any, Outcome]:
        return self._function(self, ctx)

    def _generated(self) -> Callable[..., Coroutine[Any, Any, Outcome]]:
        names: dict[str, Any] = {
            "DEFER": DEFER, "Resume": Resume, "now_": self.now, "current_task": current_task,
            "innermost": self.innermost,
        }
        covered = _covered(self.guards)
        inlines = []
        for i, guard in enumerate(self.guards):
            if i in covered:
                assert isinstance(guard, Coverable)
                inline = guard.inline_covered()
                names[f"within_{i}"] = guard.within
            else:
                inline = guard.inline() if isinstance(guard, Inlinable) else Inline()
            inlines.append(inline)
            names.update({f"guard_{i}": guard, f"inner_{i}": self.inners[i], f"enter_{i}": guard.enter,
                          f"exit_{i}": guard.exit, f"exit_error_{i}": guard.exit_error})
            names.update({f"{name}_{i}": value for name, value in inline.names.items()})
        task = "ctx.task or current_task()" if self.needs_task else "None"
        lines = ["async def run(self, ctx):", "    now = now_()", f"    task = {task}"]
        lines += _nested(self.guards, inlines, covered, 0, "    ")
        lines.append("    return outcome")
        self.source = "\n".join(lines)
        exec(compile(self.source, f"<fused layer of {len(self.guards)} guards>", "exec"), names)
        return names.pop("run")  # type: ignore[no-any-return]  # (left in its globals, a cycle)

    async def _loop(self, ctx: RequestContext) -> Outcome:
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


def _nested(guards: Sequence[Guard], inlines: Sequence[Inline], covered: set[int], i: int, pad: str) -> list[str]:
    """Guard `i` around the rest: what `guard_{i}.__call__(inner_{i}, ctx)` does, with its methods."""
    guard, inline = guards[i], inlines[i]
    settles = guard.settles  # if not, its exits hand on what they get: no block for them
    body_pad = pad + ("    " if guard.defers else "")
    inner_pad = body_pad + ("    " if settles else "")
    inside = (_nested(guards, inlines, covered, i + 1, inner_pad) if i + 1 < len(guards)
              else [f"{inner_pad}outcome = await innermost(ctx)"])

    def awaiting(awaitable: str) -> str:  # what this guard awaits, inside a covered timeout's `within`
        return f"await within_{i - 1}(ctx, deadline_{i - 1}, {awaitable})" if i - 1 in covered else f"await {awaitable}"

    lines = _lines(inline, inline.enter, i, pad) if inline.enter else [f"{pad}token_{i} = enter_{i}(ctx, now, task)"]
    if guard.defers:
        lines += [f"{pad}if token_{i} is DEFER:", f"{pad}    outcome = {awaiting(f'guard_{i}(inner_{i}, ctx)')}",
                  f"{pad}else:"]
    if not settles:
        return lines + inside
    exit_ = (_lines(inline, inline.exit, i, body_pad + "    ") if inline.exit
             else [f"{body_pad}    outcome = exit_{i}(ctx, token_{i}, now, outcome)"])
    exit_error = (_lines(inline, inline.exit_error, i, body_pad + "    ") if inline.exit_error
                  else [f"{body_pad}    outcome = exit_error_{i}(ctx, token_{i}, now, error)"])
    lines += [f"{body_pad}try:", *inside, f"{body_pad}except BaseException as error:", *exit_error,
              f"{body_pad}else:", *exit_]
    if guard.resumes:
        lines += [f"{body_pad}if type(outcome) is Resume:",
                  f"{body_pad}    outcome = {awaiting(f'outcome.run(inner_{i})')}"]
    return lines


def _covered(guards: Sequence[Guard]) -> set[int]:
    """The timeouts that a shorter one further in covers (policies.guard: Coverable).

    The one further in must cover every await inside this one but those of
    the guard just inside it, which `_nested` sends through `within`; and no
    guard in between may answer for an error.
    """
    covered = set()
    for i, guard in enumerate(guards):
        if not isinstance(guard, Coverable):
            continue
        for j in range(i + 1, len(guards)):
            inner = guards[j]
            if isinstance(inner, Coverable) and inner.duration < guard.duration:
                covered.add(i)
                break
            if inner.recovers or (j > i + 1 and (inner.defers or inner.resumes)):
                break
    return covered


# the layer's own names, which an Inline's lines share; every other name in them is the guard's
_LAYER_NAMES = frozenset({"ctx", "now", "task", "outcome", "error", *dir(builtins)}) - {
    "token", "enter", "exit", "guard"}  # (`exit` is also a builtin)


class _GuardsOwn(ast.NodeTransformer):
    """Renames the guard's names (not attributes, not keywords) `name_i`, apart from other guards';
    a name for a number becomes the number (a constant costs less to load than a global)."""

    def __init__(self, i: int, names: Mapping[str, Any]) -> None:
        self.i = i
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.expr:
        value = self.names.get(node.id)
        if type(value) in (int, float) and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(value), node)
        if node.id not in _LAYER_NAMES:
            node.id = f"{node.id}_{self.i}"
        return node


def _lines(inline: Inline, source: str, i: int, pad: str) -> list[str]:
    """An Inline's lines for guard `i`, its own names renamed, indented by `pad`."""
    tree = _GuardsOwn(i, inline.names).visit(ast.parse(textwrap.dedent(source)))
    return [pad + line for line in ast.unparse(tree).splitlines()]


def fused_layer(call: Call) -> FusedLayer | None:
    """The layer behind a call that `compose` returned, if it is a fused one."""
    layer = getattr(call, "__self__", None)
    return layer if isinstance(layer, FusedLayer) else None
