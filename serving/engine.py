"""The one entry both the HTTP server and Python callers use.

`Engine(model_path=..., **server_args)` loads the model, sizes the KV cache, compiles the step buckets
and starts the scheduler thread. `generate()` / `async_generate()` take the same arguments as the
`/generate` body and return the same dicts; the HTTP layer calls `stream_outputs()` with a request that
`serving.protocol` already validated and formats the typed `Output`s it yields with `formatter()`.
Everything the HTTP layer asks goes through a method here, never through the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from checkpoints.resolve import resolve_model_dir
from serving import expert_stats, multihost
from serving.config import enable_compilation_cache, resolve_runtime_config
from serving.grammar import JsonWhitespace, grammar_key, make_grammars
from serving.logprobs import new_logprob_record
from serving.memory import MemoryControl
from serving.observers import finish_observers, internal_requests, observed_emit
from serving.pause import GenerationControl
from serving.pooled_requests import probe_request, run_pooled
from serving.protocol import (
    GenerateFormatter,
    GenerateItem,
    NormalizedGenerate,
    Output,
    RequestError,
    Unavailable,
    UpdateWeightsRequest,
    parse_generate_request,
)
from serving.protocol.pooling import NormalizedEncode
from serving.python_api import PythonAPI
from serving.replicas import Replica, ReplicaSet
from serving.request import Request, Task
from serving.router import Dispatch, Router
from serving.server_args import ServerArgs
from serving.server_info import server_info
from serving.tokenizer import IncrementalDetokenizer, Tokenizer
from serving.weights import WeightControl

logger = logging.getLogger(__name__)


class Engine(PythonAPI):
    def __init__(self, server_args: ServerArgs | None = None, **kwargs: Any):
        args = server_args or ServerArgs(**kwargs)
        self.server_args = args
        multihost.initialize_leader(args)  # --nnodes > 1: join the other hosts before anything touches a device
        if not args.disable_compilation_cache:
            enable_compilation_cache(args.compilation_cache_dir)
        self.model_dir = resolve_model_dir(args.model_path, revision=args.revision, load_format=args.load_format)
        self.model_path = args.model_path or str(self.model_dir)
        self.tokenizer_path = args.tokenizer_path or self.model_path
        self.served_model_name = args.served_model_name or self.model_path
        self.runtime = resolve_runtime_config(args)
        self.max_running_requests = self.runtime.max_running_requests
        self.chunked_prefill_size = self.runtime.chunked_prefill_size
        self.max_step_tokens = self.runtime.max_step_tokens
        executables = None if args.disable_compilation_cache else Path(args.compilation_cache_dir) / "executables"
        # `--dp-size` copies of the model, each on its own devices (serving/replicas.py); one with dp 1.
        self.replicas = ReplicaSet(self.model_dir, self.runtime, args, executables)
        self.runner = self.replicas[0].runner  # the model as served (config, task, backends): alike on every replica
        self.config = self.runner.config
        self.context_length = self.runner.context_length
        self.max_total_num_tokens = self.runner.kv_spec.max_total_tokens
        self.max_req_input_len = min(self.context_length - 1, self.max_total_num_tokens - 1)
        tokenizer_dir = resolve_model_dir(args.tokenizer_path) if args.tokenizer_path else self.model_dir
        self.tokenizer = None if args.skip_tokenizer_init else Tokenizer(tokenizer_dir)
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids = self._eos_ids()
        self.grammars = make_grammars(args.grammar_backend, tokenizer_dir, self.vocab_size, self.eos_token_ids,
                                      JsonWhitespace(args.constrained_json_whitespace_pattern,
                                                     not args.constrained_json_disable_any_whitespace))
        self.weight_version = args.weight_version
        self.preferred_sampling_params = (
            json.loads(args.preferred_sampling_params) if args.preferred_sampling_params else None
        )
        self._rng = random.Random(args.random_seed)
        # Ids of the requests in flight: a second request with one of them is refused (400), as SGLang
        # does, so an abort or an output can never reach the wrong request. A lock, because the Python
        # API runs its calls on event loops of their own threads.
        self._live_rids: set[str] = set()
        self._live_rids_lock = threading.Lock()
        self.replicas.prepare(args, self.runtime, self.grammars.mask_width)
        self.router = Router(args.load_balance_method, args.page_size,
                             [replica.runner.kv_spec.num_pages for replica in self.replicas])
        self.metrics, self.finish_observers = finish_observers(
            args, self.served_model_name, self.max_total_num_tokens * len(self.replicas))
        for scheduler in self.replicas.schedulers:
            scheduler.metrics = None if self.metrics is None else self.metrics.step_metrics()
        # Weights while serving, pause / continue, device memory release (serving/weights.py, pause.py, memory.py).
        self.weights, self.memory = WeightControl(self), MemoryControl(self)
        self.generation = GenerationControl(self.replicas)
        self.replicas.start()

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.config.eos_token_ids)
        gen_config = self.model_dir / "generation_config.json"
        if gen_config.exists():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(int(i) for i in ids)

    def shutdown(self) -> None:
        self.replicas.stop()

    # -- requests ---------------------------------------------------------------------------------
    def parse(self, body: object) -> NormalizedGenerate:
        return parse_generate_request(
            body, vocab_size=self.vocab_size, preferred_sampling_params=self.preferred_sampling_params,
            skip_tokenizer_init=self.server_args.skip_tokenizer_init,
        )

    @property
    def task(self) -> Task:
        """The task the served model performs (its class's `task` in `model.registry`)."""
        return Task(self.runner.task)

    def _make_request(self, item: GenerateItem, stream: bool, emit: Callable[[Output], None],
                      prefill_only: bool = False, task: Task = Task.GENERATE) -> Request:
        """Tokenize and check one item against the model's limits (RequestError -> HTTP 400)."""
        if task is not self.task:
            raise RequestError(f"This server's model serves {self.task.value} requests; {task.value} requests are "
                               "not supported by it.")
        sp = item.sampling
        input_ids = list(item.input_ids) if item.input_ids is not None else self.tokenizer.encode(item.text)
        n = len(input_ids)
        if n == 0:
            raise RequestError("input_ids cannot be empty.")
        if n >= self.context_length:
            if not self.server_args.allow_auto_truncate:
                raise RequestError(
                    f"The input ({n} tokens) is longer than the model's context length ({self.context_length} tokens)."
                )
            input_ids = input_ids[: self.context_length - 1]
            n = len(input_ids)
        if n > self.max_req_input_len:
            raise RequestError(
                f"Input length ({n} tokens) exceeds the maximum allowed length ({self.max_req_input_len} tokens). "
                "Use a shorter input or enable --allow-auto-truncate."
            )
        if task is not Task.GENERATE and n > self.max_step_tokens:
            # A pooled prompt runs whole in one step (see Scheduler._admit).
            raise RequestError(f"Input length ({n} tokens) exceeds the {self.max_step_tokens} tokens a pooled request "
                               "can run in one step; raise --chunked-prefill-size and --max-prefill-tokens.")
        max_new = 0 if prefill_only or task is not Task.GENERATE else sp.max_new_tokens
        if max_new is not None and max_new + n >= self.context_length:
            if not self.server_args.allow_auto_truncate:
                raise RequestError(
                    f"Requested token count exceeds the model's maximum context length of {self.context_length} "
                    f"tokens. You requested a total of {max_new + n} tokens: {n} tokens from the input messages "
                    f"and {max_new} tokens for the completion. Please reduce the number of tokens in the input "
                    "messages or the completion to fit within the limit."
                )
            max_new = None
        if max_new is None:
            max_new = min(self.context_length, self.max_total_num_tokens) - n - 1
        stop_ids = frozenset() if sp.ignore_eos else self.eos_token_ids | frozenset(sp.stop_token_ids)
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens)
        seed = (sp.sampling_seed & 0xFFFFFFFF) if sp.sampling_seed is not None else self._rng.getrandbits(31)
        request = Request(
            rid=item.rid, index=item.index, input_ids=input_ids, sampling=sp, task=task,
            max_new_tokens=max_new, seed=seed, stop_ids=stop_ids, stream=stream,
            stream_interval=sp.stream_interval or self.server_args.stream_interval, emit=emit,
            detokenizer=detok, grammar=self.grammars.matcher(sp),
            logprobs=None if prefill_only else new_logprob_record(item.logprobs, input_ids, max_new, self.tokenizer),
        )
        if not prefill_only:  # an n > 1 prefix warm-up copy is not a request of its own
            request.emit = observed_emit(request, emit, self.finish_observers)
        return request

    def formatter(self, request: NormalizedGenerate) -> GenerateFormatter:
        """Formats this call's outputs as `/generate` does (one formatter per call: it keeps per-item
        stream state)."""
        return GenerateFormatter(
            weight_version=self.weight_version, with_text=self.tokenizer is not None, stream=request.stream,
            is_batch=request.is_batch, stream_output=self.server_args.stream_output,
        )

    def _claim_rids(self, rids: list[str]) -> None:
        with self._live_rids_lock:
            seen: set[str] = set()
            for rid in rids:  # already in flight, or twice in this call (a pooled batch's rid list)
                if rid in self._live_rids or rid in seen:
                    raise RequestError(f"Duplicate request ID detected: {rid}")
                seen.add(rid)
            self._live_rids.update(rids)

    def _release_rids(self, rids: list[str]) -> None:
        with self._live_rids_lock:
            self._live_rids.difference_update(rids)

    async def stream_outputs(self, request: NormalizedGenerate, task: Task = Task.GENERATE) -> AsyncIterator[Output]:
        """Yield each item's outputs as they arrive (`Output.index` says which item); every item ends
        with a finished output. Only the served model's task is accepted, and no rid already in flight
        (RequestError otherwise).

        If the consumer stops early (client disconnect, cancellation, an error response), the unfinished
        requests are aborted so their pages are freed.
        """
        problem = self.health_problem()
        if problem is not None:
            raise Unavailable(problem)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def emit(out: Output) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        rank = request.data_parallel_rank
        if rank is not None and rank >= len(self.replicas):
            raise RequestError(f"data_parallel_rank {rank} is out of range: this server runs {len(self.replicas)} "
                               "data-parallel replicas (--dp-size).")
        rids = [item.rid for item in request.items]
        self._claim_rids(rids)
        pending: set[str] = set()
        dispatch = Dispatch(self.router, self.replicas.schedulers)  # each prompt's replica (serving/router.py)
        try:
            if any(grammar_key(item.sampling) for item in request.items):  # compile off the event loop
                await asyncio.to_thread(lambda: [self.grammars.matcher(item.sampling) for item in request.items])
            if request.n > 1 and not self.server_args.disable_radix_cache:
                # Like SGLang: one prefill-only copy per prompt first, so the n samples share its prefix.
                warm = {}
                for item in request.items:
                    key = item.text if item.input_ids is None else tuple(item.input_ids)
                    warm.setdefault(key, item)
                warm_reqs = [self._make_request(item, False, emit, prefill_only=True, task=task)
                             for item in warm.values()]
                for r in warm_reqs:
                    r.rid = f"{r.rid}_warmup"
                pending = {r.rid for r in warm_reqs}
                for r in warm_reqs:
                    dispatch.submit(r, rank)
                while pending:
                    rid = (await outputs.get()).rid
                    pending.discard(rid)
                    dispatch.finished(rid)
            requests = [self._make_request(item, request.stream, emit, task=task) for item in request.items]
            pending = {r.rid for r in requests}
            for r in requests:
                dispatch.submit(r, rank)
            while pending:
                out = await outputs.get()
                if out.finished:
                    pending.discard(out.rid)
                    dispatch.finished(out.rid)
                yield out
        finally:
            # Exact ids: a prefix match would also abort another client's request whose id extends this one.
            dispatch.abort(pending, cause="client disconnected or response ended")
            self._release_rids(rids)

    async def generate_request(self, request: NormalizedGenerate) -> dict | list[dict]:
        """The `/generate` body of a validated request, run to the end (aborts included)."""
        formatter = self.formatter(request)
        async for out in self.stream_outputs(request):
            formatter.collect(out)
        return formatter.response()

    async def encode_request(self, request: NormalizedEncode) -> list[Output]:
        """Embeddings / scores of a validated pooled request, in input order (serving/pooled_requests.py);
        RequestError on a generation model, pairs for a model that is not a cross-encoder, and so on."""
        return await run_pooled(self, request)

    async def probe(self, body: dict[str, Any]) -> None:
        """Warm-up and health check: a /generate body, run as an encode request on a pooled model (neither
        counted in /metrics nor logged by --log-requests)."""
        with internal_requests():
            if self.task is Task.GENERATE:
                reason = (await self.generate_request(self.parse(body)))["meta_info"]["finish_reason"]
                if reason is not None and reason["type"] == "abort":  # e.g. refused by a full queue
                    raise RequestError(f"The probe request was aborted: {reason['message']}")
            else:
                await self.encode_request(probe_request(body))

    @property
    def num_live_requests(self) -> int:
        """Requests accepted and not yet answered (graceful shutdown waits for none)."""
        return len(self._live_rids)

    def health_problem(self) -> str | None:
        """Why the engine cannot serve at all now (faults.py; any replica's), else None."""
        return self.replicas.health_problem()

    @property
    def steps_done(self) -> int:
        """Steps that completed, on any replica: a health check counts any as progress (SGLang's busy-server rule)."""
        return self.replicas.steps_done

    async def update_weights_from_disk(self, request: UpdateWeightsRequest) -> dict[str, Any]:
        """Swap in another checkpoint between steps (serving/weights.py); the old weights stay on failure."""
        return await self.weights.update_from_disk(request)

    # -- control and information (awaitables read on the scheduler thread, between two steps) --------
    async def flush_cache(self, timeout: float = 0.0) -> bool:
        """Drop the prefix cache (and the compiled grammars, as SGLang); False (nothing done) while requests
        hold pages after `timeout` seconds."""
        flushed = await self.generation.flush_cache(timeout)
        if flushed:
            self.grammars.clear()
            self.router.forget_prefixes()
        return flushed

    async def expert_distribution(self, action: str) -> list[Path]:
        """`start`, `stop` or `dump` the expert-distribution record, on the scheduler thread between two
        steps; a dump's files are written off it (their paths returned). Each data-parallel replica keeps its
        own record and dumps its own files (SGLang's per-rank dumps, `rank` = the replica's). RequestError
        (400) when this server records nothing (no recorder mode, or a dense model)."""
        if self.replicas[0].expert_recorder is None:
            raise RequestError(expert_stats.unavailable_message(
                self.server_args.expert_distribution_recorder_mode, self.config.architecture, self.config.num_experts))
        results = await self.replicas.each(lambda replica: getattr(replica.expert_recorder, action)())
        if action != "dump":
            return []
        files = []
        for rank, dump in enumerate(results):
            files += await asyncio.to_thread(expert_stats.write_dump, dump, rank if len(results) > 1 else None)
        return files

    def abort(self, rid: str, abort_all: bool = False, cause: str = "/abort_request") -> None:
        """Abort the request `rid` (and what derives from it: the scheduler matches ids by prefix), or every
        request with `abort_all`; `cause` is logged. Ignored unless `rid` is in flight (contract 5.14): an
        empty or partial id must not abort everyone else's requests."""
        with self._live_rids_lock:
            known = rid in self._live_rids
        if abort_all or known:  # on every replica: only the one running it has anything to abort
            self.replicas.abort(rid, abort_all, cause=cause)

    async def get_load(self) -> list[dict[str, int]]:
        """Per replica, in rank order: `num_reqs` (running + waiting), `num_waiting_reqs`, `num_tokens` (KV in
        use + queued)."""
        return await self.replicas.each(lambda replica: replica.scheduler.load())

    async def metrics_text(self) -> bytes:
        """`/metrics`' body (only with --enable-metrics): the load gauges read between two steps of each
        replica and summed, then every series."""
        self.metrics.set_gauges(await self.replicas.each(lambda replica: self.metrics.gauge_values(replica.scheduler)))
        return self.metrics.render()

    async def get_server_info(self) -> dict[str, Any]:
        """`server_info()` with each replica's page counts read on its scheduler thread."""
        return self.server_info(await self.replicas.each(Replica.page_counts))

    def model_info(self) -> dict[str, Any]:
        """`/get_model_info`'s body (contract 5.1, the 0.5.6 keys we have)."""
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "is_generation": self.task is Task.GENERATE,
                "preferred_sampling_params": self.server_args.preferred_sampling_params,
                "weight_version": self.weight_version}

    def page_counts(self) -> dict[str, int]:
        """Page states summed over the replicas, each read on its scheduler thread."""
        futures = [replica.scheduler.call(replica.page_counts) for replica in self.replicas]
        counts = [future.result() for future in futures]
        return {key: sum(count[key] for count in counts) for key in counts[0]}

    def server_info(self, page_counts: list[dict[str, int]] | None = None) -> dict[str, Any]:
        """`/get_server_info`'s body; `page_counts` per replica (None: not read)."""
        return server_info(self, page_counts)
