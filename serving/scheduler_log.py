"""What the scheduler writes to the log: one line per aborted request, and SGLang's batch lines.

Operators grep the abort line (SGLang's own abort tests look for "Abort" in the server log) and tail
the batch lines to see load. The batch lines follow SGLang's wording (`Prefill batch. #new-seq: ...`,
`Decode batch. #running-req: ... gen throughput (token/s): ..., #queue-req: ...`) without its
CUDA-graph field, so log scrapers written for SGLang read them. A prefill line is written for each step
that runs prefill chunks, as SGLang does; the decode line only every `--decode-log-interval` decode
steps, so its volume does not follow the step rate (tens of steps a second).
"""

from __future__ import annotations

import logging
import time

from serving.protocol import FinishReason

logger = logging.getLogger("serving.scheduler")


class SchedulerLog:
    def __init__(self, decode_log_interval: int, max_total_tokens: int):
        self.decode_log_interval = decode_log_interval
        self.max_total_tokens = max(max_total_tokens, 1)
        self.decode_steps = 0
        self.generated_since_log = 0
        self.last_decode_log = time.monotonic()

    @staticmethod
    def abort(rid: str, where: str, reason: FinishReason, cause: str | None = None) -> None:
        """One line per aborted request: its id, where it was (waiting, running, arriving) and why."""
        because = f" ({cause})" if cause else ""
        logger.info("Abort request %s in %s: %s%s", rid, where, reason.message, because)

    def after_step(self, *, new_seqs: int, prefill_tokens: int, cached_tokens: int, decodes: int,
                   generated: int, running: int, queued: int, used_tokens: int) -> None:
        """Called once per step with what it ran: `running` counts the requests in the step's batch (the
        `new_seqs` it admitted included), `queued` those left waiting after it."""
        usage = used_tokens / self.max_total_tokens
        if prefill_tokens and logger.isEnabledFor(logging.INFO):
            logger.info(
                "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                "#running-req: %d, #queue-req: %d", new_seqs, prefill_tokens, cached_tokens, usage,
                running - new_seqs, queued)
        self.generated_since_log += generated
        if not decodes:
            return
        self.decode_steps += 1
        if self.decode_steps % self.decode_log_interval:
            return
        now = time.monotonic()
        elapsed = now - self.last_decode_log
        throughput = self.generated_since_log / elapsed if elapsed > 0 else 0.0
        self.generated_since_log = 0
        self.last_decode_log = now
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
            "#queue-req: %d", running, used_tokens, usage, throughput, queued)
