"""The worker's side: a process that owns one pipeline on one device and runs the profiles sent to it.

The parent (the search, the bench) sends :class:`~fluxtune.worker.protocol.RunRequest` messages over a
pipe and gets :class:`~fluxtune.worker.protocol.RunOutcome` messages back, each after any number of
:class:`~fluxtune.worker.protocol.Progress` messages; a worker that crashes or is killed takes only its
current run with it (the parent records it, with the last progress, and starts a new worker).
Inside, trials reuse the loaded pipeline: reversible knobs are re-applied in place, and a trial that
needs different irreversible knobs (quantization, casting, fused QKV, compile) starts from pristine
weights: a loaded model is a skeleton (:func:`fluxtune.loading.skeleton`) whose weights each apply reads
from the checkpoint, so no host copy of the model is kept between trials; built-ins are rebuilt.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtune.profile import Profile
from fluxtune.worker.protocol import (
    ApplyTimings,
    Fatal,
    Progress,
    Ready,
    RunOutcome,
    RunRequest,
    ScanOutcome,
    ScanRequest,
    Stage,
    Status,
    Stop,
    WorkerSpec,
)

if TYPE_CHECKING:
    from fluxtune.measure.timing import CallMark


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class TrialSession:
    """Holds the pipeline between trials and runs one profile at a time; never raises."""

    send_progress: Callable[[Progress], None] | None = None
    """Where :meth:`report` sends (the pipe, in a worker process); None: nowhere (a session in a test)."""
    _progress: Progress = Progress("apply")
    _run_t0: float = 0.0

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from fluxtune import pipelines
        from fluxtune.hardware import detect_hardware
        from fluxtune.measure import Workload

        self.spec = spec
        self.torch = torch
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.hardware = detect_hardware(self.device.index or 0) if self.device.type == "cuda" else detect_hardware()
        self.workload = Workload.from_dict(spec.workload)
        self.builtin = pipelines.builtin(spec.model) is not None
        t0 = time.perf_counter()
        self.pipe = self._fresh()
        self.load_s = time.perf_counter() - t0
        self.dirty = False
        self.held_after_restore: list[str] | None = None
        self.left_after_restore: int | None = None
        self.reference: Any = None

    def _fresh(self) -> Any:
        from fluxtune import pipelines

        spec = pipelines.builtin(self.spec.model)
        if spec is None:
            from fluxtune.loading import skeleton

            pipe: Any = skeleton(self.spec.model, dtype=self.spec.dtype)
            return pipe
        device = self.spec.device if spec.needs_gpu else None
        pipe = pipelines.load(self.spec.model, device=device, dtype=self.spec.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def facts(self) -> dict[str, Any]:
        from fluxtune.memory import ModelFacts

        return ModelFacts.from_pipeline(self.pipe).to_dict()

    # -- pipeline lifecycle ---------------------------------------------------------------------
    def _restore(self) -> None:
        """Give the next trial pristine weights and no fluxtune state."""
        torch = self.torch
        from fluxtune.tuning import discard

        if self.device.type == "cuda":
            # The budget's undo lifts the cap too, but an apply that failed part-way left no undo list.
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        pipe, self.pipe = self.pipe, None
        # Hooks, caches, the process-wide attention backend undone, then every tensor of the old modules
        # freed: whatever still refers to them keeps empty shells, not weights (an H200 search lost the
        # reference's pipeline, page-locked host copies included, to such a reference).
        discard(pipe)
        torch.compiler.reset()  # compiled code refers to the old modules
        old = {name: weakref.ref(c) for name, c in getattr(pipe, "components", {}).items()
               if isinstance(c, torch.nn.Module)}
        del pipe
        gc.collect()
        self.held_after_restore = sorted(name for name, ref in old.items() if ref() is not None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.left_after_restore = int(torch.cuda.memory_allocated(self.device))
        self.pipe = self._fresh()
        self.dirty = False

    def _pipeline_for(self, profile: Profile) -> Any:
        from fluxtune.tuning import irreversible_signature
        from fluxtune.tuning.state import call_state

        state = call_state(self.pipe)
        if self.dirty or (state is not None
                          and irreversible_signature(state.profile) != irreversible_signature(profile)):
            self._moved("restore")
            self._restore()
        return self.pipe

    # -- progress ------------------------------------------------------------------------------
    def report(self, progress: Progress) -> None:
        """Tell the parent where the current run is. Never raises: a parent that is gone is found by the
        outcome's send (which ends the worker), and the run itself must not depend on being watched."""
        if self.send_progress is None:
            return
        with contextlib.suppress(OSError, ValueError):  # BrokenPipeError; a closed connection
            self.send_progress(progress)

    def _moved(self, stage: Stage, **changes: Any) -> None:
        """The current run moved on: note it, with the peaks so far, and report it."""
        from fluxtune.measure.sampler import lifetime_peak_rss

        reserved = allocated = None
        if self.device.type == "cuda":  # allocator statistics: host-side counters, no sync
            reserved = int(self.torch.cuda.max_memory_reserved(self.device))
            allocated = int(self.torch.cuda.max_memory_allocated(self.device))
        self._progress = replace(self._progress, stage=stage, elapsed_s=time.perf_counter() - self._run_t0,
                                 peak_reserved=reserved, peak_allocated=allocated,
                                 host_ram_peak=lifetime_peak_rss(), **changes)
        self.report(self._progress)

    def _on_call(self, mark: CallMark) -> None:
        """``measure``'s marks as progress: before and after each warm-up and timed call."""
        p = self._progress
        if mark.phase == "warm-up":
            warm = p.warmup_s if mark.latency_s is None else (*p.warmup_s, mark.latency_s)
            self._moved("warm-up", warmup_s=warm, warmup_total=mark.total)
        else:
            runs = p.latencies if mark.latency_s is None else (*p.latencies, mark.latency_s)
            self._moved("run", latencies=runs, runs_total=mark.total)

    # -- running -------------------------------------------------------------------------------
    def run(self, req: RunRequest) -> RunOutcome:
        """Apply and measure one profile; never raises."""
        torch = self.torch
        from fluxtune.errors import BudgetExceededError, FluxtuneError
        from fluxtune.measure import compare, measure
        from fluxtune.tuning import apply, preload

        profile = req.profile
        timings: dict[str, Any] = {}
        self._run_t0, self._progress = time.perf_counter(), Progress("apply")  # nothing sent until it moves

        def failed(status: Status, error: str, tb: str | None = None) -> RunOutcome:
            return RunOutcome(status, trial=req.trial, error=error, traceback=tb, timings=ApplyTimings(**timings))

        try:
            t0 = time.perf_counter()
            self.held_after_restore, self.left_after_restore = None, None
            pipe = self._pipeline_for(profile)
            timings["restore_s"] = time.perf_counter() - t0
            timings["held_after_restore"] = self.held_after_restore
            timings["left_after_restore"] = self.left_after_restore
            # First use of torchao/TorchDynamo in this process: imports, reported apart from apply.
            self._moved("apply", detail="imports")
            timings["imports_s"] = preload(profile)
            self.dirty = True  # until apply finished cleanly
            t0 = time.perf_counter()
            report = apply(profile, pipe, hardware=self.hardware, device=str(self.device),
                           on_knob=lambda knob: self._moved("apply", detail=knob))
            timings["apply_s"] = time.perf_counter() - t0
            timings["quantize_s"] = report.seconds("quantize")
            timings["placement_s"] = report.seconds("offload")
            timings["parts"] = {f"{a.knob}/{a.component}": round(a.seconds, 3) for a in report.actions
                                if a.seconds >= 0.01}
            self.dirty = False
        except BudgetExceededError as e:
            return failed(Status.OVER_BUDGET, str(e))
        except torch.OutOfMemoryError as e:
            return failed(Status.OOM, f"out of memory while applying: {str(e).splitlines()[0]}")
        except FluxtuneError as e:
            return failed(Status.INVALID, str(e))
        except Exception as e:  # a library bug on this combination: record it, keep the worker alive
            return failed(Status.ERROR, _one_line(e), traceback.format_exc(limit=8))
        index = self.device.index or 0 if self.device.type == "cuda" else 0
        workload = self._trial_workload(profile)
        if req.role == "reference" and not self.spec.fixed_workload:
            # A search's reference is there for its images (the quality every trial is judged by), not
            # its speed: no warm-up and one call, then the second identical call below gives both the
            # noise floor and a warm latency (a streamed bf16 FLUX call is 15 s: two calls, not four).
            workload = replace(workload, runs=1, warmup=0)
        self._moved("warm-up" if workload.warmup else "run", detail=None, apply_s=timings["apply_s"],
                    warmup_total=workload.warmup)
        m = measure(pipe, workload, budget_bytes=self.spec.budget_bytes, device_index=index, time_box_s=req.time_box_s,
                    stop_above_s=req.prune_above_s if req.role == "trial" else None, keep_images=req.role != "retime",
                    on_call=self._on_call)
        if self.spec.fixed_workload:
            # A bench worker runs one candidate in its own process: its host peak covers the load and
            # the apply too (a search's workers run many trials, so their process peak would not be one trial's).
            from fluxtune.measure.sampler import lifetime_peak_rss

            m = replace(m, host_ram_peak=max(m.host_ram_peak or 0, lifetime_peak_rss() or 0) or None)
        if m.status in (Status.OOM, Status.ERROR):
            self.dirty = True
        extra: dict[str, Any] = {}
        if m.status in (Status.OK, Status.OVER_BUDGET):
            if req.role == "reference":
                from fluxtune.measure import Reference

                # A second identical run gives the noise floor quality is judged against; its images
                # are all that is used, so one untimed call does (a streamed replica call is 15 s).
                self._moved("noise floor")
                second = measure(pipe, replace(self.workload, runs=1, warmup=0), device_index=index)
                if not self.spec.fixed_workload and second.status == Status.OK:
                    # The first call was cold (no warm-up): report the second, warm one as the latency.
                    m = replace(m, first_call_s=m.latency_s, latency_s=second.latency_s,
                                latency_runs=second.latency_runs, step_s=second.step_s)
                self.reference = Reference.from_runs(m, second if second.status == Status.OK else None,
                                                     workload=self.workload)
                self.reference.save(self.reference_path)
                extra["noise_floor"] = self.reference.noise_floor
            elif req.role == "compiled_floor" and (self.reference is not None or self.load_reference()):
                # The same lossless profile, compiled: how far compilation alone moves the pixels.
                self.reference.compiled_floor = compare(m, self.reference)
                self.reference.save(self.reference_path)
                extra["compiled_floor"] = self.reference.compiled_floor
            elif req.role == "trial" and (self.reference is not None or self.load_reference()):
                # (A worker started before the study's reference existed, e.g. the second of
                # --workers 2 or --gpus 0,1, picks it up from disk once the first worker wrote it.)
                from fluxtune.measure import quality_drop

                if workload is not self.workload:
                    # Another batch draws other noise: judge quality on one call of the reference's workload.
                    self._moved("quality")
                    qm = measure(pipe, replace(self.workload, runs=1, warmup=0), device_index=index)
                    if qm.status == Status.OK:
                        m.images = qm.images
                q = compare(m, self.reference)
                # Drops relative to the GPU's own noise floor are what the numbers mean.
                extra["quality"] = {**q, **quality_drop(q, self.reference.floor)}
            if req.trial is not None and m.images is not None and req.role != "retime":
                self._save_images(m.images, f"trial_{req.trial:04d}.pt")
            if req.samples and self.workload.class_labels:
                try:
                    self._moved("samples")
                    extra["features"] = self._sample_features(pipe, profile, req.samples)
                except Exception as e:  # extra evidence: its failure is reported, the run stays measured
                    extra["features_error"] = _one_line(e)
        # The tensors stay here (images are saved above); only their shapes cross the pipe.
        shapes = {f"{name}_shape": list(t.shape) if t is not None else None
                  for name, t in (("images", m.images), ("latents", m.latents))}
        return RunOutcome(Status(m.status), trial=req.trial, error=m.error,
                          measurement=replace(m, images=None, latents=None), tensor_shapes=shapes,
                          timings=ApplyTimings(**timings), report=str(report), **extra)

    def _sample_features(self, pipe: Any, profile: Any, n: int) -> list[list[float]]:
        """Distribution features (:mod:`fluxtune.distribution`) of ``n`` class-conditional samples on fixed
        labels and seeds, in batches of the profile's batch; features, not images, cross the pipe."""
        import numpy as np

        from fluxtune.distribution import features
        from fluxtune.sensitivity import render

        batch = profile.generation.images_per_prompt
        labels = [(i * 37) % 1000 for i in range(n)]
        steps = profile.generation.steps
        imgs = [render(pipe, labels[i:i + batch], seeds=[i // batch], steps=steps) for i in range(0, n, batch)]
        x = self.torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2)
        return features(x).tolist()  # type: ignore[no-any-return]

    def _trial_workload(self, profile: Any) -> Any:
        """The study's workload at the profile's batch (``generation.images_per_prompt``)."""
        wl, batch = self.workload, profile.generation.images_per_prompt
        if self.spec.fixed_workload:  # bench: the same workload for every candidate
            return wl
        if wl.class_labels:  # DiT: the batch is the number of labels in a call
            n = len(wl.class_labels) * (wl.images_per_prompt or 1)
            if batch == n:
                return wl
            labels = [wl.class_labels[i % len(wl.class_labels)] for i in range(batch)]
            return replace(wl, class_labels=tuple(labels), images_per_prompt=None)
        if batch == (wl.images_per_prompt or 1):
            return wl
        return replace(wl, images_per_prompt=batch)

    def scan(self, req: ScanRequest) -> ScanOutcome:
        """A per-block sensitivity scan on the pristine pipeline; never raises."""
        from fluxtune.sensitivity import scan
        from fluxtune.tuning import is_tuned

        try:
            if self.dirty or is_tuned(self.pipe):
                self._restore()
            self.dirty = True  # the scan moves the pipeline; the next trial starts from pristine
            from fluxtune.loading import materialize_pipeline

            materialize_pipeline(self.pipe, self.device)
            wl = self.workload
            if wl.class_labels:
                res = scan(self.pipe, req.method, class_labels=list(wl.class_labels), seeds=[0], steps=req.steps,
                           per_block=True, model=self.spec.model)
            else:  # prompted: the study's prompts and size, the pipeline's own guidance
                size = {k: v for k, v in (("height", wl.height), ("width", wl.width),
                                          ("max_sequence_length", wl.max_sequence_length)) if v is not None}
                res = scan(self.pipe, req.method, prompts=list(wl.prompts) or None, seeds=[0], steps=req.steps,
                           guidance_scale=None, per_block=True, model=self.spec.model, call=size)
            return ScanOutcome(Status.OK, result=res.to_dict())
        except Exception as e:
            return ScanOutcome(Status.ERROR, error=_one_line(e))

    @property
    def reference_path(self) -> Path:
        return Path(self.spec.study_dir) / "reference.pt"

    def load_reference(self) -> bool:
        from fluxtune.errors import FluxtuneError
        from fluxtune.measure import Reference

        try:
            self.reference = Reference.load(self.reference_path)
        except FluxtuneError:
            return False
        return True

    def _save_images(self, images: Any, name: str) -> None:
        folder = Path(self.spec.study_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        # The first image of the workload is enough for the finalists' grid; keep it small (uint8).
        first = (images[:1].clamp(0, 1) * 255).round().to(self.torch.uint8).cpu()
        self.torch.save(first, folder / name)


def session_class(path: str) -> type[TrialSession]:
    """The class a ``module:Class`` path names (:attr:`WorkerSpec.session`)."""
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, TrialSession)):
        raise TypeError(f"{path} is not a TrialSession subclass")
    return cls


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """Entry point of a worker process: report readiness, then serve requests until :class:`Stop`.

    A parent that is gone (killed, or exited without a Stop) ends the worker quietly: a closed pipe
    is the signal to exit, not an error to print.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle (it stops us)
    try:
        _serve(conn, spec)
    except (BrokenPipeError, ConnectionResetError, EOFError, KeyboardInterrupt):
        return


def _serve(conn: Any, spec: WorkerSpec) -> None:
    try:
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        session = session_class(spec.session)(spec)
        session.send_progress = conn.send
        have_ref = session.load_reference()
        ready = Ready(facts=session.facts(), hardware=session.hardware.fingerprint(), load_s=session.load_s,
                      reference=have_ref)
    except Exception as e:
        conn.send(Fatal(f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))
        return
    conn.send(ready)
    while True:
        msg = conn.recv()
        if isinstance(msg, Stop):
            return
        if isinstance(msg, RunRequest):
            conn.send(session.run(msg))
        elif isinstance(msg, ScanRequest):
            conn.send(session.scan(msg))
