"""Generate docs/api.md from the code: `python -m tools.api_docs > docs/api.md`.

The routes come from the Sanic app's route table (the same one `/openapi.json` is built from, so a
route any module registers is listed with the methods it really answers), the flags from `ServerArgs`
(name, aliases, default, choices and help, as `--help` prints them). What the code cannot say, a line
per route and the prose around the tables, is written here. tests/test_docs_api.py fails when
docs/api.md differs from this output, or a route lacks a line here or a docstring.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sanic import Sanic

from serving import server_args
from serving.http.app import create_app
from serving.http.observability import openapi_document
from serving.server_args import ServerArgs

REGENERATE = "python -m tools.api_docs > docs/api.md"

# path -> (section, what it does). Sections appear in the order they are first named here.
ROUTES: dict[str, tuple[str, str]] = {
    "/generate": ("Generation", "Generate from `text` or `input_ids` with SGLang's `sampling_params`; a list is "
                  "a batch, `stream: true` answers server-sent events. Logprobs, penalties, `logit_bias`, "
                  "stop strings / ids / `stop_regex`, and `json_schema` / `regex` / `ebnf` constraints."),
    "/abort_request": ("Generation", "Abort a request in flight by its `rid` (or all of them with `abort_all`)."),
    "/v1/completions": ("OpenAI-compatible", "OpenAI completions (streamed or not); the official `openai` "
                        "client works unchanged."),
    "/v1/chat/completions": ("OpenAI-compatible", "OpenAI chat completions through the model's chat template "
                             "(or `--chat-template`), streamed or not."),
    "/v1/models": ("OpenAI-compatible", "The served model (its `--served-model-name`)."),
    "/v1/models/{model_id}": ("OpenAI-compatible", "One model by id; 404 for any other id."),
    "/v1/embeddings": ("OpenAI-compatible", "OpenAI embeddings (`float` or `base64`) of an embedding model."),
    "/v1/rerank": ("OpenAI-compatible", "Score `documents` against `query` with a cross-encoder, best first "
                   "(`top_n`, `return_documents`)."),
    "/tokenize": ("Tokenizer", "Text to token ids with the server's tokenizer."),
    "/v1/tokenize": ("Tokenizer", "Same as `/tokenize`."),
    "/detokenize": ("Tokenizer", "Token ids to text."),
    "/v1/detokenize": ("Tokenizer", "Same as `/detokenize`."),
    "/encode": ("Embedding, reward and rerank models", "Embeddings of `text` (a string, a list, or [query, "
                "document] pairs for a cross-encoder) or `input_ids`; 400 on a generation model."),
    "/classify": ("Embedding, reward and rerank models", "Same as `/encode`; for a reward or classification "
                  "model `embedding` holds the scores (`embedding[0]` is the reward)."),
    "/get_model_info": ("Model and server", "Model path, tokenizer path, `is_generation`, preferred sampling "
                        "params, weight version."),
    "/model_info": ("Model and server", "Same as `/get_model_info`."),
    "/get_server_info": ("Model and server", "Every server argument, token limits, memory pool sizes, version."),
    "/server_info": ("Model and server", "Same as `/get_server_info`."),
    "/get_load": ("Model and server", "Running and waiting requests, tokens in the KV cache (one entry per "
                  "`--dp-size` replica)."),
    "/health": ("Health", "200 while the server is up (no model call)."),
    "/health_generate": ("Health", "200 once the model generates one token (an embedding model encodes)."),
    "/flush_cache": ("Cache and weights", "Empty the radix prefix cache when no request is running "
                     "(`?timeout=` waits for that)."),
    "/update_weights_from_disk": ("Cache and weights", "Load new weights (safetensors directory or Orbax "
                                  "checkpoint) of the same architecture and shapes while serving."),
    "/get_weights_by_name": ("Cache and weights", "Read one parameter by its Hugging Face name (truncated)."),
    "/get_weight_version": ("Cache and weights", "The current weight version string."),
    "/weight_version": ("Cache and weights", "Same as `/get_weight_version`."),
    "/update_weight_version": ("Cache and weights", "Set the weight version string."),
    "/pause_generation": ("Cache and weights", "Pause the scheduler (`abort`, `retract` or `in_place` for the "
                          "requests in flight)."),
    "/continue_generation": ("Cache and weights", "Resume after `/pause_generation`."),
    "/release_memory_occupation": ("Cache and weights", "Free the KV cache and / or weights' device memory "
                                   "(`tags`) while paused."),
    "/resume_memory_occupation": ("Cache and weights", "Allocate them again."),
    "/start_expert_distribution_record": ("Expert distribution (MoE)", "Start (and reset) recording which "
                                          "experts the router picks; needs `--expert-distribution-recorder-mode`."),
    "/stop_expert_distribution_record": ("Expert distribution (MoE)", "Stop recording."),
    "/dump_expert_distribution_record": ("Expert distribution (MoE)", "Write the record (`.csv` of layer, "
                                         "expert, count and `.npz`) to `$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`, "
                                         "then reset it."),
    "/metrics": ("Observability", "Prometheus metrics, SGLang's `sglang:*` series (only with "
                 "`--enable-metrics`; 404 without)."),
    "/openapi.json": ("Observability", "OpenAPI 3 document of every route (off with `DISABLE_OPENAPI_DOC=1`)."),
}
OTHER = "Other routes"

INTRO = f"""# API reference

<!-- Generated by `{REGENERATE}` from the route table and ServerArgs; edit tools/api_docs.py or
the code, not this file. tests/test_docs_api.py fails when it is stale. -->

pallas-serve speaks SGLang's native HTTP API and its OpenAI-compatible one: request and response bodies,
status codes and error messages are SGLang's, so clients written for SGLang work unchanged. The walk-through
[notebooks/native_api.ipynb](../notebooks/native_api.ipynb) shows the native routes with their outputs,
and [notebooks/offline_engine.ipynb](../notebooks/offline_engine.ipynb) the same engine from Python
without HTTP (`serving.engine.Engine`, whose keyword arguments are the flags below).

Conventions:

- Bodies are JSON. A body that is not JSON, or has the wrong shape, is 400 with a message that names the
  field; an unknown path is 404 `{{"detail": "Not Found"}}`, a known path with another method 405.
- A request field or flag that pallas-serve accepts does what it says; one whose feature is not there
  yet is refused (400, or a start-up error) with a message ending "is not supported yet".
- With `--api-key`, every route but `/health`, `/health_generate` and `/metrics` needs
  `Authorization: Bearer <key>`.
- Routes of one model kind answer 400 on another (`/encode` on a generation model, `/generate` on an
  embedding model).
"""

FLAGS_INTRO = """## Launch flags

`python -m serving.main [flags]` (or `make serve SERVE_ARGS="..."`). Names and defaults follow SGLang's
`launch_server`, so its launch commands work; from Python each flag is the `Engine` / `ServerArgs` keyword
in parentheses. On/off flags are off unless given.
"""


def route_table() -> dict[str, dict[str, Any]]:
    """path -> {method: OpenAPI operation} of the app `serving.main` builds, with every optional route on."""
    saved = os.environ.pop("DISABLE_OPENAPI_DOC", None)
    engine = SimpleNamespace(server_args=ServerArgs(enable_metrics=True), tokenizer=None,
                             model_dir=Path("/nonexistent"))  # registration reads only these
    app = create_app(engine)
    try:
        return openapi_document(app)["paths"]
    finally:
        Sanic.unregister_app(app)
        if saved is not None:
            os.environ["DISABLE_OPENAPI_DOC"] = saved


def route_description(path: str, operations: dict[str, Any]) -> str:
    """The line written here, else the handler's docstring, else "" (which the test refuses)."""
    if path in ROUTES:
        return ROUTES[path][1]
    return next((op["description"] for op in operations.values() if op.get("description")), "")


def flag_names(field: dataclasses.Field) -> list[str]:
    return [field.metadata["flag"] or "--" + field.name.replace("_", "-"), *field.metadata["aliases"]]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_routes(paths: dict[str, dict[str, Any]]) -> str:
    sections: dict[str, list[str]] = {section: [] for section, _ in ROUTES.values()}
    sections[OTHER] = []
    for path, operations in paths.items():
        methods = ", ".join(method.upper() for method in operations)
        section = ROUTES[path][0] if path in ROUTES else OTHER
        sections[section].append(f"| `{path}` | {methods} | {_cell(route_description(path, operations))} |")
    out = ["## Routes", ""]
    for section, rows in sections.items():
        if rows:
            out += [f"### {section}", "", "| route | methods | what it does |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


def flag_help(field: dataclasses.Field) -> str:
    """The flag's help and its choices: those accepted, then SGLang's that start-up refuses."""
    text = field.metadata["help"]
    choices = field.metadata["choices"] or ()
    later = {choice for name, value in vars(server_args).items() if name.endswith("_LATER") for choice in value}
    working = [choice for choice in choices if choice not in later]
    refused = [choice for choice in choices if choice in later]
    if working:
        text += " Choices: " + ", ".join(f"`{choice}`" for choice in working) + "."
    if refused:
        text += " Refused as not supported yet: " + ", ".join(f"`{choice}`" for choice in refused) + "."
    return text


def render_flags() -> str:
    rows = ["| flag (`Engine` keyword) | default | what it does |", "|---|---|---|"]
    for field in dataclasses.fields(ServerArgs):
        meta = field.metadata
        names = " ".join(f"`{name}`" for name in flag_names(field))
        is_switch = field.type in ("bool", bool)
        default = "off" if is_switch else ("" if field.default is None else f"`{field.default}`")
        keyword = f"{field.name}=False" if meta["flag"] and is_switch else field.name
        rows.append(f"| {names} (`{keyword}`) | {default} | {_cell(flag_help(field))} |")
    return FLAGS_INTRO + "\n" + "\n".join(rows) + "\n"


def render() -> str:
    return INTRO + "\n" + render_routes(route_table()) + "\n" + render_flags()


if __name__ == "__main__":
    print(render(), end="")
