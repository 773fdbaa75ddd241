"""``measure(pipe, workload)``: warm-up and timed calls, the per-call split (text encode, steps,
decode) and the peaks. See :mod:`fluxtune.measure` for the definitions."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from fluxtune.errors import FluxtuneError
from fluxtune.measure.quality import compare, quality_drop
from fluxtune.measure.result import Measurement, classify_peak, one_line
from fluxtune.measure.sampler import Sampler
from fluxtune.measure.workload import Workload, call_parameters
from fluxtune.status import Status

if TYPE_CHECKING:
    from fluxtune.measure.reference import Reference


PROBE_STEPS = 3
"""Warm steps (after the first) whose median a pruned call's projection is made from."""


@dataclass(frozen=True)
class CallMark:
    """Where :func:`measure` is, for a caller that reports progress (its ``on_call``): before and after
    each warm-up and timed call."""

    phase: Literal["warm-up", "run"]
    index: int
    """The call's place in its phase, from 0."""
    total: int
    """Calls in the phase (timed: runs x calls per run; a time box may stop before the last)."""
    latency_s: float | None = None
    """None: the call is about to start; else it just ended, after this many seconds."""


class _Pruned(Exception):
    """Raised between steps when the projected latency is clearly worse than the caller's limit."""

    def __init__(self, projected: float, steps: int) -> None:
        super().__init__(f"projected {projected:.2f}s per call from {steps} warm steps")
        self.projected = projected


@dataclass
class _Probe:
    """Multi-fidelity: project a call's latency from its first warm steps and stop it when that exceeds
    ``limit_s``. The first step is skipped (it compiles, autotunes, fills caches), so the median of steps
    2..1+``steps`` times the call's step count is a lower bound (text encoding and decoding left out)."""

    limit_s: float
    total_steps: int | None
    """The call's step count; None: the scheduler's, read once the call has set its timesteps (the
    steps then come from the profile's call defaults, not the workload)."""
    scheduler: Any = None
    steps: int = PROBE_STEPS
    done: bool = False

    def check(self, timeline: _Timeline) -> None:
        if self.done:  # called at every step: after the decision, nothing more
            return
        step_marks = [value for label, value in timeline.marks if label == "step"]
        if len(step_marks) < self.steps + 1:
            return
        self.done = True  # decided once: the later steps run unobserved (no more syncs)
        if timeline.device is not None:
            step_marks[-1].synchronize()
        warm = [timeline.seconds(a, b) for a, b in zip(step_marks[:-1], step_marks[1:], strict=True)]
        timesteps = getattr(self.scheduler, "timesteps", None)
        total = self.total_steps or (len(timesteps) if timesteps is not None else 0)
        if not total:
            return
        projected = statistics.median(warm) * total
        if projected > self.limit_s:
            raise _Pruned(projected, len(warm))


class _Timeline:
    """Marks inside one call: CUDA events on a GPU (read after one sync at the end), clocks on CPU."""

    def __init__(self, device: torch.device | None, probe: _Probe | None = None) -> None:
        self.device = device
        self.marks: list[tuple[str, Any]] = []
        self.probe = probe

    def mark(self, label: str) -> None:
        if self.device is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))
        if label == "step" and self.probe is not None:
            self.probe.check(self)

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
        self.uses_callback = "callback_on_step_end" in call_parameters(pipe)
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
            out = encode(*args, **kwargs)  # no end mark when it raises: the failure is in the encoding
            if self.timeline is not None:
                self.timeline.mark("encode_end")
            return out

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
    pipe: Any, inst: _Instrument, device: torch.device | None, seed: int, kwargs: dict[str, Any], keep: bool,
    probe: _Probe | None = None,
) -> _CallResult:
    timeline = _Timeline(device, probe)
    inst.timeline, inst.latents = timeline, None
    call = dict(kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    if inst.uses_callback:
        call["callback_on_step_end"] = inst.step_callback
    try:
        if device is not None:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        timeline.mark("start")
        try:
            out = pipe(**call)
        except Exception as exc:
            exc.fluxtune_phase = _phase(timeline, kwargs.get("num_inference_steps"))  # type: ignore[attr-defined]
            raise
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



def _phase(timeline: _Timeline, steps: Any) -> str:
    """Where in a call it stopped, from the marks it had put down (for an out-of-memory message)."""
    labels = [label for label, _ in timeline.marks]
    done = labels.count("step")
    if "encode_start" in labels and "encode_end" not in labels:
        return "text encoding"
    if done == 0:
        return "denoising step 1" if "encode_end" in labels else "the call's start (text encoding or before)"
    if isinstance(steps, int) and done >= steps:
        return "VAE decoding"
    return f"denoising step {done + 1}"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


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
    stop_above_s: float | None = None,
    on_call: Callable[[CallMark], None] | None = None,
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
        stop_above_s: multi-fidelity. The first call with enough steps (the warm-up, else the first timed
            call) projects its latency from its first warm steps; above this many seconds the measurement
            stops there with status ``pruned`` and ``projected_latency_s`` (no images, no quality).
        on_call: called with a :class:`CallMark` before and after each call (a worker sends its parent
            where it is, so that a run killed at its time limit still says what it had measured).

    Returns:
        A :class:`Measurement`; never raises except ``KeyboardInterrupt``.
    """
    m = Measurement(workload=workload.to_dict())
    say = progress or (lambda _msg: None)
    mark = on_call or (lambda _mark: None)
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
        if device is not None:
            # A pruned call stops in the warm-up: its peak must not be the worker's earlier ones (the
            # H200 search printed 34 GB "allocated" under a 12 GB cap: the replica's build on the GPU).
            torch.cuda.reset_peak_memory_stats(device)
        with Sampler(device.index if device is not None else None) as sampler, _Instrument(pipe) as inst:
            try:
                seed, kwargs = calls[0]
                total = kwargs.get("num_inference_steps")
                probe = None
                if stop_above_s is not None:
                    probe = _Probe(stop_above_s, int(total) if total else None, getattr(pipe, "scheduler", None))
                warm_probe = probe
                if workload.warmup_steps is not None:
                    kwargs = {**kwargs, "num_inference_steps": workload.warmup_steps}
                    if total is None:  # a shortened warm-up's scheduler does not know the timed step count
                        warm_probe = None
                for i in range(workload.warmup):
                    say(f"warm-up {i + 1}/{workload.warmup}")
                    mark(CallMark("warm-up", i, workload.warmup))
                    m.warmup_s.append(_one_call(pipe, inst, device, seed, kwargs, keep=False, probe=warm_probe).latency)
                    mark(CallMark("warm-up", i, workload.warmup, m.warmup_s[-1]))
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
                        mark(CallMark("run", len(results), workload.runs * len(calls)))
                        results.append(_one_call(pipe, inst, device, seed, kwargs, keep=keep_images and last,
                                                 probe=probe))
                        mark(CallMark("run", len(results) - 1, workload.runs * len(calls), results[-1].latency))
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
    except _Pruned as exc:
        m.status, m.projected_latency_s = Status.PRUNED, exc.projected
        m.error = f"pruned: {exc} > the limit {stop_above_s:.3g}s"
        gc.collect()  # the interrupted call's frames hold activations
        return m
    except Exception as exc:
        m.status = Status.OOM if _is_oom(exc) else Status.ERROR
        phase = getattr(exc, "fluxtune_phase", None)
        m.error = (f"during {phase}: " if phase else "") + one_line(exc)
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
