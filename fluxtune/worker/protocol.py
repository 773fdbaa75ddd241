"""The messages between a parent and its worker process: frozen, typed, and the only things on the pipe.

The parent validates a profile once and sends the :class:`~fluxtune.profile.Profile` itself (a frozen
pydantic model pickles); the worker answers with a :class:`RunOutcome` whose measurement is a
:class:`~fluxtune.measure.Measurement` without its tensors (images stay in the worker's folder).
While it runs, it sends any number of :class:`Progress` messages before that outcome: a run killed at
its time limit (or dying) still says where it was and what it had measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.profile import Profile
from fluxtune.status import Status
from fluxtune.units import format_seconds

if TYPE_CHECKING:
    from fluxtune.measure import Measurement

__all__ = ["ApplyTimings", "Fatal", "Progress", "Ready", "Role", "RunOutcome", "RunRequest", "ScanOutcome",
           "ScanRequest", "Stage", "Status", "Stop", "WorkerSpec"]

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


Stage = Literal["restore", "apply", "warm-up", "run", "noise floor", "quality", "samples"]
"""What a run is doing: ``restore`` (pristine weights for other irreversible knobs), ``apply`` (its
``detail`` names the knob), the warm-up and the timed calls, then what follows them (a reference's
second call for its noise floor, a trial's quality call at the study's batch, class-conditional samples)."""


@dataclass(frozen=True)
class Progress:
    """Where a worker is in a :class:`RunRequest`, sent as it moves on (apply starts and ends, each knob of
    apply, before and after each call); plain numbers only, so a message costs microseconds."""

    stage: Stage
    detail: str | None = None
    """``apply``: the knob being applied (``quantize``, ``offload``, ...) or ``imports``."""
    latencies: tuple[float, ...] = ()
    """Seconds of each timed call finished so far (what becomes ``Measurement.latency_runs``)."""
    runs_total: int = 0
    """Timed calls planned (runs x calls per run; a time box may stop earlier); 0: not known yet."""
    warmup_s: tuple[float, ...] = ()
    """Seconds of each warm-up call finished so far (the first one compiles, autotunes, fills caches)."""
    warmup_total: int = 0
    apply_s: float | None = None
    """Seconds apply took, once it finished."""
    peak_reserved: int | None = None
    """The allocator's reserved peak so far (over the timed calls once they began, as the measurement
    counts it; before them, the warm-up's, and before that the process's); None on CPU."""
    peak_allocated: int | None = None
    host_ram_peak: int | None = None
    """The worker process's peak RSS so far."""
    elapsed_s: float = 0.0
    """Seconds since the worker received the request."""

    @property
    def runs_done(self) -> int:
        return len(self.latencies)

    @property
    def warmup_done(self) -> int:
        return len(self.warmup_s)

    def where(self, stuck_s: float | None = None) -> str:
        """``during run 4 of 10 (3 finished: 21.3, 21.5, 21.4 s)``; with ``stuck_s``, the seconds since this
        message came, ``120 s into run 4 of 10 (...)``: whether one call, or the stage, took the time."""
        after = None
        if self.stage == "apply":
            what = "apply" + (f" ({self.detail})" if self.detail else "")
        elif self.stage == "warm-up" and self.warmup_total and self.warmup_done >= self.warmup_total:
            after = "the warm-up"
        elif self.stage == "warm-up":
            what = f"warm-up {self.warmup_done + 1}" + (f" of {self.warmup_total}" if self.warmup_total else "")
        elif self.stage == "run" and self.runs_total and self.runs_done >= self.runs_total:
            after = "the timed runs"
        elif self.stage == "run":
            what = f"run {self.runs_done + 1}" + (f" of {self.runs_total}" if self.runs_total else "")
        elif self.stage == "restore":
            what = "the restore of pristine weights"
        else:
            what = f"the {self.stage} call" if self.stage != "samples" else "the samples"
        stuck = f"{format_seconds(stuck_s)} s " if stuck_s is not None else ""
        if after is not None:
            text = f"{stuck}after {after}"
        else:
            text = f"{stuck}into {what}" if stuck else f"during {what}"
        done = []
        if self.apply_s is not None and not self.warmup_s and not self.latencies:
            done.append(f"apply took {format_seconds(self.apply_s)} s")
        if self.warmup_s and not self.latencies:
            done.append(f"warm-up {', '.join(format_seconds(s) for s in self.warmup_s)} s")
        if self.latencies:
            shown = [format_seconds(s) for s in self.latencies]
            if len(shown) > 8:  # one line: the first and the last few
                shown = [*shown[:3], "...", *shown[-3:]]
            done.append(f"{self.runs_done} finished: {', '.join(shown)} s")
        return text + (f" ({'; '.join(done)})" if done else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (a bench row keeps it)."""
        return {**asdict(self), "latencies": list(self.latencies), "warmup_s": list(self.warmup_s)}


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
