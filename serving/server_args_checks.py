"""`ServerArgs` validation: the choice lists (with SGLang's choices we refuse as "not supported yet")
and `check_server_args`, which `ServerArgs.__post_init__` runs so a ServerArgs
built from Python is checked exactly like one built from the command line."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from checkpoints.resolve import LOAD_FORMATS, check_load_format
from kernels.backends import ATTENTION_BACKENDS, DENSE_BACKENDS, MOE_BACKENDS
from serving.grammar import check_whitespace_pattern

if TYPE_CHECKING:
    from serving.server_args import ServerArgs

DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")
SCHEDULE_POLICY_CHOICES = ("fcfs", "lpm")
LOAD_BALANCE_METHOD_CHOICES = ("round_robin", "shortest_queue")  # serving/router.py; SGLang's others not yet
# One list of names each, kept by the kernels (importable without JAX).
BACKEND_CHOICES = MOE_BACKENDS
ATTENTION_BACKEND_CHOICES = ATTENTION_BACKENDS
KV_CACHE_DTYPE_CHOICES = ("auto", "bf16", "bfloat16")
KV_CACHE_DTYPES_LATER = ("fp8_e5m2", "fp8_e4m3", "fp4_e2m1")  # SGLang's other choices
GRAMMAR_BACKEND_CHOICES = ("llguidance", "none")
GRAMMAR_BACKENDS_LATER = ("xgrammar", "outlines")  # SGLang's other choices (serving/grammar.py says why)
EXPERT_RECORDER_MODE_CHOICES = ("stat", "per_pass", "per_token")
SAMPLING_DEFAULTS_CHOICES = ("model", "openai")
LOAD_FORMAT_CHOICES = LOAD_FORMATS  # the formats the resolver tells apart
LOAD_FORMATS_LATER = ("pt", "npcache", "dummy", "sharded_state", "bitsandbytes", "layered", "remote",
                      "remote_instance")  # SGLang's other choices



def check_server_args(args: ServerArgs) -> None:
    """Every value checked, each failure a ValueError that names the flag and says what is wrong (the CLI
    turns it into a usage error, `Engine(...)` raises it). Normalizes `log_level` to lower case."""
    if isinstance(args.log_level, str):
        args.log_level = args.log_level.lower()
    _check_choice(args, "dtype", DTYPE_CHOICES)
    if args.kv_cache_dtype in KV_CACHE_DTYPES_LATER:
        raise ValueError(f"kv_cache_dtype {args.kv_cache_dtype!r} is not supported yet; use one of "
                         f"{', '.join(KV_CACHE_DTYPE_CHOICES)}.")
    _check_choice(args, "kv_cache_dtype", KV_CACHE_DTYPE_CHOICES)
    _check_choice(args, "log_level", LOG_LEVEL_CHOICES)
    _check_choice(args, "schedule_policy", SCHEDULE_POLICY_CHOICES)
    _check_choice(args, "load_balance_method", LOAD_BALANCE_METHOD_CHOICES)
    _check_choice(args, "attention_backend", ATTENTION_BACKEND_CHOICES)
    _check_choice(args, "dense_backend", DENSE_BACKENDS)
    _check_choice(args, "moe_backend", BACKEND_CHOICES)
    _check_choice(args, "sampling_defaults", SAMPLING_DEFAULTS_CHOICES)
    if args.grammar_backend in GRAMMAR_BACKENDS_LATER:
        raise ValueError(f"--grammar-backend {args.grammar_backend} is not supported yet; use llguidance "
                         "(the default) or none.")
    if args.grammar_backend is not None:
        _check_choice(args, "grammar_backend", GRAMMAR_BACKEND_CHOICES)
    _check_json_whitespace(args)
    if args.expert_distribution_recorder_mode is not None:
        _check_choice(args, "expert_distribution_recorder_mode", EXPERT_RECORDER_MODE_CHOICES)

    if not isinstance(args.host, str) or not args.host:
        raise ValueError("host must be a non-empty string.")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"port must be in [1, 65535], got {args.port}.")
    if args.page_size < 1 or args.page_size & (args.page_size - 1):
        raise ValueError(f"page_size must be a power of two (1, 2, 4, ...), got {args.page_size}.")
    for name in ("context_length", "max_running_requests", "max_queued_requests", "max_total_tokens"):
        _check_at_least(args, name, 1, optional=True)
    for name in ("max_prefill_tokens", "stream_interval", "decode_log_interval", "tp_size", "dp_size",
                 "ep_size"):
        _check_at_least(args, name, 1, optional=False)
    if args.chunked_prefill_size is not None and args.chunked_prefill_size != -1 and args.chunked_prefill_size < 1:
        raise ValueError(
            f"chunked_prefill_size must be -1 (disable chunking) or at least 1, got {args.chunked_prefill_size}."
        )
    buffer_size = args.expert_distribution_recorder_buffer_size
    if buffer_size is not None and buffer_size != -1 and buffer_size < 1:
        raise ValueError(
            f"expert_distribution_recorder_buffer_size must be -1 (unbounded) or at least 1, got {buffer_size}."
        )
    if args.mem_fraction_static is not None and not 0.0 < args.mem_fraction_static <= 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1], got {args.mem_fraction_static}.")
    if args.random_seed is not None and args.random_seed < 0:
        raise ValueError(f"random_seed must be non-negative, got {args.random_seed}.")
    _check_at_least(args, "max_request_body_size", 1024, optional=False)
    for name in ("request_read_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(args, name)}.")
    if args.log_requests_level not in (0, 1, 2, 3):
        raise ValueError(f"log_requests_level must be 0, 1, 2 or 3, got {args.log_requests_level}.")
    if not args.watchdog_timeout > 0:
        raise ValueError(f"watchdog_timeout must be positive, got {args.watchdog_timeout}.")
    if not args.load_format:
        raise ValueError("load_format must be a non-empty string.")
    if args.load_format in LOAD_FORMATS_LATER:
        raise ValueError(f"--load-format {args.load_format} is not supported yet; use one of "
                         f"{', '.join(LOAD_FORMAT_CHOICES)}.")
    check_load_format(args.model_path, args.load_format)
    _check_nodes(args)
    _check_chat_template(args)


def _check_nodes(args: ServerArgs) -> None:
    """`--nnodes` / `--node-rank` / `--dist-init-addr` (serving/multihost.py): an explicit coordinator, and only
    what node 0 mirrors to the other hosts."""
    _check_at_least(args, "nnodes", 1, optional=False)
    if not isinstance(args.node_rank, int) or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes) = [0, {args.nnodes}), got {args.node_rank}.")
    if args.nnodes == 1:
        if args.dist_init_addr is not None:
            raise ValueError("--dist-init-addr joins several hosts; it needs --nnodes above 1.")
        return
    host, _, port = (args.dist_init_addr or "").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--nnodes {args.nnodes} needs --dist-init-addr HOST:PORT, node 0's address and a free "
                         f"port every host can reach; got {args.dist_init_addr!r}.")
    if args.dp_size > 1:
        raise ValueError(f"--dp-size {args.dp_size} with --nnodes {args.nnodes} is not supported yet: one mesh "
                         "spans every host's devices (use --tp-size / --ep-size).")
    if args.expert_distribution_recorder_mode is not None:
        raise ValueError(f"--expert-distribution-recorder-mode with --nnodes {args.nnodes} is not supported yet.")


def _check_json_whitespace(args: ServerArgs) -> None:
    if args.constrained_json_whitespace_pattern is None:
        return
    if args.constrained_json_disable_any_whitespace:
        raise ValueError("--constrained-json-whitespace-pattern and --constrained-json-disable-any-whitespace "
                         "contradict each other; pass one.")
    check_whitespace_pattern(args.constrained_json_whitespace_pattern)


def _check_chat_template(args: ServerArgs) -> None:
    """A path that is not a file and text that is no Jinja template are both typos: say so at startup.
    SGLang also takes the names of its built-in templates; we have none."""
    value = args.chat_template
    if value is not None and args.skip_tokenizer_init:
        raise ValueError("--chat-template needs a tokenizer; it cannot be combined with --skip-tokenizer-init.")
    if value is None or os.path.isfile(os.path.expanduser(value)) or "{{" in value or "{%" in value:
        return
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template; SGLang's named "
                     "chat templates are not supported yet.")


def _check_choice(args: ServerArgs, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def _check_at_least(args: ServerArgs, name: str, minimum: int, *, optional: bool) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    if value is None or value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
