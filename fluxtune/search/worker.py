"""Trial workers: a process that owns one pipeline on one device and runs trials sent to it.

The parent asks Optuna for trials and sends each profile here over a pipe; a worker that crashes or
is killed takes only its current trial with it (the parent records it and starts a new worker).
Inside, trials reuse the loaded pipeline: reversible knobs are re-applied in place, and a trial that
needs different irreversible knobs (quantization, casting, fused QKV, compile) starts from pristine
weights kept in host memory (or rebuilt, for the deterministic built-in models), never from disk.
"""

from __future__ import annotations

import copy
import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WorkerConfig:
    """What a worker needs to start; plain data so it crosses the process boundary."""

    model: str
    device: str  # "cuda:0", "cpu"
    dtype: str
    workload: dict[str, Any]
    budget_bytes: int | None
    study_dir: str
    gpu_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrialSession:
    """Holds the pipeline between trials and runs one profile at a time; never raises."""

    def __init__(self, cfg: WorkerConfig) -> None:
        import torch

        from fluxtune import pipelines
        from fluxtune.hardware import detect_hardware
        from fluxtune.measure import Workload

        self.cfg = cfg
        self.torch = torch
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.hardware = detect_hardware(self.device.index or 0) if self.device.type == "cuda" else detect_hardware()
        self.workload = Workload.from_dict(cfg.workload)
        self.builtin = pipelines.builtin(cfg.model) is not None
        t0 = time.perf_counter()
        self.pipe = self._fresh()
        self.load_s = time.perf_counter() - t0
        self.pristine: dict[str, Any] | None = None
        if not self.builtin:
            # Host copies of the untouched weights: restoring them beats re-reading the checkpoint.
            self.pristine = {n: copy.deepcopy(m).to("cpu") for n, m in pipelines.module_components(self.pipe).items()}
        self.dirty = False
        self.reference: Any = None

    def _fresh(self) -> Any:
        from fluxtune import pipelines

        spec = pipelines.builtin(self.cfg.model)
        device = self.cfg.device if spec is not None and spec.needs_gpu else None
        pipe: Any = pipelines.load(self.cfg.model, device=device, dtype=self.cfg.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def facts(self) -> dict[str, Any]:
        from fluxtune.memory import ModelFacts

        return ModelFacts.from_pipeline(self.pipe).to_dict()

    # -- pipeline lifecycle ---------------------------------------------------------------------
    def _restore(self) -> None:
        """Give the next trial pristine weights and no fluxtune state."""
        torch = self.torch
        from fluxtune.tuning.generation import base_class

        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        pipe, self.pipe = self.pipe, None
        torch.compiler.reset()  # compiled code refers to the old modules
        if self.pristine is None:
            del pipe
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.pipe = self._fresh()
        else:
            pipe.__class__ = base_class(pipe)
            pipe.__dict__.pop("_fluxtune", None)
            pipe.register_modules(**{name: None for name in self.pristine})
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            pipe.register_modules(**{name: copy.deepcopy(m) for name, m in self.pristine.items()})
            self.pipe = pipe
        self.dirty = False

    def _pipeline_for(self, profile: Any) -> Any:
        from fluxtune.tuning import irreversible_signature, is_tuned

        if self.dirty:
            self._restore()
        elif is_tuned(self.pipe):
            same = irreversible_signature(self.pipe._fluxtune.profile) == irreversible_signature(profile)
            if not same:
                self._restore()
        return self.pipe

    # -- running -------------------------------------------------------------------------------
    def run(self, profile_data: dict[str, Any], *, reference: bool = False, trial: int | None = None,
            compiled_floor: bool = False, samples: int = 0, time_box_s: float | None = None) -> dict[str, Any]:
        """Apply and measure one profile; returns plain data (status, measurement, quality, timings)."""
        torch = self.torch
        from fluxtune.errors import BudgetExceededError, FluxtuneError
        from fluxtune.measure import compare, measure
        from fluxtune.presets import load_profile
        from fluxtune.tuning import apply, preload

        out: dict[str, Any] = {"status": "error", "trial": trial}
        try:
            profile = load_profile(profile_data)
            t0 = time.perf_counter()
            pipe = self._pipeline_for(profile)
            out["restore_s"] = time.perf_counter() - t0
            # First use of torchao/TorchDynamo in this process: imports, reported apart from apply.
            out["imports_s"] = preload(profile)
            self.dirty = True  # until apply finished cleanly
            t0 = time.perf_counter()
            report = apply(profile, pipe, hardware=self.hardware, device=str(self.device))
            out["apply_s"] = time.perf_counter() - t0
            out["quantize_s"] = report.seconds("quantize")
            out["placement_s"] = report.seconds("offload")
            out["apply_parts"] = {f"{a.knob}/{a.component}": round(a.seconds, 3) for a in report.actions
                                  if a.seconds >= 0.01}
            out["report"] = str(report)
            self.dirty = False
        except BudgetExceededError as e:
            out.update(status="over_budget", error=str(e))
            return out
        except torch.OutOfMemoryError as e:
            out.update(status="oom", error=f"out of memory while applying: {str(e).splitlines()[0]}")
            return out
        except FluxtuneError as e:
            out.update(status="invalid", error=str(e))
            return out
        except Exception as e:  # a library bug on this combination: record it, keep the worker alive
            out.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       traceback=traceback.format_exc(limit=8))
            return out
        index = self.device.index or 0 if self.device.type == "cuda" else 0
        workload = self._trial_workload(profile)
        m = measure(pipe, workload, budget_bytes=self.cfg.budget_bytes, device_index=index, time_box_s=time_box_s)
        if m.status in ("oom", "error"):
            self.dirty = True
        out["status"] = m.status
        out["error"] = m.error
        out["measurement"] = m.to_dict()
        if m.status in ("ok", "over_budget"):
            if reference:
                from dataclasses import replace

                from fluxtune.measure import Reference

                # A second identical run gives the noise floor quality is judged against; its images
                # are all that is used, so one untimed call does (a streamed replica call is 15 s).
                second = measure(pipe, replace(self.workload, runs=1, warmup=0), device_index=index)
                self.reference = Reference.from_runs(m, second if second.status == "ok" else None,
                                                     workload=self.workload)
                self.reference.save(self.reference_path)
                out["noise_floor"] = self.reference.noise_floor
            elif compiled_floor and (self.reference is not None or self.load_reference()):
                # The same lossless profile, compiled: how far compilation alone moves the pixels.
                self.reference.compiled_floor = compare(m, self.reference)
                self.reference.save(self.reference_path)
                out["compiled_floor"] = self.reference.compiled_floor
            elif self.reference is not None or self.load_reference():
                # (A worker started before the study's reference existed, e.g. the second of
                # --workers 2 or --gpus 0,1, picks it up from disk once the first worker wrote it.)
                from dataclasses import replace

                from fluxtune.measure import quality_drop

                if workload is not self.workload:
                    # Another batch draws other noise: judge quality on one call of the reference's workload.
                    qm = measure(pipe, replace(self.workload, runs=1, warmup=0), device_index=index)
                    if qm.status == "ok":
                        m.images = qm.images
                q = compare(m, self.reference)
                # Drops relative to the GPU's own noise floor are what the numbers mean.
                out["quality"] = {**q, **quality_drop(q, self.reference.floor)}
            if trial is not None and m.images is not None:
                self._save_images(m.images, f"trial_{trial:04d}.pt")
            if samples and self.workload.class_labels:
                try:
                    out["features"] = self._sample_features(pipe, profile, samples)
                except Exception as e:  # extra evidence: its failure is reported, the run stays measured
                    out["features_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return out

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
        from dataclasses import replace

        wl, batch = self.workload, profile.generation.images_per_prompt
        if self.cfg.extra.get("fixed_workload"):  # bench: the same workload for every candidate
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

    def scan(self, method: str, steps: int) -> dict[str, Any]:
        """A per-block sensitivity scan of ``method`` on the pristine pipeline; plain data, never raises."""
        from fluxtune.sensitivity import scan
        from fluxtune.tuning import is_tuned

        try:
            if self.dirty or is_tuned(self.pipe):
                self._restore()
            self.dirty = True  # the scan moves the pipeline; the next trial starts from pristine
            self.pipe.to(self.device)
            labels = list(self.workload.class_labels) or [0, 1]
            res = scan(self.pipe, method, class_labels=labels, seeds=[0], steps=steps, per_block=True,
                       model=self.cfg.model)
            return {"status": "ok", "result": res.to_dict()}
        except Exception as e:
            return {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}

    @property
    def reference_path(self) -> Path:
        return Path(self.cfg.study_dir) / "reference.pt"

    def load_reference(self) -> bool:
        from fluxtune.errors import FluxtuneError
        from fluxtune.measure import Reference

        try:
            self.reference = Reference.load(self.reference_path)
        except FluxtuneError:
            return False
        return True

    def _save_images(self, images: Any, name: str) -> None:
        folder = Path(self.cfg.study_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        # The first image of the workload is enough for the finalists' grid; keep it small (uint8).
        first = (images[:1].clamp(0, 1) * 255).round().to(self.torch.uint8).cpu()
        self.torch.save(first, folder / name)


def worker_main(conn: Any, cfg: WorkerConfig) -> None:
    """Entry point of a worker process: report readiness, then serve ``run`` requests until ``stop``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Test hook (used by tests/test_search.py, nowhere else): FLUXTUNE_TEST_CRASH_TRIAL=N makes this
    # process die abruptly when it is sent trial N, to exercise the parent's crash handling.
    crash_trial = os.environ.get("FLUXTUNE_TEST_CRASH_TRIAL")
    try:
        if cfg.extra.get("threads"):
            import torch

            torch.set_num_threads(int(cfg.extra["threads"]))
        session = TrialSession(cfg)
        have_ref = session.load_reference()
        conn.send(("ready", {"facts": session.facts(), "hardware": session.hardware.fingerprint(),
                             "load_s": session.load_s, "reference": have_ref}))
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "run":
            _, job, profile_data, options = msg
            if crash_trial is not None and str(options.get("trial")) == crash_trial:
                os._exit(1)
            result = session.run(profile_data, reference=options.get("reference", False), trial=options.get("trial"),
                                 compiled_floor=options.get("compiled_floor", False),
                                 samples=int(options.get("samples", 0)), time_box_s=options.get("time_box_s"))
            conn.send(("result", job, result))
        if msg[0] == "scan":
            _, job, method, steps = msg
            conn.send(("result", job, session.scan(method, steps)))
