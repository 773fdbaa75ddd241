"""Worker sessions that misbehave on purpose (``WorkerSpec.session`` points a worker at one)."""

from __future__ import annotations

import os
import time

from fluxtune.worker.protocol import Progress, RunOutcome, RunRequest
from fluxtune.worker.session import TrialSession


class CrashOnTrial1(TrialSession):
    """Dies abruptly, as a segfault or the OOM killer would, when it is sent trial 1."""

    def run(self, req: RunRequest) -> RunOutcome:
        if req.trial == 1:
            os._exit(1)
        return super().run(req)


class KeepsOldPipelines(TrialSession):
    """Holds every pipeline it replaces, as a leak would (issue 15: a restore left ~6 GB on an H200)."""

    def _restore(self) -> None:
        self.__dict__.setdefault("kept", []).append(self.pipe)
        super()._restore()


class DiesInQuantize(TrialSession):
    """Dies abruptly once apply reaches quantization, having told the parent so (as the OOM killer would
    end a quantization that runs out of host memory)."""

    def report(self, progress: Progress) -> None:
        super().report(progress)
        if progress.stage == "apply" and progress.detail == "quantize":
            os._exit(3)


class HangsAfterRun2(TrialSession):
    """Never starts its third timed call, as a call that takes far longer than the others would: the
    parent's time limit ends it, with two runs measured."""

    def report(self, progress: Progress) -> None:
        super().report(progress)
        if progress.stage == "run" and progress.runs_done == 2:
            time.sleep(3600)  # killed by the parent long before
