"""ServerArgs defaults, CLI flags and aliases, validation (serving/server_args.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from serving.server_args import ServerArgs, add_cli_args, default_compilation_cache_dir


def test_defaults_follow_sglang(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg-test")
    args = ServerArgs.from_cli([])
    assert args == ServerArgs()
    expected = {
        "model_path": None, "tokenizer_path": None, "host": "127.0.0.1", "port": 30000, "log_level": "info",
        "decode_log_interval": 40,
        "dtype": "auto", "kv_cache_dtype": "auto", "context_length": None, "page_size": 16, "max_running_requests": None,
        "max_queued_requests": None, "max_total_tokens": None, "mem_fraction_static": None,
        "chunked_prefill_size": None, "max_prefill_tokens": 16384, "schedule_policy": "fcfs",
        "disable_radix_cache": False, "random_seed": None, "skip_server_warmup": False,
        "served_model_name": None, "weight_version": "default", "preferred_sampling_params": None,
        "stream_interval": 1, "stream_output": False, "skip_tokenizer_init": False, "api_key": None,
        "allow_auto_truncate": False, "is_embedding": False, "attention_backend": "auto", "dense_backend": "auto", "moe_backend": "auto",
        "load_format": "auto", "enable_metrics": False, "watchdog_timeout": 300, "tp_size": 1, "dp_size": 1,
        "load_balance_method": "round_robin", "ep_size": 1, "nnodes": 1, "node_rank": 0, "dist_init_addr": None, "trust_remote_code": False, "revision": None, "expert_distribution_recorder_mode": None,
        "expert_distribution_recorder_buffer_size": None, "enable_cache_report": False,
        "sampling_defaults": "model", "chat_template": None, "precompile": True, "grammar_backend": None,
        "constrained_json_whitespace_pattern": None, "constrained_json_disable_any_whitespace": False,
        "compilation_cache_dir": "/tmp/xdg-test/pallas-serve/jax-compile-cache",
        "disable_compilation_cache": False, "log_requests": False, "log_requests_level": 2,
        "max_request_body_size": 8 * 1024 * 1024, "request_read_timeout": 60.0, "keep_alive_timeout": 5.0,
        "graceful_shutdown_timeout": 30.0,
    }
    assert args.to_dict() == expected
    assert args.preferred_sampling_params_dict is None
    assert args.effective_compilation_cache_dir() == "/tmp/xdg-test/pallas-serve/jax-compile-cache"
    assert args.url() == "http://127.0.0.1:30000"


def test_default_cache_dir_without_xdg(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_compilation_cache_dir() == "/home/someone/.cache/pallas-serve/jax-compile-cache"


def test_notebook_launch_command_parses():
    args = ServerArgs.from_cli(
        "--model-path qwen/qwen2.5-0.5b-instruct --host 0.0.0.0 --log-level warning --port 31234".split())
    assert (args.model_path, args.host, args.log_level, args.port) == (
        "qwen/qwen2.5-0.5b-instruct", "0.0.0.0", "warning", 31234)


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--model", "m"], "model_path", "m"),
        (["--disable-precompile"], "precompile", False),
        (["--disable-compilation-cache"], "disable_compilation_cache", True),
        (["--compilation-cache-dir", "/tmp/cc"], "compilation_cache_dir", "/tmp/cc"),
        (["--chunked-prefill-size", "-1"], "chunked_prefill_size", -1),
        (["--chunked-prefill-size", "512"], "chunked_prefill_size", 512),
        (["--page-size", "1"], "page_size", 1),
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--kv-cache-dtype", "bf16"], "kv_cache_dtype", "bf16"),
        (["--schedule-policy", "lpm"], "schedule_policy", "lpm"),
        (["--attention-backend", "reference"], "attention_backend", "reference"),
        (["--revision", "v1.0"], "revision", "v1.0"),
        (["--mem-fraction-static", "0.8"], "mem_fraction_static", 0.8),
        (["--random-seed", "42"], "random_seed", 42),
        (["--skip-server-warmup"], "skip_server_warmup", True),
        (["--skip-tokenizer-init"], "skip_tokenizer_init", True),
        (["--disable-radix-cache"], "disable_radix_cache", True),
        (["--stream-output"], "stream_output", True),
        (["--allow-auto-truncate"], "allow_auto_truncate", True),
        (["--trust-remote-code"], "trust_remote_code", True),
        (["--api-key", "sk-1"], "api_key", "sk-1"),
        (["--served-model-name", "mine"], "served_model_name", "mine"),
        (["--weight-version", "v1"], "weight_version", "v1"),
        (["--log-level", "WARNING"], "log_level", "warning"),
        (["--max-running-requests", "8"], "max_running_requests", 8),
        (["--max-queued-requests", "100"], "max_queued_requests", 100),
        (["--decode-log-interval", "5"], "decode_log_interval", 5),
        (["--max-total-tokens", "4096"], "max_total_tokens", 4096),
        (["--max-prefill-tokens", "2048"], "max_prefill_tokens", 2048),
        (["--context-length", "2048"], "context_length", 2048),
        (["--stream-interval", "4"], "stream_interval", 4),
        (["--tokenizer-path", "/tok"], "tokenizer_path", "/tok"),
        (["--load-format", "safetensors"], "load_format", "safetensors"),
        (["--moe-backend", "reference"], "moe_backend", "reference"),
        (["--expert-distribution-recorder-mode", "per_token"], "expert_distribution_recorder_mode", "per_token"),
        (["--expert-distribution-recorder-buffer-size", "-1"], "expert_distribution_recorder_buffer_size", -1),
        (["--enable-cache-report"], "enable_cache_report", True),
        (["--sampling-defaults", "openai"], "sampling_defaults", "openai"),
        (["--chat-template", "{{ messages[0]['content'] }}"], "chat_template", "{{ messages[0]['content'] }}"),
        (["--enable-metrics"], "enable_metrics", True),
        (["--watchdog-timeout", "10.5"], "watchdog_timeout", 10.5),
        (["--graceful-shutdown-timeout", "5"], "graceful_shutdown_timeout", 5.0),
        (["--log-requests"], "log_requests", True),
        (["--log-requests-level", "3"], "log_requests_level", 3),
        (["--max-request-body-size", "1048576"], "max_request_body_size", 1048576),
        (["--request-read-timeout", "2.5"], "request_read_timeout", 2.5),
        (["--keep-alive-timeout", "30"], "keep_alive_timeout", 30.0),
    ],
)
def test_flags(argv, field, value):
    assert getattr(ServerArgs.from_cli(argv), field) == value


def test_load_balance_method_choices(capsys):
    assert ServerArgs.from_cli(["--load-balance-method", "shortest_queue"]).load_balance_method == "shortest_queue"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--load-balance-method", "minimum_tokens"])
    assert "invalid choice: 'minimum_tokens'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="load_balance_method must be one of"):
        ServerArgs(load_balance_method="random")


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--data-parallel-size", "2"], "dp_size", 2), (["--dp-size", "3"], "dp_size", 3),
    (["--tensor-parallel-size", "2"], "tp_size", 2), (["--tp-size", "4"], "tp_size", 4),
    (["--ep", "8"], "ep_size", 8), (["--ep-size", "2"], "ep_size", 2)])
def test_parallel_flags_parse(argv, field, value):
    """Accepted here; whether the model and devices take them is checked when the model loads (serving.mesh)."""
    assert getattr(ServerArgs.from_cli(argv), field) == value


def test_help_promises_nothing_that_is_not_there():
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    help_text = " ".join(parser.format_help().split())
    for promise in ("Crash if", "mount /metrics", "and metrics"):
        assert promise not in help_text, promise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"load_format": "pt"}, "--load-format pt is not supported yet; use one of auto, safetensors, gguf, orbax."),
        ({"load_format": "dummy"}, "--load-format dummy is not supported yet"),
        ({"load_format": "gguf", "model_path": "/models/llama"},
         "--load-format gguf needs a .gguf file as --model-path, got '/models/llama'."),
        ({"load_format": "safetensors", "model_path": "/models/llama.Q4_1.gguf"},
         "--load-format safetensors needs a Hugging Face directory or hub id as --model-path"),
    ],
)
def test_load_format_must_fit_the_model_path(kwargs, message):
    with pytest.raises(ValueError) as info:
        ServerArgs(**kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("model_path", "load_format"),
    [(None, "auto"), (None, "gguf"), (None, "safetensors"), ("/m/x.GGUF", "gguf"), ("/m/x.gguf", "auto"),
     ("/models/llama", "safetensors"), ("qwen/qwen2.5-0.5b-instruct", "safetensors")],
)
def test_load_format_accepted(model_path, load_format):
    assert ServerArgs(model_path=model_path, load_format=load_format).load_format == load_format


def test_load_format_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as info:
        ServerArgs.from_cli(["--load-format", "bitsandbytes"])
    assert info.value.code == 2
    assert "--load-format bitsandbytes is not supported yet" in capsys.readouterr().err


def test_compilation_cache_disabled():
    args = ServerArgs(disable_compilation_cache=True)
    assert args.effective_compilation_cache_dir() is None
    assert ServerArgs(compilation_cache_dir="~/cc").compilation_cache_dir == os.path.expanduser("~/cc")


def test_api_key_masked_in_server_info():
    args = ServerArgs(api_key="secret")
    assert args.api_key == "secret"
    info = args.to_dict()
    assert info["api_key"] is None
    assert "secret" not in json.dumps(info)


def test_preferred_sampling_params_parsed():
    raw = '{"temperature": 0.2, "max_new_tokens": 32}'
    args = ServerArgs.from_cli(["--preferred-sampling-params", raw])
    assert args.preferred_sampling_params == raw  # /get_model_info echoes the raw string
    assert args.preferred_sampling_params_dict == {"temperature": 0.2, "max_new_tokens": 32}
    assert args.to_dict()["preferred_sampling_params"] == raw


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port must be in [1, 65535], got 0."),
        ({"port": 70000}, "port must be in [1, 65535], got 70000."),
        ({"page_size": 0}, "page_size must be a power of two (1, 2, 4, ...), got 0."),
        ({"page_size": 12}, "page_size must be a power of two (1, 2, 4, ...), got 12."),
        ({"chunked_prefill_size": 0}, "chunked_prefill_size must be -1 (disable chunking) or at least 1, got 0."),
        ({"chunked_prefill_size": -2}, "chunked_prefill_size must be -1 (disable chunking) or at least 1, got -2."),
        ({"preferred_sampling_params": "[1, 2]"}, "preferred_sampling_params must be a JSON object, got '[1, 2]'."),
        ({"preferred_sampling_params": "{bad"}, "preferred_sampling_params is not valid JSON"),
        ({"preferred_sampling_params": '{"temprature": 1}'},
         "preferred_sampling_params: Unknown sampling parameter 'temprature'."),
        ({"preferred_sampling_params": '{"top_p": 0}'}, "preferred_sampling_params: top_p must be in (0, 1], got 0."),
        ({"dtype": "int8"}, "dtype must be one of auto, half, float16, bfloat16, float, float32; got 'int8'."),
        ({"schedule_policy": "random"}, "schedule_policy must be one of fcfs, lpm; got 'random'."),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype 'fp8_e5m2' is not supported yet; use one of auto, bf16, "
         "bfloat16."),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype must be one of auto, bf16, bfloat16; got 'int8'."),
        ({"attention_backend": "triton"}, "attention_backend must be one of auto, pallas, cpu, reference; got 'triton'."),
        ({"moe_backend": "x"}, "moe_backend must be one of auto, pallas, reference; got 'x'."),
        ({"log_level": "verbose"}, "log_level must be one of debug, info, warning, error, critical; got 'verbose'."),
        ({"sampling_defaults": "x"}, "sampling_defaults must be one of model, openai; got 'x'."),
        ({"chat_template": "chatml"}, "--chat-template 'chatml' is neither a file nor a Jinja template; SGLang's "
         "named chat templates are not supported yet."),
        ({"chat_template": "{{ x }}", "skip_tokenizer_init": True},
         "--chat-template needs a tokenizer; it cannot be combined with --skip-tokenizer-init."),
        ({"expert_distribution_recorder_mode": "stat_approx"},
         "expert_distribution_recorder_mode must be one of stat, per_pass, per_token; got 'stat_approx'."),
        ({"expert_distribution_recorder_buffer_size": 0},
         "expert_distribution_recorder_buffer_size must be -1 (unbounded) or at least 1, got 0."),
        ({"max_running_requests": 0}, "max_running_requests must be at least 1, got 0."),
        ({"max_queued_requests": 0}, "max_queued_requests must be at least 1, got 0."),
        ({"decode_log_interval": 0}, "decode_log_interval must be at least 1, got 0."),
        ({"max_total_tokens": 0}, "max_total_tokens must be at least 1, got 0."),
        ({"context_length": 0}, "context_length must be at least 1, got 0."),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens must be at least 1, got 0."),
        ({"stream_interval": 0}, "stream_interval must be at least 1, got 0."),
        ({"tp_size": 0}, "tp_size must be at least 1, got 0."),
        ({"dp_size": 0}, "dp_size must be at least 1, got 0."),
        ({"ep_size": 0}, "ep_size must be at least 1, got 0."),
        ({"mem_fraction_static": 0.0}, "mem_fraction_static must be in (0, 1], got 0.0."),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static must be in (0, 1], got 1.5."),
        ({"random_seed": -1}, "random_seed must be non-negative, got -1."),
        ({"watchdog_timeout": 0}, "watchdog_timeout must be positive, got 0."),
        ({"max_request_body_size": 100}, "max_request_body_size must be at least 1024, got 100."),
        ({"request_read_timeout": 0}, "request_read_timeout must be positive, got 0."),
        ({"keep_alive_timeout": float("nan")}, "keep_alive_timeout must be positive, got nan."),
        ({"log_requests_level": 4}, "log_requests_level must be 0, 1, 2 or 3, got 4."),
        ({"host": ""}, "host must be a non-empty string."),
        ({"load_format": ""}, "load_format must be a non-empty string."),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        ServerArgs(**kwargs)
    assert str(info.value).startswith(message)


def test_from_cli_reports_invalid_values_as_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        ServerArgs.from_cli(["--page-size", "12"])
    assert info.value.code == 2
    assert "page_size must be a power of two" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--port", "abc"], ["--no-such-flag"],
                                  ["--attention-backend", "triton"]])
def test_from_cli_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as info:
        ServerArgs.from_cli(argv)
    assert info.value.code == 2
    capsys.readouterr()


def test_add_cli_args_on_a_foreign_parser():
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    namespace = parser.parse_args(["--model", "x", "--disable-precompile"])
    assert namespace.model_path == "x" and namespace.precompile is False
    help_text = parser.format_help()
    for flag in ("--model-path", "--tensor-parallel-size", "--data-parallel-size", "--ep",
                 "--compilation-cache-dir", "--disable-compilation-cache", "--disable-precompile"):
        assert flag in help_text


def test_modules_import_without_jax():
    code = (
        "import sys; import serving.server_args, serving.protocol, serving.utils; "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
