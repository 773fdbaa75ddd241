"""The trial engine in-process: a session that runs one profile after another on one loaded pipeline."""

from __future__ import annotations

import pytest

from fluxtune.search.worker import TrialSession, WorkerConfig

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
    cfg = WorkerConfig(model="tiny-flux", device="cpu", dtype="float32", workload=WORKLOAD, budget_bytes=None,
                       study_dir=str(tmp_path))
    s = TrialSession(cfg)
    yield s
    from fluxtune.tuning.attention import _reset_global

    _reset_global()  # never leak a backend into the next test, whatever this one found


def test_native_trial_after_another_backend_runs_native(session):
    """A trial restored to pristine weights (its irreversible knobs differ) also gets diffusers'
    process-wide attention backend back: ``native`` after ``_native_math`` really runs native."""
    first = session.run(_profile(attention={"backend": "_native_math"}).to_dict())
    assert first["status"] == "ok", first
    assert _active_backend() == "_native_math"
    # Quantization cannot change in place: the session starts the second trial from pristine weights.
    second = session.run(_profile(transformer={"quantize": {"method": "int8_weight"}}).to_dict())
    assert second["status"] == "ok", second.get("error")
    assert _active_backend() == "native"
