"""Everything that turns requests into device steps: engine, scheduler, runner, caches, HTTP server."""

from __future__ import annotations


def __getattr__(name: str):
    # `serving.Engine` without importing JAX for users of the light modules (protocol, utils).
    if name == "Engine":
        from serving.engine import Engine

        return Engine
    raise AttributeError(name)
