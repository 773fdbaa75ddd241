"""The one vocabulary for how a run ended, shared by measure, the worker, the search and the bench."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """How a run (a measurement, a trial, a bench candidate) ended.

    A ``StrEnum`` compares equal to, and serialises as, its value, so study ``user_attrs`` and
    ``bench.json`` keep the strings they always had.
    """

    OK = "ok"
    OOM = "oom"
    OVER_BUDGET = "over_budget"
    ERROR = "error"
    INVALID = "invalid"  # the profile does not apply to this pipeline or machine
    CRASHED = "crashed"  # the worker process died
    TIMEOUT = "timeout"
    SKIPPED = "skipped"  # the memory model said it cannot fit; not run
    NO_FIT = "no_fit"  # the weights alone exceed the cap; not run
    PRUNED = "pruned"  # stopped after its first warm steps: projected clearly slower than the incumbent

    def did_not_fit(self) -> bool:
        """Ran out of memory, went over the budget, or was predicted not to fit."""
        return self in (Status.OOM, Status.OVER_BUDGET, Status.NO_FIT)

    def measured(self) -> bool:
        """Ran to the end of its measurement (within the budget or not)."""
        return self in (Status.OK, Status.OVER_BUDGET)
