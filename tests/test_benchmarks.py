"""The benchmark scripts import, parse their flags and render their table (on made-up numbers): they run
outside the suite (llama.cpp is never built here), so this keeps them from rotting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # last: benchmarks/serving.py must not shadow the `serving` package

import copy_bandwidth  # noqa: E402
import cpu_attention  # noqa: E402
import llama_cpp  # noqa: E402
import restart  # noqa: E402

_spec = importlib.util.spec_from_file_location("serving_benchmark", BENCHMARKS / "serving.py")
serving_bench = sys.modules["serving_benchmark"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(serving_bench)


def test_flags():
    args = serving_bench.parse_args([])
    assert args.dtypes == ["float32", "bfloat16"] and args.peers == ["llama.cpp", "transformers"]
    assert args.concurrency == [1, 64] and args.prefill_lengths == [512, 4096] and not args.skip_build
    args = serving_bench.parse_args(["--peers", "none", "--dtypes", "bfloat16", "--skip-build", "--output", "-"])
    assert args.peers == [] and args.dtypes == ["bfloat16"] and args.skip_build
    with pytest.raises(SystemExit):
        serving_bench.parse_args(["--dtypes", "float16"])
    with pytest.raises(SystemExit):
        restart.main(["--repeat", "x"])


def test_table_and_report(tmp_path):
    load = {"throughput": 40.0, "ttft": 0.25, "tpot": 0.030}
    rows = [serving_bench.Row("pallas-serve", "float32", {1: load, 64: {**load, "throughput": 200.0}},
                              {512: 2.0, 4096: 20.48}),
            serving_bench.Row("llama-server", "bfloat16", {1: load}, {512: 1.0}, note="llama-bench pp512 454 tok/s"),
            serving_bench.Row("transformers generate", "float32",
                              {1: {"throughput": 13.8, "ttft": float("nan"), "tpot": float("nan")}})]
    table = serving_bench.render_table(rows, [1, 64], [512, 4096]).splitlines()
    assert table[0].startswith("| engine | dtype | 1 stream tok/s | 64 concurrent tok/s |")
    assert "| pallas-serve | float32 | 40.0 | 200.0 | 0.250 | 0.250 | 30.0 | 30.0 | 2.00 (256) | 20.48 (200) |" in table
    assert table[3] == "| llama-server | bfloat16 | 40.0 | — | 0.250 | — | 30.0 | — | 1.00 (512) | — |"
    assert table[4].startswith("| transformers generate | float32 | 13.8 | — | — |")
    args = serving_bench.parse_args(["--peers", "none"])
    args.model_name = "tiny"
    text = serving_bench.render_report(rows, args, bandwidth=30e9, weight_bytes=538_000_000, restarts=[4.0, 5.0, 4.5])
    assert "30.0 GB/s" in text and "capped at 56 tok/s in float32" in text and "112 tok/s in bfloat16" in text
    assert "median 4.5 s" in text and "llama-bench pp512 454 tok/s" in text
    # The generated top is replaced; the kept sections below it stay.
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nold table\n\n## Where the time goes\n\nhistory\n")
    serving_bench.write_report(text, str(out))
    written = out.read_text()
    assert written.startswith(text) and written.endswith("## Where the time goes\n\nhistory\n")
    assert "old table" not in written


def test_llama_cpp_protocol(tmp_path, monkeypatch):
    body = llama_cpp.completion_body([5, 6, 7], 16)
    assert body == {"prompt": [5, 6, 7], "n_predict": 16, "ignore_eos": True, "temperature": 0, "stream": True,
                    "cache_prompt": False}
    assert llama_cpp.count_tokens({"content": "a", "tokens": [9]}, 3) == 4
    assert llama_cpp.count_tokens({"content": "", "stop": True, "timings": {}}, 4) == 4
    # An unfinished build is not taken for a cached one.
    monkeypatch.setattr(llama_cpp, "CACHE_ROOT", tmp_path)
    (tmp_path / "llama.cpp-0.0.1" / "bin").mkdir(parents=True)
    (tmp_path / "llama.cpp-0.0.1" / "bin" / "llama-server").touch()
    assert llama_cpp.cached_build_dir() is None
    (tmp_path / "llama.cpp-0.0.1" / "bin" / "llama-bench").touch()
    (tmp_path / "llama.cpp-0.0.1" / "src").mkdir()
    assert llama_cpp.cached_build_dir() == tmp_path / "llama.cpp-0.0.1"


def test_copy_bandwidth_runs():
    assert copy_bandwidth.copy_bandwidth(threads=2, megabytes=4, repeats=2) > 0


def test_cpu_attention_table(capsys):
    """The attention benchmark on its smallest shape, once (it runs the kernel: skipped where it does not build)."""
    from kernels.attention import cpu
    if not cpu.available():
        pytest.skip(f"the CPU attention kernel is unavailable: {cpu._load()}")
    cpu_attention.main(["--shapes", "prefill", "--dtypes", "float32", "--repeats", "1"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| shape | cache dtype | kernel ms")
    assert table[2].startswith("| prefill 128 on 0 x 4 | float32 |")


def test_read_chain_builds_and_reads():
    """read_bandwidth.py's reader (a C++ file built on first use) reads a small chain; the default model's
    decode chain is its 121 weights: 538 MB in float32."""
    import read_bandwidth
    sizes = read_bandwidth.decode_chain_bytes(4)
    assert len(sizes) == 121 and round(sum(sizes) / 1e6) == 538
    seconds = read_bandwidth.read_chain_seconds([1 << 16, 3 << 12, 4099], rounds=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
