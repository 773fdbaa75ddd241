"""The trial engine: a session that runs one profile after another on one loaded pipeline, and the
process around it."""

from __future__ import annotations

import signal

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
    # worker_main ignores SIGINT, here in pytest's own process: put it back, or every later subprocess
    # inherits the ignored signal (the Ctrl-C test of test_search.py then never stops its search).
    previous = signal.getsignal(signal.SIGINT)
    try:
        worker_main(_OrphanedPipe(), spec)  # returns; nothing escapes
        worker_main(_EofPipe(), spec)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == ""


# -- progress: what a run sends while it runs ---------------------------------------------------------------
def test_progress_says_where_a_run_is():
    from fluxtune.worker import Progress

    assert Progress("apply", detail="quantize").where() == "during apply (quantize)"
    p = Progress("run", latencies=(21.31, 21.5, 21.4), runs_total=10, warmup_s=(95.2,))
    assert p.runs_done == 3 and p.where() == "during run 4 of 10 (3 finished: 21.3, 21.5, 21.4 s)"
    assert p.where(stuck_s=120) == "120 s into run 4 of 10 (3 finished: 21.3, 21.5, 21.4 s)"
    assert Progress("warm-up", warmup_total=1, apply_s=312.4).where() == "during warm-up 1 of 1 (apply took 312 s)"
    many = Progress("run", latencies=tuple(float(i) for i in range(1, 13)), runs_total=12)
    assert many.where() == "after the timed runs (12 finished: 1, 2, 3, ..., 10, 11, 12 s)"
    assert many.to_dict()["latencies"] == list(many.latencies)


def _worker_spec(tmp_path, session: str | None = None, **workload) -> WorkerSpec:
    from fluxtune.worker import DEFAULT_SESSION

    return WorkerSpec(model="tiny-flux", device="cpu", dtype="float32", workload={**WORKLOAD, **workload},
                      budget_bytes=None, study_dir=str(tmp_path), fixed_workload=True, threads=1,
                      session=session or DEFAULT_SESSION)


def test_progress_messages_come_before_the_outcome_and_change_nothing(tmp_path):
    """A worker process sends where it is (apply's knobs, each warm-up and timed call) before its outcome;
    the parent keeps the last, hands each to a callback, and the outcome is the one it always was."""
    from fluxtune.worker import Progress, Worker

    worker = Worker(_worker_spec(tmp_path, runs=3, warmup=1))
    try:
        seen: list[Progress] = []
        out = worker.run(RunRequest(_profile()), 120, on_progress=seen.append)
        assert out.status == Status.OK, out.error
        m = out.measurement
        assert m is not None and len(m.latency_runs) == 3
        last = seen[-1]
        assert worker.last_progress == last
        # The last word is the timed calls as measured: the same latencies, to the bit.
        assert list(last.latencies) == m.latency_runs and list(last.warmup_s) == m.warmup_s
        assert last.runs_total == 3 and last.apply_s == out.timings.apply_s and last.host_ram_peak
        stages = [p.stage for p in seen]
        assert stages[0] == "apply" and {"quantize", "offload"} <= {p.detail for p in seen}
        # In order: apply, the warm-up, then the timed calls one by one.
        assert max(i for i, s in enumerate(stages) if s == "apply") < stages.index("warm-up") < stages.index("run")
        assert [p.runs_done for p in seen if p.stage == "run"] == [0, 1, 1, 2, 2, 3]
        # The next run on the same worker: int8 cannot be undone in place, so the one after it restores;
        # nothing of the first run's messages is left on the pipe, and without a callback they are only kept.
        out2 = worker.run(RunRequest(_profile(transformer={"quantize": {"method": "int8_weight"}})), 120)
        assert out2.status == Status.OK, out2.error
        assert worker.last_progress is not None and worker.last_progress.runs_done == 3
        seen.clear()
        assert worker.run(RunRequest(_profile()), 120, on_progress=seen.append).status == Status.OK
        assert seen[0].stage == "restore" and seen[-1].runs_done == 3
    finally:
        worker.stop()


def test_a_worker_that_dies_in_apply_says_where(tmp_path):
    """The OOM killer ending a quantization used to leave "exited with code -9" and nothing else."""
    from fluxtune.worker import Worker, WorkerDied

    worker = Worker(_worker_spec(tmp_path, session="crashing:DiesInQuantize"))
    try:
        with pytest.raises(WorkerDied) as died:
            worker.run(RunRequest(_profile(transformer={"quantize": {"method": "int8_weight"}})), 120)
    finally:
        worker.stop()
    e = died.value
    assert not e.timed_out and str(e) == "worker on cpu exited with code 3 during apply (quantize)"
    assert e.progress is not None and e.progress.stage == "apply" and e.progress.runs_done == 0
