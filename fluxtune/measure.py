"""Measuring a pipeline honestly: timings, peak memory and image quality against a reference.

``measure(pipe, workload)`` runs warm-up calls (reported apart, as ``first_call_s``: compile happens
there), then ``workload.runs`` timed repeats of the whole workload, and returns a :class:`Measurement`.
Nothing escapes it but ``KeyboardInterrupt``: running out of memory is ``status="oom"``, a peak above
the budget ``"over_budget"``, any other failure ``"error"`` with a one-line message.

Definitions (all seconds are per ``pipe()`` call, medians over the timed calls):

* ``latency_s``: wall time of one call (clock read after ``torch.cuda.synchronize``).
* ``text_encode_s``: inside ``pipe.encode_prompt`` (wrapped for the measurement).
* ``step_s``: one denoising step; steps are delimited by ``callback_on_step_end`` (FLUX), or by
  the scheduler's ``step`` for pipelines without callbacks (DiT). The first step starts where text
  encoding ends (or at the call's start), so it also holds latent preparation.
* ``denoise_s``: from the start of the first step to the end of the last.
* ``decode_s``: from the end of the last step to the end of the call (VAE decode + postprocess).

On a GPU the split is timed with CUDA events (no synchronisation inside the call, so prefetching
overlaps as it would unmeasured); on CPU with ``time.perf_counter``. Generators are CPU generators
(``torch.Generator().manual_seed(seed)``), so the same seeds give comparable images on any device and
profile.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from fluxtune.errors import FluxtuneError, ProfileError
from fluxtune.status import Status
from fluxtune.tuning.state import base_class

__all__ = [
    "DEFAULT_CLASS_LABELS",
    "DEFAULT_PROMPTS",
    "PSNR_CAP",
    "DynamoWatch",
    "Measurement",
    "Reference",
    "Status",
    "Workload",
    "classify_peak",
    "compare",
    "measure",
    "quality_drop",
]

PSNR_CAP = 100.0
"""PSNR of identical images (infinite) is reported as this, so JSON and YAML stay finite."""

DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow, soft morning light, photograph",
    "a bowl of ramen on a wooden table, steam rising, studio photo",
    "a lighthouse on a rocky cliff at dusk, oil painting",
    "a rainy city street at night with neon signs reflected in puddles",
)
DEFAULT_CLASS_LABELS = (207, 360, 387, 974)
"""ImageNet classes for DiT: golden retriever, otter, lesser panda, geyser."""

_SAMPLE_INTERVAL_S = 0.02

# ------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """What a measurement renders. ``None`` fields are left to the pipeline's defaults (which
    ``apply`` sets from the profile's generation section), so a measurement never overrides a profile.

    Each run renders every (prompt, seed) pair, one ``pipe()`` call each (text pipelines), or for DiT
    one call per seed with all class labels as the batch (each label ``images_per_prompt`` times).
    ``warmup`` untimed calls (first prompt, first seed) precede the ``runs`` timed repeats; with
    ``warmup_steps`` they run that many denoising steps instead of ``steps`` (the shapes, and so any
    compilation, are the same; an uncompiled offloading recipe needs no full warm-up call).
    """

    prompts: tuple[str, ...] = ()
    class_labels: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    images_per_prompt: int | None = None
    runs: int = 3
    warmup: int = 1
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (from JSON/YAML) but store tuples, so a Workload is hashable and immutable.
        for name in ("prompts", "class_labels", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if not self.seeds:
            problems.append("seeds is empty; give at least one seed, e.g. [0]")
        if self.runs < 1:
            problems.append(f"runs={self.runs} must be >= 1")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} must be >= 0")
        for name in ("steps", "height", "width", "max_sequence_length", "images_per_prompt", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be a positive integer or null")
        if self.prompts and self.class_labels:
            problems.append("set prompts (text pipelines) or class_labels (DiT), not both")
        if problems:
            raise ProfileError(f"workload: {problems[0]}")

    @property
    def calls_per_run(self) -> int:
        """pipe() calls in one run."""
        return len(self.seeds) * (1 if self.class_labels else max(1, len(self.prompts)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        """Inverse of :meth:`to_dict`.

        Raises:
            ProfileError: unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"workload: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ProfileError(f"workload: {e}") from None

    @classmethod
    def for_pipeline(cls, pipe: Any, **overrides: Any) -> Workload:
        """The default workload of a pipeline's family: four fixed prompts (text pipelines) or four
        ImageNet classes (DiT), seed 0, generation settings from the pipeline (None).

        Args:
            pipe: the pipeline.
            **overrides: any :class:`Workload` field.

        Raises:
            ProfileError: an unknown field or invalid value.
        """
        if "class_labels" in _call_parameters(pipe):
            base = cls(class_labels=DEFAULT_CLASS_LABELS)
        else:
            base = cls(prompts=DEFAULT_PROMPTS)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ProfileError(f"workload: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        if "prompts" in overrides and "class_labels" not in overrides:
            overrides["class_labels"] = ()
        if "class_labels" in overrides and "prompts" not in overrides and overrides["class_labels"]:
            overrides["prompts"] = ()
        return dataclasses.replace(base, **overrides)

    def calls(self, pipe: Any) -> list[tuple[int, dict[str, Any]]]:
        """The (seed, kwargs) of every call of one run, in order (generator and output_type not included).

        Raises:
            FluxtuneError: the workload sets something this pipeline's call does not take.
        """
        params = _call_parameters(pipe)
        wanted = {
            "num_inference_steps": self.steps, "guidance_scale": self.guidance, "height": self.height,
            "width": self.width, "max_sequence_length": self.max_sequence_length,
        }
        common: dict[str, Any] = {}
        for kwarg, value in wanted.items():
            if value is None:
                continue
            if kwarg not in params:
                raise FluxtuneError(
                    f"workload sets {kwarg}={value} but {_class_name(pipe)}.__call__ has no {kwarg}; leave it unset"
                )
            common[kwarg] = value
        if "class_labels" in params:
            if not self.class_labels:
                raise FluxtuneError(f"workload has no class_labels, which {_class_name(pipe)} needs; "
                                    f"e.g. class_labels={list(DEFAULT_CLASS_LABELS)}")
            labels = [label for label in self.class_labels for _ in range(self.images_per_prompt or 1)]
            return [(seed, {**common, "class_labels": labels}) for seed in self.seeds]
        if "prompt" not in params:
            raise FluxtuneError(f"{_class_name(pipe)}.__call__ takes neither prompt nor class_labels")
        if not self.prompts:
            raise FluxtuneError(f"workload has no prompts, which {_class_name(pipe)} needs")
        if self.images_per_prompt is not None:
            common["num_images_per_prompt"] = self.images_per_prompt
        return [(seed, {**common, "prompt": p}) for p in self.prompts for seed in self.seeds]


def _class_name(pipe: Any) -> str:
    return base_class(pipe).__name__


def _call_parameters(pipe: Any) -> set[str]:
    # The pipeline's own __call__, under fluxtune's default-filling wrapper if apply() installed one.
    cls = base_class(pipe)
    try:
        return set(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    """What one :func:`measure` saw. Seconds are per ``pipe()`` call; bytes are peaks over the timed runs
    (``host_ram_peak``: over the whole measurement). None = not measured / not applicable here."""

    status: Status = Status.OK
    error: str | None = None
    first_call_s: float | None = None
    latency_s: float | None = None
    latency_runs: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    text_encode_s: float | None = None
    denoise_s: float | None = None
    step_s: float | None = None
    decode_s: float | None = None
    steps: int | None = None
    step_times: list[float] = field(default_factory=list)
    calls_per_run: int = 0
    images_per_call: int | None = None
    """Images one call renders (DiT: class labels x images per label; text: images per prompt)."""
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_nvml: int | None = None
    peak_device_used: int | None = None
    host_ram_peak: int | None = None
    device: str = "cpu"
    workload: dict[str, Any] | None = None
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    quality: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # from stored data: the plain string

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def throughput(self) -> float | None:
        """Images per second in steady state."""
        return self.images_per_call / self.latency_s if self.images_per_call and self.latency_s else None

    @property
    def peak(self) -> int | None:
        """The peak compared with a budget: the larger of reserved and NVML process memory."""
        known = [v for v in (self.peak_reserved, self.peak_nvml) if v is not None]
        return max(known) if known else None

    def summary(self) -> str:
        """One human line."""
        from fluxtune.units import format_bytes

        if self.status in (Status.OOM, Status.ERROR):
            return f"{self.status}: {self.error}"
        parts = [f"{self.latency_s:.3f} s/call" if self.latency_s is not None else "no timing"]
        if self.first_call_s is not None:
            parts.append(f"first call {self.first_call_s:.2f} s")
        if self.peak_allocated is not None:
            parts.append(f"peak {format_bytes(self.peak_allocated)} allocated")
        if self.peak_reserved is not None:
            parts.append(f"{format_bytes(self.peak_reserved)} reserved")
        if self.peak_nvml is not None:
            parts.append(f"{format_bytes(self.peak_nvml)} NVML")
        text = ", ".join(parts)
        return f"over budget: {self.error}; {text}" if self.status == Status.OVER_BUDGET else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data without the tensors (their shapes are kept); non-finite floats become None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("images", "latents"):
                t = getattr(self, f.name)
                out[f"{f.name}_shape"] = list(t.shape) if t is not None else None
                continue
            out[f.name] = _json_safe(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Rebuild a measurement (without tensors) from :meth:`to_dict`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"images", "latents"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def classify_peak(peak_reserved: int | None, peak_nvml: int | None, budget_bytes: int | None) -> Status:
    """``"over_budget"`` when the allocator's reserved peak exceeds the budget, else ``"ok"``.

    The budget is what ``apply`` caps the PyTorch allocator at; the CUDA context and library
    workspaces (NVML minus reserved: 0.5-1.5 GB) come on top and are reported, not charged, so that
    profiles and the diffusers recipes are held to the same line. ``peak_nvml`` is kept for callers that
    want the stricter whole-process view. Unknown peaks (CPU) never make a run over budget.
    """
    del peak_nvml  # reported alongside, see the docstring
    if budget_bytes is None or peak_reserved is None:
        return Status.OK
    return Status.OVER_BUDGET if peak_reserved > budget_bytes else Status.OK


# ------------------------------------------------------------------------------------ machinery


class _Timeline:
    """Marks inside one call: CUDA events on a GPU (read after one sync at the end), clocks on CPU."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        if self.device is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def seconds(self, a: Any, b: Any) -> float:
        if self.device is not None:
            return float(a.elapsed_time(b)) / 1000.0
        return float(b - a)


@dataclass
class _CallResult:
    latency: float
    text_encode: float | None
    steps: list[float]
    denoise: float | None
    decode: float | None
    images: torch.Tensor | None
    latents: torch.Tensor | None


class _Instrument:
    """Temporarily wraps ``pipe.encode_prompt`` (and ``scheduler.step`` where the pipeline has no step
    callback) to put marks on the current call's timeline; everything is restored on exit."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.timeline: _Timeline | None = None
        self.latents: torch.Tensor | None = None
        self.uses_callback = "callback_on_step_end" in _call_parameters(pipe)
        self._restore: list[Callable[[], None]] = []

    def __enter__(self) -> _Instrument:
        try:
            encode = getattr(self.pipe, "encode_prompt", None)
            if callable(encode):
                self._wrap(self.pipe, "encode_prompt", self._timed_encode(encode))
            scheduler = getattr(self.pipe, "scheduler", None)
            if not self.uses_callback and scheduler is not None and callable(getattr(scheduler, "step", None)):
                self._wrap(scheduler, "step", self._marked_step(scheduler.step))
            config = getattr(self.pipe, "_progress_bar_config", None)
            if hasattr(self.pipe, "set_progress_bar_config"):
                saved = dict(config) if isinstance(config, dict) else None
                self.pipe.set_progress_bar_config(disable=True)
                self._restore.append(lambda: self._set_progress(saved))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._restore:
            self._restore.pop()()

    def _set_progress(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            self.pipe.__dict__.pop("_progress_bar_config", None)
        else:
            self.pipe._progress_bar_config = saved

    def _wrap(self, obj: Any, name: str, wrapper: Callable[..., Any]) -> None:
        # Instance attributes shadow the class method; write __dict__ directly so that diffusers'
        # __setattr__ (which registers modules and config entries) is not involved.
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        obj.__dict__[name] = wrapper

        def restore() -> None:
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)

        self._restore.append(restore)

    def _timed_encode(self, encode: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.timeline is not None:
                self.timeline.mark("encode_start")
            try:
                return encode(*args, **kwargs)
            finally:
                if self.timeline is not None:
                    self.timeline.mark("encode_end")

        return wrapper

    def _marked_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if self.timeline is not None:
                self.timeline.mark("step")
                sample = getattr(out, "prev_sample", out[0] if isinstance(out, tuple) else None)
                if isinstance(sample, torch.Tensor):
                    self.latents = sample
            return out

        return wrapper

    def step_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``callback_on_step_end``: mark the step's end and keep the latents (no copy, no sync)."""
        if self.timeline is not None:
            self.timeline.mark("step")
        latents = callback_kwargs.get("latents")
        if isinstance(latents, torch.Tensor):
            self.latents = latents
        return callback_kwargs


def _execution_device(pipe: Any, device_index: int) -> torch.device | None:
    """The CUDA device the pipeline computes on, or None when it runs on the CPU."""
    if not torch.cuda.is_available():
        return None
    try:
        device = torch.device(pipe._execution_device)
    except Exception:  # an unusual pipeline: fall back to the caller's index
        device = torch.device("cuda", device_index)
    if device.type != "cuda":
        return None
    return torch.device("cuda", device.index if device.index is not None else device_index)


def _as_nchw(images: Any) -> torch.Tensor:
    """Pipeline images (tensor NCHW, numpy NHWC, or PIL list) as a float32 CPU tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        t = images.detach()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(0, 3, 1, 2)
        return t.float().cpu()
    if isinstance(images, list) and images and not isinstance(images[0], torch.Tensor):
        import numpy as np

        images = np.stack([np.asarray(im, dtype=np.float32) / (255.0 if hasattr(im, "mode") else 1.0)
                           for im in images])
    t = torch.as_tensor(images).float()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2).contiguous() if t.shape[-1] in (1, 3, 4) else t


def _one_call(
    pipe: Any, inst: _Instrument, device: torch.device | None, seed: int, kwargs: dict[str, Any], keep: bool
) -> _CallResult:
    timeline = _Timeline(device)
    inst.timeline, inst.latents = timeline, None
    call = dict(kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    if inst.uses_callback:
        call["callback_on_step_end"] = inst.step_callback
    try:
        if device is not None:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        timeline.mark("start")
        out = pipe(**call)
        timeline.mark("end")
        if device is not None:
            torch.cuda.synchronize(device)
        latency = time.perf_counter() - t0
    finally:
        inst.timeline = None

    marks = timeline.marks
    start, end = marks[0][1], marks[-1][1]
    encode = 0.0
    opened: Any = None
    last_encode_end: Any = None
    step_marks: list[Any] = []
    for label, value in marks:
        if label == "encode_start":
            opened = value
        elif label == "encode_end" and opened is not None:
            encode += timeline.seconds(opened, value)
            opened, last_encode_end = None, value
        elif label == "step":
            step_marks.append(value)
    steps: list[float] = []
    previous = last_encode_end if last_encode_end is not None else start
    for value in step_marks:
        steps.append(timeline.seconds(previous, value))
        previous = value
    first = last_encode_end if last_encode_end is not None else start
    denoise = timeline.seconds(first, step_marks[-1]) if step_marks else None
    decode = timeline.seconds(step_marks[-1], end) if step_marks else None

    images = latents = None
    if keep:
        images = _as_nchw(out.images if hasattr(out, "images") else out[0])
        if inst.latents is not None:
            latents = inst.latents.detach().float().cpu()
            n = images.shape[0]
            # DiT steps a CFG-doubled batch; its first half is what gets decoded.
            if latents.shape[0] == 2 * n:
                latents = latents[:n]
    inst.latents = None
    del out
    return _CallResult(latency=latency, text_encode=encode if "encode_start" in {m[0] for m in marks} else None,
                       steps=steps, denoise=denoise, decode=decode, images=images, latents=latents)


class _Sampler:
    """Background thread sampling host RSS (and NVML process / device memory on a GPU) every ~20 ms."""

    def __init__(self, gpu_index: int | None, interval: float = _SAMPLE_INTERVAL_S) -> None:
        self.gpu_index = gpu_index
        self.interval = interval
        self.process = psutil.Process(os.getpid())
        self.rss_peak = 0
        self.nvml_peak: int | None = None
        self.device_peak: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fluxtune-memory-sampler", daemon=True)
        self._hw: Any = None
        if gpu_index is not None:
            try:
                from fluxtune import hardware

                self._hw = hardware
            except ImportError:  # pragma: no cover - hardware is part of the package
                self._hw = None

    def sample(self) -> None:
        try:
            rss = int(self.process.memory_info().rss)
        except psutil.Error:
            rss = 0
        nvml = device = None
        if self._hw is not None and self.gpu_index is not None:
            nvml = self._hw.process_memory_used(self.gpu_index)
            device = self._hw.device_memory_used(self.gpu_index)
        with self._lock:
            self.rss_peak = max(self.rss_peak, rss)
            if nvml is not None:
                self.nvml_peak = max(self.nvml_peak or 0, nvml)
            if device is not None:
                self.device_peak = max(self.device_peak or 0, device)

    def reset_device(self) -> None:
        """Start the GPU peaks afresh (before the timed runs); the host peak covers everything."""
        with self._lock:
            self.nvml_peak = self.device_peak = None
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> _Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sample()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    text = lines[0].strip() if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def measure(
    pipe: Any,
    workload: Workload,
    *,
    budget_bytes: int | None = None,
    keep_images: bool = True,
    device_index: int = 0,
    progress: Callable[[str], None] | None = None,
    reference: Reference | None = None,
    time_box_s: float | None = None,
) -> Measurement:
    """Time a pipeline on a workload and record its peak memory (and quality, given a reference).

    Args:
        pipe: a loaded (and usually ``apply``-ed) diffusers pipeline.
        workload: what to render; see :class:`Workload`.
        budget_bytes: the VRAM budget; a larger peak (max of reserved and NVML) is ``over_budget``.
        keep_images: keep the last timed run's images and final latents (needed for quality).
        device_index: CUDA device for peak statistics and NVML when the pipeline does not say.
        progress: called with a short line before each call.
        reference: when given, ``quality`` is filled with :func:`compare` and the drops below the floor.
        time_box_s: stop the timed runs before one that would end past this many seconds of timed
            calls (at least one run always happens); ``latency_runs`` says how many ran.

    Returns:
        A :class:`Measurement`; never raises except ``KeyboardInterrupt``.
    """
    m = Measurement(workload=workload.to_dict())
    say = progress or (lambda _msg: None)
    device: torch.device | None = None
    failed = False
    try:
        device = _execution_device(pipe, device_index)
        m.device = str(device) if device is not None else "cpu"
        calls = workload.calls(pipe)
        m.calls_per_run = len(calls)
        first = calls[0][1]
        m.images_per_call = len(first["class_labels"]) if "class_labels" in first else int(
            first.get("num_images_per_prompt") or 1)
        with _Sampler(device.index if device is not None else None) as sampler, _Instrument(pipe) as inst:
            try:
                seed, kwargs = calls[0]
                if workload.warmup_steps is not None:
                    kwargs = {**kwargs, "num_inference_steps": workload.warmup_steps}
                for i in range(workload.warmup):
                    say(f"warm-up {i + 1}/{workload.warmup}")
                    m.warmup_s.append(_one_call(pipe, inst, device, seed, kwargs, keep=False).latency)
                if device is not None:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                sampler.reset_device()
                results: list[_CallResult] = []
                timed = 0.0
                for run in range(workload.runs):
                    # Under a time box any run may be the last, so each one keeps its images.
                    last = run == workload.runs - 1 or time_box_s is not None
                    for j, (seed, kwargs) in enumerate(calls):
                        say(f"run {run + 1}/{workload.runs}, call {j + 1}/{len(calls)}")
                        results.append(_one_call(pipe, inst, device, seed, kwargs, keep=keep_images and last))
                    timed = sum(r.latency for r in results)
                    if time_box_s is not None and timed * (run + 2) / (run + 1) > time_box_s:
                        break
                _summarise(m, results, len(calls))
            finally:
                sampler.sample()
                m.host_ram_peak = sampler.rss_peak or None
                m.peak_nvml, m.peak_device_used = sampler.nvml_peak, sampler.device_peak
                if device is not None:
                    m.peak_allocated = int(torch.cuda.max_memory_allocated(device))
                    m.peak_reserved = int(torch.cuda.max_memory_reserved(device))
    except Exception as exc:
        m.status = Status.OOM if _is_oom(exc) else Status.ERROR
        m.error = _one_line(exc)
        failed = True
    if m.first_call_s is None and m.warmup_s:
        m.first_call_s = m.warmup_s[0]
    if failed:
        # The exception (and the frames holding activations) is gone once its except block ends:
        # collect them, then hand the cached blocks back to the driver for the next trial.
        gc.collect()
        if device is not None:
            torch.cuda.empty_cache()
        return m
    if classify_peak(m.peak_reserved, m.peak_nvml, budget_bytes) == Status.OVER_BUDGET:
        from fluxtune.units import format_bytes

        m.status = Status.OVER_BUDGET
        m.error = f"peak {format_bytes(m.peak or 0)} > budget {format_bytes(budget_bytes or 0)}"
    if reference is not None and m.images is not None:
        try:
            q = compare(m, reference)
            m.quality = {**q, **quality_drop(q, reference.floor)}
        except FluxtuneError as exc:
            m.quality = {}
            m.error = m.error or f"quality not computed: {exc}"
    return m


def _summarise(m: Measurement, results: list[_CallResult], calls_per_run: int) -> None:
    m.latency_runs = [r.latency for r in results]
    m.latency_s = _median(m.latency_runs)
    m.first_call_s = m.warmup_s[0] if m.warmup_s else (results[0].latency if results else None)
    m.text_encode_s = _median([r.text_encode for r in results if r.text_encode is not None])
    m.denoise_s = _median([r.denoise for r in results if r.denoise is not None])
    m.decode_s = _median([r.decode for r in results if r.decode is not None])
    m.step_s = _median([s for r in results for s in r.steps])
    if results:
        m.steps = len(results[-1].steps)
        m.step_times = list(results[-1].steps)
    kept = results[-calls_per_run:] if calls_per_run else []
    if kept and all(r.images is not None for r in kept):
        m.images = torch.cat([r.images for r in kept if r.images is not None])
    if kept and all(r.latents is not None for r in kept):
        shapes = {tuple(r.latents.shape[1:]) for r in kept if r.latents is not None}
        if len(shapes) == 1:
            m.latents = torch.cat([r.latents for r in kept if r.latents is not None])


# -------------------------------------------------------------------------------------- quality


def _ssim_kernel(height: int, width: int) -> tuple[int, float] | None:
    # torchmetrics' SSIM pads by (kernel-1)/2 with reflection, so the kernel must fit the image.
    side = min(height, width)
    if side >= 11:
        return 11, 1.5
    k = side if side % 2 else side - 1
    return (k, 1.5 * k / 11) if k >= 3 else None


def compare(candidate: Measurement | Reference, reference: Measurement | Reference) -> dict[str, float]:
    """Full-reference quality of a candidate's images against a reference's (same workload).

    Returns:
        ``psnr`` (dB, per image then averaged, identical = 100), ``ssim``, ``max_abs`` (largest pixel
        difference in [0, 1]), ``resized`` (1.0 when the candidate was resized bilinearly to the
        reference size first), and ``latent_rmse`` (``|a - b| / |b|`` of the final latents) when both
        have latents of one shape. Empty when either side has no images.

    Raises:
        FluxtuneError: the two hold different numbers of images (different workloads).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    out: dict[str, float] = {}
    a, b = candidate.images, reference.images
    if a is not None and b is not None:
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[1]:
            raise FluxtuneError(
                f"compare: candidate has images {tuple(a.shape)} and the reference {tuple(b.shape)}; "
                "measure both with the same workload"
            )
        resized = a.shape[-2:] != b.shape[-2:]
        if resized:
            a = torch.nn.functional.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False)
        a = a.clamp(0.0, 1.0)
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
        psnr = torch.nan_to_num(psnr.reshape(-1), posinf=PSNR_CAP).clamp(max=PSNR_CAP)
        out["psnr"] = float(psnr.mean())
        kernel = _ssim_kernel(int(b.shape[-2]), int(b.shape[-1]))
        if kernel is not None:
            k, sigma = kernel
            # One image at a time bounds the memory of the Gaussian filtering at 1024x1024.
            values = []
            for i in range(b.shape[0]):
                ssim = structural_similarity_index_measure(a[i:i + 1], b[i:i + 1], data_range=1.0,
                                                           kernel_size=k, sigma=sigma)
                values.append(float(ssim[0] if isinstance(ssim, tuple) else ssim))
            out["ssim"] = float(sum(values) / len(values))
        out["max_abs"] = float((a - b).abs().max())
        out["resized"] = 1.0 if resized else 0.0
    la, lb = candidate.latents, reference.latents
    if la is not None and lb is not None and la.shape == lb.shape:
        la, lb = la.detach().float().cpu(), lb.detach().float().cpu()
        norm = float(lb.norm())
        if norm > 0:
            out["latent_rmse"] = float((la - lb).norm()) / norm
    return out


_WORST = {"psnr": min, "ssim": min, "latent_rmse": max, "max_abs": max}


def quality_drop(quality: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """How much worse than the noise floor a candidate is.

    Returns:
        ``psnr_drop`` = floor psnr - psnr (dB), ``ssim_drop`` = floor ssim - ssim, ``latent_rmse_excess``
        and ``max_abs_excess`` = value - floor value; a missing floor value counts as perfect (100 dB,
        SSIM 1, 0). Negative means better than the floor (noise).
    """
    out: dict[str, float] = {}
    if "psnr" in quality:
        out["psnr_drop"] = floor.get("psnr", PSNR_CAP) - quality["psnr"]
    if "ssim" in quality:
        out["ssim_drop"] = floor.get("ssim", 1.0) - quality["ssim"]
    if "latent_rmse" in quality:
        out["latent_rmse_excess"] = quality["latent_rmse"] - floor.get("latent_rmse", 0.0)
    if "max_abs" in quality:
        out["max_abs_excess"] = quality["max_abs"] - floor.get("max_abs", 0.0)
    return out


@dataclass
class Reference:
    """The images and latents of a reference run, its workload, and its noise floor.

    ``noise_floor`` is the quality of a second identical reference run against the first (GPU
    nondeterminism shows here; on CPU it is usually exact, 100 dB). ``compiled_floor`` may be set by
    the caller to the quality of a compiled but otherwise identical run; :attr:`floor` is the worse of
    the two per metric, the level a candidate is judged against.
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    workload: Workload
    noise_floor: dict[str, float] = field(default_factory=dict)
    compiled_floor: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_runs(
        cls, first: Measurement, second: Measurement | None = None, *, workload: Workload,
        info: dict[str, Any] | None = None,
    ) -> Reference:
        """A reference from a measured run, with the noise floor from a second identical run.

        Raises:
            FluxtuneError: the first run has no images (failed, or ``keep_images=False``).
        """
        if first.images is None:
            raise FluxtuneError(f"reference run has no images (status {first.status}: {first.error}); "
                                "measure it with keep_images=True")
        ref = cls(images=first.images, latents=first.latents, workload=workload, info=dict(info or {}))
        if second is not None and second.images is not None:
            ref.noise_floor = compare(second, ref)
        return ref

    @property
    def floor(self) -> dict[str, float]:
        """Per metric, the worse of the noise floor and the compiled floor."""
        out = dict(self.noise_floor)
        for key, value in (self.compiled_floor or {}).items():
            pick = _WORST.get(key)
            out[key] = pick(out[key], value) if pick is not None and key in out else value
        return out

    def compare(self, candidate: Measurement) -> dict[str, float]:
        """:func:`compare` of a candidate against this reference."""
        return compare(candidate, self)

    def save(self, path: str | Path) -> Path:
        """Write the tensors to ``path`` (``torch.save`` of plain tensors) and the rest to a JSON sidecar
        (``path`` with suffix ``.json``).

        Returns:
            The sidecar's path.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().cpu().contiguous()}
        if self.latents is not None:
            tensors["latents"] = self.latents.detach().cpu().contiguous()
        torch.save(tensors, p)
        side = _sidecar(p)
        side.write_text(json.dumps(_json_safe({
            "format": "fluxtune-reference", "version": 1, "tensors": p.name,
            "workload": self.workload.to_dict(), "noise_floor": self.noise_floor,
            "compiled_floor": self.compiled_floor, "info": self.info,
            "images_shape": list(self.images.shape),
        }), indent=1))
        return side

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference written by :meth:`save` (tensors loaded with ``weights_only=True``).

        Raises:
            FluxtuneError: a file is missing or not a fluxtune reference.
        """
        p = Path(path)
        side = _sidecar(p)
        if not p.exists() or not side.exists():
            missing = p if not p.exists() else side
            raise FluxtuneError(f"reference {str(p)!r}: {str(missing)!r} does not exist; save one with Reference.save")
        try:
            meta = json.loads(side.read_text())
            tensors = torch.load(p, map_location="cpu", weights_only=True)
        except (json.JSONDecodeError, RuntimeError, OSError, EOFError) as e:
            raise FluxtuneError(f"reference {str(p)!r} cannot be read ({_one_line(e)})") from None
        if meta.get("format") != "fluxtune-reference" or "images" not in tensors:
            raise FluxtuneError(f"reference {str(p)!r} is not a fluxtune reference")
        return cls(
            images=tensors["images"], latents=tensors.get("latents"),
            workload=Workload.from_dict(meta["workload"]),
            noise_floor={k: float(v) for k, v in (meta.get("noise_floor") or {}).items()},
            compiled_floor=meta.get("compiled_floor"), info=meta.get("info") or {},
        )


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".meta.json")


# ------------------------------------------------------------------------------- recompilation


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
