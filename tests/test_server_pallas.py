"""`--attention-backend pallas` on CPU runs the Pallas kernels in interpret mode through the real server:
a user can check the kernel path end to end on any machine. Greedy output must equal transformers'."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy


def test_pallas_attention_backend_through_the_server(tmp_path):
    # head_dim 64 (hidden 128 / 2 heads), GQA 2: a shape the kernels take.
    path = make_tiny_checkpoint(tmp_path / "hd64", "llama", hidden_size=128, num_attention_heads=2,
                                num_key_value_heads=1)
    server = ServerProcess(path, "--attention-backend", "pallas", "--page-size", "4", "--max-total-tokens", "256",
                           "--max-running-requests", "2", "--chunked-prefill-size", "8")
    try:
        rng = np.random.default_rng(replayable_seed("PALLAS_SERVER_SEED"))
        prompts = [rng.integers(3, 384, size=n).tolist() for n in (5, 11)]  # 11 > chunk: chunked prefill
        out = server.post("/generate", json={"input_ids": prompts, "sampling_params": {
            "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}).json()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for ids, result in zip(prompts, out, strict=True):
            assert_greedy(hf, ids, result["output_ids"], 6)
        # What runs, not the flag: on CPU `pallas` is the GPU (Triton) kernel in interpret mode.
        assert server.get("/get_server_info").json()["attention_backend"] == "pallas_gpu_interpret"
    finally:
        assert server.stop() == 0
