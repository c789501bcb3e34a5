"""`/openapi.json` is generated from Sanic's route table: every route the app registers is in it, and
every operation it lists answers through the real server (anything but 404 / 405).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from sanic import Sanic

from serving.http.app import create_app
from serving.http.observability import openapi_document
from serving.server_args import ServerArgs
from tests.conftest import ServerProcess

FLAGS = ("--page-size", "4", "--max-total-tokens", "1024", "--chunked-prefill-size", "32", "--enable-metrics",
         "--served-model-name", "org/tiny")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


def fake_engine(args: ServerArgs) -> SimpleNamespace:
    return SimpleNamespace(server_args=args, tokenizer=None, model_dir=Path("/nonexistent"))


@pytest.fixture(scope="module")
def app():
    """The app `serving.main` builds, without an engine: registration reads only the flags, the tokenizer
    (its chat template is checked at start-up) and the model directory (generation defaults)."""
    app = create_app(fake_engine(ServerArgs(enable_metrics=True)))
    yield app
    Sanic.unregister_app(app)


def operations(document) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items() for method in item}


def test_every_route_in_the_table_is_documented(app):
    document = openapi_document(app)
    assert document["openapi"].startswith("3.") and document["info"]["title"] == "pallas-serve"
    table = {("/" + re.sub(r"<([^:>]+)(?::[^>]+)?>", r"{\1}", route.path), method)
             for route in app.router.routes for method in route.methods}
    assert table == operations(document)
    for path in ("/generate", "/get_load", "/metrics", "/openapi.json", "/v1/models/{model_id}"):
        assert path in document["paths"], path
    generate = document["paths"]["/generate"]
    assert set(generate) == {"post", "put"} and generate["post"]["requestBody"]["content"]["application/json"]
    assert document["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["name"] == "model_id"
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["summary"] and operation["responses"]


def test_disable_openapi_doc(monkeypatch, app):
    Sanic.unregister_app(app)  # one app of that name at a time; the fixture's is registered again below
    monkeypatch.setenv("DISABLE_OPENAPI_DOC", "1")
    without = create_app(fake_engine(ServerArgs()))
    try:
        paths = {"/" + route.path for route in without.router.routes}
        assert "/openapi.json" not in paths and "/metrics" not in paths and "/generate" in paths
    finally:
        Sanic.unregister_app(without)
        Sanic.register_app(app)


def test_served_document_matches_the_route_table(server, app):
    served = server.get("/openapi.json")
    assert served.status_code == 200
    assert operations(served.json()) == operations(openapi_document(app))


def test_every_documented_operation_exists(server):
    document = server.get("/openapi.json").json()
    for path, item in document["paths"].items():
        url = path.replace("{model_id}", "org/tiny")
        assert "{" not in url, f"no value to put in {path}"
        for method in item:
            kwargs = {"json": {}} if "requestBody" in item[method] else {}
            r = requests.request(method.upper(), server.url + url, timeout=120, **kwargs)
            assert r.status_code not in (404, 405), (method, path, r.status_code, r.text[:200])
