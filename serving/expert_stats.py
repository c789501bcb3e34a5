"""The expert-distribution recorder: which experts the router picks, per forward pass, and the dump files.

`--expert-distribution-recorder-mode` makes the runner's step return the router's choices as auxiliary
outputs (`aux_outputs_for`): `expert_counts int32[layers, experts]`, counted on device from the top-k ids
of the step's real tokens (padding never counts), and in `per_token` mode also `expert_ids int32[layers,
tokens, top_k]`. The runner hands them here after every step (`record`, on the scheduler thread), one
forward pass each; the HTTP routes start, stop and dump through `Engine.expert_distribution`.

Modes (SGLang's `expert_distribution.py`):
- `stat`: a circular buffer of `buffer_size` passes (`-1`: grows without bound) of `[layers, experts]`
  counts; dumped as `logical_count int32[buffer_steps, layers, experts]` (rows of unfilled slots are
  zeros; users sum over axis 0).
- `per_pass`: one record per pass (the last `buffer_size` kept): `forward_pass_id`, `global_physical_count`.
- `per_token`: `per_pass` plus the pass's tokens: `input_ids`, `positions`, `extend_seq_lens` and
  `topk_ids_of_layer`, concatenated over the passes (`num_tokens` / `num_seqs` per pass say where each
  pass's part starts).

A dump writes `expert_distribution_recorder_<unix time>.npz` (those arrays) and `.csv`
(`layer_id,expert_id,count`, the sum over every recorded pass) into
`$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR` (default: the system temp dir), then resets the record.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MODES = ("stat", "per_pass", "per_token")
DEFAULT_BUFFER_SIZE = 1000  # SGLang's default (--eplb-rebalance-num-iterations)
_AUX = {"stat": ("expert_counts",), "per_pass": ("expert_counts",), "per_token": ("expert_counts", "expert_ids")}


def aux_outputs_for(mode: str | None) -> tuple[str, ...]:
    """The aux outputs the runner's step must return for recorder `mode` (none when off)."""
    return _AUX.get(mode, ()) if mode else ()


def unavailable_message(mode: str | None, architecture: str, num_experts: int) -> str | None:
    """Why the expert-distribution routes cannot work on this server (their 400), or None."""
    if mode is None:
        return ("Expert distribution recording is off: start the server with "
                "--expert-distribution-recorder-mode stat (or per_pass, per_token).")
    if not num_experts:
        return (f"Expert distribution recording needs a mixture-of-experts model; {architecture} has no "
                f"experts, so --expert-distribution-recorder-mode {mode} records nothing.")
    return None


@dataclass
class Dump:
    """What one dump writes: the npz arrays and the per-layer, per-expert totals."""

    mode: str
    arrays: dict[str, np.ndarray]
    totals: np.ndarray  # int64[layers, experts]
    directory: Path = field(default_factory=lambda: Path(os.environ.get(
        "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR") or tempfile.gettempdir()))


class ExpertDistributionRecorder:
    """Host-side accumulation of the step's router counts. Every method runs on the scheduler thread
    (the engine sends the routes' calls there), so no lock is needed."""

    def __init__(self, mode: str, buffer_size: int | None, num_layers: int, num_experts: int):
        if mode not in MODES:
            raise ValueError(f"expert recorder mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.buffer_size = DEFAULT_BUFFER_SIZE if buffer_size is None else buffer_size
        self.num_layers, self.num_experts = num_layers, num_experts
        self.recording = False
        self._reset()

    def _reset(self) -> None:
        self.num_passes = 0
        self._totals = np.zeros((self.num_layers, self.num_experts), np.int64)
        bounded = self.buffer_size != -1
        if self.mode == "stat":
            self._counts = np.zeros((self.buffer_size if bounded else 0, self.num_layers, self.num_experts),
                                    np.int32)
            self._grown: list[np.ndarray] = []
        else:
            self._records: deque[dict[str, np.ndarray]] = deque(maxlen=self.buffer_size if bounded else None)

    # -- the routes ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.recording:
            logger.warning("expert distribution recording was already on; the earlier record is dropped")
        self._reset()
        self.recording = True

    def stop(self) -> None:
        if not self.recording:
            logger.warning("expert distribution recording was not on")
        self.recording = False

    def dump(self) -> Dump:
        """The record so far (then reset; recording goes on if it was on)."""
        if self.mode == "stat":
            counts = self._counts if self.buffer_size != -1 else (
                np.stack(self._grown) if self._grown else np.zeros((0, self.num_layers, self.num_experts), np.int32))
            arrays = {"rank": np.int32(0), "logical_count": counts.astype(np.int32)}
        else:
            arrays = self._records_arrays()
        result = Dump(self.mode, arrays, self._totals.copy())
        self._reset()
        return result

    # -- the runner's hook --------------------------------------------------------------------------
    def record(self, aux: dict[str, np.ndarray], host) -> None:
        """One forward pass: `aux` as `ModelRunner.last_aux`, `host` the step's `HostBatch`."""
        if not self.recording or "expert_counts" not in aux:
            return
        counts = np.asarray(aux["expert_counts"], np.int32)  # [layers, experts]
        self._totals += counts
        pass_id = self.num_passes
        self.num_passes += 1
        if self.mode == "stat":
            if self.buffer_size == -1:
                self._grown.append(counts)
            else:
                self._counts[pass_id % self.buffer_size] = counts
            return
        entry = {"forward_pass_id": np.int64(pass_id), "global_physical_count": counts}
        if self.mode == "per_token":
            entry.update(input_ids=np.asarray(host.input_ids, np.int32), positions=np.asarray(host.positions, np.int32),
                         extend_seq_lens=np.asarray(host.q_lens, np.int32),
                         topk_ids_of_layer=np.asarray(aux["expert_ids"], np.int32))
        self._records.append(entry)

    def _records_arrays(self) -> dict[str, np.ndarray]:
        records = list(self._records)
        shape = (self.num_layers, self.num_experts)
        arrays = {
            "rank": np.int32(0),
            "forward_pass_id": np.array([r["forward_pass_id"] for r in records], np.int64),
            "global_physical_count": (np.stack([r["global_physical_count"] for r in records]) if records
                                      else np.zeros((0, *shape), np.int32)),
        }
        if self.mode == "per_token":
            def cat(key, axis=0, empty=(0,)):
                parts = [r[key] for r in records]
                return np.concatenate(parts, axis=axis) if parts else np.zeros(empty, np.int32)

            arrays.update(
                input_ids=cat("input_ids"), positions=cat("positions"), extend_seq_lens=cat("extend_seq_lens"),
                num_tokens=np.array([len(r["input_ids"]) for r in records], np.int32),
                num_seqs=np.array([len(r["extend_seq_lens"]) for r in records], np.int32),
                topk_ids_of_layer=cat("topk_ids_of_layer", axis=1, empty=(self.num_layers, 0, 0)),
            )
        return arrays


def write_dump(dump: Dump, rank: int | None = None) -> list[Path]:
    """Write `<dir>/expert_distribution_recorder_<time>.npz` and `.csv`; returns the two paths. A
    data-parallel replica's dump (`rank`) has `_rank<rank>` after the time and its rank in the npz."""
    dump.directory.mkdir(parents=True, exist_ok=True)
    stem = f"expert_distribution_recorder_{time.time():.6f}"
    if rank is not None:
        stem += f"_rank{rank}"
        dump.arrays["rank"] = np.int32(rank)
    npz, csv = dump.directory / f"{stem}.npz", dump.directory / f"{stem}.csv"
    np.savez(npz, **dump.arrays)
    layers, experts = np.indices(dump.totals.shape)
    rows = np.stack([layers.ravel(), experts.ravel(), dump.totals.ravel()], axis=1)
    np.savetxt(csv, rows, fmt="%d", delimiter=",", header="layer_id,expert_id,count", comments="")
    logger.info("expert distribution (%s mode) written to %s and %s", dump.mode, npz, csv)
    return [npz, csv]
