"""Server configuration: `ServerArgs` and the `python -m serving.main` command line.

Flag names and defaults follow SGLang's `launch_server` (shared/reference/api-contract.md section 8)
where the flag means the same thing for us, so existing launch commands work. Our own flags:
`--disable-precompile`, `--compilation-cache-dir`, `--disable-compilation-cache`, and the
`pallas` / `reference` backend choices. Every value is validated in `ServerArgs.__post_init__`
(`server_args_checks.check_server_args`), so a ServerArgs built from Python is checked exactly like one
built from the command line.

SGLang's choices of a flag that we do not serve (e.g. `--grammar-backend xgrammar`, `--load-format pt`)
parse and are refused at start-up with "... is not supported yet".

Defaults that differ from SGLang, and why:
- `model_path` may be omitted: None means the bundled default model (SmolLM2-135M-Instruct), which
  the engine resolves.
- `page_size` is 16, not 1. Our attention kernels walk the KV cache page by page; with one token per
  page every sequence needs one page-table entry and one gather per token, which caps throughput.
  Sixteen tokens per page amortize that, at the cost of prefix-cache matches being rounded down to a
  page boundary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from serving.server_args_checks import (
    ATTENTION_BACKEND_CHOICES,
    BACKEND_CHOICES,
    DENSE_BACKENDS,
    DTYPE_CHOICES,
    EXPERT_RECORDER_MODE_CHOICES,
    GRAMMAR_BACKEND_CHOICES,
    GRAMMAR_BACKENDS_LATER,
    KV_CACHE_DTYPE_CHOICES,
    KV_CACHE_DTYPES_LATER,
    LOAD_BALANCE_METHOD_CHOICES,
    LOAD_FORMAT_CHOICES,
    LOAD_FORMATS_LATER,
    LOG_LEVEL_CHOICES,
    SAMPLING_DEFAULTS_CHOICES,
    SCHEDULE_POLICY_CHOICES,
    check_server_args,
)


def default_compilation_cache_dir() -> str:
    """`${XDG_CACHE_HOME:-~/.cache}/pallas-serve/jax-compile-cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pallas-serve", "jax-compile-cache")


def _arg(default: Any, help: str, *, type: Any = None, choices: tuple | None = None,
         aliases: tuple[str, ...] = (), flag: str | None = None) -> Any:
    """A dataclass field carrying what argparse needs. Bool fields become store_true flags, or
    store_false when `flag` names an inverse flag (e.g. --disable-precompile for precompile)."""
    return field(default=default, metadata={
        "help": help, "type": type, "choices": choices, "aliases": aliases, "flag": flag,
    })


@dataclass
class ServerArgs:
    """Every launch option. Field names are SGLang's (dashes on the command line)."""

    # Model and tokenizer
    model_path: str | None = _arg(
        None, "Local directory, GGUF file or Hugging Face repo id of the model; omitted = the bundled "
        "default model.", type=str, aliases=("--model",))
    tokenizer_path: str | None = _arg(None, "Tokenizer location; omitted = the model path.", type=str)
    skip_tokenizer_init: bool = _arg(
        False, "Load no tokenizer: requests must give input_ids and responses carry no text.")
    load_format: str = _arg(
        "auto", "Weight format: auto (from what --model-path names), safetensors (a Hugging Face directory "
        "or hub id; refuses a .gguf path), gguf (a .gguf file, converted once; refuses anything else), "
        "orbax (an Orbax checkpoint directory with config.json beside, see checkpoints.convert). "
        "SGLang's other formats are not supported yet.", type=str,
        choices=LOAD_FORMAT_CHOICES + LOAD_FORMATS_LATER)
    trust_remote_code: bool = _arg(False, "Accepted for compatibility; no remote code is ever run.")
    revision: str | None = _arg(
        None, "Hugging Face revision (branch, tag or commit) of a hub-id --model-path, picked from the local "
        "cache; omitted = refs/main. Ignored for a local directory.", type=str)
    context_length: int | None = _arg(None, "Max context length; omitted = the model config's.", type=int)
    is_embedding: bool = _arg(False, "Serve a causal LM checkpoint as an embedding model (/encode, "
                              "/v1/embeddings); sequence-classification (reward) and cross-encoder "
                              "checkpoints are served as such whether or not it is given.")
    served_model_name: str | None = _arg(
        None, "Name reported by /v1/models and /get_model_info; omitted = the model path.", type=str)
    weight_version: str = _arg("default", "Initial weight version string.", type=str)
    dtype: str = _arg("auto", "Weight and activation dtype.", type=str, choices=DTYPE_CHOICES)
    kv_cache_dtype: str = _arg(
        "auto", "KV cache dtype: auto (the model's dtype) or bf16 / bfloat16 (half the cache memory and "
        "the bytes attention reads; keys and values rounded to bfloat16).", type=str,
        choices=KV_CACHE_DTYPE_CHOICES + KV_CACHE_DTYPES_LATER)

    # HTTP server
    host: str = _arg("127.0.0.1", "Bind address.", type=str)
    port: int = _arg(30000, "HTTP port.", type=int)
    log_level: str = _arg("info", "Log level of all loggers.", type=str.lower, choices=LOG_LEVEL_CHOICES)
    decode_log_interval: int = _arg(
        40, "Decode steps between two \"Decode batch\" log lines (#running-req, token usage, throughput, "
        "#queue-req; info level).", type=int)
    api_key: str | None = _arg(None, "Bearer key (`Authorization: Bearer <key>`) required on every route "
                               "except /health, /health_generate and /metrics (and CORS preflights).",
                               type=str)
    skip_server_warmup: bool = _arg(False, "Mark the server ready without the warm-up request.")
    enable_metrics: bool = _arg(False, "Serve Prometheus metrics (SGLang's sglang:* series) on /metrics; "
                                "without it /metrics is 404.")
    log_requests: bool = _arg(False, "Log every HTTP request (method, path, status, sizes) and every finished "
                              "request (rid, token counts, finish reason, latency).")
    log_requests_level: int = _arg(
        2, "Detail of --log-requests: 0 metadata, 1 + sampling params, 2 + input / output cut to "
        "2048 characters, 3 + the whole input / output.", type=int, choices=(0, 1, 2, 3))
    max_request_body_size: int = _arg(
        8 * 1024 * 1024, "Largest request body in bytes; a larger one is answered 413.", type=int)
    request_read_timeout: float = _arg(
        60.0, "Seconds a client has to send a request's headers and body (a slow sender gets 408); it never "
        "limits how long a generation takes.", type=float)
    keep_alive_timeout: float = _arg(
        5.0, "Seconds an idle keep-alive connection stays open between two requests (uvicorn's default in "
        "SGLang).", type=float)
    graceful_shutdown_timeout: float = _arg(
        30.0, "On SIGTERM, seconds the requests in flight get to finish (new ones get 503) before they are "
        "aborted and the server exits.", type=float)
    enable_cache_report: bool = _arg(
        False, "Report cached prompt tokens in OpenAI responses (usage.prompt_tokens_details.cached_tokens).")
    watchdog_timeout: float = _arg(
        300.0, "Seconds a forward step may run before its requests are aborted (500) and the server reports "
        "unhealthy until the step returns (SGLang kills the process instead).", type=float)

    # Memory and scheduling
    page_size: int = _arg(16, "Tokens per KV-cache page (a power of two).", type=int)
    max_running_requests: int | None = _arg(None, "Max concurrently running requests; omitted = auto.",
                                            type=int)
    max_queued_requests: int | None = _arg(
        None, "Cap on requests waiting for admission; a new request beyond it is answered 503 \"The request "
        "queue is full.\" (requests already accepted are never dropped); omitted = no cap.", type=int)
    max_total_tokens: int | None = _arg(None, "KV pool size in tokens; omitted = from memory.", type=int)
    mem_fraction_static: float | None = _arg(
        None, "Fraction of device memory for weights + KV pool; omitted = auto.", type=float)
    chunked_prefill_size: int | None = _arg(
        None, "Max tokens per prefill chunk; -1 disables chunking; omitted = auto.", type=int)
    max_prefill_tokens: int = _arg(16384, "Token budget of one prefill batch.", type=int)
    schedule_policy: str = _arg("fcfs", "Order in which waiting requests are admitted.", type=str,
                                choices=SCHEDULE_POLICY_CHOICES)
    disable_radix_cache: bool = _arg(False, "Disable prefix caching.")
    random_seed: int | None = _arg(None, "Global seed; omitted = random.", type=int)

    # Sampling and streaming
    preferred_sampling_params: str | None = _arg(
        None, "JSON object merged under every /generate request's sampling_params (request keys win).",
        type=str)
    sampling_defaults: str = _arg(
        "model", "Defaults of /v1/chat/completions for temperature, top_p, top_k, min_p and repetition_penalty "
        "a request leaves null: model (the checkpoint's generation_config.json, then OpenAI's) or openai.",
        type=str, choices=SAMPLING_DEFAULTS_CHOICES)
    chat_template: str | None = _arg(
        None, "Chat template of /v1/chat/completions: a Jinja file or an inline Jinja template; omitted = the "
        "tokenizer's (tokenizer_config.json, or a GGUF's tokenizer.chat_template).", type=str)
    stream_interval: int = _arg(1, "Tokens per streamed chunk.", type=int)
    stream_output: bool = _arg(False, "Stream only the output_ids new since the previous chunk.")
    allow_auto_truncate: bool = _arg(False, "Truncate over-long prompts instead of answering 400.")

    # Kernels and compilation
    attention_backend: str = _arg(
        "auto", "Attention implementation: auto (the platform's kernel: Pallas on TPU / GPU, the native "
        "kernel on CPU), pallas, cpu (the native CPU kernel), reference (plain jnp).", type=str,
        choices=ATTENTION_BACKEND_CHOICES)
    dense_backend: str = _arg(
        "auto", "Linear layers and LM head: auto (the native CPU kernel on CPU for float32 / bfloat16 weights "
        "and small batches, XLA's dot elsewhere), cpu (that kernel; refuses to start where it cannot run), "
        "reference (XLA's dot everywhere).", type=str, choices=DENSE_BACKENDS)
    moe_backend: str = _arg(
        "auto", "MoE grouped-matmul implementation: auto (the Pallas kernel on TPU / GPU, jax.lax.ragged_dot "
        "elsewhere), pallas (the platform's Pallas kernel; interpret mode on CPU, slow), reference (ragged_dot).",
        type=str, choices=BACKEND_CHOICES)
    grammar_backend: str | None = _arg(
        None, "Constrained decoding (json_schema, regex, ebnf) backend: llguidance (omitted = llguidance) or "
        "none (grammar keys answer 400). xgrammar and outlines are not supported yet.", type=str,
        choices=GRAMMAR_BACKEND_CHOICES + GRAMMAR_BACKENDS_LATER)
    constrained_json_whitespace_pattern: str | None = _arg(
        None, "Regex for the whitespace a json_schema grammar allows between JSON tokens, e.g. '[\\n\\t ]*'; "
        "omitted = any run of spaces, tabs and newlines. A schema's own x-guidance options win.", type=str)
    constrained_json_disable_any_whitespace: bool = _arg(
        False, "Compact JSON under a json_schema grammar: no whitespace between JSON tokens (a weak model "
        "cannot then spend its tokens on it).")
    precompile: bool = _arg(True, "Do not compile every shape bucket at startup (compile on first use).",
                            flag="--disable-precompile")
    compilation_cache_dir: str | None = _arg(
        None, "Persistent JAX compilation cache directory; omitted = "
        "${XDG_CACHE_HOME:-~/.cache}/pallas-serve/jax-compile-cache.", type=str)
    disable_compilation_cache: bool = _arg(False, "Do not use the persistent JAX compilation cache.")

    # Parallelism
    tp_size: int = _arg(1, "Tensor-parallel degree: attention heads, MLP columns / rows, a MoE model's experts and "
                        "the KV cache split over this many devices (must divide the attention heads; KV heads are "
                        "replicated when it is a multiple of them).", type=int,
                        aliases=("--tensor-parallel-size",))
    dp_size: int = _arg(1, "Data-parallel degree: this many replicas of the model, each on its own tp x ep devices "
                        "with its own KV cache, prefix cache and scheduler, behind one server.", type=int,
                        aliases=("--data-parallel-size",))
    load_balance_method: str = _arg("round_robin", "How --dp-size replicas share requests: in turn, or to the one "
                                    "with the fewest in flight; either way a replica already holding a much longer "
                                    "prefix of the prompt takes it.", type=str, choices=LOAD_BALANCE_METHOD_CHOICES)
    ep_size: int = _arg(1, "Expert-parallel degree: this many times --tp-size devices, a MoE model's routed experts "
                        "split over all of them (tp x ep must divide the expert count).", type=int, aliases=("--ep",))
    nnodes: int = _arg(1, "Number of hosts one server spans: each runs this command with its own --node-rank; "
                       "one mesh (--tp-size x --ep-size = every host's devices) over all of them, node 0 serves "
                       "HTTP (docs/multi_device.md).", type=int)
    node_rank: int = _arg(0, "This host's rank among --nnodes, 0 to nnodes - 1: 0 serves HTTP, the others step "
                          "with it and serve nothing themselves.", type=int)
    dist_init_addr: str | None = _arg(None, "With --nnodes > 1: node 0's HOST:PORT (a free port every host can "
                                      "reach), where jax.distributed's coordinator listens.", type=str)

    # Expert-distribution recording (MoE)
    expert_distribution_recorder_mode: str | None = _arg(
        None, "Record the experts a MoE model's router picks, between /start_expert_distribution_record and "
        "/dump_expert_distribution_record: stat (per-pass counts in a circular buffer), per_pass (one record "
        "per forward pass), per_token (plus each token's ids, positions and top-k experts).", type=str,
        choices=EXPERT_RECORDER_MODE_CHOICES)
    expert_distribution_recorder_buffer_size: int | None = _arg(
        None, "Forward passes the expert recorder keeps (default 1000; -1 keeps every pass).", type=int)

    def __post_init__(self) -> None:
        check_server_args(self)
        self._preferred = self._parse_preferred_sampling_params()
        if self.compilation_cache_dir is None:
            self.compilation_cache_dir = default_compilation_cache_dir()
        else:
            self.compilation_cache_dir = os.path.expanduser(self.compilation_cache_dir)

    def _parse_preferred_sampling_params(self) -> dict[str, Any] | None:
        raw = self.preferred_sampling_params
        if raw is None:
            return None
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preferred_sampling_params is not valid JSON: {exc}.") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"preferred_sampling_params must be a JSON object, got {raw!r}.")
        # A bad key here would fail every request; say so at startup instead.
        from serving.protocol import RequestError, SamplingParams

        try:
            SamplingParams.from_dict(parsed)
        except RequestError as exc:
            raise ValueError(f"preferred_sampling_params: {exc}") from None
        return parsed

    @property
    def preferred_sampling_params_dict(self) -> dict[str, Any] | None:
        """The parsed `--preferred-sampling-params` object (None when not set). `/get_model_info`
        echoes the raw string field instead."""
        return None if self._preferred is None else dict(self._preferred)

    def effective_compilation_cache_dir(self) -> str | None:
        """Where the runner points JAX's persistent compilation cache; None when disabled."""
        return None if self.disable_compilation_cache else self.compilation_cache_dir

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-compatible, for /get_server_info.

        Unlike SGLang, which returns the API key in clear text there, `api_key` is always reported
        as null: whoever can read /get_server_info must not learn the key from it.
        """
        out = dataclasses.asdict(self)
        out["api_key"] = None
        return out

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        add_cli_args(parser)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> ServerArgs:
        """Parse a command line (sys.argv[1:] when None). Invalid values exit with status 2 and an
        argparse-style message, like any other usage error."""
        parser = argparse.ArgumentParser(
            prog="python -m serving.main",
            description="pallas-serve: an LLM server speaking SGLang's native HTTP API.",
        )
        add_cli_args(parser)
        namespace = parser.parse_args(argv)
        try:
            return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServerArgs field (`--field-name`, plus SGLang's aliases)."""
    for f in dataclasses.fields(ServerArgs):
        meta = f.metadata
        flags = [meta["flag"] or "--" + f.name.replace("_", "-"), *meta["aliases"]]
        if f.type in ("bool", bool):
            action = "store_false" if meta["flag"] else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, default=f.default, help=meta["help"])
            continue
        default_text = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(
            *flags, dest=f.name, type=meta["type"], choices=meta["choices"], default=f.default,
            help=meta["help"] + default_text,
        )
