"""Fault injection for tests/test_faults.py: Python imports this module at start-up when tests/faults is
on PYTHONPATH, and with $PALLAS_TEST_FAULTS set it wraps `ModelRunner.run` so that a step whose tokens
hold a trigger id three times in a row misbehaves (a prompt asks for it; a decode step, one sampled
token per sequence, practically never does). Nothing in the server knows about it.

PALLAS_TEST_FAULTS is a comma-separated list of `kind:token_id[:seconds]`:
- `raise`: the step raises before computing anything;
- `lose-cache`: the cache array is deleted (as a buffer donated to a failing computation is), then the
  step raises;
- `hang`: the step sleeps `seconds` first, then runs normally;
- `die`: the step raises a BaseException, which ends the scheduler thread.
"""

import os
import time

_SPEC = os.environ.get("PALLAS_TEST_FAULTS")


class InjectedDeath(BaseException):
    """Not an Exception: nothing in the scheduler catches it, so its thread ends."""


if _SPEC:
    import serving.runner as _runner_module

    _FAULTS = []
    for entry in _SPEC.split(","):
        kind, token, *rest = entry.split(":")
        _FAULTS.append((kind, int(token), float(rest[0]) if rest else 0.0))
    _original_run = _runner_module.ModelRunner.run

    def _triggered(ids, token):
        return any(ids[i] == ids[i + 1] == ids[i + 2] == token for i in range(len(ids) - 2))

    def _run(self, host):
        ids = host.input_ids.tolist()
        for kind, token, seconds in _FAULTS:
            if not _triggered(ids, token):
                continue
            if kind == "raise":
                raise RuntimeError("injected fault")
            if kind == "lose-cache":
                self.kv_pages.delete()
                raise RuntimeError("injected fault after the cache was donated")
            if kind == "hang":
                time.sleep(seconds)
            if kind == "die":
                raise InjectedDeath("injected scheduler death")
        return _original_run(self, host)

    _runner_module.ModelRunner.run = _run
