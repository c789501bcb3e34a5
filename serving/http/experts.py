"""The expert-distribution routes (contract section 6): start, stop and dump the router's record.

GET or POST, no body, a plain-text 200 with SGLang's bodies; the data goes to files (`serving.expert_stats`).
On a server started without `--expert-distribution-recorder-mode`, or serving a dense model, each answers
400 naming the flag (SGLang's scheduler crashes there instead).
"""

from __future__ import annotations

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http.envelopes import error_response
from serving.protocol import RequestError

BODIES = {
    "start": "Start recording the expert distribution.\n",
    "stop": "Stop recording the expert distribution.\n",
    "dump": "Dump expert distribution record.\n",
}


def register(app: Sanic, engine: Engine) -> None:
    for action, body in BODIES.items():
        async def handler(request: Request, action: str = action, body: str = body):
            try:
                await engine.expert_distribution(action)
            except RequestError as exc:
                return error_response(str(exc))
            return sanic_response.text(body)

        app.add_route(handler, f"/{action}_expert_distribution_record", methods=["GET", "POST"],
                      name=f"{action}_expert_distribution_record")
