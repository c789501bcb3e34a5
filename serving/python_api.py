"""The engine's Python API for notebooks and scripts: the routes' bodies in, their dicts out.

`Engine.generate(...)` (blocking; an iterator of chunks with `stream=True`) and `await
Engine.async_generate(...)` take the same keyword arguments as the `/generate` body and return what the
route would, through the same parser and formatter (`Engine.parse`, `Engine.formatter`).
`Engine.encode(text)` / `await Engine.async_encode(text)` do the same for `/encode` (`text=` a string, a
list of them or of [query, document] pairs, or `input_ids=`): embeddings, or scores of a reward model
or cross-encoder.

The blocking calls run their coroutine on an event loop of their own thread: the caller may already be
inside a running loop (a Jupyter kernel is), where `asyncio.run` refuses to start another.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from serving.protocol.pooling import encode_response, parse_encode_request


class PythonAPI:
    """Mixed into `serving.engine.Engine`, whose parse / formatter / stream_outputs / encode_request it uses."""

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
        async def chunks():
            result = await self.async_generate(stream=stream, **body)
            if stream:
                async for chunk in result:
                    yield chunk
            else:
                yield result

        results = _iterate_in_thread(chunks)
        return results if stream else next(results)

    async def async_encode(self, text: Any = None, **body: Any) -> dict | list[dict]:
        """`/encode`'s response to the body `{"text": text, **body}` (or `input_ids=` without text)."""
        start = time.perf_counter()
        request = parse_encode_request(body if text is None else {**body, "text": text})
        outputs = await self.encode_request(request)
        return encode_response(request, outputs, self.weight_version, start)

    def encode(self, text: Any = None, **body: Any) -> dict | list[dict]:
        """Blocking `async_encode`: `{"embedding": [...], "meta_info": {...}}`, a list of them for a list."""
        async def result():
            yield await self.async_encode(text, **body)

        return next(_iterate_in_thread(result))


def _iterate_in_thread(chunks: Callable[[], AsyncIterator[Any]]) -> Iterator[Any]:
    """The items of `chunks()`, produced on a new event loop in a daemon thread that starts now (so
    several streams run at once); its errors are re-raised here."""
    results: queue.Queue = queue.Queue()

    def run() -> None:
        async def consume():
            async for chunk in chunks():
                results.put(("chunk", chunk))

        try:
            asyncio.run(consume())
            results.put(("done", None))
        except Exception as exc:
            results.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()

    def iterate() -> Iterator[Any]:
        while True:
            kind, value = results.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    return iterate()
