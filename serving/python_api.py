"""The engine's Python API for notebooks and scripts: `/generate`'s arguments in, its dicts out.

`Engine.generate(...)` (blocking; an iterator of chunks with `stream=True`) and `await
Engine.async_generate(...)` take the same keyword arguments as the `/generate` body and return what the
route would, through the same parser and formatter (`Engine.parse`, `Engine.formatter`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any


class PythonAPI:
    """Mixed into `serving.engine.Engine`, whose parse / formatter / stream_outputs it uses."""

    async def async_generate(self, stream: bool = False, **body: Any):
        request = self.parse({**body, "stream": stream})
        if not stream:
            return await self.generate_request(request)

        async def chunks():
            formatter = self.formatter(request)
            async for out in self.stream_outputs(request):
                yield formatter.chunk(out)

        return chunks()

    def generate(self, stream: bool = False, **body: Any):
        """Same arguments and results as `/generate` (`text=`, `input_ids=`, `sampling_params=`, ...)."""
        results: queue.Queue = queue.Queue()

        def run() -> None:
            async def consume():
                result = await self.async_generate(stream=stream, **body)
                if stream:
                    async for chunk in result:
                        results.put(("chunk", chunk))
                else:
                    results.put(("chunk", result))

            try:
                asyncio.run(consume())
                results.put(("done", None))
            except Exception as exc:
                results.put(("error", exc))

        threading.Thread(target=run, daemon=True).start()

        def iterate() -> Iterator[dict]:
            while True:
                kind, value = results.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value

        return iterate() if stream else next(iterate())
