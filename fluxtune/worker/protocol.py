"""The messages between a parent and its worker process: frozen, typed, and the only things on the pipe.

The parent validates a profile once and sends the :class:`~fluxtune.profile.Profile` itself (a frozen
pydantic model pickles); the worker answers with a :class:`RunOutcome` whose measurement is a
:class:`~fluxtune.measure.Measurement` without its tensors (images stay in the worker's folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.profile import Profile
from fluxtune.status import Status

if TYPE_CHECKING:
    from fluxtune.measure import Measurement

__all__ = ["ApplyTimings", "Fatal", "Ready", "Role", "RunOutcome", "RunRequest", "ScanOutcome", "ScanRequest",
           "Status", "Stop", "WorkerSpec"]

DEFAULT_SESSION = "fluxtune.worker.session:TrialSession"

Role = Literal["trial", "reference", "compiled_floor", "retime"]
"""``reference``: the lossless run quality is judged against (the worker saves it and its noise floor);
``compiled_floor``: the same run compiled, to learn how far compilation alone moves the pixels;
``retime``: a finalist timed again (:mod:`fluxtune.search.retime`): no quality, no images."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start; plain data so it crosses the process boundary."""

    model: str
    device: str  # "cuda:0", "cpu"
    dtype: str
    workload: dict[str, Any]
    budget_bytes: int | None
    study_dir: str
    gpu_index: int | None = None
    threads: int | None = None
    """Torch threads in the worker (several CPU workers share the cores); None: torch's default."""
    fixed_workload: bool = False
    """Render the workload as given for every profile (bench), not at each profile's batch (search)."""
    session: str = DEFAULT_SESSION
    """``module:Class`` of the session the worker runs; tests point it at a subclass that misbehaves."""


@dataclass(frozen=True)
class RunRequest:
    """Apply and measure one profile."""

    profile: Profile
    role: Role = "trial"
    trial: int | None = None
    """The trial number: its first image is saved as ``images/trial_NNNN.pt``."""
    samples: int = 0
    """Class-conditional models: also render this many samples and send their distribution features."""
    time_box_s: float | None = None
    """Stop the timed runs before one that would end past this (at least one runs)."""
    prune_above_s: float | None = None
    """Multi-fidelity: stop after the first warm steps when the projected call latency exceeds this."""


@dataclass(frozen=True)
class ScanRequest:
    """A per-block sensitivity scan of one quantization method on the pristine pipeline."""

    method: str
    steps: int


@dataclass(frozen=True)
class Stop:
    """Exit cleanly."""


@dataclass(frozen=True)
class ApplyTimings:
    """Where the time before the measurement went (seconds; None: that stage did not run)."""

    restore_s: float | None = None
    imports_s: float | None = None
    """First use of torchao/TorchDynamo in this process, reported apart from apply."""
    apply_s: float | None = None
    quantize_s: float | None = None
    placement_s: float | None = None
    parts: dict[str, float] | None = None
    """``knob/component`` -> seconds, for the parts of apply that took 10 ms or more (once apply ran)."""
    held_after_restore: list[str] | None = None
    """Components of the replaced pipeline still alive after the worker restored pristine weights
    (something holds them, and with them their device memory); None: no restore before this run."""
    left_after_restore: int | None = None
    """Device bytes still allocated after that restore (a fresh pipeline holds none until applied)."""


@dataclass(frozen=True)
class RunOutcome:
    """What one :class:`RunRequest` came to."""

    status: Status
    trial: int | None = None
    error: str | None = None
    traceback: str | None = None
    measurement: Measurement | None = None
    """Without tensors; their shapes are in ``tensor_shapes``."""
    tensor_shapes: dict[str, list[int] | None] = field(default_factory=dict)
    quality: dict[str, float] | None = None
    """Against the study's reference, with the drops from its noise floor (trials only)."""
    noise_floor: dict[str, float] | None = None
    compiled_floor: dict[str, float] | None = None
    timings: ApplyTimings = field(default_factory=ApplyTimings)
    report: str | None = None
    features: list[list[float]] | None = None
    features_error: str | None = None

    def measurement_data(self) -> dict[str, Any] | None:
        """The measurement as JSON-safe data, as studies have always stored it (tensor shapes included)."""
        if self.measurement is None:
            return None
        return {**self.measurement.to_dict(), **self.tensor_shapes}


@dataclass(frozen=True)
class ScanOutcome:
    status: Status
    result: dict[str, Any] | None = None
    """:meth:`fluxtune.sensitivity.SensitivityResult.to_dict`."""
    error: str | None = None


@dataclass(frozen=True)
class Ready:
    """The worker loaded its model."""

    facts: dict[str, Any]
    """:meth:`fluxtune.memory.ModelFacts.to_dict` of the loaded pipeline."""
    hardware: dict[str, Any]
    load_s: float
    reference: bool
    """Whether the study folder already holds a reference run."""


@dataclass(frozen=True)
class Fatal:
    """The worker could not start."""

    error: str
    traceback: str
