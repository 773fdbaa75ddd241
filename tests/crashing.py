"""Worker sessions that misbehave on purpose (``WorkerSpec.session`` points a worker at one)."""

from __future__ import annotations

import os

from fluxtune.worker.protocol import RunOutcome, RunRequest
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
