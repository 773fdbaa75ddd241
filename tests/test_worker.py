"""The trial engine: a session that runs one profile after another on one loaded pipeline, and the
process around it."""

from __future__ import annotations

import pytest

from fluxtune.worker import RunRequest, Status, WorkerSpec
from fluxtune.worker.session import TrialSession, worker_main

WORKLOAD = {"prompts": ["a fox"], "steps": 1, "height": 64, "width": 64, "runs": 1, "warmup": 0}


def _profile(**sections):
    from fluxtune.profile import validate_profile

    data = {"name": "t", "generation": {"steps": 1, "height": 64, "width": 64}, **sections}
    return validate_profile(data, source="test")


def _active_backend() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return str(_AttentionBackendRegistry.get_active_backend()[0].value)


@pytest.fixture
def session(tmp_path):
    spec = WorkerSpec(model="tiny-flux", device="cpu", dtype="float32", workload=WORKLOAD, budget_bytes=None,
                      study_dir=str(tmp_path))
    s = TrialSession(spec)
    yield s
    from fluxtune.tuning.attention import reset_default_backend

    reset_default_backend()  # never leak a backend into the next test, whatever this one found


def test_native_trial_after_another_backend_runs_native(session):
    """A trial restored to pristine weights (its irreversible knobs differ) also gets diffusers'
    process-wide attention backend back: ``native`` after ``_native_math`` really runs native."""
    first = session.run(RunRequest(_profile(attention={"backend": "_native_math"})))
    assert first.status == Status.OK, first.error
    assert _active_backend() == "_native_math"
    # Quantization cannot change in place: the session starts the second trial from pristine weights.
    second = session.run(RunRequest(_profile(transformer={"quantize": {"method": "int8_weight"}})))
    assert second.status == Status.OK, second.error
    assert _active_backend() == "native"


def test_a_run_sends_its_measurement_without_tensors(session):
    out = session.run(RunRequest(_profile(), trial=3))
    assert out.status == Status.OK and out.trial == 3 and out.measurement is not None
    assert out.measurement.images is None and out.measurement.latency_s is not None
    assert out.measurement_data()["images_shape"] == [1, 3, 64, 64]
    assert out.timings.apply_s is not None and out.timings.parts is not None


def test_a_restore_frees_the_old_weights_even_when_something_holds_the_old_pipeline(tmp_path):
    """What outlives a restore (here the session itself keeps every replaced pipeline, as a stray
    reference did on an H200: the reference's whole pipeline stayed, page-locked copies included)
    holds modules without tensors. (A streamed pipeline's arenas: test_streaming.)"""
    spec = WorkerSpec(model="tiny-flux", device="cpu", dtype="float32", workload=WORKLOAD, budget_bytes=None,
                      study_dir=str(tmp_path), session="crashing:KeepsOldPipelines")
    from crashing import KeepsOldPipelines

    s = KeepsOldPipelines(spec)
    first = s.run(RunRequest(_profile(transformer={"quantize": {"method": "int8_weight"}})))
    assert first.status == Status.OK, first.error
    old = s.pipe
    after = s.run(RunRequest(_profile()))  # int8 cannot be undone in place: pristine weights
    assert after.status == Status.OK, after.error
    assert "transformer" in (after.timings.held_after_restore or [])  # still referenced (by ``kept``) ...
    assert old in s.kept
    for name, c in old.components.items():  # ... but it owns no tensor any more
        if hasattr(c, "parameters"):
            assert not list(c.parameters()) and not list(c.buffers()), name
    assert s.pipe is not old and s.pipe.transformer.x_embedder.weight.numel() > 0  # the fresh one is whole


class _Session(TrialSession):
    """Loads nothing: enough for the message loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        from fluxtune.hardware import detect_hardware

        self.spec, self.hardware, self.load_s = spec, detect_hardware(), 0.0

    def load_reference(self) -> bool:
        return False

    def facts(self) -> dict:
        return {}


class _OrphanedPipe:
    """The pipe of a worker whose parent was killed: it hands over one request, then every send fails."""

    def __init__(self) -> None:
        self.sent: list = []
        self.requests = [RunRequest(_profile())]

    def send(self, msg) -> None:
        if not self.sent:
            self.sent.append(msg)  # "ready" reached the parent before it died
            return
        raise BrokenPipeError(32, "Broken pipe")

    def recv(self):
        if self.requests:
            return self.requests.pop()
        raise EOFError


class _Answers(_Session):
    def run(self, req):
        from fluxtune.worker import RunOutcome

        return RunOutcome(Status.OK)


class _EofPipe(_OrphanedPipe):
    """The parent died while the worker waited for its next request."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = []


def test_an_orphaned_worker_exits_quietly(tmp_path, capsys):
    """A worker whose parent is gone ends without a traceback (issue 18): the send of its answer fails,
    and that means exit, not error."""
    spec = WorkerSpec(model="tiny-flux", device="cpu", dtype="float32", workload=WORKLOAD, budget_bytes=None,
                      study_dir=str(tmp_path), session=f"{__name__}:_Answers")
    worker_main(_OrphanedPipe(), spec)  # returns; nothing escapes
    worker_main(_EofPipe(), spec)
    assert capsys.readouterr().err == ""
