"""Run a profile in an isolated process: the trial engine under ``fluxtune search`` and ``fluxtune bench``.

A worker owns one pipeline on one device. The parent sends :class:`RunRequest` messages (a validated
profile) and gets :class:`RunOutcome` messages back (a measurement, quality and timings), each after any
number of :class:`Progress` messages (where the run is); a worker that crashes or is killed takes only
its current run with it (:class:`WorkerDied`, which carries the last progress).
"""

from __future__ import annotations

from fluxtune.worker.client import Worker, WorkerDied
from fluxtune.worker.protocol import (
    DEFAULT_SESSION,
    ApplyTimings,
    Progress,
    Ready,
    Role,
    RunOutcome,
    RunRequest,
    ScanOutcome,
    ScanRequest,
    Status,
    WorkerSpec,
)

__all__ = ["DEFAULT_SESSION", "ApplyTimings", "Progress", "Ready", "Role", "RunOutcome", "RunRequest", "ScanOutcome",
           "ScanRequest", "Status", "Worker", "WorkerDied", "WorkerSpec"]
