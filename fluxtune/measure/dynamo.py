"""Counting what TorchDynamo compiles (and recompiles) inside a block."""

from __future__ import annotations


class DynamoWatch:
    """What TorchDynamo compiled inside a ``with`` block.

    ``frames``: frames handed to Dynamo's compiler (``counters["frames"]["total"]``; a cache hit runs the
    compiled code without coming here, so in steady state this stays 0). ``recompiles``: guard failures
    that sent an already compiled frame back to the compiler (``guard_failures``, one per failed cache
    entry). Both move even when ``error_on_recompile`` aborts the recompilation.
    """

    @staticmethod
    def _now() -> tuple[int, int]:
        from torch._dynamo.utils import counters, guard_failures

        return counters["frames"]["total"], sum(len(v) for v in guard_failures.values())

    def __enter__(self) -> DynamoWatch:
        self._start = self._now()
        self.frames = self.recompiles = 0
        return self

    def __exit__(self, *exc: object) -> None:
        frames, failures = self._now()
        self.frames, self.recompiles = frames - self._start[0], failures - self._start[1]
