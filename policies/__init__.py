"""Resilience policies: pure Python, no HTTP server, YAML or pydantic.

Every policy has one method, ``async def __call__(self, call, ctx) -> Outcome``,
that wraps the next call of the chain. See ``policies.base``.
"""
